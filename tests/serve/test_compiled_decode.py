"""The compiled (torch.compile) decode step on the CPU: token for token what the eager loop
makes, on dense and packed models, and a clear fallback when compiling fails."""

from __future__ import annotations

import logging

import pytest
from factories import pruned_model, tiny_model

from owl_sparse.serve import generate_ids, kv_cache

PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18]]


def _both(model, **kw):
    eager = generate_ids(model, PROMPTS, stop_at_eos=False, compile_step=False, **kw)
    compiled = generate_ids(model, PROMPTS, stop_at_eos=False, compile_step=True, **kw)
    return eager, compiled


@pytest.mark.parametrize("kind", ["dense", "bitmap", "2:4"])
def test_compiled_greedy_equals_eager_fp32(kind):
    model = tiny_model("llama", seed=4) if kind == "dense" else pruned_model("llama", kind)[0]
    eager, compiled = _both(model, max_new_tokens=12)
    assert compiled.compiled and compiled.compile_error is None
    assert not eager.compiled
    assert compiled.token_ids == eager.token_ids


def test_compile_failure_falls_back_to_eager_once(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(kv_cache, "_compiled", lambda model: broken)
    monkeypatch.setattr(kv_cache, "_compile_failed", None)
    model = tiny_model("llama", seed=5)
    with caplog.at_level(logging.WARNING, logger=kv_cache.log.name):
        eager, compiled = _both(model, max_new_tokens=6)
        again = generate_ids(model, PROMPTS, max_new_tokens=6, stop_at_eos=False, compile_step=True)
    assert compiled.token_ids == eager.token_ids == again.token_ids
    assert not compiled.compiled and compiled.compile_error == "RuntimeError: no compiler here"
    assert again.compile_error == compiled.compile_error  # not tried again
    assert sum("torch.compile of the decode step failed" in r.message for r in caplog.records) == 1


def test_default_comes_from_settings(monkeypatch):
    from owl_sparse import settings

    model = tiny_model("llama", seed=6)
    try:
        monkeypatch.setenv("OWL_SPARSE_COMPILE_DECODE", "1")
        settings.reload()
        assert generate_ids(model, [[1, 2, 3]], max_new_tokens=3).compiled
        monkeypatch.setenv("OWL_SPARSE_COMPILE_DECODE", "0")
        settings.reload()
        assert not generate_ids(model, [[1, 2, 3]], max_new_tokens=3).compiled
    finally:
        monkeypatch.undo()
        settings.reload()


def test_one_compiled_step_per_model_and_module_types():
    """Each model (and each set of its module types) compiles its own copy of the step, so
    one model's graphs never sit in another's guard checks or recompile budget."""
    from owl_sparse.nn.native import native_linears

    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    step_a = kv_cache._compiled(a)
    assert kv_cache._compiled(a) is step_a
    assert kv_cache._compiled(b) is not step_a
    with native_linears(a):
        swapped = kv_cache._compiled(a)
    assert swapped is not step_a and kv_cache._compiled(a) is step_a
    codes = {f._torchdynamo_orig_callable.__code__ for f in (step_a, swapped)}
    assert len(codes) == 2  # separate code objects: separate dynamo caches
