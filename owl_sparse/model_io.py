"""Building blocks shared by the packed checkpoint and the compressed-tensors interchange.

- `meta_model`: a transformers model rebuilt from its config with every *parameter* on the
  meta device (no memory) while buffers (rotary tables) are computed for real;
- `place_tensor` / `tie` / `check_materialised`: put loaded tensors into that skeleton;
- `check_values`: the numeric sanity check every floating tensor passes, saved or loaded;
- `resolve_dtype` / `resolve_device`: the loaders' ``dtype`` and ``device`` arguments;
- `weight_files`: the safetensors weights of a Hugging Face style directory (pickles refused);
- `atomic_directory`: write a directory beside its target and rename it into place, replacing
  only a directory our writers produced (`check_replaceable`);
- `save_tokenizer` / `load_tokenizer`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .checkpoint_record import DTYPES
from .errors import InputError
from .safetensors_io import sniff

# The largest float16 value. No trained language model has a weight this large (such a
# checkpoint could not run in half precision), so a larger value means corruption.
FP16_MAX = 65504.0

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "llama2c_tokenizer.json",
)

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
_SHARD = re.compile(r"^[A-Za-z0-9_.-]+\.safetensors$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@contextlib.contextmanager
def _params_on_meta():
    """Every nn.Parameter registered inside the block lands on the meta device.

    Buffers are left alone, so values computed in ``__init__`` (rotary inv_freq) are real.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_config(path: Path, config_dict: dict | None = None):
    """The transformers config of ``path/config.json`` (never remote code).

    ``config_dict``: build from this dict instead of the file (used to drop entries such
    as a ``quantization_config`` that transformers would act upon).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json")
    try:
        if config_dict is None:
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
        model_type = config_dict.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown model_type {model_type!r}")
        return CONFIG_MAPPING[model_type].from_dict(config_dict)
    except config_errors() as e:
        raise InputError(f"{path}/config.json: not a usable transformers config ({e})") from e


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config.json it cannot use. huggingface_hub's strict
    dataclass validation (a field of the wrong type) derives from Exception only."""
    errors: tuple[type[BaseException], ...] = (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    )
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: no strict configs
        return errors
    return (*errors, StrictDataclassError)


def meta_model(config, dtype: torch.dtype, conv1d_to_linear: bool = False) -> nn.Module:
    """The causal LM of ``config`` with parameters on the meta device, in eval mode.

    ``conv1d_to_linear`` re-applies :func:`owl_sparse.models.conv1d_to_linear_` (GPT-2).
    """
    from transformers import AutoModelForCausalLM

    try:
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise InputError(f"cannot build a {config.model_type!r} model from its config ({e})") from e
    if conv1d_to_linear:
        from .models import conv1d_to_linear_

        conv1d_to_linear_(model)
    return model.eval()


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by name, tied ones under each of their names."""
    out = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for b_name, buf in mod._buffers.items():
            if buf is not None and b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = buf
    return out


def _split(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def place_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Set parameter or buffer ``name`` of ``model`` to ``tensor`` (no copy)."""
    parent, leaf = _split(name)
    module = model.get_submodule(parent)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise InputError(f"model has no parameter or buffer {name!r}")


def tie(model: nn.Module, alias: str, source: str) -> None:
    """Make ``alias`` the very same parameter object as ``source`` (tied weights)."""
    src_parent, src_leaf = _split(source)
    src_mod = model.get_submodule(src_parent)
    value = src_mod._parameters.get(src_leaf)
    if value is None:
        value = src_mod._buffers.get(src_leaf)
    parent, leaf = _split(alias)
    module = model.get_submodule(parent)
    if leaf in module._parameters:
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value


def check_materialised(model: nn.Module, where) -> None:
    """Raise InputError naming the first parameter or buffer still on the meta device."""
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if t.device.type == "meta":
            raise InputError(f"{where}: missing tensor {name!r} (never loaded)")


