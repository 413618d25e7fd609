"""The bitmap format: exact round trips, the documented layout, sizes, state dicts, validation."""

from __future__ import annotations

import pytest
import torch
from factories import DTYPES, random_mask

from owl_sparse.errors import InputError
from owl_sparse.formats import (
    VALUES_PAD,
    BitmapWeight,
    from_state_dict,
)

SHAPES = [(1, 1), (1, 4), (16, 128), (17, 129), (33, 300), (5, 1000)]


def decode_element(p: BitmapWeight, r: int, c: int) -> float:
    """Decode one element by the formula of the layout spec (independent of to_dense)."""
    kp = p.padded_shape[1]
    words = p.bitmap.to(torch.int64) & 0xFFFFFFFF
    t = (r // 16) * (kp // 128) + c // 128
    rank = int(p.tile_offsets[t])
    for rr in range(r - r % 16, r + 1):  # earlier words of the tile, row-major
        for w in range((c // 128) * 4, (c // 128) * 4 + 4):
            if rr == r and w >= c // 32:
                break
            rank += bin(int(words[rr, w])).count("1")
    word = int(words[r, c // 32])
    rank += bin(word & ((1 << (c % 32)) - 1)).count("1")
    return float(p.values[rank]) if word >> (c % 32) & 1 else 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 1.0])
def test_bitmap_round_trip_exact(dtype, shape, sparsity):
    w = torch.randn(*shape).to(dtype)
    m = random_mask(*shape, sparsity)
    p = BitmapWeight.from_dense(w, m).validate()
    assert torch.equal(p.to_dense(), w * m)
    assert torch.equal(p.mask(), m)
    assert p.nnz == int(m.sum()) and p.values.numel() == p.nnz + VALUES_PAD
    assert p.sparsity == pytest.approx(1 - m.float().mean().item())


def test_bitmap_layout_matches_spec():
    w = torch.randn(37, 290)
    m = random_mask(37, 290, 0.6, seed=3)
    m[5] = False  # empty row
    m[20] = True  # full row
    p = BitmapWeight.from_dense(w, m)
    dense = (w * m).tolist()
    g = torch.Generator().manual_seed(1)
    for i in torch.randint(0, 37 * 290, (300,), generator=g).tolist():
        r, c = divmod(i, 290)
        assert decode_element(p, r, c) == dense[r][c]
    # bit j of word w of row r is column 32w + j
    assert bool(p.bitmap[3, 0] & 1) == bool(m[3, 0])
    assert bool((int(p.bitmap[7, 2]) >> 5) & 1) == bool(m[7, 69])
    assert int(p.tile_offsets[0]) == 0 and int(p.tile_offsets[-1]) == p.nnz
    assert (p.bitmap[37:] == 0).all() and p.bitmap.shape == (48, 12)


def test_bitmap_keeps_masked_zeros_and_default_mask():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    m = torch.tensor([[True, True, False, False]])
    p = BitmapWeight.from_dense(w, m)
    assert p.nnz == 2 and torch.equal(p.mask(), m)
    assert torch.equal(p.to_dense(), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert BitmapWeight.from_dense(w).nnz == 2 and torch.equal(
        BitmapWeight.from_dense(w).mask(), w != 0
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bitmap_size_within_2_percent(sparsity, dtype):
    n, k = 256, 1024
    m = random_mask(n, k, sparsity)
    p = BitmapWeight.from_dense(torch.randn(n, k).to(dtype), m)
    ideal = 1 / 8 + 2 * m.float().mean().item()
    assert p.nbytes / (n * k) <= 1.02 * ideal


def test_bitmap_state_dict_and_to():
    w = torch.randn(20, 200)
    p = BitmapWeight.from_dense(w, random_mask(20, 200, 0.5))
    sd = p.state_dict("layer.")
    assert set(sd) == {"layer.bitmap", "layer.values", "layer.tile_offsets", "layer.shape"}
    assert sd["layer.shape"].dtype == torch.int64 and sd["layer.shape"].tolist() == [20, 200]
    q = from_state_dict(sd, "layer.")
    assert isinstance(q, BitmapWeight) and torch.equal(q.to_dense(), p.to_dense())
    h = p.to(dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.equal(h.mask(), p.mask())


def _bad(sd, key, value):
    out = dict(sd)
    out[key] = value
    return out


def test_bitmap_validation_rejects_corrupt_state():
    p = BitmapWeight.from_dense(torch.randn(20, 200), random_mask(20, 200, 0.5))
    sd = p.state_dict()
    bm, vals, offs = sd["bitmap"], sd["values"], sd["tile_offsets"]
    cases = {
        "dtype": _bad(sd, "bitmap", bm.to(torch.int64)),
        "shape": _bad(sd, "bitmap", bm[:, :-1].contiguous()),
        "contiguous": _bad(sd, "bitmap", bm.t().contiguous().t()),
        "values short": _bad(sd, "values", vals[:-1].clone()),
        "values int": _bad(sd, "values", vals.to(torch.int32)),
        "offsets": _bad(sd, "tile_offsets", offs.flip(0).contiguous()),
        "offsets dtype": _bad(sd, "tile_offsets", offs.long()),
        "shape tensor": _bad(sd, "shape", torch.tensor([40, 300])),
        "shape dtype": _bad(sd, "shape", torch.tensor([20.0, 200.0])),
        "huge": _bad(sd, "shape", torch.tensor([2**40, 200])),
    }
    padbits = bm.clone()
    padbits[0, -1] = -1  # columns 200..223 are padding
    cases["padding bits"] = _bad(sd, "bitmap", padbits)
    padrow = bm.clone()
    padrow[25, 0] = 1  # rows 20..31 are padding
    cases["padding row"] = _bad(sd, "bitmap", padrow)
    flipped = bm.clone()
    flipped[0, 0] ^= 1 << 3  # popcount of tile 0 changes
    cases["popcount"] = _bad(sd, "bitmap", flipped)
    tail = vals.clone()
    tail[-1] = 1.0
    cases["pad values"] = _bad(sd, "values", tail)
    for name, bad in cases.items():
        with pytest.raises(InputError):
            BitmapWeight.from_state_dict(bad)
            pytest.fail(f"accepted corrupt state: {name}")
    with pytest.raises(InputError, match="lacks"):
        BitmapWeight.from_state_dict({k: v for k, v in sd.items() if k != "values"})


def test_bitmap_bad_inputs():
    w = torch.randn(4, 8)
    with pytest.raises(InputError, match=r"mask shape \[4, 7\].*\[4, 8\]"):
        BitmapWeight.from_dense(w, torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(InputError, match="torch.bool"):
        BitmapWeight.from_dense(w, torch.ones(4, 8))
    with pytest.raises(InputError, match="2-D"):
        BitmapWeight.from_dense(torch.randn(8))
    with pytest.raises(InputError, match="dtype"):
        BitmapWeight.from_dense(torch.ones(4, 8, dtype=torch.int32))
