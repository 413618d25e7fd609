"""Model loading and structure discovery, without any download."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model
from torch import nn

from owl_sparse.errors import InputError
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


def test_load_hf_directory_roundtrip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    ids = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tokenizer.encode("t5 t7") == [5, 7]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "neither a built-in name"),
        ("/nonexistent/dir/model.gguf", "neither a built-in name"),
    ],
)
def test_bad_model_specs(spec, message):
    with pytest.raises(InputError, match=message):
        load_model(spec)


def test_wrong_kind_of_file(tmp_path):
    bogus = tmp_path / "weights.txt"
    bogus.write_text("hello")
    with pytest.raises(InputError, match="unsupported model file"):
        load_model(bogus)
    fake_gguf = tmp_path / "m.gguf"
    fake_gguf.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(InputError, match="not a GGUF file"):
        load_model(fake_gguf)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_model(empty_dir)
