"""Shared benchmark machinery: timing, byte and FLOP arithmetic, environment stamps, writers.

Timing rules (the same for every contender, so no one is flattered):

- warm-up calls run first (Triton compiles and autotunes, cuBLAS creates handles);
- on CUDA the calls are captured in a CUDA graph and the graph is replayed: a decode-sized
  kernel runs for microseconds, less than Python needs to launch it, so timing eager calls
  would measure the launcher.  The graph runs ``calls`` back-to-back calls that rotate
  over several input sets (weights included) whose total size is a few times the L2
  cache, so a call never finds its operands in L2 from the call before;
- each replay is timed with CUDA events and the median per-call time is reported;
- on the CPU (reduced mode for the test suite) the median wall time of a few calls.

A measurement that fails to capture falls back to events around eager calls and says so.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

# LLaMA-2-7B's shape (LlamaConfig keyword arguments); other fields keep their defaults.
LLAMA2_7B_SHAPE = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)


def random_llama(config, dtype: torch.dtype | None = None, device=None, seed: int = 0):
    """A LLaMA causal LM with random weights, in eval mode.

    ``config``: a ``LlamaConfig`` or its keyword arguments (e.g. :data:`LLAMA2_7B_SHAPE`).
    ``dtype``: of the parameters (the config's default when None).  ``device``: where the
    weights are created (the current default device when None).  ``torch.manual_seed(seed)``
    runs first, so the weights are reproducible.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    if isinstance(config, dict):
        config = LlamaConfig(**config)
    kwargs = {} if dtype is None else {"dtype": dtype}
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


@dataclass
class Timing:
    """Median seconds per call and how it was measured."""

    seconds: float
    spread: float  # (p80 - p20) / median over the timed repetitions
    calls: int  # calls per repetition
    reps: int
    method: str  # "cuda-graph", "cuda-events" or "cpu-wall"
    rotation: int  # distinct input sets cycled through

    def to_dict(self) -> dict:
        return asdict(self)


def l2_bytes(device: torch.device) -> int:
    """L2 cache size of a CUDA device (50 MB assumed when the property is missing)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def rotation_count(
    bytes_per_set: int, device: torch.device, factor: float = 3.0, cap: int = 16
) -> int:
    """How many input sets to cycle so that their total is ``factor`` x the L2 size."""
    if torch.device(device).type != "cuda" or bytes_per_set <= 0:
        return 1
    return max(1, min(cap, math.ceil(factor * l2_bytes(device) / bytes_per_set)))


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=5) if len(values) >= 2 else [values[0]] * 4
    med = statistics.median(values)
    return med, (q[3] - q[0]) / med if med > 0 else 0.0


def time_calls(
    fns: Sequence[Callable[[], object]],
    device,
    target_s: float = 0.25,
    min_reps: int = 5,
    max_reps: int = 50,
    use_graph: bool = True,
) -> Timing:
    """Time a rotation of equivalent calls (one per input set); see the module doc.

    Args:
        fns: zero-argument callables doing the same work on different input sets.
        device: where they run.
        target_s: rough total time to spend timing (after warm-up).
        use_graph: capture in a CUDA graph (CUDA only).

    Returns:
        `Timing` of one call.
    """
    device = torch.device(device)
    for fn in fns:  # warm-up: compile, autotune, allocate
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        fns[0]()
        once = max(time.perf_counter() - t0, 1e-7)
        reps = int(min(max_reps, max(min_reps, target_s / once)))
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            times.append(time.perf_counter() - t0)
        med, spread = _quantiles(times)
        return Timing(med, spread, 1, reps, "cpu-wall", len(fns))
    torch.cuda.synchronize(device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for fn in fns:
        fn()
    stop.record()
    stop.synchronize()
    once = max(start.elapsed_time(stop) / 1e3 / len(fns), 1e-7)
    # enough calls per replay to amortise the replay launch (~10 us), a whole rotation
    calls = len(fns) * max(1, math.ceil(min(64, 2e-3 / once) / len(fns)))
    reps = int(min(max_reps, max(min_reps, target_s / (once * calls))))
    if use_graph:
        try:
            return _time_graph(fns, device, calls, reps)
        except Exception:  # noqa: BLE001 - a contender that cannot be captured is timed eagerly
            torch.cuda.synchronize(device)
    return _time_events(fns, device, reps * calls)


def _time_graph(fns, device, calls: int, reps: int) -> Timing:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # a side-stream warm-up, as capture requires
        for fn in fns:
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        z.record()
        z.synchronize()
        times.append(a.elapsed_time(z) / 1e3 / calls)
    del graph
    med, spread = _quantiles(times)
    return Timing(med, spread, calls, reps, "cuda-graph", len(fns))


def _time_events(fns, device, n: int) -> Timing:
    times = []
    for i in range(n):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fns[i % len(fns)]()
        z.record()
        z.synchronize()
        times.append(a.elapsed_time(z) / 1e3)
    med, spread = _quantiles(times)
    return Timing(med, spread, 1, n, "cuda-events", len(fns))


# ------------------------------------------------------------------ arithmetic
def byte_ceiling(dense_bytes: float, format_bytes: float) -> float:
    """Highest speed-up a memory-bound kernel can reach: bytes moved by dense / by the format."""
    return dense_bytes / format_bytes if format_bytes > 0 else float("nan")


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def bitmap_bytes_per_weight(sparsity: float, elem: int = 2) -> float:
    """The bitmap format's size per weight (layout of formats/bitmap.py): 1 bit + kept values."""
    return 1 / 8 + elem * (1 - sparsity)


# ------------------------------------------------------------------ environment
def git_commit() -> str:
    """HEAD commit (``+dirty`` when the tree has changes), $OWL_SPARSE_COMMIT, or unknown."""
    from owl_sparse import settings

    if settings.get().commit:
        return settings.get().commit
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=10,
        ).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llc_bytes() -> int:
    """The last-level cache size this machine reports: the largest of sysconf's L3 and the
    sysfs cache entries (VMs disagree with themselves; benchmarks size rotation from the
    largest, so no cache flatters a result)."""
    sizes = []
    try:  # glibc's view (what `getconf LEVEL3_CACHE_SIZE` prints)
        out = subprocess.run(
            ["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        sizes.append(int(out or 0))
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes + [32 * 2**20])


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"


def slug(text: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device) -> dict:
    """The stamp every result carries: device, commit, date and library versions."""
    import transformers

    device = torch.device(device)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cpu":
        from owl_sparse.ops import cpu

        env.update(
            cpu_model=cpu_model(),
            cpu_isa=cpu.isa() if cpu.available() else None,
            cpu_kernels=cpu.status(),
            threads=torch.get_num_threads(),
            llc_mb=round(llc_bytes() / 2**20, 1),
        )
    if device.type == "cuda":
        from owl_sparse.ops import cuda as cuda_ext

        cuda_ext.load()
        env["cuda_ext"] = cuda_ext.status()
        props = torch.cuda.get_device_properties(device)
        env.update(
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            l2_mb=round(l2_bytes(device) / 2**20, 1),
            cuda=torch.version.cuda,
        )
    return env


def csv_of(kind):
    """argparse type: "a,b,c" -> [kind("a"), kind("b"), kind("c")] (empty items dropped)."""
    return lambda s: [kind(v) for v in s.split(",") if v]


# ------------------------------------------------------------------ writers
def write_json(path: str | os.PathLike, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats get 3 significant digits, None and NaN print '-'."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def env_markdown(env: dict) -> str:
    keys = ["device", "commit", "date", "torch", "triton", "transformers", "cuda"]
    return "\n".join(f"- {k}: {env[k]}" for k in keys if env.get(k) is not None)


class Deadline:
    """A time budget: benchmarks stop starting new work once it is spent (and say so)."""

    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def sync(device) -> None:
    """Wait for a CUDA device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_reset(device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on a Linux CPU the process's peak
    resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then counts from the process start
        pass


def peak_memory_bytes(device) -> int | None:
    """Peak bytes since the last `peak_memory_reset`: allocated on a CUDA device, or the
    process's peak resident set on the CPU (None where /proc is absent)."""
    if torch.device(device).type != "cuda":
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
