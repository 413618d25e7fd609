"""Allocation: how sparse each decoder block or linear layer gets, under one global target.

**uniform** — every linear layer at the target.

**OWL** (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity"; luuyin/OWL). On the dense
model, for each block b the Wanda scores |W_ij| * ||X_j|| of all its linear layers are pooled
and the outlier ratio L_b is the fraction larger than ``M`` x their mean. Then
``D_b = (L_b - min L) / (max L - min L) * 2 * lambda``, ``D_b <- D_b - mean(D) + (1 - S)``,
``s_b = 1 - D_b``. The mean of s_b is S, the spread is 2 * lambda, more outliers -> less
sparsity. All linear layers of a block share s_b. The reference code replaces s_b <= 0 by
0.01 and caps s_b at 0.99, which moves the mean off S without a word; here a block outside
(0, 0.99] is an InputError instead (`PruneConfig` refuses ``S - lambda <= 0`` and
``S + lambda > 0.99`` up front; `owl_sparsities` refuses the rest, which depends on how
skewed the outlier ratios are), so the mean is always S. With N:M, M stays and N varies
per block: each block wants p_b = s_b * M pruned weights per group; p_b is rounded to
integers by the largest-remainder method (floors first, then +1 for the largest fractional
parts while that brings the parameter-weighted total closer to (M - N) per group), i.e.
each block gets the nearest N such that the mean sparsity equals the target as closely as
integers allow.

**sensitivity** — after Shao et al., 2023 (arXiv 2310.09499, "One-shot sensitivity-aware
mixed sparsity pruning"), whose idea is: layers whose pruning hurts the loss more, as
measured by second-order (Hessian) information, get lower sparsity, under the global budget.
No code or closed formula of theirs was available, so the rule here is derived:

1. Second-order loss change of pruning a linear layer (weights W, inputs x_t at tokens t):
   with the Kronecker-factored (K-FAC) Hessian ``H ~ sum_t (x_t x_t^T) (x) G_t``, removing
   weights dW costs ``dL ~ 1/2 sum_t sum_ij dW_ij^2 x_tj^2 G_t,ii`` in the diagonal
   approximation (the paper likewise reduces the Hessian to its trace / diagonal).
2. The output factor G would need backward passes; we model it instead. Every linear
   layer of block b perturbs the residual stream h_t (o_proj / down_proj add to it
   directly, the others through the block), and the next RMSNorm / LayerNorm divides h_t
   by its RMS, so the model sees a perturbation *relative* to the residual stream at that
   token: ``G_t = g / mean_j(h_tj^2) I``, h_t the block's input, g the same for all layers.
   Then ``dL ~ g/2 sum_ij dW_ij^2 c_j`` with ``c_j = sum_t x_tj^2 / mean(h_t^2)``
   (`StatsAccumulator` ``wcolsq``), measured on the dense model in the first calibration
   pass, together with OWL's statistics. Tokens with massive activations (huge h_t) weigh
   little, and early blocks, whose residual stream is still small, weigh a lot.
3. Pruning k weights per row (in the order of their cost ``w_ij^2 c_j``) costs
   ``e_l(k)`` = the sum over rows of the k smallest ``w_ij^2 c_j`` (N:M: the k smallest of
   each group of M); e_l is convex in k.
4. Granularity is the decoder block, as for OWL (whose authors found per-block better than
   per-layer): all linear layers of block b share a sparsity s_b and the block's curve is
   ``E_b(s) = sum_l e_l(round(s * K_l))``.
5. Minimise ``sum_b E_b(s_b)`` subject to ``sum_b n_b s_b = S sum_b n_b`` (the
   parameter-weighted mean sparsity is the target) and ``|s_b - S| <= lambda``, on a grid
   of 1/1000 (N:M: s_b = p/M for integer p, so M stays and N varies per block). The
   Lagrangian makes every block stop where its marginal error per pruned weight reaches a
   common multiplier; with convex curves a greedy walk over all marginal steps in
   increasing order, each block's steps taken as a prefix, solves it; the last step is
   chosen to land as close to the budget as the step sizes allow. Layers then round
   s_b * K to whole weights per row.

Alternatives tried on SmolLM2-135M (Wanda, 70%, WikiText-2 perplexity; uniform 1134, OWL
759, this rule 459): G_l = 1 / (layer output energy) with per-layer allocation, 1509 (it
moved sparsity from v_proj / o_proj to the MLP); G = constant (plain ``||WX - W'X||^2``)
per block, 5049 (it pruned the first blocks hardest). Error curves use the Hessian
diagonal for every scorer (SparseGPT's own compensation is not modelled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .config import OWL_MAX_SPARSITY
from .masks import Target, pruned_per_row
from .scores import wanda_scores


def outlier_ratio(scores, m: float) -> float:
    """Fraction of the pooled scores larger than ``m`` x their mean (OWL's L_b).

    Args:
        scores: score tensors (any shapes) of one block's linear layers, or a zero-argument
            callable returning an iterable of them (called twice: sums, then counts), so
            that a whole block's scores need not be held at once.
        m: the outlier multiple (OWL's M).
    """
    return outlier_ratios(scores, m)[0]


def outlier_ratios(scores, m: float) -> tuple[float, list[float]]:
    """`outlier_ratio` of the pool, and of each tensor against its own mean."""
    make = scores if callable(scores) else (lambda: scores)
    sums = [(s.sum(dtype=torch.float64).item(), s.numel()) for s in make()]
    count = sum(n for _, n in sums)
    if count == 0:
        raise ValueError("outlier_ratio needs at least one score")
    pooled_threshold = m * sum(t for t, _ in sums) / count
    above, own = 0, []
    for s, (total, n) in zip(make(), sums):
        above += (s > pooled_threshold).sum().item()
        own.append((s > m * total / max(n, 1)).sum().item() / max(n, 1))
    return above / count, own


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL's per-block sparsities from outlier ratios (formula in the module doc).

    Returns one sparsity per block, in (0, 0.99], with mean ``target``.

    Raises:
        InputError: a block would fall outside (0, 0.99], where the reference code clips it
            and so misses the target; the message gives the largest ``lam`` that fits.
    """
    L = np.asarray(ratios, dtype=np.float64)
    if L.ndim != 1 or L.size == 0:
        raise ValueError(f"need a non-empty list of outlier ratios, got shape {L.shape}")
    spread = L.max() - L.min()
    D = (L - L.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(L)
    D = D - D.mean() + (1.0 - target)
    s = 1.0 - D
    # 1e-9: sums such as 0.91 + 0.08 land a hair above 0.99; that is rounding, not clipping
    bad = np.flatnonzero((s <= 0) | (s > OWL_MAX_SPARSITY + 1e-9))
    if bad.size:
        b = int(bad[0])
        raise InputError(
            f"OWL allocation cannot meet sparsity {target:g} with owl_lambda {lam:g}: block {b} "
            f"would get sparsity {s[b]:.4g} ({bad.size} of {L.size} blocks outside "
            f"(0, {OWL_MAX_SPARSITY}], and clipping them would miss the target)"
            + _lambda_hint(L, target)
        )
    return np.minimum(s, OWL_MAX_SPARSITY).tolist()


def _lambda_hint(L: np.ndarray, target: float) -> str:
    """The largest owl_lambda (to 4 decimals) that keeps every block in (0, 0.99]."""
    spread = L.max() - L.min()
    u = (L - L.min()) / spread * 2 if spread > 0 else np.zeros_like(L)
    u = u.mean() - u  # s_b = target + lambda * u_b
    fits = [target / -x for x in u if x < 0] + [(OWL_MAX_SPARSITY - target) / x for x in u if x > 0]
    if not fits or min(fits) <= 0:
        return f"; the target must lie in (0, {OWL_MAX_SPARSITY}]"
    best = math.floor(min(fits) * 1e4) / 1e4
    if best >= min(fits):  # on the bound itself: s_b = 0 is not allowed
        best -= 1e-4
    return f"; with these outlier ratios owl_lambda <= {best:.4f} would fit"


def nm_levels(sparsities: Sequence[float], sizes: Sequence[int], n: int, m: int) -> list[int]:
    """Per-block N (kept per group of m) nearest to ``sparsities`` with the size-weighted
    mean pruned-per-group as close to ``m - n`` as integers allow (largest remainder).

    Returns a list of N_b with 1 <= N_b <= m.
    """
    want = np.asarray(sparsities, dtype=np.float64) * m
    w = np.asarray(sizes, dtype=np.float64)
    p = np.clip(np.floor(want), 0, m - 1)
    deficit = (m - n) * w.sum() - (w * p).sum()
    for b in np.argsort(-(want - p), kind="stable"):
        if p[b] < m - 1 and abs(deficit - w[b]) < abs(deficit):
            p[b] += 1
            deficit -= w[b]
    return [int(m - x) for x in p]


@dataclass
class ErrorCurve:
    """Pruning error of one allocation unit (a block) at levels ``lo..hi``.

    The sparsity at level k is ``k / width``; ``unit * width`` is the unit's weight in the
    budget (its parameter count, or a fixed multiple of it shared by all units).
    """

    unit: int
    width: int
    lo: int
    hi: int
    cost: np.ndarray  # float64 [hi - lo + 1]: E(lo), ..., E(hi)

    def target(self, level: int, nm: tuple[int, int] | None) -> Target:
        if nm is None:
            return Target(level / self.width, None)
        return Target(level / self.width, (self.width - level, self.width))


def level_bounds(target: float, lam: float, width: int) -> tuple[int, int]:
    """Levels allowed for ``target +- lam``, rounded to the nearest level, within [0, width-1]."""
    r = lambda x: int(math.floor(x * width + 0.5 + 1e-9))  # noqa: E731
    return max(0, min(r(target - lam), width - 1)), max(0, min(r(target + lam), width - 1))


@torch.no_grad()
def layer_error(
    weight: torch.Tensor, colsq: torch.Tensor, nm: tuple[int, int] | None
) -> np.ndarray:
    """``e(k)`` for k = 0..width (module doc, step 3): float64 numpy [width + 1].

    Args:
        weight: [out, in]; colsq: [in] sum over tokens of x_j^2 (same device);
        nm: None (width = in, k = weights pruned per row) or (n, m) (width = m, k = pruned
            per group).
    """
    rows, cols = weight.shape
    energy = weight.detach().float().square() * colsq.to(torch.float32).unsqueeze(0)
    width = cols if nm is None else nm[1]
    groups = energy if nm is None else energy.reshape(rows * cols // width, width)
    per_level = torch.sort(groups, dim=1).values.sum(dim=0, dtype=torch.float64).cpu().numpy()
    return np.concatenate([[0.0], np.cumsum(per_level)])


def block_curve(
    layers: Sequence[tuple[np.ndarray, tuple[int, int]]],
    target: float,
    lam: float,
    nm: tuple[int, int] | None,
    grid: int = 1000,
) -> ErrorCurve:
    """A block's curve E_b from its layers' ``(layer_error, weight shape)`` (step 4)."""
    params = sum(r * c for _, (r, c) in layers)
    if nm is not None:
        lo, hi = level_bounds(target, lam, nm[1])
        cost = [sum(e[p] for e, _ in layers) for p in range(lo, hi + 1)]
        return ErrorCurve(params // nm[1], nm[1], lo, hi, np.asarray(cost))
    lo, hi = level_bounds(target, lam, grid)
    cost = [sum(e[pruned_per_row(g / grid, c)] for e, (_, c) in layers) for g in range(lo, hi + 1)]
    return ErrorCurve(params, grid, lo, hi, np.asarray(cost))


def sensitivity_levels(curves: Sequence[ErrorCurve], target: float) -> list[int]:
    """Levels minimising the summed error with ``sum(unit * level)`` at the budget
    ``round(target * sum(unit * width))`` (module doc, step 5)."""
    params = sum(c.unit * c.width for c in curves)
    budget = int(math.floor(target * params + 0.5))
    levels = [c.lo for c in curves]
    pruned = sum(c.unit * c.lo for c in curves)
    steps = [
        ((c.cost[k + 1] - c.cost[k]) / c.unit, i, k)
        for i, c in enumerate(curves)
        for k in range(c.hi - c.lo)
    ]
    steps.sort()
    blocked: set[int] = set()
    for _, i, _k in steps:
        if i in blocked:
            continue
        if pruned + curves[i].unit <= budget:
            levels[i] += 1
            pruned += curves[i].unit
        else:
            blocked.add(i)  # later steps of this layer would skip this one: not a prefix
    # One more step may land closer to the budget than stopping short of it.
    best = None
    for i, c in enumerate(curves):
        if levels[i] < c.hi and abs(budget - pruned - c.unit) < abs(budget - pruned):
            gain = abs(budget - pruned) - abs(budget - pruned - c.unit)
            if best is None or gain > best[0]:
                best = (gain, i)
    if best is not None:
        levels[best[1]] += 1
    return levels


def summarize_block(linears: dict, colsq: dict, wcolsq: dict, config) -> dict:
    """What allocation needs from one dense block: its outlier ratio (``"ratio"``), each
    layer's own outlier ratio (``"layers"``) and, for sensitivity, the block's
    `ErrorCurve` (``"curve"``).

    Args:
        linears: {name: nn.Linear} of the block; colsq: {name: [in] squared input norms};
            wcolsq: the same weighted per token by the inverse block-input energy.
        config: the `PruneConfig` (owl_m, sparsity, owl_lambda, pattern).

    Wanda scores are recomputed rather than held: a 7B block's would take 800 MB.
    """
    ratio, own = outlier_ratios(
        lambda: (wanda_scores(lin.weight, colsq[n]) for n, lin in linears.items()), config.owl_m
    )
    layers = dict(zip(linears, own))
    curve = None
    if config.allocation == "sensitivity":
        errors = [
            (layer_error(lin.weight, wcolsq[name], config.nm), tuple(lin.weight.shape))
            for name, lin in linears.items()
        ]
        curve = block_curve(errors, config.sparsity, config.owl_lambda, config.nm)
    return {"ratio": ratio, "layers": layers, "curve": curve}
