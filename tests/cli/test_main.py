"""The command line: eval / info / prune JSON output, the prune -> eval -> generate round
trip, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from factories import tiny_model

from owl_sparse.cli.main import main
from owl_sparse.io import RECORD
from owl_sparse.models import find_decoder_blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(700)))
    return path


def test_eval_json_is_last_line(model_dir, text_file, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--text",
            str(text_file),
            "--seqlen",
            "64",
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["command"] == "eval" and result["model"] == str(model_dir)
    ppl = result["perplexity"]
    assert ppl["windows"] == 700 // 64 and ppl["seqlen"] == 64
    assert ppl["perplexity"] > 1


def test_info_json(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["info"]
    assert info["num_blocks"] == 2 and "mlp.down_proj" in info["block_linears"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "nope-model", "--text", "pydoc"], "neither a built-in name"),
        (["eval", "--model", "{model}", "--text", "/no/such/file.txt"], "no such text file"),
        (
            ["eval", "--model", "{model}", "--text", "{text}", "--seqlen", "4096"],
            "shorter than one window",
        ),
        (
            ["eval", "--model", "{model}", "--text", "{text}", "--seqlen", "300"],
            "context length 256",
        ),
    ],
)
def test_errors_are_one_line_exit_2(argv, message, model_dir, text_file, capsys):
    argv = [a.format(model=model_dir, text=text_file) for a in argv]
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("owl-sparse: error:")


# ------------------------------------------------------------------ prune


def _tiny_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(tmp_path / "model")
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    words = " ".join(f"t{i}" for i in torch.randint(0, 128, (3000,), generator=g).tolist())
    (tmp_path / "calib.txt").write_text(words)
    return tmp_path / "model", tmp_path / "calib.txt"


def test_cli_prune_writes_a_checkpoint(tmp_path, capsys):
    from owl_sparse.cli.main import main
    from owl_sparse.models import load_model

    model_dir, text = _tiny_checkpoint(tmp_path)
    argv = [
        "prune",
        "--model",
        str(model_dir),
        "--method",
        "wanda",
        "--allocation",
        "owl",
        "--sparsity",
        "0.6",
        "--calib-text",
        str(text),
        "--calib-samples",
        "8",
        "--seqlen",
        "32",
        "--eval-text",
        str(text),
        "--eval-windows",
        "4",
        "--out",
        str(tmp_path / "out"),
        "--format",
        "dense",
        "--json",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prune"]["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert result["perplexity"]["windows"] == 4
    saved = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert saved["config"]["allocation"] == "owl"
    model, _ = load_model(tmp_path / "out")
    weight = find_decoder_blocks(model).blocks[0].mlp.down_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(
        saved["layers"][6]["achieved_sparsity"]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.2"], "sparsity must be in"),
        (["--pattern", "4:2"], "1 <= N < M"),
        (["--calib-samples", "2", "--seqlen", "5000"], "too short for windows"),
    ],
)
def test_cli_prune_bad_input(tmp_path, capsys, extra, message):
    from owl_sparse.cli.main import main

    model_dir, text = _tiny_checkpoint(tmp_path)
    argv = ["prune", "--model", str(model_dir), "--calib-text", str(text), "--quiet", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_prune_calibrates_on_text_sampled_from_the_model(tmp_path, capsys):
    from owl_sparse.cli.main import main

    model_dir, _ = _tiny_checkpoint(tmp_path)
    argv = [
        "prune",
        "--model",
        str(model_dir),
        "--method",
        "wanda",
        "--allocation",
        "uniform",
        "--sparsity",
        "0.5",
        "--calib-text",
        "self",
        "--calib-samples",
        "2",
        "--seqlen",
        "8",
        "--json",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prune"]["calibration"]["samples_x_seqlen"] == [2, 8]
    assert result["prune"]["achieved_sparsity"] == pytest.approx(0.5)


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
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"]["windows"] == 2
    gen_args = ["generate", str(tmp_path / "ck"), "--prompt", "Once upon a time"]
    assert main(gen_args + ["--max-new-tokens", "8", "--json", "--device", "cpu"]) == 0
    assert "Once upon a time" in capsys.readouterr().out
