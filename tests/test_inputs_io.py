"""Bad input at the I/O edges: saving over directories, loading foreign directories, the
CLI's argument checks and one-line errors (regressions of the input audit, tag "io")."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from owl_sparse import settings
from owl_sparse.cli.main import main
from owl_sparse.errors import InputError
from owl_sparse.io import RECORD, WEIGHTS, atomic, load_pretrained, save_pretrained, skeleton
from owl_sparse.models import load_model, model_info
from owl_sparse.nn import SparseLinear, sparsify_
from owl_sparse.pruning import PruneConfig, prune

Q0 = "model.layers.0.self_attn.q_proj"


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _packed_model(fmt: str = "bitmap", dtype=torch.float32):
    model = tiny_model("llama").to(dtype)
    report = prune(model, None, PruneConfig(method="magnitude", allocation="uniform"))
    sparsify_(model, format=fmt, masks=report.masks)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A dense HF directory (tiny LLaMA + word-level tokenizer), as a user would have."""
    path = tmp_path_factory.mktemp("hf") / "model"
    tiny_model("llama").save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_ck(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "ck"
    save_pretrained(_packed_model(), path, tokenizer=_tokenizer())
    return path


@pytest.fixture
def ck(tmp_path, base_ck) -> Path:
    shutil.copytree(base_ck, tmp_path / "ck")
    return tmp_path / "ck"


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(900)))
    return path


def digest(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file()
    }


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("owl-sparse: error:"), err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI loads a model: the error must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was reported")

    import owl_sparse.cli.demo
    import owl_sparse.models.load

    monkeypatch.setattr(owl_sparse.models.load, "load_model", refuse)
    monkeypatch.setattr(owl_sparse.cli.demo, "load_model", refuse)


