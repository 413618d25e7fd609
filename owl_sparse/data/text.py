"""Text sources: files and the named corpora (WikiText-2, C4, Python's own prose).

Text specs accepted by `load_text`:

- a path to a UTF-8 text file;
- ``wikitext2``: WikiText-2 raw; the test split comes from ``$OWL_SPARSE_DATA`` when the
  shared data is present, otherwise (and for other splits) from the ``datasets`` library;
- ``c4``: the C4 English validation shard through the ``datasets`` library;
- ``pydoc``: English prose that ships with Python itself (the reference-manual topics in
  ``pydoc_data.topics``, about 465 kB): evaluation text that needs no download.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import settings
from ..errors import InputError

DATASET_NAMES = ("wikitext2", "c4", "pydoc")


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file of at most ``OWL_SPARSE_MAX_TEXT_MB``; errors name the file
    and the problem (missing, a directory, too large or endless, not UTF-8, empty)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: no such text file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a UTF-8 text file")
    limit = settings.get().max_text_bytes
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(
            f"{p}: more than {limit // 2**20} MiB of text (OWL_SPARSE_MAX_TEXT_MB raises the "
            "limit); calibration and evaluation need far less"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text (byte {e.start})") from e
    if not text.strip():
        raise InputError(f"{p}: the text file is empty")
    return text


def pydoc_text() -> str:
    """English prose shipped with CPython: the topics of the Python reference manual."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(spec: str | os.PathLike, split: str = "test") -> str:
    """Resolve a text spec (path or dataset name, see module doc) to a string."""
    name = str(spec).lower()
    if name == "pydoc":
        return pydoc_text()
    if name == "wikitext2":
        shared = settings.get().data_dir
        if split == "test" and shared and (shared / "wikitext-2-raw" / "wiki.test.raw").is_file():
            return read_text(shared / "wikitext-2-raw" / "wiki.test.raw")
        rows = _dataset("wikitext", "wikitext-2-raw-v1", split)
        return "\n\n".join(r["text"] for r in rows)
    if name == "c4":
        rows = _dataset(
            "allenai/c4",
            None,
            "validation",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
        )
        return "\n\n".join(r["text"] for r in rows.select(range(min(3000, len(rows)))))
    return read_text(spec)


def _dataset(path, config, split, **kwargs):
    try:
        import datasets
    except ImportError as e:
        raise InputError(
            f"the dataset name needs the 'datasets' package (pip install datasets), "
            f"or pass a text file path instead of '{path}'"
        ) from e
    try:
        return datasets.load_dataset(path, config, split=split, **kwargs)
    except Exception as e:  # network, missing cache: one clear line, not a deep traceback
        raise InputError(f"could not load dataset {path} ({split}): {type(e).__name__}: {e}") from e
