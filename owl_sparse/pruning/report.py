"""`PruneReport`: what pruning did, per decoder block and per linear layer, plus cost.

Peak memory is measured as:

- on CUDA: ``torch.cuda.max_memory_allocated`` over the run (reset at its start), kind
  ``"cuda_max_allocated"``;
- on CPU: the peak resident set size during the run minus the RSS at its start, from a
  thread sampling ``/proc/self/statm`` every 10 ms (kind ``"cpu_rss_peak_delta"``); where
  /proc is missing, the growth of ``resource.getrusage().ru_maxrss`` (a lifetime peak, so
  0 when an earlier peak was higher; kind ``"cpu_maxrss_growth"``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ..text_table import format_table
from .mask_store import MaskStore


@dataclass
class LayerRecord:
    """One pruned linear layer. ``name`` is the fully qualified module name."""

    name: str
    block: int
    shape: tuple[int, int]
    target: str  # "0.7000" or "5:8"
    target_sparsity: float
    achieved_sparsity: float
    outlier_ratio: float | None = None


@dataclass
class BlockRecord:
    """One decoder block: its OWL outlier ratio (dense pass; None without one) and the
    parameter-weighted target / achieved sparsity of its linear layers."""

    index: int
    outlier_ratio: float | None
    target_sparsity: float
    achieved_sparsity: float


@dataclass
class PruneReport:
    """Result of `owl_sparse.prune`.

    ``masks`` maps each pruned layer's fully qualified name to a CPU bool tensor
    ``[out, in]``, True where the weight is kept (a `MaskStore`, one bit per weight); it is
    not serialised by `to_dict`.
    ``allocation_search`` (allocation ``"tuned"`` only): the chosen setting, every trial's
    held-out loss and the settings skipped (`owl_sparse.pruning.tune.search`).
    """

    config: dict
    model: str
    device: str
    calibration: dict
    blocks: list[BlockRecord] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    wall_time_s: float = 0.0
    phase_time_s: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    masks: MaskStore = field(default_factory=MaskStore, repr=False)
    allocation_search: dict | None = None

    @property
    def achieved_sparsity(self) -> float:
        """Achieved sparsity over all pruned layers, weighted by parameter count."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        pruned = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return pruned / total if total else 0.0

    def add_layers(self, records: list[LayerRecord], summaries: list[dict] | None) -> None:
        """Append layer records and the per-block aggregates (parameter-weighted), with the
        dense pass's outlier ratios when there was one."""
        for i in sorted({r.block for r in records}):
            layers = [r for r in records if r.block == i]
            if summaries is not None:
                for r in layers:
                    r.outlier_ratio = summaries[i]["layers"][r.name.rsplit(f".{i}.", 1)[1]]
            size = sum(r.shape[0] * r.shape[1] for r in layers)
            target = sum(r.target_sparsity * r.shape[0] * r.shape[1] for r in layers) / size
            achieved = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in layers) / size
            ratio = None if summaries is None else summaries[i]["ratio"]
            self.blocks.append(BlockRecord(i, ratio, target, achieved))
            self.layers.extend(layers)

    def to_dict(self) -> dict:
        out = asdict(replace(self, masks=MaskStore()))  # never deep-copies the masks
        del out["masks"]
        out["achieved_sparsity"] = self.achieved_sparsity
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, per_layer: bool = False) -> str:
        """Per-block table (and per-layer rows when ``per_layer``)."""
        rows = [
            [
                b.index,
                "-" if b.outlier_ratio is None else f"{100 * b.outlier_ratio:.3f}%",
                f"{100 * b.target_sparsity:.2f}%",
                f"{100 * b.achieved_sparsity:.2f}%",
            ]
            for b in self.blocks
        ]
        text = format_table(
            ["block", "outliers", "target", "achieved"],
            rows,
            title=f"pruned {self.model}: {self.config.get('method')} / "
            f"{self.config.get('allocation')} / {self.config.get('pattern')}",
        )
        if per_layer:
            lrows = [
                [
                    r.name,
                    f"{r.shape[0]}x{r.shape[1]}",
                    r.target,
                    f"{100 * r.achieved_sparsity:.2f}%",
                ]
                for r in self.layers
            ]
            text += "\n\n" + format_table(["layer", "shape", "target", "achieved"], lrows)
        if self.allocation_search is not None:
            chosen = ", ".join(f"{k} {v}" for k, v in self.allocation_search["chosen"].items())
            final = self.allocation_search.get("final_pass_windows")
            again = f"; then pruned on all {final[0]} windows" if final else ""
            text += (
                f"\n\ntuned allocation: {chosen} ({len(self.allocation_search['trials'])} "
                "settings scored on held-out calibration windows; uniform unless beaten "
                f"beyond noise{again})"
            )
        mem = self.peak_memory_bytes / 2**20
        text += (
            f"\n\noverall sparsity {100 * self.achieved_sparsity:.2f}%, wall time "
            f"{self.wall_time_s:.2f} s, peak memory {mem:.1f} MiB ({self.peak_memory_kind})"
        )
        return text

    def __str__(self) -> str:
        return self.table()


class PeakMemory:
    """Context manager measuring peak memory on ``device`` (see the module doc).

    After the block: ``peak_bytes`` is the growth over the start (the ``kind``), and
    ``peak_total_bytes`` the whole peak (CUDA: allocated; CPU: the process's resident set;
    None where only the lifetime ``ru_maxrss`` is known).
    """

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.peak_total_bytes: int | None = None
        self.kind = ""
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif _rss() is not None:
            self.kind = "cpu_rss_peak_delta"
            self._start = self._peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            import resource

            self.kind = "cpu_maxrss_growth"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss() or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.peak_total_bytes = self.peak_bytes
        elif self.kind == "cpu_rss_peak_delta":
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss() or 0)
            self.peak_bytes = max(0, self._peak - self._start)
            self.peak_total_bytes = self._peak
        else:
            import resource

            now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak_bytes = max(0, now - self._start)
        return False


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
