"""The value check shared by save and load: finite, and within float16's range in every dtype."""

from __future__ import annotations

import pytest
import torch

from owl_sparse.errors import InputError
from owl_sparse.io import skeleton


def test_check_values_bound_and_finiteness():
    skeleton.check_values("w", torch.tensor([1.0, -65504.0]), "here")
    for t in (torch.tensor([1.0, -70000.0]), torch.tensor([70000.0]).bfloat16()):
        with pytest.raises(InputError, match=r"magnitude 7(\.\d+)?e\+04"):
            skeleton.check_values("w", t, "here")
    with pytest.raises(InputError, match="NaN or Inf"):
        skeleton.check_values("w", torch.tensor([float("inf")]), "here")
