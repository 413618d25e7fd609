"""The CPU ops' C shims (csrc/cpu/register.cpp): a compiled CPU graph written by inductor's
C++ wrapper calls them directly instead of through the dispatcher, with the same results."""

from __future__ import annotations

import ctypes
import json

import pytest
import torch
from torch._inductor.utils import run_and_get_cpp_code

from owl_sparse.formats.bitmap import BitmapWeight
from owl_sparse.formats.sparse24 import Sparse24Weight
from owl_sparse.ops import cpu
from owl_sparse.serve import kv_cache

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels are not built")

SHIM_OPTION = "aot_inductor.custom_ops_to_c_shims"


def test_every_op_has_a_shim_its_graphs_can_resolve():
    shims = cpu.c_shims()
    assert {op.name() for op in shims} == {
        "owl_sparse::bitmap_linear",
        "owl_sparse::bitmap_linear_group",
        "owl_sparse::sparse24_linear",
        "owl_sparse::dense_linear",
    }
    everywhere = ctypes.CDLL(None)  # the global scope a graph's library resolves against
    for op, (decl,) in shims.items():
        name = decl.split("(")[0].split()[-1]
        assert name == f"aoti_torch_cpu_{op.name().split('::')[1]}"
        assert getattr(everywhere, name)
    # the status the benchmarks write into their JSON names them (and stays JSON)
    status = json.loads(json.dumps(cpu.status()))
    assert status["c_shims"] == [
        "bitmap_linear",
        "bitmap_linear_group",
        "dense_linear",
        "sparse24_linear",
    ]


def test_compile_options_give_the_shims_to_cpu_graphs_only(monkeypatch):
    assert SHIM_OPTION in kv_cache.compile_options(torch.device("cpu"))
    assert SHIM_OPTION not in kv_cache.compile_options(torch.device("cuda"))
    assert SHIM_OPTION not in kv_cache.compile_options()
    monkeypatch.setitem(kv_cache.COMPILE_OPTIONS, "cpp_wrapper", False)  # a Python wrapper
    assert SHIM_OPTION not in kv_cache.compile_options(torch.device("cpu"))


GROUP_OPTION = "post_grad_custom_pre_pass"


def test_compile_options_group_layers_on_cpu_unless_switched_off(monkeypatch):
    from owl_sparse import settings

    assert GROUP_OPTION in kv_cache.compile_options(torch.device("cpu"))
    assert GROUP_OPTION not in kv_cache.compile_options(torch.device("cuda"))
    monkeypatch.setenv("OWL_SPARSE_CPU_GROUP_LAYERS", "0")
    settings.get.cache_clear()
    try:
        assert GROUP_OPTION not in kv_cache.compile_options(torch.device("cpu"))
    finally:
        monkeypatch.delenv("OWL_SPARSE_CPU_GROUP_LAYERS")
        settings.get.cache_clear()


@pytest.mark.parametrize("tokens", [1, 3])
def test_layers_reading_one_input_become_one_grouped_call(tokens):
    """q/k/v-like layers on one x run as one bitmap_linear_group call through its shim; a
    layer with a bias, and one on another input, stay single calls; results bit for bit."""
    gen = torch.Generator().manual_seed(tokens)
    k = 200

    def packed(n, kk=k):
        w = torch.randn(n, kk, generator=gen).bfloat16()
        return BitmapWeight.from_dense(w, torch.rand(n, kk, generator=gen) > 0.6)

    ws = [packed(n) for n in (48, 16, 16, 40)] + [packed(24, 120)]
    bias = torch.randn(40, generator=gen).bfloat16()

    def lin(x, p, b=None):
        return torch.ops.owl_sparse.bitmap_linear(
            x, p.bitmap, p.values, p.tile_offsets, b, p.N, p.K
        )

    def f(x):
        q, kk, v = lin(x, ws[0]), lin(x, ws[1]), lin(x, ws[2])
        b = lin(x, ws[3], bias)
        h = torch.cat([q * 2, kk + 1, v - 1, b], dim=-1)
        return lin(torch.relu(h), ws[4])

    compiled = torch.compile(
        f, dynamic=False, fullgraph=True, options=kv_cache.compile_options(torch.device("cpu"))
    )
    x = torch.randn(2, tokens, k, generator=gen).bfloat16()
    with torch._inductor.config.patch(fx_graph_cache=False):
        got, code = run_and_get_cpp_code(compiled, x)
    assert code.count("aoti_torch_cpu_bitmap_linear_group(") == 2  # its declaration, one call
    assert code.count("aoti_torch_cpu_bitmap_linear(") == 3  # declaration, biased, other input
    assert torch.equal(got, f(x))


def _layer(fmt, gen):
    n, k = 40, 200
    w = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    if fmt == "bitmap":
        p = BitmapWeight.from_dense(w, torch.rand(n, k, generator=gen) > 0.7)
        return (
            k,
            "bitmap_linear",
            lambda x: torch.ops.owl_sparse.bitmap_linear(
                x, p.bitmap, p.values, p.tile_offsets, bias, n, k
            ),
        )
    if fmt == "2:4":
        keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
        p = Sparse24Weight.from_dense(w, mask.view(n, k))
        return (
            k,
            "sparse24_linear",
            lambda x: torch.ops.owl_sparse.sparse24_linear(x, p.values, p.meta, None),
        )
    return k, "dense_linear", lambda x: torch.ops.owl_sparse.dense_linear(x, w, bias)


@pytest.mark.parametrize("fmt, tokens", [("bitmap", 1), ("2:4", 3), ("dense", 2)])
def test_a_compiled_graph_calls_the_shim_and_gets_the_ops_answer(fmt, tokens):
    gen = torch.Generator().manual_seed(len(fmt) + tokens)
    k, op, layer = _layer(fmt, gen)

    def f(x):
        return torch.relu(layer(x)) * 2

    compiled = torch.compile(
        f,
        dynamic=False,
        fullgraph=True,
        options=kv_cache.compile_options(torch.device("cpu")),
    )
    x = torch.randn(tokens, k, generator=gen).bfloat16()
    with torch._inductor.config.patch(fx_graph_cache=False):
        got, code = run_and_get_cpp_code(compiled, x)
    assert f"aoti_torch_cpu_{op}(" in code
    assert f'"owl_sparse::{op}"' not in code  # not through the dispatcher
    assert torch.equal(got, f(x))
    x2 = torch.randn(tokens, k, generator=gen).bfloat16()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y2 = compiled(x2)
    assert torch.equal(y2, f(x2))
    # the profiler still sees the op (benchmarks split a decode step's time by op name)
    assert f"owl_sparse::{op}" in {e.key for e in prof.key_averages()}
