"""Every runtime setting of owl-sparse, read from the environment once and checked.

``settings.get()`` returns the frozen `Settings`; ``settings.reload()`` makes the next
``get()`` read the environment again (tests, or a program that changes ``os.environ`` on
purpose). A bad value is an InputError naming the variable. Build-time switches
(``OWL_SPARSE_SKIP_CUDA_BUILD``, ``OWL_SPARSE_CUDA_ARCHS``, ``OWL_SPARSE_NVCC_THREADS``) are
read by ``setup.py`` only. This is the one module of the package that reads ``os.environ``.

=============================  =======================================================
variable                       meaning
=============================  =======================================================
``OWL_SPARSE_DATA``            the shared data folder (WikiText-2, stories260K); default
                               ``../shared/data`` of the working directory or of the
                               source checkout, when one exists
``OWL_SPARSE_CACHE``           where converted models are cached (default
                               ``$XDG_CACHE_HOME/owl_sparse``, else ``~/.cache/owl_sparse``)
``OWL_SPARSE_BACKEND``         force backends: ``bitmap=dense,2:4=triton_gemv``
``OWL_SPARSE_DISABLE``         switch backends off: ``cuda_sp_wgmma,cuda_gemv``
``OWL_SPARSE_DISPATCH_TABLES`` extra measured dispatch tables (files or folders, separated
                               by ``os.pathsep``)
``OWL_SPARSE_DENSE_CACHE_MB``  cap of the dense-copy cache in MiB (default: no cap)
``OWL_SPARSE_NO_JIT``          1: never JIT-build the compiled kernels
``OWL_SPARSE_FORCE_JIT``       1: JIT-build even when a prebuilt extension exists
``OWL_SPARSE_JIT_VERBOSE``     1: show the JIT build's compiler output
``OWL_SPARSE_AUTOTUNE``        0: Triton kernels use their first config (no autotuning)
``OWL_SPARSE_CPU_ISA``         the CPU kernels' instruction set: portable, avx2, avx512 or
                               avx512_bf16 (default: the best this CPU runs)
``OWL_SPARSE_COMPILE_DECODE`` 0: decode steps on the CPU run eagerly (default: compiled with
                               ``torch.compile``)
``OWL_SPARSE_CPU_DENSE_KERNEL`` 0: serving on the CPU keeps torch's ``F.linear`` for dense
                               layers (default: owl-sparse's dense kernel, see
                               ``owl_sparse.nn.native``)
``OWL_SPARSE_CPU_GROUP_LAYERS`` 0: a compiled CPU decode step calls each packed layer on
                               its own (default: the bitmap layers reading the same
                               activations, q/k/v and gate/up, in one call, see
                               ``owl_sparse.serve.fusion``)
``OWL_SPARSE_MAX_TEXT_MB``     largest text file read for calibration or evaluation, in
                               MiB (default 1024; a larger file, or an endless device such
                               as ``/dev/zero``, is refused)
``OWL_SPARSE_BENCH_SIZE``      matrix size of the pytest-benchmark smoke file (2048)
``OWL_SPARSE_COMMIT``          commit recorded in benchmark results (default: git's)
``TRITON_INTERPRET``           Triton's own switch: 1 runs Triton kernels on the CPU
``CI``                         set by CI systems: the demo says its timings are indicative
=============================  =======================================================
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

FORMAT_NAMES = ("bitmap", "2:4")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """The runtime settings (see the module docstring for the variables)."""

    data_dir: Path | None
    cache_dir: Path
    forced_backends: tuple[tuple[str, str], ...]
    disabled_backends: frozenset[str]
    dispatch_tables: tuple[Path, ...]
    dense_cache_bytes: float | None
    no_jit: bool
    force_jit: bool
    jit_verbose: bool
    autotune: bool
    cpu_isa: str | None
    compile_decode: bool
    cpu_dense_kernel: bool
    cpu_group_layers: bool
    cpu_decode_eager_attention: bool
    max_text_bytes: int
    bench_size: int
    commit: str | None
    triton_interpret: bool
    ci: bool

    def forced_backend(self, fmt: str) -> str | None:
        """The backend ``OWL_SPARSE_BACKEND`` forces for format ``fmt``, if any."""
        return dict(self.forced_backends).get(fmt)


def _flag(env, name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InputError(f"{name}={raw!r}: expected 1 or 0 (or true / false)")


def _data_dir(env) -> Path | None:
    candidates = [Path(env["OWL_SPARSE_DATA"]).expanduser()] if env.get("OWL_SPARSE_DATA") else []
    for base in (Path.cwd().parent, Path(__file__).resolve().parent.parent.parent):
        candidates.append(base / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def _cache_dir(env) -> Path:
    if env.get("OWL_SPARSE_CACHE"):
        return Path(env["OWL_SPARSE_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "owl_sparse"


def _forced(env) -> tuple[tuple[str, str], ...]:
    out = {}
    for part in filter(None, (p.strip() for p in env.get("OWL_SPARSE_BACKEND", "").split(","))):
        fmt, sep, name = part.partition("=")
        if not sep or fmt.strip() not in FORMAT_NAMES or not name.strip():
            raise InputError(
                f"OWL_SPARSE_BACKEND entry {part!r} must look like 'bitmap=dense' or '2:4=triton_gemv'"
            )
        out[fmt.strip()] = name.strip()
    return tuple(sorted(out.items()))


def _cache_cap(env) -> float | None:
    raw = env.get("OWL_SPARSE_DENSE_CACHE_MB", "").strip()
    if not raw:
        return None
    try:
        mb = float(raw)
    except ValueError:
        raise InputError(f"OWL_SPARSE_DENSE_CACHE_MB={raw!r}: expected a number of MiB") from None
    if mb != mb:
        raise InputError(f"OWL_SPARSE_DENSE_CACHE_MB={raw!r}: expected a number of MiB")
    return None if mb < 0 else mb * 2**20


CPU_ISAS = ("portable", "avx2", "avx512", "avx512_bf16")


def _cpu_isa(env) -> str | None:
    raw = env.get("OWL_SPARSE_CPU_ISA", "").strip().lower()
    if raw and raw not in CPU_ISAS:
        raise InputError(f"OWL_SPARSE_CPU_ISA={raw!r}: expected one of {', '.join(CPU_ISAS)}")
    return raw or None


def _positive_int(env, name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"{name}={raw!r}: expected a positive integer")
    return value


def read(env=None) -> Settings:
    """Settings from ``env`` (default ``os.environ``); InputError for a bad value."""
    env = os.environ if env is None else env
    tables = tuple(
        Path(p).expanduser()
        for p in env.get("OWL_SPARSE_DISPATCH_TABLES", "").split(os.pathsep)
        if p.strip()
    )
    disabled = frozenset(n.strip() for n in env.get("OWL_SPARSE_DISABLE", "").split(","))
    return Settings(
        data_dir=_data_dir(env),
        cache_dir=_cache_dir(env),
        forced_backends=_forced(env),
        disabled_backends=disabled - {"", "dense"},
        dispatch_tables=tables,
        dense_cache_bytes=_cache_cap(env),
        no_jit=_flag(env, "OWL_SPARSE_NO_JIT"),
        force_jit=_flag(env, "OWL_SPARSE_FORCE_JIT"),
        jit_verbose=_flag(env, "OWL_SPARSE_JIT_VERBOSE"),
        autotune=_flag(env, "OWL_SPARSE_AUTOTUNE", default=True),
        cpu_isa=_cpu_isa(env),
        compile_decode=_flag(env, "OWL_SPARSE_COMPILE_DECODE", default=True),
        cpu_dense_kernel=_flag(env, "OWL_SPARSE_CPU_DENSE_KERNEL", default=True),
        cpu_group_layers=_flag(env, "OWL_SPARSE_CPU_GROUP_LAYERS", default=True),
        cpu_decode_eager_attention=_flag(
            env, "OWL_SPARSE_CPU_DECODE_EAGER_ATTENTION", default=True
        ),
        max_text_bytes=_positive_int(env, "OWL_SPARSE_MAX_TEXT_MB", 1024) * 2**20,
        bench_size=_positive_int(env, "OWL_SPARSE_BENCH_SIZE", 2048),
        commit=env.get("OWL_SPARSE_COMMIT") or None,
        triton_interpret=_flag(env, "TRITON_INTERPRET"),
        ci=bool(env.get("CI")),
    )


@functools.lru_cache(maxsize=1)
def get() -> Settings:
    """The settings, read from the environment on first use."""
    return read()


def reload() -> None:
    """Forget the settings read so far: the next `get` reads the environment again (and
    raises there for a bad value)."""
    get.cache_clear()
