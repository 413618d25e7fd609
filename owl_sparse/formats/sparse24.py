"""2:4 semi-structured format (at most 2 kept entries in every 4 consecutive columns).

Layout (fixed; the Triton and the CUDA kernels both read it)
-----------------------------------------------------------
Weight ``W`` of shape ``[N, K]``, ``K % 4 == 0``.

- ``values``: ``[N, K/2]`` in the weight dtype: for each group of 4 columns its 2 kept
  values in increasing column order.  A group with fewer than 2 kept entries is filled
  with zero values at its lowest unused positions, so that ``idx0 < idx1`` always.
- ``meta``: uint8 ``[N, ceil(K/8)]``: byte ``b`` holds the 2-bit in-group indices of groups
  ``2b`` and ``2b+1``: bits [1:0] = idx0 of group 2b, [3:2] = idx1 of group 2b,
  [5:4] = idx0 of group 2b+1, [7:6] = idx1 of group 2b+1.  When ``K % 8 == 4`` the unused
  high nibble of a row's last byte is ``0b0100`` (indices (0, 1)).  Read as little-endian
  int16, a row's bytes give per 16 columns NVIDIA's per-row metadata word before the
  mma.sp register interleaving (done on the CUDA side).

Size: ``K/2`` values + ``K/8`` bytes per row = 1.125 bytes per fp16 weight.

State dict: ``{prefix}values``, ``{prefix}meta``, ``{prefix}shape`` (int64 ``[N, K]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ._common import (
    FLOAT_DTYPES,
    PackedWeightMixin,
    check_mask,
    check_tensor,
    check_weight,
    read_state,
    write_state,
)

# Nibble stored for the padding group when K % 8 == 4: idx0 = 0, idx1 = 1.
PAD_NIBBLE = 0b0100


def is_24_mask(mask: Tensor) -> bool:
    """True when ``mask`` [N, K] has K % 4 == 0 and at most 2 True in every group of 4."""
    if mask.dim() != 2 or mask.shape[1] % 4 != 0:
        return False
    return bool((mask.view(mask.shape[0], -1, 4).sum(-1) <= 2).all())


def fits_24(nm: tuple[int, int] | None) -> bool:
    """True when every mask of the N:M pattern ``nm`` keeps at most 2 of each aligned group
    of 4 (so the 2:4 format can store it): 2:4, 1:4, 1:2, 2:8, ... Unstructured masks
    (None) are not guaranteed to."""
    if nm is None:
        return False
    n, m = nm
    return (m % 4 == 0 and n <= 2) or (4 % m == 0 and n * (4 // m) <= 2)


def decode_meta(meta: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """uint8 ``[N, ceil(K/8)]`` -> (idx0, idx1), each int64 ``[N, K/4]``."""
    m = meta.to(torch.int64)
    nibbles = torch.stack([m & 0xF, m >> 4], dim=-1).view(meta.shape[0], -1)[:, : k // 4]
    return nibbles & 3, nibbles >> 2


@dataclass(frozen=True, eq=False)
class Sparse24Weight(PackedWeightMixin):
    """A weight ``[N, K]`` packed in the 2:4 format (see the module docstring).

    Fields: ``values`` ``[N, K/2]`` (fp16/bf16/fp32) and ``meta`` uint8 ``[N, ceil(K/8)]``;
    ``N`` and ``K`` follow from them.  Construction checks dtypes and shapes; call
    :meth:`validate` to also check the index order (done by :meth:`from_state_dict`).
    """

    values: Tensor
    meta: Tensor

    fmt = "2:4"

    def __post_init__(self):
        check_tensor("sparse24.values", self.values, FLOAT_DTYPES, None, ndim=2)
        n, half = self.values.shape
        if n < 1 or half < 2 or half % 2 != 0:
            raise InputError(
                f"sparse24.values must be [N, K/2] with N >= 1 and K % 4 == 0, got {list(self.values.shape)}"
            )
        check_tensor("sparse24.meta", self.meta, (torch.uint8,), (n, -(-2 * half // 8)))
        if self.values.device != self.meta.device:
            raise InputError(
                f"sparse24 tensors are on different devices: {self.values.device}, {self.meta.device}"
            )

    # ------------------------------------------------------------------ properties
    @property
    def N(self) -> int:
        return self.values.shape[0]

    @property
    def K(self) -> int:
        return 2 * self.values.shape[1]

    # shape, dtype and device: PackedWeightMixin.
    @property
    def nbytes(self) -> int:
        """Bytes of values + meta."""
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    @property
    def sparsity(self) -> float:
        """Structural sparsity of the format: always 0.5 (filler positions count as kept)."""
        return 0.5

    def __repr__(self) -> str:
        return (
            f"Sparse24Weight(shape=({self.N}, {self.K}), dtype={self.dtype}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )

    # ------------------------------------------------------------------ pack / unpack
    @staticmethod
    def check_dense(weight: Tensor, mask: Tensor | None = None) -> Tensor:
        """What :meth:`from_dense` checks, without packing: returns the bool [N, K] mask
        (``weight != 0`` by default); InputError naming K, or the first row/group that
        breaks 2:4."""
        check_weight("2:4", weight)
        n, k = weight.shape
        if k % 4 != 0:
            raise InputError(
                f"2:4 needs in_features K divisible by 4, got K={k} (weight [{n}, {k}])"
            )
        mask = check_mask("2:4", weight, mask)
        groups = mask.view(n, k // 4, 4)
        too_many = groups.sum(-1) > 2
        if bool(too_many.any()):
            r, g = (int(i) for i in too_many.nonzero()[0])
            raise InputError(
                f"mask is not 2:4: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) keeps "
                f"{int(groups[r, g].sum())} of 4 entries (weight [{n}, {k}])"
            )
        return mask

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> Sparse24Weight:
        """Pack ``weight`` [N, K] (K % 4 == 0) keeping the entries where ``mask`` is True.

        ``mask``: bool [N, K] with at most 2 True per group of 4 columns; default
        ``weight != 0``.  Raises InputError naming K, or the first row/group that breaks 2:4.
        """
        mask = cls.check_dense(weight, mask)
        n, k = weight.shape
        groups = mask.view(n, k // 4, 4)
        # Kept positions sort first (key = position), then unused ones (key = 4 + position):
        # the two smallest keys are the kept entries, topped up with the lowest unused slots.
        pos = torch.arange(4, device=weight.device)
        key = torch.where(groups, pos, pos + 4)
        idx = torch.sort(torch.sort(key, dim=-1).values[..., :2] % 4, dim=-1).values
        w = weight.view(n, k // 4, 4)
        vals = torch.gather(w, -1, idx)
        vals = torch.where(torch.gather(groups, -1, idx), vals, vals.new_zeros(()))
        nib = idx[..., 0] | (idx[..., 1] << 2)
        if (k // 4) % 2:
            nib = torch.cat([nib, nib.new_full((n, 1), PAD_NIBBLE)], dim=1)
        nib = nib.view(n, -1, 2)
        meta = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)
        return cls(vals.reshape(n, k // 2).contiguous(), meta.contiguous())

    def indices(self) -> tuple[Tensor, Tensor]:
        """(idx0, idx1): int64 [N, K/4] in-group positions of the two stored values."""
        return decode_meta(self.meta, self.K)

    def mask(self) -> Tensor:
        """bool [N, K]: the stored positions (kept entries plus zero-valued fillers)."""
        idx = torch.stack(self.indices(), dim=-1)
        out = torch.zeros(self.N, self.K // 4, 4, dtype=torch.bool, device=self.device)
        return out.scatter_(-1, idx, True).view(self.N, self.K)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """Unpack to dense [N, K]; exact (fillers hold 0)."""
        idx = torch.stack(self.indices(), dim=-1)
        vals = self.values.view(self.N, self.K // 4, 2)
        if dtype is not None:
            vals = vals.to(dtype)
        out = torch.zeros(self.N, self.K // 4, 4, dtype=vals.dtype, device=self.device)
        return out.scatter_(-1, idx, vals).view(self.N, self.K)

    # ------------------------------------------------------------------ validation
    def validate(self) -> Sparse24Weight:
        """Check idx0 < idx1 in every group and the padding nibble; returns self."""
        idx0, idx1 = self.indices()
        bad = idx0 >= idx1
        if bool(bad.any()):
            r, g = (int(i) for i in bad.nonzero()[0])
            raise InputError(
                f"sparse24.meta row {r}, group {g}: indices ({int(idx0[r, g])}, {int(idx1[r, g])}) "
                f"must be strictly increasing"
            )
        if (self.K // 4) % 2 and bool(((self.meta[:, -1] >> 4) != PAD_NIBBLE).any()):
            raise InputError(
                f"sparse24.meta: K={self.K} leaves a padding nibble per row that must be {PAD_NIBBLE:#06b}"
            )
        return self

    # ------------------------------------------------------------------ state dict / device
    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat dict: values, meta, shape (int64 [N, K])."""
        tensors = dict(values=self.values, meta=self.meta)
        return write_state(prefix, tensors, self.N, self.K, self.device)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], prefix: str = "", validate: bool = True
    ) -> Sparse24Weight:
        """Rebuild from :meth:`state_dict` output; validates dtypes, shapes and contents."""
        tensors, n, k = read_state("2:4", state, prefix, ("values", "meta"))
        out = cls(*tensors)
        if out.shape != (n, k):
            raise InputError(
                f"2:4: {prefix}shape says [{n}, {k}] but values/meta describe {list(out.shape)}"
            )
        return out.validate() if validate else out

    def to(self, device=None, dtype: torch.dtype | None = None) -> Sparse24Weight:
        """Copy to ``device``; ``dtype`` converts the values only."""
        return Sparse24Weight(self.values.to(device=device, dtype=dtype), self.meta.to(device))
