"""Checks and bit helpers shared by the packed formats (internal)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Largest dimension accepted from a checkpoint's shape tensor: keeps a hostile file from
# asking for absurd allocations before any other check runs.
MAX_DIM = 2**24


def check_tensor(name: str, t, dtypes, shape, ndim: int | None = None) -> None:
    """Raise InputError unless ``t`` is a contiguous tensor of one of ``dtypes`` and ``shape``."""
    if not isinstance(t, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise InputError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if ndim is not None and t.dim() != ndim:
        raise InputError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if not t.is_contiguous():
        raise InputError(f"{name} must be contiguous (shape {list(t.shape)}, strides {t.stride()})")


def check_weight(fmt: str, weight) -> None:
    """A dense weight to pack: a 2-D, non-empty fp16/bf16/fp32 tensor with data (not meta)."""
    if not isinstance(weight, Tensor):
        raise InputError(f"{fmt}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.is_meta:  # no data: every later step would fail deep inside torch
        raise InputError(
            f"{fmt}: weight {list(weight.shape)} is on the meta device; "
            "load real weights before packing"
        )
    if weight.dim() != 2:
        raise InputError(f"{fmt}: weight must be 2-D [N, K], got shape {list(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{fmt}: weight dtype must be float16, bfloat16 or float32, got {weight.dtype}"
        )
    if weight.numel() == 0:
        raise InputError(f"{fmt}: weight is empty, shape {list(weight.shape)}")


def check_mask(fmt: str, weight: Tensor, mask) -> Tensor:
    """The mask to use: ``weight != 0`` when None, else a bool tensor of the weight's shape."""
    if mask is None:
        return weight != 0
    if not isinstance(mask, Tensor):
        raise InputError(f"{fmt}: mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.is_meta:
        raise InputError(f"{fmt}: mask is on the meta device; pass a real bool tensor")
    if mask.dtype != torch.bool:
        raise InputError(f"{fmt}: mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise InputError(
            f"{fmt}: mask shape {list(mask.shape)} does not match weight shape {list(weight.shape)}"
        )
    return mask.to(weight.device)


def popcount32(words: Tensor) -> Tensor:
    """Per-element popcount of non-negative int64 values below 2**32 (SWAR, any device)."""
    x = words - ((words >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101 & 0xFFFFFFFF) >> 24


def shape_tensor(n: int, k: int, device) -> Tensor:
    return torch.tensor([n, k], dtype=torch.int64, device=device)


def read_shape(t, name: str) -> tuple[int, int]:
    """(N, K) from a checkpoint's int64 shape tensor, rejecting anything unusual."""
    check_tensor(name, t, (torch.int64,), (2,))
    n, k = (int(v) for v in t.tolist())
    if not (1 <= n <= MAX_DIM and 1 <= k <= MAX_DIM):
        raise InputError(f"{name} = [{n}, {k}] is not a valid weight shape")
    return n, k


def require_keys(fmt: str, state, prefix: str, names) -> None:
    missing = [prefix + n for n in names if prefix + n not in state]
    if missing:
        raise InputError(f"{fmt}: state dict lacks {missing}")


def write_state(prefix: str, tensors: dict[str, Tensor], n: int, k: int, device) -> dict:
    """Flat state dict: ``tensors`` under ``prefix`` plus ``{prefix}shape`` (int64 [N, K])."""
    out = {prefix + name: t for name, t in tensors.items()}
    out[prefix + "shape"] = shape_tensor(n, k, device)
    return out


def read_state(fmt: str, state, prefix: str, names) -> tuple[list[Tensor], int, int]:
    """([state[prefix + name] for name in names], N, K), after checking keys and shape."""
    require_keys(fmt, state, prefix, (*names, "shape"))
    n, k = read_shape(state[prefix + "shape"], prefix + "shape")
    return [state[prefix + name] for name in names], n, k


class PackedWeightMixin:
    """Properties shared by the packed weight classes (which have N, K and ``values``)."""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device
