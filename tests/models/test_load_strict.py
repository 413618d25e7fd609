"""A dense Hugging Face directory is checked as strictly as our packed one: every tensor
the config implies present with its shape, nothing unexpected, the shard index consistent,
config values sane, the layer count compared with the weights before anything is built."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time

import pytest
import torch
from factories import _packed_model, _tokenizer, one_line_error, tiny_model
from fuzzing import mutate_bytes, mutate_config, mutate_header_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from owl_sparse.cli.main import main
from owl_sparse.errors import InputError
from owl_sparse.io import RECORD, save_pretrained
from owl_sparse.models.load import load_model


def _copy(hf_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    return d


def _edit_weights(d, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def test_the_untouched_directory_loads(hf_dir):
    load_model(hf_dir)


def test_missing_tensor_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_weights(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(InputError, match="missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        load_model(d)


def test_unexpected_tensor_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_weights(d, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(InputError, match="unexpected tensor"):
        load_model(d)


def test_wrong_shape_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(InputError, match="model.norm.weight.*shape"):
        load_model(d)


def test_shard_left_out_of_the_index_is_refused(tmp_path):
    d = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(d, max_shard_size="20KB")
    _tokenizer().save_pretrained(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    load_model(d)  # as saved: fine
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shards[1]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="not in the index|missing tensor"):
        load_model(d)


def test_missing_shard_is_refused(tmp_path):
    d = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(d, max_shard_size="20KB")
    _tokenizer().save_pretrained(d)
    shard = sorted((d).glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(InputError, match=f"{shard.name}.*missing"):
        load_model(d)


def test_fewer_layers_in_config_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, num_hidden_layers=1)
    with pytest.raises(InputError, match="num_hidden_layers = 1 but the weights hold 2"):
        load_model(d)


@pytest.mark.parametrize("packed", [False, True])
def test_a_million_layers_is_refused_at_once(hf_dir, tmp_path, packed):
    if packed:
        d = tmp_path / "ck"
        save_pretrained(_packed_model(), d, tokenizer=_tokenizer())
        _edit_config(d, num_hidden_layers=1_000_000)
        record = json.loads((d / RECORD).read_text())  # as anyone crafting a file can
        record["config_sha256"] = hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
        (d / RECORD).write_text(json.dumps(record))
    else:
        d = _copy(hf_dir, tmp_path)
        _edit_config(d, num_hidden_layers=1_000_000)
    start = time.perf_counter()
    with pytest.raises(InputError, match="num_hidden_layers"):
        load_model(d)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_attention_heads", 0),
        ("vocab_size", 0),
        ("max_position_embeddings", 0),
        ("rope_theta", float("inf")),
        ("rms_norm_eps", float("nan")),
        ("hidden_size", -64),
    ],
)
def test_absurd_config_values_are_one_line_errors(hf_dir, tmp_path, capsys, field, value):
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, **{field: value})
    with pytest.raises(InputError, match=field):
        load_model(d)
    assert main(["info", "--model", str(d)]) == 2
    one_line_error(capsys, field)


def test_deeply_nested_config_is_a_one_line_error(hf_dir, tmp_path, capsys):
    d = _copy(hf_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(
        json.dumps(config)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    assert main(["info", "--model", str(d)]) == 2
    one_line_error(capsys, "config.json")


def test_nan_weight_is_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)

    def poison(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")

    _edit_weights(d, poison)
    with pytest.raises(InputError, match="q_proj.weight.*NaN"):
        load_model(d)


# ------------------------------------------------------------------ fuzz
@st.composite
def _dense_mutations(draw):
    target = draw(st.sampled_from(["model.safetensors"] * 3 + ["config.json"] * 3))
    kind = draw(st.sampled_from(["bytes", "header_bytes", "truncate", "insert", "header_json"]))
    payload = draw(st.lists(st.integers(0, 255), min_size=1, max_size=8))
    return target, kind, draw(st.integers(0, 2**32)), payload


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation=_dense_mutations())
def test_fuzz_dense_directory_loads_finite_or_raises_input_error(
    hf_dir, tmp_path_factory, mutation
):
    """Mutated dense HF directories (weights bytes and header numbers, config values): the
    loader returns a model with finite logits or raises InputError, quickly; anything
    else (another exception, a hang, a silent model of the wrong size) is a bug."""
    target, kind, seed, payload = mutation
    d = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(hf_dir, d)
    data = (d / target).read_bytes()
    if target == "config.json":
        data = mutate_config(data, seed, payload)
    elif kind == "header_json":
        data = mutate_header_json(data, seed, payload)
    else:
        header_len = struct.unpack("<Q", data[:8])[0]
        data = mutate_bytes(data, kind, seed, payload, header_len)
    (d / target).write_bytes(data)
    start = time.perf_counter()
    try:
        try:
            model, _ = load_model(d)
        except InputError:
            return
        with torch.no_grad():
            out = model(torch.tensor([[1, 5, 9, 2]])).logits
        assert torch.isfinite(out).all()
    finally:
        assert time.perf_counter() - start < 60, "a mutated directory took over a minute"
        shutil.rmtree(d.parent, ignore_errors=True)


@pytest.mark.parametrize("value", [1e308, "int3", ["float32"]])
def test_config_dtype_must_name_a_dtype(hf_dir, tmp_path, value):
    """Found by the fuzz: a number as ``dtype`` crashed transformers' config (IndexError)."""
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, dtype=value)
    with pytest.raises(InputError, match="config dtype"):
        load_model(d)


@pytest.mark.parametrize(
    ("key", "value"),
    [("pad_token_id", 2**31), ("pad_token_id", 10**5), ("bos_token_id", -1), ("eos_token_id", "x")],
)
def test_config_token_ids_are_checked(hf_dir, tmp_path, key, value):
    """Found by the fuzz: pad_token_id 2**31 tripped an assert inside nn.Embedding; the
    padding id must lie in the vocabulary, every id be a non-negative int."""
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, **{key: value})
    with pytest.raises(InputError, match=f"config {key}"):
        load_model(d)
