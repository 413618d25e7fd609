"""What to prune and how much: `PruneConfig`, the N:M pattern parser and the error types.

A config says *what* (method, sparsity, allocation, pattern); *how* it runs (device,
batch size, progress bars) is given to `owl_sparse.prune.prune` as keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import InputError

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity")
DEFAULT_SPARSITY = 0.7


class PruneError(RuntimeError):
    """Pruning failed part-way (numerics, a block's forward); the message says which blocks
    were already pruned in place."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` (keep N of every M consecutive inputs) -> (N, M).

    Raises:
        InputError: malformed text, M < 2, N < 1 or N >= M.
    """
    text = str(pattern).strip().lower()
    if text == "unstructured":
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}")
    n, m = (int(p) for p in parts)
    if m < 2:
        raise InputError(f"pattern {pattern!r}: M must be >= 2")
    if n < 1 or n >= m:
        raise InputError(
            f"pattern {pattern!r}: N (weights kept per group) must satisfy 1 <= N < M={m}"
        )
    return n, m


@dataclass
class PruneConfig:
    """Pruning settings.

    Attributes:
        method: scorer, ``"magnitude"`` |W|, ``"wanda"`` |W|*||X_j|| or ``"sparsegpt"``
            (OBS reconstruction with the calibration Hessian).
        sparsity: target fraction of pruned weights over all linear layers of the decoder
            blocks, in [0, 1). Default 0.7 for unstructured; with an N:M pattern it defaults
            to (and must equal) 1 - N/M.
        allocation: ``"uniform"`` (every layer at `sparsity`), ``"owl"`` (per-block
            sparsity from outlier ratios, Yin et al. 2023) or ``"sensitivity"`` (per-block
            sparsity from second-order error curves, after Shao et al. 2023; derivation in
            `owl_sparse.prune.allocate`).
        owl_m: OWL's outlier threshold: a score is an outlier above ``owl_m`` x the block mean.
        owl_lambda: OWL: block sparsities span ``target +- owl_lambda`` (spread 2*lambda);
            sensitivity: no block deviates from the target by more than ``owl_lambda``.
        pattern: ``"unstructured"`` (row-wise: each output row loses round(s*K) weights)
            or ``"N:M"`` (keep N of every M consecutive input weights of a row). OWL and
            sensitivity with N:M keep M and vary N per block / layer.
        seed: recorded for reproducibility (calibration sampling uses it in the CLI; the
            pruning itself is deterministic).
    """

    method: str = "wanda"
    sparsity: float | None = None
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    pattern: str = "unstructured"
    seed: int = 0

    def __post_init__(self):
        self.method = str(self.method).lower()
        self.allocation = str(self.allocation).lower()
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        nm = parse_pattern(self.pattern)
        self.pattern = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
        if self.sparsity is None:
            self.sparsity = DEFAULT_SPARSITY if nm is None else 1.0 - nm[0] / nm[1]
        try:
            self.sparsity = float(self.sparsity)
        except (TypeError, ValueError) as e:
            raise InputError(f"sparsity must be a number, got {self.sparsity!r}") from e
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise InputError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if nm is not None and abs(self.sparsity - (1.0 - nm[0] / nm[1])) > 1e-9:
            raise InputError(
                f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                f"(which prunes {1 - nm[0] / nm[1]:.4g}); leave sparsity unset with N:M"
            )
        if not (isinstance(self.owl_m, (int, float)) and self.owl_m > 0):
            raise InputError(f"owl_m must be a positive number, got {self.owl_m!r}")
        if not (isinstance(self.owl_lambda, (int, float)) and 0 <= self.owl_lambda < 0.5):
            raise InputError(f"owl_lambda must be in [0, 0.5), got {self.owl_lambda!r}")

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None when unstructured."""
        return parse_pattern(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        """False only for uniform magnitude pruning, which looks at weights alone."""
        return not (self.method == "magnitude" and self.allocation == "uniform")

    def to_dict(self) -> dict:
        return asdict(self)
