"""Atomic directory writes: build a directory beside its target, then put it in place,
replacing only a directory our writers produced.

`check_replaceable` says before any work whether a save may write a target;
`atomic_directory` yields the temporary directory and renames it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError

# Every file a checkpoint writer of ours produces: the packed checkpoint, the CLI's dense
# output (transformers' save_pretrained) and the compressed-tensors export, with their
# tokenizers and the CLI's report. Replacing a directory deletes it whole, so a directory
# holding anything else is never replaced (see `check_replaceable`).
WRITER_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "sparsity.json",
        "owl_sparse.safetensors",
        "model.safetensors",
        "model.safetensors.index.json",
        "prune_report.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "spiece.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "llama2c_tokenizer.json",
        "tokenizer.bin",  # the llama2.c tokenizer (not a pickle)
    }
)
_WRITER_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` and the directories holding them."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def foreign_entries(path: Path) -> list[str]:
    """Names in directory ``path`` that no writer of ours produces (`WRITER_FILES`,
    ``model-NNNNN-of-NNNNN.safetensors`` shards); subdirectories always count."""
    return sorted(
        p.name
        for p in path.iterdir()
        if not (p.is_file() and (p.name in WRITER_FILES or _WRITER_SHARD.match(p.name)))
    )


def check_replaceable(target: str | os.PathLike, is_ours, what: str) -> None:
    """Raise InputError unless a save may write ``target`` (checked before any work).

    The directory the save writes in must accept a new file (`_check_writable`).
    ``target`` may be missing (its first existing ancestor must be a directory), an empty
    directory, or a directory for which ``is_ours(target)`` is true and that holds only
    files our writers produce (otherwise the InputError lists the others: a save
    replaces the whole directory, so they would be lost). ``what`` names the kind of
    directory ``is_ours`` accepts, for the message.
    """
    target = Path(target)
    if not target.exists():
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"{target}: cannot create it, {parent} is not a directory")
        _check_writable(parent, target)
        return
    _check_writable(target.parent, target)
    if not target.is_dir():
        raise InputError(f"{target} exists and is not a directory; refusing to replace it")
    if not any(target.iterdir()):
        return
    if not is_ours(target):
        raise InputError(f"{target} exists and is neither empty nor {what}; refusing to replace it")
    extra = foreign_entries(target)
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise InputError(
            f"{target} is {what} but also holds {shown}; saving replaces the whole "
            "directory, so move those away first (nothing was written)"
        )


def _check_writable(directory: Path, target: Path) -> None:
    """InputError unless a file can be created in ``directory`` (where the save's
    temporaries go): permissions, a read-only file system, a pseudo file system such as
    /proc. Probed by creating and removing an empty file, which also holds for root."""
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(target, "probe"), dir=directory)
    except OSError as e:
        raise InputError(
            f"{target}: cannot write in {directory} ({e.strerror or e}); nothing was done"
        ) from e
    os.close(fd)
    os.unlink(probe)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_modes(root: Path) -> None:
    """Give ``root`` and everything below it the modes plain ``mkdir`` / ``open`` would
    (``0o777`` / ``0o666`` less the umask): mkdtemp makes 0700 directories, and some
    writers (transformers' safetensors) 0600 files, so a shared checkpoint was unreadable
    to the other users its directory's umask meant to let in."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(parent, name)
                if not os.path.islink(path):  # a link's target is not ours to change
                    os.chmod(path, mode & ~mask)


RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step


def _libc_renameat2():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2() if os.name == "posix" else None
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``): at no moment is either path missing. Returns False where the
    system or file system cannot (then nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    import ctypes

    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _temp_prefix(target: Path, kind: str) -> str:
    """``.NAME.tmp-PID-`` / ``.NAME.old-PID-``: the writer's PID lets a later save tell a
    temporary a killed save left behind from one a running save is writing."""
    return f".{target.name}.{kind}-{os.getpid()}-"


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|probe)-(?P<pid>\d+)-[^/]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(target: str | os.PathLike) -> list[Path]:
    """Clean up after saves to ``target`` that were killed (SIGKILL, SIGTERM, power loss).

    Temporaries ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` beside ``target`` whose process is
    gone are removed, except the previous checkpoint kept in ``.old-*/previous`` when
    ``target`` itself is missing (the kill fell between the two renames of a system without
    `exchange`): that one is put back at ``target``. Returns the paths removed or restored.
    Called by every `atomic_directory` save before it writes.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    done = []
    for entry in sorted(parent.iterdir()):
        m = _TEMP.match(entry.name)
        if not (m and m["name"] == target.name) or _alive(int(m["pid"])):
            continue
        if m["kind"] == "probe":  # `_check_writable`'s empty file
            if entry.is_file() and not entry.is_symlink():
                entry.unlink()
                done.append(entry)
            continue
        if not entry.is_dir():
            continue
        previous = entry / "previous"
        if m["kind"] == "old" and previous.is_dir() and not target.exists():
            os.replace(previous, target)
            fsync_dir(parent)
        shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, is_ours, what: str = "an owl-sparse checkpoint"):
    """Yield a fresh temporary directory beside ``target``; on success put it in place.

    An existing ``target`` is replaced only as `check_replaceable` allows (otherwise
    InputError before anything is written). The new directory and its files get the modes
    a plain ``mkdir`` / ``open`` would give them (`_plain_modes`, not mkdtemp's 0700).

    Replacing an existing ``target``: on Linux the new and the old directory are swapped in
    one step (`exchange`), so a kill at any moment leaves ``target`` the complete old or
    the complete new checkpoint. Elsewhere (or on a file system without the swap) the old
    one is first renamed aside into ``.NAME.old-PID-*/previous``: a kill between that rename
    and the next leaves ``target`` missing for that moment, and the next save to it
    (`recover_interrupted`) puts the old one back. Temporaries a killed save leaves are
    removed by the next save to the same target. On an exception the temporary directory is
    removed and ``target`` is as before.
    """
    target = Path(target)
    check_replaceable(target, is_ours, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"), dir=target.parent))
    old = None
    try:
        yield tmp
        _plain_modes(tmp)
        fsync_tree(tmp)
        if target.exists() and exchange(tmp, target):
            fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old checkpoint
            return
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "old"), dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
        if tmp.exists() and not (target.exists() and tmp.samefile(target)):
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            _restore(old, target, e)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _restore(old: Path, target: Path, error: BaseException) -> None:
    """After a failed save: put ``old/previous`` back at ``target`` and remove ``old``."""
    previous = old / "previous"
    if previous.exists() and not target.exists():
        try:
            os.replace(previous, target)
        except OSError as e:
            error.add_note(f"the previous contents of {target} are in {previous} ({e})")
            return
    shutil.rmtree(old, ignore_errors=True)
