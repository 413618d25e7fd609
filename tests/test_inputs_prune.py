"""Bad input to pruning, calibration sampling and perplexity: refused up front, clearly.

Regression tests of the input audit (F5, F6, F10, D2, D3, D5, U1, U2): every bad input is
an `InputError` (or `TypeError` for a wrong kind of object) raised before the model changes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from owl_sparse.data import check_token_ids, sample_from_model
from owl_sparse.errors import InputError
from owl_sparse.evaluate import perplexity
from owl_sparse.models import find_decoder_blocks, find_linears
from owl_sparse.pruning import PruneConfig, dense_profile, prune
from owl_sparse.pruning.allocate import owl_sparsities


def _calibration(n=4, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _linear_weights(model) -> dict[str, torch.Tensor]:
    structure = find_decoder_blocks(model)
    return {
        f"{i}.{name}": lin.weight.detach().clone()
        for i, block in enumerate(structure.blocks)
        for name, lin in find_linears(block).items()
    }


def _unchanged(model, before) -> bool:
    after = _linear_weights(model)
    return all(torch.equal(after[k], v) for k, v in before.items())


# --- F5: OWL never misses its target silently ------------------------------------------


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


def test_owl_sparsities_raise_instead_of_clipping():
    # D/lambda = [2, 0, 0, 0]: block 0 lands at 0.1 - 1.5 * lambda, below 0 for lambda 0.08
    with pytest.raises(InputError, match=r"block 0 .*-0\.02.*owl_lambda <= 0\.0666 would fit"):
        owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.1, 0.08)
    with pytest.raises(InputError, match=r"block 1 .*1\.01"):
        owl_sparsities([1.0, 0.0], 0.9, 0.11)  # 0.9 +- 0.11: 1.01 is above the 0.99 cap
    s = owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.1, 0.066)
    assert np.mean(s) == pytest.approx(0.1, abs=1e-12) and min(s) > 0


def test_owl_prune_raises_before_pruning_when_blocks_would_be_clipped():
    model = tiny_model("llama", num_hidden_layers=4)
    calibration = _calibration()
    profile = dense_profile(model, calibration)
    for name, colsq in profile.colsq.items():  # block 0 gets massive outliers in column 0
        if name.split(".")[2] == "0":
            colsq[0] = 1e8
    before = _linear_weights(model)
    config = PruneConfig(allocation="owl", sparsity=0.1, owl_lambda=0.09)
    with pytest.raises(InputError, match=r"OWL .*sparsity 0.1.*block 0"):
        prune(model, calibration, config, profile=profile)
    assert _unchanged(model, before)


def test_mutated_config_is_validated_again():
    model = tiny_model("llama")
    before = _linear_weights(model)
    config = PruneConfig(allocation="owl", sparsity=0.5)
    config.sparsity, config.owl_lambda = 0.05, 0.3
    with pytest.raises(InputError, match="owl_lambda"):
        prune(model, _calibration(), config)
    config = PruneConfig()
    config.method = "wandaa"
    with pytest.raises(InputError, match="method must be one of"):
        prune(model, _calibration(), config)
    assert _unchanged(model, before)


# --- F6, F10: the model itself ---------------------------------------------------------


def test_prune_refuses_a_packed_model():
    from owl_sparse.nn import sparsify_

    model = tiny_model("llama")
    prune(model, None, PruneConfig(method="magnitude", sparsity=0.5))
    sparsify_(model, format="bitmap")
    with pytest.raises(InputError, match=r"already packed \(SparseLinear\).*prune the dense model"):
        prune(model, _calibration(), PruneConfig(sparsity=0.7))


def test_nan_in_a_norm_weight_is_refused_before_anything_changes():
    model = tiny_model("llama", num_hidden_layers=3)
    blocks = find_decoder_blocks(model).blocks
    with torch.no_grad():
        blocks[2].post_attention_layernorm.weight[:] = float("nan")
    before = _linear_weights(model)
    with pytest.raises(InputError, match=r"layers\.2\.post_attention_layernorm\.weight.*NaN"):
        prune(model, _calibration(), PruneConfig(sparsity=0.5))
    assert _unchanged(model, before)


def test_inf_in_a_block_buffer_is_refused():
    model = tiny_model("opt")
    blocks = find_decoder_blocks(model).blocks
    blocks[1].register_buffer("scale", torch.tensor([1.0, float("inf")]))
    with pytest.raises(InputError, match=r"layers\.1\.scale.*NaN or Inf"):
        prune(model, None, PruneConfig(method="magnitude", sparsity=0.5))


def test_meta_model_is_refused():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(InputError, match="meta device"):
        prune(model, _calibration(), PruneConfig(sparsity=0.5))


# --- D3, U2: calibration, config and the other arguments of prune ----------------------


@pytest.mark.parametrize("dtype", [torch.bool, torch.int16, torch.uint8, torch.complex64])
def test_calibration_dtype_is_checked_first(dtype):
    calibration = _calibration().to(dtype)
    with pytest.raises(InputError, match=rf"calibration .*torch\.int64 or torch\.int32.*{dtype}"):
        prune(tiny_model("llama"), calibration, PruneConfig())


def test_int32_calibration_still_works():
    report = prune(tiny_model("llama"), _calibration().int(), PruneConfig(sparsity=0.5))
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.01)


def test_config_must_be_a_prune_config():
    with pytest.raises(TypeError, match="PruneConfig.*dict"):
        prune(tiny_model("llama"), _calibration(), {"method": "wanda"})


def test_calibration_is_checked_even_when_not_needed():
    config = PruneConfig(method="magnitude", sparsity=0.5)
    with pytest.raises(InputError, match="calibration must be an integer tensor.*str"):
        prune(tiny_model("llama"), "garbage", config)


@pytest.mark.parametrize("argument", ["inputs", "profile"])
def test_inputs_and_profile_must_have_their_types(argument):
    expected = "BlockInputs" if argument == "inputs" else "DenseProfile"
    config = PruneConfig(allocation="owl")
    with pytest.raises(TypeError, match=rf"{argument} must be a {expected}.*str"):
        prune(tiny_model("llama"), _calibration(), config, **{argument: "x"})
    with pytest.raises(TypeError, match=r"inputs must be a BlockInputs.*str"):
        dense_profile(tiny_model("llama"), inputs="x")


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_prune_batch_size(batch_size):
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        prune(tiny_model("llama"), _calibration(), PruneConfig(), batch_size=batch_size)


# --- U1: numbers in PruneConfig ---------------------------------------------------------


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


# --- D5: one token-id check for calibration and perplexity ------------------------------


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


def test_the_token_id_check_is_shared():
    model = tiny_model("llama")
    for name in ("calibration", "windows"):
        with pytest.raises(InputError, match=rf"^{name} token ids must lie in \[0, 128\)"):
            check_token_ids(model, torch.full((1, 4), 128), name)
    check_token_ids(model, torch.zeros(1, 4, dtype=torch.int32), "windows")


@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_perplexity_batch_size(batch_size):
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        perplexity(tiny_model("llama"), _calibration(), batch_size=batch_size, progress=False)


# --- D2: sampling calibration from the model --------------------------------------------


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


def test_prune_device_is_checked():
    with pytest.raises(InputError, match="device 'bogus' is not a torch device"):
        prune(tiny_model("llama"), _calibration(), PruneConfig(), device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            prune(tiny_model("llama"), _calibration(), PruneConfig(), device="cuda")


def test_blocks_without_linear_layers_are_named():
    from torch import nn

    with pytest.raises(InputError, match=r"decoder block 0 \(Linear\) holds no nn.Linear"):
        prune(nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]), None, PruneConfig("magnitude"))


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
