"""The custom ops (opcheck, reference semantics, errors, autograd) and the dispatch table."""

from __future__ import annotations

import gc
import json
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from owl_sparse import ops, settings
from owl_sparse.errors import InputError
from owl_sparse.formats import BitmapWeight, Sparse24Weight
from owl_sparse.ops import dense as dense_cache
from owl_sparse.ops import dispatch


def bitmap_weight(n=20, k=136, sparsity=0.6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    m = torch.rand(n, k, generator=g) >= sparsity
    return w * m, BitmapWeight.from_dense(w, m)


def sparse24_weight(n=20, k=136, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    m.scatter_(-1, torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2], True)
    m = m.view(n, k)
    return w * m, Sparse24Weight.from_dense(w, m)


def op_args(packed, x, bias):
    if isinstance(packed, BitmapWeight):
        op = torch.ops.owl_sparse.bitmap_linear.default
        return op, (x, packed.bitmap, packed.values, packed.tile_offsets, bias, packed.N, packed.K)
    return torch.ops.owl_sparse.sparse24_linear.default, (x, packed.values, packed.meta, bias)


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
@pytest.mark.parametrize("x_shape", [(136,), (3, 136), (2, 5, 136)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(make, x_shape, with_bias, grad):
    _, packed = make()
    x = torch.randn(*x_shape, requires_grad=grad)
    bias = torch.randn(packed.N, requires_grad=grad) if with_bias else None
    op, args = op_args(packed, x, bias)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_dense_matmul_in_fp32(make, dtype):
    dense, packed = make(dtype=dtype)
    x = torch.randn(4, 7, packed.K).to(dtype)
    b = torch.randn(packed.N).to(dtype)
    y = ops.linear(x, packed, b)
    ref = (x.float() @ dense.float().t() + b.float()).to(dtype)
    assert y.dtype == dtype and y.shape == (4, 7, packed.N)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
def test_zero_tokens_and_autograd(make):
    dense, packed = make()
    assert ops.linear(torch.randn(0, packed.K), packed).shape == (0, packed.N)
    x = torch.randn(3, packed.K, requires_grad=True)
    b = torch.randn(packed.N, requires_grad=True)
    (ops.linear(x, packed, b) ** 2).sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (torch.nn.functional.linear(x2, dense, b2) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
def test_bad_activation_errors(make):
    _, packed = make()
    with pytest.raises(InputError, match=r"shape \[3, 135\].*last dim must be 136"):
        ops.linear(torch.randn(3, 135), packed)
    with pytest.raises(InputError, match="dtype"):
        ops.linear(torch.randn(3, 136, dtype=torch.float64), packed)
    with pytest.raises(InputError, match=r"bias must be \[20\]"):
        ops.linear(torch.randn(3, 136), packed, torch.randn(21))
    with pytest.raises(InputError, match="expected BitmapWeight"):
        ops.linear(torch.randn(3, 136), torch.randn(20, 136))


def test_op_rejects_malformed_packed_tensors():
    _, p = bitmap_weight()
    x = torch.randn(2, 136)
    with pytest.raises(InputError, match="bitmap.bitmap"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap[:, :2].contiguous(), p.values, p.tile_offsets, None, 20, 136
        )
    with pytest.raises(InputError, match="int32"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values, p.tile_offsets.long(), None, 20, 136
        )
    with pytest.raises(InputError, match="contiguous"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values[::2], p.tile_offsets, None, 20, 136
        )
    _, q = sparse24_weight()
    with pytest.raises(InputError, match="meta"):
        torch.ops.owl_sparse.sparse24_linear(x, q.values, q.meta[:, :3].contiguous(), None)


def test_fake_impl_shapes_and_checks():
    _, p = bitmap_weight()
    _, q = sparse24_weight()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 136))
        pb = [mode.from_tensor(t) for t in (p.bitmap, p.values, p.tile_offsets)]
        y = torch.ops.owl_sparse.bitmap_linear(x, *pb, None, 20, 136)
        assert y.shape == (2, 3, 20)
        y24 = torch.ops.owl_sparse.sparse24_linear(
            x, mode.from_tensor(q.values), mode.from_tensor(q.meta), None
        )
        assert y24.shape == (2, 3, 20)
        with pytest.raises(RuntimeError, match="needs last dim 136"):
            torch.ops.owl_sparse.bitmap_linear(
                mode.from_tensor(torch.randn(2, 135)), *pb, None, 20, 136
            )


def test_compile_fullgraph_cpu():
    dense, packed = bitmap_weight()
    _, q = sparse24_weight()

    def f(x):
        return ops.linear(x, packed) + ops.linear(x, q)

    x = torch.randn(5, 136)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


# ---------------------------------------------------------------------------- dispatch
def test_token_bucket():
    assert [dispatch.token_bucket(t) for t in (0, 1, 2, 3, 5, 16, 17, 4096)] == [
        1,
        1,
        2,
        4,
        8,
        16,
        32,
        4096,
    ]


def test_backends_registered_and_cpu_choice():
    assert {"dense", "triton_gemv", "triton_mm"} <= set(dispatch.backends("bitmap"))
    assert {"dense", "triton_gemv"} <= set(dispatch.backends("2:4"))
    _, p = bitmap_weight()
    name, why = dispatch.choose_backend_why("bitmap", torch.randn(1, 136), p)
    assert name == "dense" and "cpu" in why


def test_force_backend_and_env(monkeypatch):
    _, p = bitmap_weight()
    x = torch.randn(2, 136)
    with dispatch.force_backend("bitmap", "dense"):
        assert dispatch.choose_backend_why("bitmap", x, p) == ("dense", "forced")
    with pytest.raises(InputError, match="no backend 'nope'"):
        with dispatch.force_backend("bitmap", "nope"):
            pass
    monkeypatch.setenv("OWL_SPARSE_BACKEND", "bitmap=dense,2:4=dense")
    settings.reload()
    assert dispatch.choose_backend("bitmap", x, p) == "dense"
    monkeypatch.setenv("OWL_SPARSE_BACKEND", "bitmap")
    settings.reload()
    with pytest.raises(InputError, match="OWL_SPARSE_BACKEND"):
        dispatch.choose_backend("bitmap", x, p)


def test_disabled_backends_are_unavailable(monkeypatch, caplog):
    _, p = bitmap_weight()
    x = torch.randn(2, 136)
    dispatch.register_backend("bitmap", "test_off", lambda x2d, packed, bias: None, lambda: True)
    try:
        assert "test_off" in dispatch.backends("bitmap", only_available=True)
        monkeypatch.setenv("OWL_SPARSE_DISABLE", " test_off , dense")
        settings.reload()
        assert dispatch.disabled_backends() == {"test_off"}  # dense cannot be switched off
        monkeypatch.setenv("OWL_SPARSE_DISABLE", "test_off,cuda_typo")
        settings.reload()
        with caplog.at_level(logging.WARNING, logger="owl_sparse.ops.dispatch"):
            assert dispatch.disabled_backends() == {"test_off", "cuda_typo"}
        assert "cuda_typo" in caplog.text
        assert "test_off" not in dispatch.backends("bitmap", only_available=True)
        assert "dense" in dispatch.backends("bitmap", only_available=True)
        with pytest.raises(InputError, match="not registered or not available"):
            with dispatch.force_backend("bitmap", "test_off"):
                dispatch.choose_backend("bitmap", x, p)
    finally:
        dispatch._BACKENDS["bitmap"].pop("test_off", None)


def test_register_backend_is_used(monkeypatch):
    calls = []

    def fake(x2d, packed, bias):
        calls.append(x2d.shape)
        return torch.zeros(x2d.shape[0], packed.N)

    dispatch.register_backend("bitmap", "test_fake", fake, lambda: True)
    try:
        _, p = bitmap_weight()
        with dispatch.force_backend("bitmap", "test_fake"):
            y = dispatch.run("bitmap", torch.randn(3, 136), p, None)
        assert calls == [(3, 136)] and y.shape == (3, 20)
        with pytest.raises(InputError, match="unknown format"):
            dispatch.register_backend("csr", "x", fake)
    finally:
        dispatch._BACKENDS["bitmap"].pop("test_fake", None)


def test_table_lookup(tmp_path, monkeypatch):
    entries = [
        dict(
            fmt="bitmap",
            dtype="float16",
            N=4096,
            K=4096,
            tokens=1,
            sparsity=0.5,
            backend="dense",
            why="1.0x",
        ),
        dict(
            fmt="bitmap",
            dtype="float16",
            N=4096,
            K=4096,
            tokens=1,
            sparsity=0.7,
            backend="triton_gemv",
            why="2x",
        ),
    ]
    dispatch.save_table(tmp_path / "h100.json", "FakeGPU", entries)
    monkeypatch.setenv("OWL_SPARSE_DISPATCH_TABLES", str(tmp_path))
    settings.reload()
    dispatch.reload_tables()
    try:
        look = dispatch.table_lookup
        assert look("FakeGPU", "bitmap", torch.float16, 4096, 4096, 1, 0.72)[0] == "triton_gemv"
        assert look("FakeGPU", "bitmap", torch.float16, 4096, 4096, 1, 0.52)[0] == "dense"
        assert look("FakeGPU", "bitmap", torch.float16, 4096, 4096, 2, 0.7) is None  # other bucket
        assert look("OtherGPU", "bitmap", torch.float16, 4096, 4096, 1, 0.7) is None
        # unmeasured shapes borrow the nearest measured one within 2x in N and K
        name, why = look("FakeGPU", "bitmap", torch.float16, 5120, 4096, 1, 0.7)
        assert name == "triton_gemv" and "nearest measured shape to 5120x4096" in why
        assert look("FakeGPU", "bitmap", torch.float16, 2048, 4096, 1, 0.5)[0] == "dense"
        assert look("FakeGPU", "bitmap", torch.float16, 2048, 2048, 1, 0.7) is None  # 4x away
        assert look("FakeGPU", "bitmap", torch.float16, 576, 1536, 1, 0.7) is None
        assert dispatch._has_measurements("FakeGPU", "bitmap")
        assert not dispatch._has_measurements("FakeGPU", "2:4")
        assert json.loads((tmp_path / "h100.json").read_text())["gpu"] == "FakeGPU"
    finally:
        monkeypatch.delenv("OWL_SPARSE_DISPATCH_TABLES")
        dispatch.reload_tables()
    with pytest.raises(InputError, match="power-of-two"):
        dispatch.save_table(tmp_path / "bad.json", "g", [dict(entries[0], tokens=3)])
    with pytest.raises(InputError, match="'backend'"):
        dispatch.save_table(
            tmp_path / "bad.json", "g", [{k: v for k, v in entries[0].items() if k != "backend"}]
        )


def test_dense_cache_reuses_invalidates_and_frees():
    dense_cache.clear_dense_cache()
    dense, p = bitmap_weight()
    a = dense_cache.dense_weight(p)
    assert torch.equal(a, dense)
    assert dense_cache.dense_weight(BitmapWeight(p.bitmap, p.values, p.tile_offsets, p.N, p.K)) is a
    with torch.no_grad():
        p.values.mul_(2)  # in-place change bumps the version: recomputed
    b = dense_cache.dense_weight(p)
    assert b is not a and torch.equal(b, dense * 2)
    before = dense_cache.dense_cache_bytes()
    assert before > 0
    del p, a, b
    gc.collect()
    assert dense_cache.dense_cache_bytes() < before
    dense_cache.clear_dense_cache()
    assert dense_cache.dense_cache_bytes() == 0


def test_dense_cache_limit(monkeypatch):
    dense_cache.clear_dense_cache()
    monkeypatch.setenv("OWL_SPARSE_DENSE_CACHE_MB", "0")
    settings.reload()
    dense, p = bitmap_weight()
    assert torch.equal(dense_cache.dense_weight(p), dense)
    assert dense_cache.dense_cache_bytes() == 0
