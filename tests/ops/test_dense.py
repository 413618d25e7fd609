"""The dense-copy cache: reused, invalidated by in-place changes (inference mode included),
keyed on the shape, freed, limited."""

from __future__ import annotations

import gc

import pytest
import torch
from factories import bitmap_weight
from factories import small_pruned_linear as pruned_linear

from owl_sparse import settings
from owl_sparse.formats import BitmapWeight, Sparse24Weight
from owl_sparse.nn import SparseLinear
from owl_sparse.ops import dense as dense_cache


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


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_inplace_change_under_inference_mode_is_seen(fmt):
    lin = pruned_linear(pattern="2:4" if fmt == "2:4" else "random")
    x = torch.randn(3, 64)
    with torch.inference_mode():
        sl = SparseLinear.from_linear(lin, fmt)
        y0 = sl(x) - sl.bias
        sl.values.mul_(2)
        y1 = sl(x) - sl.bias
    torch.testing.assert_close(y1, 2 * y0)


def test_dense_weight_of_inference_tensors_is_never_stale():
    w = torch.randn(20, 40)
    with torch.inference_mode():
        p = BitmapWeight.from_dense(w, torch.rand(20, 40) > 0.5)
        first = dense_cache.dense_weight(p)
        p.values.mul_(3)
        torch.testing.assert_close(dense_cache.dense_weight(p), 3 * first)
        q = Sparse24Weight.from_dense(torch.randn(8, 16), torch.arange(16).repeat(8, 1) % 4 < 2)
        before = dense_cache.dense_weight(q)
        q.values.neg_()
        torch.testing.assert_close(dense_cache.dense_weight(q), -before)


def test_normal_tensors_changed_inside_inference_mode_are_seen():
    p = BitmapWeight.from_dense(torch.randn(20, 40))
    first = dense_cache.dense_weight(p)
    with torch.inference_mode():
        p.values.mul_(2)  # a normal tensor's version counter still moves here
        torch.testing.assert_close(dense_cache.dense_weight(p), 2 * first)


def test_dense_cache_key_includes_the_weight_shape():
    """The same packed tensors read as a [39, K] weight are not the cached [40, K] one."""
    w = torch.randn(40, 64)
    w[39] = 0  # row 39 empty, so the buffers are also a valid [39, 64] weight
    p = BitmapWeight.from_dense(w)
    assert dense_cache.dense_weight(p).shape == (40, 64)
    q = BitmapWeight(p.bitmap, p.values, p.tile_offsets, 39, 64)
    assert dense_cache.dense_weight(q).shape == (39, 64)