def check_values(name: str, t: torch.Tensor, where) -> None:
    """Raise InputError unless floating tensor ``t`` is finite and within +-`FP16_MAX`.

    The bound holds for every dtype: no trained language model has a weight that large
    (and a model with one could not run in float16), so a larger value means a corrupt
    file. `save_pretrained` runs this same check before writing, so a checkpoint it saves
    always loads. Non-floating and empty tensors pass.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    # min and max in one pass, no temporary the size of t: NaN and Inf propagate to them.
    lo, hi = (float(v) for v in torch.aminmax(t.detach().reshape(-1)))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{where}: tensor {name!r} contains NaN or Inf values")
    peak = max(-lo, hi)
    if peak > FP16_MAX:
        raise InputError(
            f"{where}: tensor {name!r} holds a value of magnitude {peak:.3g} (> {FP16_MAX:g}, "
            "more than any trained model's weights and beyond float16): refused as corrupt"
        )


def resolve_dtype(dtype, arg: str = "dtype") -> torch.dtype | None:
    """The loaders' ``dtype`` argument: None, ``torch.float16`` / ``bfloat16`` / ``float32``
    or one of their names ``"float16"``, ``"bfloat16"``, ``"float32"``. InputError else."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise InputError(
        f"{arg} must be one of torch.float16, torch.bfloat16, torch.float32 or their names "
        f"{sorted(DTYPES)}, got {dtype!r}"
    )


def resolve_device(device, arg: str = "device") -> torch.device | None:
    """The loaders' ``device`` argument as a torch.device on which tensors can live.

    None stays None. InputError for a string torch cannot parse, the meta device, and a
    device this machine does not have (CUDA without a GPU, an index beyond the count).
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"{arg}: {device!r} is not a torch device ({e})") from None
    if dev.type == "meta":
        raise InputError(f"{arg}: the meta device holds no data; use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{arg}: {dev} is not available (torch sees no CUDA device)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"{arg}: {dev} is not available ({torch.cuda.device_count()} CUDA devices)"
            )
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{arg}: {dev} is not available ({first})") from None
    return dev


def check_fits(model: nn.Module, dtype: torch.dtype | None, where) -> None:
    """Before converting ``model`` to ``dtype``: InputError naming the first floating
    parameter or buffer holding a finite value beyond float16's range when ``dtype`` is
    float16 (the conversion would silently make it Inf). Other dtypes hold every finite
    value of the others, so nothing is checked for them."""
    if dtype != torch.float16:
        return
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or t.dtype == dtype or t.numel() == 0:
            continue
        lo, hi = (float(v) for v in torch.aminmax(t.detach().reshape(-1)))
        # Inf and NaN are not made by the conversion: not ours to judge here.
        over = [abs(v) for v in (lo, hi) if math.isfinite(v) and abs(v) > FP16_MAX]
        if over:
            peak = max(over)
            raise InputError(
                f"{where}: tensor {name!r} holds a value of magnitude {peak:.3g}, beyond the "
                f"float16 range (+-{FP16_MAX:g}); load it as bfloat16 or float32"
            )


def weight_files(path: Path) -> list[Path]:
    """The safetensors weight files of a Hugging Face style directory.

    ``model.safetensors.index.json`` shards (plain ``*.safetensors`` names only), else
    ``model.safetensors``. InputError when there are none: pickle files (sniffed, so the
    llama2.c ``tokenizer.bin`` is not one) are named and refused, never read.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            files = sorted(set(wm.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: not a valid shard index ({e})") from e
        bad = [f for f in files if not isinstance(f, str) or not _SHARD.match(f)]
        if bad:
            raise InputError(
                f"{index}: shard names must be plain *.safetensors files, got {bad[:3]}"
            )
        return [path / f for f in files]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickles = sorted(
        p.name
        for p in path.iterdir()
        if p.suffix.lower() in _PICKLE_SUFFIXES and p.is_file() and sniff(p) in ("pickle", "zip")
    )
    if pickles:
        raise InputError(
            f"{path}: only pickle weights ({pickles[:3]}); owl-sparse reads safetensors only "
            "and never unpickles (convert them to model.safetensors first)"
        )
    raise InputError(f"{path}: no model.safetensors")


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


def save_tokenizer(tokenizer, directory: Path) -> None:
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise InputError(f"tokenizer {type(tokenizer).__name__} has no save_pretrained")
    tokenizer.save_pretrained(directory)


def load_tokenizer(directory: Path):
    """The tokenizer saved beside a checkpoint, or None when the directory has none."""
    if (directory / "llama2c_tokenizer.json").is_file():
        from .llama2c import Llama2cTokenizer

        return Llama2cTokenizer.from_pretrained(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except config_errors() as e:
        raise InputError(f"{directory}: no usable tokenizer ({e})") from e
