"""owl_sparse::dense_linear on the CPU (the streaming kernel for nn.Linear weights) against an
fp64 reference on every instruction set this machine runs, both backends, awkward shapes,
outputs poisoned (NaN) before each run; its dispatch, errors, autograd and torch.compile."""

from __future__ import annotations

import pytest
import torch

from owl_sparse.ops import cpu

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason="compiled CPU kernels unavailable"),
    pytest.mark.usefixtures("poisoned_cpu_outputs"),
]

ISAS = cpu.supported_isas() if cpu.available() else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# (N, K): one row, one column, K below / not a multiple of 32, odd N, rows over 16.
SHAPES = [(1, 1), (1, 8), (5, 31), (17, 33), (20, 136), (33, 300), (48, 64)]
TOKENS = [1, 2, 3, 5, 9, 16, 17, 40]


def rel_err(y, ref):
    return ((y.double() - ref).abs() / (ref.abs() + 1)).max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_fp64_reference(isa, dtype):
    gen = torch.Generator().manual_seed(hash((isa, str(dtype))) % 2**31)
    with cpu.use_isa(isa):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=gen).to(dtype)
            w[0] = 0  # an all-zero row
            for tokens in TOKENS:
                x = torch.randn(tokens, k, generator=gen).to(dtype)
                bias = torch.randn(n, generator=gen).to(dtype) if tokens % 2 else None
                ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
                for backend in ("cpu_kernel", "torch"):
                    with cpu.force_dense(backend):
                        y = torch.ops.owl_sparse.dense_linear(x, w, bias)
                    assert y.shape == (tokens, n) and y.dtype == dtype
                    assert rel_err(y, ref) <= TOL[dtype], (isa, backend, n, k, tokens)


def test_batched_non_contiguous_and_empty():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 136, generator=gen).bfloat16()
    x = torch.randn(3, 4, 272, generator=gen).bfloat16()[..., ::2]
    assert not x.is_contiguous()
    with cpu.force_dense("cpu_kernel"):
        y = torch.ops.owl_sparse.dense_linear(x, w, None)
        assert y.shape == (3, 4, 40)
        assert rel_err(y, x.double() @ w.double().T) <= TOL[torch.bfloat16]
        wt = torch.randn(136, 40, generator=gen).bfloat16().t()  # a transposed weight
        ref = x.double() @ wt.double().T
        assert rel_err(torch.ops.owl_sparse.dense_linear(x, wt, None), ref) <= 1.6e-2
        assert torch.ops.owl_sparse.dense_linear(torch.randn(0, 136).bfloat16(), w, None).shape == (
            0,
            40,
        )


def test_dispatch_default_rule_and_forcing():
    # a shape no table entry is near: the kernel up to 2 tokens, torch's GEMM beyond
    assert cpu.choose("dense", torch.bfloat16, 64, 32, 2, 0.0)[0] == "cpu_kernel"
    assert cpu.choose("dense", torch.bfloat16, 64, 32, 3, 0.0)[0] == "torch"
    assert cpu.choose("dense", torch.bfloat16, 64, 256, 64, 0.0)[0] == "torch"
    with cpu.force_dense("torch"):
        assert cpu.choose("dense", torch.bfloat16, 64, 256, 1, 0.0) == ("torch", "forced")
    with pytest.raises(Exception, match="no CPU backend"):
        cpu.force("dense", "cpu_sparse")


def test_bad_input_is_named():
    w = torch.randn(20, 136)
    with pytest.raises(ValueError, match=r"x has shape \[2, 135\]"):
        torch.ops.owl_sparse.dense_linear(torch.randn(2, 135), w, None)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.owl_sparse.dense_linear(torch.randn(2, 136).bfloat16(), w, None)
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        torch.ops.owl_sparse.dense_linear(torch.randn(2, 136), w, torch.randn(3))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        torch.ops.owl_sparse.dense_linear(torch.randn(2, 136).double(), w.double(), None)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\]"):
        torch.ops.owl_sparse.dense_linear(torch.randn(2, 136), torch.randn(136), None)


def test_opcheck_autograd_and_compile():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(33, 136, generator=gen, requires_grad=True)
    b = torch.randn(33, generator=gen, requires_grad=True)
    x = torch.randn(5, 136, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.owl_sparse.dense_linear.default, (x, w, b))
    y = torch.ops.owl_sparse.dense_linear(x, w, b)
    y.square().sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(x2, w2, b2).square().sum().backward()
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        f = torch.compile(
            lambda t: torch.ops.owl_sparse.dense_linear(t, w, b),
            fullgraph=True,
            backend="aot_eager",
        )
        ref = x.double() @ w.double().T + b.double()
        assert rel_err(f(x), ref) <= TOL[torch.float32]
