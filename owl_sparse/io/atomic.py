"""Atomic directory writes: build a directory beside its target, then put it in place,
replacing only a directory our writers produced.

`check_replaceable` says before any work whether a save may write a target;
`atomic_directory` yields the temporary directory and renames it into place.
"""

from __future__ import annotations

import contextlib
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
        return
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


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, is_ours, what: str = "an owl-sparse checkpoint"):
    """Yield a fresh temporary directory beside ``target``; on success rename it to target.

    An existing ``target`` is replaced only as `check_replaceable` allows (otherwise
    InputError before anything is written). The new directory and its files get the modes
    a plain ``mkdir`` / ``open`` would give them (`_plain_modes`, not mkdtemp's 0700). An
    existing target is first renamed aside and deleted only after the new directory is in
    place. On any
    exception the temporary directory is removed and ``target`` is as before: when the
    final rename fails, the previous directory is renamed back; no hidden directory is
    left behind (the previous one only if putting it back fails too, and the exception
    then says where it is).
    """
    target = Path(target)
    check_replaceable(target, is_ours, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        _plain_modes(tmp)
        fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
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
