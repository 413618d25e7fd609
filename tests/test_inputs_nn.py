"""Bad inputs to SparseLinear / sparsify_ / the formats / serve, and the derived-tensor
caches' soundness (regressions of the input audit: F7, F8, F9, D4, U1, U3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch import nn

from owl_sparse import ops
from owl_sparse.errors import InputError
from owl_sparse.formats import BitmapWeight, Sparse24Weight, pack
from owl_sparse.formats.mma_layout import sparse24_to_mma
from owl_sparse.nn import SparseLinear, sparsify_
from owl_sparse.ops import cuda as cuda_ext
from owl_sparse.ops import dense as dense_cache
from owl_sparse.serve import generate_ids, sample_next


def pruned_linear(k=64, n=32, pattern="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if pattern == "2:4":
            lin.weight.view(n, k // 4, 4)[..., 2:] = 0
        else:
            lin.weight.mul_(torch.rand(n, k, generator=g) >= 0.6)
    return lin


def pruned_llama(pattern="random", seed=0):
    model = tiny_model("llama", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                if pattern == "2:4":
                    n, k = m.weight.shape
                    m.weight.view(n, k // 4, 4)[..., 2:] = 0
                else:
                    m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= 0.5)
    return model


def n_sparse(model) -> int:
    return sum(isinstance(m, SparseLinear) for m in model.modules())


# ------------------------------------------------------------------ F7: cache soundness
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_inplace_change_under_inference_mode_is_seen(fmt):
    lin = pruned_linear(pattern="2:4" if fmt == "2:4" else "random")
    x = torch.randn(3, 64)
    with torch.inference_mode():
        sl = SparseLinear.from_linear(lin, fmt)
        y0 = sl(x) - sl.bias
        sl.values.mul_(2)
        y1 = sl(x) - sl.bias
    torch.testing.assert_close(y1, 2 * y0)


def test_dense_weight_of_inference_tensors_is_never_stale():
    w = torch.randn(20, 40)
    with torch.inference_mode():
        p = BitmapWeight.from_dense(w, torch.rand(20, 40) > 0.5)
        first = dense_cache.dense_weight(p)
        p.values.mul_(3)
        torch.testing.assert_close(dense_cache.dense_weight(p), 3 * first)
        q = Sparse24Weight.from_dense(torch.randn(8, 16), torch.arange(16).repeat(8, 1) % 4 < 2)
        before = dense_cache.dense_weight(q)
        q.values.neg_()
        torch.testing.assert_close(dense_cache.dense_weight(q), -before)


def test_normal_tensors_changed_inside_inference_mode_are_seen():
    p = BitmapWeight.from_dense(torch.randn(20, 40))
    first = dense_cache.dense_weight(p)
    with torch.inference_mode():
        p.values.mul_(2)  # a normal tensor's version counter still moves here
        torch.testing.assert_close(dense_cache.dense_weight(p), 2 * first)


def test_dense_cache_key_includes_the_weight_shape():
    """The same packed tensors read as a [39, K] weight are not the cached [40, K] one."""
    w = torch.randn(40, 64)
    w[39] = 0  # row 39 empty, so the buffers are also a valid [39, 64] weight
    p = BitmapWeight.from_dense(w)
    assert dense_cache.dense_weight(p).shape == (40, 64)
    q = BitmapWeight(p.bitmap, p.values, p.tile_offsets, 39, 64)
    assert dense_cache.dense_weight(q).shape == (39, 64)


def test_mma_layout_of_inference_tensors_follows_changes():
    mask = torch.zeros(32, 64, 4, dtype=torch.bool)
    mask[..., :2] = True
    with torch.inference_mode():
        p = Sparse24Weight.from_dense(torch.randn(32, 256).half(), mask.view(32, 256))
        vm, _ = cuda_ext.mma_tensors(p)
        p.values.mul_(2)
        vm2, _ = cuda_ext.mma_tensors(p)
        assert torch.equal(vm2, sparse24_to_mma(p.values, p.meta)[0])
        assert torch.equal(vm2, 2 * vm)


def test_derived_cache_serves_warm_entries_to_capture_but_never_inference_tensors():
    from owl_sparse.ops.cache import DerivedCache

    cache = DerivedCache("test")
    calls = []

    def compute(t):
        calls.append(1)
        return t.sum().item()

    t = torch.arange(6.0)
    assert cache.get("s", (t,), compute, may_compute=False) is None  # cold: capture gets None
    assert cache.get("s", (t,), compute) == 15.0
    assert cache.get("s", (t,), compute, may_compute=False) == 15.0  # warm: served
    assert len(calls) == 1 and len(cache) == 1
    t.add_(1)
    assert cache.get("s", (t,), compute, may_compute=False) is None  # stale: not served
    assert cache.get("s", (t,), compute) == 21.0
    with torch.inference_mode():
        u = torch.arange(6.0)
        assert cache.get("s", (u,), compute) == 15.0
        u.add_(1)
        assert cache.get("s", (u,), compute) == 21.0
        assert cache.get("s", (u,), compute, may_compute=False) is None
    assert len(calls) == 4 and len(cache) == 1  # the inference tensor was never stored


# ------------------------------------------------------------------ F8: sparsify_ masks
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


def test_sparsify_mask_of_a_shared_module_by_any_name():
    lin = pruned_linear()
    model = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)})
    mask = torch.rand(32, 64) >= 0.5
    report = sparsify_(model, masks={"b.0": mask})
    assert len(report.swapped) == 1 and model["a"] is model["b"][0]
    assert torch.equal(model["a"].dense_weight() != 0, mask & (lin.weight != 0))


# ------------------------------------------------------------------ U3: all or nothing
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


# ------------------------------------------------------------------ D4: meta / non-tensor
@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "auto"])
def test_packing_a_meta_weight_asks_for_real_weights(fmt):
    lin = nn.Linear(64, 32, device="meta")
    with pytest.raises(InputError, match="meta device; load real weights before packing"):
        SparseLinear.from_linear(lin, fmt)
    with pytest.raises(InputError, match="meta device"):
        pack(torch.empty(8, 16, device="meta"), None, fmt)
    w = torch.randn(8, 16)
    with pytest.raises(InputError, match="mask is on the meta device"):
        pack(w, torch.empty(8, 16, dtype=torch.bool, device="meta"), fmt)


def test_sparsify_refuses_a_meta_model():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(InputError, match=r"model\.layers\.0\..*meta device"):
        sparsify_(model)
    only_mlp = sparsify_(model, filter_fn=lambda m, name: False)  # excluded layers are fine
    assert not only_mlp.swapped


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_forward_with_a_non_tensor_is_a_clear_error(fmt):
    sl = SparseLinear.from_linear(pruned_linear(pattern="2:4" if fmt == "2:4" else "random"), fmt)
    with pytest.raises(InputError, match="x must be a torch.Tensor, got list"):
        sl([0.0] * 64)
    with pytest.raises(InputError, match="x must be a torch.Tensor, got tuple"):
        ops.linear((0.0,) * 64, sl.packed, sl.bias)


# ------------------------------------------------------------------ F9 / U1: serve
@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").double()


PROMPT = [[5, 6, 7, 8]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(temperature="0.5"), "temperature must be a finite number"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_k=True), "top_k must be an integer"),
        (dict(batch_size=True), "batch_size must be an integer"),
        (dict(batch_size=1.5), "batch_size must be an integer"),
        (dict(top_p=True), "top_p must be a number"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(eos_token_id="x"), "eos_token_id must be an integer, got 'x'"),
        (dict(eos_token_id=[2, 3.5]), "eos_token_id must be an integer, got 3.5"),
        (dict(pad_token_id=1.5), "pad_token_id must be an integer"),
    ],
)
def test_bad_sampling_settings(llama, kwargs, message):
    with pytest.raises(InputError, match=message):
        generate_ids(llama, PROMPT, **kwargs)


def test_sample_next_refuses_nan_temperature():
    with pytest.raises(InputError, match="temperature"):
        sample_next(torch.randn(2, 10), temperature=float("nan"))


def test_numpy_scalars_are_accepted(llama):
    ref = generate_ids(llama, PROMPT * 2, max_new_tokens=3, top_k=5, batch_size=1, seed=1)
    out = generate_ids(
        llama,
        [[np.int64(t) for t in PROMPT[0]]] * 2,
        max_new_tokens=np.int64(3),
        temperature=np.float32(0.0),
        top_k=np.int32(5),
        top_p=np.float64(1.0),
        batch_size=np.int64(1),
        seed=np.int64(1),
    )
    assert out.token_ids == ref.token_ids and out.batch_size == 1
    assert all(type(t) is int for row in out.token_ids for t in row)


@pytest.mark.parametrize(
    "seqs, message",
    [
        ([[1.0, 2.5]], r"prompt 0, position 0: token id must be an integer, got 1\.0"),
        ([[1, 2], [3, True]], r"prompt 1, position 1: token id must be an integer, got True"),
        ([[1, "2"]], "token id must be an integer"),
        ([5], "prompt 0 must be a list of token ids"),
        ("abc", "seqs must be a list of token id lists, got str"),
        ([torch.tensor([1.0, 2.0])], "token id must be an integer"),
    ],
)
def test_token_ids_must_be_integers(llama, seqs, message):
    with pytest.raises(InputError, match=message):
        generate_ids(llama, seqs, max_new_tokens=2)


def test_integer_tensor_prompts_are_accepted(llama):
    ref = generate_ids(llama, PROMPT, max_new_tokens=2)
    out = generate_ids(llama, torch.tensor(PROMPT), max_new_tokens=2)
    assert out.token_ids == ref.token_ids
