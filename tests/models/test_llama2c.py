"""llama2.c converter and tokenizer against independent NumPy / pure-Python references.

The references here re-read the files themselves and follow run.c line by line (naive
O(n^2) BPE merge, interleaved RoPE, GQA attention, SwiGLU), so they share no code with
owl_sparse.llama2c.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import REPO

from owl_sparse.errors import InputError
from owl_sparse.models.llama2c import Llama2cTokenizer, load_llama2c

DATA = Path(os.environ.get("OWL_SPARSE_DATA", REPO.parent / "shared/data"))
CKPT = DATA / "stories260K" / "stories260K.bin"
TOK = DATA / "stories260K" / "tok512.bin"
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"

needs_data = pytest.mark.skipif(not (CKPT.is_file() and TOK.is_file()), reason="no stories260K")

# run.c's greedy output for stories260K from BOS alone, 200 steps, as published in
# karpathy/llama2.c test_all.py (expected_stdout).
PUBLISHED_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high."
    "\nLily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to "
    'do. She said, "I want to play with your ball, but I can\'t find it."\nLily was sad and '
    "didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\nLily "
    "didn't want to help her mom, so she"
)


# ---------------------------------------------------------------- NumPy reference (run.c)


def read_reference(path: Path) -> dict:
    """The checkpoint as float64 arrays, parsed independently of the package."""
    dim, hid, n_layers, n_heads, n_kv, vocab, seq = (int(x) for x in np.fromfile(path, "<i4", 7))
    flat = np.fromfile(path, "<f4", offset=28).astype(np.float64)
    hd = dim // n_heads
    kv = hd * n_kv
    v = abs(vocab)
    shapes = [("emb", (v, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)),
              ("wo", (n_layers, dim, dim)), ("rms_ffn", (n_layers, dim)),
              ("w1", (n_layers, hid, dim)), ("w2", (n_layers, dim, hid)),
              ("w3", (n_layers, hid, dim)), ("rms_final", (dim,)),
              ("fcr", (seq, hd // 2)), ("fci", (seq, hd // 2))]  # fmt: skip
    if vocab < 0:
        shapes.append(("wcls", (v, dim)))
    w, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = flat[pos : pos + n].reshape(shape)
        pos += n
    assert pos == flat.size
    w.setdefault("wcls", w["emb"])
    w.update(n_heads=n_heads, n_kv=n_kv, hd=hd)
    return w


def run_c_freqs(seq: int, hd: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [seq, hd/2] as run.c computes them: freq = 10000^(-(2i)/head_size)."""
    freq = 1.0 / np.power(10000.0, np.arange(0, hd, 2) / hd)
    ang = np.arange(seq)[:, None] * freq[None, :]
    return np.cos(ang), np.sin(ang)


