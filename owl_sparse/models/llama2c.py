"""llama2.c checkpoints and tokenizers, converted for transformers.

`load_llama2c` reads a legacy (v0) llama2.c checkpoint (karpathy/llama2.c ``export.py
--version 0``, e.g. stories260K.bin) into a ``transformers.LlamaForCausalLM`` and pairs it
with `Llama2cTokenizer`, a faithful port of run.c's ``encode``/``decode`` that also offers
the small part of the Hugging Face tokenizer interface the rest of owl_sparse uses.

Checkpoint layout (all little-endian): 7 int32 ``dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len``, then float32 arrays: embedding [V, d], rms_att [L, d],
wq [L, d, d], wk [L, kv, d], wv [L, kv, d], wo [L, d, d], rms_ffn [L, d], w1 [L, h, d],
w2 [L, d, h], w3 [L, h, d], rms_final [d], freq_cis real and imaginary [seq, hd / 2]
each, and the classifier [V, d] only when vocab_size < 0 (unshared head).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

__all__ = ["Llama2cHeader", "Llama2cTokenizer", "MissingTokenizerError", "load_llama2c"]

_HEADER_BYTES = 28
_BOS, _EOS = 1, 2  # fixed by run.c
_NO_MERGE = -1e10  # run.c starts its best-score search here: pairs scoring <= this never merge
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_MARKER = "llama2c_tokenizer.json"
# The marker names its tokenizer file inside the same directory: a plain name, no path.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class MissingTokenizerError(InputError, FileNotFoundError):
    """No tokenizer file was found; both a ValueError and a FileNotFoundError."""


@dataclass(frozen=True)
class Llama2cHeader:
    """The 7 int32 of a llama2.c v0 checkpoint header (``vocab_size`` < 0: unshared head)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int

    @property
    def vocab(self) -> int:
        return abs(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def problems(self) -> list[str]:
        """Reasons this header cannot describe a real model (empty when it is sane)."""
        limits = dict(dim=1 << 16, hidden_dim=1 << 18, n_layers=1 << 10, n_heads=1 << 10,
                      n_kv_heads=1 << 10, seq_len=1 << 22)  # fmt: skip
        out = [f"{k}={getattr(self, k)} not in [1, {v}]" for k, v in limits.items()
               if not 1 <= getattr(self, k) <= v]  # fmt: skip
        if not 3 <= self.vocab <= 1 << 22:
            out.append(f"|vocab_size|={self.vocab} not in [3, {1 << 22}]")
        if out:
            return out
        if self.dim % self.n_heads:
            out.append(f"dim={self.dim} not divisible by n_heads={self.n_heads}")
        elif self.head_dim % 2:
            out.append(f"head_dim={self.head_dim} is odd (RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            out.append(f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}")
        return out

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Name and shape of every float32 array, in file order."""
        d, h, n, kv, v = self.dim, self.hidden_dim, self.n_layers, self.kv_dim, self.vocab
        out = [("tok_embeddings", (v, d)), ("rms_att", (n, d)), ("wq", (n, d, d)),
               ("wk", (n, kv, d)), ("wv", (n, kv, d)), ("wo", (n, d, d)), ("rms_ffn", (n, d)),
               ("w1", (n, h, d)), ("w2", (n, d, h)), ("w3", (n, h, d)), ("rms_final", (d,)),
               ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
               ("freq_cis_imag", (self.seq_len, self.head_dim // 2))]  # fmt: skip
        if self.vocab_size < 0:
            out.append(("wcls", (v, d)))
        return out

    @property
    def expected_bytes(self) -> int:
        return _HEADER_BYTES + 4 * sum(int(np.prod(s)) for _, s in self.shapes())


def read_llama2c(path: str | os.PathLike) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Read and validate a v0 checkpoint; returns the header and float32 arrays (no pickle).

    Raises:
        InputError (a ValueError) naming the file, the expected and the actual byte count
        when the file is truncated, too long, or not a llama2.c checkpoint at all.
    """
    path = Path(path)
    actual = path.stat().st_size
    if actual < _HEADER_BYTES:
        raise InputError(
            f"{path}: not a llama2.c checkpoint: expected at least {_HEADER_BYTES} bytes "
            f"(header), file has {actual}"
        )
    header = Llama2cHeader(*(int(x) for x in np.fromfile(path, dtype="<i4", count=7)))
    bad = header.problems()
    if bad:
        raise InputError(
            f"{path}: not a llama2.c v0 checkpoint ({actual} bytes): header {header} is "
            f"invalid: {'; '.join(bad)}"
        )
    if actual != header.expected_bytes:
        kind = "truncated" if actual < header.expected_bytes else "wrong size"
        raise InputError(
            f"{path}: llama2.c checkpoint {kind}: header {header} needs expected "
            f"{header.expected_bytes} bytes, file has {actual}"
        )
    flat = np.fromfile(path, dtype="<f4", offset=_HEADER_BYTES).astype(np.float32, copy=False)
    arrays, pos = {}, 0
    for name, shape in header.shapes():
        size = int(np.prod(shape))
        arrays[name] = flat[pos : pos + size].reshape(shape)
        pos += size
    return header, arrays


def _rope_rows_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows: llama2.c rotates pairs (2i, 2i+1); HF rotate_half pairs (i, i+hd/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Convert a llama2.c v0 checkpoint to ``(LlamaForCausalLM, Llama2cTokenizer)``.

    Args:
        checkpoint: the ``.bin`` checkpoint.
        tokenizer: a llama2.c ``tokenizer.bin`` file; by default ``tok{vocab}.bin`` or
            ``tokenizer.bin`` beside the checkpoint (first found).
        dtype: parameter dtype of the returned model (weights are converted from float32).

    Returns:
        the model in eval mode on the CPU (q/k rows permuted for rotate_half RoPE; the head
        tied to the embedding when the header's vocab_size is positive) and the tokenizer
        with ``model_max_length`` = seq_len.

    Raises:
        InputError (ValueError) for a malformed checkpoint or a tokenizer whose vocabulary
        does not match; MissingTokenizerError (also FileNotFoundError) when none is found.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = Path(checkpoint)
    header, a = read_llama2c(checkpoint)
    if tokenizer is None:
        names = [f"tok{header.vocab}.bin", "tokenizer.bin"]
        found = [checkpoint.parent / n for n in names if (checkpoint.parent / n).is_file()]
        if not found:
            raise MissingTokenizerError(
                f"{checkpoint}: no tokenizer given and none of {names} exists in "
                f"{checkpoint.parent}"
            )
        tokenizer = found[0]
    tok = Llama2cTokenizer(tokenizer, vocab_size=header.vocab, model_max_length=header.seq_len)

    config = LlamaConfig(
        vocab_size=header.vocab, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, head_dim=header.head_dim,
        max_position_embeddings=header.seq_len, rms_norm_eps=1e-5, rope_theta=1e4,
        tie_word_embeddings=header.vocab_size > 0, bos_token_id=_BOS, eos_token_id=_EOS,
        pad_token_id=tok.pad_token_id, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )  # fmt: skip
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
    sd = {
        "model.embed_tokens.weight": t["tok_embeddings"],
        "model.norm.weight": t["rms_final"],
        "lm_head.weight": t.get("wcls", t["tok_embeddings"]),
    }
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _rope_rows_to_half(t["wq"][i], header.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _rope_rows_to_half(t["wk"][i], header.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    model = LlamaForCausalLM(config)
    model.load_state_dict(sd, strict=True)
    return model.to(dtype).eval(), tok


class Llama2cTokenizer:
    """llama2.c's tokenizer (``tokenizer.bin``), encoding and decoding exactly as run.c.

    File format: int32 max_token_length, then per token float32 score, int32 byte length,
    the bytes. Ids 1 and 2 are BOS and EOS; ids ``3 + b`` are the byte-fallback pieces
    ``<0xXX>``. ``pad_token_id`` is 0 when piece 0 is ``<unk>`` (llama2.c never emits it, so
    it is safe as padding), else None. Duplicate pieces resolve to the lowest id.

    Args:
        path: the ``tokenizer.bin`` file.
        vocab_size: number of tokens to read (the model's); None reads to the end of file.
        model_max_length: the model's context length (seq_len); None means unknown.
    """

    bos_token_id = _BOS
    eos_token_id = _EOS
    unk_token_id = 0

    def __init__(self, path, vocab_size: int | None = None, model_max_length: int | None = None):
        self.path = Path(path)
        raw = self.path.read_bytes()
        self._raw = raw
        err = f"{self.path}: not a llama2.c tokenizer ({len(raw)} bytes)"
        if len(raw) < 4:
            raise InputError(f"{err}: expected at least 4 bytes")
        (max_len,) = struct.unpack_from("<i", raw)
        if not 1 <= max_len <= 1 << 16:
            raise InputError(f"{err}: max_token_length={max_len} not in [1, 65536]")
        pieces, scores, pos = [], [], 4
        while pos < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
            if pos + 8 > len(raw):
                raise InputError(f"{err}: truncated in the record of token {len(pieces)}")
            score, n = struct.unpack_from("<fi", raw, pos)
            # Empty pieces are refused: merging one would not change a token, which
            # breaks run.c's assumption (and ours) that every merge makes a longer piece.
            if not 1 <= n <= max_len or pos + 8 + n > len(raw):
                raise InputError(f"{err}: token {len(pieces)} has length {n} (max {max_len})")
            pieces.append(raw[pos + 8 : pos + 8 + n])
            scores.append(score)
            pos += 8 + n
        if vocab_size is not None and (len(pieces) != vocab_size or pos != len(raw)):
            raise InputError(
                f"{self.path}: tokenizer does not fit the model: it expects {vocab_size} "
                f"tokens, the file ({len(raw)} bytes) holds "
                f"{len(pieces)}{' and trailing bytes' if pos != len(raw) else ''}"
            )
        if len(pieces) < 3:
            raise InputError(f"{err}: {len(pieces)} tokens, need at least <unk>, BOS, EOS")
        self._pieces, self._scores = pieces, scores
        self._id = {}
        for i, p in enumerate(pieces):
            self._id.setdefault(p, i)
        self.pad_token_id = 0 if pieces[0] == b"<unk>" else None
        self.model_max_length = int(1e30) if model_max_length is None else model_max_length
        # Bytes that follow each other inside some piece. A merge across a boundary between
        # initial tokens whose edge bytes never follow each other in a piece is impossible,
        # so the text splits there into parts that merge independently (see `encode`).
        self._pairs = {a << 8 | b for p in pieces for a, b in zip(p, p[1:])}
        self._chars: dict[str, tuple[tuple[int, ...], int, int]] = {}
        self._parts: dict[str, list[int]] = {}
        self._bytes = []
        for p in pieces:
            m = _BYTE_PIECE.fullmatch(p)
            self._bytes.append(bytes([int(m.group(1), 16)]) if m else p)

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    def convert_ids_to_tokens(self, ids):
        """Pieces as str (``ids`` an int or a sequence of ints)."""
        if isinstance(ids, int):
            return self._pieces[ids].decode("utf-8", errors="replace")
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    # -- encoding -------------------------------------------------------------------------

    def _char(self, ch: str) -> tuple[tuple[int, ...], int, int]:
        """Initial ids of one code point (piece, or byte fallback id byte+3) and edge bytes."""
        hit = self._chars.get(ch)
        if hit is None:
            try:
                b = ch.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"text is not encodable as UTF-8: {e}") from None
            ids = (self._id[b],) if b in self._id else tuple(x + 3 for x in b)
            if ids[-1] >= self.vocab_size:
                raise InputError(f"byte fallback for {ch!r} needs id {ids[-1]} >= vocab size")
            hit = (ids, self._pieces[ids[0]][0], self._pieces[ids[-1]][-1])
            self._chars[ch] = hit
        return hit

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop: merge the best-scoring adjacent pair (leftmost on ties) until
        none is in the vocabulary. A heap keyed by (-score, position of the left token) makes
        it O(n log n); positions of surviving tokens keep their order, so the leftmost tie
        is the same one run.c picks. Stale heap entries are skipped on pop."""
        n, pieces, lookup, scores = len(ids), self._pieces, self._id, self._scores
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n

        def pair(i: int, j: int):
            m = lookup.get(pieces[ids[i]] + pieces[ids[j]])
            if m is not None and scores[m] > _NO_MERGE:
                return (-scores[m], i, ids[i], ids[j], m)
            return None

        heap = [e for e in (pair(i, i + 1) for i in range(n - 1)) if e is not None]
        heapq.heapify(heap)
        while heap:
            _, i, a, b, m = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or ids[i] != a or ids[j] != b:
                continue  # stale: a neighbour changed since this pair was pushed
            ids[i], alive[j], nxt[i] = m, False, nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right < n and (e := pair(left, right)) is not None:
                    heapq.heappush(heap, e)
        return [t for t, keep in zip(ids, alive) if keep]

    def encode(
        self, text: str, add_special_tokens: bool = True, *, bos: bool | None = None,
        eos: bool = False,
    ) -> list[int]:  # fmt: skip
        """Token ids of ``text``, identical to run.c's ``encode(text, bos, eos)``.

        run.c prepends the dummy-prefix " " token once (non-empty text only), maps each UTF-8
        code point to its piece or to byte-fallback ids (byte + 3), then merges pairs
        greedily over the whole text. To be fast on long texts, the text is cut wherever no
        merge can ever cross (the two edge bytes never follow each other inside any piece,
        e.g. around newlines, which are byte-fallback tokens ``<0x0A>``); each part merges
        independently and repeated parts (words) come from a cache. The result equals
        run.c's on the whole text, not an approximation.

        Args:
            text: a str (a NUL is encoded like any other character, run.c would stop there).
            add_special_tokens: prepend BOS (id 1), as run.c does with ``bos=1``.
            bos: overrides add_special_tokens for BOS.  eos: append EOS (id 2).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        bos = add_special_tokens if bos is None else bos
        if not text:
            out = [_BOS] if bos else []
        elif b" " not in self._id:
            raise InputError(f"{self.path}: no ' ' piece for run.c's dummy prefix")
        else:
            out = self._encode_parts(" " + text, bos)
        return out + [_EOS] if eos else out

    def _encode_parts(self, text: str, bos: bool) -> list[int]:
        """Ids of non-empty ``text`` (dummy prefix included), with BOS first if ``bos``."""
        pairs, char, cache = self._pairs, self._char, self._parts
        starts, prev_last = [0], char(text[0])[2]
        for k in range(1, len(text)):
            _, first, last = char(text[k])
            if (prev_last << 8 | first) not in pairs:
                starts.append(k)
            prev_last = last
        starts.append(len(text))
        if len(cache) > 200_000:
            cache.clear()
        out: list[int] = []
        first_len = 0
        for s, e in zip(starts, starts[1:]):
            part = text[s:e]
            ids = cache.get(part)
            if ids is None:
                ids = cache[part] = self._merge([i for ch in part for i in char(ch)[0]])
            first_len = first_len or len(ids)
            out += ids
        # run.c merges BOS like any token. It can join the text only if its last byte may
        # be followed by the text's first byte inside a piece (never in real vocabularies).
        if bos and (self._pieces[_BOS][-1] << 8 | char(text[0])[1]) in pairs:
            first = [i for ch in text[: starts[1]] for i in char(ch)[0]]
            return self._merge([_BOS] + first) + out[first_len:]
        return [_BOS] + out if bos else out

    def __call__(self, text, return_tensors: str | None = None, add_special_tokens: bool = True):
        """HF-style call: ``{"input_ids", "attention_mask"}`` for a str or a list of str.

        With ``return_tensors="pt"`` the values are int64 tensors [B, T] (B = 1 for a str);
        a list of texts must then tokenize to equal lengths (no padding is done).
        """
        from transformers import BatchEncoding

        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens) for t in texts]
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError(f"texts tokenize to lengths {[len(x) for x in ids]}; no padding")
            t = torch.tensor(ids, dtype=torch.int64).reshape(len(ids), -1)
            return BatchEncoding({"input_ids": t, "attention_mask": torch.ones_like(t)})
        mask = [[1] * len(x) for x in ids]
        return BatchEncoding(
            {"input_ids": ids[0] if single else ids, "attention_mask": mask[0] if single else mask}
        )

    # -- decoding -------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence (list, tensor or array), as run.c prints it.

        A piece right after BOS loses its leading space; ``<0xXX>`` pieces are raw bytes; the
        bytes are decoded as UTF-8 with errors="replace". Special tokens (<unk>, BOS, EOS)
        print as their pieces unless ``skip_special_tokens``.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and isinstance(ids[0], list):
            raise TypeError("decode expects a 1-D sequence of ids; use batch_decode for 2-D")
        out, prev = [], None
        for t in ids:
            if not 0 <= t < len(self._pieces):
                raise ValueError(f"token id {t} out of range [0, {len(self._pieces)})")
            piece = self._bytes[t]
            if prev == _BOS and piece.startswith(b" "):
                piece = piece[1:]
            prev = t
            if not (skip_special_tokens and t in (0, _BOS, _EOS)):
                out.append(piece)
        return b"".join(out).decode("utf-8", errors="replace")

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """`decode` of each row of a 2-D id sequence."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(r, skip_special_tokens) for r in rows]

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, str]:
        """Write the original ``tokenizer.bin`` bytes and the ``llama2c_tokenizer.json``
        marker into ``directory``; returns both paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.bin").write_bytes(self._raw)
        meta = {"format": "llama2c", "tokenizer_file": "tokenizer.bin",
                "vocab_size": self.vocab_size, "model_max_length": self.model_max_length}  # fmt: skip
        (d / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        return str(d / "tokenizer.bin"), str(d / _MARKER)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Llama2cTokenizer:
        """Load from a directory written by `save_pretrained`, or from a tokenizer file."""
        path = Path(path)
        if path.is_file():
            return cls(path)
        marker = path / _MARKER
        if not marker.is_file():
            raise MissingTokenizerError(f"{path}: no {_MARKER} (not a saved llama2.c tokenizer)")
        try:
            meta = json.loads(marker.read_text())
            name, vocab = meta["tokenizer_file"], int(meta["vocab_size"])
            max_len = meta.get("model_max_length")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{marker}: malformed marker ({e})") from None
        if not isinstance(name, str) or not _PLAIN_NAME.match(name):
            raise InputError(
                f"{marker}: tokenizer_file must be a plain file name in {path}, got {name!r}"
            )
        if max_len is not None and (type(max_len) is not int or max_len < 1):
            raise InputError(
                f"{marker}: model_max_length must be a positive integer or null, got {max_len!r}"
            )
        file = path / name
        if not file.is_file():
            raise MissingTokenizerError(f"{marker}: names {file}, which does not exist")
        return cls(file, vocab_size=vocab, model_max_length=max_len)
