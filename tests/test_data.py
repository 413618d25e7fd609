"""Text reading, evaluation windows and calibration batches."""

from __future__ import annotations

import pytest
import torch

from owl_sparse.data import (
    calibration_batches,
    eval_windows,
    load_text,
    pydoc_text,
    read_text,
)
from owl_sparse.errors import InputError


def test_eval_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(1030)
    w = eval_windows(ids, 100)
    assert w.shape == (10, 100)
    assert torch.equal(w.reshape(-1), torch.arange(1000))
    assert eval_windows(ids, 100, max_windows=3).shape == (3, 100)
    assert eval_windows(ids, 1030).shape == (1, 1030)


def test_eval_windows_errors():
    with pytest.raises(InputError, match="shorter than one window"):
        eval_windows(torch.arange(50), 64)
    with pytest.raises(InputError, match="seqlen"):
        eval_windows(torch.arange(50), 1)
    with pytest.raises(InputError, match="max_windows"):
        eval_windows(torch.arange(500), 64, max_windows=0)


def test_calibration_is_seeded_and_in_range():
    ids = torch.arange(5000)
    a = calibration_batches(ids, 8, 64, seed=3)
    b = calibration_batches(ids, 8, 64, seed=3)
    c = calibration_batches(ids, 8, 64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # each window is a contiguous slice of the stream
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)
    assert a.max() < 5000
    with pytest.raises(InputError, match="too short"):
        calibration_batches(torch.arange(64), 1, 64)
    with pytest.raises(InputError, match=">= 1"):
        calibration_batches(ids, 0, 64)


def test_read_text_errors(tmp_path):
    with pytest.raises(InputError, match="no such text file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="is a directory"):
        read_text(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(InputError, match="not UTF-8"):
        read_text(tmp_path / "bin.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_builtin_text_needs_no_download():
    text = pydoc_text()
    assert len(text) > 100_000 and "statement" in text
    assert load_text("pydoc") == text


def test_wikitext_from_shared_data(shared_data):
    text = load_text("wikitext2")
    assert text == read_text(shared_data / "wikitext-2-raw" / "wiki.test.raw")