def reference_logits(w: dict, tokens: list[int]) -> np.ndarray:
    """run.c's forward pass over a whole sequence (causal), float64; logits [T, V]."""

    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x):  # x [T, heads, hd]; rotate interleaved pairs (2i, 2i+1)
        cos, sin = run_c_freqs(len(tokens), w["hd"])
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos[:, None] - x1 * sin[:, None]
        out[..., 1::2] = x0 * sin[:, None] + x1 * cos[:, None]
        return out

    t, h, kvh, hd = len(tokens), w["n_heads"], w["n_kv"], w["hd"]
    x = w["emb"][tokens]
    causal = np.tril(np.ones((t, t), dtype=bool))
    for layer in range(w["wq"].shape[0]):
        a = rmsnorm(x, w["rms_att"][layer])
        q = rope((a @ w["wq"][layer].T).reshape(t, h, hd))
        k = rope((a @ w["wk"][layer].T).reshape(t, kvh, hd))
        v = (a @ w["wv"][layer].T).reshape(t, kvh, hd)
        heads = []
        for i in range(h):
            j = i // (h // kvh)  # query head i reads kv head j (GQA)
            s = q[:, i] @ k[:, j].T / math.sqrt(hd)
            s = np.where(causal, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, j])
        x = x + np.concatenate(heads, -1) @ w["wo"][layer].T
        f = rmsnorm(x, w["rms_ffn"][layer])
        g = f @ w["w1"][layer].T
        x = x + ((g / (1 + np.exp(-g))) * (f @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


# ------------------------------------------------------------ naive run.c tokenizer


def read_vocab(path: Path) -> tuple[list[bytes], list[float]]:
    raw = path.read_bytes()
    pieces, scores, pos = [], [], 4
    while pos < len(raw):
        score, n = struct.unpack_from("<fi", raw, pos)
        pieces.append(raw[pos + 8 : pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    return pieces, scores


def naive_encode(pieces, scores, text: str, bos: bool, eos: bool) -> list[int]:
    """run.c encode(), transcribed: O(n^2) merge over the whole text."""
    lookup = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[b" "])
    data = text.encode("utf-8")
    buf = b""
    for i, c in enumerate(data):
        if c & 0xC0 != 0x80:
            buf = b""
        buf += bytes([c])
        if i + 1 < len(data) and data[i + 1] & 0xC0 == 0x80 and len(buf) < 4:
            continue
        tokens += [lookup[buf]] if buf in lookup else [b + 3 for b in buf]
        buf = b""
    while True:
        best, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            m = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if m is not None and scores[m] > best:
                best, best_id, best_idx = scores[m], m, i
        if best_idx == -1:
            break
        tokens[best_idx : best_idx + 2] = [best_id]
    return tokens + [2] if eos else tokens


# ------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def converted():
    return load_llama2c(CKPT)


@needs_data
def test_freq_cis_in_file_matches_run_c_formula():
    w = read_reference(CKPT)
    cos, sin = run_c_freqs(w["fcr"].shape[0], w["hd"])
    np.testing.assert_allclose(w["fcr"], cos, atol=1e-5)  # the file holds float32 angles
    np.testing.assert_allclose(w["fci"], sin, atol=1e-5)  # the file holds float32 angles


@needs_data
def test_logits_match_numpy_run_c(converted):
    model, tok = converted
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.tie_word_embeddings and tok.model_max_length == 512
    ids = tok.encode("Once upon a time, a cat sat on a mat. It was happy!")
    want = reference_logits(read_reference(CKPT), ids)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - want).max() < 1e-4


@needs_data
def test_greedy_matches_numpy_and_published_sample(converted):
    model, tok = converted
    w = read_reference(CKPT)
    ids = tok.encode("Once upon a time")
    ref = list(ids)
    for _ in range(20):
        ref.append(int(reference_logits(w, ref)[-1].argmax()))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
        assert out[0].tolist() == ref
        # run.c -t 0 -n 200 starts from BOS alone and prints 200 generated tokens.
        story = model.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False)
    assert tok.decode(story[0], skip_special_tokens=True) == PUBLISHED_SAMPLE


def _synthetic_checkpoint(path: Path, vocab: int, n_heads: int, n_kv: int, seed: int) -> None:
    """A small random v0 checkpoint; vocab < 0 writes an unshared classifier."""
    dim, hid, n_layers, seq = 16, 24, 2, 32
    hd, kv, v = dim // n_heads, dim // n_heads * n_kv, abs(vocab)
    rng = np.random.default_rng(seed)
    sizes = [v * dim, n_layers * dim, n_layers * dim * dim, 2 * n_layers * kv * dim,
             n_layers * dim * dim, n_layers * dim, 3 * n_layers * hid * dim, dim]  # fmt: skip
    arrays = [rng.standard_normal(n) * 0.3 for n in sizes]
    cos, sin = run_c_freqs(seq, hd)
    arrays += [cos.ravel(), sin.ravel()] + ([rng.standard_normal(v * dim)] if vocab < 0 else [])
    header = np.array([dim, hid, n_layers, n_heads, n_kv, vocab, seq], "<i4").tobytes()
    path.write_bytes(header + np.concatenate(arrays).astype("<f4").tobytes())


@needs_data
@pytest.mark.parametrize("vocab,n_heads,n_kv", [(-512, 4, 2), (512, 4, 4), (-512, 2, 1)])
def test_synthetic_untied_and_gqa_match_numpy(tmp_path, vocab, n_heads, n_kv):
    ckpt = tmp_path / "rand.bin"
    _synthetic_checkpoint(ckpt, vocab, n_heads, n_kv, seed=n_heads + n_kv)
    model, _ = load_llama2c(ckpt, tokenizer=TOK)
    assert model.config.tie_word_embeddings == (vocab > 0)
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (vocab > 0)
    ids = [1, 5, 300, 17, 400, 2, 99, 260, 3, 511]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - reference_logits(read_reference(ckpt), ids)).max() < 1e-4


