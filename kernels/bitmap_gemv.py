"""Triton decode kernel for the bitmap format: y[T, N] = x[T, K] @ W^T (+ bias), T of 1 to 32.

Weight layout: :mod:`owl_sparse.formats.bitmap` (16 x 128 tiles, int32 bitmap words, values
in tile order).  Each program owns ``BLOCK_N`` rows (whole 16-row tiles) and a contiguous
range of 128-column tiles (split-K when the row blocks alone cannot fill the GPU).  Per
column tile it

1. loads the ``BLOCK_N x 4`` bitmap words (one 16-byte vector per row),
2. popcounts them and takes an exclusive prefix sum in the tile's row-major word order,
   which plus ``tile_offsets[tile]`` gives where each word's values start,
3. expands every word to its 32 positions in registers: a position's value index is the
   word base plus the popcount of the lower bits; kept positions gather from ``values``
   (consecutive kept values of a row are adjacent, so a warp's loads stay within a few
   sectors), dropped positions read nothing,
4. multiplies with the activation tile in fp32 (FMA for 1-2 tokens, ``tl.dot`` beyond).

Split-K partials go to an fp32 workspace ``[S, T, N]`` that is summed afterwards (fixed
order, deterministic).  All candidate configs live in :func:`gemv_configs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Tuner,
    accumulate,
    dot_fp32,
    finish_split,
    interpreting,
    load_x_tile,
    next_pow2,
    popc32,
    reduce_acc,
    run_launcher,
    sm_count,
    split_k_for,
    split_plan,
    store_output,
    workspace,
)

MAX_BLOCK_T = 32


@triton.jit
def decode_bitmap_tile(
    bitmap_ptr,
    values_ptr,
    offsets_ptr,
    rows,
    kt,
    Np,
    n_words,
    n_col_tiles,
    BLOCK_N: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    """Dense [BLOCK_N, 128] tile of rows ``rows`` (16-aligned block) and column tile ``kt``."""
    row_ok = rows < Np
    # Each row's 4 words are 16-byte aligned: n_words and kt * 4 are multiples of 4.
    word_base = tl.multiple_of(rows * n_words + kt * 4, 4)
    words = tl.load(
        bitmap_ptr + word_base[:, None] + tl.arange(0, 4)[None, :], mask=row_ok[:, None], other=0
    )
    counts = popc32(words, HW_POPC)
    # Exclusive prefix over each 16 x 4 tile in row-major word order.
    R: tl.constexpr = BLOCK_N // 16
    counts_t = tl.reshape(counts, (R, 64))
    before = tl.reshape(tl.cumsum(counts_t, axis=1) - counts_t, (BLOCK_N, 4))
    tile_start = tl.load(offsets_ptr + (rows // 16) * n_col_tiles + kt, mask=row_ok, other=0)
    base = tile_start[:, None] + before
    bit = tl.arange(0, 32)
    w3 = words[:, :, None]
    keep = ((w3 >> bit[None, None, :]) & 1) != 0
    lower = (tl.full((32,), 1, tl.int32) << bit) - 1  # bits below each position
    idx = base[:, :, None] + popc32(w3 & lower[None, None, :], HW_POPC)
    vals = tl.load(values_ptr + idx, mask=keep, other=0.0)
    return tl.reshape(vals, (BLOCK_N, 128))


@triton.jit
def _bitmap_gemv_kernel(
    x_ptr,
    bitmap_ptr,
    values_ptr,
    offsets_ptr,
    bias_ptr,
    out_ptr,
    T,
    N,
    K,
    Np,
    n_words,
    n_col_tiles,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, 128)
    x_rows = x_ptr + toks.to(tl.int64)[:, None] * K
    tok_ok = (toks < T)[:, None]
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_T, 128), dtype=tl.float32)
    kt_begin = pid_k * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, n_col_tiles)
    for kt in range(kt_begin, kt_end):
        w = decode_bitmap_tile(
            bitmap_ptr,
            values_ptr,
            offsets_ptr,
            rows,
            kt,
            Np,
            n_words,
            n_col_tiles,
            BLOCK_N,
            HW_POPC,
        )
        xt = load_x_tile(x_rows, tok_ok, kt * 128 + cols, K)
        acc = accumulate(acc, w, xt, USE_DOT, DOT_FP32)
    res = reduce_acc(acc, USE_DOT)
    store_output(out_ptr, bias_ptr, res, rows, toks, pid_k, T, N, HAS_BIAS, PARTIAL)


def gemv_configs(n: int, k: int, tokens: int, sms: int, dtype: torch.dtype) -> list[triton.Config]:
    """Candidate configs, heuristic default first.  Edit here to tune on a GPU.

    Keys: BLOCK_N (rows per program, multiple of 16), BLOCK_T (tokens per program, power
    of two), USE_DOT, SPLIT_K (upper bound; the launcher drops empty splits).
    """
    block_t = min(next_pow2(tokens), MAX_BLOCK_T)
    n_tiles_k = -(-k // 128)

    def cfg(bn, warps, stages, use_dot=None):
        use_dot = block_t > 2 if use_dot is None else use_dot
        bt = max(block_t, 16) if use_dot else block_t  # tl.dot needs >= 16 per dim
        programs = -(-n // bn) * -(-tokens // bt)
        split = split_k_for(programs, n_tiles_k, sms)
        kw = dict(BLOCK_N=bn, BLOCK_T=bt, USE_DOT=use_dot, SPLIT_K=split)
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    if interpreting():
        return [cfg(32, 4, 1)]
    cands = [
        cfg(32, 4, 3),
        cfg(16, 4, 3),
        cfg(64, 8, 3),
        cfg(32, 8, 4),
        cfg(16, 2, 4),
        cfg(64, 4, 2),
    ]
    if block_t <= 2:  # decode: also try tensor cores on a padded token tile
        cands += [cfg(32, 4, 3, use_dot=True), cfg(64, 4, 3, use_dot=True)]
    return cands


_TUNER = Tuner("bitmap_gemv")


def _launch(cfg: triton.Config, x2d, packed, bias, out):
    kw = cfg.kwargs
    t = x2d.shape[0]
    np_, kp = packed.padded_shape
    n_col_tiles = kp // 128
    per_split, split = split_plan(n_col_tiles, kw["SPLIT_K"])
    target = out if split == 1 else workspace((split, t, packed.N), out.device)
    grid = (triton.cdiv(np_, kw["BLOCK_N"]), split, triton.cdiv(t, kw["BLOCK_T"]))
    _bitmap_gemv_kernel[grid](
        x2d,
        packed.bitmap,
        packed.values,
        packed.tile_offsets,
        bias if bias is not None else out,
        target,
        t,
        packed.N,
        packed.K,
        np_,
        kp // 32,
        n_col_tiles,
        per_split,
        HAS_BIAS=bias is not None,
        PARTIAL=split > 1,
        BLOCK_N=kw["BLOCK_N"],
        BLOCK_T=kw["BLOCK_T"],
        USE_DOT=kw["USE_DOT"],
        DOT_FP32=dot_fp32(x2d.dtype),
        HW_POPC=not interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out if split == 1 else finish_split(target, bias, out)


def bitmap_gemv(
    x2d: torch.Tensor,
    packed,
    bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
):
    """y [T, N] = x2d [T, K] @ W^T + bias for a :class:`BitmapWeight` W, T small (1-32).

    ``x2d``: contiguous, the values' dtype and device.  ``bias``: [N] or None.  ``config``
    forces one of :func:`gemv_configs` (tests); otherwise the tuned choice for the shape.
    Accumulates in fp32; returns a new tensor in x2d's dtype.
    """
    return run_launcher(
        "bitmap_gemv",
        _TUNER,
        lambda t: gemv_configs(packed.N, packed.K, t, sm_count(x2d.device), x2d.dtype),
        _launch,
        x2d,
        packed,
        bias,
        config,
        out,
    )
