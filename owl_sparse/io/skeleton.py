"""A transformers model rebuilt from its config with no weight memory, and the checks every
tensor put into it passes.

- `meta_model`: the causal LM of a config with every *parameter* on the meta device (no
  memory) while buffers (rotary tables) are computed for real;
- `expected_tensors` / `place_tensor` / `tie` / `check_materialised`: fill that skeleton;
- `check_values`: the numeric sanity check every floating tensor passes, saved or loaded;
  `check_fits`: nothing overflows when converting to float16;
- `load_config` / `config_errors`: a directory's config.json (never remote code);
- `weight_files`: the safetensors weights of a Hugging Face style directory (pickles refused).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..models.structure import conv1d_to_linear_
from .safetensors import sniff

# The largest float16 value. No trained language model has a weight this large (such a
# checkpoint could not run in half precision), so a larger value means corruption.
FP16_MAX = 65504.0

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

    from .weights_check import check_config_values

    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: no config.json")
    try:
        raw = json.loads(config_file.read_text()) if config_dict is None else config_dict
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{config_file}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict):
        raise InputError(f"{config_file}: not a JSON object")
    check_config_values(raw, config_file)
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
        RecursionError,  # a deeply nested config.json
        ArithmeticError,  # its own validation divides by head counts
    )
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: no strict configs
        return errors
    return (*errors, StrictDataclassError)


def meta_model(config, dtype: torch.dtype, conv1d_to_linear: bool = False) -> nn.Module:
    """The causal LM of ``config`` with parameters on the meta device, in eval mode.

    ``conv1d_to_linear`` re-applies :func:`owl_sparse.models.structure.conv1d_to_linear_` (GPT-2).
    """
    from transformers import AutoModelForCausalLM

    try:
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # AssertionError: torch modules assert on their arguments (an Embedding's padding_idx).
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError) as e:
        raise InputError(f"cannot build a {config.model_type!r} model from its config ({e})") from e
    if conv1d_to_linear:
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
