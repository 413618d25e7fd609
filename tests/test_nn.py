"""SparseLinear and sparsify_: equivalence with nn.Linear, state dicts, model swaps, GPU paths."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from owl_sparse.errors import InputError
from owl_sparse.nn import SparseLinear, SparsifyReport, sparsify_
from owl_sparse.ops import dispatch

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def pruned_linear(k=136, n=40, sparsity=0.6, bias=True, pattern="random", seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        if pattern == "2:4":
            m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
            m.scatter_(-1, torch.rand(n, k // 4, 4).argsort(-1)[..., :2], True)
            lin.weight *= m.view(n, k)
        else:
            lin.weight *= torch.rand(n, k) >= sparsity
    return lin


@pytest.mark.parametrize(
    "fmt,pattern", [("bitmap", "random"), ("2:4", "2:4"), ("auto", "2:4"), ("auto", "random")]
)
@pytest.mark.parametrize("x_shape", [(136,), (3, 136), (2, 5, 136)])
def test_matches_linear_fp32(fmt, pattern, x_shape):
    lin = pruned_linear(pattern=pattern)
    sl = SparseLinear.from_linear(lin, format=fmt)
    expected = "2:4" if pattern == "2:4" and fmt != "bitmap" else "bitmap"
    assert sl.format == expected
    x = torch.randn(*x_shape)
    torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(sl.dense_weight(), lin.weight.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_half_precision(dtype, fmt):
    lin = pruned_linear(pattern="2:4" if fmt == "2:4" else "random")
    sl = SparseLinear.from_linear(lin, format=fmt).to(dtype)
    assert sl.values.dtype == dtype and sl.bias.dtype == dtype
    assert sl.values.dtype == dtype and (sl.format != "bitmap" or sl.bitmap.dtype == torch.int32)
    x = torch.randn(4, 136)
    ref = (
        x.to(dtype).float() @ lin.weight.detach().to(dtype).float().t()
        + lin.bias.detach().to(dtype).float()
    ).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(sl(x.to(dtype)), ref, rtol=rtol, atol=atol)


def test_no_dense_weight_attribute_and_repr():
    sl = SparseLinear.from_linear(pruned_linear(sparsity=0.75))
    assert not hasattr(sl, "weight")
    with pytest.raises(AttributeError, match="dense_weight"):
        sl.weight  # noqa: B018
    assert sl.in_features == 136 and sl.out_features == 40
    text = repr(sl)
    assert "in_features=136" in text and "out_features=40" in text and "format=bitmap" in text
    assert f"sparsity={sl.sparsity:.3f}" in text and abs(sl.sparsity - 0.75) < 0.05
    assert not any(p.dim() == 2 for p in sl.parameters())  # only the bias is a parameter
    assert sl.nbytes < 136 * 40 * 4


def test_mask_keeps_zero_values_and_bad_mask():
    lin = pruned_linear(sparsity=0.0)
    mask = torch.rand(40, 136) >= 0.5
    sl = SparseLinear.from_linear(lin, mask=mask)
    assert torch.equal(sl.dense_weight(), lin.weight.detach() * mask)
    with pytest.raises(InputError, match="mask shape"):
        SparseLinear.from_linear(lin, mask=mask[:, :100])
    with pytest.raises(InputError, match="not 2:4"):
        SparseLinear.from_linear(pruned_linear(sparsity=0.1), format="2:4")
    with pytest.raises(InputError, match="nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_state_dict_round_trip_with_different_nnz(fmt):
    pattern = "2:4" if fmt == "2:4" else "random"
    a = SparseLinear.from_linear(pruned_linear(pattern=pattern, sparsity=0.7, seed=1), fmt)
    b = SparseLinear.from_linear(pruned_linear(pattern=pattern, sparsity=0.3, seed=2), fmt)
    sd = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and "shape" in sd
    b.load_state_dict(sd)
    x = torch.randn(3, 136)
    torch.testing.assert_close(b(x), a(x))
    sd["values"].zero_()  # b holds its own copy
    torch.testing.assert_close(
        b(x), SparseLinear.from_linear(pruned_linear(pattern=pattern, sparsity=0.7, seed=1), fmt)(x)
    )


def test_load_state_dict_rejects_corrupt_and_mismatched():
    a = SparseLinear.from_linear(pruned_linear())
    sd = a.state_dict()
    bad = dict(sd, tile_offsets=sd["tile_offsets"] + 1)
    with pytest.raises(RuntimeError, match="invalid packed weight"):
        SparseLinear.from_linear(pruned_linear()).load_state_dict(bad)
    other = SparseLinear.from_linear(pruned_linear(k=256))
    with pytest.raises(RuntimeError, match=r"packed weight is \[40, 136\]"):
        other.load_state_dict(sd)


# ---------------------------------------------------------------------------- sparsify_
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


def test_sparsify_uses_given_masks():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = {"0": torch.rand(32, 64) >= 0.5}
    report = sparsify_(model, masks=masks)
    assert [s.name for s in report.swapped] == ["0"]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
    assert model[0].sparsity == pytest.approx(1 - masks["0"].float().mean().item())


def test_shared_module_swapped_everywhere():
    lin = pruned_linear(k=32, n=16)
    model = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)})
    sparsify_(model)
    assert isinstance(model["a"], SparseLinear) and model["a"] is model["b"][0]


def test_compile_fullgraph_cpu():
    sl = SparseLinear.from_linear(pruned_linear())
    x = torch.randn(3, 136)
    compiled = torch.compile(sl, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sl(x))


# ---------------------------------------------------------------------------- GPU only
GPU_BACKENDS = [("bitmap", b) for b in ("dense", "triton_gemv", "triton_mm")] + [
    ("2:4", b) for b in ("dense", "triton_gemv")
]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_gpu_forward_every_backend(fmt, backend, dtype, tokens):
    lin = pruned_linear(k=520, n=300, sparsity=0.7, pattern="2:4" if fmt == "2:4" else "random")
    sl = SparseLinear.from_linear(lin, fmt).to("cuda", dtype)
    x = torch.randn(2, tokens, 520, device="cuda", dtype=dtype)
    ref = (
        x.float() @ lin.weight.detach().cuda().to(dtype).float().t()
        + lin.bias.detach().cuda().to(dtype).float()
    ).to(dtype)
    with dispatch.force_backend(fmt, backend):
        y = sl(x)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol * 10)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_gpu_compile_fullgraph_and_cuda_graph(fmt):
    lin = pruned_linear(k=512, n=256, sparsity=0.7, pattern="2:4" if fmt == "2:4" else "random")
    sl = SparseLinear.from_linear(lin, fmt).to("cuda", torch.float16)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    eager = sl(x)  # also warms up autotuning and the dense cache before capture
    compiled = torch.compile(sl, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sl(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        static_y = sl(static_x)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, sl(new_x))
