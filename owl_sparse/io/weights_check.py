"""A model directory's config against its weight files, before any model is built.

Loading a Hugging Face directory through transformers alone is lenient: a missing tensor
keeps its random initialisation, a shard left out of the index is never read, a lowered
``num_hidden_layers`` drops layers, and an absurd one builds a model of millions of layers
before anything is compared. Every directory we load (dense or packed) passes these first:

- `check_config_values`: the config's sizes are positive integers within sane bounds, its
  floating fields (``rope_theta``, norm epsilons, ...) finite and positive where they must be;
- `read_weight_headers`: every weight file's safetensors header (no tensor data), the
  shard index consistent with the shards (each listed shard present, each tensor where the
  index says, nothing in a shard the index leaves out, no tensor twice);
- `check_layer_count`: the number of decoder layers the tensor names hold equals the
  config's, checked before the model is built (a config claiming a million layers is
  refused in microseconds, not after minutes and gigabytes);
- `check_against_model`: the tensors the config's model expects, all present with their
  shapes, and nothing unexpected (transformers' own ignore lists honoured).

Each raises `owl_sparse.errors.InputError` naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from torch import nn

from ..errors import InputError
from .safetensors import TensorEntry, read_header

# Bounds no real causal LM comes near; beyond them a config is corrupt or hostile.
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # hidden / intermediate size, heads
MAX_VOCAB = 1 << 23
MAX_POSITIONS = 1 << 24

_SIZES = {
    "num_hidden_layers": MAX_LAYERS,
    "hidden_size": MAX_WIDTH,
    "intermediate_size": MAX_WIDTH,
    "num_attention_heads": MAX_WIDTH,
    "num_key_value_heads": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "vocab_size": MAX_VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "ffn_dim": MAX_WIDTH,
    "word_embed_proj_dim": MAX_WIDTH,
}
# Floating fields that must be finite and > 0 when present.
_POSITIVE = (
    "rope_theta",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "initializer_range",
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _floats(value, path: str):
    """(dotted name, value) of every float inside nested dicts / lists."""
    stack = [(path, value)]
    while stack:
        name, v = stack.pop()
        if isinstance(v, float):
            yield name, v
        elif isinstance(v, dict):
            stack.extend((f"{name}.{k}" if name else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{name}[{i}]", x) for i, x in enumerate(v))


# The dtype names a config.json may carry (transformers writes the torch name).
_DTYPE_NAMES = frozenset({"float32", "float16", "bfloat16", "float64", "auto"})


def check_config_values(values: dict, where) -> None:
    """``values``: a config.json as parsed. Sizes positive integers within bounds, every
    float finite (the epsilons and rope_theta > 0, also inside ``rope_parameters``), heads
    dividing the width; InputError naming the field. Run before transformers reads the
    config (its own validation divides by the head count)."""
    text = values.get("text_config") if isinstance(values.get("text_config"), dict) else {}
    merged = {**values, **text}
    for name, bound in _SIZES.items():
        aliases = {
            "num_hidden_layers": ("n_layer",),
            "hidden_size": ("n_embd",),
            "num_attention_heads": ("n_head",),
            "max_position_embeddings": ("n_positions",),
        }
        for key in (name, *aliases.get(name, ())):
            v = merged.get(key)
            if v is None:
                continue
            if not _is_int(v) or not 1 <= v <= bound:
                raise InputError(
                    f"{where}: config {key} = {v!r}: expected an integer in [1, {bound}]"
                )
    for name, v in _floats(values, ""):
        if not math.isfinite(v):
            raise InputError(f"{where}: config {name} = {v!r}: not a finite number")
        if name.rsplit(".", 1)[-1] in _POSITIVE and v <= 0:
            raise InputError(f"{where}: config {name} = {v!r}: expected a number > 0")
    for key in ("dtype", "torch_dtype"):
        v = values.get(key)
        if v is not None and not (isinstance(v, str) and v in _DTYPE_NAMES):
            raise InputError(
                f"{where}: config {key} = {v!r}: expected one of {', '.join(sorted(_DTYPE_NAMES))}"
            )
    # Token ids: non-negative ints (a list for eos); the padding id indexes the embedding,
    # so it must lie inside the vocabulary (bos / eos of real configs sometimes do not).
    vocab = merged.get("vocab_size") if _is_int(merged.get("vocab_size")) else 2**31
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = merged.get(key)
        top = vocab if key == "pad_token_id" else 2**31
        for tid in v if isinstance(v, list) else [v]:
            if tid is not None and not (_is_int(tid) and 0 <= tid < top):
                raise InputError(
                    f"{where}: config {key} = {v!r}: expected a token id in [0, {top}) or null"
                )
    hidden = merged.get("hidden_size", merged.get("n_embd"))
    heads = merged.get("num_attention_heads", merged.get("n_head"))
    if _is_int(hidden) and _is_int(heads) and merged.get("head_dim") is None and hidden % heads:
        raise InputError(
            f"{where}: config hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )
    kv = merged.get("num_key_value_heads")
    if _is_int(kv) and _is_int(heads) and heads % kv:
        raise InputError(
            f"{where}: config num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv}"
        )


def read_weight_headers(path: Path, files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor's header entry across ``files`` (a directory's weight files, as
    `owl_sparse.io.skeleton.weight_files` lists them), checked against the shard index when
    there is one. InputError for a missing shard, a tensor the index places elsewhere or
    leaves out, or a tensor stored twice."""
    index_file = path / "model.safetensors.index.json"
    weight_map = None
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index_file}: not a valid shard index ({e})") from e
        if not isinstance(weight_map, dict):
            raise InputError(f"{index_file}: weight_map is not an object")
    entries: dict[str, TensorEntry] = {}
    owner: dict[str, str] = {}
    for f in files:
        if not f.is_file():
            raise InputError(f"{path}: shard {f.name} listed in {index_file.name} is missing")
        found, _ = read_header(f)
        for name, entry in found.items():
            if name in entries:
                raise InputError(
                    f"{path}: tensor {name!r} is stored in both {owner[name]} and {f.name}"
                )
            entries[name], owner[name] = entry, f.name
    if weight_map is not None:
        for name, shard in weight_map.items():
            if owner.get(name) != shard:
                raise InputError(
                    f"{index_file}: tensor {name!r} is listed in {shard} but "
                    + (f"stored in {owner[name]}" if name in owner else "not stored there")
                )
        unlisted = sorted(set(entries) - set(weight_map))
        if unlisted:
            raise InputError(f"{index_file}: tensors {unlisted[:3]} are stored but not listed")
        shards = sorted(
            p.name
            for p in path.glob("*.safetensors")
            if p.name not in set(weight_map.values()) and p.name != "owl_sparse.safetensors"
        )
        if shards:
            raise InputError(
                f"{index_file}: shard(s) {shards[:3]} in the directory are not in the index "
                "(their tensors would never be loaded)"
            )
    return entries


