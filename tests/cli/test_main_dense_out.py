"""prune --format dense --out: the atomic, replace-checked directory write; our own outputs
are replaced whole, foreign directories and extra files refused before pruning."""

from __future__ import annotations

import shutil

from factories import _prune_argv, digest, hidden, one_line_error

from owl_sparse.cli.main import main
from owl_sparse.io import RECORD, WEIGHTS
from owl_sparse.models import load_model
from owl_sparse.nn import SparseLinear


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


def test_cli_dense_save_refuses_checkpoint_with_extra_files(hf_dir, ck, text_file, capsys):
    (ck / "notes.txt").write_text("mine")
    before = digest(ck)
    assert main(_prune_argv(hf_dir, text_file, "--out", str(ck), "--format", "dense")) == 2
    one_line_error(capsys, "notes.txt")
    assert digest(ck) == before
