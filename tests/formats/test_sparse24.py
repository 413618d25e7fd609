"""The 2:4 format: exact round trips, the documented layout, size, errors; pack's "auto"."""

from __future__ import annotations

import pytest
import torch
from factories import DTYPES, mask_24

from owl_sparse.errors import InputError
from owl_sparse.formats import (
    BitmapWeight,
    Sparse24Weight,
    is_24_mask,
    pack,
)


def test_sparse24_size():
    p = Sparse24Weight.from_dense(torch.randn(64, 512).half(), mask_24(64, 512, drop=0.0))
    assert p.nbytes / (64 * 512) <= 1.13


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (3, 12), (16, 128), (7, 260)])
def test_sparse24_round_trip_exact(dtype, shape):
    w = torch.randn(*shape).to(dtype)
    m = mask_24(*shape)
    p = Sparse24Weight.from_dense(w, m).validate()
    assert torch.equal(p.to_dense(), w * m)
    assert p.values.shape == (shape[0], shape[1] // 2) and p.meta.shape == (
        shape[0],
        -(-shape[1] // 8),
    )
    assert (p.mask() | ~m).all()  # stored positions cover the kept ones
    q = Sparse24Weight.from_state_dict(p.state_dict("x."), "x.")
    assert torch.equal(q.values, p.values) and torch.equal(q.meta, p.meta)


def test_sparse24_layout_matches_spec():
    # one row, K = 12 (3 groups; K % 8 == 4 leaves a padding nibble)
    w = torch.arange(1, 13, dtype=torch.float32).view(1, 12)
    m = torch.tensor([[0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    p = Sparse24Weight.from_dense(w, m)
    # group 0 keeps (1, 3); group 1 keeps 0 and is filled at 1; group 2 empty -> (0, 1)
    assert p.values.tolist() == [[2.0, 4.0, 5.0, 0.0, 0.0, 0.0]]
    nib = [1 | 3 << 2, 0 | 1 << 2, 0 | 1 << 2, 0b0100]
    assert p.meta.tolist() == [[nib[0] | nib[1] << 4, nib[2] | nib[3] << 4]]


def test_sparse24_errors_name_the_problem():
    with pytest.raises(InputError, match="K=6"):
        Sparse24Weight.from_dense(torch.randn(2, 6))
    m = mask_24(4, 16)
    m[2, 8:11] = True
    with pytest.raises(InputError, match=r"row 2, group 2 \(columns 8..11\)"):
        Sparse24Weight.from_dense(torch.randn(4, 16), m)
    p = Sparse24Weight.from_dense(torch.randn(2, 12), mask_24(2, 12))
    sd = p.state_dict()
    bad = dict(sd, meta=torch.full_like(sd["meta"], 0b00010001))  # idx (1, 0): not increasing
    with pytest.raises(InputError, match="strictly increasing"):
        Sparse24Weight.from_state_dict(bad)
    pad = sd["meta"].clone()
    pad[:, -1] = (pad[:, -1] & 0xF) | 0b1110 << 4
    with pytest.raises(InputError, match="padding nibble"):
        Sparse24Weight.from_state_dict(dict(sd, meta=pad))
    with pytest.raises(InputError, match="shape"):
        Sparse24Weight.from_state_dict(dict(sd, shape=torch.tensor([2, 16])))
    with pytest.raises(InputError, match="uint8"):
        Sparse24Weight(p.values, p.meta.to(torch.int8))


def test_pack_auto_and_is_24_mask():
    w = torch.randn(8, 16)
    m24 = mask_24(8, 16)
    assert is_24_mask(m24) and not is_24_mask(torch.ones(8, 16, dtype=torch.bool))
    assert isinstance(pack(w, m24, "auto"), Sparse24Weight)
    assert isinstance(pack(w, None, "auto"), BitmapWeight)
    with pytest.raises(InputError, match="unknown sparse format"):
        pack(w, None, "csr")