_NUMBER = re.compile(r"\.(\d+)\.")


def layers_in(names) -> int:
    """Decoder layers the tensor names hold: the largest index + 1 under the name prefix
    (``model.layers``, ``transformer.h`` ...) that holds the most numbered entries."""
    by_prefix: dict[str, set[int]] = {}
    for name in names:
        m = _NUMBER.search(name)
        if m:
            by_prefix.setdefault(name[: m.start()], set()).add(int(m.group(1)))
    if not by_prefix:
        return 0
    return max(
        max(v) + 1 for v in by_prefix.values() if len(v) == max(map(len, by_prefix.values()))
    )


def check_layer_count(config, names, where) -> None:
    """InputError unless the config's ``num_hidden_layers`` equals the layers the stored
    tensor names hold (before anything is built)."""
    want = getattr(config, "num_hidden_layers", None)
    have = layers_in(names)
    if _is_int(want) and have and want != have:
        raise InputError(
            f"{where}: config.json says num_hidden_layers = {want} but the weights hold "
            f"{have} layers"
        )


def _ignored(model: nn.Module, attr: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model, attr, None) or [])]


def check_against_model(
    model: nn.Module, expected: dict, entries: dict[str, TensorEntry], where
) -> None:
    """Every parameter and persistent buffer of the (meta) ``model`` stored once (tied
    tensors under one of their names) with its shape; no stored tensor the model lacks.
    transformers' ``_keys_to_ignore_on_load_*`` patterns and the model's non-persistent
    buffers (old checkpoints store rotary tables) are allowed. ``expected``: the model's
    parameters and persistent buffers by every name (`owl_sparse.io.skeleton.expected_tensors`).
    InputError naming it."""
    groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        groups.setdefault(id(t), []).append(name)
    skip_missing = _ignored(model, "_keys_to_ignore_on_load_missing")
    for names in groups.values():
        present = [n for n in names if n in entries]
        if not present and not any(p.search(n) for p in skip_missing for n in names):
            raise InputError(f"{where}: missing tensor {names[0]!r}")
        for n in present:
            want = tuple(expected[n].shape)
            if entries[n].shape != want:
                raise InputError(
                    f"{where}: tensor {n!r} has shape {list(entries[n].shape)}, the config "
                    f"implies {list(want)}"
                )
    buffers = {n for n, _ in model.named_buffers()}
    skip_unexpected = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    extra = sorted(
        n
        for n in entries
        if n not in expected and n not in buffers and not any(p.search(n) for p in skip_unexpected)
    )
    if extra:
        raise InputError(f"{where}: unexpected tensor(s) {extra[:5]} (not part of this model)")
