"""Mask selection against hand-computed answers: unstructured and N:M, exact counts, ties."""

from __future__ import annotations

import math

import pytest
import torch

from owl_sparse.errors import InputError
from owl_sparse.pruning import Target
from owl_sparse.pruning.masks import (
    mask_sparsity,
    pruned_per_row,
    select_mask,
    select_nm,
    select_unstructured,
)
from owl_sparse.pruning.scores import magnitude_scores, wanda_scores

T, F = True, False


def test_wanda_row_wise_by_hand():
    # ||X_j|| = [2, 1, 0.5, 4]; scores row 0 = [2, 2, 1.5, 2] -> ties at 2 resolved by index
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, 1.0, 8.0, 0.1]])
    colsq = torch.tensor([4.0, 1.0, 0.25, 16.0], dtype=torch.float64)
    scores = wanda_scores(weight, colsq)
    torch.testing.assert_close(scores, torch.tensor([[2.0, 2.0, 1.5, 2.0], [2.0, 1.0, 4.0, 0.4]]))
    keep = select_unstructured(scores, 0.5)
    # row 0: prune 1.5 (col 2) then the first of the tied 2s (col 0)
    # row 1: prune 0.4 (col 3) and 1.0 (col 1)
    assert keep.tolist() == [[F, T, F, T], [T, F, T, F]]


def test_magnitude_uses_absolute_values():
    weight = torch.tensor([[-5.0, 0.1, 2.0, -0.2, 3.0]])
    keep = select_unstructured(magnitude_scores(weight), 0.4)  # prune round(2.0) = 2
    assert keep.tolist() == [[T, F, T, F, T]]


def test_nm_by_hand():
    scores = torch.tensor(
        [[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0]]
    )
    keep = select_nm(scores, 2, 4)
    assert keep.tolist() == [
        [F, T, F, T, T, F, T, F],
        [F, F, T, T, F, F, T, T],
    ]  # ties: lower index pruned first
    keep = select_mask(scores, Target.of(0.0, (1, 4)))
    assert keep.sum(dim=1).tolist() == [2, 2]
    assert keep[0].tolist() == [F, T, F, F, T, F, F, F]


def test_all_equal_scores_prune_first_columns():
    keep = select_unstructured(torch.zeros(3, 10), 0.3)
    assert (keep[:, :3] == 0).all() and keep[:, 3:].all()


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (5, 64), (4, 129)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.55, 0.7, 0.99])
def test_exact_count_per_row(rows, cols, sparsity):
    g = torch.Generator().manual_seed(rows * cols)
    scores = torch.randn(rows, cols, generator=g)
    keep = select_unstructured(scores, sparsity)
    k = pruned_per_row(sparsity, cols)
    assert (keep.logical_not().sum(dim=1) == k).all()
    assert math.isclose(mask_sparsity(keep), k / cols)
    # the pruned ones are the lowest of their row
    for r in range(rows):
        if 0 < k < cols:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (5, 8), (3, 4), (8, 8)])
def test_nm_exact_per_group(n, m):
    scores = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(m))
    keep = select_nm(scores, n, m)
    assert (keep.reshape(6, 4, m).sum(dim=2) == n).all()


def test_pruned_per_row_rounds_half_up_and_keeps_one():
    assert pruned_per_row(0.5, 5) == 3  # 2.5 -> 3, not banker's 2
    assert pruned_per_row(0.7, 10) == 7
    assert pruned_per_row(0.999, 10) == 9  # never a whole row
    assert pruned_per_row(0.0, 10) == 0


def test_mask_errors():
    with pytest.raises(InputError, match=r"divisible by 4.*\[2, 6\]"):
        select_nm(torch.zeros(2, 6), 2, 4)
    with pytest.raises(InputError, match="2-D float"):
        select_unstructured(torch.zeros(4, dtype=torch.int64), 0.5)
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        select_unstructured(torch.zeros(2, 4), 1.0)
