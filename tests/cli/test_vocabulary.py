"""One CLI vocabulary: the same option name for the same thing in every subcommand, the
old spellings as documented aliases, an example in every --help, packed checkpoints by
default, and --format refused without --out."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from factories import _prune_argv, one_line_error

from owl_sparse.cli.main import build_parser, main
from owl_sparse.io import RECORD

# option -> (dest, subcommands that take it)
SHARED = {
    "--eval-text": ("eval_text", ["eval", "demo", "prune"]),
    "--eval-windows": ("eval_windows", ["eval", "demo", "prune"]),
    "--seqlen": ("seqlen", ["eval", "demo", "prune"]),
    "--calib-text": ("calib_text", ["demo", "prune"]),
    "--calib-samples": ("calib_samples", ["demo", "prune"]),
    "--calib-seqlen": ("calib_seqlen", ["demo", "prune"]),
    "--method": ("method", ["demo", "prune"]),
    "--allocation": ("allocation", ["demo", "prune"]),
    "--sparsity": ("sparsity", ["demo", "prune"]),
    "--pattern": ("pattern", ["demo", "prune"]),
    "--owl-m": ("owl_m", ["demo", "prune"]),
    "--owl-lambda": ("owl_lambda", ["demo", "prune"]),
    "--format": ("format", ["demo", "prune"]),
    "--out": ("out", ["demo", "prune"]),
    "--max-new-tokens": ("max_new_tokens", ["demo", "generate"]),
    "--batch-size": ("batch_size", ["eval", "generate", "prune"]),
    "--seed": ("seed", ["demo", "generate", "prune"]),
    "--json": ("json", ["eval", "info", "demo", "generate", "prune"]),
    "--device": ("device", ["eval", "info", "demo", "generate", "prune"]),
    "--dtype": ("dtype", ["eval", "info", "demo", "generate", "prune"]),
    "--quiet": ("quiet", ["eval", "info", "demo", "generate", "prune"]),
}
ALIASES = {
    "--text": "--eval-text",
    "--max-windows": "--eval-windows",
    "--new-tokens": "--max-new-tokens",
    "--batch": "--batch-size",
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(sub: argparse.ArgumentParser) -> dict[str, str]:
    return {s: a.dest for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("option", sorted(SHARED))
def test_same_name_same_dest_in_every_subcommand(option):
    dest, commands = SHARED[option]
    subs = _subparsers()
    for name in commands:
        assert _options(subs[name]).get(option) == dest, (name, option)


def test_old_spellings_are_aliases_of_the_new_names():
    for name, sub in _subparsers().items():
        options = _options(sub)
        for old, new in ALIASES.items():
            if old in options:
                assert options[old] == options[new], (name, old)


@pytest.mark.parametrize("command", ["eval", "info", "demo", "generate", "prune"])
def test_every_help_has_an_example_and_lists_the_aliases(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"owl-sparse {command}" in out.split("example:")[1]
    options = _options(_subparsers()[command])
    for old in ALIASES:
        if old in options:
            assert f", {old}" in out, old  # argparse lists it beside the new name


def test_prune_out_writes_a_packed_checkpoint_by_default(hf_dir, text_file, tmp_path, capsys):
    from owl_sparse.io.load import load_pretrained
    from owl_sparse.nn import SparseLinear

    out = tmp_path / "ck"
    assert main(_prune_argv(hf_dir, text_file, "--out", str(out), "--json")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    record = json.loads((out / RECORD).read_text())
    assert {spec["format"] for spec in record["layers"].values()} <= {"bitmap", "2:4"}
    assert (out / "prune_report.json").is_file()
    model, _ = load_pretrained(out)
    assert any(isinstance(m, SparseLinear) for m in model.modules())


def test_prune_help_says_packed_is_the_default(capsys):
    assert main(["prune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "auto (default)" in out and "--format dense" in out


def test_format_without_out_is_refused_before_loading(hf_dir, text_file, capsys, no_model_load):
    assert main(_prune_argv(hf_dir, text_file, "--format", "bitmap")) == 2
    one_line_error(capsys, "--format bitmap", "--out")


def test_prune_calib_seqlen_defaults_to_seqlen_and_can_differ(hf_dir, text_file, capsys):
    argv = _prune_argv(hf_dir, text_file, "--method", "wanda", "--json")
    i = argv.index("--seqlen")
    seqlen = int(argv[i + 1])
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prune"]["calibration"]["samples_x_seqlen"][1] == seqlen
    assert main([*argv, "--calib-seqlen", str(seqlen // 2)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prune"]["calibration"]["samples_x_seqlen"][1] == seqlen // 2


def test_prune_out_opens_with_plain_transformers_in_a_fresh_process(hf_dir, text_file, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ck"
    assert main(_prune_argv(hf_dir, text_file, "--out", str(out))) == 0
    code = (
        "import owl_sparse\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(sum(type(x).__name__ == 'SparseLinear' for x in m.modules()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / RECORD).read_text())
    assert int(done.stdout.split()[-1]) == len(record["layers"]) > 0


# Keys only one subcommand has (the demo's table rows, its checkpoint check and speed-up).
OWN_KEYS = {"demo": {"results", "checkpoint", "decode_speedup", "sparsify"}}


def _json_runs(hf_dir, text_file, tmp_path):
    model, text = str(hf_dir), str(text_file)
    common = ["--quiet", "--json", "--device", "cpu"]
    yield "info", ["info", "--model", model, "--quiet", "--json"]
    yield "eval", ["eval", "--model", model, "--eval-text", text, "--seqlen", "32", *common]
    yield "generate", ["generate", model, "--prompt", "w1 w2", "--max-new-tokens", "3", *common]
    yield (
        "prune",
        _prune_argv(hf_dir, text_file, "--eval-text", text, "--eval-windows", "2", "--json")
        + ["--out", str(tmp_path / "pruned")],
    )
    yield "demo", [
        "demo", "--model", model, "--eval-text", text, "--eval-windows", "2", "--seqlen", "32",
        "--calib-text", text, "--calib-samples", "2", "--method", "magnitude", "--allocation",
        "uniform", "--sparsity", "0.5", "--max-new-tokens", "3", "--out", str(tmp_path / "demo"),
        *common,
    ]  # fmt: skip


def test_every_json_uses_the_same_keys_for_the_same_things(hf_dir, text_file, tmp_path, capsys):
    from owl_sparse.cli.main import JSON_KEYS

    seen = set()
    for command, argv in _json_runs(hf_dir, text_file, tmp_path):
        assert main(argv) == 0, command
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["command"] == command and result["model"] == str(hf_dir), command
        assert result["seconds"] > 0, command
        extra = set(result) - set(JSON_KEYS) - OWN_KEYS.get(command, set())
        assert not extra, f"{command} --json has keys outside cli.main.JSON_KEYS: {extra}"
        if "perplexity" in result:
            assert {"perplexity", "windows", "seqlen"} <= set(result["perplexity"]), command
        if "prune" in result:
            assert {"config", "layers", "achieved_sparsity"} <= set(result["prune"]), command
        if "out" in result:
            assert (tmp_path / result["out"]).is_dir(), command
        seen |= set(result)
    assert "perplexity" in seen and "prune" in seen and "out" in seen


def test_long_work_shows_one_bar_per_stage(hf_dir, text_file, capsys):
    argv = [a for a in _prune_argv(hf_dir, text_file, "--method", "wanda") if a != "--quiet"]
    argv[argv.index("uniform")] = "tuned"
    argv += ["--calib-samples", "8", "--eval-text", str(text_file), "--eval-windows", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    stages = []
    for line in err.splitlines():
        m = re.match(r"\s*([a-z][a-z ]+?):\s+\d+%\|", line)
        if m and (not stages or stages[-1] != m.group(1)):
            stages.append(m.group(1))
    # each stage's bar runs to its end before the next starts: no bar inside a bar
    assert stages[:2] == ["dense pass", "allocation search"], stages
    assert stages[-1] == "perplexity" and "wanda" in stages, stages
    assert all(stages.count(s) == 1 for s in ("dense pass", "allocation search")), stages
