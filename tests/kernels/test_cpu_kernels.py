"""The CPU kernels (csrc/cpu) against an fp64 reference: every instruction set this machine
runs (AVX-512 BF16, AVX-512, AVX2, portable), every dtype, both formats and both backends,
on awkward shapes, with outputs poisoned (NaN) before each run."""

from __future__ import annotations

import itertools

import pytest
import torch

from owl_sparse.formats import BitmapWeight, Sparse24Weight
from owl_sparse.ops import cpu, dispatch

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason="compiled CPU kernels unavailable"),
    pytest.mark.usefixtures("poisoned_cpu_outputs"),
]

ISAS = cpu.supported_isas() if cpu.available() else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |error| / (|ref| + 1): one rounding of the output dominates for 16-bit dtypes.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# (N, K): one row, odd N, K not a multiple of 32 / 128, several strips and column tiles;
# the last column tile holding 1, 2, 3 and 4 words of columns below K; and one with many
# strips, whose first strips' words decode with plain loads (the kernels read a word's 32
# values at once wherever more than one tile's worth of values follows).
SHAPES = [
    (1, 8),
    (5, 36),
    (17, 33),
    (20, 136),
    (33, 300),
    (48, 260),
    (16, 200),
    (18, 256),
    (70, 420),
]
# Bitmap row groups go row by row below 5 tokens, word by word from 5; 2:4 rows one at a
# time below 4 tokens, in groups from 4 (odd N: a last row alone); passes of <= 8 tokens
# (16: 8 + 8, 17: 6 + 6 + 5) for 2:4, and for bitmap where bf16 multiplies bf16.
TOKENS = [1, 2, 3, 5, 8, 9, 16, 17, 40]


def bitmap_mask(n, k, gen):
    """Random ~60% sparsity, plus an empty row, a full row and an all-zero 16 x 128 tile."""
    m = torch.rand(n, k, generator=gen) > 0.6
    m[0] = False
    if n > 2:
        m[1] = True
    if n >= 16 and k > 128:
        m[:16, 128:256] = False
    return m


def sp24_mask(n, k, gen):
    idx = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    m = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).view(n, k)
    if n > 1:
        m[1, :4] = False  # a group keeping nothing (zero fillers)
    return m


def packed(fmt, n, k, dtype, gen):
    w = torch.randn(n, k, generator=gen)
    if fmt == "bitmap":
        return BitmapWeight.from_dense(w.to(dtype), bitmap_mask(n, k, gen))
    return Sparse24Weight.from_dense(w.to(dtype), sp24_mask(n, k, gen))


