"""Bitmap format for unstructured sparsity (and N:M patterns other than 2:4).

Layout (fixed; the Triton and the CUDA kernels both read it)
-----------------------------------------------------------
Weight ``W`` of shape ``[N, K]`` (``N`` = out_features, ``K`` = in_features).

- Tiles of ``TILE_N = 16`` rows x ``TILE_K = 128`` columns.  The matrix is padded
  logically with zeros to ``Np = ceil(N/16)*16`` rows and ``Kp = ceil(K/128)*128`` columns.
- ``bitmap``: int32 ``[Np, Kp/32]``, row-major.  Bit ``j`` (LSB = 0) of word ``w`` of row
  ``r`` is the mask at column ``32*w + j``.  Padding bits are 0.
- ``values``: 1-D, the weight's dtype (fp16 / bf16 / fp32).  The kept values tile by tile
  (tiles in row-major order over (row-tile, col-tile)); inside a tile row by row, left to
  right.  A kept value may be 0.0 (the mask decides, not the value).  The array carries
  exactly ``VALUES_PAD = 16`` trailing zero elements after the ``nnz`` kept values, so a
  32-byte vector load that starts at any kept value never reads past the allocation.
- ``tile_offsets``: int32 ``[Np/16 * Kp/128 + 1]``: start of each tile's values; the last
  entry is ``nnz``.
- Decoding element ``(r, c)``: ``t = (r//16) * (Kp/128) + c//128``, ``word = bitmap[r, c//32]``,
  ``rank = tile_offsets[t]`` + popcount of the tile's earlier words (row-major inside the
  tile, 4 words per tile row) + ``popcount(word & ((1 << (c%32)) - 1))``;
  ``value = values[rank]`` if the bit is set, else 0.

Size: ``Np*Kp/8 + 2*nnz + 4*(tiles+1) + 32`` bytes for fp16, i.e. 1/8 + 2(1-s) bytes per
weight plus 4 bytes per 2048 weights of offsets (within 2% of the ideal at any sparsity).

State dict (flat, safetensors-friendly): ``{prefix}bitmap``, ``{prefix}values``,
``{prefix}tile_offsets`` and ``{prefix}shape`` (int64 ``[2]`` = ``[N, K]``).
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
    popcount32,
    read_state,
    write_state,
)

TILE_N = 16
TILE_K = 128
WORDS_PER_TILE_ROW = TILE_K // 32
VALUES_PAD = 16


def padded_shape(n: int, k: int) -> tuple[int, int]:
    """(Np, Kp): the shape padded up to whole 16 x 128 tiles."""
    return -(-n // TILE_N) * TILE_N, -(-k // TILE_K) * TILE_K


def pack_bits32(mask: Tensor) -> Tensor:
    """bool ``[R, C]`` with ``C % 32 == 0`` -> int32 ``[R, C/32]``, bit j of word w = column 32w+j."""
    r, c = mask.shape
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    words = (mask.view(r, c // 32, 32).to(torch.int64) << shifts).sum(-1)
    # Two's complement wrap so that bit 31 becomes the int32 sign bit.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits32(words: Tensor) -> Tensor:
    """int32 ``[R, W]`` -> bool ``[R, 32*W]`` (inverse of :func:`pack_bits32`)."""
    r, w = words.shape
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    # Arithmetic shift of a negative word still leaves bit j in position 0.
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().view(r, 32 * w)


def _to_tiles(t: Tensor, np_: int, kp: int) -> Tensor:
    """[Np, Kp] -> [Np/16, Kp/128, 16, 128] view in tile order (row-major inside a tile)."""
    return t.view(np_ // TILE_N, TILE_N, kp // TILE_K, TILE_K).permute(0, 2, 1, 3)


@dataclass(frozen=True, eq=False)
class BitmapWeight(PackedWeightMixin):
    """A weight ``[N, K]`` packed in the bitmap format (see the module docstring).

    Fields: ``bitmap`` int32 ``[Np, Kp/32]``, ``values`` 1-D ``[nnz + VALUES_PAD]`` in the
    weight dtype, ``tile_offsets`` int32 ``[Np/16 * Kp/128 + 1]``, and the logical shape
    ``N``, ``K``.  Construction checks dtypes and shapes (cheap, no data read); call
    :meth:`validate` to also check the contents (done by :meth:`from_state_dict`).
    """

    bitmap: Tensor
    values: Tensor
    tile_offsets: Tensor
    N: int
    K: int

    fmt = "bitmap"

    def __post_init__(self):
        if not (isinstance(self.N, int) and isinstance(self.K, int)) or self.N < 1 or self.K < 1:
            raise InputError(
                f"bitmap: N and K must be positive ints, got N={self.N!r}, K={self.K!r}"
            )
        np_, kp = padded_shape(self.N, self.K)
        if np_ * kp >= 2**31:
            raise InputError(f"bitmap: weight [{self.N}, {self.K}] too large (int32 offsets)")
        n_tiles = (np_ // TILE_N) * (kp // TILE_K)
        check_tensor("bitmap.bitmap", self.bitmap, (torch.int32,), (np_, kp // 32))
        check_tensor("bitmap.values", self.values, FLOAT_DTYPES, None, ndim=1)
        check_tensor("bitmap.tile_offsets", self.tile_offsets, (torch.int32,), (n_tiles + 1,))
        if self.values.numel() < VALUES_PAD:
            raise InputError(
                f"bitmap.values has {self.values.numel()} elements, fewer than the "
                f"{VALUES_PAD} padding elements every packed weight carries"
            )
        devices = {self.bitmap.device, self.values.device, self.tile_offsets.device}
        if len(devices) != 1:
            raise InputError(
                f"bitmap tensors are on different devices: {sorted(map(str, devices))}"
            )

    # ------------------------------------------------------------------ properties
    # shape, dtype and device: PackedWeightMixin.
    @property
    def padded_shape(self) -> tuple[int, int]:
        return padded_shape(self.N, self.K)

    @property
    def nnz(self) -> int:
        """Number of kept entries (read from the length of ``values``, no device sync)."""
        return self.values.numel() - VALUES_PAD

    @property
    def sparsity(self) -> float:
        """Fraction of the N*K logical entries that are not kept."""
        return 1.0 - self.nnz / (self.N * self.K)

    @property
    def nbytes(self) -> int:
        """Bytes of bitmap + values + tile_offsets."""
        return sum(
            t.numel() * t.element_size() for t in (self.bitmap, self.values, self.tile_offsets)
        )

    def __repr__(self) -> str:
        return (
            f"BitmapWeight(shape=({self.N}, {self.K}), dtype={self.dtype}, nnz={self.nnz}, "
            f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes}, device={self.device})"
        )

    # ------------------------------------------------------------------ pack / unpack
    @staticmethod
    def check_dense(weight: Tensor, mask: Tensor | None = None) -> Tensor:
        """What :meth:`from_dense` checks, without packing: returns the bool [N, K] mask
        (``weight != 0`` by default); InputError for a bad weight, mask or size."""
        check_weight("bitmap", weight)
        mask = check_mask("bitmap", weight, mask)
        n, k = weight.shape
        np_, kp = padded_shape(n, k)
        if np_ * kp >= 2**31:
            raise InputError(f"bitmap: weight [{n}, {k}] too large (int32 offsets)")
        return mask

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> BitmapWeight:
        """Pack ``weight`` [N, K] (fp16/bf16/fp32) keeping the entries where ``mask`` is True.

        ``mask``: bool [N, K]; default ``weight != 0``.  Runs on the weight's device.
        """
        mask = cls.check_dense(weight, mask)
        n, k = weight.shape
        np_, kp = padded_shape(n, k)
        w = torch.zeros(np_, kp, dtype=weight.dtype, device=weight.device)
        m = torch.zeros(np_, kp, dtype=torch.bool, device=weight.device)
        w[:n, :k] = weight
        m[:n, :k] = mask
        m_tiles = _to_tiles(m, np_, kp)
        kept = _to_tiles(w, np_, kp)[m_tiles]  # boolean indexing walks tile order
        counts = m_tiles.sum(dim=(2, 3), dtype=torch.int64).flatten()
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=weight.device)
        offsets[1:] = torch.cumsum(counts, 0)
        values = torch.cat([kept, kept.new_zeros(VALUES_PAD)])
        return cls(pack_bits32(m), values.contiguous(), offsets.to(torch.int32), n, k)

    def mask(self) -> Tensor:
        """bool [N, K]: the kept positions."""
        return unpack_bits32(self.bitmap)[: self.N, : self.K]

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """Unpack to a dense [N, K] tensor (``values.dtype`` unless ``dtype`` is given).

        Exact: equals ``weight * mask`` of :meth:`from_dense`.  Uses a cumulative sum and a
        gather rather than boolean indexing, so it never synchronises with the device.
        """
        np_, kp = self.padded_shape
        m_tiles = _to_tiles(unpack_bits32(self.bitmap), np_, kp).reshape(-1)
        rank = torch.cumsum(m_tiles, 0, dtype=torch.int32) - 1
        vals = self.values if dtype is None else self.values.to(dtype)
        gathered = vals.index_select(0, rank.clamp_(min=0))
        dense_tiles = torch.where(m_tiles, gathered, gathered.new_zeros(()))
        dense = dense_tiles.view(np_ // TILE_N, kp // TILE_K, TILE_N, TILE_K).permute(0, 2, 1, 3)
        return dense.reshape(np_, kp)[: self.N, : self.K].contiguous()

    # ------------------------------------------------------------------ validation
    def validate(self) -> BitmapWeight:
        """Check the contents: padding bits 0, offsets == per-tile popcounts, len(values).

        Raises InputError naming the first inconsistency; returns self.  Cost: one pass over
        the bitmap (no unpacking to bits), so it is cheap enough for every checkpoint load.
        """
        np_, kp = self.padded_shape
        words = self.bitmap.to(torch.int64) & 0xFFFFFFFF
        # Bits allowed in each word column (columns >= K are padding and must be 0).
        col = torch.arange(kp // 32, device=words.device, dtype=torch.int64) * 32
        valid_bits = (self.K - col).clamp(0, 32)
        allowed = torch.bitwise_left_shift(torch.ones_like(valid_bits), valid_bits) - 1
        bad = (words & ~allowed) != 0
        bad[self.N :] |= words[self.N :] != 0
        if bool(bad.any()):
            r, w = (int(i) for i in bad.nonzero()[0])
            raise InputError(
                f"bitmap.bitmap has mask bits outside the [{self.N}, {self.K}] weight "
                f"(row {r}, word {w}); padding bits must be 0"
            )
        per_tile = popcount32(words).view(np_ // TILE_N, TILE_N, kp // TILE_K, WORDS_PER_TILE_ROW)
        per_tile = per_tile.sum(dim=(1, 3)).flatten()
        offsets = self.tile_offsets.to(torch.int64)
        expected = torch.zeros_like(offsets)
        expected[1:] = torch.cumsum(per_tile, 0)
        if not torch.equal(offsets, expected):
            t = int((offsets != expected).nonzero()[0])
            raise InputError(
                f"bitmap.tile_offsets[{t}] = {int(offsets[t])} but the bitmap implies "
                f"{int(expected[t])} (offsets must start at 0 and step by each tile's popcount)"
            )
        if int(expected[-1]) != self.nnz:
            raise InputError(
                f"bitmap.values has {self.values.numel()} elements but the bitmap has "
                f"{int(expected[-1])} kept entries (+{VALUES_PAD} padding expected)"
            )
        if bool((self.values[self.nnz :] != 0).any()):
            raise InputError(f"bitmap.values: the last {VALUES_PAD} padding elements must be 0")
        return self

    # ------------------------------------------------------------------ state dict / device
    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat dict: bitmap, values, tile_offsets, shape (int64 [N, K])."""
        tensors = dict(bitmap=self.bitmap, values=self.values, tile_offsets=self.tile_offsets)
        return write_state(prefix, tensors, self.N, self.K, self.device)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], prefix: str = "", validate: bool = True
    ) -> BitmapWeight:
        """Rebuild from :meth:`state_dict` output; validates dtypes, shapes and contents."""
        tensors, n, k = read_state("bitmap", state, prefix, ("bitmap", "values", "tile_offsets"))
        out = cls(*tensors, n, k)
        return out.validate() if validate else out

    def to(self, device=None, dtype: torch.dtype | None = None) -> BitmapWeight:
        """Copy to ``device``; ``dtype`` converts the values only (the mask is unchanged)."""
        values = self.values.to(device=device, dtype=dtype)
        return BitmapWeight(
            self.bitmap.to(device), values, self.tile_offsets.to(device), self.N, self.K
        )
