"""Decoder blocks and linear layers of every family, conv1d_to_linear_, model_info."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, Q0, tiny_model
from torch import nn

from owl_sparse.cli.main import main
from owl_sparse.errors import InputError
from owl_sparse.io import load_pretrained
from owl_sparse.models import (
    conv1d_to_linear_,
    find_decoder_blocks,
    find_linears,
    load_model,
    model_info,
)

EXPECTED_LINEARS = {
    "llama": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
    "opt": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    },
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
}

EXPECTED_LINEARS["mistral"] = EXPECTED_LINEARS["qwen2"] = EXPECTED_LINEARS["llama"]

EXPECTED_LINEARS["qwen3"] = EXPECTED_LINEARS["llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_blocks_found_for_each_family(family):
    model = tiny_model(family)
    structure = find_decoder_blocks(model)
    assert len(structure.blocks) == model.config.num_hidden_layers
    # the path really names the list inside the model
    assert model.get_submodule(structure.path) is structure.blocks
    assert set(find_linears(structure.blocks[0])) == EXPECTED_LINEARS[family]
    info = model_info(model)
    assert info["num_blocks"] == 2 and info["block_linears"]


def test_conv1d_to_linear_keeps_outputs():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 128, (2, 9))
    before = model(ids).logits
    assert conv1d_to_linear_(model) == 8
    after = model(ids).logits
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)
    assert all(
        isinstance(m, nn.Linear)
        for m in find_linears(find_decoder_blocks(model).blocks[0]).values()
    )


def test_no_decoder_blocks_is_a_clear_error():
    with pytest.raises(InputError, match="no decoder blocks"):
        find_decoder_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_model_info_lists_packed_layers(ck, hf_dir, capsys):
    dense = model_info(load_model(hf_dir)[0])
    info = model_info(load_pretrained(ck)[0])
    assert set(info["block_linears"]) == set(dense["block_linears"])
    assert info["block_linears"] == dense["block_linears"]
    assert info["parameters"] == dense["parameters"]  # logical weights, packed or not
    packed = info["packed"]
    assert packed["layers"] == 14 and 0 < packed["bytes"]
    q = info["block_packed"]["self_attn.q_proj"]
    assert q["format"] == "bitmap" and q["sparsity"] == pytest.approx(0.7, abs=0.01)
    layer = load_pretrained(ck)[0].get_submodule(Q0)
    assert q["bytes"] == layer.nbytes
    assert main(["info", "--model", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "self_attn.q_proj" in out and "bitmap" in out
