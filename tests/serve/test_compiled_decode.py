"""The compiled (torch.compile) decode step on the CPU: token for token what the eager loop
makes, on dense and packed models, and a clear fallback when compiling fails."""

from __future__ import annotations

import logging

import pytest
import torch
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


def test_one_compiled_step_per_model_and_model_state():
    """Each model (and each state of it: module types, hooks, tensor shapes...) compiles its
    own copy of the step, so one model's graphs never sit in another's guard checks or
    recompile budget."""
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


def test_every_compiled_step_skips_the_module_guards(monkeypatch):
    """torch.compile pops ``guard_filter_fn`` out of the options it is given: with one shared
    dict, every model compiled after the first kept all of its module guards (a packed
    SmolLM2-135M compiled after the dense one decoded ~25% slower)."""
    seen, real = [], torch.compile

    def spy(fn, **kw):
        seen.append(dict(kw["options"]))
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    for seed in (11, 12):
        kv_cache._compiled(tiny_model("llama", seed=seed))
    assert len(seen) == 2
    assert all(s.get("guard_filter_fn") is kv_cache._skip_module_guards for s in seen)
    assert kv_cache.COMPILE_OPTIONS["guard_filter_fn"] is kv_cache._skip_module_guards


def test_model_state_sees_what_the_skipped_guards_would():
    model = tiny_model("llama", seed=3)
    base = kv_cache.model_state(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # values: the step reads them anew, same state
    assert kv_cache.model_state(model) == base
    changes = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o)
    changes.append(kv_cache.model_state(model))
    handle.remove()
    assert kv_cache.model_state(model) == base
    model.train()
    changes.append(kv_cache.model_state(model))
    model.eval()
    norm = model.model.norm
    original = norm.weight
    norm.weight = torch.nn.Parameter(original.detach().clone()[None])  # shape
    changes.append(kv_cache.model_state(model))
    norm.weight = torch.nn.Parameter(original.detach().double())  # dtype
    changes.append(kv_cache.model_state(model))
    norm.weight = torch.nn.Parameter(original.detach().repeat(2)[::2])  # stride
    changes.append(kv_cache.model_state(model))
    norm.weight = original
    assert kv_cache.model_state(model) == base
    model.config.rms_norm_eps = 0.5
    changes.append(kv_cache.model_state(model))
    assert len(set(changes)) == len(changes) and base not in changes


def test_compiled_step_follows_the_model_between_calls():
    """Guards on the model's modules are skipped (the step checks `model_state` once per
    call instead): changed values and an added hook must show in the compiled tokens exactly
    as in the eager ones."""
    model = tiny_model("llama", seed=7)
    eager, compiled = _both(model, max_new_tokens=8)
    assert compiled.token_ids == eager.token_ids
    with torch.no_grad():  # new values, same state
        for p in model.model.layers[0].parameters():
            p.mul_(-1.5)
    eager2, compiled2 = _both(model, max_new_tokens=8)
    assert compiled2.token_ids == eager2.token_ids != eager.token_ids
    bias = torch.zeros(model.config.vocab_size)
    bias[17] = 1e4  # a hook that forces token 17
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias.to(o.dtype))
    eager3, compiled3 = _both(model, max_new_tokens=8)  # same shapes: no recompile for them
    assert compiled3.token_ids == eager3.token_ids == [[17] * 8] * len(PROMPTS)


@pytest.mark.parametrize("compile_step", [False, True])
def test_cpu_decode_steps_use_eager_attention(monkeypatch, compile_step):
    """Prefill runs the model's SDPA, the CPU decode steps transformers' eager attention
    (same tokens: fp64), restored afterwards; OWL_SPARSE_CPU_DECODE_EAGER_ATTENTION=0 keeps
    SDPA throughout."""
    from owl_sparse import settings

    model = tiny_model("llama", seed=8).double()
    model.set_attn_implementation("sdpa")
    seen = []
    model.model.layers[0].register_forward_hook(
        lambda m, i, o: seen.append(model.config._attn_implementation)
    )
    run = dict(max_new_tokens=5, stop_at_eos=False, compile_step=compile_step)
    switched = generate_ids(model, PROMPTS, **run)
    assert model.config._attn_implementation == "sdpa"
    if not compile_step:  # a compiled step runs no Python hooks per step
        assert seen == ["sdpa"] + ["eager"] * 4
    seen.clear()
    try:
        monkeypatch.setenv("OWL_SPARSE_CPU_DECODE_EAGER_ATTENTION", "0")
        settings.reload()
        kept = generate_ids(model, PROMPTS, **run)
    finally:
        monkeypatch.undo()
        settings.reload()
    if not compile_step:
        assert seen == ["sdpa"] * 5
    assert kept.token_ids == switched.token_ids


