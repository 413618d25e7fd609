"""What prune refuses before it changes the model: mutated configs, OWL allocations that
would be clipped, packed / non-finite / meta models, blocks without linear layers, and
calibration or arguments of the wrong kind (an `InputError`, or `TypeError` for a wrong
kind of object)."""

from __future__ import annotations

import pytest
import torch
from factories import _calibration, tiny_model

from owl_sparse.errors import InputError
from owl_sparse.models import find_decoder_blocks, find_linears
from owl_sparse.pruning import PruneConfig, dense_profile, prune


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


# ------------------------------------------------------------------ the model


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


def test_blocks_without_linear_layers_are_named():
    from torch import nn

    with pytest.raises(InputError, match=r"decoder block 0 \(Linear\) holds no nn.Linear"):
        prune(nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]), None, PruneConfig("magnitude"))


# ------------------------------------------------------------------ calibration and arguments


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


def test_prune_device_is_checked():
    with pytest.raises(InputError, match="device 'bogus' is not a torch device"):
        prune(tiny_model("llama"), _calibration(), PruneConfig(), device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            prune(tiny_model("llama"), _calibration(), PruneConfig(), device="cuda")
