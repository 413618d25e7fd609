"""Allocation: how sparse each decoder block or linear layer gets, under one global target.

**uniform** — every linear layer at the target.

**OWL** (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity"; luuyin/OWL). On the dense
model, for each block b the Wanda scores |W_ij| * ||X_j|| of all its linear layers are pooled
and the outlier ratio L_b is the fraction larger than ``M`` x their mean. Then
``D_b = (L_b - min L) / (max L - min L) * 2 * lambda``, ``D_b <- D_b - mean(D) + (1 - S)``,
``s_b = 1 - D_b`` (s_b <= 0 is set to 0.01, as the reference code does; s_b >= 1 to 0.99).
The mean of s_b is S, the spread is 2 * lambda, more outliers -> less sparsity. All linear
layers of a block share s_b. With N:M, M stays and N varies per block: each block wants
p_b = s_b * M pruned weights per group; p_b is rounded to integers by the largest-remainder
method (floors first, then +1 for the largest fractional parts while that brings the
parameter-weighted total closer to (M - N) per group), i.e. each block gets the nearest
N such that the mean sparsity equals the target as closely as integers allow.

**sensitivity** — after Shao et al., 2023 (arXiv 2310.09499, "One-shot sensitivity-aware
mixed sparsity pruning"), whose idea is: layers whose pruning hurts the loss more, as
measured by second-order (Hessian) information, get lower sparsity, under the global budget.
No code or closed formula of theirs was available, so the rule here is derived:

1. Second-order loss change of pruning a linear layer (weights W, inputs X): with the
   Kronecker-factored (K-FAC) Hessian ``H ~ (X^T X) (x) G``, removing weights dW costs
   ``dL ~ 1/2 sum_ij dW_ij^2 (X^T X)_jj G_ii`` in the diagonal approximation (the paper
   likewise reduces the Hessian to a trace / diagonal estimate).
2. ``(X^T X)_jj = ||X_j||^2`` is measured on the dense model in the first calibration pass
   (the same statistics as OWL's pass). G needs backward passes; we take ``G = g_l I`` with
   ``g_l = 1 / sum_ij W_ij^2 ||X_j||^2``: each layer's output is consumed at a normalised
   scale (RMSNorm/LayerNorm after the residual add, softmax of q.k, the gated product),
   so what matters is the error *relative* to the layer's output energy.
3. The row-wise mask removes, at k pruned weights per row, the k smallest
   ``w_ij^2 ||X_j||^2`` of each row, so the layer's relative error curve is
   ``e_l(k) = sum over rows of the k smallest w^2 ||X||^2, divided by the sum of all``
   (N:M: the k smallest of each group of M). e_l is convex and increasing in k.
4. Minimise ``sum_l e_l(k_l)`` subject to ``sum_l rows_l * k_l = round(S * sum_l n_l)``
   (the parameter-weighted mean sparsity is the target) and
   ``|k_l / K_l - S| <= lambda`` (rounded to the nearest level). The Lagrangian makes
   every layer stop where its marginal relative error per pruned weight reaches a common
   multiplier; with convex curves this is solved exactly by a greedy walk over all
   marginal steps in increasing order, each layer's steps taken as a prefix. The last
   step is chosen to leave the pruned count as close to the budget as the step sizes
   allow (within half a row of one layer).

The allocation is per linear layer (the paper allocates per layer or finer), so e.g.
q_proj and down_proj of one block may differ. Error curves use the Hessian diagonal for
every scorer (SparseGPT's own compensation is not modelled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .masks import Target

OWL_MIN_SPARSITY = 0.01  # the reference code's replacement for s_b <= 0
OWL_MAX_SPARSITY = 0.99


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
    """OWL's per-block sparsities from outlier ratios (formula in the module doc)."""
    L = np.asarray(ratios, dtype=np.float64)
    if L.ndim != 1 or L.size == 0:
        raise ValueError(f"need a non-empty list of outlier ratios, got shape {L.shape}")
    spread = L.max() - L.min()
    D = (L - L.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(L)
    D = D - D.mean() + (1.0 - target)
    s = 1.0 - D
    s = np.where(s <= 0, OWL_MIN_SPARSITY, s)
    s = np.minimum(s, OWL_MAX_SPARSITY)
    return s.tolist()


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
    """Relative pruning error of one layer at levels ``lo..hi``.

    A level is weights pruned per row (unstructured, ``width = K``) or per group of M
    (N:M, ``width = M``); one level step prunes ``unit`` weights of the layer.
    """

    unit: int
    width: int
    lo: int
    hi: int
    cost: np.ndarray  # float64 [hi - lo + 1]: e(lo), ..., e(hi)

    def target(self, level: int, nm: tuple[int, int] | None) -> Target:
        if nm is None:
            return Target(level / self.width, None)
        return Target(level / self.width, (self.width - level, self.width))


def level_bounds(target: float, lam: float, width: int) -> tuple[int, int]:
    """Levels allowed for ``target +- lam``, rounded to the nearest level, within [0, width-1]."""
    r = lambda x: int(math.floor(x * width + 0.5 + 1e-9))  # noqa: E731
    return max(0, min(r(target - lam), width - 1)), max(0, min(r(target + lam), width - 1))


@torch.no_grad()
def error_curve(
    weight: torch.Tensor, colsq: torch.Tensor, target: float, lam: float, nm: tuple[int, int] | None
) -> ErrorCurve:
    """The layer's relative error curve e(k) (module doc, step 3) within the bounds.

    Args:
        weight: [out, in]; colsq: [in] sum over tokens of x_j^2 (same device).
    """
    rows, cols = weight.shape
    energy = weight.detach().float().square() * colsq.to(torch.float32).unsqueeze(0)
    width = cols if nm is None else nm[1]
    groups = energy if nm is None else energy.reshape(rows * cols // width, width)
    per_level = torch.sort(groups, dim=1).values.sum(dim=0, dtype=torch.float64).cpu().numpy()
    cum = np.concatenate([[0.0], np.cumsum(per_level)])
    total = cum[-1]
    lo, hi = level_bounds(target, lam, width)
    rel = cum[lo : hi + 1] / total if total > 0 else np.zeros(hi - lo + 1)
    return ErrorCurve(unit=groups.shape[0], width=width, lo=lo, hi=hi, cost=rel)


def sensitivity_levels(curves: Sequence[ErrorCurve], target: float) -> list[int]:
    """Levels minimising the summed relative error with the pruned count at the budget
    ``round(target * sum of parameters)`` (module doc, step 4)."""
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
