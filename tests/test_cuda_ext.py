"""owl_sparse.cuda_ext without a GPU: import, registration, unavailability, layout cache."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from owl_sparse import cuda_ext, dispatch
from owl_sparse.formats.mma_layout import sparse24_to_mma
from owl_sparse.formats.sparse24 import Sparse24Weight


def test_backends_are_registered():
    assert "cuda_sp" in dispatch.backends("2:4")
    assert "cuda_mma" in dispatch.backends("bitmap")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_without_cuda_is_reported_once(caplog, monkeypatch):
    monkeypatch.setattr(
        cuda_ext, "_state", {"tried": False, "ok": False, "how": None, "error": None}
    )
    with caplog.at_level(logging.INFO, logger="owl_sparse.cuda_ext"):
        assert cuda_ext.available() is False
        assert cuda_ext.available() is False
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert cuda_ext.status()["error"]
    assert "cuda_sp" not in dispatch.backends("2:4", only_available=True)
    w = torch.randn(16, 128).half()
    p = Sparse24Weight.from_dense(w, w.abs() > 1e9)
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda_ext.sparse24_mm(torch.randn(2, 128).half(), p)


def test_mma_layout_cache_reuses_and_invalidates():
    w = torch.randn(32, 256).half()
    mask = torch.zeros(32, 64, 4, dtype=torch.bool)
    mask[..., :2] = True
    p = Sparse24Weight.from_dense(w, mask.view(32, 256))
    vm, mm = cuda_ext.mma_tensors(p)
    ref_vm, ref_mm = sparse24_to_mma(p.values, p.meta)
    assert torch.equal(vm, ref_vm) and torch.equal(mm, ref_mm)
    again = cuda_ext.mma_tensors(p)
    assert again[0] is vm and again[1] is mm
    p.values.mul_(2)  # in-place change: version bump rebuilds the layout
    vm2, _ = cuda_ext.mma_tensors(p)
    assert vm2 is not vm and torch.equal(vm2, sparse24_to_mma(p.values, p.meta)[0])
    n_before = len(cuda_ext._MMA_CACHE)
    del p, vm, mm, again, vm2
    gc.collect()
    assert len(cuda_ext._MMA_CACHE) < n_before  # freed weights drop their entry
