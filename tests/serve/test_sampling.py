"""sample_next: top-k, top-p, temperature 0, refused NaN temperature."""

from __future__ import annotations

import pytest
import torch

from owl_sparse.errors import InputError
from owl_sparse.serve import sample_next


def test_sample_next_respects_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    top2 = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_next(logits, 1.0, top_p=0.7, generator=gen)  # 0.5 < 0.7 <= 0.8
    assert set(nucleus.tolist()) == {0, 1}
    free = sample_next(logits, 1.0, generator=gen)
    share = (free == 0).float().mean().item()
    assert set(free.tolist()) == {0, 1, 2, 3} and abs(share - 0.5) < 0.05
    assert sample_next(logits[:3], 0.0).tolist() == [0, 0, 0]


def test_sample_next_refuses_nan_temperature():
    with pytest.raises(InputError, match="temperature"):
        sample_next(torch.randn(2, 10), temperature=float("nan"))
