"""sparsify_: model swaps keep the logits, filters and formats, shared modules, all or
nothing, one dense layer freed before the next is packed, meta models."""

from __future__ import annotations

import pytest
import torch
from factories import n_sparse, pruned_linear, pruned_llama, tiny_model
from torch import nn

from owl_sparse.errors import InputError
from owl_sparse.nn import SparseLinear, SparsifyReport, sparsify_


def prune_model_(model, sparsity=0.5, pattern="random"):
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            if "lm_head" in name:
                continue
            with torch.no_grad():
                w = m.weight
                if pattern == "2:4":
                    n, k = w.shape
                    mk = torch.zeros(n, k // 4, 4, dtype=torch.bool)
                    mk.scatter_(-1, torch.rand(n, k // 4, 4).argsort(-1)[..., :2], True)
                    w *= mk.view(n, k)
                else:
                    w *= torch.rand_like(w) >= sparsity


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_sparsify_model_logits_unchanged(family):
    model = tiny_model(family)
    prune_model_(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    report = sparsify_(model, format="auto")
    assert isinstance(report, SparsifyReport) and len(report.swapped) > 0
    assert report.bytes_after < report.bytes_before
    assert any(name.endswith("lm_head") for name, _ in report.skipped)
    assert not any(
        type(m).__name__ in ("Linear", "Conv1D") and "lm_head" not in n
        for n, m in model.named_modules()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert "swapped" in str(report) and report.to_dict()["bytes_before"] == report.bytes_before


def test_sparsify_generate_matches_dense():
    model = tiny_model("llama")
    prune_model_(model)
    ids = torch.randint(0, 128, (1, 6))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    sparsify_(model)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref)


def test_sparsify_filters_and_formats():
    model = tiny_model("llama")
    prune_model_(model, pattern="2:4")
    report = sparsify_(model, format="2:4", filter_fn=lambda m, name: "mlp" in name)
    assert report.swapped and all("mlp" in s.name and s.format == "2:4" for s in report.swapped)
    assert any(reason == "filter_fn" for _, reason in report.skipped)
    model = tiny_model("llama")
    prune_model_(model, sparsity=0.3)
    report = sparsify_(model, min_sparsity=0.5)
    assert not report.swapped
    model = tiny_model("llama")
    prune_model_(model)
    with pytest.raises(InputError, match=r"layer 'model\.layers\.0\..*not 2:4"):
        sparsify_(model, format="2:4")
    with pytest.raises(InputError, match="format must be"):
        sparsify_(model, format="csr")
    dense_model = tiny_model("llama")
    assert not sparsify_(dense_model).swapped  # nothing pruned, nothing swapped


def test_shared_module_swapped_everywhere():
    lin = pruned_linear(k=32, n=16)
    model = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)})
    sparsify_(model)
    assert isinstance(model["a"], SparseLinear) and model["a"] is model["b"][0]


# ------------------------------------------------------------------ bad input


def test_failed_sparsify_leaves_the_model_untouched():
    model = pruned_llama(pattern="2:4")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(0.5)[:, 0] = 0  # not 2:4
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(InputError, match=r"layers\.1\.mlp\.down_proj"):
        sparsify_(model, format="2:4")
    assert n_sparse(model) == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_sparsify_frees_each_dense_layer_before_packing_the_next(monkeypatch):
    """Checked first, then packed one layer at a time: when a layer is packed, every layer
    packed before it is already swapped in and its dense module freed (peak memory: the
    dense model plus one packed layer, not plus all of them)."""
    import gc
    import weakref

    model = pruned_llama(pattern="2:4")
    dense = [weakref.ref(m) for m in model.modules() if isinstance(m, nn.Linear)]
    alive_at_pack = []
    original = SparseLinear.from_linear.__func__

    def counting(cls, linear, format="bitmap", mask=None):
        gc.collect()
        alive_at_pack.append(sum(r() is not None for r in dense))
        return original(cls, linear, format, mask)

    monkeypatch.setattr(SparseLinear, "from_linear", classmethod(counting))
    report = sparsify_(model, format="2:4")
    n = len(report.swapped)
    assert n >= 4
    assert alive_at_pack == [len(dense) - i for i in range(n)]


def test_sparsify_refuses_a_meta_model():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(InputError, match=r"model\.layers\.0\..*meta device"):
        sparsify_(model)
    only_mlp = sparsify_(model, filter_fn=lambda m, name: False)  # excluded layers are fine
    assert not only_mlp.swapped


def test_report_of_nothing_swapped_says_so():
    from owl_sparse.nn import sparsify_

    model = tiny_model("llama")  # dense: nothing reaches min_sparsity
    report = sparsify_(model, min_sparsity=0.5)
    assert not report.swapped and "nan" not in str(report)
    assert "no linear layer" in str(report)
