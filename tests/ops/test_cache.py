"""DerivedCache: warm entries served to CUDA-graph capture, stale and inference tensors never."""

from __future__ import annotations

import torch


def test_derived_cache_serves_warm_entries_to_capture_but_never_inference_tensors():
    from owl_sparse.ops.cache import DerivedCache

    cache = DerivedCache("test")
    calls = []

    def compute(t):
        calls.append(1)
        return t.sum().item()

    t = torch.arange(6.0)
    assert cache.get("s", (t,), compute, may_compute=False) is None  # cold: capture gets None
    assert cache.get("s", (t,), compute) == 15.0
    assert cache.get("s", (t,), compute, may_compute=False) == 15.0  # warm: served
    assert len(calls) == 1 and len(cache) == 1
    t.add_(1)
    assert cache.get("s", (t,), compute, may_compute=False) is None  # stale: not served
    assert cache.get("s", (t,), compute) == 21.0
    with torch.inference_mode():
        u = torch.arange(6.0)
        assert cache.get("s", (u,), compute) == 15.0
        u.add_(1)
        assert cache.get("s", (u,), compute) == 21.0
        assert cache.get("s", (u,), compute, may_compute=False) is None
    assert len(calls) == 4 and len(cache) == 1  # the inference tensor was never stored
