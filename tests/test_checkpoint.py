"""Packed checkpoints: round trips, the sparsity record, atomic saves, sizes, load memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, REPO, tiny_model

from owl_sparse.errors import InputError
from owl_sparse.io import RECORD, WEIGHTS, atomic, load_pretrained, save_pretrained
from owl_sparse.io import packed as checkpoint
from owl_sparse.io.record import calibration_hash
from owl_sparse.io.safetensors import read_header
from owl_sparse.models import load_model
from owl_sparse.nn import SparseLinear, sparsify_
from owl_sparse.pruning import PruneConfig, prune

CALIBRATION = {"text": "random tokens", "samples": 4, "seqlen": 32, "seed": 0}


def pruned_model(
    family: str, fmt: str, allocation: str = "uniform", dtype=torch.float32, **overrides
):
    """A tiny random model pruned with Wanda (70% or 2:4) and packed; returns (model, report)."""
    model = tiny_model(family, **overrides).to(dtype)
    vocab = model.config.vocab_size
    calibration = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    pattern = "2:4" if fmt == "2:4" else "unstructured"
    report = prune(
        model, calibration, PruneConfig(method="wanda", pattern=pattern, allocation=allocation)
    )
    sparsify_(model, format=fmt, masks=report.masks)
    return model, report


def logits(model, vocab: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def packed_layers(model) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_outputs_equal(tmp_path, family, fmt):
    model, report = pruned_model(family, fmt)
    vocab = model.config.vocab_size
    before = logits(model, vocab)
    save_pretrained(model, tmp_path / "ck", prune_report=report, calibration=CALIBRATION)
    loaded, tokenizer = load_model(tmp_path / "ck")  # the generic entry routes to the loader
    assert tokenizer is None
    assert torch.equal(logits(loaded, vocab), before)
    old, new = packed_layers(model), packed_layers(loaded)
    assert set(old) == set(new) and len(new) >= 8
    for name, layer in old.items():
        assert new[name].format == layer.format == fmt
        for key, t in layer.packed.state_dict().items():
            assert torch.equal(new[name].packed.state_dict()[key], t), (name, key)
    record = json.loads((tmp_path / "ck" / RECORD).read_text())
    assert record["prune"]["method"] == "wanda" and record["prune"]["allocation"] == "uniform"
    assert record["prune"]["allocation_params"]["pattern"] == (
        "2:4" if fmt == "2:4" else "unstructured"
    )
    assert record["calibration"]["sha256"] == calibration_hash(CALIBRATION)
    assert set(record["versions"]) >= {"owl_sparse", "torch", "transformers"}
    assert record["conv1d_to_linear"] == (family == "gpt2")
    achieved = {r.name: r.achieved_sparsity for r in report.layers}
    for name, spec in record["layers"].items():
        assert spec["format"] == fmt
        if fmt == "bitmap":
            assert spec["sparsity"] == pytest.approx(achieved[name], abs=1e-6)
        assert spec["target_sparsity"] == pytest.approx(0.7 if fmt == "bitmap" else 0.5)


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_stories260k_round_trip_with_tokenizer_and_cli(tmp_path, shared_data, fmt):
    model, tokenizer = load_model(shared_data / "stories260K" / "stories260K.bin")
    text = "Once upon a time, there was a little girl named Lily. She liked to play outside."
    ids = torch.tensor([tokenizer.encode(text) * 4])
    allocation = "owl" if fmt == "bitmap" else "uniform"
    pattern = "2:4" if fmt == "2:4" else "unstructured"
    report = prune(
        model, ids[:, :64], PruneConfig(method="wanda", pattern=pattern, allocation=allocation)
    )
    sparsify_(model, format=fmt, masks=report.masks)
    with torch.no_grad():
        before = model(ids[:, :40]).logits
    save_pretrained(model, tmp_path / "ck", tokenizer=tokenizer, prune_report=report)
    loaded, tok2 = load_model(tmp_path / "ck")
    assert type(tok2).__name__ == "Llama2cTokenizer" and tok2.encode(text) == tokenizer.encode(text)
    with torch.no_grad():
        assert torch.equal(loaded(ids[:, :40]).logits, before)
    record = json.loads((tmp_path / "ck" / RECORD).read_text())
    assert record["prune"]["allocation"] == allocation
    assert record["prune"]["allocation_params"]["owl_lambda"] == pytest.approx(0.08)


def test_cli_prune_out_then_eval_and_generate(tmp_path, shared_data, capsys):
    from owl_sparse.cli.main import main

    model_file = str(shared_data / "stories260K" / "stories260K.bin")
    text = tmp_path / "t.txt"
    text.write_text(
        "Once upon a time, there was a little girl named Lily. She liked to play. " * 30
    )
    prune_args = ["prune", "--model", model_file, "--method", "magnitude", "--allocation"]
    prune_args += ["uniform", "--out", str(tmp_path / "ck"), "--format", "bitmap", "--quiet"]
    assert main(prune_args + ["--device", "cpu"]) == 0
    record = json.loads((tmp_path / "ck" / RECORD).read_text())
    assert record["prune"]["method"] == "magnitude" and record["calibration"]["sha256"]
    assert {spec["format"] for spec in record["layers"].values()} == {"bitmap"}
    eval_args = ["eval", "--model", str(tmp_path / "ck"), "--text", str(text), "--seqlen", "32"]
    assert main(eval_args + ["--max-windows", "2", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["windows"] == 2
    gen_args = ["generate", str(tmp_path / "ck"), "--prompt", "Once upon a time"]
    assert main(gen_args + ["--max-new-tokens", "8", "--json", "--device", "cpu"]) == 0
    assert "Once upon a time" in capsys.readouterr().out


def test_tied_weights_stored_once(tmp_path):
    model, _ = pruned_model("opt", "bitmap")
    save_pretrained(model, tmp_path / "ck")
    entries, _ = read_header(tmp_path / "ck" / WEIGHTS)
    assert "lm_head.weight" not in entries and "model.decoder.embed_tokens.weight" in entries
    record = json.loads((tmp_path / "ck" / RECORD).read_text())
    assert record["tied"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    loaded, _ = load_pretrained(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_load_with_dtype_and_device(tmp_path):
    model, _ = pruned_model("llama", "bitmap")
    save_pretrained(model, tmp_path / "ck")
    loaded, _ = load_pretrained(tmp_path / "ck", device="cpu", dtype=torch.bfloat16)
    layer = next(iter(packed_layers(loaded).values()))
    assert layer.values.dtype == torch.bfloat16 and layer.bitmap.dtype == torch.int32
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(loaded, 128).float()).all()


def test_layer_bytes_within_three_percent_of_ideal(tmp_path):
    """fp16, tile-aligned shapes: bitmap 1/8 + 2(1-s) bytes per weight, 2:4 1.125."""
    over = dict(hidden_size=256, intermediate_size=512, head_dim=64)
    for fmt in ("bitmap", "2:4"):
        model, _ = pruned_model("llama", fmt, dtype=torch.float16, **over)
        save_pretrained(model, tmp_path / fmt)
        entries, _ = read_header(tmp_path / fmt / WEIGHTS)
        for name, layer in packed_layers(model).items():
            n, k = layer.out_features, layer.in_features
            stored = sum(e.nbytes for e in entries.values() if e.name.startswith(name + "."))
            if fmt == "bitmap":
                ideal = n * k * (1 / 8 + 2 * (1 - layer.sparsity))
            else:
                ideal = n * k * 1.125
            assert ideal <= stored <= 1.03 * ideal, (name, stored, ideal)
        emb = entries["model.embed_tokens.weight"]
        assert emb.nbytes == 2 * emb.shape[0] * emb.shape[1]  # the rest is stored densely


def test_resave_replaces_and_refuses_foreign_directory(tmp_path):
    model, _ = pruned_model("llama", "bitmap")
    save_pretrained(model, tmp_path / "ck")
    save_pretrained(model, tmp_path / "ck")  # replacing a checkpoint is allowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no leftovers
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="exists"):
        save_pretrained(model, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    model, _ = pruned_model("llama", "bitmap")
    save_pretrained(model, tmp_path / "ck")
    before = logits(load_pretrained(tmp_path / "ck")[0], 128)
    real_write = checkpoint.write_safetensors

    def failing_write(path, tensors, metadata=None):
        real_write(path, dict(list(tensors.items())[:3]), metadata)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "ck")
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert torch.equal(logits(load_pretrained(tmp_path / "ck")[0], 128), before)


def test_crash_mid_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    """A hard crash (no cleanup runs) after the weights were written, before the record."""
    model, _ = pruned_model("llama", "bitmap")
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)  # cleanup never runs
    monkeypatch.setattr(
        checkpoint.json, "dump", lambda *a, **k: (_ for _ in ()).throw(SystemExit(9))
    )
    with pytest.raises(SystemExit):
        save_pretrained(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    (debris,) = list(tmp_path.iterdir())
    assert debris.name.startswith(".ck.tmp-") and (debris / WEIGHTS).is_file()
    assert not (debris / RECORD).exists() and not (debris / "model.safetensors").exists()
    with pytest.raises(InputError, match="not an owl-sparse checkpoint"):
        load_pretrained(debris)
    with pytest.raises((InputError, OSError)):  # transformers finds no weights it knows
        load_model(debris)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import LlamaForCausalLM  # imports are not part of the load's memory
    from owl_sparse.pruning.report import PeakMemory
    from owl_sparse.io import load_pretrained
    import owl_sparse.nn
    with PeakMemory(torch.device("cpu"), interval=0.002) as mem:
        model, _ = load_pretrained(sys.argv[1])
    print(json.dumps({"peak": mem.peak_bytes}))
    """
)


