"""The dispatch table: token buckets, registered backends, forcing and disabling, measured tables."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from factories import bitmap_weight

from owl_sparse import settings
from owl_sparse.errors import InputError
from owl_sparse.ops import cpu, dispatch, table


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
    if cpu.available():  # the compiled kernels' default rule, without a measured table
        assert name == "cpu_sparse" and "cpu" in why
        name, why = dispatch.choose_backend_why("bitmap", torch.randn(40, 136), p)
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
        assert table.has_measurements("FakeGPU", "bitmap")
        assert not table.has_measurements("FakeGPU", "2:4")
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
