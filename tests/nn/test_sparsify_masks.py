"""sparsify_ with given masks: used as given, names of shared modules, and names, shapes or
dtypes that fit no layer refused before any change."""

from __future__ import annotations

import pytest
import torch
from factories import n_sparse, pruned_llama
from factories import small_pruned_linear as pruned_linear
from torch import nn

from owl_sparse.errors import InputError
from owl_sparse.nn import SparseLinear, sparsify_


def test_sparsify_uses_given_masks():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = {"0": torch.rand(32, 64) >= 0.5}
    report = sparsify_(model, masks=masks)
    assert [s.name for s in report.swapped] == ["0"]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
    assert model[0].sparsity == pytest.approx(1 - masks["0"].float().mean().item())


def test_sparsify_mask_of_a_shared_module_by_any_name():
    lin = pruned_linear()
    model = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)})
    mask = torch.rand(32, 64) >= 0.5
    report = sparsify_(model, masks={"b.0": mask})
    assert len(report.swapped) == 1 and model["a"] is model["b"][0]
    assert torch.equal(model["a"].dense_weight() != 0, mask & (lin.weight != 0))


# ------------------------------------------------------------------ bad input


def test_sparsify_rejects_mask_names_of_no_layer():
    model = pruned_llama()
    typo = {"model.layers.0.self_attn.qproj": torch.ones(64, 64, dtype=torch.bool)}
    with pytest.raises(InputError, match=r"no linear layer.*model\.layers\.0\.self_attn\.qproj"):
        sparsify_(model, masks=typo)
    assert n_sparse(model) == 0
    with pytest.raises(InputError, match="masks must be a dict"):
        sparsify_(model, masks=[torch.ones(2)])
    with pytest.raises(InputError, match="model must be a torch.nn.Module, got str"):
        sparsify_("model")


def test_sparsify_checks_mask_shape_before_sparsity():
    model = pruned_llama()
    bad = {"model.layers.0.self_attn.q_proj": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(InputError, match=r"q_proj.*\[3, 3\].*\[64, 64\]"):
        sparsify_(model, masks=bad)
    with pytest.raises(InputError, match=r"q_proj.*torch\.bool"):
        sparsify_(model, masks={"model.layers.0.self_attn.q_proj": torch.ones(64, 64)})
    assert n_sparse(model) == 0
