"""Building blocks shared by the packed checkpoint and the compressed-tensors interchange.

- `meta_model`: a transformers model rebuilt from its config with every *parameter* on the
  meta device (no memory) while buffers (rotary tables) are computed for real;
- `place_tensor` / `tie` / `check_materialised`: put loaded tensors into that skeleton;
- `check_values`: the numeric sanity check every loaded floating tensor passes;
- `atomic_directory`: write a directory beside its target and rename it into place;
- `save_tokenizer` / `load_tokenizer`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

# No trained language model has a weight this large (it is also the largest fp16 value,
# so such a checkpoint could not run in half precision); a larger one means corruption.
MAX_ABS_VALUE = 65504.0

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "llama2c_tokenizer.json",
)


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
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"{path}/config.json: not a usable transformers config ({e})") from e


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
    """Floating tensors must be finite and within +-MAX_ABS_VALUE (see the constant)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    # min and max in one pass, no temporary the size of t: NaN and Inf propagate to them.
    lo, hi = (float(v) for v in torch.aminmax(t.reshape(-1)))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{where}: tensor {name!r} contains NaN or Inf values")
    peak = max(-lo, hi)
    if peak > MAX_ABS_VALUE:
        raise InputError(
            f"{where}: tensor {name!r} holds a value of magnitude {peak:.3g} (> {MAX_ABS_VALUE}): corrupt"
        )


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


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, is_replaceable):
    """Yield a fresh temporary directory beside ``target``; on success rename it to target.

    ``is_replaceable(existing_path) -> bool`` decides whether an existing ``target`` may be
    replaced (otherwise InputError before anything is written).  On any exception the
    temporary directory is removed and ``target`` is untouched.  An existing target is
    first renamed aside and deleted only after the new directory is in place.
    """
    target = Path(target)
    if target.exists() and not (target.is_dir() and is_replaceable(target)):
        raise InputError(f"{target} exists and is not a checkpoint this save may replace")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"{directory}: no usable tokenizer ({e})") from e
