"""owl_sparse.ops.cuda without a GPU: import, registration, unavailability, layout cache."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from owl_sparse.errors import InputError
from owl_sparse.formats.bitmap import BitmapWeight
from owl_sparse.formats.mma_layout import sparse24_to_mma
from owl_sparse.formats.sparse24 import Sparse24Weight
from owl_sparse.ops import cuda as cuda_ext
from owl_sparse.ops import dispatch


def test_backends_are_registered():
    assert "cuda_sp" in dispatch.backends("2:4")
    assert "cuda_mma" in dispatch.backends("bitmap")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_without_cuda_is_reported_once(caplog, monkeypatch):
    monkeypatch.setattr(
        cuda_ext, "_state", {"tried": False, "ok": False, "how": None, "error": None}
    )
    with caplog.at_level(logging.INFO, logger="owl_sparse.ops.cuda"):
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
    n_before = len(cuda_ext._DERIVED)
    del p, vm, mm, again, vm2
    gc.collect()
    assert len(cuda_ext._DERIVED) < n_before  # freed weights drop their entry


def test_mma_layout_refuses_invalid_metadata():
    """Index pairs the sparse tensor cores leave undefined never reach them."""
    w = torch.randn(16, 128).half()
    mask = torch.zeros(16, 32, 4, dtype=torch.bool)
    mask[..., 1:3] = True
    p = Sparse24Weight.from_dense(w, mask.view(16, 128))
    p.meta[3, 5] = (p.meta[3, 5] & 0xF0) | 0b0101  # group 10 of row 3: indices (1, 1)
    with pytest.raises(InputError, match="row 3, group 10"):
        cuda_ext.mma_tensors(p)


def test_max_tile_values_is_the_largest_tile_and_follows_changes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 300, generator=g).half()
    mask = torch.rand(40, 300, generator=g) < 0.3
    mask[0:16, 0:128] = True  # one full tile: 2048 values
    p = BitmapWeight.from_dense(w, mask)
    assert cuda_ext.max_tile_values(p) == 2048
    mask[0:16, 0:128] = False
    q = BitmapWeight.from_dense(w, mask)
    tiles = torch.nn.functional.pad(mask, (0, 84, 0, 8)).view(3, 16, 3, 128).sum((1, 3))
    assert cuda_ext.max_tile_values(q) == int(tiles.max())
    q.tile_offsets.zero_()  # in place: recomputed, not served stale
    assert cuda_ext.max_tile_values(q) == 0


def test_mma_layout_of_inference_tensors_follows_changes():
    mask = torch.zeros(32, 64, 4, dtype=torch.bool)
    mask[..., :2] = True
    with torch.inference_mode():
        p = Sparse24Weight.from_dense(torch.randn(32, 256).half(), mask.view(32, 256))
        vm, _ = cuda_ext.mma_tensors(p)
        p.values.mul_(2)
        vm2, _ = cuda_ext.mma_tensors(p)
        assert torch.equal(vm2, sparse24_to_mma(p.values, p.meta)[0])
        assert torch.equal(vm2, 2 * vm)
