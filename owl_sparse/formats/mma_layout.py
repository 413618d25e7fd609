"""Reorder a 2:4 weight into the register order of the CUDA mma.sp kernel (csrc/).

The canonical :class:`~owl_sparse.formats.sparse24.Sparse24Weight` stores ``values``
``[N, K/2]`` and ``meta`` uint8 ``[N, ceil(K/8)]`` row-major.  The CUDA kernel
(``csrc/sparse24_mma.cu``, ``mma.sp.sync.aligned.m16n8k32``, weights as the sparse A
operand) wants every lane of a warp to fetch its operands with one wide, coalesced load,
so both arrays are permuted into fragment order.  Pure torch: runs on any device.

Padded shape: ``Np = ceil(N/16)*16`` rows, ``Kp = ceil(K/128)*128`` logical columns (one
kernel stage is 128 columns).  Padding values are 0 with indices (0, 1).

Fragments of ``mma.sp.m16n8k32`` (PTX ISA, "Matrix fragments for mma.sp", f16/bf16):
lane ``= 4*g + t`` (``g = lane // 4``, ``t = lane % 4``); a 16 x 32 tile of A is given as
its 16 x 16 compressed values ``C`` (compressed column ``2*grp + i`` = i-th kept value of
group ``grp``).  Registers a0..a3 of the lane hold ``C[g][2t:2t+2]``, ``C[g+8][2t:2t+2]``,
``C[g][2t+8:2t+10]``, ``C[g+8][2t+8:2t+10]`` (the layout of dense m16n8k16's A).  The
metadata register of the lanes chosen by the sparsity selector ``sel`` (``t = 2*sel`` and
``2*sel + 1``) holds, in bits [15:0], the 16-bit metadata word of row ``g`` for logical
columns ``16*(t - 2*sel)`` .. ``+16`` of the tile, and in bits [31:16] the same for row
``g + 8``; a 16-bit word holds 4 groups, group ``j`` in bits ``[4j+3:4j]`` as
``idx0 | idx1 << 2`` -- exactly the canonical meta bytes read as little-endian int16.

Layouts produced (``mt`` = row tile, ``kc`` = 32-column chunk, ``s`` = 128-column stage):

- ``values_mma``: 1-D, ``Np*Kp/2`` elements, index ``((mt*Kc + kc)*32 + lane)*8 + e``
  (``Kc = Kp/32``): one 16-byte load gives a lane its registers a0..a3 for one chunk.
  ``e = 4*ch + 2*rh + b`` is compressed element ``C[g + 8*rh][2t + 8*ch + b]``.
- ``meta_mma``: int32 ``[Np/16, Kp/128, 32, 2]``: word ``h`` of lane ``(g, t)`` at stage
  ``s`` is ``meta16[16mt + g][4(2s+h) + t] | meta16[16mt + g + 8][4(2s+h) + t] << 16``.
  Chunk ``kc = 4s + c`` uses word ``h = c // 2`` with selector ``c % 2``: lanes t = 0, 1
  carry the words of even chunks, t = 2, 3 those of odd chunks, so one 8-byte load per
  lane and stage carries metadata for four mma.sp and no lane loads unused bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError

STAGE_K = 128
TILE_M = 16
PAD_BYTE = 0x44  # two groups with indices (0, 1): valid for mma.sp::ordered_metadata


def mma_padded_shape(n: int, k: int) -> tuple[int, int]:
    """(Np, Kp): rows padded to 16, logical columns padded to 128."""
    return -(-n // TILE_M) * TILE_M, -(-k // STAGE_K) * STAGE_K


def _check(values: Tensor, meta: Tensor) -> tuple[int, int]:
    if values.dim() != 2 or meta.dim() != 2:
        raise InputError(
            f"mma_layout: values [N, K/2] and meta [N, ceil(K/8)] must be 2-D, got "
            f"{list(values.shape)} and {list(meta.shape)}"
        )
    n, k = values.shape[0], 2 * values.shape[1]
    if k % 4 != 0 or k == 0:
        raise InputError(
            f"mma_layout: 2:4 needs K % 4 == 0, got K={k} (values {list(values.shape)})"
        )
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, -(-k // 8)):
        raise InputError(
            f"mma_layout: meta must be uint8 [{n}, {-(-k // 8)}] for values {list(values.shape)}, "
            f"got {meta.dtype} {list(meta.shape)}"
        )
    return n, k


def _meta16(meta: Tensor, n: int, k: int, np_: int, kp: int) -> Tensor:
    """Canonical bytes -> int32 [Np, Kp/16] of 16-bit words (padding: indices (0, 1))."""
    mb = torch.full((np_, kp // 8), PAD_BYTE, dtype=torch.uint8, device=meta.device)
    mb[:n, : meta.shape[1]] = meta
    if k % 8 == 4:  # the unused high nibble must hold valid, ordered indices as well
        last = k // 8
        mb[:n, last] = (mb[:n, last] & 0x0F) | 0x40
    m = mb.to(torch.int32).view(np_, kp // 16, 2)
    return m[..., 0] | (m[..., 1] << 8)


def sparse24_to_mma(values: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
    """Canonical 2:4 (values [N, K/2], meta uint8 [N, ceil(K/8)]) -> (values_mma, meta_mma).

    ``values_mma``: 1-D ``[Np*Kp/2]`` in ``values.dtype``; ``meta_mma``: int32
    ``[Np/16, Kp/128, 32, 2]`` (layouts in the module docstring).  Exact and invertible
    (:func:`sparse24_from_mma`).  Runs on the tensors' device.
    """
    n, k = _check(values, meta)
    np_, kp = mma_padded_shape(n, k)
    mt, kc, st = np_ // TILE_M, kp // 32, kp // STAGE_K
    vp = values.new_zeros(np_, kp // 2)
    vp[:n, : k // 2] = values
    # [mt, rh, g, kc, ch, t, b] -> [mt, kc, g, t, ch, rh, b]
    v = vp.view(mt, 2, 8, kc, 2, 4, 2).permute(0, 3, 2, 5, 4, 1, 6)
    values_mma = v.reshape(-1).contiguous()

    m16 = _meta16(meta, n, k, np_, kp)
    # [mt, rh, g, s, h, t] -> [mt, s, g, t, h, rh]
    w = m16.view(mt, 2, 8, st, 2, 4).permute(0, 3, 2, 5, 4, 1)
    lo, hi = w[..., 0], w[..., 1]
    hi = torch.where(hi >= 0x8000, hi - 0x10000, hi)  # int32 two's complement for bit 31
    meta_mma = (hi * 0x10000 + lo).reshape(mt, st, 32, 2).contiguous()
    return values_mma, meta_mma


def sparse24_from_mma(
    values_mma: Tensor, meta_mma: Tensor, n: int, k: int
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`sparse24_to_mma`: back to canonical (values [N, K/2], meta [N, ceil(K/8)])."""
    np_, kp = mma_padded_shape(n, k)
    mt, kc, st = np_ // TILE_M, kp // 32, kp // STAGE_K
    if values_mma.numel() != np_ * kp // 2 or tuple(meta_mma.shape) != (mt, st, 32, 2):
        raise InputError(
            f"sparse24_from_mma: for weight [{n}, {k}] expected values_mma of {np_ * kp // 2} "
            f"elements and meta_mma [{mt}, {st}, 32, 2], got {values_mma.numel()} and "
            f"{list(meta_mma.shape)}"
        )
    v = values_mma.view(mt, kc, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6)
    values = v.reshape(np_, kp // 2)[:n, : k // 2].contiguous()
    w = meta_mma.to(torch.int64) & 0xFFFFFFFF
    words = torch.stack([w & 0xFFFF, w >> 16], dim=-1)  # [mt, s, 32, 2(h), 2(rh)]
    words = words.view(mt, st, 8, 4, 2, 2).permute(0, 5, 2, 1, 4, 3).reshape(np_, kp // 16)
    b = torch.stack([words & 0xFF, words >> 8], dim=-1).reshape(np_, kp // 8)
    meta = b[:n, : -(-k // 8)].to(torch.uint8).contiguous()
    return values, meta
