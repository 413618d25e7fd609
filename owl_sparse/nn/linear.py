"""SparseLinear, a packed drop-in for nn.Linear, and what counts as a linear layer.

>>> layer = SparseLinear.from_linear(linear, format="bitmap")   # mask = weight != 0

A SparseLinear holds only the packed buffers of its format (see :mod:`owl_sparse.formats`)
plus the bias, so ``.to()``, ``.half()``, ``state_dict()`` and ``load_state_dict()`` behave
as for any module; loading validates the packed tensors and accepts a different number
of kept values than the module holds.  Its forward calls the ``owl_sparse::*_linear`` ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import ops as _ops  # noqa: F401  (registers torch.ops.owl_sparse.*)
from ..errors import InputError
from ..formats import FORMATS, BitmapWeight, Sparse24Weight, pack


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a linear layer whose weight is [in, out])."""
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for a dense linear layer: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def dense_weight_of(module: nn.Module) -> Tensor:
    """[out, in] weight of an nn.Linear or a transformers Conv1D (stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if isinstance(module, Conv1D):
        return module.weight.detach().t()
    raise InputError(f"expected nn.Linear (or transformers Conv1D), got {type(module).__name__}")


class NoDenseWeightError(AttributeError):
    """Raised on ``SparseLinear.weight``: a packed layer keeps no dense weight."""


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` [out_features, in_features] held in a packed format.

    Input ``[..., in_features]`` in the values' dtype (fp16 / bf16 / fp32); output
    ``[..., out_features]``.  There is no ``weight`` attribute (no dense copy is kept);
    :meth:`dense_weight` unpacks one for debugging.
    """

    def __init__(self, packed: BitmapWeight | Sparse24Weight, bias: Tensor | None = None):
        super().__init__()
        if not isinstance(packed, (BitmapWeight, Sparse24Weight)):
            raise InputError(
                f"SparseLinear needs a BitmapWeight or Sparse24Weight, got {type(packed).__name__}"
            )
        self.format = packed.fmt
        self.out_features, self.in_features = packed.shape
        for name, tensor in packed.state_dict().items():
            self.register_buffer(name, tensor)
        if bias is not None:
            if bias.shape != (packed.N,):
                raise InputError(f"bias must be [{packed.N}], got {list(bias.shape)}")
            self.bias = nn.Parameter(
                bias.detach().to(packed.values), requires_grad=bias.requires_grad
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, format: str = "bitmap", mask: Tensor | None = None
    ) -> SparseLinear:
        """Pack an nn.Linear (or Conv1D): ``format`` "bitmap", "2:4" or "auto".

        ``mask``: bool [out, in], default ``weight != 0``; kept entries may be zero.
        """
        weight = dense_weight_of(linear)
        bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
        return cls(pack(weight, mask, format), bias)

    # ------------------------------------------------------------------ packed view
    @property
    def packed(self) -> BitmapWeight | Sparse24Weight:
        """The packed weight as a format object (shares the buffers)."""
        if self.format == "bitmap":
            return BitmapWeight(
                self.bitmap, self.values, self.tile_offsets, self.out_features, self.in_features
            )
        return Sparse24Weight(self.values, self.meta)

    def dense_weight(self) -> Tensor:
        """A freshly unpacked dense [out_features, in_features] weight (debugging only)."""
        return self.packed.to_dense()

    @property
    def sparsity(self) -> float:
        """Fraction of weight entries that are zero after packing."""
        if self.format == "bitmap":
            return self.packed.sparsity
        return 1.0 - int(torch.count_nonzero(self.values)) / (self.out_features * self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (bias excluded)."""
        return self.packed.nbytes

    def __getattr__(self, name: str):
        if name == "weight":
            raise NoDenseWeightError(
                "SparseLinear keeps no dense 'weight' (it holds a packed "
                f"{self.__dict__.get('format', '?')} weight); use .dense_weight() to unpack one"
            )
        return super().__getattr__(name)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):  # the op schema would reject it with a torch error
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.format == "bitmap":
            return torch.ops.owl_sparse.bitmap_linear(
                x,
                self.bitmap,
                self.values,
                self.tile_offsets,
                self.bias,
                self.out_features,
                self.in_features,
            )
        return torch.ops.owl_sparse.sparse24_linear(x, self.values, self.meta, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"sparsity={self.sparsity:.3f}, dtype={self.values.dtype}, bias={self.bias is not None}"
        )

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = list(self.packed.state_dict())
        if all(prefix + n in state_dict for n in names):
            cls = FORMATS[self.format]
            try:
                loaded = cls.from_state_dict(
                    {n: state_dict[prefix + n] for n in names}, validate=True
                )
            except InputError as exc:
                error_msgs.append(f"{prefix or 'SparseLinear '}: invalid packed weight: {exc}")
                return
            if loaded.shape != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{prefix}: packed weight is {list(loaded.shape)}, module is "
                    f"[{self.out_features}, {self.in_features}]"
                )
                return
            # The number of kept values may differ from ours: adopt the loaded tensors
            # (on our device, values in our dtype) so the default copy below fits.
            loaded = loaded.to(self.values.device, self.values.dtype)
            for n, t in loaded.state_dict().items():
                self._buffers[n] = t.clone() if t is state_dict[prefix + n] else t
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
