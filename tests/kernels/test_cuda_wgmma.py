"""GPU checks of the Hopper wgmma kernels (sm_90a builds on compute capability 9.0):
2:4 on wgmma.mma_async.sp and the bitmap 64-/128-token tiles on wgmma.mma_async, against
fp64 with the tolerances of test_cuda_kernels.py (helpers: cuda_checks.py).  A file of its
own so that a fault in these kernels (a wrong shared-memory descriptor ends the CUDA
context) cannot take the other kernel tests down with it when files run in separate
processes (gpu_diag.sh).
"""

from __future__ import annotations

import pytest
import torch
from cuda_checks import DTYPES, check, make_24, make_bitmap, poison

pytestmark = pytest.mark.gpu


def test_sparse24_wgmma(ext):
    """The wgmma.sp prefill kernel (Hopper's warpgroup sparse tensor cores): present on a
    compute capability 9.0 GPU (setup.py and the JIT build target sm_90a there), refused
    elsewhere; against fp64 on odd N, K % 8 == 4 with a K tail, partial token tiles,
    automatic and forced split-K, both dtypes, and a LLaMA-2-7B prefill shape."""
    cfg = ext.sparse24_wgmma_config()
    if torch.cuda.get_device_capability() != (9, 0):
        assert cfg == -1
        p = make_24(32, 128, torch.float16, 4)
        x = torch.randn(40, 128, device="cuda", dtype=torch.float16)
        with pytest.raises(RuntimeError, match="config 5"):
            ext.sparse24_mm(x, p, config=5)
        pytest.skip("wgmma.sp needs a compute capability 9.0 GPU")
    assert cfg >= 0, "no wgmma kernel in this build (it must target sm_90a on Hopper)"
    n, k = 300, 1004
    for dtype in DTYPES:
        p = make_24(n, k, dtype, 13)
        for t, splits in ((33, 0), (129, 0), (257, 3)):
            plan = ext.plan("sparse24", t, n, k, splits, config=cfg)
            assert (plan["config"], plan["block_m"], plan["block_n"]) == (cfg, 256, 128), plan
            x = torch.randn(t, k, device="cuda", dtype=dtype)
            bias = torch.randn(n, device="cuda", dtype=dtype) if t % 2 else None
            poison(t * n, dtype)
            check(ext.sparse24_mm(x, p, bias, split_k=splits, config=cfg), x, p.to_dense(), bias)
    p = make_24(4096, 4096, torch.bfloat16, 14)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    check(ext.sparse24_mm(x, p, config=cfg), x, p.to_dense(), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmap_wgmma(ext, dtype):
    """The Hopper bitmap tiles (register-built A, wgmma.mma_async m64n64k16 / m64n128k16):
    present on a compute capability 9.0 GPU, refused elsewhere; against fp64 with an empty
    row and tile, a partial row block, K % 8 == 4, partial token tiles, split-K, tiles too
    large for the shared slot (hint 0), full and zero masks."""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    if not hopper:
        assert ext.bitmap_wgmma_config(64) == -1
        pytest.skip("wgmma needs a compute capability 9.0 GPU")
    assert ext.bitmap_wgmma_config(129) == -1
    n, k = 200, 1004
    for t, splits, hint in ((33, 0, None), (64, 3, None), (100, 0, 0), (128, 2, None)):
        cfg = ext.bitmap_wgmma_config(t)
        assert cfg >= 0, "no wgmma kernel in this build (it must target sm_90a on Hopper)"
        assert ext.plan("bitmap", t, n, k, splits, config=cfg)["block_n"] == (
            64 if t <= 64 else 128
        )
        for pattern in ("random", "zero", "full") if t == 64 else ("random",):
            p = make_bitmap(n, k, dtype, t, pattern=pattern)
            x = torch.randn(t, k, device="cuda", dtype=dtype)
            bias = torch.randn(n, device="cuda", dtype=dtype) if t % 2 else None
            poison(t * n, dtype)
            y = ext.bitmap_mm(x, p, bias, split_k=splits, max_tile_values_hint=hint, config=cfg)
            check(y, x, p.to_dense(), bias)
