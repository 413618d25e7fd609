"""The CPU kernels (csrc/cpu/): loading, configuration, and what they run.

Once loaded, the compiled library is the CPU implementation of the ops
``owl_sparse::bitmap_linear`` / ``sparse24_linear`` (registered for torch's CPU dispatch key,
so callers never choose and torch.compile keeps working). It picks, per call, one of two
backends:

- ``cpu_sparse``: kernels that read the packed bytes once per call for up to 16 tokens
  (AVX-512 VBMI2 ``vpexpandw`` / AVX512_BF16 ``vdpbf16ps``, AVX2 shuffle tables, or plain
  C++, chosen from the CPU's features at run time);
- ``dense``: each thread unpacks blocks of its rows (whole 16-row strips, up to 384 rows
  and 8 MB) into its own panel, reused by every layer (no dense copy of a layer is ever
  kept), and multiplies x by it with torch's GEMM on that thread.  Where torch's GEMM in
  fp16 or bf16 is slow on this CPU (it has no oneDNN path for that dtype: no AVX-512, say),
  16-bit weights are widened to fp32 panels and multiplied in fp32 (:func:`wide_panels`).

The choice: a forced backend (`force`, :func:`owl_sparse.ops.dispatch.force_backend`,
``OWL_SPARSE_BACKEND``), else the measured table of this instruction set
(``ops/tables/*.json`` whose device is ``cpu:<isa>``), else ``cpu_sparse`` up to 16 tokens and
``dense`` beyond.

The library also serves ``owl_sparse::dense_linear`` (an ``nn.Linear`` weight as it is) with
two backends chosen the same way (table format ``"dense"``): ``cpu_kernel``, streaming the weight row
after row, once for up to 16 tokens (the same instruction sets), and ``torch``, torch's GEMM
on the weight; the measured table sends each token count to the faster.

Loading, once: ``owl_sparse._cpu`` when setup.py built it, else (on the first op call, never
at import) a JIT build of csrc/cpu with ninja; ``OWL_SPARSE_NO_JIT=1`` forbids it. Where
neither works the ops run the Python reference, and the reason is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import threading
from pathlib import Path

import torch

from .. import settings
from ..errors import InputError
from .table import table_entries

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc" / "cpu"
ISAS = settings.CPU_ISAS
# Backend names as the dispatch tables and force_backend know them -> the library's, for
# packed weights and for dense ones (owl_sparse::dense_linear).
BACKENDS = {"cpu_sparse": "kernel", "dense": "gemm"}
DENSE_BACKENDS = {"cpu_kernel": "kernel", "torch": "gemm"}
_FORMATS = ("bitmap", "2:4")


def _backends_of(fmt: str) -> dict[str, str]:
    return DENSE_BACKENDS if fmt == "dense" else BACKENDS


_lock = threading.RLock()  # _configure asks isa(), which asks load() again
_state: dict = {
    "tried_prebuilt": False,
    "tried_jit": False,
    "ok": False,
    "how": None,
    "error": None,
    "path": None,  # the loaded library's file
    "c_shims": None,  # c_shims(): None until asked, then the ops' names (empty if unusable)
}
_shims: dict = {}  # c_shims()'s answer

# The ops' C shims (csrc/cpu/register.cpp), as inductor's C++ wrapper declares and calls
# them: tensors as AtenTensorHandle, an optional one as a pointer (nullptr for None), the
# result through the last argument.
_C_SHIMS = {
    "bitmap_linear": "AOTITorchError aoti_torch_cpu_bitmap_linear(AtenTensorHandle x, "
    "AtenTensorHandle bitmap, AtenTensorHandle values, AtenTensorHandle tile_offsets, "
    "AtenTensorHandle* bias, int64_t n, int64_t k, AtenTensorHandle* ret0)",
    "bitmap_linear_group": "AOTITorchError aoti_torch_cpu_bitmap_linear_group(AtenTensorHandle x, "
    "const AtenTensorHandle* bitmaps, int64_t bitmaps_len_, const AtenTensorHandle* values, "
    "int64_t values_len_, const AtenTensorHandle* tile_offsets, int64_t tile_offsets_len_, "
    "const int64_t* ns, int64_t ns_len_, int64_t k, AtenTensorHandle* ret0)",
    "sparse24_linear": "AOTITorchError aoti_torch_cpu_sparse24_linear(AtenTensorHandle x, "
    "AtenTensorHandle values, AtenTensorHandle meta, AtenTensorHandle* bias, "
    "AtenTensorHandle* ret0)",
    "dense_linear": "AOTITorchError aoti_torch_cpu_dense_linear(AtenTensorHandle x, "
    "AtenTensorHandle weight, AtenTensorHandle* bias, AtenTensorHandle* ret0)",
}


def _has_ops() -> bool:
    return hasattr(torch.ops, "owl_sparse_cpu") and hasattr(torch.ops.owl_sparse_cpu, "isa")


def _jit_build() -> str:
    """Build and load csrc/cpu with ninja; the library's path."""
    from torch.utils.cpp_extension import load as cpp_load

    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no CPU kernel sources in {CSRC} (install from a source checkout)")
    log.warning(
        "owl-sparse: building the CPU kernels with ninja (first use only; cached in "
        "TORCH_EXTENSIONS_DIR)"
    )
    return cpp_load(
        name="owl_sparse_cpu_jit",
        sources=sources,
        extra_include_paths=[str(CSRC.parent)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=settings.get().jit_verbose,
    )


def load(jit: bool = True) -> bool:
    """Load the compiled CPU kernels once per process; True when they serve the ops.

    ``jit=False`` only imports a prebuilt ``owl_sparse._cpu`` (cheap, done at import of
    :mod:`owl_sparse.ops`); the JIT build waits for the first op call. Never raises.
    """
    with _lock:
        if _state["ok"] or (_state["tried_jit"] or (not jit and _state["tried_prebuilt"])):
            return _state["ok"]
        try:
            if not _has_ops() and not _state["tried_prebuilt"] and not settings.get().force_jit:
                _state["tried_prebuilt"] = True
                try:
                    _state["path"] = importlib.import_module("owl_sparse._cpu").__file__
                    _state["how"] = "prebuilt owl_sparse._cpu"
                except ImportError as exc:
                    _state["error"] = f"owl_sparse._cpu not built ({exc})"
            if not _has_ops() and jit:
                _state["tried_jit"] = True
                if settings.get().no_jit:
                    raise RuntimeError(
                        f"{_state['error']}, and OWL_SPARSE_NO_JIT=1 forbids a JIT build"
                    )
                _state["path"] = _jit_build()
                _state["how"] = "jit"
            if _has_ops():
                _state["ok"] = True
                _configure()
                log.info("owl-sparse CPU kernels loaded (%s, %s)", _state["how"], isa())
        except Exception as exc:  # any failure means "unavailable", reported once
            _state["ok"] = False
            _state["tried_jit"] = True
            _state["error"] = f"{type(exc).__name__}: {exc}"
            log.warning(
                "owl-sparse CPU kernels unavailable (%s); the ops run the slow Python reference",
                _state["error"],
            )
    return _state["ok"]


def c_shims() -> dict:
    """``{op overload: [C declaration]}`` for inductor's
    ``aot_inductor.custom_ops_to_c_shims`` option: with it, a compiled CPU graph written by
    the C++ wrapper (``cpp_wrapper``) calls the ops' C functions directly instead of through
    the boxed dispatcher (SmolLM2-135M packed 70%, bf16 decode: +3%, 8 interleaved rounds).

    The loaded library's symbols are made global (``dlopen`` with ``RTLD_GLOBAL``) so the
    graph's own library finds them. Empty, with one logged line, where that fails or the
    kernels are not loaded: the graphs then call the ops through the dispatcher. The
    functions are the CPU implementation: give the option to CPU graphs only.
    """
    with _lock:
        if _state["c_shims"] is None:
            _state["c_shims"] = []
            if load() and _state["path"]:
                try:
                    ctypes.CDLL(_state["path"], mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
                    lib = torch.ops.owl_sparse
                    _shims.update({getattr(lib, op).default: [d] for op, d in _C_SHIMS.items()})
                    _state["c_shims"] = sorted(_C_SHIMS)
                except OSError as exc:
                    log.warning(
                        "owl-sparse: compiled graphs call the CPU ops through the dispatcher (%s)",
                        exc,
                    )
        return dict(_shims)


def available() -> bool:
    """True when the compiled CPU kernels serve the ops (loads them on first call)."""
    return load()


def status() -> dict:
    """How the kernels were loaded, or why not: ``{"ok", "how", "error", ...}``."""
    return dict(_state)


def _configure() -> None:
    """Push the settings and this ISA's measured table into the library."""
    lib = torch.ops.owl_sparse_cpu
    chosen = settings.get().cpu_isa
    if chosen:
        if chosen not in lib.supported_isas():
            raise InputError(
                f"OWL_SPARSE_CPU_ISA={chosen}: this CPU runs {list(lib.supported_isas())}"
            )
        lib.set_isa(chosen)
    for fmt in _FORMATS:
        forced = settings.get().forced_backend(fmt)
        lib.set_backend(fmt, BACKENDS.get(forced, "") if forced else "")
    lib.set_wide_panels(not _fast_gemm(torch.float16), not _fast_gemm(torch.bfloat16))
    push_table()


def _fast_gemm(dtype: torch.dtype) -> bool:
    """Whether torch multiplies ``dtype`` matrices with oneDNN on this CPU (else with a
    generic loop: bf16 16 GFLOP/s against fp32's 92 on a 2-core Zen 3, 4096 x 4096 x 256)."""
    test = {
        torch.float16: "_is_mkldnn_fp16_supported",
        torch.bfloat16: "_is_mkldnn_bf16_supported",
    }[dtype]
    check = getattr(torch.ops.mkldnn, test, None)
    if check is None or not torch.backends.mkldnn.is_available():
        return False
    return bool(check())


def wide_panels() -> dict[torch.dtype, bool]:
    """Per 16-bit dtype, whether the GEMM backend widens its panels to fp32 on this CPU."""
    if not available():
        raise RuntimeError(f"owl-sparse CPU kernels unavailable: {_state['error']}")
    f16, bf16 = torch.ops.owl_sparse_cpu.wide_panels()
    return {torch.float16: bool(f16), torch.bfloat16: bool(bf16)}


@contextlib.contextmanager
def use_wide_panels(on: bool):
    """Widen (or not) 16-bit panels of the GEMM backend inside the block (tests, benchmarks)."""
    before = wide_panels()
    torch.ops.owl_sparse_cpu.set_wide_panels(on, on)
    try:
        yield
    finally:
        torch.ops.owl_sparse_cpu.set_wide_panels(before[torch.float16], before[torch.bfloat16])


def isa() -> str:
    """The instruction set the CPU kernels use ("avx512_bf16", "avx512", "avx2", "portable")."""
    if not available():
        raise RuntimeError(f"owl-sparse CPU kernels unavailable: {_state['error']}")
    return str(torch.ops.owl_sparse_cpu.isa())


def supported_isas() -> list[str]:
    """Every instruction set this CPU can run the kernels with (tests force each)."""
    return list(torch.ops.owl_sparse_cpu.supported_isas()) if available() else []


def device_key() -> str:
    """The dispatch tables' device name for this CPU: ``cpu:<isa>``."""
    return f"cpu:{isa()}"


@contextlib.contextmanager
def use_isa(name: str):
    """Run the kernels with instruction set ``name`` inside the block (tests, benchmarks)."""
    if not available():
        raise RuntimeError(f"owl-sparse CPU kernels unavailable: {_state['error']}")
    if name not in ISAS:
        raise InputError(f"unknown instruction set {name!r}; expected one of {ISAS}")
    before = isa()
    torch.ops.owl_sparse_cpu.set_isa(name)
    push_table()
    try:
        yield
    finally:
        torch.ops.owl_sparse_cpu.set_isa(before)
        push_table()


def force(fmt: str, backend: str | None) -> None:
    """Make the CPU kernels run ``fmt`` through ``backend`` (None: the table decides again).

    Packed formats ("bitmap", "2:4"): "cpu_sparse" or "dense" (used by
    :func:`owl_sparse.ops.dispatch.force_backend`); "dense" (``owl_sparse::dense_linear``):
    "cpu_kernel" or "torch" (see :func:`force_dense`).
    """
    names = _backends_of(fmt)
    if backend is not None and backend not in names:
        raise InputError(f"no CPU backend {backend!r} for {fmt}; expected one of {sorted(names)}")
    if available():
        torch.ops.owl_sparse_cpu.set_backend(fmt, names[backend] if backend else "")


@contextlib.contextmanager
def force_dense(backend: str):
    """Inside the block, CPU ``owl_sparse::dense_linear`` calls take ``backend``
    ("cpu_kernel": the streaming kernel; "torch": torch's GEMM); benchmarks and tests."""
    force("dense", backend)
    try:
        yield
    finally:
        force("dense", None)


def choose(fmt: str, dtype: torch.dtype, n: int, k: int, tokens: int, sparsity: float):
    """(backend, reason) the CPU kernels take for this call, or ("reference", why) when the
    compiled kernels are unavailable. ``fmt`` "dense": an ``owl_sparse::dense_linear`` call
    (sparsity 0), backend "cpu_kernel" or "torch"."""
    if not available():
        return "reference", f"compiled CPU kernels unavailable ({_state['error']})"
    name, why = torch.ops.owl_sparse_cpu.choose(
        fmt, str(dtype).removeprefix("torch."), int(n), int(k), int(tokens), float(sparsity)
    )
    backend = {v: k for k, v in _backends_of(fmt).items()}[name]
    return backend, why


def backend_calls() -> dict[tuple[str, str], int]:
    """How many CPU kernel calls each (format, backend) ran since the library loaded, e.g.
    ``{("bitmap", "cpu_sparse"): 420, ("bitmap", "dense"): 2, ...}`` (formats "bitmap",
    "2:4", "dense"; backend names as :func:`choose` gives them); empty when the compiled
    kernels are unavailable."""
    if not available():
        return {}
    counts = list(torch.ops.owl_sparse_cpu.backend_calls())
    out = {}
    for i, fmt in enumerate((*_FORMATS, "dense")):
        names = {v: k for k, v in _backends_of(fmt).items()}
        out[(fmt, names["kernel"])] = counts[2 * i]
        out[(fmt, names["gemm"])] = counts[2 * i + 1]
    return out


def push_table() -> None:
    """Load the measured entries of this CPU's instruction set into the library."""
    entries = table_entries(device_key())
    cols = {c: [] for c in ("fmt", "dtype", "n", "k", "tokens", "sparsity", "backend")}
    for e in entries:
        names = _backends_of(e["fmt"])
        if e["backend"] not in names:
            continue
        for c, v in (
            ("fmt", e["fmt"]),
            ("dtype", e["dtype"]),
            ("n", e["N"]),
            ("k", e["K"]),
            ("tokens", e["tokens"]),
            ("sparsity", e["sparsity"]),
            ("backend", names[e["backend"]]),
        ):
            cols[c].append(v)
    torch.ops.owl_sparse_cpu.set_table(*cols.values())


def dense_weight(packed) -> torch.Tensor:
    """A freshly unpacked dense [N, K] copy of a CPU packed weight (not cached)."""
    if available() and packed.device.type == "cpu":
        if packed.fmt == "bitmap":
            return torch.ops.owl_sparse_cpu.unpack_bitmap(
                packed.bitmap, packed.values, packed.tile_offsets, packed.N, packed.K
            )
        return torch.ops.owl_sparse_cpu.unpack_sparse24(packed.values, packed.meta)
    return packed.to_dense()
