"""Generation: static-cache generation against a naive no-cache loop, batching, EOS,
sampling seeds, tokenizers, sparsified models, CUDA graphs; bad settings and prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import _word_tokenizer, tiny_model

from owl_sparse.errors import InputError
from owl_sparse.models import find_decoder_blocks
from owl_sparse.serve import generate, generate_ids
from owl_sparse.serve.kv_cache import (
    kv_cache_bytes,
)

PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18]]


@torch.no_grad()
def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    """The slowest correct generator: full forward over the whole sequence per token."""
    device = model.get_input_embeddings().weight.device
    ids = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([ids], device=device), use_cache=False).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt", "gpt2"])
def test_greedy_batched_equals_naive_loop(family):
    model = tiny_model(family).double()
    result = generate_ids(model, PROMPTS, max_new_tokens=10, stop_at_eos=False)
    assert result.token_ids == [naive_greedy(model, p, 10) for p in PROMPTS]


@torch.no_grad()
def naive_penalized(model, ids: list[int], n: int, penalty: float) -> list[int]:
    """Full forward per token, transformers' repetition penalty written out in fp64."""
    ids = list(ids)
    for _ in range(n):
        scores = model(torch.tensor([ids]), use_cache=False).logits[0, -1].double()
        for t in set(ids):
            scores[t] = scores[t] * penalty if scores[t] < 0 else scores[t] / penalty
        ids.append(int(scores.argmax()))
    return ids[-n:]


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_equals_naive_loop(penalty):
    """Batched and left-padded (the padding is not a seen token), compiled step, prompt
    tokens and generated ones both penalized; 0.7 favours repeats."""
    model = tiny_model("llama", seed=11).double()
    result = generate_ids(
        model, PROMPTS, max_new_tokens=10, stop_at_eos=False, repetition_penalty=penalty
    )
    plain = generate_ids(model, PROMPTS, max_new_tokens=10, stop_at_eos=False)
    assert result.token_ids == [naive_penalized(model, p, 10, penalty) for p in PROMPTS]
    assert result.token_ids != plain.token_ids


def test_repetition_penalty_matches_transformers_generate():
    model = tiny_model("llama", seed=12)
    prompt = [7, 3, 9, 3, 11, 5]
    ours = generate_ids(
        model, [prompt], max_new_tokens=12, stop_at_eos=False, repetition_penalty=1.3
    ).token_ids[0]
    ref = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.3,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert ours == ref


def test_batched_equals_unbatched_and_chunked(llama64):
    together = generate_ids(llama64, PROMPTS, max_new_tokens=8, stop_at_eos=False)
    alone = [generate_ids(llama64, [p], 8, stop_at_eos=False).token_ids[0] for p in PROMPTS]
    chunked = generate_ids(llama64, PROMPTS, 8, stop_at_eos=False, batch_size=2)
    assert together.token_ids == alone == chunked.token_ids
    assert together.prompt_lengths == [5, 2, 9]


def test_float32_matches_naive_loop():
    model = tiny_model("llama", seed=3)
    prompt = [[1, 2, 3, 4, 5, 6, 7]]
    result = generate_ids(model, prompt, max_new_tokens=12, stop_at_eos=False)
    assert result.token_ids[0] == naive_greedy(model, prompt[0], 12)


def test_eos_stops_only_its_row(llama64):
    free = generate_ids(llama64, PROMPTS, max_new_tokens=10, stop_at_eos=False).token_ids
    eos = free[0][3]
    first = free[0].index(eos)  # the first occurrence ends row 0
    stopped = generate_ids(llama64, PROMPTS, max_new_tokens=10, eos_token_id=eos).token_ids
    assert stopped[0] == free[0][: first + 1]
    for row_free, row in zip(free[1:], stopped[1:]):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row == row_free[:cut]


def test_all_rows_finished_stops_the_loop(llama64):
    free = generate_ids(llama64, [PROMPTS[0]], max_new_tokens=10, stop_at_eos=False)
    eos = free.token_ids[0][1]
    result = generate_ids(llama64, [PROMPTS[0]], max_new_tokens=10, eos_token_id=eos)
    assert result.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(eos) + 1]
    assert len(result.step_s) == len(result.token_ids[0]) - 1  # no step after the stop


