"""PruneConfig and pattern validation: defaults, N:M patterns, OWL's lambda bound, numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from owl_sparse.errors import InputError
from owl_sparse.pruning import PruneConfig, parse_pattern


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(InputError, match="sparsity"):
        PruneConfig(sparsity=sparsity)


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("4:4", "1 <= N < M"),
        ("5:4", "1 <= N < M"),
        ("0:4", "1 <= N < M"),
        ("2-4", "N:M"),
        ("a:b", "N:M"),
        ("2:1", "M must be"),
    ],
)
def test_bad_patterns(pattern, message):
    with pytest.raises(InputError, match=message):
        PruneConfig(pattern=pattern)


def test_config_defaults_and_pattern_sparsity():
    assert PruneConfig().sparsity == 0.7
    cfg = PruneConfig(pattern="2:4")
    assert cfg.sparsity == 0.5 and cfg.nm == (2, 4)
    assert PruneConfig(pattern="5:8", sparsity=0.375).nm == (5, 8)
    with pytest.raises(InputError, match="contradicts"):
        PruneConfig(pattern="2:4", sparsity=0.7)
    with pytest.raises(InputError, match="method"):
        PruneConfig(method="random")
    with pytest.raises(InputError, match="allocation"):
        PruneConfig(allocation="global")
    with pytest.raises(InputError, match="owl_lambda"):
        PruneConfig(owl_lambda=-0.1)
    assert parse_pattern(" Unstructured ") is None


@pytest.mark.parametrize(
    "sparsity, lam, bound",
    [(0.05, 0.3, "below 0.05"), (0.02, 0.08, "below 0.02"), (0.6, 0.45, "at most 0.39")],
)
def test_owl_config_refuses_lambda_beyond_the_sparsity(sparsity, lam, bound):
    with pytest.raises(InputError, match=rf"owl_lambda {lam}.*sparsity {sparsity}.*{bound}"):
        PruneConfig(method="wanda", allocation="owl", sparsity=sparsity, owl_lambda=lam)


@pytest.mark.parametrize(
    "sparsity, lam, shown", [(0.0, 0.08, "0"), (0.0, 0.0, "0"), (0.995, 0, "0.995")]
)
def test_owl_config_refuses_sparsities_it_cannot_spread(sparsity, lam, shown):
    with pytest.raises(InputError, match=rf"'owl' needs sparsity in \(0, 0.99\], got {shown} "):
        PruneConfig(allocation="owl", sparsity=sparsity, owl_lambda=lam)


def test_owl_config_refuses_blocks_above_the_cap():
    with pytest.raises(InputError, match=r"owl_lambda 0.2.*sparsity 0.95.*at most 0.04"):
        PruneConfig(allocation="owl", sparsity=0.95, owl_lambda=0.2)


def test_lambda_bound_applies_to_owl_only():
    # the sensitivity allocation bounds its blocks itself and meets the target
    config = PruneConfig(allocation="sensitivity", sparsity=0.05, owl_lambda=0.3)
    assert config.owl_lambda == 0.3
    assert PruneConfig(allocation="uniform", sparsity=0.0).sparsity == 0.0
    # the CLI / demo / test defaults stay valid
    for config in (
        PruneConfig(allocation="owl"),
        PruneConfig(allocation="owl", sparsity=0.5),
        PruneConfig(allocation="owl", pattern="2:4"),
        PruneConfig(allocation="owl", pattern="4:8", owl_lambda=0.2),
    ):
        assert config.owl_lambda in (0.08, 0.2)


def test_numpy_numbers_are_accepted_and_bools_refused():
    config = PruneConfig(
        sparsity=np.float32(0.5),
        owl_m=np.float32(5.0),
        owl_lambda=np.float64(0.08),
        seed=np.int64(3),
    )
    assert type(config.owl_m) is float and type(config.owl_lambda) is float
    assert type(config.seed) is int and config.seed == 3
    assert config.owl_lambda == pytest.approx(0.08)
    json.dumps(config.to_dict())
    for field in ("sparsity", "owl_m", "owl_lambda", "seed"):
        with pytest.raises(InputError, match=rf"{field} must be .*got True"):
            PruneConfig(**{field: True})
    with pytest.raises(InputError, match="seed must be an integer"):
        PruneConfig(seed=1.5)
