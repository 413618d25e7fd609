"""Run both CUDA kernels once through every code path on small shapes.

Meant for ``compute-sanitizer`` (memcheck / racecheck / synccheck / initcheck), which
slows kernels down by orders of magnitude: the shapes are tiny but cover decode and
prefill tile configurations, partial row / token / K tiles, forced split-K (the
cross-block reduction), K % 8 == 4, K % 4 != 0 (bitmap), empty rows, all-zero tiles,
bias and no bias, fp16 and bf16, bitmap tiles staged in shared memory and read from
global memory, and the 2:4 wgmma kernel where the GPU has it.  Each result is also
checked against an fp64 reference (loosely: the GPU tests hold the tight tolerances), so
a silent wrong answer fails too.

Usage: ``compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py``
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from owl_sparse.formats.bitmap import BitmapWeight
from owl_sparse.formats.sparse24 import Sparse24Weight
from owl_sparse.ops import cuda as cuda_ext

# (N, K, tokens, split_k): 0 = automatic split
CASES = [
    (40, 200, 1, 0),  # decode, partial row block, K tail inside a stage
    (33, 196, 9, 3),  # K % 8 == 4, forced split-K
    (64, 512, 17, 0),  # NT = 4 configuration
    (48, 256, 70, 2),  # prefill configuration, partial token tile, split-K
    (40, 200, 50, 3),  # bitmap 64-token register tile, split-K; 2:4 prefill tile
    (20, 384, 130, 0),  # prefill, two token tiles
    (272, 1000, 140, 0),  # 2:4 prefill tile: two row blocks (one valid tile), K % 8 == 0
]
BITMAP_ONLY = [(70, 390, 5, 2)]  # K % 4 != 0: padded activation path


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / (ref.norm() + 1e-12)).item()


def _reference(x, dense, bias):
    ref = x.double() @ dense.double().t()
    return ref + bias.double() if bias is not None else ref


def run(verbose: bool) -> int:
    if not cuda_ext.load():
        print(f"CUDA extension unavailable: {cuda_ext.status()}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    wgmma = cuda_ext.sparse24_wgmma_config()
    failures = 0
    n_runs = 0
    for dtype in (torch.float16, torch.bfloat16):
        for n, k, t, split in CASES + BITMAP_ONLY:
            w = torch.randn(n, k, generator=gen).to(dtype)
            x = torch.randn(t, k, generator=gen).to(dtype).cuda()
            bias = torch.randn(n, generator=gen).to(dtype).cuda() if t % 2 else None
            mask = torch.rand(n, k, generator=gen) < 0.35
            mask[n // 3] = False
            if n > 16 and k > 128:
                mask[16:32, 128:256] = False
            pb = BitmapWeight.from_dense(w, mask).to("cuda")
            packs = [
                ("bitmap", pb, cuda_ext.bitmap_mm),
                # every tile overflows its (minimal) shared slot: the global-memory path
                ("bitmap-global", pb, partial(cuda_ext.bitmap_mm, max_tile_values_hint=0)),
            ]
            bitmap_wgmma = cuda_ext.bitmap_wgmma_config(t)
            if bitmap_wgmma >= 0 and t >= cuda_ext.WGMMA_MIN_TOKENS:  # Hopper's wgmma tiles
                packs += [
                    ("bitmap-wgmma", pb, partial(cuda_ext.bitmap_mm, config=bitmap_wgmma)),
                    (
                        "bitmap-wgmma-global",
                        pb,
                        partial(cuda_ext.bitmap_mm, max_tile_values_hint=0, config=bitmap_wgmma),
                    ),
                ]
            if t <= cuda_ext.GEMV_MAX_TOKENS:  # the CUDA-core kernel, both value paths
                packs += [
                    ("gemv", pb, cuda_ext.bitmap_gemv),
                    ("gemv-global", pb, partial(cuda_ext.bitmap_gemv, max_tile_values_hint=0)),
                ]
            if k % 4 == 0:
                m24 = mask.view(n, k // 4, 4)
                m24 &= m24.cumsum(-1) <= 2  # keep at most 2 per group
                p24 = Sparse24Weight.from_dense(w, m24.view(n, k)).to("cuda")
                packs.append(("2:4", p24, cuda_ext.sparse24_mm))
                if wgmma >= 0 and t >= cuda_ext.WGMMA_MIN_TOKENS:  # Hopper's wgmma.sp
                    packs.append(("2:4-wgmma", p24, partial(cuda_ext.sparse24_mm, config=wgmma)))
            for name, packed, fn in packs:
                y = fn(x, packed, bias, split_k=split)
                torch.cuda.synchronize()
                err = _rel_err(y, _reference(x, packed.to_dense(), bias))
                ok = bool(torch.isfinite(y).all()) and err < 2e-2
                failures += not ok
                n_runs += 1
                if verbose or not ok:
                    print(
                        f"{'ok ' if ok else 'BAD'} {name:6s} {str(dtype):14s} N={n} K={k} T={t} split={split} rel_err={err:.2e}"
                    )
    print(f"sanitize run: {n_runs} kernel calls, {failures} wrong")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    sys.exit(run(parser.parse_args().verbose))


if __name__ == "__main__":
    main()
