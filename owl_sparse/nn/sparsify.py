"""``sparsify_``: swap, in place, every pruned linear layer of a model for a SparseLinear.

>>> report = sparsify_(model, format="auto")   # every pruned linear layer
>>> print(report)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..formats import resolve_format
from ..formats._common import check_mask
from .linear import SparseLinear, dense_weight_of, is_linear
from .memory import external_memory, own_memory_, return_freed_memory


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
        if not self.swapped:
            return f"sparsify_: swapped no linear layer (skipped {len(self.skipped)})"
        ratio = self.bytes_before / self.bytes_after
        fmts = sorted({s.format for s in self.swapped})
        return (
            f"sparsify_: swapped {len(self.swapped)} linear layers ({', '.join(fmts) or 'none'}), "
            f"skipped {len(self.skipped)}; weight bytes {self.bytes_before / 2**20:.2f} MiB -> "
            f"{self.bytes_after / 2**20:.2f} MiB ({ratio:.2f}x smaller)"
        )


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
    at a time, so peak memory is the dense model plus one packed layer. Afterwards the
    dense weights' memory goes back to the system on a CPU: where they were views of a
    memory-mapped weight file (how transformers loads), the tensors the model keeps from
    that file are copied into memory of their own so the mapping is released
    (`owl_sparse.nn.memory`).
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
        if is_linear(module):
            names.setdefault(id(module), []).append(name)
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if is_linear(child):
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
    planned: list[tuple[str, nn.Module, bool, str, float]] = []  # has_mask
    for name, module in list(model.named_modules()):
        if not is_linear(module):
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
        weight = dense_weight_of(module)
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
        # Only the plan is kept: holding every layer's mask (a byte per weight once looked
        # up) until the last layer is packed would cost as much as a quarter of fp32
        # weights; each is looked up again when its layer is packed.
        planned.append((name, module, mask is not None, fmt, sparsity))
        del weight, keep, mask
    # 2. Pack and swap one layer at a time: each dense layer is freed (when nothing else
    # holds it) before the next is packed.
    from_mapping = False
    while planned:
        name, module, has_mask, fmt, sparsity = planned.pop(0)
        from_mapping |= external_memory(module.weight)
        mask = _mask_of(masks, names[id(module)]) if has_mask else None
        new = SparseLinear.from_linear(module, fmt, mask)
        del mask
        dense_bytes = module.weight.numel() * module.weight.element_size()
        shape = (new.out_features, new.in_features)
        report.swapped.append(SwappedLayer(name, fmt, shape, sparsity, dense_bytes, new.nbytes))
        for parent, attr in slots.get(id(module), []):
            setattr(parent, attr, new)
        del module, new
    # 3. Give the dense weights' memory back (nn/memory.py): a weight file's mapping lives
    # while any tensor from it does, so the survivors get memory of their own.
    if from_mapping:
        own_memory_(model)
    if report.swapped:
        return_freed_memory()
        for hook in _AFTER_SPARSIFY:
            hook(model)
    return report


# Called with the model after `sparsify_` swapped layers. Packages above this one register
# here (owl_sparse.io: ``model.save_pretrained`` then writes the packed layout), so this
# module needs no import of them.
_AFTER_SPARSIFY: list[Callable[[nn.Module], object]] = []


def register_after_sparsify(hook: Callable[[nn.Module], object]) -> None:
    """Run ``hook(model)`` after every `sparsify_` that swapped at least one layer."""
    if hook not in _AFTER_SPARSIFY:
        _AFTER_SPARSIFY.append(hook)


__all__ = ["SparsifyReport", "SwappedLayer", "register_after_sparsify", "sparsify_"]
