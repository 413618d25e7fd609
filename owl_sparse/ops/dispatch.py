"""Which implementation runs a sparse linear op: the backend registry and the dispatch table.

Backends
--------
A backend is ``fn(x2d, packed, bias) -> y2d``: ``x2d`` the activation ``[T, K]``
(contiguous, same dtype as the packed values), ``packed`` a :class:`BitmapWeight` or
:class:`Sparse24Weight`, ``bias`` ``[N]`` or None; it returns a new ``[T, N]`` tensor.
Built in: ``"dense"`` for every format (:mod:`owl_sparse.ops.dense`), ``"cpu_sparse"`` (the CPU
kernels of :mod:`owl_sparse.ops.cpu`, which choose between themselves and dense panels per
call on CPU tensors, from the same tables), ``"triton_gemv"`` and
``"triton_mm"`` (bitmap) and ``"triton_gemv"`` (2:4). On a machine with a GPU,
:mod:`owl_sparse.ops.cuda` supplies ``"cuda_mma"``, ``"cuda_gemv"`` and ``"cuda_mma_wgmma"``
(bitmap) and ``"cuda_sp"`` and ``"cuda_sp_wgmma"`` (2:4); ``cuda_gemv`` and the two wgmma
backends are only ever chosen from measurements (no default rule names them).

Choice, in order (see :func:`choose_backend`)
--------------------------------------------
1. a forced backend: :func:`force_backend` or ``OWL_SPARSE_BACKEND="bitmap=triton_mm,2:4=dense"``;
2. the measured table: JSON files in ``owl_sparse/ops/tables/`` (and any listed in
   ``OWL_SPARSE_DISPATCH_TABLES``), written by the GPU benchmarks with :func:`save_table`.
   Schema::

       {"gpu": "NVIDIA H100 80GB HBM3",
        "entries": [{"fmt": "bitmap", "dtype": "float16", "N": 4096, "K": 4096,
                     "tokens": 16, "sparsity": 0.7, "backend": "triton_gemv",
                     "why": "2.1x dense"}, ...]}

   ``tokens`` is the bucket: the next power of two >= the token count.  Among the entries
   matching (GPU name, fmt, dtype, N, K, bucket) the one with the nearest ``sparsity`` wins.
   A shape the table lacks borrows the entries of the nearest measured shape on the same
   GPU, fmt, dtype and bucket when N and K are each within 2x of it
   (``|log2 N/N'| + |log2 K/K'| <= 1``).  The benchmark writes ``"dense"`` wherever no
   kernel beats dense, so the table never picks a kernel measured slower than dense.
   Entries naming a backend that is unavailable here (or switched off with
   ``OWL_SPARSE_DISABLE="cuda_sp_wgmma,..."``) are passed over.
3. default rules where no measurement is near (conservative): 2:4 at <= 16 tokens uses the
   first available of ``cuda_sp`` / ``triton_gemv``; bitmap at sparsity >= 0.5 and <= 16
   tokens uses ``triton_gemv`` only on a GPU with no bitmap measurements at all (where some
   exist, they showed where the kernels lose, so an unmeasured shape runs dense);
   everything else runs dense. Only kernels that passed the GPU tests are named here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import settings
from ..errors import InputError
from . import cpu, cuda, table
from .dense import dense_linear
from .table import FORMATS, has_measurements, table_lookup, token_bucket

__all__ = [
    "backends",
    "choose_backend",
    "choose_backend_why",
    "disabled_backends",
    "force_backend",
    "register_backend",
    "reload_tables",
    "run",
    "save_table",
    "table_lookup",
    "token_bucket",
]

log = logging.getLogger(__name__)

DEFAULT_ORDER = {"bitmap": ("triton_gemv",), "2:4": ("cuda_sp", "triton_gemv")}
DEFAULT_MAX_TOKENS = 16
DEFAULT_MIN_SPARSITY = 0.5


@dataclass(frozen=True)
class Backend:
    fmt: str
    name: str
    fn: Callable
    available: Callable[[], bool]


_BACKENDS: dict[str, dict[str, Backend]] = {f: {} for f in FORMATS}
_FORCED: dict[str, str] = {}


def register_backend(
    fmt: str, name: str, fn: Callable, available: Callable[[], bool] | None = None
):
    """Register (or replace) backend ``name`` for ``fmt``; ``available()`` says if it can run."""
    if fmt not in _BACKENDS:
        raise InputError(f"register_backend: unknown format {fmt!r}; expected one of {FORMATS}")
    _BACKENDS[fmt][name] = Backend(fmt, name, fn, available or (lambda: True))


def backends(fmt: str, only_available: bool = False) -> list[str]:
    """Names of the backends registered for ``fmt`` (optionally only those available now)."""
    _load_plugins()
    regs = _BACKENDS.get(fmt, {})
    return [n for n, b in regs.items() if not only_available or _is_available(b)]


def disabled_backends() -> set[str]:
    """Backend names switched off by ``OWL_SPARSE_DISABLE`` ("cuda_sp_wgmma,cuda_gemv"):
    they count as unavailable everywhere (the table skips them, forcing one is an error).
    ``dense`` is every format's fallback and is never switched off; a name no format has
    registered is reported once (a typo would otherwise switch nothing off)."""
    return _checked_disabled(settings.get().disabled_backends)


@functools.lru_cache(maxsize=8)
def _checked_disabled(names: frozenset[str]) -> frozenset[str]:
    _load_plugins()
    known = {n for regs in _BACKENDS.values() for n in regs}
    unknown = sorted(names - known)
    if unknown:
        log.warning(
            "OWL_SPARSE_DISABLE names no registered backend: %s (registered: %s)",
            ", ".join(unknown),
            ", ".join(sorted(known)),
        )
    return names


def _is_available(b: Backend) -> bool:
    if b.name in disabled_backends():
        return False
    try:
        return bool(b.available())
    except Exception as exc:  # an availability probe must never break dispatch
        log.warning("backend %s/%s availability check failed: %s", b.fmt, b.name, exc)
        return False


@contextlib.contextmanager
def force_backend(fmt: str, name: str):
    """Context manager: run every ``fmt`` op through backend ``name`` (tests, benchmarks)."""
    if name not in backends(fmt):
        raise InputError(
            f"force_backend: no backend {name!r} for {fmt!r}; registered: {backends(fmt)}"
        )
    old = _FORCED.get(fmt)
    _FORCED[fmt] = name
    cpu.force(fmt, name if name in cpu.BACKENDS else None)
    try:
        yield
    finally:
        if old is None:
            _FORCED.pop(fmt, None)
        else:
            _FORCED[fmt] = old
        _restore_cpu_forcing(fmt)


def reload_tables() -> None:
    """Read the measured tables again (after one was written) and hand the CPU kernels
    their part."""
    table.reload_tables()
    if cpu.available():
        cpu.push_table()


def save_table(path, device: str, entries: list[dict]):
    """Write a measured table for ``device`` (a GPU's name or ``cpu:<isa>``, see
    :mod:`owl_sparse.ops.table` for the schema) and start using it."""
    written = table.save_table(path, device, entries)
    reload_tables()
    return written


def _restore_cpu_forcing(fmt: str) -> None:
    """Give the CPU kernels back the forcing of force_backend / OWL_SPARSE_BACKEND, if any."""
    forced = _FORCED.get(fmt) or settings.get().forced_backend(fmt)
    cpu.force(fmt, forced if forced in cpu.BACKENDS else None)


@functools.lru_cache(maxsize=16)
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


# ---------------------------------------------------------------------------- choice
def choose_backend(fmt: str, x2d: Tensor, packed) -> str:
    """Name of the backend that runs ``fmt`` for activation ``x2d`` [T, K] and ``packed``."""
    return choose_backend_why(fmt, x2d, packed)[0]


def choose_backend_why(fmt: str, x2d: Tensor, packed) -> tuple[str, str]:
    """(backend name, reason) -- the reason says which rule or table entry decided."""
    _load_plugins()
    regs = _BACKENDS[fmt]
    forced = _FORCED.get(fmt) or settings.get().forced_backend(fmt)
    if forced:
        if forced not in regs or not _is_available(regs[forced]):
            raise InputError(
                f"forced backend {forced!r} for {fmt!r} is not registered or not available"
            )
        return forced, "forced"
    if x2d.device.type == "cpu":
        return cpu.choose(fmt, x2d.dtype, packed.N, packed.K, x2d.shape[0], packed.sparsity)
    if x2d.device.type != "cuda":
        return "dense", f"no sparse kernels on {x2d.device.type}"
    tokens = x2d.shape[0]
    gpu = _gpu_name(x2d.device)
    hit = table_lookup(gpu, fmt, x2d.dtype, packed.N, packed.K, tokens, packed.sparsity)
    if hit is not None and hit[0] in regs and _is_available(regs[hit[0]]):
        return hit
    if fmt == "bitmap" and has_measurements(gpu, fmt):
        return "dense", f"default rule: bitmap shape unmeasured on {gpu}, nothing near"
    if tokens <= DEFAULT_MAX_TOKENS and (fmt == "2:4" or packed.sparsity >= DEFAULT_MIN_SPARSITY):
        for name in DEFAULT_ORDER[fmt]:
            if name in regs and _is_available(regs[name]):
                return name, "default rule (unmeasured): sparse kernel for decode"
    return "dense", "default rule (unmeasured): dense beyond decode or below 50% sparsity"


def run(fmt: str, x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    """Run the chosen backend: ``y2d [T, N] = x2d @ W^T + bias``."""
    return _BACKENDS[fmt][choose_backend(fmt, x2d, packed)].fn(x2d, packed, bias)


# ---------------------------------------------------------------------------- built-ins
@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or settings.get().triton_interpret


# The Triton launchers are imported on first call: importing Triton is slow and needs a
# working installation, which a CPU-only user may not have.
def _triton_bitmap_gemv(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    from ..kernels.bitmap_gemv import bitmap_gemv

    return bitmap_gemv(x2d, packed, bias)


def _triton_bitmap_mm(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    from ..kernels.bitmap_mm import bitmap_mm

    return bitmap_mm(x2d, packed, bias)


def _triton_sparse24_gemv(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    from ..kernels.sparse24_gemv import sparse24_gemv

    return sparse24_gemv(x2d, packed, bias)


def _cpu_sparse(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    """The CPU kernels on the packed bytes (``cpu_sparse``), whatever their table says."""
    cpu.force(packed.fmt, "cpu_sparse")
    try:
        if packed.fmt == "bitmap":
            return torch.ops.owl_sparse.bitmap_linear(
                x2d, packed.bitmap, packed.values, packed.tile_offsets, bias, packed.N, packed.K
            )
        return torch.ops.owl_sparse.sparse24_linear(x2d, packed.values, packed.meta, bias)
    finally:
        _restore_cpu_forcing(packed.fmt)


_PLUGINS_TRIED = [False]


def _load_plugins() -> None:
    """Register the CUDA extension's backends once (their availability probes load the
    extension on first need, and say False on a machine without a GPU)."""
    if _PLUGINS_TRIED[0]:
        return
    _PLUGINS_TRIED[0] = True
    for fmt, name, fn, available in cuda.backends():
        register_backend(fmt, name, fn, available)


for _fmt in FORMATS:
    register_backend(_fmt, "dense", dense_linear)
for _fmt in FORMATS:
    register_backend(_fmt, "cpu_sparse", _cpu_sparse, cpu.available)
register_backend("bitmap", "triton_gemv", _triton_bitmap_gemv, _triton_available)
register_backend("bitmap", "triton_mm", _triton_bitmap_mm, _triton_available)
register_backend("2:4", "triton_gemv", _triton_sparse24_gemv, _triton_available)