def run_op(p, x, bias):
    if p.fmt == "bitmap":
        return torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values, p.tile_offsets, bias, p.N, p.K
        )
    return torch.ops.owl_sparse.sparse24_linear(x, p.values, p.meta, bias)


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_fp64_reference(isa, dtype, fmt):
    gen = torch.Generator().manual_seed(hash((isa, str(dtype), fmt)) % 2**31)
    with cpu.use_isa(isa):
        for n, k in SHAPES:
            if fmt == "2:4" and k % 4:
                continue
            p = packed(fmt, n, k, dtype, gen)
            dense = p.to_dense().double()
            for tokens in TOKENS:
                x = torch.randn(tokens, k, generator=gen).to(dtype)
                bias = torch.randn(n, generator=gen).to(dtype) if tokens % 2 else None
                ref = x.double() @ dense.T + (0 if bias is None else bias.double())
                for backend in ("cpu_sparse", "dense"):
                    with dispatch.force_backend(fmt, backend):
                        y = run_op(p, x, bias)
                    assert y.shape == (tokens, n) and y.dtype == dtype
                    err = ((y.double() - ref).abs() / (ref.abs() + 1)).max().item()
                    assert err <= TOL[dtype], (isa, fmt, backend, n, k, tokens, err)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_dense_backend_blocks_cover_every_row(fmt, threads):
    """The GEMM backend splits a weight into per-thread blocks of <= 384 rows and <= 8 MB
    unpacked: several blocks a thread, a shorter last block, the byte cap binding (K = 30000
    fp32: 64-row blocks), and thread counts that do not divide the blocks."""
    gen = torch.Generator().manual_seed(threads * 7 + len(fmt))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # fp32 over 30000 terms: the reference's and the GEMM's summation orders differ by
        # ~1e-4 of |y| (2e-5 holds for the short rows above).
        for n, k, dtype, tol in (
            (1000, 104, torch.bfloat16, TOL[torch.bfloat16]),
            (203, 30000, torch.float32, 3e-4),
        ):
            p = packed(fmt, n, k, dtype, gen)
            dense = p.to_dense().double()
            for tokens in (1, 3, 70):
                x = torch.randn(tokens, k, generator=gen).to(dtype)
                bias = torch.randn(n, generator=gen).to(dtype) if tokens != 3 else None
                ref = x.double() @ dense.T + (0 if bias is None else bias.double())
                with dispatch.force_backend(fmt, "dense"):
                    y = run_op(p, x, bias)
                err = ((y.double() - ref).abs() / (ref.abs() + 1)).max().item()
                assert err <= tol, (fmt, n, k, tokens, err)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gemm_backend_with_and_without_wide_panels(dtype, wide):
    """The GEMM backend on 16-bit weights, with fp32 panels (CPUs whose 16-bit GEMM in torch
    is slow) and without: bitmap, 2:4 and dense (nn.Linear) weights, every instruction set,
    one and two threads, bias or not, a non-contiguous x, a last block shorter than the rest."""
    gen = torch.Generator().manual_seed(int(wide) * 2 + (dtype == torch.float16))
    before = torch.get_num_threads()
    cases = itertools.product(ISAS, (1, 2), ((1, 8), (33, 300), (400, 136)), (1, 20))
    try:
        with cpu.use_wide_panels(wide):
            assert cpu.wide_panels() == {torch.float16: wide, torch.bfloat16: wide}
            for isa, threads, (n, k), tokens in cases:
                torch.set_num_threads(threads)
                x = torch.randn(tokens, 2 * k, generator=gen).to(dtype)[:, ::2]
                bias = torch.randn(n, generator=gen).to(dtype) if tokens > 1 else None
                for fmt in ("bitmap", "2:4"):
                    p = packed(fmt, n, k, dtype, gen)
                    dense = p.to_dense()
                    ref = x.double() @ dense.double().T + (0 if bias is None else bias.double())
                    with cpu.use_isa(isa), dispatch.force_backend(fmt, "dense"):
                        y = run_op(p, x, bias)
                    with cpu.use_isa(isa), cpu.force_dense("torch"):
                        yd = torch.ops.owl_sparse.dense_linear(x, dense, bias)
                    for out in (y, yd):
                        assert out.shape == (tokens, n) and out.dtype == dtype
                        err = ((out.double() - ref).abs() / (ref.abs() + 1)).max().item()
                        assert err <= TOL[dtype], (isa, threads, fmt, n, k, tokens, err)
    finally:
        torch.set_num_threads(before)


