"""Checks `prune` makes before it touches the model, so that bad input never leaves a model
partly pruned: the model and its arguments, the compute device, and every decoder block
(dense nn.Linear layers, finite parameters and buffers, widths divisible by M).
"""

from __future__ import annotations

import torch

from ..args import is_int, parse_device
from ..errors import InputError
from ..models.structure import find_linears
from ..nn.linear import SparseLinear


def check_model(model, batch_size) -> None:
    """``model`` is an nn.Module with real (not meta) tensors; ``batch_size`` is None or an
    integer >= 1."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise InputError(f"batch_size must be an integer >= 1 (or None), got {batch_size!r}")
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.device.type == "meta":
            raise InputError(
                f"{name} {tuple(t.shape)} is on the meta device: load real weights before pruning"
            )


def compute_device(device, blocks) -> torch.device:
    """``device`` as a torch.device (default: where the first block is)."""
    if device is None:
        return next(blocks.parameters()).device
    return parse_device(device)


def check_blocks(structure, config) -> None:
    """Before anything is pruned: the blocks hold nn.Linear layers (not packed ones), every
    floating parameter and buffer of theirs is finite (a NaN in a norm weight would only
    show mid-prune, with earlier blocks already pruned), and N:M divides the input widths."""
    nm = config.nm
    for i, block in enumerate(structure.blocks):
        prefix = f"{structure.path}.{i}."
        packed = [n for n, m in block.named_modules() if isinstance(m, SparseLinear)]
        if packed:
            # find_linears skips SparseLinear: pruning would silently leave these layers out
            raise InputError(
                f"{prefix}{packed[0]}: already packed (SparseLinear); prune the dense model, "
                "then pack it (sparsify_ / save_pretrained)"
            )
        linears = find_linears(block)
        if not linears:
            raise InputError(
                f"decoder block {prefix[:-1] if structure.path else i} "
                f"({type(block).__name__}) holds no nn.Linear layer to prune"
            )
        for kind, named in (("parameter", block.named_parameters), ("buffer", block.named_buffers)):
            for name, t in named():
                if t.is_floating_point() and not _all_finite(t):
                    raise InputError(f"{prefix}{name}: {kind} {tuple(t.shape)} contains NaN or Inf")
        for name, lin in linears.items():
            w = lin.weight
            if nm is not None and w.shape[1] % nm[1]:
                raise InputError(
                    f"{prefix}{name}: input width {w.shape[1]} "
                    f"(weight {tuple(w.shape)}) is not divisible by M={nm[1]} "
                    f"of pattern {config.pattern}"
                )


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf survive a sum (one pass, no temporary); only a non-finite sum, which may be
    an overflow of large finite values, is confirmed element by element."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())
