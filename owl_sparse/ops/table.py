"""The measured dispatch tables: JSON files written by the benchmarks, read once.

Schema (see :mod:`owl_sparse.ops.dispatch` for how entries are chosen)::

    {"gpu": "NVIDIA H100 80GB HBM3",          # the device: a GPU's name, or cpu:<isa>
     "entries": [{"fmt": "bitmap", "dtype": "float16", "N": 4096, "K": 4096,
                  "tokens": 16, "sparsity": 0.7, "backend": "triton_gemv",
                  "why": "2.1x dense"}, ...]}

A CPU table may also hold entries of fmt ``"dense"`` (``owl_sparse::dense_linear``, sparsity
0, backend ``cpu_kernel`` or ``torch``).

Files: ``owl_sparse/ops/tables/*.json`` and any listed in ``OWL_SPARSE_DISPATCH_TABLES``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

import torch

from .. import settings
from ..errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("bitmap", "2:4")
TABLE_FORMATS = (*FORMATS, "dense")  # "dense": CPU tables only
TABLE_DIR = Path(__file__).resolve().parent / "tables"


def _table_files() -> list[Path]:
    files = sorted(TABLE_DIR.glob("*.json"))
    for p in settings.get().dispatch_tables:
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return files


@functools.lru_cache(maxsize=1)
def entries_by_key() -> dict[tuple, list[tuple[float, str, str]]]:
    table: dict[tuple, list[tuple[float, str, str]]] = {}
    for path in _table_files():
        try:
            doc = json.loads(path.read_text())
            gpu = str(doc.get("device", doc.get("gpu")))
            for e in doc["entries"]:
                key = (gpu, e["fmt"], e["dtype"], int(e["N"]), int(e["K"]), int(e["tokens"]))
                table.setdefault(key, []).append(
                    (float(e.get("sparsity", 0.5)), e["backend"], e.get("why", ""))
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring dispatch table %s: %s", path, exc)
    return table


def reload_tables() -> None:
    """Forget the loaded tables (after writing a new one)."""
    entries_by_key.cache_clear()
    _nearest_key.cache_clear()
    has_measurements.cache_clear()


def save_table(path: str | os.PathLike, gpu: str, entries: list[dict]) -> Path:
    """Write a dispatch table (schema in the module docstring); checks every entry's fields."""
    need = {"fmt": str, "dtype": str, "N": int, "K": int, "tokens": int, "backend": str}
    for i, e in enumerate(entries):
        for field, typ in need.items():
            if not isinstance(e.get(field), typ):
                raise InputError(
                    f"dispatch table entry {i} needs {field!r} of type {typ.__name__}: {e}"
                )
        if e["fmt"] not in TABLE_FORMATS or e["tokens"] != token_bucket(e["tokens"]):
            raise InputError(f"dispatch table entry {i}: bad fmt or non power-of-two tokens: {e}")
    path = Path(path)
    path.write_text(json.dumps({"gpu": gpu, "entries": entries}, indent=1) + "\n")
    reload_tables()
    return path


def token_bucket(tokens: int) -> int:
    """The table's token bucket: the next power of two >= ``tokens`` (1 for 0 or 1)."""
    return 1 if tokens <= 1 else 1 << (int(tokens) - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=4096)
def _nearest_key(gpu: str, fmt: str, dtype: str, n: int, k: int, bucket: int) -> tuple | None:
    """The measured (gpu, fmt, dtype, N', K', bucket) key nearest to (n, k), within 2x."""
    best, best_d = None, 1.0 + 1e-9
    for key in entries_by_key():
        if key[:3] != (gpu, fmt, dtype) or key[5] != bucket:
            continue
        d = abs(math.log2(n / key[3])) + abs(math.log2(k / key[4]))
        if d <= best_d:
            best, best_d = key, d
    return best


def table_lookup(
    gpu: str, fmt: str, dtype: torch.dtype, n: int, k: int, tokens: int, sparsity: float
) -> tuple[str, str] | None:
    """(backend, reason) from the measured tables (the shape itself or the nearest measured
    shape within 2x in N and K), or None when nothing near was measured."""
    key = (gpu, fmt, dtype_name(dtype), n, k, token_bucket(tokens))
    rows = entries_by_key().get(key)
    shown = key
    if not rows:
        near_key = _nearest_key(*key)
        if near_key is None:
            return None
        rows, shown = entries_by_key()[near_key], f"{near_key} (nearest measured shape to {n}x{k})"
    near, name, why = min(rows, key=lambda r: abs(r[0] - sparsity))
    return name, f"table {shown} at sparsity {near}: {why}"


@functools.lru_cache(maxsize=64)
def has_measurements(gpu: str, fmt: str) -> bool:
    return any(key[0] == gpu and key[1] == fmt for key in entries_by_key())


def table_entries(device: str) -> list[dict]:
    """Every entry measured on ``device`` (a GPU name or ``cpu:<isa>``), as dicts with
    fmt, dtype, N, K, tokens, sparsity, backend and why."""
    out = []
    for (dev, fmt, dtype, n, k, tokens), rows in sorted(entries_by_key().items()):
        if dev == device:
            for sparsity, backend, why in rows:
                out.append(
                    dict(
                        fmt=fmt,
                        dtype=dtype,
                        N=n,
                        K=k,
                        tokens=tokens,
                        sparsity=sparsity,
                        backend=backend,
                        why=why,
                    )
                )
    return out
