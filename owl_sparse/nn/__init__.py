"""Packed layers: `SparseLinear` (a drop-in for nn.Linear) and `sparsify_` (swap a model's
pruned linear layers for it, in place)."""

from .linear import SparseLinear, dense_weight_of, is_conv1d, is_linear
from .sparsify import SparsifyReport, SwappedLayer, sparsify_

__all__ = [
    "SparseLinear",
    "SparsifyReport",
    "SwappedLayer",
    "dense_weight_of",
    "is_conv1d",
    "is_linear",
    "sparsify_",
]
