"""Checked reading and streaming writing of safetensors files (no pickle, ever).

A safetensors file is ``u64 little-endian header length N``, then ``N`` bytes of JSON
``{name: {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
{...}}``, then the data section; offsets are relative to the start of the data section and
the tensors tile it exactly.

`parse_header` checks everything a hostile or truncated file can lie about *before* a
single tensor byte is read: the magic bytes (a pickle or ``torch.save`` zip archive is
named as such and refused, never unpickled), the header length against the file size,
the JSON, every dtype and shape, and that every tensor's declared size equals its byte
span, lies inside the file and that the spans tile the data section exactly (the same
rules as the reference ``safetensors`` implementation, which reads our files and whose
files we read).  `SafeReader` then reads each tensor's raw little-endian bytes at its
checked offsets into a fresh tensor (no memory map, see its docstring); given the file's
sha256 it hashes the bytes as it reads them (one pass) and `SafeReader.verify` refuses a
file whose contents differ (a flipped bit anywhere, in a value, a bitmap or the header).

`write_safetensors` writes tensors one at a time (no whole-file buffer in memory), pads
the header to 8 bytes like the reference implementation, and fsyncs the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

# safetensors itself refuses headers above 100 MB; a larger length is corruption.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NDIM = 8

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as declared by a safetensors header (offsets relative to the data)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def sniff(path: str | os.PathLike) -> str:
    """What a weights file looks like from its first bytes: "pickle", "zip" (a
    ``torch.save`` archive, pickle inside), "empty" or "other"."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    return "other"


