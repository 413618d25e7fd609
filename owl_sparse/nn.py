"""SparseLinear (a packed drop-in for nn.Linear) and ``sparsify_`` (swap a model's layers).

>>> layer = SparseLinear.from_linear(linear, format="bitmap")   # mask = weight != 0
>>> report = sparsify_(model, format="auto")                      # every pruned linear layer
>>> print(report)

A SparseLinear holds only the packed buffers of its format (see :mod:`owl_sparse.formats`)
plus the bias, so ``.to()``, ``.half()``, ``state_dict()`` and ``load_state_dict()`` behave
as for any module; loading validates the packed tensors and accepts a different number
of kept values than the module holds.  Its forward calls the ``owl_sparse::*_linear`` ops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from . import ops as _ops  # noqa: F401  (registers torch.ops.owl_sparse.*)
from .errors import InputError
from .formats import FORMATS, BitmapWeight, Sparse24Weight, pack, resolve_format
from .formats._common import check_mask


def _dense_weight_of(module: nn.Module) -> Tensor:
    """[out, in] weight of an nn.Linear or a transformers Conv1D (stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().t()
    raise InputError(f"expected nn.Linear (or transformers Conv1D), got {type(module).__name__}")


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
        weight = _dense_weight_of(linear)
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
            raise AttributeError(
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


# ---------------------------------------------------------------------------- sparsify_
@dataclass
class SwappedLayer:
    name: str
    format: str
    shape: tuple[int, int]
    sparsity: float
    bytes_before: int
    bytes_after: int


@dataclass
class SparsifyReport:
    """What :func:`sparsify_` swapped (and skipped, with the reason), and the bytes saved."""

    swapped: list[SwappedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(s.bytes_before for s in self.swapped)

    @property
    def bytes_after(self) -> int:
        return sum(s.bytes_after for s in self.swapped)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict:
        return {
            "swapped": [asdict(s) for s in self.swapped],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }

    def __str__(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        fmts = sorted({s.format for s in self.swapped})
        return (
            f"sparsify_: swapped {len(self.swapped)} linear layers ({', '.join(fmts) or 'none'}), "
            f"skipped {len(self.skipped)}; weight bytes {self.bytes_before / 2**20:.2f} MiB -> "
            f"{self.bytes_after / 2**20:.2f} MiB ({ratio:.2f}x smaller)"
        )


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _mask_of(masks, names: list[str]):
    """``masks`` entry of a layer known by ``names`` (a shared module has several)."""
    given = [n for n in names if n in masks]
    if len(given) > 1:
        raise InputError(f"sparsify_: masks names one layer twice: {given}")
    return masks[given[0]] if given else None


def sparsify_(
    model: nn.Module,
    format: str = "bitmap",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_sparsity: float = 0.0,
    masks: Mapping[str, Tensor] | None = None,
    skip_output_embeddings: bool = True,
) -> SparsifyReport:
    """Replace, in place, every pruned linear layer of ``model`` by a :class:`SparseLinear`.

    A layer (nn.Linear or transformers Conv1D, found anywhere in the module tree) is swapped
    when its sparsity is > 0 and >= ``min_sparsity`` and ``filter_fn(module, name)`` (if
    given) returns True.  The mask is ``masks[name]`` (bool, the weight's [out, in] shape)
    when given, else ``weight != 0``; every ``masks`` key must name a linear layer.
    ``format``: "bitmap", "2:4" (every swapped layer must be 2:4, else InputError naming
    it) or "auto" (2:4 where the mask is 2:4, bitmap elsewhere).  The output embeddings
    (``model.get_output_embeddings()``) and layers whose weight is tied to an nn.Embedding
    are skipped unless ``skip_output_embeddings=False``.

    Every layer is checked (mask, meta device, dtype, 2:4 groups, size) before any is
    packed, so bad input leaves the model unchanged; layers are then packed and swapped one
    at a time, so peak memory is the dense model plus one packed layer.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"sparsify_: model must be a torch.nn.Module, got {type(model).__name__}")
    if format not in ("bitmap", "2:4", "auto"):
        raise InputError(f"sparsify_: format must be 'bitmap', '2:4' or 'auto', got {format!r}")
    if masks is not None and not isinstance(masks, Mapping):
        raise InputError(
            f"sparsify_: masks must be a dict of layer name -> bool mask, got {type(masks).__name__}"
        )
    report = SparsifyReport()
    protected: set[int] = set()
    if skip_output_embeddings:
        getter = getattr(model, "get_output_embeddings", None)
        out_emb = getter() if callable(getter) else None
        if out_emb is not None:
            protected.add(id(out_emb))
        embedding_ptrs = {
            m.weight.data_ptr()
            for m in model.modules()
            if isinstance(m, nn.Embedding) and not m.weight.is_meta
        }
    else:
        embedding_ptrs = set()
    # All names and (parent, attribute) slots of each linear, so a shared module is found
    # by any of its names and swapped everywhere.
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _linear_like(module):
            names.setdefault(id(module), []).append(name)
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if _linear_like(child):
                slots.setdefault(id(child), []).append((parent, child_name))
    if masks is not None:
        known = {n for ns in names.values() for n in ns}
        unknown = [n for n in masks if n not in known]
        if unknown:
            raise InputError(
                f"sparsify_: masks name no linear layer of the model: {unknown} "
                f"(linear layers: {sorted(known)[:6]}{' ...' if len(known) > 6 else ''})"
            )
    # 1. Check every layer (mask, meta device, dtype, 2:4 groups, size) without packing.
    planned: list[tuple[str, nn.Module, Tensor | None, str, float]] = []
    for name, module in list(model.named_modules()):
        if not _linear_like(module):
            continue
        if id(module) in protected:
            report.skipped.append((name, "output embeddings / tied to an embedding"))
            continue
        if module.weight.is_meta:
            if filter_fn is not None and not filter_fn(module, name):
                report.skipped.append((name, "filter_fn"))
                continue
            raise InputError(
                f"sparsify_: layer {name!r}: weight is on the meta device; "
                "load real weights before packing"
            )
        if module.weight.data_ptr() in embedding_ptrs:
            report.skipped.append((name, "output embeddings / tied to an embedding"))
            continue
        weight = _dense_weight_of(module)
        mask = _mask_of(masks, names[id(module)]) if masks is not None else None
        # shape and dtype first: a sparsity counted on a wrong mask means nothing
        keep = (
            weight != 0 if mask is None else check_mask(f"sparsify_: layer {name!r}", weight, mask)
        )
        sparsity = 1.0 - int(torch.count_nonzero(keep)) / keep.numel()
        if sparsity <= 0.0 or sparsity < min_sparsity:
            report.skipped.append((name, f"sparsity {sparsity:.3f} below threshold"))
            continue
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped.append((name, "filter_fn"))
            continue
        try:
            fmt = resolve_format(weight, keep, format)
        except InputError as exc:
            raise InputError(f"sparsify_: layer {name!r}: {exc}") from exc
        planned.append((name, module, mask, fmt, sparsity))
        del weight, keep
    # 2. Pack and swap one layer at a time: each dense layer is freed (when nothing else
    # holds it) before the next is packed.
    while planned:
        name, module, mask, fmt, sparsity = planned.pop(0)
        new = SparseLinear.from_linear(module, fmt, mask)
        dense_bytes = module.weight.numel() * module.weight.element_size()
        shape = (new.out_features, new.in_features)
        report.swapped.append(SwappedLayer(name, fmt, shape, sparsity, dense_bytes, new.nbytes))
        for parent, attr in slots.get(id(module), []):
            setattr(parent, attr, new)
        del module, new
    return report


__all__ = ["SparseLinear", "SparsifyReport", "SwappedLayer", "sparsify_"]