def test_wide_panels_follow_torchs_own_16bit_gemm():
    """By default a 16-bit dtype is widened exactly where torch has no oneDNN GEMM for it."""
    assert cpu.wide_panels() == {d: not cpu._fast_gemm(d) for d in (torch.float16, torch.bfloat16)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_grouped_bitmap_layers_equal_separate_calls(isa, dtype):
    """bitmap_linear_group == the weights' bitmap_linear outputs side by side, bit for bit, on
    both backends (the kernel's one parallel region over all weights' strips, and the GEMM)."""
    gen = torch.Generator().manual_seed(hash((isa, str(dtype))) % 2**31)
    k = 300
    ws = [packed("bitmap", n, k, dtype, gen) for n in (33, 16, 70)]
    args = ([p.bitmap for p in ws], [p.values for p in ws], [p.tile_offsets for p in ws])
    with cpu.use_isa(isa):
        for tokens in (1, 5, 17, 40):
            x = torch.randn(tokens, k, generator=gen).to(dtype)
            for backend in ("cpu_sparse", "dense"):
                with dispatch.force_backend("bitmap", backend):
                    y = torch.ops.owl_sparse.bitmap_linear_group(x, *args, [33, 16, 70], k)
                    parts = [run_op(p, x, None) for p in ws]
                assert torch.equal(y, torch.cat(parts, dim=-1)), (isa, dtype, tokens, backend)


def test_grouped_bitmap_layers_refuse_bad_input():
    gen = torch.Generator().manual_seed(3)
    a, b = (packed("bitmap", n, 64, torch.bfloat16, gen) for n in (16, 20))
    x = torch.randn(2, 64).bfloat16()
    group = torch.ops.owl_sparse.bitmap_linear_group
    assert group(x[:0], [a.bitmap], [a.values], [a.tile_offsets], [16], 64).shape == (0, 16)
    with pytest.raises(ValueError, match="one entry per weight"):
        group(x, [a.bitmap, b.bitmap], [a.values], [a.tile_offsets, b.tile_offsets], [16, 20], 64)
    with pytest.raises(ValueError, match="last dim must be 64"):
        group(torch.randn(2, 32).bfloat16(), [a.bitmap], [a.values], [a.tile_offsets], [16], 64)
    with pytest.raises(ValueError, match="bitmap.bitmap must have shape"):
        group(
            x,
            [a.bitmap, a.bitmap],
            [a.values, b.values],
            [a.tile_offsets, b.tile_offsets],
            [16, 20],
            64,
        )


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_batched_and_non_contiguous_activations(fmt):
    gen = torch.Generator().manual_seed(1)
    p = packed(fmt, 40, 136, torch.bfloat16, gen)
    dense = p.to_dense().double()
    x = torch.randn(3, 4, 272, generator=gen).bfloat16()[..., ::2]  # strided last dim
    assert not x.is_contiguous()
    y = run_op(p, x, None)
    assert y.shape == (3, 4, 40)
    ref = x.double() @ dense.T
    assert ((y.double() - ref).abs() / (ref.abs() + 1)).max() <= TOL[torch.bfloat16]
    empty = run_op(p, torch.randn(0, 136).bfloat16(), None)
    assert empty.shape == (0, 40)


@pytest.mark.parametrize("isa", ISAS)
def test_unpack_is_exact(isa):
    gen = torch.Generator().manual_seed(2)
    with cpu.use_isa(isa):
        for dtype in DTYPES:
            for n, k in SHAPES:
                p = packed("bitmap", n, k, dtype, gen)
                got = torch.ops.owl_sparse_cpu.unpack_bitmap(
                    p.bitmap, p.values, p.tile_offsets, n, k
                )
                assert torch.equal(got, p.to_dense())
                if k % 4 == 0:
                    q = packed("2:4", n, k, dtype, gen)
                    assert torch.equal(
                        torch.ops.owl_sparse_cpu.unpack_sparse24(q.values, q.meta), q.to_dense()
                    )


# One token: whole strips, rows in a loop (accumulators in memory where the registers hold
# fewer than 16); 2: row by row; 6: word by word.
@pytest.mark.parametrize("tokens", [1, 2, 6])
@pytest.mark.parametrize("backend", ["cpu_sparse", "dense"])
def test_corrupt_bitmap_is_an_error_not_an_answer(backend, tokens):
    gen = torch.Generator().manual_seed(3)
    p = packed("bitmap", 40, 300, torch.bfloat16, gen)
    bits = p.bitmap.clone()
    bits[5, 2] = -1  # 32 more kept positions than tile_offsets account for
    offsets = p.tile_offsets.clone()
    offsets[1] = -7
    x = torch.randn(tokens, 300).bfloat16()
    for isa in ISAS:
        with cpu.use_isa(isa), dispatch.force_backend("bitmap", backend):
            with pytest.raises(ValueError, match="inconsistent"):
                torch.ops.owl_sparse.bitmap_linear(x, bits, p.values, p.tile_offsets, None, 40, 300)
            with pytest.raises(ValueError, match="inconsistent"):
                torch.ops.owl_sparse.bitmap_linear(x, p.bitmap, p.values, offsets, None, 40, 300)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)  # bf16 on AVX2: its own 2:4 decode
@pytest.mark.parametrize("tokens", [1, 6])  # one row at a time, and rows in groups
def test_corrupt_sparse24_is_an_error(tokens, dtype):
    gen = torch.Generator().manual_seed(4)
    q = packed("2:4", 8, 64, dtype, gen)
    x = torch.randn(tokens, 64).to(dtype)
    for isa in ISAS:
        for byte in (0x55, 0x45, 0x54):  # both groups, the first, the second repeat an index
            meta = q.meta.clone()
            meta[3, 1] = byte
            with cpu.use_isa(isa), pytest.raises(ValueError, match="inconsistent"):
                torch.ops.owl_sparse.sparse24_linear(x, q.values, meta, None)


def test_bad_tensors_are_named():
    gen = torch.Generator().manual_seed(5)
    p = packed("bitmap", 20, 136, torch.float32, gen)
    x = torch.randn(2, 136)
    with pytest.raises(ValueError, match="tile_offsets ends at"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values[:-1], p.tile_offsets, None, 20, 136
        )
    with pytest.raises(ValueError, match=r"x has shape \[2, 135\]"):
        torch.ops.owl_sparse.bitmap_linear(
            torch.randn(2, 135), p.bitmap, p.values, p.tile_offsets, None, 20, 136
        )
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.owl_sparse.bitmap_linear(
            x.double(), p.bitmap, p.values, p.tile_offsets, None, 20, 136
        )
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values, p.tile_offsets, torch.randn(3), 20, 136
        )


def test_isa_choice_and_errors():
    assert "portable" in ISAS and cpu.isa() in ISAS
    with pytest.raises(ValueError, match="unknown instruction set"):
        torch.ops.owl_sparse_cpu.set_isa("sse9")
    assert cpu.device_key() == f"cpu:{cpu.isa()}"


