"""Launch the CUDA kernels on one layer shape, for Nsight Compute (``ncu``) to profile.

Each (format, tokens) case runs the kernel three times (the first two warm up, ncu can
skip them with ``--launch-skip``); nothing is timed here: the bench_kernels tables hold the
timings, this driver only feeds the profiler.

Usage (GPU machine)::

    ncu --kernel-name regex:'bitmap_kernel|sp24' --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_cuda.py --format bitmap --tokens 16 --sparsity 0.7
"""

from __future__ import annotations

import argparse

import torch

from owl_sparse.formats.bitmap import BitmapWeight
from owl_sparse.formats.sparse24 import Sparse24Weight
from owl_sparse.ops import cuda as cuda_ext


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["bitmap", "2:4"], default="bitmap")
    p.add_argument("--n", type=int, default=11008, help="output features (weight rows)")
    p.add_argument("--k", type=int, default=4096, help="input features (weight columns)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.7, help="bitmap only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--wgmma", action="store_true", help="the Hopper wgmma configuration (sm_90a builds)"
    )
    args = p.parse_args(argv)
    if not cuda_ext.load():
        raise SystemExit(f"CUDA extension unavailable: {cuda_ext.status()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(args.n, args.k, device="cuda", generator=gen, dtype=torch.float16)
    x = torch.randn(args.tokens, args.k, device="cuda", generator=gen, dtype=torch.float16)
    if args.format == "bitmap":
        mask = torch.rand(args.n, args.k, device="cuda", generator=gen) >= args.sparsity
        packed, fn = BitmapWeight.from_dense(w, mask), cuda_ext.bitmap_mm
        config = cuda_ext.bitmap_wgmma_config(args.tokens) if args.wgmma else -1
    else:
        top2 = w.view(args.n, -1, 4).abs().topk(2, dim=-1).indices
        mask = torch.zeros(args.n, args.k // 4, 4, dtype=torch.bool, device="cuda")
        mask.scatter_(-1, top2, True)
        packed, fn = Sparse24Weight.from_dense(w, mask.view(args.n, args.k)), cuda_ext.sparse24_mm
        config = cuda_ext.sparse24_wgmma_config() if args.wgmma else -1
    if args.wgmma and config < 0:
        raise SystemExit(f"no wgmma configuration for {args.format} at {args.tokens} tokens here")
    for _ in range(args.repeats):
        fn(x, packed, None, config=config)
    torch.cuda.synchronize()
    print(f"{args.format} N={args.n} K={args.k} T={args.tokens}: {args.repeats} launches")


if __name__ == "__main__":
    main()
