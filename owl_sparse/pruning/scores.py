"""Scorers: magnitude, Wanda and SparseGPT, each one function with the same signature.

A scorer takes a layer's weight ``[out, in]``, the statistics it declares in `NEEDS`
(from `StatsAccumulator`) and a `Target`, and returns ``(new_weight, keep_mask)``:
``new_weight`` is None when the surviving weights are unchanged (magnitude, Wanda) and a
float32 ``[out, in]`` tensor when they are updated (SparseGPT). Masks come from
`owl_sparse.pruning.masks`, so every scorer obeys the same row-wise / N:M rules.

- magnitude: score |W| (Han et al., 2015).
- Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2 over all calibration tokens.
- SparseGPT (Frantar & Alistarh, 2023): Optimal Brain Surgeon with the calibration Hessian
  H = X^T X; dead inputs (H_jj = 0) get W[:, j] = 0 and H_jj = 1; 1% of mean(diag H) damping;
  the upper Cholesky factor U of H^-1 drives column-by-column pruning in blocks of 128
  columns, with the error of each pruned column spread over the remaining columns of its
  block at once and over later blocks lazily (one matmul per block). Inside each block the
  mask is chosen on the *updated* weights by the smallest w^2 / U_jj^2. Unlike the reference
  code (one threshold over the whole block) the choice is made per row, with per-block
  quotas that telescope to exactly round(s*K) pruned weights per row, so every layer hits
  its target exactly as the other scorers do. N:M chooses each group of M when the loop
  reaches it. If the factorisation fails, the damping is raised 10x (up to 3 times).
"""

from __future__ import annotations

import math

import torch

from .config import PruneError
from .masks import Target, prune_lowest, pruned_per_row, select_mask, select_nm

NEEDS = {"magnitude": (), "wanda": ("colsq",), "sparsegpt": ("hessian",)}


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32, [out, in]."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, colsq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in float32.

    Args:
        weight: [out, in] any float dtype.
        colsq: [in] sum over tokens of x_j^2 (any float dtype, same device).
    """
    if colsq.shape != (weight.shape[1],):
        raise ValueError(
            f"colsq must have shape [{weight.shape[1]}] for weight {tuple(weight.shape)}, "
            f"got {tuple(colsq.shape)}"
        )
    return weight.detach().float().abs() * colsq.sqrt().to(torch.float32).unsqueeze(0)


def prune_magnitude(weight, stats, target: Target, name: str = ""):
    return None, select_mask(magnitude_scores(weight), target)


def prune_wanda(weight, stats, target: Target, name: str = ""):
    return None, select_mask(wanda_scores(weight, stats.colsq(name)), target)


def prune_sparsegpt(weight, stats, target: Target, name: str = ""):
    return sparsegpt(weight, stats.hessian(name), target, name=name)


SCORERS = {"magnitude": prune_magnitude, "wanda": prune_wanda, "sparsegpt": prune_sparsegpt}


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    blocksize: int = 128,
    percdamp: float = 0.01,
    retries: int = 3,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer (see the module doc).

    Args:
        weight: [out, in] any float dtype.
        hessian: [in, in] sum of x x^T over calibration tokens (float32, same device).
        target: sparsity (row-wise quota) or N:M.
        blocksize: columns per lazy-update block (rounded down to a multiple of M for N:M).
        percdamp: damping as a fraction of mean(diag H).
        retries: how many times to retry the factorisation with 10x more damping.

    Returns:
        (new_weight float32 [out, in] with exact zeros where pruned, keep mask bool [out, in]).

    Raises:
        PruneError: when H + damping stays not positive definite after the retries.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be [{cols}, {cols}] for weight {tuple(weight.shape)}, "
            f"got {tuple(hessian.shape)}"
        )
    H = hessian.to(torch.float32, copy=True)
    # Work on W^T so that a column of W is a contiguous row: the per-column loop touches
    # contiguous memory and the updates are rank-1 (addr_) on a contiguous slab.
    Wt = weight.detach().to(torch.float32).t().contiguous()  # [in, out]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    Wt[dead] = 0.0
    U = _upper_cholesky_of_inverse(H, percdamp, retries, name)
    del H
    keep_t = torch.ones(cols, rows, dtype=torch.bool, device=Wt.device)
    if target.nm is not None:
        blocksize = max(target.nm[1], blocksize // target.nm[1] * target.nm[1])
    total = pruned_per_row(target.sparsity, cols) if target.nm is None else 0
    quota = lambda i: min(math.floor(target.sparsity * i + 0.5 + 1e-9), total)  # noqa: E731
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        err = torch.zeros_like(W1)
        if target.nm is None:
            # OBS saliency w^2 / [H^-1]_jj with [H^-1]_jj = U_jj^2 on the updated weights.
            sal = (W1.square() / d.square().unsqueeze(1)).t()
            keep_t[i1:i2] = prune_lowest(sal, quota(i2) - quota(i1)).t()
            scale = (~keep_t[i1:i2]).float() / d.unsqueeze(1)
        for i in range(i2 - i1):
            if target.nm is not None and i % target.nm[1] == 0:
                n, m = target.nm
                sal = (W1[i : i + m].square() / d[i : i + m].square().unsqueeze(1)).t()
                keep_t[i1 + i : i1 + i + m] = select_nm(sal, n, m).t()
                scale_g = (~keep_t[i1 + i : i1 + i + m]).float() / d[i : i + m].unsqueeze(1)
            s = scale[i] if target.nm is None else scale_g[i % target.nm[1]]
            torch.mul(W1[i], s, out=err[i])  # (w - q) / d: the pruned part of column i
            W1[i:].addr_(U1[i, i:], err[i], alpha=-1.0)
        W1.mul_(keep_t[i1:i2])  # exact zeros where pruned
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1.0)
    if not torch.isfinite(Wt).all():
        raise PruneError(f"{name}: SparseGPT produced non-finite weights")
    return Wt.t(), keep_t.t()


def _upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float, retries: int, name: str):
    """Upper Cholesky factor of (H + damp*I)^-1, raising damping 10x on failure.

    ``H`` is a private copy and is damped in place (at most three K x K matrices are alive
    at once: a 7B down_proj's are 485 MB each)."""
    mean_diag = torch.diagonal(H).mean()
    damp, applied = percdamp, 0.0
    for _ in range(retries + 1):
        H.diagonal().add_((damp - applied) * mean_diag)
        applied = damp
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U
        damp *= 10.0
    raise PruneError(
        f"{name}: SparseGPT's Hessian {tuple(H.shape)} is not positive definite even with "
        f"damping {applied:g} x mean(diag H) after {retries} retries; the calibration "
        "activations may be degenerate (try more calibration samples or another method)"
    )
