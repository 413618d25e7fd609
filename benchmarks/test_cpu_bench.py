"""CPU benchmarks of the Python side with pytest-benchmark: packing, mask selection, masks
for serving.

Run: ``pytest benchmarks/test_cpu_bench.py`` (``OWL_SPARSE_BENCH_SIZE`` sets the square
weight size, default 2048).  Each benchmark also checks its result, so
``--benchmark-disable`` (one call each, as tests/benchmarks/test_benchmarks.py runs it) is a test.
"""

from __future__ import annotations

import pytest
import torch

from owl_sparse import settings
from owl_sparse.formats import BitmapWeight, Sparse24Weight
from owl_sparse.pruning.masks import select_nm, select_unstructured
from owl_sparse.serve.kv_cache import prefill_inputs

SIZE = settings.get().bench_size


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_select_unstructured_70(benchmark, weight):
    mask = benchmark(select_unstructured, weight.abs(), 0.7)
    assert mask.sum(dim=1).eq(SIZE - round(0.7 * SIZE)).all()


def test_select_2_of_4(benchmark, weight):
    mask = benchmark(select_nm, weight.abs(), 2, 4)
    assert mask.view(SIZE, -1, 4).sum(-1).eq(2).all()


def test_pack_bitmap_70(benchmark, weight):
    mask = select_unstructured(weight.abs(), 0.7)
    packed = benchmark(BitmapWeight.from_dense, weight, mask)
    assert torch.equal(packed.to_dense(), weight * mask)


def test_pack_24(benchmark, weight):
    mask = select_nm(weight.abs(), 2, 4)
    packed = benchmark(Sparse24Weight.from_dense, weight, mask)
    assert torch.equal(packed.to_dense(), weight * mask)


def test_prefill_mask_batch8(benchmark):
    lengths = torch.randint(1, 513, (8,), generator=torch.Generator().manual_seed(1))
    positions, mask = benchmark(prefill_inputs, lengths, 512, 576, torch.float16, "cpu")
    assert mask.shape == (8, 1, 512, 576) and positions.shape == (8, 512)
