"""Where the fixed cost of a decode call goes (CUDA, 2:4): the split-K workspace.

A decode plan splits K so that enough blocks run; its tile counters must start at zero,
and today the binding zeroes a fresh int32 buffer (one extra kernel) on every call.  This
script times, in CUDA graphs as the kernel benchmark does, per layer shape and token count:
the automatic plan, the same kernel with one split (no workspace, fewer blocks), the
zeroing of a counter buffer of the plan's size on its own, and cuBLAS dense.  If the
zeroing costs a noticeable share of the automatic plan, a persistent self-resetting
counter buffer is worth its bookkeeping (the kernels already reset their counters).

Usage (GPU machine): ``python benchmarks/overheads.py [--json-out F]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, rotation_count, time_calls, write_json
from owl_sparse.formats.sparse24 import Sparse24Weight
from owl_sparse.ops import cuda as cuda_ext

SHAPES = ((1024, 8192), (4096, 4096), (11008, 4096), (4096, 11008))
TOKENS = (1, 16)


def _weights(n: int, k: int, count: int, gen: torch.Generator) -> list[tuple]:
    """``count`` (dense fp16 [N, K], 2:4 packed) pairs, larger 2 of every 4 kept."""
    out = []
    for _ in range(count):
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float16)
        top2 = w.view(n, -1, 4).abs().topk(2, dim=-1).indices
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, top2, True)
        packed = Sparse24Weight.from_dense(w, mask.view(n, k))
        out.append((packed.to_dense(), packed))
    return out


def _us(fns) -> float:
    return time_calls(fns, "cuda").seconds * 1e6


def _row(n: int, k: int, t: int, sets: list[tuple], gen: torch.Generator) -> list:
    x = torch.randn(t, k, device="cuda", generator=gen, dtype=torch.float16)
    plan = cuda_ext.plan("sparse24", t, n, k)
    elems = plan["grid_m"] * plan["grid_n"] if plan["splits"] > 1 else 0
    auto = _us([lambda p=p: cuda_ext.sparse24_mm(x, p) for _, p in sets])
    one = _us([lambda p=p: cuda_ext.sparse24_mm(x, p, split_k=1) for _, p in sets])
    zero = _us([lambda: torch.zeros(max(elems, 1), dtype=torch.int32, device="cuda")])
    dense = _us([lambda d=d: F.linear(x, d) for d, _ in sets])
    return [n, k, t, plan["splits"], elems, dense, auto, one, zero, zero / auto]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/overheads.py needs a CUDA GPU")
    if not cuda_ext.load():
        raise SystemExit(f"CUDA extension unavailable: {cuda_ext.status()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n, k in SHAPES:
        sets = _weights(n, k, rotation_count(n * k * 2, torch.device("cuda")), gen)
        rows += [_row(n, k, t, sets, gen) for t in TOKENS]
    headers = ["N", "K", "tokens", "splits", "counters", "cuBLAS us", "auto us", "1 split us",
               "zeros us", "zeros / auto"]  # fmt: skip
    print(markdown_table(headers, rows))
    if args.json_out:
        write_json(args.json_out, {"headers": headers, "rows": rows})


if __name__ == "__main__":
    main()
