"""The command line: JSON output and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from owl_sparse.cli.main import main


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
    assert result["windows"] == 700 // 64 and result["seqlen"] == 64
    assert result["perplexity"] > 1


def test_info_json(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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
