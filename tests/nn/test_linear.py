"""SparseLinear: equivalence with nn.Linear, state dicts, compile, GPU paths, meta weights."""

from __future__ import annotations

import pytest
import torch
from factories import pruned_linear
from torch import nn

from owl_sparse.errors import InputError
from owl_sparse.formats import pack
from owl_sparse.nn import SparseLinear
from owl_sparse.ops import dispatch

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


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


def test_compile_fullgraph_cpu():
    sl = SparseLinear.from_linear(pruned_linear())
    x = torch.randn(3, 136)
    compiled = torch.compile(sl, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sl(x))


# ------------------------------------------------------------------ bad input


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
