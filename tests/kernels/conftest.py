"""Fixtures of the CUDA kernel tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ext():
    from owl_sparse.ops import cuda as cuda_ext

    assert cuda_ext.load(), f"CUDA extension failed to load: {cuda_ext.status()}"
    return cuda_ext