def test_dispatch_rules_table_and_forcing(tmp_path, monkeypatch):
    from owl_sparse import settings

    gen = torch.Generator().manual_seed(6)
    p = packed("bitmap", 64, 256, torch.bfloat16, gen)
    one, many = torch.randn(1, 256).bfloat16(), torch.randn(64, 256).bfloat16()
    assert dispatch.choose_backend("bitmap", one, p) == "cpu_sparse"
    assert dispatch.choose_backend("bitmap", many, p) == "dense"
    with dispatch.force_backend("bitmap", "dense"):
        assert dispatch.choose_backend_why("bitmap", one, p) == ("dense", "forced")
        assert cpu.choose("bitmap", torch.bfloat16, 64, 256, 1, p.sparsity)[0] == "dense"
    assert cpu.choose("bitmap", torch.bfloat16, 64, 256, 1, p.sparsity)[0] == "cpu_sparse"
    entry = dict(fmt="bitmap", dtype="bfloat16", N=64, K=256, tokens=1, sparsity=0.6)
    dispatch.save_table(tmp_path / "cpu.json", cpu.device_key(), [dict(entry, backend="dense")])
    monkeypatch.setenv("OWL_SPARSE_DISPATCH_TABLES", str(tmp_path))
    settings.reload()
    dispatch.reload_tables()
    try:
        cpu.push_table()
        backend, why = cpu.choose("bitmap", torch.bfloat16, 64, 256, 1, p.sparsity)
        assert backend == "dense" and "table" in why
        # a shape within 2x borrows the measurement; one further away does not
        assert cpu.choose("bitmap", torch.bfloat16, 128, 256, 1, 0.6)[0] == "dense"
        assert cpu.choose("bitmap", torch.bfloat16, 512, 256, 1, 0.6)[0] == "cpu_sparse"
        # the kernel calls follow the table (each call's choice is remembered until the
        # table changes: a stale answer here would run the kernel)
        assert ran_backend(p, one) == "dense"
    finally:
        monkeypatch.delenv("OWL_SPARSE_DISPATCH_TABLES")
        settings.reload()
        dispatch.reload_tables()
        cpu.push_table()
    assert ran_backend(p, one) == "cpu_sparse"
    with dispatch.force_backend("bitmap", "dense"):
        assert ran_backend(p, one) == "dense"
    assert ran_backend(p, one) == "cpu_sparse"


def ran_backend(p, x) -> str:
    """The one backend a call of the bitmap op on x ran (from the library's counters)."""
    before = cpu.backend_calls()
    torch.ops.owl_sparse.bitmap_linear(x, p.bitmap, p.values, p.tile_offsets, None, p.N, p.K)
    ran = [key for key, n in cpu.backend_calls().items() if n != before[key]]
    assert len(ran) == 1 and ran[0][0] == "bitmap", ran
    return ran[0][1]


def test_no_dense_copy_is_kept_on_the_cpu():
    from owl_sparse.nn import SparseLinear
    from owl_sparse.ops import dense as dense_cache

    dense_cache.clear_dense_cache()
    lin = torch.nn.Linear(256, 64).bfloat16()
    with torch.no_grad():
        lin.weight.mul_(torch.rand(64, 256) > 0.7)
    layer = SparseLinear.from_linear(lin)
    for tokens in (1, 64):
        layer(torch.randn(tokens, 256).bfloat16())
    assert dense_cache.dense_cache_bytes() == 0


@pytest.mark.parametrize("backend", ["cpu_sparse", "dense"])
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_opcheck_and_compile_on_the_kernels(fmt, backend):
    """torch.library.opcheck (schema, fake impl, autograd registration) and torch.compile
    fullgraph with the compiled kernels serving the CPU op, each backend forced."""
    gen = torch.Generator().manual_seed(7)
    p = packed(fmt, 33, 136, torch.float32, gen)
    x = torch.randn(5, 136, generator=gen)
    bias = torch.randn(33, generator=gen)
    with dispatch.force_backend(fmt, backend):
        if fmt == "bitmap":
            op = torch.ops.owl_sparse.bitmap_linear.default
            args = (x, p.bitmap, p.values, p.tile_offsets, bias, p.N, p.K)
        else:
            op = torch.ops.owl_sparse.sparse24_linear.default
            args = (x, p.values, p.meta, bias)
        torch.library.opcheck(op, args)
        compiled = torch.compile(lambda t: run_op(p, t, bias), fullgraph=True, backend="aot_eager")
        ref = x.double() @ p.to_dense().double().T + bias.double()
        assert ((compiled(x).double() - ref).abs() / (ref.abs() + 1)).max() <= TOL[torch.float32]
