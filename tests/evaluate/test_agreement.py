"""agreement(): KL(reference || model), top-1 agreement and perplexity from one pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from factories import _calibration, tiny_model

from owl_sparse.errors import InputError
from owl_sparse.evaluate import agreement, perplexity


def _perturbed(model, seed=1, scale=0.5):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return other


def _reference_numbers(model, reference, windows):
    """float64, one window at a time: (mean KL, top-1, mean NLL)."""
    kls, agree, nll = [], 0, []
    with torch.no_grad():
        for w in windows:
            a = model(input_ids=w[None]).logits[0, :-1].double()
            b = reference(input_ids=w[None]).logits[0, :-1].double()
            pa, pb = a.log_softmax(-1), b.log_softmax(-1)
            kls += (pb.exp() * (pb - pa)).sum(-1).tolist()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            nll.append(-pa.gather(1, w[1:, None]).mean().item())
    return sum(kls) / len(kls), agree / len(kls), sum(nll) / len(nll)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_float64_reference(batch_size):
    ref = tiny_model("llama", seed=0)
    model = _perturbed(ref, seed=batch_size)
    windows = _calibration(n=5, seqlen=17, seed=batch_size)
    got = agreement(model, ref, windows, batch_size=batch_size, progress=False)
    kl, top1, nll = _reference_numbers(model, ref, windows)
    assert got.kl > 1e-3
    assert got.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert got.top1 == pytest.approx(top1)
    assert got.perplexity.mean_nll == pytest.approx(nll, rel=1e-5)
    assert got.kl_p99 >= got.kl
    plain = perplexity(model, windows, batch_size=2, progress=False)
    assert got.perplexity.perplexity == pytest.approx(plain.perplexity, rel=1e-6)
    assert len(got.perplexity.window_nll) == 5
    assert "window_nll" not in got.to_dict()["perplexity"]


def test_identical_models_agree_fully():
    model = tiny_model("qwen2", seed=2)
    got = agreement(model, copy.deepcopy(model), _calibration(n=3, seqlen=9), progress=False)
    assert got.kl == pytest.approx(0.0, abs=1e-6)
    assert got.top1 == 1.0


def test_vocabulary_mismatch_is_refused():
    model = tiny_model("llama", seed=0)
    other = tiny_model("llama", seed=0, vocab_size=256)
    with pytest.raises(InputError, match="vocabulary"):
        agreement(model, other, _calibration(n=2, seqlen=8), progress=False)


def test_nan_logits_are_an_error():
    ref = tiny_model("llama", seed=0)
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError):
        agreement(model, ref, _calibration(n=2, seqlen=8), progress=False)


def test_windows_are_checked():
    ref = tiny_model("llama", seed=0)
    with pytest.raises(InputError):
        agreement(ref, ref, torch.zeros(2, 8), progress=False)
    with pytest.raises(InputError, match="batch_size"):
        agreement(ref, ref, _calibration(n=2, seqlen=8), batch_size=0, progress=False)
