"""Mutations of real files for the loaders' hypothesis fuzz tests (packed checkpoints in
tests/io, dense Hugging Face directories in tests/models): every mutation is reproducible
from its seed and payload."""

from __future__ import annotations

import json
import struct

import torch


def mutate_bytes(data: bytes, kind: str, seed: int, payload: list[int], header_len: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    buf = bytearray(data)
    if kind in ("bytes", "header_bytes"):
        span = min(len(buf), 8 + header_len) if kind == "header_bytes" else len(buf)
        for b in payload:
            buf[int(torch.randint(0, span, (1,), generator=gen))] = b
    elif kind == "truncate":
        del buf[int(torch.randint(0, len(buf), (1,), generator=gen)) :]
    elif kind == "insert":
        pos = int(torch.randint(0, len(buf), (1,), generator=gen))
        buf[pos:pos] = bytes(payload)
    return bytes(buf)


def mutate_header_json(data: bytes, seed: int, payload: list[int]) -> bytes:
    """Change one number of one header entry (shape or offset) to a chosen value."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    gen = torch.Generator().manual_seed(seed)
    entry = header[names[int(torch.randint(0, len(names), (1,), generator=gen))]]
    field = "shape" if payload[0] % 2 and entry["shape"] else "data_offsets"
    vals = entry[field]
    i = int(torch.randint(0, len(vals), (1,), generator=gen))
    vals[i] = [0, 1, vals[i] + 1, vals[i] - 1, vals[i] * 2, 2**62, payload[-1]][payload[0] % 7]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data[8 + n :]


CONFIG_VALUES = [0, -1, 1, 3, 2**31, 10**9, 1e308, float("nan"), float("inf"), 0.5, "x", None, []]


def mutate_config(data: bytes, seed: int, payload: list[int]) -> bytes:
    """Set one top-level field of a config.json to an awkward value (zero, negative, huge,
    NaN, Inf, wrong type), or nest the whole config deeply."""
    config = json.loads(data)
    if payload[0] == 255:  # a deeply nested value (RecursionError bait), written by hand
        head = json.dumps(config)[:-1]
        return f'{head}, "nested": {"[" * 100_000}{"]" * 100_000}}}'.encode()
    keys = sorted(config)
    gen = torch.Generator().manual_seed(seed)
    key = keys[int(torch.randint(0, len(keys), (1,), generator=gen))]
    config[key] = CONFIG_VALUES[payload[-1] % len(CONFIG_VALUES)]
    return json.dumps(config).encode()