def test_decode_attention_restored_after_an_error():
    model = tiny_model("llama", seed=9)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="boom"):
        with kv_cache.decode_attention(model, "cpu"):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_later_steps_pick_the_right_graph_among_several(monkeypatch):
    """A DecodeStep's second step skips all guards but those telling the step function's
    graphs apart, and steps from the third on call the graph the first two ran directly:
    with graphs for two batch sizes and two cache lengths compiled, calls that alternate
    between them still make the eager loop's tokens, the second step ran under the
    skipping stance and every later one directly."""
    entered, direct = [], []
    real = kv_cache._later_steps
    monkeypatch.setattr(kv_cache, "_later_steps", lambda: entered.append(1) or real())
    forward = kv_cache.DecodeStep._compiled_forward

    def counted(self):
        direct.append(self.direct is not None)
        return forward(self)

    monkeypatch.setattr(kv_cache.DecodeStep, "_compiled_forward", counted)
    model = tiny_model("llama", seed=9)
    calls = [
        (PROMPTS, 5),
        ([[4, 5, 6]], 9),
        (PROMPTS, 5),
        ([[4, 5, 6]], 30),  # another cache length
        ([[4, 5, 6]], 9),
        (PROMPTS, 30),
    ]
    for prompts, new in calls:
        entered.clear()
        direct.clear()
        eager = generate_ids(
            model, prompts, max_new_tokens=new, stop_at_eos=False, compile_step=False
        )
        compiled = generate_ids(
            model, prompts, max_new_tokens=new, stop_at_eos=False, compile_step=True
        )
        assert compiled.compiled and compiled.token_ids == eager.token_ids, (len(prompts), new)
        # steps 1 .. new-1: step 1 runs every guard, step 2 only the differing ones
        assert len(entered) == 1 and direct == [False, False] + [True] * (new - 3)


def test_no_direct_calls_when_a_step_runs_more_than_one_graph(monkeypatch):
    """A graph break (here a hook on the LM head) splits the step into two graphs with
    Python in between: every step keeps going through dynamo, with all its guards, and the
    tokens stay the eager ones."""
    model = tiny_model("llama", seed=10)
    model.lm_head.register_forward_pre_hook(lambda mod, args: torch._dynamo.graph_break())
    direct = []
    forward = kv_cache.DecodeStep._compiled_forward

    def counted(self):
        direct.append(self.direct is not None)
        return forward(self)

    monkeypatch.setattr(kv_cache.DecodeStep, "_compiled_forward", counted)
    run = dict(max_new_tokens=6, stop_at_eos=False)
    eager = generate_ids(model, PROMPTS, compile_step=False, **run)
    compiled = generate_ids(model, PROMPTS, compile_step=True, **run)
    assert compiled.compiled and compiled.token_ids == eager.token_ids
    assert direct == [False] * 5


def _call(graph, inputs, outputs):
    return kv_cache._GraphCall(graph, tuple(inputs), tuple(outputs))


def test_direct_calls_need_the_same_graph_inputs_and_output_twice():
    """`DecodeStep._note` turns direct calls on only when the first two steps ran one and
    the same graph, on the very same input tensors, and returned the same output of it."""

    def graph(*args):
        return args

    a, b, c, logits = (torch.zeros(1) for _ in range(4))
    cases = {
        "same": ([_call(graph, [a, b], [c, logits])], [_call(graph, [a, b], [c, logits])], 1),
        "other inputs": (
            [_call(graph, [a, b], [c, logits])],
            [_call(graph, [a, c], [c, logits])],
            None,
        ),
        "other graph": (
            [_call(graph, [a, b], [logits])],
            [_call(lambda *x: x, [a, b], [logits])],
            None,
        ),
        "two graphs": ([_call(graph, [a], [a]), _call(graph, [b], [logits])], [], None),
        "not an output": ([_call(graph, [a], [c])], [_call(graph, [a], [c])], None),
    }
    for name, (first, second, want) in cases.items():
        step = object.__new__(kv_cache.DecodeStep)
        step.direct, step._probe, step._recorded = None, None, 0
        step._note(first, logits)
        step._note(second, logits)
        got = None if step.direct is None else step.direct[1]
        assert got == want, name
        if want is not None:
            assert step.direct[0].inputs == (a, b) and step.direct[0].outputs == ()


def test_a_compile_failure_after_part_of_a_step_ran_is_an_error(monkeypatch):
    """With a graph break, the step's first graph runs (writing the cache slots of every
    layer) before the second (the LM head) compiles: when that compile fails, rerunning the
    step eagerly would write those slots twice, so generate stops with a clear error."""
    monkeypatch.setattr(kv_cache, "_compile_failed", None)
    real = kv_cache._recording_inductor
    compiled = []

    def second_fails(gm, example_inputs, **kw):
        compiled.append(gm)
        if len(compiled) == 2:
            raise RuntimeError("no second graph today")
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(kv_cache, "_recording_inductor", second_fails)
    model = tiny_model("llama", seed=11)
    model.lm_head.register_forward_pre_hook(lambda mod, args: torch._dynamo.graph_break())
    with pytest.raises(RuntimeError, match=r"failed after 1 of its graphs ran .*compile_step"):
        generate_ids(model, PROMPTS, max_new_tokens=4, stop_at_eos=False, compile_step=True)
