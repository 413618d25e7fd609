"""Masks kept one bit per weight: exact round trips on awkward shapes, a dict's behaviour,
clear errors, and what `prune` hands back."""

import pytest
import torch
from factories import tiny_model

from owl_sparse.pruning import MaskStore, PruneConfig, prune
from owl_sparse.pruning.mask_store import pack_bits, unpack_bits


@pytest.mark.parametrize(
    "shape", [(1,), (7,), (8,), (9,), (3, 5), (17, 33), (0, 4), (4, 0), (), (2, 3, 5)]
)
def test_bits_round_trip_exactly(shape):
    for fill in ("random", "all", "none"):
        if fill == "random":
            mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
        else:
            mask = torch.full(shape, fill == "all", dtype=torch.bool)
        bits = pack_bits(mask)
        numel = mask.numel()
        assert bits.dtype == torch.uint8 and bits.numel() == -(-numel // 8)
        back = unpack_bits(bits, tuple(mask.shape))
        assert back.dtype == torch.bool and back.shape == mask.shape
        assert torch.equal(back, mask)


def test_bit_order_is_documented_one():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 3, 9]] = True
    assert pack_bits(mask).tolist() == [0b1001, 0b10]


def test_store_behaves_as_a_dict_of_bool_masks():
    g = torch.Generator().manual_seed(0)
    masks = {f"layer{i}": torch.rand(5 + i, 11, generator=g) > 0.3 for i in range(4)}
    store = MaskStore(masks)
    assert list(store) == list(masks) and len(store) == 4
    for name, mask in store.items():
        assert torch.equal(mask, masks[name])
    assert store.nbytes == sum(-(-m.numel() // 8) for m in masks.values())
    store["layer0"][0, 0] = not masks["layer0"][0, 0]  # a lookup is a copy
    assert torch.equal(store["layer0"], masks["layer0"])
    del store["layer1"]
    assert "layer1" not in store and len(store) == 3
    store.clear()
    assert len(store) == 0


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(3, dtype=torch.uint8), [True, False]])
def test_store_refuses_what_is_not_a_bool_tensor(bad):
    with pytest.raises(TypeError, match="must be a bool tensor"):
        MaskStore()["w"] = bad


def test_prune_keeps_bit_masks_that_match_the_zeroed_weights():
    model = tiny_model("llama")
    report = prune(model, None, PruneConfig(method="magnitude", sparsity=0.6))
    assert isinstance(report.masks, MaskStore) and len(report.masks) > 0
    modules = dict(model.named_modules())
    total = 0
    for name, keep in report.masks.items():
        weight = modules[name].weight
        assert keep.shape == weight.shape
        assert torch.all(weight[~keep] == 0)
        total += keep.numel()
    assert report.masks.nbytes == pytest.approx(total / 8, rel=0.01)
    assert "masks" not in report.to_dict()
