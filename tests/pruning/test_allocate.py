"""Allocation rules: OWL's formula and N:M rounding, the sensitivity allocation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from owl_sparse.errors import InputError
from owl_sparse.pruning.allocate import (
    ErrorCurve,
    block_curve,
    layer_error,
    level_bounds,
    nm_levels,
    outlier_ratio,
    outlier_ratios,
    owl_sparsities,
    sensitivity_levels,
)


def test_owl_formula_by_hand():
    ratios = [0.01, 0.03, 0.02, 0.05]
    s = owl_sparsities(ratios, target=0.7, lam=0.08)
    # D = (L - 0.01) / 0.04 * 0.16 = [0, .08, .04, .16]; D - mean(D) + 0.3; s = 1 - D
    np.testing.assert_allclose(s, [0.77, 0.69, 0.73, 0.61], atol=1e-12)


@pytest.mark.parametrize("target, lam", [(0.5, 0.08), (0.7, 0.08), (0.8, 0.02), (0.6, 0.2)])
def test_owl_mean_spread_and_order(target, lam):
    ratios = np.random.default_rng(0).uniform(0.001, 0.05, size=24)
    s = np.asarray(owl_sparsities(ratios, target, lam))
    assert s.mean() == pytest.approx(target, abs=1e-12)
    assert s.max() - s.min() == pytest.approx(2 * lam, abs=1e-12)
    # more outliers -> less sparsity (strictly antitone)
    order = np.argsort(ratios)
    assert np.all(np.diff(s[order]) < 0)


def test_owl_equal_ratios_give_uniform_and_no_clipping():
    assert owl_sparsities([0.02, 0.02, 0.02], 0.6, 0.08) == pytest.approx([0.6] * 3)
    # 0.05 - 0.08 <= 0: the reference code would clip to 0.01 and miss the mean; we refuse
    with pytest.raises(InputError, match=r"sparsity 0.05 .*block 1 .*-0\.03.*<= 0\.0499"):
        owl_sparsities([0.0, 1.0], 0.05, 0.08)
    assert owl_sparsities([0.0, 1.0], 0.05, 0.0499) == pytest.approx([0.0999, 0.0001])


def test_outlier_ratio_by_hand():
    t = torch.tensor([1.0] * 9 + [11.0])  # mean 2, threshold 5 * 2 = 10
    assert outlier_ratio([t], 5) == pytest.approx(0.1)
    # pooled over layers: mean (20 + 20) / 20 = 2; outliers are the two 11s
    assert outlier_ratio([t, t.clone()], 5) == pytest.approx(0.1)
    assert outlier_ratio(lambda: iter([t, t]), 5) == pytest.approx(0.1)
    assert outlier_ratio([t], 6) == 0.0


def test_nm_levels_keep_m_and_match_the_mean():
    # want p = s * 8 = [3.36, 4.0, 4.64]: floors [3, 4, 4], one unit left -> largest remainder
    assert nm_levels([0.42, 0.5, 0.58], [1, 1, 1], n=4, m=8) == [5, 4, 3]
    # at 2:4 with lambda 0.08 every block stays 2:4
    assert nm_levels([0.42, 0.46, 0.54, 0.58], [1] * 4, n=2, m=4) == [2, 2, 2, 2]
    s = owl_sparsities(np.linspace(0.01, 0.05, 30), 0.625, 0.08)
    n_b = nm_levels(s, [1] * 30, n=3, m=8)
    assert np.mean([8 - n for n in n_b]) == pytest.approx(5.0)
    assert set(n_b) <= {2, 3, 4}


def test_layer_error_by_hand():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    colsq = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # energies [[1, 4], [9, 16]]: k=1 removes 1 + 9 per the row-wise order, k=2 everything
    np.testing.assert_allclose(layer_error(weight, colsq, None), [0.0, 10.0, 30.0])
    # colsq weights the columns: [[1*4, 4*1], [9*4, 16*1]] -> sorted rows [4,4], [16,36]
    np.testing.assert_allclose(
        layer_error(weight, torch.tensor([4.0, 1.0], dtype=torch.float64), None), [0, 20, 60]
    )
    nm = layer_error(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(4), (2, 4))
    np.testing.assert_allclose(nm, [0, 1, 5, 14, 30])


def test_block_curve_sums_layers_at_a_shared_sparsity():
    a = (np.arange(11, dtype=float) ** 2, (3, 10))  # 3 x 10 layer
    b = (np.arange(21, dtype=float), (2, 20))  # 2 x 20 layer
    c = block_curve([a, b], target=0.5, lam=0.1, nm=None, grid=10)
    assert (c.lo, c.hi, c.unit, c.width) == (4, 6, 70, 10)
    # s = 0.4: a prunes 4 per row, b 8 per row; s = 0.6: 6 and 12
    np.testing.assert_allclose(c.cost, [16 + 8, 25 + 10, 36 + 12])
    assert c.target(5, None).sparsity == 0.5
    nm = block_curve([(np.array([0, 1, 5, 14, 30.0]), (1, 4))], 0.5, 0.25, (2, 4))
    assert (nm.lo, nm.hi, nm.unit, nm.width) == (1, 3, 1, 4)
    assert nm.target(3, (2, 4)).nm == (1, 4)


def test_level_bounds():
    assert level_bounds(0.5, 0.08, 100) == (42, 58)
    assert level_bounds(0.5, 0.0, 7) == (4, 4)
    assert level_bounds(0.95, 0.08, 10) == (9, 9)


def _curve(costs_per_step, unit, width, lo):
    cost = np.concatenate([[0.0], np.cumsum(costs_per_step)])
    return ErrorCurve(unit=unit, width=width, lo=lo, hi=lo + len(costs_per_step), cost=cost)


def test_sensitivity_gives_sensitive_blocks_less_sparsity_at_the_budget():
    steep = _curve([1.0, 2.0, 4.0, 8.0], unit=10, width=10, lo=3)  # levels 3..7
    flat = _curve([0.1, 0.2, 0.3, 0.4], unit=10, width=10, lo=3)
    levels = sensitivity_levels([steep, flat], target=0.5)
    assert levels == [3, 7]  # budget 0.5 * 200 = 10 * (3 + 7): the flat layer takes all steps
    assert sum(c.unit * k for c, k in zip([steep, flat], levels)) == 100


def test_sensitivity_budget_exact_with_unequal_sizes():
    rng = np.random.default_rng(1)
    curves = []
    for unit, width in [(64, 64), (128, 64), (64, 172), (172, 64), (32, 96)]:
        lo, hi = level_bounds(0.6, 0.1, width)
        steps = np.sort(rng.uniform(0, 1, hi - lo))
        curves.append(_curve(steps, unit, width, lo))
    levels = sensitivity_levels(curves, target=0.6)
    params = sum(c.unit * c.width for c in curves)
    pruned = sum(c.unit * k for c, k in zip(curves, levels))
    assert abs(pruned - round(0.6 * params)) <= max(c.unit for c in curves) / 2
    for c, k in zip(curves, levels):
        assert c.lo <= k <= c.hi
    # equal strictly convex curves share the budget evenly
    same = [_curve([1.0, 2.0, 3.0, 4.0], 10, 10, 3) for _ in range(4)]
    assert sorted(sensitivity_levels(same, 0.5)) == [5, 5, 5, 5]


def test_outlier_ratios_pooled_and_per_tensor():
    a = torch.tensor([1.0] * 9 + [11.0])  # own mean 2: one outlier at m=5
    b = torch.full((10,), 20.0)  # own mean 20: none; pooled mean 11: none above 55
    pooled, own = outlier_ratios([a, b], 0.9)  # thresholds: pooled 9.9, a 1.8, b 18
    assert pooled == pytest.approx(11 / 20)
    assert own == pytest.approx([0.1, 1.0])


# ------------------------------------------------------------------ bad input


def test_owl_sparsities_raise_instead_of_clipping():
    # D/lambda = [2, 0, 0, 0]: block 0 lands at 0.1 - 1.5 * lambda, below 0 for lambda 0.08
    with pytest.raises(InputError, match=r"block 0 .*-0\.02.*owl_lambda <= 0\.0666 would fit"):
        owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.1, 0.08)
    with pytest.raises(InputError, match=r"block 1 .*1\.01"):
        owl_sparsities([1.0, 0.0], 0.9, 0.11)  # 0.9 +- 0.11: 1.01 is above the 0.99 cap
    s = owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.1, 0.066)
    assert np.mean(s) == pytest.approx(0.1, abs=1e-12) and min(s) > 0
