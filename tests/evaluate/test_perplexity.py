"""Perplexity against an independent implementation of the same protocol; bad windows."""

from __future__ import annotations

import math

import pytest
import torch
from factories import _calibration, tiny_model

from owl_sparse.errors import InputError
from owl_sparse.evaluate import perplexity


def reference_perplexity(model, windows) -> float:
    """Token-by-token float64 log-softmax, summed per window: written independently."""
    per_window = []
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            nll = [-logp[t, row[t + 1]].item() for t in range(row.numel() - 1)]
            per_window.append(sum(nll) / len(nll))
    return math.exp(sum(per_window) / len(per_window))


def test_perplexity_matches_reference_and_batching():
    model = tiny_model("llama")
    windows = torch.randint(0, 128, (5, 33), generator=torch.Generator().manual_seed(0))
    ref = reference_perplexity(model, windows)
    one = perplexity(model, windows, batch_size=1, progress=False)
    many = perplexity(model, windows, batch_size=4, progress=False)
    assert one.perplexity == pytest.approx(ref, rel=1e-5)
    assert many.perplexity == pytest.approx(ref, rel=1e-5)
    assert one.windows == 5 and one.seqlen == 33 and one.tokens == 165


def test_seqlen_beyond_context_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="exceeds the model's context length 256"):
        perplexity(model, torch.zeros(1, 300, dtype=torch.int64), progress=False)
    with pytest.raises(InputError, match=r"\[W, seqlen>=2\]"):
        perplexity(model, torch.zeros(0, 10, dtype=torch.int64), progress=False)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "windows, message",
    [
        (torch.full((2, 16), 600), r"windows token ids must lie in \[0, 128\), got \[600, 600\]"),
        (torch.full((2, 16), -1), r"must lie in \[0, 128\), got \[-1, -1\]"),
        (torch.rand(2, 16), r"torch\.int64 or torch\.int32.*float32"),
        ([[1, 2, 3]], r"windows must be an integer tensor \[W, seqlen\].*list"),
    ],
)
def test_perplexity_checks_its_windows(windows, message):
    with pytest.raises(InputError, match=message):
        perplexity(tiny_model("llama"), windows, progress=False)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_perplexity_batch_size(batch_size):
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        perplexity(tiny_model("llama"), _calibration(), batch_size=batch_size, progress=False)
