"""GPU checks of the CUDA kernels (csrc/) against the CPU / fp64 reference.

Every test carries ``@pytest.mark.gpu`` and is skipped where CUDA is absent.  On a GPU
machine a kernel that fails to build or load is a failure, not a skip.

Tolerance (flash-attention style): the kernel's max error against an fp64 reference may
be at most twice that of torch's own dense product in the same dtype, plus a small
floor; the relative Frobenius error must also stay under 2e-3 (fp16) / 1.2e-2 (bf16).
Outputs are checked for NaN, and the memory the output lands in is poisoned with NaN
beforehand, so an element the kernel never writes cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from cuda_checks import DTYPES, check, make_24, make_bitmap, poison

from owl_sparse.errors import InputError
from owl_sparse.formats.bitmap import BitmapWeight

pytestmark = pytest.mark.gpu

TOKENS = [1, 3, 8, 16, 17, 40, 100, 300]
SHAPES = [(16, 128), (40, 200), (33, 196), (500, 1028), (256, 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_sparse24_matches_reference(ext, dtype, n, k, t):
    p = make_24(n, k, dtype, seed=n + k + t)
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if t % 2 else None
    poison(t * n, dtype)
    y = ext.sparse24_mm(x, p, bias)
    check(y, x, p.to_dense(), bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_bitmap_matches_reference(ext, dtype, n, k, t):
    p = make_bitmap(n, k, dtype, seed=n + k + t)
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if t % 2 else None
    poison(t * n, dtype)
    y = ext.bitmap_mm(x, p, bias)
    check(y, x, p.to_dense(), bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_split_k_paths_agree(ext, dtype, splits):
    n, k, t = 300, 1408, 5
    p24, pbm = make_24(n, k, dtype, 1), make_bitmap(n, k, dtype, 1, density=0.4)
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    stages = -(-k // 128)
    per = -(-stages // splits)
    assert ext.plan("sparse24", t, n, k, splits)["splits"] == -(-stages // per)
    y24 = ext.sparse24_mm(x, p24, bias, split_k=splits)
    check(y24, x, p24.to_dense(), bias)
    ybm = ext.bitmap_mm(x, pbm, bias, split_k=splits)
    check(ybm, x, pbm.to_dense(), bias)
    # The split-K reduction is in a fixed order: repeated runs are bitwise equal.
    assert torch.equal(y24, ext.sparse24_mm(x, p24, bias, split_k=splits))
    assert torch.equal(ybm, ext.bitmap_mm(x, pbm, bias, split_k=splits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8])
def test_bitmap_gemv_matches_reference(ext, dtype, n, k, t):
    """The CUDA-core bitmap kernel (1-8 tokens) against fp64."""
    p = make_bitmap(n, k, dtype, seed=7 * n + k + t)
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if t % 2 else None
    poison(t * n, dtype)
    check(ext.bitmap_gemv(x, p, bias), x, p.to_dense(), bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("hint", [-1, 0, 700])
@pytest.mark.parametrize("pattern", ["random", "zero", "full"])
def test_bitmap_gemv_paths(ext, dtype, splits, hint, pattern):
    """Split-K, values staged in shared memory or read from global memory, degenerate masks;
    more than 8 tokens is refused with a clear error; the backend hands those to cuda_mma."""
    n, k, t = 300, 1420, 4  # K % 8 == 4, partial row block, partial last stage
    p = make_bitmap(n, k, dtype, seed=splits + hint, density=0.4, pattern=pattern)
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    poison(t * n, dtype)
    y = ext.bitmap_gemv(x, p, bias, split_k=splits, max_tile_values_hint=hint)
    check(y, x, p.to_dense(), bias)
    assert torch.equal(y, ext.bitmap_gemv(x, p, bias, split_k=splits, max_tile_values_hint=hint))
    x9 = torch.randn(9, k, device="cuda", dtype=dtype)
    with pytest.raises(InputError, match="1 to 8 tokens"):
        ext.bitmap_gemv(x9, p)
    with pytest.raises(RuntimeError, match="handles 1 to 8 tokens"):
        torch.ops.owl_sparse_C.bitmap_gemv(x9, p.bitmap, p.values, p.tile_offsets, n, k)
    from owl_sparse import ops
    from owl_sparse.ops import dispatch

    with dispatch.force_backend("bitmap", "cuda_gemv"):
        check(ops.linear(x9, p, bias), x9, p.to_dense(), bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hint", [-1, 0, 100, 700])
@pytest.mark.parametrize("t", [1, 40, 130])
def test_bitmap_tiles_larger_than_the_shared_slot(ext, dtype, hint, t):
    """Tiles with more values than the kernel's shared slot (sized by the hint) are read
    from global memory: every hint gives the right answer, only the speed differs."""
    n, k = 100, 520
    p = make_bitmap(n, k, dtype, seed=hint + t, density=0.35)
    dense = p.to_dense().clone()
    # rows 32..47: full tiles (2048 values) next to ~700-value tiles and an empty row
    full = torch.randn(16, k, dtype=dtype, device="cuda")
    dense[32:48] = full
    p = BitmapWeight.from_dense(dense, dense != 0)
    assert ext.max_tile_values(p) == 2048
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    plan_small = ext.plan("bitmap", t, n, k, 0, hint)
    plan_full = ext.plan("bitmap", t, n, k, 0, -1)
    assert plan_small["smem_bytes"] <= plan_full["smem_bytes"]
    poison(t * n, dtype)
    y = ext.bitmap_mm(x, p, bias, split_k=2, max_tile_values_hint=hint)
    check(y, x, p.to_dense(), bias)
    # same splits, same summation order: bitwise equal to the full-slot run
    assert torch.equal(y, ext.bitmap_mm(x, p, bias, split_k=2, max_tile_values_hint=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["zero", "full"])
def test_bitmap_degenerate_patterns(ext, dtype, pattern):
    n, k = 70, 390  # K % 4 != 0 exercises the padded-x path
    p = make_bitmap(n, k, dtype, 2, pattern=pattern)
    for t in (1, 9, 70):
        x = torch.randn(t, k, device="cuda", dtype=dtype)
        check(ext.bitmap_mm(x, p), x, p.to_dense(), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_all_zero_weight(ext, dtype):
    p = make_24(64, 256, dtype, 3, pattern="zero")
    x = torch.randn(5, 256, device="cuda", dtype=dtype)
    bias = torch.randn(64, device="cuda", dtype=dtype)
    y = ext.sparse24_mm(x, p, bias)
    assert torch.equal(y, bias.expand(5, 64))


def test_llama_shapes_decode_and_prefill(ext):
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        p24 = make_24(n, k, torch.float16, n)
        pbm = make_bitmap(n, k, torch.float16, n, density=0.3)
        for t in (1, 16, 512):
            x = torch.randn(t, k, device="cuda", dtype=torch.float16)
            check(ext.sparse24_mm(x, p24), x, p24.to_dense(), None)
            check(ext.bitmap_mm(x, pbm), x, pbm.to_dense(), None)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    p24 = make_24(4096, 4096, torch.bfloat16, 9)
    check(ext.sparse24_mm(x, p24), x, p24.to_dense(), None)


def test_decode_plan_fills_the_gpu(ext):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan = ext.plan("sparse24", 1, 4096, 4096)
    assert plan["block_n"] == 8 and plan["splits"] > 1
    assert plan["grid_m"] * plan["grid_n"] * plan["splits"] >= sms
    assert ext.plan("bitmap", 512, 4096, 4096)["block_n"] == 128
    # register-built A tiles (one m16 tile per warp) up to 128 tokens: 64 rows per block
    for t, block_n in ((16, 16), (40, 64), (100, 128)):
        plan = ext.plan("bitmap", t, 4096, 4096)
        assert (plan["block_m"], plan["block_n"]) == (64, block_n), plan


def test_sparse24_prefill_tile(ext):
    """The 256-row x 128-token prefill tile (weights staged in shared memory, 8 warps):
    two row blocks with a partial second one, K % 8 == 4 with a K tail, partial token tiles,
    automatic and forced split-K; every case checks the plan really chose that tile."""
    plan = ext.plan("sparse24", 2048, 4096, 4096)
    assert (plan["block_m"], plan["block_n"], plan["splits"]) == (256, 128, 1), plan
    n, k = 300, 1004
    for dtype in DTYPES:
        p = make_24(n, k, dtype, 12)
        for t, splits in ((33, 0), (129, 0), (257, 3)):
            assert ext.plan("sparse24", t, n, k, splits)["block_m"] == 256
            x = torch.randn(t, k, device="cuda", dtype=dtype)
            bias = torch.randn(n, device="cuda", dtype=dtype) if t % 2 else None
            poison(t * n, dtype)
            check(ext.sparse24_mm(x, p, bias, split_k=splits), x, p.to_dense(), bias)


def test_errors_name_the_shapes(ext):
    p = make_24(32, 128, torch.float16, 4)
    vm, mm = ext.mma_tensors(p)
    x = torch.randn(2, 128, device="cuda", dtype=torch.float16)
    op = torch.ops.owl_sparse_C.sparse24_mm
    with pytest.raises(RuntimeError, match=r"x \[2, 64\].*\[32, 128\]"):
        op(x[:, :64].contiguous(), vm, mm, 32, 128)
    with pytest.raises(RuntimeError, match="values_mma"):
        op(x, vm[:-8], mm, 32, 128)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(x.float(), vm, mm, 32, 128)
    with pytest.raises(RuntimeError, match=r"bias must be \[32\]"):
        op(x, vm, mm, 32, 128, torch.zeros(31, device="cuda", dtype=torch.float16))
    pb = make_bitmap(32, 128, torch.float16, 4)
    with pytest.raises(RuntimeError, match="tile_offsets"):
        torch.ops.owl_sparse_C.bitmap_mm(x, pb.bitmap, pb.values, pb.tile_offsets[:-1], 32, 128)
    with pytest.raises(
        RuntimeError, match="kind must be 'sparse24', 'bitmap' or 'bitmap_gemv', got 'csr'"
    ):
        torch.ops.owl_sparse_C.plan("csr", 1, 32, 128)
    # 8-token tiles (config 0) for 600k tokens: 75,000 token tiles, past gridDim.y's 65535
    with pytest.raises(RuntimeError, match="more token tiles or K splits than one launch"):
        torch.ops.owl_sparse_C.plan("sparse24", 600_000, 64, 128, 0, -1, 0)
    assert torch.ops.owl_sparse_C.plan("sparse24", 500_000, 64, 128, 0, -1, 0)[4] == 62_500


def test_unaligned_and_strided_inputs(ext):
    p = make_24(48, 256, torch.float16, 5)
    base = torch.randn(3 * 256 + 4, device="cuda", dtype=torch.float16)
    x = base[4:].view(3, 256)  # data pointer 8 bytes past an allocation
    check(ext.sparse24_mm(x, p), x, p.to_dense(), None)


def test_dispatch_runs_the_cuda_backends(ext):
    from owl_sparse import ops
    from owl_sparse.ops import dispatch

    assert "cuda_sp" in dispatch.backends("2:4", only_available=True)
    assert "cuda_mma" in dispatch.backends("bitmap", only_available=True)
    assert "cuda_gemv" in dispatch.backends("bitmap", only_available=True)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert ("cuda_sp_wgmma" in dispatch.backends("2:4", only_available=True)) == hopper
    assert ("cuda_mma_wgmma" in dispatch.backends("bitmap", only_available=True)) == hopper
    p24 = make_24(96, 256, torch.bfloat16, 6)
    pbm = make_bitmap(96, 256, torch.bfloat16, 6)
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)
    with dispatch.force_backend("2:4", "cuda_sp"), dispatch.force_backend("bitmap", "cuda_mma"):
        y24, ybm = ops.linear(x, p24), ops.linear(x, pbm)
    check(y24.view(6, 96), x.view(6, 256), p24.to_dense(), None)
    check(ybm.view(6, 96), x.view(6, 256), pbm.to_dense(), None)


def test_cuda_graph_replay(ext):
    p24 = make_24(256, 1024, torch.float16, 7)
    pbm = make_bitmap(256, 1024, torch.float16, 7)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    ext.sparse24_mm(x, p24), ext.bitmap_mm(x, pbm)  # warm up (layout conversion, plans)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y24, ybm = ext.sparse24_mm(x, p24), ext.bitmap_mm(x, pbm)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check(y24, x, p24.to_dense(), None)
    check(ybm, x, pbm.to_dense(), None)
