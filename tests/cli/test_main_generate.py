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


def test_cli_generate_repetition_penalty(model_dir, capsys):
    """--repetition-penalty reaches generate (same tokens as the API with it) and a bad
    value is a one-line error."""
    import json

    from owl_sparse.cli.main import main
    from owl_sparse.models.load import load_model
    from owl_sparse.serve import generate

    argv = ["generate", str(model_dir), "--prompt", "w5 w6 w5 w6", "--max-new-tokens", "8"]
    assert main([*argv, "--ignore-eos", "--repetition-penalty", "1.8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["repetition_penalty"] == 1.8
    model, tok = load_model(str(model_dir))
    api = generate(model, tok, "w5 w6 w5 w6", 8, stop_at_eos=False, repetition_penalty=1.8)
    plain = generate(model, tok, "w5 w6 w5 w6", 8, stop_at_eos=False)
    assert result["generation"]["token_ids"] == api.token_ids != plain.token_ids
    assert main([*argv, "--repetition-penalty", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("owl-sparse: error:") and "repetition_penalty must be" in err
