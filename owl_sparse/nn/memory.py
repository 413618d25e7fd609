"""Giving memory back after layers are packed (CPU).

Two things keep a CPU process as large as the dense model after `sparsify_` dropped the
dense weights, measured on SmolLM2-135M (fp32, 70%): 513 MiB of a memory-mapped weight
file stayed resident, and glibc kept about 250 MiB of freed heap.

- **File mappings.** transformers (through safetensors) loads a CPU model as views of the
  memory-mapped weight file. Each tensor's storage is a slice of one mapping, and the
  mapping, with every page read or written through it (pruning writes the weights: those
  pages become private copies), lives until the *last* tensor from the file is gone. The
  embeddings and norms that packing keeps therefore hold the dropped dense weights in
  memory. `own_memory_` copies tensors into memory of their own so the mapping is
  unmapped, one tensor at a time: after each copy it asks the kernel to reclaim the pages
  the copy came from (``madvise(MADV_PAGEOUT)``), so the process never holds the file's
  pages and all the copies at once (SmolLM2-135M fp32: peak 1474 -> 1092 MiB while owning
  a freshly loaded model). `owl_sparse.models.load_model` owns a CPU model's memory right
  after loading, so pruning and packing never meet a mapping.
- **The allocator.** glibc returns freed heap to the system only at the top of the heap;
  `return_freed_memory` asks it to release every free page (``malloc_trim(0)``). A no-op
  where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

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

    A few MiB at a time: after each piece is copied, the pages wholly inside it are handed
    back with `release_pages` (a hint that never changes what any reader sees), so the
    transient cost is a few MiB, not the model (nor its largest tensor). The memory the tensors came
    from (typically a weight file's mapping) is released once nothing else refers to it.

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
                    copies[key] = _copy_releasing(t.data)
                t.data = copies[key]
    return len(copies)


_COPY_CHUNK_BYTES = 8 << 20


def _copy_releasing(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in memory of its own, made piece by piece, each piece's source
    pages released once copied (a non-contiguous ``t`` is cloned whole)."""
    if not t.is_contiguous():
        return t.clone()
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    src, dst = t.view(-1), out.view(-1)
    step = max(1, _COPY_CHUNK_BYTES // max(1, t.element_size()))
    for i in range(0, src.numel(), step):
        dst[i : i + step].copy_(src[i : i + step])
        release_pages(src[i : i + step])
    return out


_MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)  # Linux >= 5.4


@functools.cache
def _madvise():
    """libc's ``madvise`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def release_pages(t: torch.Tensor) -> bool:
    """Ask the kernel to reclaim the memory pages lying wholly inside CPU tensor ``t``
    (``madvise(MADV_PAGEOUT)``, Linux 5.4+), for a tensor about to be dropped whose pages
    would otherwise stay resident while the rest of their mapping lives.

    Safe for any tensor and any reader: PAGEOUT only reclaims. Unmodified pages of a file
    mapping are dropped from this process and read back from the file on the next access
    (same contents); modified or anonymous pages are swapped out where there is swap and
    otherwise stay. Pages ``t`` shares with a neighbour (its first and last, unless
    page-aligned) are left alone.

    Returns:
        True when the kernel took the hint, False where it cannot be given (not Linux,
        an older kernel, a tensor smaller than a page, not on the CPU).
    """
    fn = _madvise()
    if fn is None or t.device.type != "cpu" or t.is_meta:
        return False
    page = mmap.PAGESIZE
    if not t.is_contiguous():  # its span may interleave with other views' elements
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // page) * page, end // page * page
    if hi <= lo:
        return False
    return fn(lo, hi - lo, _MADV_PAGEOUT) == 0


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


__all__ = ["external_memory", "own_memory_", "release_pages", "return_freed_memory"]
