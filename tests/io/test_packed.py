"""Packed checkpoints: round trips, the sparsity record, atomic saves, sizes, load memory;
saves refused (non-finite, corrupt-looking or mixed-dtype values, foreign files) before
anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factories import (
    FAMILIES,
    Q0,
    REPO,
    _packed_model,
    _prune_argv,
    digest,
    hidden,
    logits,
    packed_layers,
    pruned_model,
)

from owl_sparse.cli.main import main
from owl_sparse.errors import InputError
from owl_sparse.io import RECORD, WEIGHTS, atomic, load_pretrained, save_pretrained
from owl_sparse.io import packed as checkpoint
from owl_sparse.io.record import calibration_hash
from owl_sparse.io.safetensors import read_header
from owl_sparse.models import load_model
from owl_sparse.nn import sparsify_
from owl_sparse.pruning import PruneConfig, prune

CALIBRATION = {"text": "random tokens", "samples": 4, "seqlen": 32, "seed": 0}


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

    def failing_write(path, tensors, metadata=None, hasher=None):
        real_write(path, dict(list(tensors.items())[:3]), metadata, hasher)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "ck")
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert torch.equal(logits(load_pretrained(tmp_path / "ck")[0], 128), before)


def test_failed_final_rename_restores_the_previous_checkpoint(ck, monkeypatch):
    """Where directories cannot be swapped in one step (two renames)."""
    before = digest(ck)
    real = os.replace
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)

    def flaky(src, dst):
        if Path(dst) == ck and ".tmp-" in Path(src).name:
            raise OSError(5, "I/O error (simulated)")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(_packed_model(), ck)
    assert digest(ck) == before
    assert hidden(ck.parent) == []


def test_failed_first_rename_leaves_no_empty_old_directory(ck, monkeypatch):
    before = digest(ck)
    real = os.replace
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)

    def flaky(src, dst):
        if Path(src) == ck:
            raise PermissionError(13, "Permission denied (simulated)")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(PermissionError):
        save_pretrained(_packed_model(), ck)
    assert digest(ck) == before
    assert hidden(ck.parent) == []


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


def test_checkpoint_directory_gets_the_umask_mode(hf_dir, text_file, tmp_path):
    """mkdtemp makes 0700 directories (and transformers 0600 weights): a saved checkpoint
    is readable like any directory made under the umask."""
    old = os.umask(0o022)
    try:
        save_pretrained(_packed_model(), tmp_path / "ck")
        assert main(_prune_argv(hf_dir, text_file, "--out", str(tmp_path / "dense"))) == 0
    finally:
        os.umask(old)
    for d in (tmp_path / "ck", tmp_path / "dense"):
        assert d.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in d.iterdir()} == {0o644}


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


# ------------------------------------------------------------------ bad input


def test_save_refuses_non_finite_values_naming_the_tensor(tmp_path):
    model = _packed_model()
    with torch.no_grad():
        model.get_submodule(Q0).values[0] = float("nan")
    with pytest.raises(InputError, match=rf"{Q0}\.values.*NaN"):
        save_pretrained(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_save_refuses_non_finite_dense_parameter(tmp_path):
    model = _packed_model()
    with torch.no_grad():
        model.model.norm.weight[1] = float("inf")
    with pytest.raises(InputError, match=r"model\.norm\.weight"):
        save_pretrained(model, tmp_path / "ck")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_refuses_what_load_refuses_as_corrupt(tmp_path, dtype):
    """70000 (beyond float16, beyond any trained weight) is refused by the loader as a sign
    of corruption in every dtype, so the save refuses it first, naming the tensor, and
    writes nothing."""
    model = _packed_model(dtype=dtype)
    with torch.no_grad():
        model.get_submodule(Q0).values[0] = 70000.0
    with pytest.raises(InputError, match=rf"{Q0}\.values.*magnitude 7(\.\d+)?e\+04"):
        save_pretrained(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_save_refuses_a_layer_in_another_dtype(tmp_path):
    """A fp32 model with one bf16 packed layer would save, then fail to load."""
    model = _packed_model()
    model.get_submodule(Q0).to(torch.bfloat16)
    with pytest.raises(InputError, match=Q0):
        save_pretrained(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_save_over_checkpoint_with_extra_files_is_refused(ck):
    (ck / "user_notes.txt").write_text("mine")
    (ck / "eval").mkdir()
    before = digest(ck)
    with pytest.raises(InputError, match=r"user_notes\.txt.*eval|eval.*user_notes\.txt"):
        save_pretrained(_packed_model(), ck)
    assert digest(ck) == before and (ck / "eval").is_dir()
    assert hidden(ck.parent) == []
