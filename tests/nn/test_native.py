"""native_linears: a model's nn.Linear layers run owl_sparse::dense_linear inside the block,
get their class back after it, and compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from owl_sparse.nn.native import NativeLinear, native_linears
from owl_sparse.ops import cpu


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.proj = nn.Linear(24, 24)
        self.custom = type("MyLinear", (nn.Linear,), {})(24, 24)  # a subclass: left alone
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.custom(torch.relu(self.proj(self.emb(ids))))
        return self.head(h)


def test_swaps_plain_linears_and_restores():
    torch.manual_seed(0)
    model = Tied().bfloat16()
    ids = torch.randint(0, 50, (3, 4))
    with torch.no_grad():
        want = model(ids)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with native_linears(model) as swapped:
            assert swapped == 2
            assert type(model.proj) is NativeLinear and type(model.head) is NativeLinear
            assert type(model.custom).__name__ == "MyLinear"
            assert model.head.weight is model.emb.weight  # tying kept
            with native_linears(model) as inner:
                assert inner == 0
            got = model(ids)
    assert type(model.proj) is nn.Linear and type(model.head) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    ref = want.float()
    assert ((got.float() - ref).abs() / (ref.abs() + 1)).max() <= 2e-2


def test_disabled_and_restored_after_an_error():
    model = Tied()
    with native_linears(model, enabled=False) as swapped:
        assert swapped == 0 and type(model.proj) is nn.Linear
    with pytest.raises(RuntimeError, match="boom"), native_linears(model):
        raise RuntimeError("boom")
    assert type(model.proj) is nn.Linear


@pytest.mark.skipif(not cpu.available(), reason="compiled CPU kernels unavailable")
def test_routes_through_the_op_on_the_cpu_only_for_kernel_dtypes():
    layer = nn.Linear(24, 8)
    calls = []
    with native_linears(layer):
        with torch.autograd.profiler.profile() as prof:
            layer(torch.randn(2, 24))
        calls = [e.name for e in prof.function_events]
        assert any("owl_sparse::dense_linear" in c for c in calls)
        layer.double()
        with torch.autograd.profiler.profile() as prof:
            out = layer(torch.randn(2, 24, dtype=torch.float64))
        assert out.dtype == torch.float64
        assert not any("owl_sparse::dense_linear" in e.name for e in prof.function_events)
