"""Run CUDA backends once on small shapes, each in a process of its own, against dense.

``python -m benchmarks.smoke_backend NAME`` exits 0 when backend NAME is correct on every
shape, or is not available here (nothing to check); 1 when a result is wrong or a call
raises; a kernel fault ends the process with whatever the fault gives.  gpu_suite.sh runs it
for the backends that have not run on a GPU before and switches off (``OWL_SPARSE_DISABLE``)
any that fails, so that one faulting kernel cannot end the CUDA context of a whole
benchmark.  The GPU tests hold the real checks (awkward shapes, tight tolerances).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from owl_sparse import ops
from owl_sparse.formats.bitmap import BitmapWeight
from owl_sparse.formats.sparse24 import Sparse24Weight
from owl_sparse.ops import dispatch

TOKENS = (1, 8, 16, 40, 64, 100, 128, 300)
N, K = 520, 1000  # a partial row block, K % 128 != 0


def _weight(fmt: str, gen: torch.Generator):
    w = torch.randn(N, K, generator=gen, device="cuda").half()
    if fmt == "2:4":
        keep = w.float().abs().view(N, -1, 4).topk(2, dim=-1).indices
        mask = torch.zeros(N, K // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, keep, True)
        return Sparse24Weight.from_dense(w, mask.view(N, K))
    return BitmapWeight.from_dense(w, torch.rand(N, K, generator=gen, device="cuda") < 0.3)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.smoke_backend BACKEND", file=sys.stderr)
        return 2
    name = argv[0]
    fmt = next((f for f in dispatch.FORMATS if name in dispatch.backends(f)), None)
    if fmt is None or name not in dispatch.backends(fmt, only_available=True):
        print(f"{name}: not available here, nothing to check")
        return 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = _weight(fmt, gen)
    dense = packed.to_dense().float()
    bad = 0
    for dtype in (torch.float16, torch.bfloat16):
        p = packed.to(dtype=dtype)
        for t in TOKENS:
            x = torch.randn(t, K, generator=gen, device="cuda").to(dtype)
            try:
                with dispatch.force_backend(fmt, name):
                    y = ops.linear(x, p).float()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - report and count, keep checking
                print(f"{name} {dtype} T={t}: {type(exc).__name__}: {exc}"[:300])
                bad += 1
                continue
            ref = F.linear(x.float(), dense.to(dtype).float())
            err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            ok = bool(torch.isfinite(y).all()) and err < (1e-2 if dtype == torch.float16 else 3e-2)
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {name} {str(dtype):14s} T={t:4d} rel_err={err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