def _fail(path, msg: str):
    raise InputError(f"{path}: {msg}")


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data.

    Returns ``(entries by name, metadata)``; see `parse_header`."""
    entries, metadata, _ = parse_header(path)
    return entries, metadata


def parse_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and check a safetensors header without reading tensor data.

    Returns ``(entries by name, metadata, byte offset of the data section)``.  Raises InputError naming the file, and the
    tensor where one is at fault, for: a pickle / zip file, truncation, a header length
    past the end of the file, bad JSON, unknown dtypes, malformed or absurd shapes, a
    declared size that does not match the byte span, spans outside the file, overlapping
    or gapped spans.
    """
    path = Path(path)
    kind = sniff(path)
    if kind in ("pickle", "zip"):
        _fail(
            path,
            f"is a Python {'pickle' if kind == 'pickle' else 'torch.save (zip of pickles)'} "
            "file, not safetensors; owl-sparse never unpickles weights (convert it to "
            "safetensors with a tool you trust)",
        )
    size = path.stat().st_size
    if size < 8:
        _fail(path, f"truncated: {size} bytes, a safetensors file has at least 8")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            _fail(
                path,
                f"truncated: header declares {n} bytes but the file has {size - 8} after the length",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _Duplicate) as e:
        _fail(path, f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _fail(path, f"header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail(path, "__metadata__ must map strings to strings")
    data_size = size - 8 - n
    entries = {name: _entry(path, name, info, data_size) for name, info in header.items()}
    _check_coverage(path, entries, data_size)
    return entries, meta, 8 + n


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(f"duplicate key {k!r}")
        out[k] = v
    return out


def _entry(path, name: str, info, data_size: int) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        _fail(path, f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        _fail(path, f"{where}: unsupported dtype {info['dtype']!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        _fail(
            path, f"{where}: shape {shape!r} is not a list of at most {MAX_NDIM} non-negative ints"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        _fail(
            path, f"{where}: data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end"
        )
    # Python ints: an absurd shape cannot overflow into a plausible size.
    declared = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if declared != offsets[1] - offsets[0]:
        _fail(
            path,
            f"{where}: shape {shape} of {info['dtype']} needs {declared} bytes but its data "
            f"span is {offsets[1] - offsets[0]} bytes",
        )
    if offsets[1] > data_size:
        _fail(
            path,
            f"{where}: data ends at byte {offsets[1]} but the file's data section holds only "
            f"{data_size} bytes (truncated file or absurd shape {shape})",
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_coverage(path, entries: dict[str, TensorEntry], data_size: int) -> None:
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = (
                "overlaps the previous tensor" if e.begin < pos else f"leaves a gap at byte {pos}"
            )
            _fail(path, f"tensor {e.name!r} (bytes {e.begin}..{e.end}) {what}")
        pos = e.end
    if pos != data_size:
        _fail(path, f"{data_size - pos} trailing bytes after the last tensor")


class SafeReader:
    """Read the tensors of a safetensors file whose header `parse_header` has accepted.

    Use as a context manager; ``get(name)`` returns a new CPU tensor filled by plain
    positional reads at the checked offsets (the data section is little-endian raw
    arrays, nothing is interpreted).  No memory map is kept: a loaded model never
    depends on the file (truncating it later cannot crash the process with SIGBUS), and
    the peak memory of a load is the size of the tensors, not twice it.  A file that
    shrinks between the header check and the read raises InputError.
    """

    def __init__(self, path: str | os.PathLike, sha256: str | None = None):
        """``sha256``: the file's expected digest (hex); then every byte read is hashed and
        `verify` compares. Reading the tensors in file order (`in_file_order`) reads each
        byte once; bytes skipped over are read for the hash as well."""
        self.path = Path(path)
        self.entries, self.metadata, self._data_start = parse_header(self.path)
        self._file = None
        self._expected = sha256
        self._hash = None
        self._hashed = 0  # data-section bytes hashed so far

    def __enter__(self) -> SafeReader:
        self._file = open(self.path, "rb")
        if self._expected is not None:
            self._hash = hashlib.sha256(self._file.read(self._data_start))
            self._hashed = 0
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()
        self._file = None

    def in_file_order(self, names) -> list[str]:
        """``names`` sorted by where their data lies in the file."""
        return sorted(names, key=lambda n: self.entries[n].begin if n in self.entries else -1)

    def _hash_until(self, end: int) -> None:
        """Hash the data section up to ``end`` (bytes not read as tensors yet)."""
        self._file.seek(self._data_start + self._hashed)
        while self._hashed < end:
            chunk = self._file.read(min(end - self._hashed, 1 << 24))
            if not chunk:
                raise InputError(f"{self.path}: file truncated at byte {self._hashed}")
            self._hash.update(chunk)
            self._hashed += len(chunk)

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise InputError(f"{self.path}: missing tensor {name!r}")
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            if self._hash is not None and entry.begin > self._hashed:
                self._hash_until(entry.begin)
            buf = out.reshape(-1).view(torch.uint8).numpy()
            self._file.seek(self._data_start + entry.begin)
            got = self._file.readinto(memoryview(buf))
            if got != entry.nbytes:
                raise InputError(
                    f"{self.path}: tensor {name!r}: read {got} of {entry.nbytes} bytes (file truncated?)"
                )
            if self._hash is not None and entry.begin == self._hashed:
                self._hash.update(memoryview(buf))
                self._hashed = entry.end
        return out

    def verify(self) -> None:
        """Hash what was not read yet and compare with the expected sha256 (no-op without
        one). Raises InputError when the file's contents differ from those saved."""
        if self._hash is None:
            return
        self._hash_until(self.path.stat().st_size - self._data_start)
        if self._hash.hexdigest() != self._expected:
            raise InputError(
                f"{self.path}: contents differ from the saved file (sha256 mismatch): the "
                "weights are corrupted or were edited"
            )


def header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None) -> bytes:
    """The padded header (without the 8-byte length) for tensors laid out in list order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def file_size(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None) -> int:
    """Exact size of the file `write_safetensors` writes for these entries (no data needed)."""
    data = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in entries)
    return 8 + len(header_bytes(entries, metadata)) + data


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata=None, hasher=None
) -> int:
    """Write ``tensors`` (CPU or not, any layout) as one safetensors file and fsync it.

    Tensors are copied to CPU and written one at a time; ``hasher`` (a ``hashlib`` object),
    when given, is updated with every byte written.  Returns the file size in bytes.
    """
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise InputError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    head = header_bytes(entries, metadata)
    update = hasher.update if hasher is not None else (lambda _: None)
    with open(path, "wb") as f:
        for part in (struct.pack("<Q", len(head)), head):
            f.write(part)
            update(part)
        for t in tensors.values():
            if t.numel():
                flat = t.detach().to("cpu").contiguous().reshape(-1)
                data = flat.view(torch.uint8).numpy().data
                f.write(data)
                update(data)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a whole file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
