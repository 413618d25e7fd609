"""Values derived from tensors, cached until the tensors change or are freed (internal).

Two caches use it: :func:`owl_sparse.ops.dense.dense_weight` (a dense copy of each packed
weight) and :mod:`owl_sparse.ops.cuda` (the mma layout of a 2:4 weight, the largest
bitmap tile).  Both are hot: the dense copy runs every CPU forward, and a CUDA graph
capture relies on them being warm, since computing them during capture would synchronise.

Soundness rests on torch's version counters: every in-place change to a tensor (or to a
view of it) bumps its ``_version``.  An entry is served only while each source tensor has
the same storage object, view (offset, shape, stride, dtype, device) and version as when
it was computed.  Entries are dropped when any source storage is freed.

Inference tensors (made under ``torch.inference_mode``) keep no version counter, so an
in-place change to one can never be detected: values derived from them are *never*
cached, but recomputed on every call (a warning says so once).  A stale answer is worse
than a slow one.  Writes that bypass the version counter (through ``.data``, ``.numpy()``
or DLPack) are not seen either: call ``clear()`` after such writes.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


@dataclass
class _Entry:
    refs: tuple  # weak references to the source storages
    versions: tuple[int, ...]
    value: Any
    nbytes: int


def _nbytes(value) -> int:
    """Bytes held by a cached value: a tensor or a tuple / list of tensors (others: 0)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(_nbytes(v) for v in value)
    return 0


class DerivedCache:
    """``compute(*tensors)`` cached per (tag, extra key, source tensors).

    Args:
        name: what the cache holds, for the log ("dense weights").
        limit_bytes: called before storing an entry; returns the byte cap of the whole
            cache, or None for no cap.  Past the cap values are computed but not stored.
    """

    def __init__(self, name: str, limit_bytes: Callable[[], float | None] | None = None):
        self.name = name
        self._limit = limit_bytes or (lambda: None)
        self._entries: dict[tuple, _Entry] = {}
        self._nbytes = 0

    def get(
        self,
        tag: str,
        tensors: tuple[Tensor, ...],
        compute: Callable,
        *,
        may_compute: bool = True,
        extra: tuple = (),
    ):
        """The value of ``compute(*tensors)``, from the cache when it is still valid.

        ``extra``: hashable key parts the value also depends on (a weight's N, K).
        ``may_compute=False`` (during a CUDA graph capture, say): return None instead of
        computing on a miss, and for inference tensors, which are never cached.
        """
        if any(t.is_inference() for t in tensors):
            self._warn_uncacheable()
            return compute(*tensors) if may_compute else None
        storages = [t.untyped_storage() for t in tensors]
        key = (tag, extra) + tuple(
            (id(s), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
            for s, t in zip(storages, tensors)
        )
        versions = tuple(t._version for t in tensors)
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry.versions == versions
            and all(r() is s for r, s in zip(entry.refs, storages))
        ):
            return entry.value
        if not may_compute:
            return None
        self._forget(key)  # free a stale value before computing its successor
        value = compute(*tensors)
        size = _nbytes(value)
        limit = self._limit()
        if limit is None or self._nbytes + size <= limit:
            refs = tuple(weakref.ref(s, lambda _, k=key: self._forget(k)) for s in storages)
            self._entries[key] = _Entry(refs, versions, value, size)
            self._nbytes += size
        return value

    def _forget(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._nbytes -= entry.nbytes

    def _warn_uncacheable(self) -> None:
        if self.name not in _WARNED:
            _WARNED.add(self.name)
            log.warning(
                "owl-sparse: packed weights made under torch.inference_mode() keep no version "
                "counter, so their %s cannot be cached safely and are rebuilt on every call "
                "(slow); create or load the model outside inference_mode (torch.no_grad() "
                "is enough for serving)",
                self.name,
            )

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)
