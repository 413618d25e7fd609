"""The tuned allocation: held-out split, grid, budget filter, paired noise rule, and the
real-method confirmation restoring the right weights."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import _calibration, tiny_model

from owl_sparse.errors import InputError
from owl_sparse.pruning import PruneConfig, prune, tune
from owl_sparse.pruning.masks import Target


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_split_calibration():
    cal = _calibration(n=8, seqlen=6)
    stats, held = tune.split_calibration(cal)
    assert stats.shape == (6, 6) and held.shape == (2, 6)
    assert torch.equal(torch.cat([stats, held]), cal)
    assert tune.split_calibration(_calibration(n=2))[1].shape[0] == 1
    with pytest.raises(InputError, match="at least 2"):
        tune.split_calibration(_calibration(n=1))


def test_paired_gain_rule():
    base = torch.tensor([3.0, 3.1, 2.9, 3.05, 2.95], dtype=torch.float64)
    gain, se, beats = tune.paired_gain(
        base - 0.2 + torch.tensor([0.01, -0.01, 0.0, 0.01, -0.01]), base
    )
    assert beats and gain == pytest.approx(0.2) and se < 0.01
    noisy = base + torch.tensor([-0.5, 0.45, -0.4, 0.5, -0.2], dtype=torch.float64)
    assert not tune.paired_gain(noisy, base)[2]
    assert not tune.paired_gain(base[:1] - 1, base[:1])[2]  # one window: never


def test_candidates_skip_what_cannot_meet_the_target():
    configs, skipped = tune.candidates(PruneConfig(allocation="tuned", sparsity=0.1))
    assert configs[0].allocation == "uniform"
    assert all(c.owl_lambda < 0.1 for c in configs if c.allocation == "owl")
    assert any(s.get("owl_lambda") == 0.15 and "skipped" in s for s in skipped)


def test_planned_sparsity_counts_row_rounding():
    shapes = {(0, "a"): (4, 10), (0, "b"): (2, 4)}
    targets = {(0, "a"): Target(0.33), (0, "b"): Target.of(0.5, (2, 4))}
    # a: round(3.3) = 3 of 10 per row; b: 2 of 4
    assert tune.planned_sparsity(targets, shapes) == pytest.approx((4 * 3 + 2 * 2) / 48)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_tuned_equals_the_plain_run_of_what_it_chose(method):
    dense = tiny_model("llama", seed=3)
    cal = _calibration(n=8, seqlen=16, seed=4)
    model = copy.deepcopy(dense)
    report = prune(model, cal, PruneConfig(method=method, allocation="tuned", sparsity=0.6))
    search = report.allocation_search
    assert search["trials"][0]["allocation"] == "uniform"
    assert report.calibration["held_out"] == [2, 16]
    if method != "magnitude":
        assert search["final_pass_windows"] == [8, 16]
        assert "then pruned on all 8 windows" in report.table()
    chosen = dict(search["chosen"])
    again = copy.deepcopy(dense)
    # every window, the held-out ones included (magnitude reads none of them)
    plain = prune(again, cal, PruneConfig(method=method, sparsity=0.6, **chosen))
    got, want = _weights(model), _weights(again)
    assert all(torch.equal(got[k], want[k]) for k in want), f"differs from {chosen}"
    assert report.achieved_sparsity == pytest.approx(plain.achieved_sparsity)
    assert abs(report.achieved_sparsity - 0.6) <= 0.01
    assert "tuned allocation" in report.table()
    if method != "magnitude":  # the held-out windows made a difference
        stats_only = copy.deepcopy(dense)
        stats, _ = tune.split_calibration(cal)
        prune(stats_only, stats, PruneConfig(method=method, sparsity=0.6, **chosen))
        other = _weights(stats_only)
        assert any(not torch.equal(got[k], other[k]) for k in want)


def test_confirmation_keeps_uniform_when_the_pick_does_not_hold(monkeypatch):
    """Force the proxy to pass a finalist on, and the confirmation to reject it: the
    model must hold exactly the uniform result."""
    dense = tiny_model("llama", seed=5)
    cal = _calibration(n=8, seqlen=16, seed=6)
    real = tune.paired_gain
    calls = []

    def fake(candidate, baseline):
        calls.append(1)
        gain, se, _ = real(candidate, baseline)
        return gain, se, len(calls) == 1  # the proxy passes, the confirmation does not

    monkeypatch.setattr(tune, "paired_gain", fake)
    model = copy.deepcopy(dense)
    report = prune(model, cal, PruneConfig(method="wanda", allocation="tuned", sparsity=0.6))
    assert len(calls) == 2
    assert report.allocation_search["chosen"] == {"allocation": "uniform"}
    assert "confirmed" in report.allocation_search
    uniform = copy.deepcopy(dense)
    prune(uniform, cal, PruneConfig(method="wanda", sparsity=0.6))
    got, want = _weights(model), _weights(uniform)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_confirmation_keeps_the_pick_when_it_holds(monkeypatch):
    dense = tiny_model("llama", seed=5)
    cal = _calibration(n=8, seqlen=16, seed=6)
    monkeypatch.setattr(tune, "paired_gain", lambda c, b: (0.1, 0.01, True))
    model = copy.deepcopy(dense)
    report = prune(model, cal, PruneConfig(method="wanda", allocation="tuned", sparsity=0.6))
    chosen = report.allocation_search["chosen"]
    assert chosen == report.allocation_search["best_trial"]
    assert chosen["allocation"] != "uniform"
    again = copy.deepcopy(dense)
    prune(again, cal, PruneConfig(method="wanda", sparsity=0.6, **chosen))
    got, want = _weights(model), _weights(again)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_held_out_rules():
    model = tiny_model("llama", seed=0)
    cal = _calibration(n=4, seqlen=8)
    with pytest.raises(InputError, match="held_out is only used"):
        prune(model, cal, PruneConfig(allocation="owl", sparsity=0.5), held_out=cal)
    from owl_sparse.models import find_decoder_blocks
    from owl_sparse.pruning import capture_block_inputs

    inputs = capture_block_inputs(model, find_decoder_blocks(model).blocks, cal, "cpu", 4)
    with pytest.raises(InputError, match="needs held_out"):
        prune(model, cal, PruneConfig(allocation="tuned", sparsity=0.5), inputs=inputs)
    with pytest.raises(InputError, match="calibration windows themselves"):
        prune(
            model, None, PruneConfig(allocation="tuned", sparsity=0.5), inputs=inputs, held_out=cal
        )
    with pytest.raises(InputError, match="at least 2"):
        prune(model, cal[:1], PruneConfig(allocation="tuned", sparsity=0.5))
    with pytest.raises(InputError, match="tokens long"):
        prune(model, cal, PruneConfig(allocation="tuned", sparsity=0.5), held_out=cal[:, :6])
    bad = torch.full((2, 8), 10_000)
    with pytest.raises(InputError):
        prune(model, cal, PruneConfig(allocation="tuned", sparsity=0.5), held_out=bad)
