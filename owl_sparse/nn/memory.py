"""Giving memory back after layers are packed (CPU).

Two things keep a CPU process as large as the dense model after `sparsify_` dropped the
dense weights, measured on SmolLM2-135M (fp32, 70%): 513 MiB of a memory-mapped weight
file stayed resident, and glibc kept about 250 MiB of freed heap.

- **File mappings.** transformers (through safetensors) loads a CPU model as views of the
  memory-mapped weight file. Each tensor's storage is a slice of one mapping, and the
  mapping, with every page read or written through it (pruning writes the weights: those
  pages become private copies), lives until the *last* tensor from the file is gone. The
  embeddings and norms that packing keeps therefore hold the dropped dense weights in
  memory. `own_memory_` copies the survivors into memory of their own so the mapping is
  unmapped.
- **The allocator.** glibc returns freed heap to the system only at the top of the heap;
  `return_freed_memory` asks it to release every free page (``malloc_trim(0)``). A no-op
  where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn


def external_memory(t: torch.Tensor | None) -> bool:
    """A CPU tensor whose storage torch did not allocate (a file mapping, a numpy array,
    ``torch.frombuffer``): such storages cannot be resized."""
    return (
        t is not None
        and t.device.type == "cpu"
        and not t.is_meta
        and not t.untyped_storage().resizable()
    )


def own_memory_(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer of ``model`` that lives in memory torch did not
    allocate (see the module doc) into memory of its own, in place (``.data`` is swapped,
    so ``nn.Parameter`` objects, their names and ties are kept).

    Costs one transient copy of each such tensor; afterwards the memory they came from
    (typically a weight file's mapping) is released once nothing else refers to it.

    Returns:
        the number of tensors copied.
    """
    copies: dict[tuple, torch.Tensor] = {}  # one copy per view, so tied tensors stay tied
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for t in slots.values():
                if not external_memory(t):
                    continue
                key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
                if key not in copies:
                    copies[key] = t.data.clone()
                t.data = copies[key]
    return len(copies)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` or None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def return_freed_memory() -> bool:
    """Ask the C allocator to return freed heap pages to the operating system.

    Returns:
        True where it could ask (glibc), False elsewhere.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["external_memory", "own_memory_", "return_freed_memory"]
