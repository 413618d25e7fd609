"""Serving: static-cache generation against a naive no-cache loop, batching, EOS, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch.overrides import TorchFunctionMode

from owl_sparse.errors import InputError
from owl_sparse.models import find_decoder_blocks
from owl_sparse.serve import generate, generate_ids, sample_next
from owl_sparse.serve.kv_cache import (
    DecodeStep,
    check_memory,
    kv_cache_bytes,
    left_pad,
    new_static_cache,
    prefill_inputs,
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


@pytest.fixture(scope="module")
def llama64():
    # float64 keeps the cached and uncached paths' rounding differences far below the
    # gaps between logits, so token-exact comparison is meaningful.
    return tiny_model("llama").double()


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt", "gpt2"])
def test_greedy_batched_equals_naive_loop(family):
    model = tiny_model(family).double()
    result = generate_ids(model, PROMPTS, max_new_tokens=10, stop_at_eos=False)
    assert result.token_ids == [naive_greedy(model, p, 10) for p in PROMPTS]


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


def test_sample_next_respects_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    top2 = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_next(logits, 1.0, top_p=0.7, generator=gen)  # 0.5 < 0.7 <= 0.8
    assert set(nucleus.tolist()) == {0, 1}
    free = sample_next(logits, 1.0, generator=gen)
    share = (free == 0).float().mean().item()
    assert set(free.tolist()) == {0, 1, 2, 3} and abs(share - 0.5) < 0.05
    assert sample_next(logits[:3], 0.0).tolist() == [0, 0, 0]


class _SyncSpy(TorchFunctionMode):
    """Records torch calls that would force the host to wait for the device."""

    SYNCING = {
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
        "cpu",
        "numpy",
        "tensor",
        "masked_select",
    }

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_decode_step_has_no_host_synchronisation():
    """What makes the step capturable in a CUDA graph, checked on the CPU."""
    model = tiny_model("llama")
    ids, lengths = left_pad([[1, 2, 3], [4, 5]], pad_id=0)
    cache = new_static_cache(model, 10)
    pos, mask = prefill_inputs(lengths, 3, 10, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache)
    step = DecodeStep(model, cache, lengths, 3, 10, torch.float32, "cpu", False, True)
    token = torch.tensor([7, 8])
    with _SyncSpy() as spy:
        logits = step(token, 0)
    assert spy.seen == [] and logits.shape == (2, 128)


def test_prefill_mask_left_padding():
    lengths = torch.tensor([3, 1])
    pos, mask = prefill_inputs(lengths, 3, 5, torch.float32, torch.device("cpu"))
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    allowed = (mask == 0)[:, 0]
    assert allowed[0].tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
    ]
    # the padded row: pad queries see only themselves, the real query only itself
    assert allowed[1].tolist() == [
        [True, False, False, False, False],
        [False, True, False, False, False],
        [False, False, True, False, False],
    ]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", pad_token="w0")


def test_generate_text_with_tokenizer(llama64):
    tok = _word_tokenizer()
    result = generate(llama64, tok, ["w5 w6 w7", "w9"], max_new_tokens=5, stop_at_eos=False)
    expected = naive_greedy(llama64, [5, 6, 7], 5)
    assert result.token_ids[0] == expected
    assert result.texts[0] == tok.decode(expected, skip_special_tokens=True)
    assert generate(llama64, tok, "w5 w6 w7", 5, stop_at_eos=False).token_ids[0] == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_p=1.5), "top_p must be"),
        (dict(top_k=0), "top_k must be"),
        (dict(max_new_tokens=250), "beyond the model's context of 256"),
        (dict(batch_size=0), "batch_size must be"),
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


def test_memory_check_names_the_sizes(llama64, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    with pytest.raises(InputError, match=r"batch 64 x 200 tokens does not fit .*GiB are free"):
        check_memory(llama64, 64, 100, 200, torch.float16, "cuda")
    ok = check_memory(llama64, 1, 4, 8, torch.float16, "cuda")
    assert ok["kv_cache_bytes"] == 2 * 2 * 1 * 2 * 8 * 16 * 2


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-serve")
    tiny_model("llama").save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path


def test_cli_generate_json_and_batch(model_dir, capsys):
    import json

    from owl_sparse.cli.main import main

    argv = [
        "generate",
        str(model_dir),
        "--prompt",
        "w5 w6 w7",
        "--max-new-tokens",
        "4",
        "--batch",
        "3",
        "--ignore-eos",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == ["w5 w6 w7"] * 3 and out["batch_size"] == 3
    assert len(out["token_ids"]) == 3 and all(len(t) == 4 for t in out["token_ids"])
    assert out["token_ids"][0] == out["token_ids"][2]


def test_cli_generate_error_is_one_line(model_dir, capsys):
    from owl_sparse.cli.main import main

    assert main(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("owl-sparse: error:") and "context of 256" in err
