"""Dense copies of packed weights, cached per packed storage: the ``dense`` backend.

One dense copy per packed weight, keyed on its storages and shape, dropped when they are
freed, recomputed after an in-place change and never kept for inference tensors (see
:mod:`owl_sparse.ops.cache`). ``OWL_SPARSE_DENSE_CACHE_MB`` caps it (default: no cap); past
the cap the dense backend unpacks on every call instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import settings
from .cache import DerivedCache

_DENSE = DerivedCache("dense weights", lambda: settings.get().dense_cache_bytes)


def packed_tensors(packed) -> tuple[Tensor, ...]:
    """The tensors a packed weight consists of (what a value derived from it depends on)."""
    if packed.fmt == "bitmap":
        return (packed.bitmap, packed.values, packed.tile_offsets)
    return (packed.values, packed.meta)


def dense_weight(packed) -> Tensor:
    """The dense [N, K] weight of ``packed`` in its dtype, cached per packed storage.

    Recomputed after any in-place change to the packed tensors; never cached for
    inference tensors, whose changes cannot be detected (see :mod:`owl_sparse.ops.cache`).
    """
    return _DENSE.get(
        packed.fmt, packed_tensors(packed), lambda *_: packed.to_dense(), extra=packed.shape
    )


def clear_dense_cache() -> None:
    """Drop every cached dense weight."""
    _DENSE.clear()


def dense_cache_bytes() -> int:
    """Bytes held by the cached dense weights."""
    return _DENSE.nbytes


def dense_linear(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    """The ``dense`` backend: ``F.linear`` on the cached dense copy."""
    return F.linear(x2d, dense_weight(packed), bias)
