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


def test_text_size_is_bounded(tmp_path, monkeypatch):
    from owl_sparse import settings

    monkeypatch.setenv("OWL_SPARSE_MAX_TEXT_MB", "1")
    settings.reload()
    exact = tmp_path / "exact.txt"
    exact.write_bytes(b"a" * 2**20)
    assert len(read_text(exact)) == 2**20
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * (2**20 + 1))
    with pytest.raises(InputError, match="more than 1 MiB"):
        read_text(big)
    with pytest.raises(InputError, match="more than 1 MiB"):
        read_text("/dev/zero")  # endless: refused after the limit, not read forever
    monkeypatch.setenv("OWL_SPARSE_MAX_TEXT_MB", "lots")
    settings.reload()
    with pytest.raises(InputError, match="OWL_SPARSE_MAX_TEXT_MB"):
        read_text(exact)
