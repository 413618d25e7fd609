"""What a model with packed layers consists of, for the writers and readers of io.

`sparse_layers` and `packed_state` give the tensors a checkpoint stores; `finish` is the last
step of every loader (dtype, device, eval mode); `converted_conv1d` tells whether a GPT-2
model had its Conv1D layers turned into nn.Linear before packing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..args import parse_device, parse_dtype
from ..nn.linear import SparseLinear, is_conv1d
from . import skeleton


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's SparseLinear modules by fully qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (packed layers in their flat layout) and the tied-weight map.

    Returns ``(tensors by name, {alias: stored name})``; a tensor reachable under several
    names (tied embeddings) is stored under the first and listed as an alias of it.
    """
    layers = sparse_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(layer.packed.state_dict(f"{name}."))
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    prefixes = tuple(f"{n}." for n in layers)
    for name, t in skeleton.expected_tensors(model).items():
        if not name.startswith(prefixes):
            tensors[name] = t
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in list(tensors.items()):
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() and key in seen:
            tied[name] = seen[key]
            del tensors[name]
        else:
            seen[key] = name
    return {k: v.detach() for k, v in tensors.items()}, tied


def has_conv1d(model: nn.Module) -> bool:
    return any(is_conv1d(m) for m in model.modules())


def converted_conv1d(model: nn.Module, config) -> bool:
    """True when the model has no Conv1D but its config builds one (GPT-2 after
    ``conv1d_to_linear_``): the loader must convert the same way."""
    if has_conv1d(model):
        return False
    return has_conv1d(skeleton.meta_model(config, torch.float32))


def finish(
    model: nn.Module, device=None, dtype: torch.dtype | None = None, where="model"
) -> nn.Module:
    """Convert floating parameters and packed values to ``dtype``, move to ``device``, eval.

    ``dtype`` / ``device`` as for `load_pretrained` (InputError otherwise, and for a value
    that float16 cannot hold, named with ``where``).  Buffers outside SparseLinear (rotary
    inv_freq tables) keep their dtype, as when transformers loads a model in half precision.
    """
    dtype, device = parse_dtype(dtype), parse_device(device)
    skeleton.check_fits(model, dtype, where)
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, SparseLinear):
                module.to(dtype)  # values and bias; the bitmap / meta stay integers
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
