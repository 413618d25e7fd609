"""Triton decode kernel for the 2:4 format: y[T, N] = x[T, K] @ W^T (+ bias), T of 1 to 32.

Weight layout: :mod:`owl_sparse.formats.sparse24` (values [N, K/2], uint8 meta [N, K/8]
with two 2-bit in-group indices per group of 4 columns).  Each program owns ``BLOCK_N``
rows and a range of ``BLOCK_K``-column chunks (split-K when rows alone cannot fill the
GPU).  Per chunk it loads the rows' values as one contiguous ``BLOCK_N x BLOCK_K/2`` block
and their meta bytes, and splits each byte into the nibbles of two groups.  Then

- 1-2 tokens (FMA path): each stored value gathers the activation of its own column
  (x is tiny and stays in L1): two loads and two FMAs per group of four columns, about
  a quarter of the work of expanding the group;
- more tokens (``tl.dot`` path): each group expands to its four columns with two compares
  per column (idx0 < idx1, so at most one matches) and the dense ``BLOCK_N x BLOCK_K`` tile
  meets the activation tile on the tensor cores.

Accumulation is fp32; split-K partials are summed afterwards in fp32 (deterministic).
Candidate configs: :func:`sparse24_configs`.
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
def load_24_chunk(
    values_ptr,
    meta_ptr,
    rows,
    k0,
    N,
    half_k,
    meta_cols,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(v0, v1, i0, i1), each [BLOCK_N, BLOCK_K/4]: the stored pairs of columns [k0, k0+BLOCK_K).

    v0/v1 are the two values of each group of 4 columns, i0/i1 their in-group positions.
    Groups past K (and rows past N) read as zeros with indices (0, 0).
    """
    G: tl.constexpr = BLOCK_K // 4
    row_ok = (rows < N)[:, None]
    vcol = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    v = tl.load(
        values_ptr + rows.to(tl.int64)[:, None] * half_k + vcol[None, :],
        mask=row_ok & (vcol < half_k)[None, :],
        other=0.0,
    )
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, G, 2)))
    mcol = k0 // 8 + tl.arange(0, G // 2)
    mbyte = tl.load(
        meta_ptr + rows.to(tl.int64)[:, None] * meta_cols + mcol[None, :],
        mask=row_ok & (mcol < meta_cols)[None, :],
        other=0,
    ).to(tl.int32)
    nib = tl.reshape(tl.join(mbyte & 15, mbyte >> 4), (BLOCK_N, G))
    return v0, v1, nib & 3, nib >> 2


