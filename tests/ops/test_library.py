"""The custom ops: opcheck, reference semantics, fake implementations, errors, autograd."""

from __future__ import annotations

import pytest
import torch
from factories import bitmap_weight, sparse24_weight
from factories import small_pruned_linear as pruned_linear
from torch._subclasses.fake_tensor import FakeTensorMode

from owl_sparse import ops
from owl_sparse.errors import InputError
from owl_sparse.formats import BitmapWeight
from owl_sparse.nn import SparseLinear


def op_args(packed, x, bias):
    if isinstance(packed, BitmapWeight):
        op = torch.ops.owl_sparse.bitmap_linear.default
        return op, (x, packed.bitmap, packed.values, packed.tile_offsets, bias, packed.N, packed.K)
    return torch.ops.owl_sparse.sparse24_linear.default, (x, packed.values, packed.meta, bias)


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
@pytest.mark.parametrize("x_shape", [(136,), (3, 136), (2, 5, 136)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(make, x_shape, with_bias, grad):
    _, packed = make()
    x = torch.randn(*x_shape, requires_grad=grad)
    bias = torch.randn(packed.N, requires_grad=grad) if with_bias else None
    op, args = op_args(packed, x, bias)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("x_shape", [(136,), (2, 5, 136)])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_bitmap_group(x_shape, grad):
    ws = [bitmap_weight(n=20, seed=0)[1], bitmap_weight(n=33, seed=1)[1]]
    x = torch.randn(*x_shape, requires_grad=grad)
    args = (
        x,
        [p.bitmap for p in ws],
        [p.values for p in ws],
        [p.tile_offsets for p in ws],
        [p.N for p in ws],
        ws[0].K,
    )
    torch.library.opcheck(torch.ops.owl_sparse.bitmap_linear_group.default, args)


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_op_is_dense_matmul_in_fp32(make, dtype):
    """The CPU op (compiled kernels, else the Python reference) is x @ W^T + b accumulated in
    fp32 and rounded once to x's dtype: at most one rounding of the output away from it."""
    dense, packed = make(dtype=dtype)
    x = torch.randn(4, 7, packed.K).to(dtype)
    b = torch.randn(packed.N).to(dtype)
    y = ops.linear(x, packed, b)
    ref = x.float() @ dense.float().t() + b.float()
    assert y.dtype == dtype and y.shape == (4, 7, packed.N)
    ulp = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((y.float() - ref).abs() <= ulp * ref.abs() + 1e-5).all()


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
def test_zero_tokens_and_autograd(make):
    dense, packed = make()
    assert ops.linear(torch.randn(0, packed.K), packed).shape == (0, packed.N)
    x = torch.randn(3, packed.K, requires_grad=True)
    b = torch.randn(packed.N, requires_grad=True)
    (ops.linear(x, packed, b) ** 2).sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (torch.nn.functional.linear(x2, dense, b2) ** 2).sum().backward()
    # fp32 sums in another order (the kernels accumulate 16 lanes at a time)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [bitmap_weight, sparse24_weight])
def test_bad_activation_errors(make):
    _, packed = make()
    with pytest.raises(InputError, match=r"shape \[3, 135\].*last dim must be 136"):
        ops.linear(torch.randn(3, 135), packed)
    with pytest.raises(InputError, match="dtype"):
        ops.linear(torch.randn(3, 136, dtype=torch.float64), packed)
    with pytest.raises(InputError, match=r"bias must be \[20\]"):
        ops.linear(torch.randn(3, 136), packed, torch.randn(21))
    with pytest.raises(InputError, match="expected BitmapWeight"):
        ops.linear(torch.randn(3, 136), torch.randn(20, 136))


def test_op_rejects_malformed_packed_tensors():
    # the Python reference raises InputError, the compiled kernels its base, ValueError
    _, p = bitmap_weight()
    x = torch.randn(2, 136)
    with pytest.raises(ValueError, match="bitmap.bitmap"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap[:, :2].contiguous(), p.values, p.tile_offsets, None, 20, 136
        )
    with pytest.raises(ValueError, match="int32"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values, p.tile_offsets.long(), None, 20, 136
        )
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values[::2], p.tile_offsets, None, 20, 136
        )
    _, q = sparse24_weight()
    with pytest.raises(ValueError, match="meta"):
        torch.ops.owl_sparse.sparse24_linear(x, q.values, q.meta[:, :3].contiguous(), None)


def test_fake_impl_shapes_and_checks():
    _, p = bitmap_weight()
    _, q = sparse24_weight()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 136))
        pb = [mode.from_tensor(t) for t in (p.bitmap, p.values, p.tile_offsets)]
        y = torch.ops.owl_sparse.bitmap_linear(x, *pb, None, 20, 136)
        assert y.shape == (2, 3, 20)
        y24 = torch.ops.owl_sparse.sparse24_linear(
            x, mode.from_tensor(q.values), mode.from_tensor(q.meta), None
        )
        assert y24.shape == (2, 3, 20)
        with pytest.raises(RuntimeError, match="needs last dim 136"):
            torch.ops.owl_sparse.bitmap_linear(
                mode.from_tensor(torch.randn(2, 135)), *pb, None, 20, 136
            )


def test_compile_fullgraph_cpu():
    dense, packed = bitmap_weight()
    _, q = sparse24_weight()

    def f(x):
        return ops.linear(x, packed) + ops.linear(x, q)

    x = torch.randn(5, 136)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_forward_with_a_non_tensor_is_a_clear_error(fmt):
    sl = SparseLinear.from_linear(pruned_linear(pattern="2:4" if fmt == "2:4" else "random"), fmt)
    with pytest.raises(InputError, match="x must be a torch.Tensor, got list"):
        sl([0.0] * 64)
    with pytest.raises(InputError, match="x must be a torch.Tensor, got tuple"):
        ops.linear((0.0,) * 64, sl.packed, sl.bias)


@pytest.mark.skipif(not ops.cpu.available(), reason="compiled CPU kernels unavailable")
@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "dense"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_cpu_outputs_have_the_fake_implementations_strides(fmt, tokens):
    """The compiled decode step runs without inductor's size asserts (serve.kv_cache
    COMPILE_OPTIONS): it relies on every CPU backend returning the layout the fake
    implementation promises, for contiguous and strided inputs alike."""
    if fmt == "dense":
        dense = torch.randn(24, 136)
        op, args = torch.ops.owl_sparse.dense_linear.default, (dense, torch.randn(24))
        backends, force = ops.cpu.DENSE_BACKENDS, ops.cpu.force_dense
    else:
        _, packed = (bitmap_weight if fmt == "bitmap" else sparse24_weight)()
        op, rest = op_args(packed, None, torch.randn(packed.N))
        args = rest[1:]
        backends = ops.cpu.BACKENDS
        force = lambda name: ops.dispatch.force_backend(fmt, name)  # noqa: E731
    k = 136
    inputs = [
        torch.randn(2, tokens, k),
        torch.randn(tokens, 2, k).transpose(0, 1),  # batch-strided
        torch.randn(2, tokens, 2 * k)[..., ::2],  # strided last dim
    ]
    for name in backends:
        for x in inputs:
            with force(name):
                real = op(x, *args)
            with FakeTensorMode() as mode:
                fake = op(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in (x, *args)))
            assert real.shape == fake.shape and real.stride() == fake.stride(), (name, x.stride())
