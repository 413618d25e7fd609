"""Fixtures of the serve tests."""

from __future__ import annotations

import pytest
from factories import tiny_model


@pytest.fixture(scope="module")
def llama64():
    # float64 keeps the cached and uncached paths' rounding differences far below the
    # gaps between logits, so token-exact comparison is meaningful.
    return tiny_model("llama").double()
