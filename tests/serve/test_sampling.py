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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_is_argmax(dtype, rows):
    """Fresh logits, ties (the first wins) and a NaN (it counts as the largest), contiguous
    or not: the fp32 row-by-row argmax answers exactly as torch's argmax."""
    gen = torch.Generator().manual_seed(rows)
    for _ in range(5):
        logits = torch.randn(rows, 2 * 997, generator=gen).to(dtype)[:, ::2]
        logits[0, 5] = logits[0, 900] = logits[0].max() + 1  # a tie
        if rows > 1:
            logits[-1, 40] = float("nan")
        got = sample_next(logits)
        assert got.dtype == torch.int64 and got.shape == (rows,)
        assert torch.equal(got, logits.argmax(dim=-1))
        assert got[0] == 5