def test_timings_and_counts(llama64):
    result = generate_ids(llama64, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    assert result.prefill_s > 0 and len(result.step_s) == 5
    assert result.timed_steps == 4  # the first decode step is the warm-up
    expected = 3 * 4 / sum(result.step_s[1:])
    assert result.decode_tokens_per_s == pytest.approx(expected)
    assert result.cuda_graph is False  # the CPU runs eagerly
    assert result.memory["kv_cache_bytes"] == kv_cache_bytes(llama64, 3, 16, torch.float64)


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama64):
    greedy = generate_ids(llama64, PROMPTS, 8, stop_at_eos=False).token_ids
    a = generate_ids(llama64, PROMPTS, 8, temperature=5.0, seed=1, stop_at_eos=False)
    b = generate_ids(llama64, PROMPTS, 8, temperature=5.0, seed=1, stop_at_eos=False)
    c = generate_ids(llama64, PROMPTS, 8, temperature=5.0, seed=2, stop_at_eos=False)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    k1 = generate_ids(llama64, PROMPTS, 8, temperature=5.0, top_k=1, stop_at_eos=False)
    p0 = generate_ids(llama64, PROMPTS, 8, temperature=5.0, top_p=1e-9, stop_at_eos=False)
    assert k1.token_ids == greedy and p0.token_ids == greedy


def test_generate_text_with_tokenizer(llama64):
    tok = _word_tokenizer()
    result = generate(llama64, tok, ["w5 w6 w7", "w9"], max_new_tokens=5, stop_at_eos=False)
    expected = naive_greedy(llama64, [5, 6, 7], 5)
    assert result.token_ids[0] == expected
    assert result.texts[0] == tok.decode(expected, skip_special_tokens=True)
    assert generate(llama64, tok, "w5 w6 w7", 5, stop_at_eos=False).token_ids[0] == expected


def test_stories260k_greedy_matches_naive_loop(shared_data):
    from owl_sparse.models import load_model

    model, tok = load_model("stories260k")
    result = generate(model, tok, ["Once upon a time", "Tim"], max_new_tokens=24)
    first = naive_greedy(model, tok.encode("Once upon a time"), 24)
    cut = first.index(2) + 1 if 2 in first else len(first)
    assert result.token_ids[0] == first[:cut]
    assert result.texts[0].strip() and result.texts[1].strip()


def test_sparsified_model_serves_through_the_same_loop():
    nn_mod = pytest.importorskip("owl_sparse.nn")
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        for m in find_decoder_blocks(model).blocks.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.7)
    nn_mod.sparsify_(model, format="bitmap")
    assert any(type(m).__name__ == "SparseLinear" for m in model.modules())
    result = generate_ids(model, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    assert result.token_ids == [naive_greedy(model, p, 6) for p in PROMPTS]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_p=1.5), "top_p must be"),
        (dict(top_k=0), "top_k must be"),
        (dict(max_new_tokens=250), "beyond the model's context of 256"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=-1.2), "repetition_penalty must be"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be"),
        (dict(repetition_penalty=True), "repetition_penalty must be a"),
    ],
)
def test_bad_settings_fail_before_work(llama64, kwargs, message):
    with pytest.raises(InputError, match=message):
        generate_ids(llama64, PROMPTS, **kwargs)


def test_bad_prompts_and_missing_tokenizer(llama64):
    with pytest.raises(InputError, match="needs a tokenizer"):
        generate(llama64, None, ["hello"])
    with pytest.raises(InputError, match="zero tokens"):
        generate_ids(llama64, [[1, 2], []])
    with pytest.raises(InputError, match=r"outside \[0, 128\)"):
        generate_ids(llama64, [[1, 500]])
    with pytest.raises(InputError, match="non-empty list"):
        generate(llama64, _word_tokenizer(), [])


def test_unsupported_attention_is_refused(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    with pytest.raises(InputError, match="attn_implementation 'sdpa' or 'eager'"):
        generate_ids(model, PROMPTS)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").double()


PROMPT = [[5, 6, 7, 8]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(temperature="0.5"), "temperature must be a finite number"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_k=True), "top_k must be an integer"),
        (dict(batch_size=True), "batch_size must be an integer"),
        (dict(batch_size=1.5), "batch_size must be an integer"),
        (dict(top_p=True), "top_p must be a number"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(eos_token_id="x"), "eos_token_id must be an integer, got 'x'"),
        (dict(eos_token_id=[2, 3.5]), "eos_token_id must be an integer, got 3.5"),
        (dict(pad_token_id=1.5), "pad_token_id must be an integer"),
    ],
)
def test_bad_sampling_settings(llama, kwargs, message):
    with pytest.raises(InputError, match=message):
        generate_ids(llama, PROMPT, **kwargs)


