"""Packed formats: exact round trips, the documented layouts, sizes, validation, interchange."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from owl_sparse.errors import InputError
from owl_sparse.formats import (
    VALUES_PAD,
    BitmapWeight,
    Sparse24Weight,
    from_compressed_tensors,
    from_state_dict,
    is_24_mask,
    pack,
    to_compressed_tensors,
)
from owl_sparse.formats.compressed_tensors import pack_bitmask

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(1, 1), (1, 4), (16, 128), (17, 129), (33, 300), (5, 1000)]


def random_mask(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, generator=g) >= sparsity


def mask_24(n, k, seed=0, drop=0.25):
    """A 2:4 mask with some groups holding fewer than two entries."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    m.scatter_(-1, torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2], True)
    return m.view(n, k) & (torch.rand(n, k, generator=g) >= drop)


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


# ---------------------------------------------------------------------------- bitmap
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


def test_sparse24_size():
    p = Sparse24Weight.from_dense(torch.randn(64, 512).half(), mask_24(64, 512, drop=0.0))
    assert p.nbytes / (64 * 512) <= 1.13


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


# ---------------------------------------------------------------------------- 2:4
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


# ---------------------------------------------------------------------------- compressed-tensors
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