def test_load_peak_memory_near_packed_size(tmp_path):
    """Loading a 70% bitmap model (67M linear weights, fp32) stays near its packed size."""
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(0)  # random 70% masks: pruning itself is not under test
    masks = {
        n: torch.rand(m.weight.shape, generator=gen) >= 0.7
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    sparsify_(model, format="bitmap", masks=masks)
    dense_bytes = sum(4 * m.out_features * m.in_features for m in packed_layers(model).values())
    save_pretrained(model, tmp_path / "ck")
    del model, masks
    file_bytes = (tmp_path / "ck" / WEIGHTS).stat().st_size
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    # Packed file ~91 MB; dense fp32 linears 268 MB.  Fixed costs on top of the file: module
    # objects, rotary tables and the largest layer's validation temporaries (~40 MB here).
    assert peak < file_bytes + 64 * 2**20, (peak, file_bytes, dense_bytes)
    assert peak < 0.6 * dense_bytes, (peak, file_bytes, dense_bytes)


# ------------------------------------------------------------------ compressed-tensors
def _masked_dense(family: str, fmt: str):
    """A tiny dense model whose decoder linears are pruned in place (70% or 2:4), and masks."""
    model = tiny_model(family)
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    pattern = "2:4" if fmt == "2:4" else "unstructured"
    report = prune(model, calibration, PruneConfig(method="wanda", pattern=pattern))
    return model, report.masks


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_compressed_tensors_export_import_round_trip(tmp_path, fmt):
    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    model, report = pruned_model("qwen2", fmt)
    before = logits(model, 128)
    save_pretrained(model, tmp_path / "ck", prune_report=report)
    export_compressed_tensors(tmp_path / "ck", tmp_path / "ct")  # from a checkpoint directory
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    sparsity = cfg["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == ("sparse-24-bitmask" if fmt == "2:4" else "sparse-bitmask")
    entries, _ = read_header(tmp_path / "ct" / "model.safetensors")
    layer = "model.layers.0.mlp.up_proj"
    assert entries[f"{layer}.bitmask"].dtype == torch.uint8
    assert (f"{layer}.row_offsets" in entries) == (fmt == "bitmap")
    loaded, _ = load_pretrained(tmp_path / "ct")
    assert torch.equal(logits(loaded, 128), before)
    assert {m.format for m in packed_layers(loaded).values()} == {fmt}


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_documented_compressed_tensors_layout_loads(tmp_path, fmt):
    """A checkpoint built by hand from reference.md's description (numpy.packbits etc.)."""
    import numpy as np
    from safetensors.torch import save_file

    model, masks = _masked_dense("llama", fmt)
    model.save_pretrained(tmp_path / "ct")
    state = model.state_dict()
    for name, mask in masks.items():
        w = state.pop(f"{name}.weight")
        bits = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
        state[f"{name}.bitmask"] = bits
        if fmt == "2:4":
            state[f"{name}.shape"] = torch.tensor(list(w.shape)).reshape(-1, 1)
            state[f"{name}.compressed"] = w[mask].reshape(w.shape[0], -1)
        else:
            counts = mask.sum(1)
            state[f"{name}.shape"] = torch.tensor(list(w.shape))
            state[f"{name}.compressed"] = w[mask]
            state[f"{name}.row_offsets"] = torch.cumsum(counts, 0) - counts
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ct" / "model.safetensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    ct_format = "sparse-24-bitmask" if fmt == "2:4" else "sparse-bitmask"
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.9.4",
        "sparsity_config": {"format": ct_format, "targets": ["Linear"]},
    }
    (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    loaded, _ = load_pretrained(tmp_path / "ct")
    for name, layer in packed_layers(loaded).items():
        assert torch.equal(layer.dense_weight(), model.get_submodule(name).weight), name
    torch.testing.assert_close(logits(loaded, 128), logits(model, 128), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_against_the_compressed_tensors_package(tmp_path, fmt):
    """compressed-tensors 0.14.0.1 (last release with the sparse compressors) both ways."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    from safetensors.torch import save_file

    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    model, masks = _masked_dense("llama", fmt)
    ref = logits(model, 128)
    # theirs -> ours: the package compresses the pruned dense model as llm-compressor did.
    config_cls = Sparse24BitMaskConfig if fmt == "2:4" else BitmaskConfig
    compressor = ModelCompressor(sparsity_config=config_cls(targets=["Linear"], ignore=["lm_head"]))
    state = compressor.compress(model)
    model.save_pretrained(tmp_path / "theirs")
    save_file(
        {k: v.contiguous() for k, v in state.items()}, tmp_path / "theirs" / "model.safetensors"
    )
    compressor.update_config(str(tmp_path / "theirs"))
    loaded, _ = load_pretrained(tmp_path / "theirs")
    layers = packed_layers(loaded)
    assert set(layers) == set(masks) and {m.format for m in layers.values()} == {fmt}
    for name, layer in layers.items():
        assert torch.equal(layer.dense_weight(), model.get_submodule(name).weight), name
    torch.testing.assert_close(logits(loaded, 128), ref, rtol=1e-5, atol=1e-5)
    # ours -> theirs: the package decompresses our export into a fresh dense model.
    export_compressed_tensors(loaded, tmp_path / "ours")
    fresh = tiny_model("llama", seed=5)
    ModelCompressor.from_pretrained(str(tmp_path / "ours")).decompress(
        str(tmp_path / "ours"), fresh
    )
    for name in masks:
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight), name
    torch.testing.assert_close(logits(fresh, 128), ref, rtol=0, atol=0)
