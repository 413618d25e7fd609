"""The compressed-tensors per-weight layouts (sparse-bitmask, sparse-24-bitmask): bitmask
packing, round trips both ways, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import DTYPES, mask_24, random_mask
from hypothesis import given, settings
from hypothesis import strategies as st

from owl_sparse.errors import InputError
from owl_sparse.formats import (
    BitmapWeight,
    Sparse24Weight,
    from_compressed_tensors,
    to_compressed_tensors,
)
from owl_sparse.formats.compressed_tensors import pack_bitmask


def test_pack_bitmask_matches_numpy():
    m = random_mask(9, 37, 0.5)
    ref = np.packbits(m.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(pack_bitmask(m).numpy(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compressed_tensors_bitmap_round_trip(dtype):
    w = torch.randn(19, 75).to(dtype)
    m = random_mask(19, 75, 0.6)
    m[3] = False
    p = BitmapWeight.from_dense(w, m)
    ct = to_compressed_tensors(p, "model.layers.0.mlp.up_proj.weight")
    pre = "model.layers.0.mlp.up_proj."
    assert set(ct) == {pre + "shape", pre + "compressed", pre + "bitmask", pre + "row_offsets"}
    assert ct[pre + "bitmask"].dtype == torch.uint8 and ct[pre + "row_offsets"].dtype == torch.int64
    assert torch.equal(ct[pre + "compressed"], w[m])  # row-major kept values
    q = from_compressed_tensors(ct, "model.layers.0.mlp.up_proj")
    for a, b in zip(p.state_dict().values(), q.state_dict().values()):
        assert torch.equal(a, b)
    back = to_compressed_tensors(q, "model.layers.0.mlp.up_proj")
    assert all(torch.equal(ct[k], back[k]) for k in ct)


def test_compressed_tensors_24_round_trip():
    w = torch.randn(6, 24).half()
    p = Sparse24Weight.from_dense(w, mask_24(6, 24))
    ct = to_compressed_tensors(p, "l")
    assert set(ct) == {"l.shape", "l.compressed", "l.bitmask"} and ct["l.compressed"].shape == (
        6,
        12,
    )
    assert (pack_bitmask(p.mask()) == ct["l.bitmask"]).all()
    q = from_compressed_tensors(ct, "l")
    assert torch.equal(q.values, p.values) and torch.equal(q.meta, p.meta)
    assert torch.equal(from_compressed_tensors(ct, "l", format="bitmap").to_dense(), p.to_dense())


def test_compressed_tensors_validation():
    p = BitmapWeight.from_dense(torch.randn(5, 20), random_mask(5, 20, 0.5))
    ct = to_compressed_tensors(p, "a")
    with pytest.raises(InputError, match="row_offsets"):
        from_compressed_tensors(dict(ct, **{"a.row_offsets": ct["a.row_offsets"] + 1}), "a")
    with pytest.raises(InputError, match="values but the bitmask keeps"):
        from_compressed_tensors(dict(ct, **{"a.compressed": ct["a.compressed"][:-1]}), "a")
    bits = ct["a.bitmask"].clone()
    bits[0, -1] |= 0x80  # column 23 does not exist
    with pytest.raises(InputError, match="padding bits"):
        from_compressed_tensors(dict(ct, **{"a.bitmask": bits}), "a")
    with pytest.raises(InputError, match="lacks"):
        from_compressed_tensors({"a.shape": ct["a.shape"]}, "a")
    q = to_compressed_tensors(Sparse24Weight.from_dense(torch.randn(2, 8), mask_24(2, 8)), "b")
    with pytest.raises(InputError, match="exactly 2"):
        from_compressed_tensors(
            dict(q, **{"b.bitmask": torch.full_like(q["b.bitmask"], 0xFF)}), "b"
        )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_bitmap_round_trip_property(n, k, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).half()
    m = torch.rand(n, k, generator=g) >= sparsity
    p = BitmapWeight.from_dense(w, m).validate()
    assert torch.equal(p.to_dense(), w * m)
    q = from_compressed_tensors(to_compressed_tensors(p))
    assert torch.equal(q.bitmap, p.bitmap) and torch.equal(q.values, p.values)
