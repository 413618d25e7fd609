"""load_model: HF directories, GGUF, llama2.c files, built-in names; bad specs and files,
safetensors only, errors wrapped; the loaders' dtype / device arguments."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from factories import Q0, _Payload, one_line_error, tiny_model

from owl_sparse import settings
from owl_sparse.cli.main import main
from owl_sparse.errors import InputError
from owl_sparse.io import RECORD, WEIGHTS, load_pretrained, save_pretrained
from owl_sparse.models import load_model
from owl_sparse.nn import sparsify_
from owl_sparse.pruning import PruneConfig, prune


def test_load_hf_directory_roundtrip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tokenizer.encode("t5 t7") == [5, 7]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "neither a built-in name"),
        ("/nonexistent/dir/model.gguf", "neither a built-in name"),
    ],
)
def test_bad_model_specs(spec, message):
    with pytest.raises(InputError, match=message):
        load_model(spec)


def test_wrong_kind_of_file(tmp_path):
    bogus = tmp_path / "weights.txt"
    bogus.write_text("hello")
    with pytest.raises(InputError, match="unsupported model file"):
        load_model(bogus)
    fake_gguf = tmp_path / "m.gguf"
    fake_gguf.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(InputError, match="not a GGUF file"):
        load_model(fake_gguf)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_model(empty_dir)


# ------------------------------------------------------------------ bad input


def test_load_model_refuses_pickle_only_directory(hf_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model(d)
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=4))
    with pytest.raises(InputError, match="pickle"):
        load_model(d)
    assert not marker.exists()


def test_load_model_packed_checkpoint_without_record(ck, capsys):
    (ck / RECORD).unlink()
    with pytest.raises(InputError, match=rf"{WEIGHTS}.*{RECORD}"):
        load_model(ck)
    assert main(["eval", "--model", str(ck), "--text", "pydoc", "--quiet"]) == 2
    one_line_error(capsys, RECORD)


def test_load_model_truncated_safetensors(hf_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(InputError, match=str(d)):
        load_model(d)
    assert main(["info", "--model", str(d)]) == 2
    one_line_error(capsys, str(d))


def test_load_model_bad_config_value(hf_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = "abc"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=str(d)):
        load_model(d)


def test_load_model_corrupt_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OWL_SPARSE_CACHE", str(tmp_path / "cache"))
    settings.reload()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(60))
    with pytest.raises(InputError, match=r"bad\.gguf"):
        load_model(bad)
    assert main(["info", "--model", str(bad)]) == 2
    one_line_error(capsys, "bad.gguf")


def test_loaders_accept_dtype_names(hf_dir, ck):
    model, _ = load_model(hf_dir, dtype="bfloat16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    model, _ = load_pretrained(ck, dtype="float16")
    assert model.get_submodule(Q0).values.dtype == torch.float16


def test_half_precision_keeps_buffers_as_transformers_does(hf_dir, tmp_path):
    """load_model(dtype=bfloat16) converts parameters, not the rotary inv_freq table: as
    transformers loads it, and as a packed checkpoint of the model reloads (a bf16 table
    made the reloaded model's logits differ from the one that was saved)."""
    model, _ = load_model(hf_dir, dtype="bfloat16")
    buffers = {n: b for n, b in model.named_buffers() if "inv_freq" in n}
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    cal = torch.randint(
        0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)
    )
    report = prune(model, cal, PruneConfig(method="wanda", sparsity=0.5))
    sparsify_(model, masks=report.masks)
    save_pretrained(model, tmp_path / "packed")
    reloaded, _ = load_pretrained(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(model(cal[:1]).logits, reloaded(cal[:1]).logits)


@pytest.mark.parametrize("dtype", ["float64", "fp16", torch.float64, torch.int8, 3])
def test_loaders_refuse_other_dtypes(hf_dir, ck, dtype):
    with pytest.raises(InputError, match=r"dtype must be one of"):
        load_model(hf_dir, dtype=dtype)
    with pytest.raises(InputError, match=r"dtype must be one of"):
        load_pretrained(ck, dtype=dtype)


@pytest.mark.parametrize("device", ["bogus", "meta", 1.5])
def test_loaders_refuse_bad_devices(hf_dir, ck, device):
    with pytest.raises(InputError, match="device"):
        load_model(hf_dir, device=device)
    with pytest.raises(InputError, match="device"):
        load_pretrained(ck, device=device)
