"""Triton kernels against the fp32 reference (interpreter on CPU, real kernels on CUDA).

On the CPU the conftest sets TRITON_INTERPRET=1 before triton is imported.  Outputs and
split-K workspaces are poisoned with NaN before each run, so an element a kernel forgets
to write cannot pass.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton

from owl_sparse.errors import InputError
from owl_sparse.formats import BitmapWeight, Sparse24Weight
from owl_sparse.kernels import bitmap_gemv, bitmap_mm, sparse24_gemv
from owl_sparse.ops import dispatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)

EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def poison_workspaces(monkeypatch):
    def nan_workspace(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(bitmap_gemv, "workspace", nan_workspace)
    monkeypatch.setattr(sparse24_gemv, "workspace", nan_workspace)


def make_bitmap(n, k, sparsity=0.5, pattern="random", dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    m = torch.rand(n, k, generator=g) >= sparsity
    if pattern == "empty_rows":
        m[::3] = False
    elif pattern == "full_rows":
        m[1::4] = True
    elif pattern == "zero_tiles":
        m[:16, :128] = False  # a whole tile, and a whole row block of tiles
        m[16:32] = False
    elif pattern == "dense":
        m[:] = True
    elif pattern == "all_zero":
        m[:] = False
    w = w.to(dtype)
    return w * m, BitmapWeight.from_dense(w, m).to(DEVICE)


def make_24(n, k, pattern="random", dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    m.scatter_(-1, torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2], True)
    m = m.view(n, k)
    if pattern == "partial":
        m &= torch.rand(n, k, generator=g) >= 0.3
    elif pattern == "empty_rows":
        m[::3] = False
    w = w.to(dtype)
    return w * m, Sparse24Weight.from_dense(w, m).to(DEVICE)


def run_and_check(fn, dense, packed, tokens, bias=True, config=None, seed=1):
    """Run a launcher on poisoned output and compare with the fp32 reference."""
    dtype = packed.dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, packed.K, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(packed.N, generator=g).to(dtype).to(DEVICE) if bias else None
    out = torch.full((tokens, packed.N), float("nan"), dtype=dtype, device=DEVICE)
    y = fn(x, packed, b, config=config, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (tokens, packed.N)
    ref = x.cpu().float() @ dense.float().t()
    if b is not None:
        ref += b.cpu().float()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(y.cpu().float(), ref, rtol=EPS[dtype], atol=EPS[dtype] * scale)


def gemv_cfg(bn=32, bt=1, use_dot=False, split=1, warps=4, stages=1):
    return triton.Config(
        dict(BLOCK_N=bn, BLOCK_T=bt, USE_DOT=use_dot, SPLIT_K=split),
        num_warps=warps,
        num_stages=stages,
    )


# ---------------------------------------------------------------------------- bitmap gemv
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("tokens", [1, 5])
def test_bitmap_gemv_sparsities(dtype, sparsity, tokens):
    dense, p = make_bitmap(40, 300, sparsity, dtype=dtype)
    run_and_check(bitmap_gemv.bitmap_gemv, dense, p, tokens)


@pytest.mark.parametrize(
    "n,k,tokens,pattern",
    [
        (1, 1, 1, "dense"),
        (17, 129, 1, "random"),
        (33, 255, 3, "random"),
        (48, 256, 2, "empty_rows"),
        (48, 256, 2, "full_rows"),
        (48, 384, 1, "zero_tiles"),
        (20, 140, 4, "dense"),
        (20, 140, 1, "all_zero"),
        (18, 130, 33, "random"),  # two token blocks
    ],
)
def test_bitmap_gemv_awkward(n, k, tokens, pattern):
    dense, p = make_bitmap(n, k, 0.6, pattern)
    run_and_check(bitmap_gemv.bitmap_gemv, dense, p, tokens)
    run_and_check(bitmap_gemv.bitmap_gemv, dense, p, tokens, bias=False)


@pytest.mark.parametrize("bn", [16, 32, 64])
@pytest.mark.parametrize("use_dot,bt", [(False, 1), (False, 2), (True, 16)])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_bitmap_gemv_configs(bn, use_dot, bt, split):
    dense, p = make_bitmap(70, 400, 0.7, dtype=torch.float32)
    run_and_check(bitmap_gemv.bitmap_gemv, dense, p, 2, config=gemv_cfg(bn, bt, use_dot, split))


def test_bitmap_gemv_zero_tokens():
    _, p = make_bitmap(20, 40)
    assert bitmap_gemv.bitmap_gemv(
        torch.empty(0, 40, dtype=torch.float16, device=DEVICE), p
    ).shape == (0, 20)


# ---------------------------------------------------------------------------- bitmap mm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_bitmap_mm_sparsities(dtype, sparsity):
    dense, p = make_bitmap(40, 300, sparsity, dtype=dtype)
    run_and_check(bitmap_mm.bitmap_mm, dense, p, 40)


@pytest.mark.parametrize(
    "n,k,tokens,pattern",
    [
        (1, 1, 1, "dense"),
        (17, 129, 17, "random"),
        (48, 384, 33, "zero_tiles"),
        (33, 200, 5, "empty_rows"),
        (20, 140, 3, "all_zero"),
    ],
)
def test_bitmap_mm_awkward(n, k, tokens, pattern):
    dense, p = make_bitmap(n, k, 0.6, pattern)
    run_and_check(bitmap_mm.bitmap_mm, dense, p, tokens)


@pytest.mark.parametrize("bm,bn,group", [(16, 16, 1), (32, 64, 2), (16, 32, 8)])
def test_bitmap_mm_configs(bm, bn, group):
    dense, p = make_bitmap(70, 300, 0.5, dtype=torch.float32)
    cfg = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=group), num_warps=4, num_stages=1)
    run_and_check(bitmap_mm.bitmap_mm, dense, p, 50, config=cfg)


# ---------------------------------------------------------------------------- 2:4
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["random", "partial", "empty_rows"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_sparse24_gemv(dtype, pattern, tokens):
    dense, p = make_24(40, 264, pattern, dtype)  # K % 8 == 0
    run_and_check(sparse24_gemv.sparse24_gemv, dense, p, tokens)


@pytest.mark.parametrize(
    "n,k,tokens", [(1, 4, 1), (5, 12, 1), (17, 300, 3), (9, 1028, 2), (3, 8, 33)]
)
def test_sparse24_gemv_awkward(n, k, tokens):
    dense, p = make_24(n, k, "partial")
    run_and_check(sparse24_gemv.sparse24_gemv, dense, p, tokens)
    run_and_check(sparse24_gemv.sparse24_gemv, dense, p, tokens, bias=False)


@pytest.mark.parametrize("bk", [64, 128, 256])
@pytest.mark.parametrize("bn,use_dot,bt", [(16, False, 1), (32, False, 2), (16, True, 16)])
@pytest.mark.parametrize("split", [1, 3])
def test_sparse24_gemv_configs(bk, bn, use_dot, bt, split):
    dense, p = make_24(40, 520, "partial", torch.float32)
    cfg = triton.Config(
        dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=bt, USE_DOT=use_dot, SPLIT_K=split),
        num_warps=4,
        num_stages=1,
    )
    run_and_check(sparse24_gemv.sparse24_gemv, dense, p, 2, config=cfg)


# ---------------------------------------------------------------------------- contract
def test_launchers_reject_bad_input():
    _, p = make_bitmap(20, 40)
    x = torch.randn(3, 40, dtype=torch.float16, device=DEVICE)
    with pytest.raises(InputError, match=r"\[T, 40\]"):
        bitmap_gemv.bitmap_gemv(x[:, :39], p)
    with pytest.raises(InputError, match="contiguous"):
        bitmap_mm.bitmap_mm(torch.randn(40, 3, dtype=torch.float16, device=DEVICE).t(), p)
    with pytest.raises(InputError, match="float32"):
        bitmap_gemv.bitmap_gemv(x.float(), p)
    with pytest.raises(InputError, match="out must be"):
        bitmap_gemv.bitmap_gemv(x, p, out=torch.empty(3, 21, dtype=torch.float16, device=DEVICE))
    _, q = make_24(20, 40)
    with pytest.raises(InputError, match=r"bias must be"):
        sparse24_gemv.sparse24_gemv(x, q, torch.randn(19, dtype=torch.float16, device=DEVICE))


@pytest.mark.parametrize(
    "fmt,backend", [("bitmap", "triton_gemv"), ("bitmap", "triton_mm"), ("2:4", "triton_gemv")]
)
def test_dispatch_runs_triton_backends(fmt, backend):
    dense, p = make_bitmap(24, 136, 0.6) if fmt == "bitmap" else make_24(24, 136)
    x = torch.randn(3, 136, dtype=torch.float16, device=DEVICE)
    with dispatch.force_backend(fmt, backend):
        y = dispatch.run(fmt, x, p, None)
    torch.testing.assert_close(
        y.cpu().float(), x.cpu().float() @ dense.float().t(), rtol=2e-3, atol=2e-2
    )


def test_compile_check_sm90(tmp_path):
    """Compile every kernel for sm_90 without a GPU (catches interpreter-only kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    probe = (
        "import triton, triton.language as tl\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "@triton.jit\n"
        "def k(p):\n"
        "    tl.store(p, 1)\n"
        "triton.compile(ASTSource(k, {'p': '*i32'}), target=GPUTarget('cuda', 90, 32))\n"
    )
    (tmp_path / "probe.py").write_text(probe)  # triton.jit needs a source file
    res = subprocess.run(
        [sys.executable, str(tmp_path / "probe.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0:
        pytest.skip(f"triton cannot compile for sm_90 on this machine: {res.stderr.strip()[-300:]}")
    code = "from owl_sparse.kernels import compile_check\nprint(len(compile_check(90)))"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.strip().splitlines()[-1]) > 10


# ---------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.slow  # ~3 min of Triton compiles on an H100: benchmarks/gpu_diag.sh runs it
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 2, 4, 16, 32])
def test_gpu_every_shipped_config(dtype, tokens):
    """Every candidate config (the autotuner may pick any) is correct on the GPU."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = 1000, 1352  # odd row tiles, K not a multiple of 128
    dense, p = make_bitmap(n, k, 0.7, dtype=dtype)
    for cfg in bitmap_gemv.gemv_configs(n, k, tokens, sms, dtype):
        run_and_check(bitmap_gemv.bitmap_gemv, dense, p, tokens, config=cfg)
    for cfg in bitmap_mm.mm_configs(n, k, max(tokens, 64), dtype):
        run_and_check(bitmap_mm.bitmap_mm, dense, p, max(tokens, 64), config=cfg)
    dense24, q = make_24(n, k, "partial", dtype)
    for cfg in sparse24_gemv.sparse24_configs(n, k, tokens, sms, dtype):
        run_and_check(sparse24_gemv.sparse24_gemv, dense24, q, tokens, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_llama_shapes_autotuned(n, k):
    dense, p = make_bitmap(n, k, 0.7, dtype=torch.float16)
    for tokens in (1, 16):
        run_and_check(bitmap_gemv.bitmap_gemv, dense, p, tokens)
    run_and_check(bitmap_mm.bitmap_mm, dense, p, 256)
    dense24, q = make_24(n, k, "random", torch.bfloat16)
    run_and_check(sparse24_gemv.sparse24_gemv, dense24, q, 1)
