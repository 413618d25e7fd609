"""compressed-tensors directories: export and import, the documented layout, the
compressed-tensors package both ways, foreign files and pickles refused."""

from __future__ import annotations

import json

import pytest
import torch
from factories import (
    _packed_model,
    logits,
    packed_layers,
    pruned_model,
    tiny_model,
)

from owl_sparse.errors import InputError
from owl_sparse.io import load_pretrained, save_pretrained
from owl_sparse.io.safetensors import read_header
from owl_sparse.pruning import PruneConfig, prune


def _masked_dense(family: str, fmt: str):
    """A tiny dense model whose decoder linears are pruned in place (70% or 2:4), and masks."""
    model = tiny_model(family)
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    pattern = "2:4" if fmt == "2:4" else "unstructured"
    report = prune(model, calibration, PruneConfig(method="wanda", pattern=pattern))
    return model, report.masks


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_compressed_tensors_export_import_round_trip(tmp_path, fmt):
    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    model, report = pruned_model("qwen2", fmt)
    before = logits(model, 128)
    save_pretrained(model, tmp_path / "ck", prune_report=report)
    export_compressed_tensors(tmp_path / "ck", tmp_path / "ct")  # from a checkpoint directory
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    sparsity = cfg["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == ("sparse-24-bitmask" if fmt == "2:4" else "sparse-bitmask")
    entries, _ = read_header(tmp_path / "ct" / "model.safetensors")
    layer = "model.layers.0.mlp.up_proj"
    assert entries[f"{layer}.bitmask"].dtype == torch.uint8
    assert (f"{layer}.row_offsets" in entries) == (fmt == "bitmap")
    loaded, _ = load_pretrained(tmp_path / "ct")
    assert torch.equal(logits(loaded, 128), before)
    assert {m.format for m in packed_layers(loaded).values()} == {fmt}


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_documented_compressed_tensors_layout_loads(tmp_path, fmt):
    """A checkpoint built by hand from reference.md's description (numpy.packbits etc.)."""
    import numpy as np
    from safetensors.torch import save_file

    model, masks = _masked_dense("llama", fmt)
    model.save_pretrained(tmp_path / "ct")
    state = model.state_dict()
    for name, mask in masks.items():
        w = state.pop(f"{name}.weight")
        bits = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
        state[f"{name}.bitmask"] = bits
        if fmt == "2:4":
            state[f"{name}.shape"] = torch.tensor(list(w.shape)).reshape(-1, 1)
            state[f"{name}.compressed"] = w[mask].reshape(w.shape[0], -1)
        else:
            counts = mask.sum(1)
            state[f"{name}.shape"] = torch.tensor(list(w.shape))
            state[f"{name}.compressed"] = w[mask]
            state[f"{name}.row_offsets"] = torch.cumsum(counts, 0) - counts
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ct" / "model.safetensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    ct_format = "sparse-24-bitmask" if fmt == "2:4" else "sparse-bitmask"
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.9.4",
        "sparsity_config": {"format": ct_format, "targets": ["Linear"]},
    }
    (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    loaded, _ = load_pretrained(tmp_path / "ct")
    for name, layer in packed_layers(loaded).items():
        assert torch.equal(layer.dense_weight(), model.get_submodule(name).weight), name
    torch.testing.assert_close(logits(loaded, 128), logits(model, 128), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_against_the_compressed_tensors_package(tmp_path, fmt):
    """compressed-tensors 0.14.0.1 (last release with the sparse compressors) both ways."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    from safetensors.torch import save_file

    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    model, masks = _masked_dense("llama", fmt)
    ref = logits(model, 128)
    # theirs -> ours: the package compresses the pruned dense model as llm-compressor did.
    config_cls = Sparse24BitMaskConfig if fmt == "2:4" else BitmaskConfig
    compressor = ModelCompressor(sparsity_config=config_cls(targets=["Linear"], ignore=["lm_head"]))
    state = compressor.compress(model)
    model.save_pretrained(tmp_path / "theirs")
    save_file(
        {k: v.contiguous() for k, v in state.items()}, tmp_path / "theirs" / "model.safetensors"
    )
    compressor.update_config(str(tmp_path / "theirs"))
    loaded, _ = load_pretrained(tmp_path / "theirs")
    layers = packed_layers(loaded)
    assert set(layers) == set(masks) and {m.format for m in layers.values()} == {fmt}
    for name, layer in layers.items():
        assert torch.equal(layer.dense_weight(), model.get_submodule(name).weight), name
    torch.testing.assert_close(logits(loaded, 128), ref, rtol=1e-5, atol=1e-5)
    # ours -> theirs: the package decompresses our export into a fresh dense model.
    export_compressed_tensors(loaded, tmp_path / "ours")
    fresh = tiny_model("llama", seed=5)
    ModelCompressor.from_pretrained(str(tmp_path / "ours")).decompress(
        str(tmp_path / "ours"), fresh
    )
    for name in masks:
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight), name
    torch.testing.assert_close(logits(fresh, 128), ref, rtol=0, atol=0)


# ------------------------------------------------------------------ bad input


def test_export_over_compressed_tensors_dir_with_extra_files_is_refused(tmp_path):
    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    model = _packed_model()
    out = tmp_path / "ct"
    export_compressed_tensors(model, out)
    export_compressed_tensors(model, out)  # replacing our own export is allowed
    (out / "README.md").write_text("model card")
    with pytest.raises(InputError, match=r"README\.md"):
        export_compressed_tensors(model, out)
    assert (out / "README.md").read_text() == "model card"


def test_compressed_tensors_pickle_message_ignores_llama2c_tokenizer(tmp_path):
    from owl_sparse.io.compressed_tensors import export_compressed_tensors

    out = tmp_path / "ct"
    export_compressed_tensors(_packed_model(), out)
    (out / "model.safetensors").unlink()
    (out / "tokenizer.bin").write_bytes(b"\x07\x00\x00\x00" + bytes(20))
    torch.save({"w": torch.zeros(2)}, out / "pytorch_model.bin")
    with pytest.raises(InputError, match="pytorch_model.bin") as info:
        load_pretrained(out)
    assert "tokenizer.bin" not in str(info.value)
