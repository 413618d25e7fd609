"""Packed sparse weight formats: frozen dataclasses of tensors with pack / unpack.

- :class:`BitmapWeight` (``"bitmap"``): unstructured sparsity, 16 x 128 tiles, one bit per
  position plus the kept values; 1/8 + 2(1-s) bytes per fp16 weight.
- :class:`Sparse24Weight` (``"2:4"``): at most 2 kept entries per 4 columns; 1.125 bytes per
  fp16 weight.

Both offer ``from_dense(weight, mask=None)``, ``to_dense()``, ``mask()``, ``nbytes``,
``sparsity``, ``validate()``, ``state_dict(prefix)`` / ``from_state_dict(state, prefix)``
and ``to(device, dtype)``.  The exact layouts are in the modules' docstrings; the
compressed-tensors per-weight layouts are in :mod:`owl_sparse.formats.compressed_tensors`.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import InputError
from ._common import check_mask, check_weight
from .bitmap import VALUES_PAD, BitmapWeight
from .compressed_tensors import from_compressed_tensors, to_compressed_tensors
from .sparse24 import Sparse24Weight, fits_24, is_24_mask

FORMATS = {"bitmap": BitmapWeight, "2:4": Sparse24Weight}

__all__ = [
    "FORMATS",
    "VALUES_PAD",
    "BitmapWeight",
    "Sparse24Weight",
    "fits_24",
    "from_compressed_tensors",
    "from_state_dict",
    "is_24_mask",
    "pack",
    "resolve_format",
    "to_compressed_tensors",
]


def _format_name(weight: Tensor, mask: Tensor | None, format: str) -> str:
    """``format`` with "auto" resolved: "2:4" when the mask (default ``weight != 0``) is
    2:4, else "bitmap"; InputError for an unknown name."""
    if format == "auto":
        check_weight("auto", weight)  # before weight != 0 / is_24_mask can fail on it
        m = weight != 0 if mask is None else check_mask("auto", weight, mask)
        return "2:4" if is_24_mask(m) else "bitmap"
    if format not in FORMATS:
        raise InputError(
            f"unknown sparse format {format!r}; expected one of {sorted(FORMATS)} or 'auto'"
        )
    return format


def resolve_format(weight: Tensor, mask: Tensor | None = None, format: str = "bitmap") -> str:
    """The format :func:`pack` would produce ("bitmap" or "2:4") after every check it makes
    (weight, mask, 2:4 groups, size), without packing: InputError where pack would fail."""
    name = _format_name(weight, mask, format)
    FORMATS[name].check_dense(weight, mask)
    return name


def pack(weight: Tensor, mask: Tensor | None = None, format: str = "bitmap"):
    """Pack a dense weight [N, K] into ``format``: "bitmap", "2:4" or "auto".

    "auto" picks 2:4 when the mask (default ``weight != 0``) is 2:4, else bitmap.
    """
    return FORMATS[_format_name(weight, mask, format)].from_dense(weight, mask)


def from_state_dict(state: dict[str, Tensor], prefix: str = "", validate: bool = True):
    """Rebuild a packed weight from a flat state dict, recognising the format by its keys."""
    if prefix + "bitmap" in state:
        return BitmapWeight.from_state_dict(state, prefix, validate)
    if prefix + "meta" in state:
        return Sparse24Weight.from_state_dict(state, prefix, validate)
    raise InputError(
        f"no packed weight under prefix {prefix!r}: expected {prefix}bitmap (bitmap) "
        f"or {prefix}meta (2:4) among {sorted(state)[:8]}"
    )
