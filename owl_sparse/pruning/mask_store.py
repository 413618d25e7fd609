"""`MaskStore`: pruning masks kept one bit per weight.

A bool tensor spends a byte per weight: the masks of SmolLM2-135M's decoder layers are
114 MiB that way, a tenth of the fp32 model, held from the first pruned layer until the
model is packed. The store keeps each mask as its bits (``uint8 [ceil(numel / 8)]``, bit
``j`` of byte ``i`` = element ``8 i + j`` of the flattened mask) and gives back the bool
tensor on lookup, so callers see the mapping of name -> bool ``[out, in]`` they always did.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The bits of bool ``mask`` (any shape, CPU) as ``uint8 [ceil(numel / 8)]``, element
    ``8 i + j`` of the flattened mask in bit ``j`` of byte ``i`` (zero padding)."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool tensor of ``shape`` whose bits `pack_bits` gave."""
    numel = 1
    for s in shape:
        numel *= s
    flat = ((bits.unsqueeze(1) >> _SHIFTS) & 1).reshape(-1)[:numel]
    return flat.to(torch.bool).view(shape)


class MaskStore(MutableMapping):
    """A mapping of layer name -> bool mask (True = kept) that stores one bit per weight.

    ``store[name] = mask`` takes a bool tensor (any device; kept on the CPU);
    ``store[name]`` returns a new CPU bool tensor of the mask's shape. Insertion order is
    kept, as in a dict.
    """

    def __init__(self, masks=None):
        self._bits: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        if masks is not None:
            self.update(masks)

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask {name!r} must be a bool tensor, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        self._bits[name] = (pack_bits(mask.detach().cpu()), tuple(mask.shape))

    def __getitem__(self, name: str) -> torch.Tensor:
        bits, shape = self._bits[name]
        return unpack_bits(bits, shape)

    def __delitem__(self, name: str) -> None:
        del self._bits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def clear(self) -> None:  # MutableMapping's would unpack every mask on the way out
        self._bits.clear()

    @property
    def nbytes(self) -> int:
        """Bytes the masks take here."""
        return sum(b.numel() for b, _ in self._bits.values())

    def __repr__(self) -> str:
        return f"MaskStore({len(self)} masks, {self.nbytes} bytes)"


__all__ = ["MaskStore", "pack_bits", "unpack_bits"]