@triton.jit
def expand_24(v0, v1, i0, i1, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BLOCK_N, BLOCK_K] tile from the pairs (idx0 < idx1: at most one match per column)."""
    c = tl.arange(0, 4)[None, None, :]
    w = tl.where(i0[:, :, None] == c, v0[:, :, None], 0.0)
    w += tl.where(i1[:, :, None] == c, v1[:, :, None], 0.0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse24_gemv_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    bias_ptr,
    out_ptr,
    T,
    N,
    K,
    meta_cols,
    chunks_per_split,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    G: tl.constexpr = BLOCK_K // 4
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    if USE_DOT:
        cols = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + toks.to(tl.int64)[:, None] * K
        tok_ok = (toks < T)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    else:
        group_col = 4 * tl.arange(0, G)
        x_rows3 = x_ptr + toks.to(tl.int64)[None, :, None] * K
        tok_ok3 = (toks < T)[None, :, None]
        acc = tl.zeros((BLOCK_N, BLOCK_T, G), dtype=tl.float32)
    n_chunks = tl.cdiv(K, BLOCK_K)
    c_begin = pid_k * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    for chunk in range(c_begin, c_end):
        k0 = chunk * BLOCK_K
        v0, v1, i0, i1 = load_24_chunk(
            values_ptr, meta_ptr, rows, k0, N, K // 2, meta_cols, BLOCK_N, BLOCK_K
        )
        if USE_DOT:
            w = expand_24(v0, v1, i0, i1, BLOCK_N, BLOCK_K)
            xt = load_x_tile(x_rows, tok_ok, k0 + cols, K)
            acc = accumulate(acc, w, xt, USE_DOT, DOT_FP32)
        else:
            # Few tokens: gather the two activations each stored value multiplies (x is
            # tiny and stays in L1), 2 loads + 2 FMA per group instead of expanding to 4.
            gc = k0 + group_col
            ok = tok_ok3 & (gc < K)[None, None, :]
            xa = tl.load(x_rows3 + (gc[None, :] + i0)[:, None, :], mask=ok, other=0.0)
            xb = tl.load(x_rows3 + (gc[None, :] + i1)[:, None, :], mask=ok, other=0.0)
            acc += v0.to(tl.float32)[:, None, :] * xa.to(tl.float32)
            acc += v1.to(tl.float32)[:, None, :] * xb.to(tl.float32)
    res = reduce_acc(acc, USE_DOT)
    store_output(out_ptr, bias_ptr, res, rows, toks, pid_k, T, N, HAS_BIAS, PARTIAL)


def sparse24_configs(
    n: int, k: int, tokens: int, sms: int, dtype: torch.dtype
) -> list[triton.Config]:
    """Candidate configs, heuristic default first.  Edit here to tune on a GPU.

    Keys: BLOCK_N, BLOCK_K (columns per step, multiple of 8), BLOCK_T, USE_DOT, SPLIT_K.
    """
    block_t = min(next_pow2(tokens), MAX_BLOCK_T)

    def cfg(bn, bk, warps, stages, use_dot=None):
        use_dot = block_t > 2 if use_dot is None else use_dot
        bt = max(block_t, 16) if use_dot else block_t
        bn = max(bn, 16) if use_dot else bn
        programs = -(-n // bn) * -(-tokens // bt)
        split = split_k_for(programs, -(-k // bk), sms)
        kw = dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=bt, USE_DOT=use_dot, SPLIT_K=split)
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    if interpreting():
        return [cfg(16, 128, 4, 1)]
    cands = [
        cfg(32, 256, 4, 3),
        cfg(16, 256, 4, 3),
        cfg(64, 128, 8, 3),
        cfg(32, 128, 4, 4),
        cfg(16, 512, 8, 3),
    ]
    if block_t <= 2:
        cands += [cfg(32, 128, 4, 3, use_dot=True)]
    return cands


_TUNER = Tuner("sparse24_gemv")


def _launch(cfg: triton.Config, x2d, packed, bias, out):
    kw = cfg.kwargs
    t, k = x2d.shape
    n_chunks = -(-k // kw["BLOCK_K"])
    per_split, split = split_plan(n_chunks, kw["SPLIT_K"])
    target = out if split == 1 else workspace((split, t, packed.N), out.device)
    grid = (triton.cdiv(packed.N, kw["BLOCK_N"]), split, triton.cdiv(t, kw["BLOCK_T"]))
    _sparse24_gemv_kernel[grid](
        x2d,
        packed.values,
        packed.meta,
        bias if bias is not None else out,
        target,
        t,
        packed.N,
        k,
        packed.meta.shape[1],
        per_split,
        HAS_BIAS=bias is not None,
        PARTIAL=split > 1,
        BLOCK_N=kw["BLOCK_N"],
        BLOCK_K=kw["BLOCK_K"],
        BLOCK_T=kw["BLOCK_T"],
        USE_DOT=kw["USE_DOT"],
        DOT_FP32=dot_fp32(x2d.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out if split == 1 else finish_split(target, bias, out)


def sparse24_gemv(
    x2d: torch.Tensor,
    packed,
    bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
):
    """y [T, N] = x2d [T, K] @ W^T + bias for a :class:`Sparse24Weight` W, T small (1-32).

    ``x2d``: contiguous, the values' dtype and device; ``bias``: [N] or None; ``config``
    forces one of :func:`sparse24_configs`.  Accumulates in fp32.
    """
    return run_launcher(
        "sparse24_gemv",
        _TUNER,
        lambda t: sparse24_configs(packed.N, packed.K, t, sm_count(x2d.device), x2d.dtype),
        _launch,
        x2d,
        packed,
        bias,
        config,
        out,
    )