@needs_data
def test_dtype_argument():
    model, _ = load_llama2c(CKPT, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return Llama2cTokenizer(TOK)


TEXTS = [
    "hello world!", "abcdefgh", "0123456789", "Lets try ö & 株式会社", "𒎗𓐍", " ", "  a  b ",
    "[INST]\n<<<SYS>>>test<<</SYS>>>\nhello[/INST]\n", "<0x0A> literal <s> pieces",
    "Once upon a time, there was a little girl.\n\nThe end.", "tab\there\r\nnul\x00char",
]  # fmt: skip


@needs_data
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("bos,eos", [(True, False), (False, False), (True, True)])
def test_encode_equals_naive_run_c(tok, text, bos, eos):
    pieces, scores = read_vocab(TOK)
    assert tok.encode(text, bos=bos, eos=eos) == naive_encode(pieces, scores, text, bos, eos)


@needs_data
def test_encode_equals_naive_on_random_and_real_text(tok):
    pieces, scores = read_vocab(TOK)
    rng = random.Random(0)
    pool = list("abcdehlnorst TO.,!?'\"\n\n-") + ["ö", "é", "株", "😀", "\t", "<0x", ">"]
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert tok.encode(text) == naive_encode(pieces, scores, text, True, False), repr(text)
    if WIKI.is_file():
        text = WIKI.read_text(encoding="utf-8")[:1500]
        assert tok.encode(text) == naive_encode(pieces, scores, text, True, False)


def _write_vocab(path: Path, pieces: list[bytes], scores: list[float]) -> None:
    body = b"".join(struct.pack("<fi", s, len(p)) + p for p, s in zip(pieces, scores))
    path.write_bytes(struct.pack("<i", max(map(len, pieces))) + body)


@pytest.mark.parametrize("seed", range(6))
def test_encode_equals_naive_on_synthetic_vocab(tmp_path, seed):
    """Random vocabularies with many tied scores, pieces run.c never merges (score <= -1e10),
    pieces containing newlines and "<", ">" (so boundaries move), and a piece that BOS
    itself can merge into."""
    rng = random.Random(seed)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    pieces += [b" ", b"\n<s>\n ", b"\n<s>\n a"] + [c.encode() for c in "ab\n<>"]
    alphabet = ["a", "b", " ", "\n", "<", ">", "x", "é"]
    pieces += ["".join(rng.choices(alphabet, k=rng.randint(2, 4))).encode() for _ in range(60)]
    scores = [0.0] * 259 + [rng.choice([0.0, -1.0, -2.0, -3.0, -1e10, -2e10]) for _ in pieces[259:]]
    path = tmp_path / "tok.bin"
    _write_vocab(path, pieces, scores)
    tok = Llama2cTokenizer(path)
    pieces, scores = read_vocab(path)  # scores as float32, like run.c
    for _ in range(150):
        text = "".join(rng.choices(alphabet + ["株"], k=rng.randint(0, 30)))
        for bos in (True, False):
            got = tok.encode(text, bos=bos)
            assert got == naive_encode(pieces, scores, text, bos, False), (seed, text)


@needs_data
def test_round_trip_and_byte_fallback(tok):
    for text in TEXTS[:-1] + ["naïve café — 東京 🚀"]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids).startswith("\n<s>\n")  # BOS prints as its piece
    ids = tok.encode("株", add_special_tokens=False)
    assert ids[1:] == [b + 3 for b in "株".encode()]  # three byte-fallback tokens
    assert tok.decode(ids) == " 株"  # no BOS before it: the dummy prefix space stays
    assert tok.decode(ids[:-1]) == " \ufffd"  # a cut UTF-8 sequence decodes with errors="replace"


