"""The command line's argument checks: one-line errors with exit status 2 (argparse's own
included), bad --out / --format / config reported before the model is loaded."""

from __future__ import annotations

import pytest
import torch
from factories import _prune_argv, one_line_error

from owl_sparse.cli.main import main


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


def test_nan_logits_are_one_line_exit_2(hf_dir, text_file, capsys, monkeypatch):
    """Finite weights can still overflow to NaN logits (fp16, extreme inputs): the CLI
    reports the numerical failure in one line instead of a traceback."""
    import owl_sparse.evaluate as evaluate

    def nan(*a, **k):
        raise FloatingPointError("perplexity is not finite: the model produced NaN or Inf logits")

    monkeypatch.setattr(evaluate, "perplexity", nan)
    code = main(["eval", "--model", str(hf_dir), "--eval-text", str(text_file), "--seqlen", "8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "numerical failure" in err and "Traceback" not in err
