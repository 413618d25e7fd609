"""owl-sparse generate: JSON output and batches, one-line errors."""

from __future__ import annotations

import pytest
from factories import _word_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-serve")
    tiny_model("llama").save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path


def test_cli_generate_json_and_batch(model_dir, capsys):
    import json

    from owl_sparse.cli.main import main

    argv = [
        "generate",
        str(model_dir),
        "--prompt",
        "w5 w6 w7",
        "--max-new-tokens",
        "4",
        "--batch",
        "3",
        "--ignore-eos",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["command"] == "generate" and result["prompts"] == ["w5 w6 w7"] * 3
    out = result["generation"]
    assert out["batch_size"] == 3
    assert len(out["token_ids"]) == 3 and all(len(t) == 4 for t in out["token_ids"])
    assert out["token_ids"][0] == out["token_ids"][2]


def test_cli_generate_error_is_one_line(model_dir, capsys):
    from owl_sparse.cli.main import main

    assert main(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("owl-sparse: error:") and "context of 256" in err
