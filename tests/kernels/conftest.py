"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ext():
    from owl_sparse.ops import cuda as cuda_ext

    assert cuda_ext.load(), f"CUDA extension failed to load: {cuda_ext.status()}"
    return cuda_ext


@pytest.fixture
def poisoned_cpu_outputs():
    """The CPU kernels' outputs start as NaN inside the test (a row they skip shows)."""
    import torch

    torch.ops.owl_sparse_cpu.set_poison(True)
    yield
    torch.ops.owl_sparse_cpu.set_poison(False)
