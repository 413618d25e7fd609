"""The CUDA extension (csrc/): loading, and its backends for the dispatch table.

Kernels: ``cuda_sp`` (2:4 on sparse tensor cores, ``mma.sp`` m16n8k32), ``cuda_sp_wgmma``
(2:4 prefill on Hopper's warpgroup sparse tensor cores, ``wgmma.mma_async.sp``; sm_90a
builds on H100 / H200 only, 33+ tokens, fewer go to ``cuda_sp``), ``cuda_mma_wgmma``
(bitmap, 33-128 tokens, register-built A tiles on ``wgmma.mma_async``, same limits), ``cuda_mma``
(bitmap on ``mma.sync`` m16n8k16: A registers built from the bitmap per lane up to 128
tokens, tiles decoded into shared memory beyond) and ``cuda_gemv`` (bitmap on
CUDA cores for 1-8 tokens, work per kept weight; more tokens go to ``cuda_mma``); fp16 /
bf16, sm_80+.

Loading, on first use (never at import, so ``import owl_sparse`` stays cheap):

1. ``owl_sparse._C`` when ``setup.py`` built it (``pip install -e .`` on a machine with
   a CUDA build of torch and nvcc; see setup.py for its switches);
2. otherwise a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja),
   for the visible GPU's architecture, cached by torch in ``TORCH_EXTENSIONS_DIR``.
   ``OWL_SPARSE_NO_JIT=1`` disables it, ``OWL_SPARSE_FORCE_JIT=1`` skips step 1.

Where neither works (no GPU, a CPU build of torch, no compiler) :func:`available` is
False, the reason is logged once, and the ops fall back to Triton / dense.

:func:`backends` lists this module's backends; :mod:`owl_sparse.ops.dispatch` registers
them.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from pathlib import Path

import torch
from torch import Tensor

from .. import settings
from ..errors import InputError
from ..formats.mma_layout import sparse24_to_mma
from .cache import DerivedCache
from .dense import dense_linear

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
SOURCES = ("bindings.cpp", "sparse24_mma.cu", "bitmap_mma.cu")  # + the headers they include
KERNEL_DTYPES = (torch.float16, torch.bfloat16)

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "how": None, "error": None}


def _has_ops() -> bool:
    return hasattr(torch.ops, "owl_sparse_C") and hasattr(torch.ops.owl_sparse_C, "sparse24_mm")


def _jit_build() -> str:
    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(
            f"CUDA sources {missing} not found in {CSRC} (install from a source checkout)"
        )
    from torch.utils.cpp_extension import load as cpp_load

    major, minor = torch.cuda.get_device_capability()
    log.warning(
        "owl-sparse: building the CUDA kernels for sm_%d%d with ninja (first use only; "
        "cached in TORCH_EXTENSIONS_DIR)",
        major,
        minor,
    )
    cuda_flags = ["-O3", "-lineinfo"]
    if (major, minor) == (9, 0):
        # Hopper: sm_90a machine code for the wgmma kernels (an explicit -gencode makes
        # torch add no arch flags of its own; see setup.py)
        cuda_flags += ["-gencode=arch=compute_90a,code=sm_90a", "-DOWL_SPARSE_SM90A"]
    cpp_load(
        name="owl_sparse_C_jit",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=cuda_flags,
        is_python_module=False,
        verbose=settings.get().jit_verbose,
    )
    return "jit"


def _load() -> str:
    if _has_ops():
        return "already loaded"
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is not a CUDA build")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"the kernels need sm_80 or newer, found {torch.cuda.get_device_name()}")
    reason = "OWL_SPARSE_FORCE_JIT=1"
    if not settings.get().force_jit:
        try:
            importlib.import_module("owl_sparse._C")
            if _has_ops():
                return "prebuilt owl_sparse._C"
            reason = "owl_sparse._C registered no ops"
        except ImportError as exc:
            reason = f"owl_sparse._C not built ({exc})"
    if settings.get().no_jit:
        raise RuntimeError(f"{reason}, and OWL_SPARSE_NO_JIT=1 forbids a JIT build")
    how = _jit_build()
    if not _has_ops():
        raise RuntimeError("the JIT-built library registered no owl_sparse_C ops")
    return how


def load() -> bool:
    """Load the extension (once per process); True when its ops can run.  Never raises."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["how"] = _load()
                _state["ok"] = True
                log.info("owl-sparse CUDA kernels loaded (%s)", _state["how"])
            except Exception as exc:  # any failure means "unavailable", reported once
                _state["error"] = f"{type(exc).__name__}: {exc}"
                level = (
                    logging.INFO
                    if "no CUDA device" in str(exc) or "not a CUDA build" in str(exc)
                    else logging.WARNING
                )
                log.log(
                    level,
                    "owl-sparse CUDA kernels unavailable (%s); using Triton / dense",
                    _state["error"],
                )
    return _state["ok"]


