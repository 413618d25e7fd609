"""Triton kernel for the bitmap format at larger token counts: y[T, N] = x @ W^T (+ bias).

Each program computes a ``BLOCK_M x BLOCK_N`` output tile (tokens x rows).  Per 128-column
tile it decodes the ``BLOCK_N x 128`` weight tile into registers exactly as the decode
kernel does (:func:`decode_bitmap_tile`), loads the ``BLOCK_M x 128`` activation tile and
feeds both to ``tl.dot`` (fp32 accumulation).  Programs are ordered in groups of
``GROUP_M`` token blocks that share a weight block, so the weight's bytes are read from
DRAM about once and re-read from L2.

Every weight tile is decoded once per token block: at large token counts this decode
work makes the kernel slower than dense cuBLAS, which is why the dispatch table sends
those shapes to the dense backend.  Candidate configs: :func:`mm_configs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Tuner, dot_fp32, interpreting, load_x_tile, next_pow2, run_launcher
from .bitmap_gemv import decode_bitmap_tile


@triton.jit
def _bitmap_mm_kernel(
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
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(Np, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, 128)
    x_rows = x_ptr + toks.to(tl.int64)[:, None] * K
    tok_ok = (toks < T)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, n_col_tiles):
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
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    ok = tok_ok & (rows < N)[None, :]
    offs = toks.to(tl.int64)[:, None] * N + rows[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def mm_configs(n: int, k: int, tokens: int, dtype: torch.dtype) -> list[triton.Config]:
    """Candidate configs, heuristic default first.  Edit here to tune on a GPU.

    Keys: BLOCK_M (tokens per program, >= 16), BLOCK_N (rows, multiple of 16), GROUP_M.
    """

    def cfg(bm, bn, warps, stages, group=8):
        bm = max(16, min(bm, next_pow2(tokens)))
        return triton.Config(
            dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group), num_warps=warps, num_stages=stages
        )

    if interpreting():
        return [cfg(32, 32, 4, 1)]
    return [
        cfg(64, 64, 4, 3),
        cfg(128, 64, 8, 3),
        cfg(64, 128, 8, 3),
        cfg(128, 128, 8, 2),
        cfg(32, 64, 4, 4),
        cfg(16, 64, 4, 4),
    ]


_TUNER = Tuner("bitmap_mm")


def _launch(cfg: triton.Config, x2d, packed, bias, out):
    kw = cfg.kwargs
    t = x2d.shape[0]
    np_, kp = packed.padded_shape
    grid = (triton.cdiv(t, kw["BLOCK_M"]) * triton.cdiv(np_, kw["BLOCK_N"]),)
    _bitmap_mm_kernel[grid](
        x2d,
        packed.bitmap,
        packed.values,
        packed.tile_offsets,
        bias if bias is not None else out,
        out,
        t,
        packed.N,
        packed.K,
        np_,
        kp // 32,
        kp // 128,
        HAS_BIAS=bias is not None,
        BLOCK_M=kw["BLOCK_M"],
        BLOCK_N=kw["BLOCK_N"],
        GROUP_M=kw["GROUP_M"],
        DOT_FP32=dot_fp32(x2d.dtype),
        HW_POPC=not interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def bitmap_mm(
    x2d: torch.Tensor,
    packed,
    bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
    out: torch.Tensor | None = None,
):
    """y [T, N] = x2d [T, K] @ W^T + bias for a :class:`BitmapWeight` W, any T (meant for T > 32).

    Same contract as :func:`owl_sparse.kernels.bitmap_gemv.bitmap_gemv`; ``config`` forces
    one of :func:`mm_configs`.
    """
    return run_launcher(
        "bitmap_mm",
        _TUNER,
        lambda t: mm_configs(packed.N, packed.K, t, x2d.dtype),
        _launch,
        x2d,
        packed,
        bias,
        config,
        out,
    )