def test_numpy_scalars_are_accepted(llama):
    ref = generate_ids(llama, PROMPT * 2, max_new_tokens=3, top_k=5, batch_size=1, seed=1)
    out = generate_ids(
        llama,
        [[np.int64(t) for t in PROMPT[0]]] * 2,
        max_new_tokens=np.int64(3),
        temperature=np.float32(0.0),
        top_k=np.int32(5),
        top_p=np.float64(1.0),
        batch_size=np.int64(1),
        seed=np.int64(1),
    )
    assert out.token_ids == ref.token_ids and out.batch_size == 1
    assert all(type(t) is int for row in out.token_ids for t in row)


@pytest.mark.parametrize(
    "seqs, message",
    [
        ([[1.0, 2.5]], r"prompt 0, position 0: token id must be an integer, got 1\.0"),
        ([[1, 2], [3, True]], r"prompt 1, position 1: token id must be an integer, got True"),
        ([[1, "2"]], "token id must be an integer"),
        ([5], "prompt 0 must be a list of token ids"),
        ("abc", "seqs must be a list of token id lists, got str"),
        ([torch.tensor([1.0, 2.0])], "token id must be an integer"),
    ],
)
def test_token_ids_must_be_integers(llama, seqs, message):
    with pytest.raises(InputError, match=message):
        generate_ids(llama, seqs, max_new_tokens=2)


def test_integer_tensor_prompts_are_accepted(llama):
    ref = generate_ids(llama, PROMPT, max_new_tokens=2)
    out = generate_ids(llama, torch.tensor(PROMPT), max_new_tokens=2)
    assert out.token_ids == ref.token_ids


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_decode_equals_eager(dtype):
    model = tiny_model("llama", seed=2).to("cuda", dtype)
    eager = generate_ids(model, PROMPTS, 16, stop_at_eos=False, cuda_graphs=False)
    graph = generate_ids(model, PROMPTS, 16, stop_at_eos=False, cuda_graphs=True)
    assert graph.cuda_graph and graph.graph_error is None
    assert not eager.cuda_graph
    assert graph.token_ids == eager.token_ids
    if dtype == torch.float32:
        assert graph.token_ids == [naive_greedy(model, p, 16) for p in PROMPTS]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_cuda_graph_serves_a_sparsified_model(fmt):
    nn_mod = pytest.importorskip("owl_sparse.nn")
    model = tiny_model("llama", seed=4).to("cuda", torch.float16)
    with torch.no_grad():
        for m in find_decoder_blocks(model).blocks.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight.view(m.weight.shape[0], -1, 4)
                keep = w.abs().topk(2, dim=-1).indices
                mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
                m.weight.mul_(mask.view_as(m.weight))
    nn_mod.sparsify_(model, format=fmt)
    eager = generate_ids(model, PROMPTS, 12, stop_at_eos=False, cuda_graphs=False)
    graph = generate_ids(model, PROMPTS, 12, stop_at_eos=False, cuda_graphs=True)
    assert graph.cuda_graph, graph.graph_error
    assert graph.token_ids == eager.token_ids


def test_cpu_dense_layers_run_the_native_kernel_only_while_serving():
    from owl_sparse.ops import cpu

    if not cpu.available():
        pytest.skip("compiled CPU kernels unavailable")
    model = tiny_model("llama", seed=3)
    seen = {}
    for native in (True, False):
        with torch.autograd.profiler.profile() as prof:
            out = generate_ids(model, PROMPTS[:1], 4, stop_at_eos=False, native_dense=native)
        seen[native] = (
            out.token_ids,
            any("owl_sparse::dense_linear" in e.name for e in prof.function_events),
        )
    assert seen[True][1] and not seen[False][1]
    assert seen[True][0] == seen[False][0]  # fp32: the same greedy tokens
    assert not any(type(m).__name__ == "NativeLinear" for m in model.modules())
