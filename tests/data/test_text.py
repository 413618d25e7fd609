"""Reading text: files, the built-in pydoc prose, WikiText-2 from the shared data."""

from __future__ import annotations

import pytest

from owl_sparse.data import load_text, pydoc_text, read_text
from owl_sparse.errors import InputError


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
