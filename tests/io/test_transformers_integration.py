"""AutoModelForCausalLM.from_pretrained opens our packed checkpoints (the registered
"owl_sparse" quantization method): same model as load_pretrained, same checks, transformers'
dtype / device_map honoured, and model.save_pretrained writing the packed layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from factories import FAMILIES, REPO, _tokenizer, logits, pruned_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from owl_sparse.errors import InputError
from owl_sparse.io import RECORD, WEIGHTS, load_pretrained, save_pretrained
from owl_sparse.io.record import INDEX, QUANT_METHOD
from owl_sparse.io.safetensors import file_sha256
from owl_sparse.nn import SparseLinear


def _saved(tmp_path, family="llama", fmt="bitmap", tokenizer=None):
    model, report = pruned_model(family, fmt)
    path = tmp_path / f"{family}-{fmt.replace(':', '')}"
    save_pretrained(model, path, tokenizer=tokenizer, prune_report=report)
    return model, path


def _n_sparse(model) -> int:
    return sum(isinstance(m, SparseLinear) for m in model.modules())


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_equals_load_pretrained(tmp_path, family, fmt):
    model, path = _saved(tmp_path, family, fmt)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert set(json.loads((path / INDEX).read_text())["weight_map"].values()) == {WEIGHTS}
    hf = AutoModelForCausalLM.from_pretrained(path)
    ours, _ = load_pretrained(path)
    assert _n_sparse(hf) == _n_sparse(ours) == _n_sparse(model) > 0
    assert not hf.training
    vocab = model.config.vocab_size
    assert torch.equal(logits(hf, vocab), logits(ours, vocab))
    assert torch.equal(logits(hf, vocab), logits(model, vocab))


def test_dtype_and_device_map(tmp_path):
    model, path = _saved(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    layer = next(m for m in hf.modules() if isinstance(m, SparseLinear))
    assert layer.values.dtype == torch.bfloat16 and layer.bitmap.dtype == torch.int32
    ours, _ = load_pretrained(path, dtype=torch.bfloat16)
    vocab = model.config.vocab_size
    assert torch.equal(logits(hf, vocab), logits(ours, vocab))


def test_no_dense_weight_is_materialised(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path)
    names = {n for n, _ in hf.named_parameters()} | {n for n, _ in hf.named_buffers()}
    packed = [n for n, m in hf.named_modules() if isinstance(m, SparseLinear)]
    assert packed and not any(f"{n}.weight" in names for n in packed)


def _edit_weights(path, edit) -> None:
    """Rewrite the weights file with ``edit(tensors)`` applied, and the size and sha256 the
    record keeps (so only the edit itself can be caught)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    record = json.loads((path / RECORD).read_text())
    record["weights_bytes"] = (path / WEIGHTS).stat().st_size
    record["weights_sha256"] = file_sha256(path / WEIGHTS)
    (path / RECORD).write_text(json.dumps(record))


def _first(tensors, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def test_corrupt_bitmap_is_refused(tmp_path):
    def flip(tensors):
        name = _first(tensors, "q_proj.bitmap")
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] ^= 1  # the popcount no longer matches the tile offsets

    _, path = _saved(tmp_path)
    _edit_weights(path, flip)
    with pytest.raises(InputError, match="q_proj"):
        AutoModelForCausalLM.from_pretrained(path)


def test_changed_config_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(path)


def test_truncated_weights_are_refused_before_reading(tmp_path):
    from safetensors import SafetensorError

    _, path = _saved(tmp_path)
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[:-64])
    # transformers opens the file's header itself before our quantizer runs: either that
    # refuses it, or our size check does; never a model.
    with pytest.raises((InputError, SafetensorError), match="truncated|not fully covered"):
        AutoModelForCausalLM.from_pretrained(path)


def test_non_finite_value_is_refused(tmp_path):
    def poison(tensors):
        tensors[_first(tensors, "norm.weight")][0] = float("nan")

    _, path = _saved(tmp_path)
    _edit_weights(path, poison)
    with pytest.raises(InputError, match="norm.weight"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_tensor_is_refused_not_initialised(tmp_path):
    def drop(tensors):
        del tensors[_first(tensors, "input_layernorm.weight")]

    _, path = _saved(tmp_path)
    _edit_weights(path, drop)
    with pytest.raises(InputError, match="missing tensor"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("source", ["from_pretrained", "sparsify_"])
def test_save_pretrained_writes_the_packed_layout(tmp_path, source):
    model, path = _saved(tmp_path, "qwen3", "bitmap")
    if source == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(path)
    out = tmp_path / "again"
    model.save_pretrained(out, safe_serialization=True)
    assert (out / RECORD).is_file() and (out / WEIGHTS).is_file()
    assert not (out / "model.safetensors").exists()
    again, _ = load_pretrained(out)
    vocab = model.config.vocab_size
    assert torch.equal(logits(again, vocab), logits(model, vocab))
    with pytest.raises(InputError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)


def test_lm_eval_hf_loading_path_in_a_fresh_process(tmp_path):
    """What ``lm_eval --model hf --model_args pretrained=DIR`` does to load: AutoConfig,
    AutoTokenizer and AutoModelForCausalLM.from_pretrained with revision / dtype /
    trust_remote_code, in a process that only imported owl_sparse first."""
    model, path = _saved(tmp_path, tokenizer=_tokenizer())
    code = f"""
import owl_sparse, torch, transformers
path = {str(path)!r}
config = transformers.AutoConfig.from_pretrained(path, revision="main", trust_remote_code=False)
tok = transformers.AutoTokenizer.from_pretrained(path, revision="main", trust_remote_code=False)
model = transformers.AutoModelForCausalLM.from_pretrained(
    path, revision="main", dtype="auto", trust_remote_code=False, device_map="cpu"
)
n = sum(type(m).__name__ == "SparseLinear" for m in model.modules())
ids = torch.tensor([tok.encode("w1 w2 w3 w4")])
with torch.no_grad():
    print(n, float(model(ids).logits.double().sum()))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    n, total = done.stdout.split()
    ids = torch.tensor([AutoTokenizer.from_pretrained(path).encode("w1 w2 w3 w4")])
    with torch.no_grad():
        expected = float(model(ids).logits.double().sum())
    assert int(n) == _n_sparse(model)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert REPO.is_dir()


def test_flipped_weight_bit_is_refused_by_from_pretrained(tmp_path):
    _, path = _saved(tmp_path)
    with open(path / WEIGHTS, "r+b") as f:
        f.seek(-3, 2)  # a byte of the last tensor's data
        byte = f.read(1)[0]
        f.seek(-3, 2)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(InputError, match="sha256 mismatch"):
        AutoModelForCausalLM.from_pretrained(path)
