"""Evaluation windows, calibration batches, sampling calibration from the model, token-id checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import tiny_model

from owl_sparse.data import (
    calibration_batches,
    check_token_ids,
    eval_windows,
    sample_from_model,
)
from owl_sparse.errors import InputError


def test_eval_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(1030)
    w = eval_windows(ids, 100)
    assert w.shape == (10, 100)
    assert torch.equal(w.reshape(-1), torch.arange(1000))
    assert eval_windows(ids, 100, max_windows=3).shape == (3, 100)
    assert eval_windows(ids, 1030).shape == (1, 1030)


def test_eval_windows_errors():
    with pytest.raises(InputError, match="shorter than one window"):
        eval_windows(torch.arange(50), 64)
    with pytest.raises(InputError, match="seqlen"):
        eval_windows(torch.arange(50), 1)
    with pytest.raises(InputError, match="max_windows"):
        eval_windows(torch.arange(500), 64, max_windows=0)


def test_calibration_is_seeded_and_in_range():
    ids = torch.arange(5000)
    a = calibration_batches(ids, 8, 64, seed=3)
    b = calibration_batches(ids, 8, 64, seed=3)
    c = calibration_batches(ids, 8, 64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # each window is a contiguous slice of the stream
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)
    assert a.max() < 5000
    with pytest.raises(InputError, match="too short"):
        calibration_batches(torch.arange(64), 1, 64)
    with pytest.raises(InputError, match=">= 1"):
        calibration_batches(ids, 0, 64)


# ------------------------------------------------------------------ bad input


def test_the_token_id_check_is_shared():
    model = tiny_model("llama")
    for name in ("calibration", "windows"):
        with pytest.raises(InputError, match=rf"^{name} token ids must lie in \[0, 128\)"):
            check_token_ids(model, torch.full((1, 4), 128), name)
    check_token_ids(model, torch.zeros(1, 4, dtype=torch.int32), "windows")


def _counting(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_sample_from_model_needs_samples(n):
    model = tiny_model("llama")
    calls = _counting(model)
    with pytest.raises(InputError, match="number of samples must be an integer >= 1"):
        sample_from_model(model, None, n, 8)
    assert not calls


def test_sample_from_model_refuses_seqlen_beyond_the_context_before_sampling():
    model = tiny_model("llama")
    calls = _counting(model)
    with pytest.raises(InputError, match="seqlen 300 exceeds the model's context length 256"):
        sample_from_model(model, None, 2, 300)
    assert not calls
    assert sample_from_model(model, None, 2, 5).shape == (2, 5)


def test_token_streams_and_counts_are_checked():
    from owl_sparse.data import calibration_batches, eval_windows

    with pytest.raises(InputError, match="calibration samples must be an integer >= 1, got 2.5"):
        calibration_batches(torch.arange(100), 2.5, 10)
    with pytest.raises(
        InputError, match=r"torch\.int64 or torch\.int32 tensor, got torch\.float32"
    ):
        eval_windows(torch.rand(100), 10)
    with pytest.raises(InputError, match="token ids must be .* got list"):
        calibration_batches(list(range(100)), 2, 10)
    with pytest.raises(InputError, match="max_windows must be an integer >= 1, got 1.5"):
        eval_windows(torch.arange(100), 10, max_windows=1.5)
    assert eval_windows(torch.arange(100, dtype=torch.int32), np.int64(10)).shape == (10, 10)


def test_tokenize_without_a_tokenizer_is_one_clear_error():
    from owl_sparse.data import tokenize

    with pytest.raises(InputError, match="no tokenizer"):
        tokenize(None, "some text")
    with pytest.raises(InputError, match="not callable"):
        tokenize(object(), "some text")
