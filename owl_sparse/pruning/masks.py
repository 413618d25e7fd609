"""Select which weights to keep from a score matrix: row-wise unstructured or N:M.

Conventions used across owl_sparse:

- scores and masks are ``[out, in]`` (nn.Linear layout: row i = output i, column j = input j);
- a mask is a ``torch.bool`` tensor, **True where the weight is kept**;
- low score = pruned first. Ties are broken deterministically: a stable ascending sort, so
  among equal scores the lower column index is pruned first.

Row-wise unstructured (Wanda's comparison group, also used for magnitude here): every row
loses exactly ``pruned_per_row(s, K) = floor(s*K + 1/2)`` weights, so the achieved sparsity of
a layer is exactly that count over K, whatever the scores are.
N:M: inside every group of M consecutive columns of a row, the M-N lowest are pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Target:
    """The sparsity one linear layer is pruned to.

    Attributes:
        sparsity: fraction pruned (for N:M it is 1 - n/m).
        nm: (n, m) = keep n of every m consecutive inputs, or None for row-wise unstructured.
    """

    sparsity: float
    nm: tuple[int, int] | None = None

    @staticmethod
    def of(sparsity: float, nm: tuple[int, int] | None) -> Target:
        return Target(1.0 - nm[0] / nm[1], nm) if nm else Target(float(sparsity), None)

    def describe(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:.4f}"


def pruned_per_row(sparsity: float, width: int) -> int:
    """Weights pruned in each row of width ``width`` at ``sparsity``: round half up of s*K.

    Never prunes a whole row (at most ``width - 1``) since sparsity < 1 is a promise that
    something survives. The 1e-9 absorbs float error such as 0.7 * 10 = 7.000000000000001.
    """
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity}")
    return min(int(math.floor(sparsity * width + 0.5 + 1e-9)), width - 1)


def select_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Row-wise unstructured mask.

    Args:
        scores: [out, in] float tensor (any float dtype), higher = more important.
        sparsity: fraction of each row to prune, in [0, 1).

    Returns:
        bool [out, in] on the scores' device; each row has exactly
        ``in - pruned_per_row(sparsity, in)`` True entries.
    """
    _check_scores(scores)
    k = pruned_per_row(sparsity, scores.shape[1])
    return prune_lowest(scores, k)


def prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that prunes the ``k`` lowest scores of every row.

    Ties at the threshold are resolved like a stable ascending sort (lower column index
    pruned first). Uses ``topk`` for the threshold: several times faster than a full sort.
    """
    if k <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    kth = torch.topk(scores, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    pruned = scores < kth
    at = scores == kth
    need = k - pruned.sum(dim=1, keepdim=True)
    if (at.sum(dim=1, keepdim=True) != need).any():  # ties: the first `need` of them go
        at &= at.cumsum(dim=1) <= need
    return ~(pruned | at)


def select_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: keep the ``n`` highest of every ``m`` consecutive scores of a row.

    Args:
        scores: [out, in] with ``in % m == 0``.
        n, m: keep n of m (1 <= n <= m; n == m keeps everything, which OWL's per-block N
            may reach).

    Returns:
        bool [out, in] with exactly n True entries in each aligned group of m.

    Raises:
        InputError: when the width is not divisible by m or n is out of range.
    """
    _check_scores(scores)
    rows, cols = scores.shape
    if not 1 <= n <= m:
        raise InputError(f"N:M needs 1 <= N <= M, got {n}:{m}")
    if cols % m:
        raise InputError(f"N:M with M={m} needs a width divisible by {m}, got [{rows}, {cols}]")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, : m - n]
    keep = torch.ones(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(2, order, False)
    return keep.reshape(rows, cols)


def select_mask(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """Keep-mask for a `Target`: row-wise unstructured or N:M (see the module doc)."""
    if target.nm is None:
        return select_unstructured(scores, target.sparsity)
    return select_nm(scores, target.nm[0], target.nm[1])


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of False (pruned) entries of a keep-mask."""
    return 1.0 - mask.sum().item() / max(mask.numel(), 1)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.ndim != 2 or not scores.is_floating_point():
        raise InputError(
            f"scores must be a 2-D float tensor [out, in], got {tuple(scores.shape)} {scores.dtype}"
        )