@needs_data
def test_special_tokens_and_hf_interface(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 0, 512)
    assert tok.encode("") == [1] and tok.encode("", add_special_tokens=False) == []
    assert tok.encode("", eos=True) == [1, 2]
    plain = tok.encode("The cat.", add_special_tokens=False)
    assert tok.encode("The cat.") == [1] + plain and 1 not in plain
    assert tok.encode("The cat.", eos=True)[-1] == 2
    enc = tok("The cat.", return_tensors="pt")
    assert enc["input_ids"].shape == (1, len(plain) + 1) and enc["input_ids"].dtype == torch.int64
    assert enc["attention_mask"].sum() == len(plain) + 1
    assert tok("The cat.")["input_ids"] == [1] + plain
    assert tok(["ab", "cd"])["input_ids"] == [tok.encode("ab"), tok.encode("cd")]
    with pytest.raises(ValueError, match="lengths"):
        tok(["a", "a much longer text"], return_tensors="pt")
    two = torch.tensor([tok.encode("The cat."), tok.encode("The dog.")])
    assert tok.batch_decode(two, skip_special_tokens=True) == ["The cat.", "The dog."]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([512])


@needs_data
def test_save_and_from_pretrained(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.bin").read_bytes() == TOK.read_bytes()
    assert (tmp_path / "llama2c_tokenizer.json").is_file()
    again = Llama2cTokenizer.from_pretrained(tmp_path)
    assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3]) and again.vocab_size == 512
    with pytest.raises(FileNotFoundError, match="llama2c_tokenizer.json"):
        Llama2cTokenizer.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------- errors


@needs_data
@pytest.mark.parametrize("cut", ["truncated", "too_long", "random", "tiny"])
def test_bad_checkpoint_names_file_and_sizes(tmp_path, cut):
    good = CKPT.read_bytes()
    data = {
        "truncated": good[:-1000],
        "too_long": good + b"\0" * 4,
        "random": np.random.default_rng(1).bytes(5000),
        "tiny": good[:10],
    }[cut]
    bad = tmp_path / f"{cut}.bin"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=str(bad)) as err:
        load_llama2c(bad, tokenizer=TOK)
    assert str(len(data)) in str(err.value)
    if cut in ("truncated", "too_long"):
        assert str(len(good)) in str(err.value)  # the expected size from the header


@needs_data
def test_missing_or_mismatched_tokenizer(tmp_path):
    ckpt = tmp_path / "stories260K.bin"
    ckpt.write_bytes(CKPT.read_bytes())
    with pytest.raises(FileNotFoundError, match="tok512.bin") as err:
        load_llama2c(ckpt)
    assert isinstance(err.value, ValueError) and str(ckpt) in str(err.value)
    short = tmp_path / "tok512.bin"
    short.write_bytes(TOK.read_bytes()[:-50])
    with pytest.raises(ValueError, match=str(short)):
        load_llama2c(ckpt)
    with pytest.raises(ValueError, match="expects 600 tokens"):
        Llama2cTokenizer(TOK, vocab_size=600)
    with pytest.raises(ValueError, match="not a llama2.c tokenizer"):
        Llama2cTokenizer(CKPT)


# --------------------------------------------------------------------- perplexity


@needs_data
@pytest.mark.slow
@pytest.mark.skipif(not WIKI.is_file(), reason="no wiki.test.raw")
def test_wikitext_perplexity(converted):
    model, tok = converted
    text = WIKI.read_text(encoding="utf-8")
    start = time.perf_counter()
    ids = tok.encode(text)  # one BOS for the whole stream
    seconds = time.perf_counter() - start
    assert seconds < 60
    windows = torch.tensor(ids[: len(ids) // 512 * 512]).reshape(-1, 512)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(32):
            logits = model(batch).logits[:, :-1].double()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    ppl = math.exp(nll / count)
    print(f"wiki.test.raw: {len(ids)} tokens encoded in {seconds:.2f} s, ppl {ppl:.2f}")
    assert 110 < ppl < 150


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"tokenizer_file": "/etc/passwd"}, "tokenizer_file"),
        ({"tokenizer_file": "../tokenizer.bin"}, "tokenizer_file"),
        ({"model_max_length": "abc"}, "model_max_length"),
        ({"model_max_length": 0}, "model_max_length"),
    ],
)
def test_llama2c_tokenizer_marker_fields(tmp_path, shared_data, edit, fragment):
    from owl_sparse.models.llama2c import Llama2cTokenizer

    tok = Llama2cTokenizer(shared_data / "stories260K" / "tok512.bin", vocab_size=512)
    tok.save_pretrained(tmp_path)
    marker = tmp_path / "llama2c_tokenizer.json"
    meta = json.loads(marker.read_text())
    meta.update(edit)
    marker.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=fragment):
        Llama2cTokenizer.from_pretrained(tmp_path)