def _prune_argv(model: Path, text: Path, *extra: str) -> list[str]:
    return [
        "prune",
        "--model",
        str(model),
        "--method",
        "magnitude",
        "--allocation",
        "uniform",
        "--sparsity",
        "0.5",
        "--seqlen",
        "32",
        "--calib-samples",
        "2",
        "--calib-text",
        str(text),
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


# --------------------------------------------------------------------------------------
# F1: the dense CLI save goes through the atomic, replace-checked directory write
# --------------------------------------------------------------------------------------


def test_cli_dense_save_replaces_a_packed_checkpoint_whole(hf_dir, ck, text_file):
    """Before: model.safetensors was written beside sparsity.json; nothing loaded after."""
    assert main(_prune_argv(hf_dir, text_file, "--out", str(ck), "--format", "dense")) == 0
    names = {p.name for p in ck.iterdir()}
    assert RECORD not in names and WEIGHTS not in names
    assert {"config.json", "model.safetensors", "prune_report.json"} <= names
    model, _ = load_model(ck)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert hidden(ck.parent) == []
    # and a dense output of ours may be replaced again (same command, same place)
    assert main(_prune_argv(hf_dir, text_file, "--out", str(ck), "--format", "dense")) == 0
    assert hidden(ck.parent) == []


def test_cli_dense_save_refuses_a_foreign_directory_before_pruning(
    hf_dir, text_file, tmp_path, capsys, monkeypatch
):
    """The user's own model directory (no owl-sparse record) is never written over."""
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    before = digest(src)
    import owl_sparse.pruning

    def no_prune(*a, **k):
        raise AssertionError("pruned before --out was checked")

    monkeypatch.setattr(owl_sparse.pruning, "prune", no_prune)
    argv = _prune_argv(src, text_file, "--out", str(src), "--format", "dense")
    assert main(argv) == 2
    one_line_error(capsys, str(src), "exists")
    assert digest(src) == before


# --------------------------------------------------------------------------------------
# F2: a failed final rename puts the previous checkpoint back and leaves no debris
# --------------------------------------------------------------------------------------


def test_failed_final_rename_restores_the_previous_checkpoint(ck, monkeypatch):
    before = digest(ck)
    real = os.replace

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

    def flaky(src, dst):
        if Path(src) == ck:
            raise PermissionError(13, "Permission denied (simulated)")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(PermissionError):
        save_pretrained(_packed_model(), ck)
    assert digest(ck) == before
    assert hidden(ck.parent) == []


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


# --------------------------------------------------------------------------------------
# F3: save refuses what load refuses (same check), bounds by dtype
# --------------------------------------------------------------------------------------


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


def test_check_values_bound_and_finiteness():
    skeleton.check_values("w", torch.tensor([1.0, -65504.0]), "here")
    for t in (torch.tensor([1.0, -70000.0]), torch.tensor([70000.0]).bfloat16()):
        with pytest.raises(InputError, match=r"magnitude 7(\.\d+)?e\+04"):
            skeleton.check_values("w", t, "here")
    with pytest.raises(InputError, match="NaN or Inf"):
        skeleton.check_values("w", torch.tensor([float("inf")]), "here")


def test_save_refuses_a_layer_in_another_dtype(tmp_path):
    """A fp32 model with one bf16 packed layer would save, then fail to load."""
    model = _packed_model()
    model.get_submodule(Q0).to(torch.bfloat16)
    with pytest.raises(InputError, match=Q0):
        save_pretrained(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# F4: replacing a checkpoint never deletes files that are not ours
# --------------------------------------------------------------------------------------


def test_save_over_checkpoint_with_extra_files_is_refused(ck):
    (ck / "user_notes.txt").write_text("mine")
    (ck / "eval").mkdir()
    before = digest(ck)
    with pytest.raises(InputError, match=r"user_notes\.txt.*eval|eval.*user_notes\.txt"):
        save_pretrained(_packed_model(), ck)
    assert digest(ck) == before and (ck / "eval").is_dir()
    assert hidden(ck.parent) == []


def test_export_over_compressed_tensors_dir_with_extra_files_is_refused(tmp_path):
    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    model = _packed_model()
    out = tmp_path / "ct"
    export_compressed_tensors(model, out)
    export_compressed_tensors(model, out)  # replacing our own export is allowed
    (out / "README.md").write_text("model card")
    with pytest.raises(InputError, match=r"README\.md"):
        export_compressed_tensors(model, out)
    assert (out / "README.md").read_text() == "model card"


def test_cli_dense_save_refuses_checkpoint_with_extra_files(hf_dir, ck, text_file, capsys):
    (ck / "notes.txt").write_text("mine")
    before = digest(ck)
    assert main(_prune_argv(hf_dir, text_file, "--out", str(ck), "--format", "dense")) == 2
    one_line_error(capsys, "notes.txt")
    assert digest(ck) == before


# --------------------------------------------------------------------------------------
# D1: load_model on HF directories: safetensors only, errors wrapped
# --------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


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


# --------------------------------------------------------------------------------------
# D2 / U5: the CLI's one-line errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["eval", "--model", "{hf}", "--text", "{text}", "--batch-size", "0"], ["--batch-size"]),
        (["eval", "--model", "{hf}", "--text", "{text}", "--batch-size", "-1"], ["--batch-size"]),
        (["eval", "--model", "{hf}", "--text", "{text}", "--max-windows", "0"], ["--max-windows"]),
        (["eval", "--model", "{hf}", "--text", "{text}", "--seqlen", "x"], ["--seqlen", "'x'"]),
        (["eval", "--model", "{hf}", "--text", "{text}", "--device", "bogus"], ["bogus"]),
        (["generate", "{hf}", "--prompt", "w1", "--batch", "0"], ["--batch"]),
        (["prune", "--model", "{hf}", "--calib-samples", "-1"], ["--calib-samples"]),
        (["prune", "--model", "{hf}", "--batch-size", "-1"], ["--batch-size"]),
        (["prune", "--model", "{hf}", "--eval-windows", "0"], ["--eval-windows"]),
        (["demo", "--new-tokens", "0"], ["--new-tokens"]),
        # argparse's own errors (U5): one line, not the usage block
        (["eval"], ["--model"]),
        (["generate", "{hf}"], ["--prompt"]),
        (["prune", "--model", "{hf}", "--format", "bogus"], ["--format", "bogus"]),
        (["info", "--model", "{hf}", "--dtype", "float64"], ["--dtype", "float64"]),
        (["bench", "bogus"], ["bogus"]),
        ([], ["command"]),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(argv, fragments, hf_dir, text_file, capsys):
    argv = [a.format(hf=hf_dir, text=text_file) for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cli_cuda_device_without_cuda(hf_dir, text_file, capsys):
    argv = ["eval", "--model", str(hf_dir), "--text", str(text_file), "--device", "cuda"]
    assert main(argv) == 2
    one_line_error(capsys, "cuda", "not available")


def test_cli_os_errors_are_one_line(monkeypatch, capsys):
    import owl_sparse.models.load

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/some/model")

    monkeypatch.setattr(owl_sparse.models.load, "load_model", denied)
    assert main(["info", "--model", "/some/model"]) == 2
    one_line_error(capsys, "Permission denied", "/some/model")


def test_cli_out_under_a_file(hf_dir, text_file, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    argv = _prune_argv(hf_dir, text_file, "--out", str(tmp_path / "afile" / "sub"))
    assert main(argv + ["--format", "bitmap"]) == 2
    one_line_error(capsys, "afile")


# --------------------------------------------------------------------------------------
# U4: bad --out / --format / config reported before the model is loaded
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--out", "{file}"], ["{file}", "exists"]),
        (["--out", "{tmp}/ck", "--format", "2:4"], ["--format 2:4", "--pattern"]),
        (["--pattern", "2:4", "--sparsity", "0.7"], ["contradicts"]),
    ],
)
def test_cli_prune_checks_before_loading(
    extra, fragments, hf_dir, text_file, tmp_path, capsys, no_model_load
):
    (tmp_path / "afile").write_text("x")
    subs = {"file": str(tmp_path / "afile"), "tmp": str(tmp_path)}
    extra = [a.format(**subs) for a in extra]
    argv = [a for a in _prune_argv(hf_dir, text_file) if a != "0.5" and a != "--sparsity"]
    assert main(argv + extra) == 2
    one_line_error(capsys, *[f.format(**subs) for f in fragments])


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--sparsity", "1.5"], ["sparsity"]),
        (["--pattern", "1:4"], ["contradicts"]),
        (["--format", "2:4"], ["--format 2:4", "--pattern"]),
        (["--out", "{file}"], ["{file}", "exists"]),
    ],
)
def test_cli_demo_checks_before_loading(extra, fragments, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    extra = [a.format(file=tmp_path / "afile") for a in extra]
    assert main(["demo", "--model", "stories260k", "--quiet", *extra]) == 2
    one_line_error(capsys, *[f.format(file=tmp_path / "afile") for f in fragments])


# --------------------------------------------------------------------------------------
# D6: dtype / device arguments of the loaders
# --------------------------------------------------------------------------------------


def test_loaders_accept_dtype_names(hf_dir, ck):
    model, _ = load_model(hf_dir, dtype="bfloat16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    model, _ = load_pretrained(ck, dtype="float16")
    assert model.get_submodule(Q0).values.dtype == torch.float16


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


# --------------------------------------------------------------------------------------
# F6 (info part): packed layers are listed with their packed size
# --------------------------------------------------------------------------------------


def test_model_info_lists_packed_layers(ck, hf_dir, capsys):
    dense = model_info(load_model(hf_dir)[0])
    info = model_info(load_pretrained(ck)[0])
    assert set(info["block_linears"]) == set(dense["block_linears"])
    assert info["block_linears"] == dense["block_linears"]
    assert info["parameters"] == dense["parameters"]  # logical weights, packed or not
    packed = info["packed"]
    assert packed["layers"] == 14 and 0 < packed["bytes"]
    q = info["block_packed"]["self_attn.q_proj"]
    assert q["format"] == "bitmap" and q["sparsity"] == pytest.approx(0.7, abs=0.01)
    layer = load_pretrained(ck)[0].get_submodule(Q0)
    assert q["bytes"] == layer.nbytes
    assert main(["info", "--model", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "self_attn.q_proj" in out and "bitmap" in out


# --------------------------------------------------------------------------------------
# U6 / U7: small naming and path checks
# --------------------------------------------------------------------------------------


def test_compressed_tensors_pickle_message_ignores_llama2c_tokenizer(tmp_path):
    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    out = tmp_path / "ct"
    export_compressed_tensors(_packed_model(), out)
    (out / "model.safetensors").unlink()
    (out / "tokenizer.bin").write_bytes(b"\x07\x00\x00\x00" + bytes(20))
    torch.save({"w": torch.zeros(2)}, out / "pytorch_model.bin")
    with pytest.raises(InputError, match="pytorch_model.bin") as info:
        load_pretrained(out)
    assert "tokenizer.bin" not in str(info.value)


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