def available() -> bool:
    """True when the CUDA kernels can run here (loads them on first call)."""
    return load()


def status() -> dict:
    """``{"tried", "ok", "how", "error"}``: how the extension was loaded, or why not."""
    return dict(_state)


def _require() -> None:
    if not load():
        raise RuntimeError(f"owl-sparse CUDA kernels unavailable: {_state['error']}")


# ------------------------------------------------------------ derived, cached tensors
# Kernel-side layouts computed from packed tensors, once per (tag, storages): dropped when
# the tensors are freed, recomputed after an in-place change, never kept for inference
# tensors (see owl_sparse.ops.cache).  ``may_compute=False`` returns None on a miss
# (during CUDA graph capture, where computing would synchronise).
_DERIVED = DerivedCache("CUDA kernel layouts")


# ---------------------------------------------------------------------------- 2:4
def mma_tensors(packed) -> tuple[Tensor, Tensor]:
    """(values_mma, meta_mma) of a :class:`Sparse24Weight`, converted once per packed storage.

    The conversion (owl_sparse.formats.mma_layout) runs on the packed weight's device; the
    entry is dropped when the packed tensors are freed and rebuilt if they are modified
    (inference tensors are converted on every call: their changes cannot be detected).
    The metadata is validated first (strictly increasing indices per group; raises
    InputError): the sparse tensor cores' behaviour on any other index pair is undefined.
    The check reads a flag back from the device, so it is skipped while a CUDA graph is
    being captured (the warm-up call before a capture has converted and checked it).
    """

    def convert(values: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        if not (meta.is_cuda and torch.cuda.is_current_stream_capturing()):
            packed.validate()
        return sparse24_to_mma(values, meta)

    return _DERIVED.get("mma", (packed.values, packed.meta), convert)


def sparse24_mm(
    x2d: Tensor, packed, bias: Tensor | None = None, split_k: int = 0, config: int = -1
) -> Tensor:
    """``y [T, N] = x2d [T, K] @ W^T + bias`` on sparse tensor cores (W a Sparse24Weight).

    ``x2d``: contiguous fp16/bf16 on the weight's device; ``split_k``: 0 = automatic,
    > 0 forces that many K splits (tests / benchmarks); ``config``: -1 = automatic (never
    the wgmma one), >= 0 that launch configuration, which must run on this device as it is
    (:func:`sparse24_wgmma_config` gives the wgmma one's index).  Raises when unavailable.
    """
    _require()
    _check(x2d, packed, bias)
    vm, mm = mma_tensors(packed)
    return torch.ops.owl_sparse_C.sparse24_mm(
        x2d, vm, mm, packed.N, packed.K, bias, split_k, config
    )


def sparse24_wgmma_config() -> int:
    """Index of the 2:4 configuration on Hopper's warpgroup sparse tensor cores
    (``wgmma.mma_async.sp``) on the current device, or -1: it needs an sm_90a build and a
    compute capability 9.0 GPU (H100 / H200)."""
    if not load():
        return -1
    return _wgmma_config("sparse24", torch.cuda.current_device(), 0)


@functools.lru_cache(maxsize=256)
def _wgmma_config(kind: str, device: int, tokens: int) -> int:
    """The extension's answer, once per (kind, device, tokens): it is fixed by the build and
    the GPU, and the backends ask on every call."""
    with torch.cuda.device(device):
        if kind == "sparse24":
            return int(torch.ops.owl_sparse_C.sparse24_wgmma_config())
        return int(torch.ops.owl_sparse_C.bitmap_wgmma_config(tokens))


# The wgmma backends serve WGMMA_MIN_TOKENS (2:4: up; bitmap: up to BITMAP_WGMMA_MAX_TOKENS)
# tokens; other token counts go to cuda_sp / cuda_mma.
WGMMA_MIN_TOKENS = 33
BITMAP_WGMMA_MAX_TOKENS = 128


# ---------------------------------------------------------------------------- bitmap
def _max_tile_values(tile_offsets: Tensor) -> int:
    if tile_offsets.numel() < 2:
        return 0
    return max(int((tile_offsets[1:] - tile_offsets[:-1]).max()), 0)


def max_tile_values(packed) -> int:
    """The most values one 16 x 128 tile of a :class:`BitmapWeight` holds (cached per
    packed storage), or -1 while a CUDA graph is being captured and nothing is cached yet,
    as is always the case for inference tensors (reading it back would synchronize).  The bitmap kernel sizes its shared buffers by
    it; -1 means full-size buffers (slower, same result)."""
    off = packed.tile_offsets
    capturing = off.is_cuda and torch.cuda.is_current_stream_capturing()
    value = _DERIVED.get("max_tile_values", (off,), _max_tile_values, may_compute=not capturing)
    return -1 if value is None else value


def _bitmap_op(
    name: str, x2d: Tensor, packed, bias, split_k: int, hint: int | None, *extra
) -> Tensor:
    """Run the extension op ``owl_sparse_C.<name>`` (bitmap_mm or bitmap_gemv); ``extra``:
    trailing op arguments (bitmap_mm's ``config``)."""
    _require()
    _check(x2d, packed, bias)
    hint = max_tile_values(packed) if hint is None else hint
    return getattr(torch.ops.owl_sparse_C, name)(
        x2d,
        packed.bitmap,
        packed.values,
        packed.tile_offsets,
        packed.N,
        packed.K,
        bias,
        split_k,
        hint,
        *extra,
    )


def bitmap_mm(
    x2d: Tensor,
    packed,
    bias: Tensor | None = None,
    split_k: int = 0,
    max_tile_values_hint: int | None = None,
    config: int = -1,
) -> Tensor:
    """``y [T, N] = x2d [T, K] @ W^T + bias`` with W a BitmapWeight (tensor-core decode kernel).

    ``max_tile_values_hint``: overrides :func:`max_tile_values` (tests of the kernel's
    path for tiles larger than its shared buffers; -1 = full-size buffers); ``config``:
    -1 = automatic (never a wgmma one), >= 0 that launch configuration, which must run on
    this device as it is (:func:`bitmap_wgmma_config` gives the wgmma ones).
    """
    return _bitmap_op("bitmap_mm", x2d, packed, bias, split_k, max_tile_values_hint, config)


def bitmap_wgmma_config(tokens: int) -> int:
    """Index of the bitmap configuration on Hopper's warpgroup MMA (``wgmma.mma_async``,
    register-built A tiles, 64- or 128-token tiles) for ``tokens`` on the current device,
    or -1 (more than 128 tokens, not an sm_90a build, or not a compute capability 9.0 GPU).
    """
    if not load():
        return -1
    return _wgmma_config("bitmap", torch.cuda.current_device(), int(tokens))


GEMV_MAX_TOKENS = 8


def bitmap_gemv(
    x2d: Tensor,
    packed,
    bias: Tensor | None = None,
    split_k: int = 0,
    max_tile_values_hint: int | None = None,
) -> Tensor:
    """:func:`bitmap_mm` on CUDA cores for ``x2d`` of 1 to 8 tokens (per kept weight: no
    dense tile, no tensor cores).  Same arguments; more than 8 tokens is an InputError."""
    if x2d.dim() == 2 and x2d.shape[0] > GEMV_MAX_TOKENS:
        raise InputError(
            f"bitmap_gemv handles 1 to {GEMV_MAX_TOKENS} tokens, got {x2d.shape[0]} (use bitmap_mm)"
        )
    return _bitmap_op("bitmap_gemv", x2d, packed, bias, split_k, max_tile_values_hint)


def plan(
    kind: str,
    tokens: int,
    n: int,
    k: int,
    split_k: int = 0,
    max_tile_values: int = -1,
    config: int = -1,
) -> dict:
    """The launch plan a kernel would use ("sparse24", "bitmap" or "bitmap_gemv") here.

    ``max_tile_values``: bitmap only, as returned by :func:`max_tile_values` (-1: unknown);
    ``config``: sparse24 only, as in :func:`sparse24_mm`.
    """
    _require()
    keys = ("config", "block_m", "block_n", "grid_m", "grid_n", "splits", "smem_bytes")
    raw = torch.ops.owl_sparse_C.plan(kind, tokens, n, k, split_k, max_tile_values, config)
    return dict(zip(keys, raw))


def _check(x2d: Tensor, packed, bias: Tensor | None) -> None:
    if x2d.dim() != 2 or x2d.shape[1] != packed.K:
        raise InputError(
            f"x must be [T, {packed.K}] for weight [{packed.N}, {packed.K}], got {list(x2d.shape)}"
        )
    if x2d.dtype not in KERNEL_DTYPES or x2d.dtype != packed.dtype:
        raise InputError(
            f"the CUDA kernels take float16/bfloat16 x matching the weight, got x {x2d.dtype}, "
            f"weight {packed.dtype}"
        )


# ---------------------------------------------------------------------------- dispatch
_FALLBACK_LOGGED: set = set()


def _fallback(name: str, x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    """fp32 weights: the kernels are fp16/bf16 only, so run the dense backend."""
    if name not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(name)
        log.info(
            "%s: %s weights are not supported by the CUDA kernels; running dense", name, x2d.dtype
        )
    return dense_linear(x2d, packed, bias)


def _sparse24_backend(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    if x2d.dtype not in KERNEL_DTYPES:
        return _fallback("cuda_sp", x2d, packed, bias)
    return sparse24_mm(x2d, packed, bias)


def _sparse24_wgmma_backend(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    """``cuda_sp_wgmma`` from 33 tokens on; fewer tokens go to ``cuda_sp``."""
    if x2d.dtype not in KERNEL_DTYPES:
        return _fallback("cuda_sp_wgmma", x2d, packed, bias)
    if x2d.shape[0] < WGMMA_MIN_TOKENS:
        return sparse24_mm(x2d, packed, bias)
    return sparse24_mm(x2d, packed, bias, config=_wgmma_config("sparse24", x2d.device.index, 0))


def _wgmma_available() -> bool:
    return sparse24_wgmma_config() >= 0


def _bitmap_wgmma_backend(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    """``cuda_mma_wgmma`` for 33-128 tokens; other token counts go to ``cuda_mma``."""
    if x2d.dtype not in KERNEL_DTYPES:
        return _fallback("cuda_mma_wgmma", x2d, packed, bias)
    t = x2d.shape[0]
    if not WGMMA_MIN_TOKENS <= t <= BITMAP_WGMMA_MAX_TOKENS:
        return bitmap_mm(x2d, packed, bias)
    return bitmap_mm(x2d, packed, bias, config=_wgmma_config("bitmap", x2d.device.index, t))


def _bitmap_wgmma_available() -> bool:
    return bitmap_wgmma_config(BITMAP_WGMMA_MAX_TOKENS) >= 0


def _bitmap_backend(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    if x2d.dtype not in KERNEL_DTYPES:
        return _fallback("cuda_mma", x2d, packed, bias)
    return bitmap_mm(x2d, packed, bias)


def _bitmap_gemv_backend(x2d: Tensor, packed, bias: Tensor | None) -> Tensor:
    """``cuda_gemv`` up to 8 tokens; beyond, the tensor-core kernel (``cuda_mma``)."""
    if x2d.dtype not in KERNEL_DTYPES:
        return _fallback("cuda_gemv", x2d, packed, bias)
    if x2d.shape[0] > GEMV_MAX_TOKENS:
        return bitmap_mm(x2d, packed, bias)
    return bitmap_gemv(x2d, packed, bias)


def backends() -> list[tuple[str, str, object, object]]:
    """``(format, name, fn, available)`` of every backend of the extension, for
    :func:`owl_sparse.ops.dispatch.register_backend`."""
    return [
        ("2:4", "cuda_sp", _sparse24_backend, available),
        ("2:4", "cuda_sp_wgmma", _sparse24_wgmma_backend, _wgmma_available),
        ("bitmap", "cuda_mma", _bitmap_backend, available),
        ("bitmap", "cuda_gemv", _bitmap_gemv_backend, available),
        ("bitmap", "cuda_mma_wgmma", _bitmap_wgmma_backend, _bitmap_wgmma_available),
    ]
