"""What to prune and how much: `PruneConfig`, the N:M pattern parser and the error types.

A config says *what* (method, sparsity, allocation, pattern); *how* it runs (device,
batch size, progress bars) is given to `owl_sparse.prune` as keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..args import as_int, is_real
from ..errors import InputError

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity", "tuned")
DEFAULT_SPARSITY = 0.7
# OWL caps a block's sparsity here (the reference code's cap); a block below 0 cannot be pruned
# either. The reference code clips such blocks (to 0.99 / 0.01), which moves the mean off the
# target; owl_sparse refuses them instead (`_check_owl_span`, `allocate.owl_sparsities`).
OWL_MAX_SPARSITY = 0.99


class PruneError(RuntimeError):
    """Pruning failed part-way (numerics, a block's forward); the message says which blocks
    were already pruned in place."""


def _check_owl_span(sparsity: float, lam: float) -> None:
    """InputError unless OWL's block sparsities around ``sparsity`` fit in (0, 0.99].

    The blocks spread over 2 * lambda with their mean at the target (two blocks, or
    symmetric outlier ratios, give exactly ``sparsity +- lambda``), so ``sparsity - lambda``
    must stay above 0 and ``sparsity + lambda`` at most `OWL_MAX_SPARSITY`. Skewed ratios can
    push one block further (up to 2 * lambda); `allocate.owl_sparsities` refuses those.
    """
    if not 0 < sparsity <= OWL_MAX_SPARSITY + 1e-9:
        raise InputError(
            f"allocation 'owl' needs sparsity in (0, {OWL_MAX_SPARSITY}], got {sparsity:g} "
            f"(with owl_lambda {lam:g}): its block sparsities would leave that range, be "
            "clipped and miss the target; use allocation 'uniform'"
        )
    problems = []
    if sparsity - lam <= 0:
        problems.append(f"below {sparsity:g} (so that sparsity - owl_lambda > 0)")
    if sparsity + lam > OWL_MAX_SPARSITY + 1e-9:
        bound = max(OWL_MAX_SPARSITY - sparsity, 0.0)
        problems.append(
            f"at most {bound:.4g} (so that sparsity + owl_lambda <= {OWL_MAX_SPARSITY})"
        )
    if problems:
        raise InputError(
            f"owl_lambda {lam:g} cannot be honoured at sparsity {sparsity:g} with allocation "
            f"'owl': block sparsities spread around the target by about +- owl_lambda and "
            f"must stay in (0, {OWL_MAX_SPARSITY}]; owl_lambda must be "
            + " and ".join(problems)
            + " (or use allocation 'sensitivity', which bounds the blocks itself)"
        )


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
            `owl_sparse.pruning.allocate`) or ``"tuned"`` (uniform, OWL or sensitivity,
            whichever setting of a small grid gives the lowest loss on held-out
            calibration windows, uniform unless beaten, then pruned on all the windows;
            `owl_sparse.pruning.tune`; then `owl_m` and `owl_lambda` are ignored).
        owl_m: OWL's outlier threshold: a score is an outlier above ``owl_m`` x the block mean.
        owl_lambda: OWL: block sparsities spread over ``2 * owl_lambda`` with their mean at
            the target (``target +- owl_lambda`` for symmetric outlier ratios); they must
            stay in (0, 0.99], so OWL needs ``0 < sparsity - owl_lambda`` and
            ``sparsity + owl_lambda <= 0.99``. Sensitivity: no block deviates from the
            target by more than ``owl_lambda``.
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
        self.validate()

    def validate(self) -> PruneConfig:
        """Check every field and normalise it in place (lower-case names, canonical pattern,
        Python ``float`` / ``int`` numbers); returns ``self``.

        Runs on construction and again in `owl_sparse.prune`, so a field assigned
        after construction is checked too. Numbers may be any ``numbers.Real`` (numpy
        scalars included; ``sparsity`` also a numeric string), never a ``bool``.

        Raises:
            InputError: naming the field and its value.
        """
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
        if isinstance(self.sparsity, bool):
            raise InputError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
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
        if not (is_real(self.owl_m) and self.owl_m > 0):
            raise InputError(f"owl_m must be a positive number, got {self.owl_m!r}")
        self.owl_m = float(self.owl_m)
        if not (is_real(self.owl_lambda) and 0 <= self.owl_lambda < 0.5):
            raise InputError(f"owl_lambda must be a number in [0, 0.5), got {self.owl_lambda!r}")
        self.owl_lambda = float(self.owl_lambda)
        self.seed = as_int("seed", self.seed)
        if self.allocation == "owl":
            _check_owl_span(self.sparsity, self.owl_lambda)
        return self

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
