"""The calibration statistics: column norms, weighted norms, Hessians, shared inputs."""

from __future__ import annotations

import pytest
import torch


def test_stats_accumulator_by_hand_and_shared_inputs():
    from torch import nn

    from owl_sparse.pruning.stats import StatsAccumulator

    a, b, c = nn.Linear(3, 2), nn.Linear(3, 4), nn.Linear(2, 2)
    x = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]])  # [1 sample, 2 tokens, 3]
    h = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])  # block input: mean h^2 = 2 and 1
    with StatsAccumulator({"a": a, "b": b, "c": c}, hessian=True, weighted_colsq=True) as acc:
        for _ in range(2):  # two batches
            acc.begin_batch(h)
            y = a(x)  # a and b read the same tensor: one shared entry
            b(x)
            c(y)
            acc.end_batch()
    torch.testing.assert_close(acc.colsq("a"), torch.tensor([2.0, 10.0, 18.0], dtype=torch.float64))
    torch.testing.assert_close(acc.wcolsq("b"), torch.tensor([1.0, 6.0, 18.0], dtype=torch.float64))
    torch.testing.assert_close(acc.hessian("b"), 2 * (x[0].t() @ x[0]))
    assert acc.shared_with("b") == "a" and acc.shared_with("c") == "c"
    assert acc.tokens("a") == 4 and acc.tokens("c") == 4
    acc.check_finite()
    with StatsAccumulator({"a": a}) as bad:
        a(torch.full((1, 2, 3), float("nan")))
    with pytest.raises(ValueError, match="non-finite activations"):
        bad.check_finite("block 3: ")
