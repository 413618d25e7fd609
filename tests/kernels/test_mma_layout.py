"""CPU checks of the CUDA kernels' data layout and index math (no GPU needed).

1. ``sparse24_to_mma`` is a bijection (round trip, and every canonical element lands in
   exactly one slot) and its metadata is always valid for ``mma.sp::ordered_metadata``.
2. A lane-level emulation of what the kernels read -- PTX fragment semantics of
   ``mma.sp.m16n8k32`` / ``mma.m16n8k16`` and ``ldmatrix``, written independently of the
   layout code from the PTX ISA descriptions -- reproduces the dense weight and
   ``x @ W^T``.  The emulators mirror the index formulas of csrc/sparse24_mma.cu and
   csrc/bitmap_mma.cu (tiles, stages, split-K, warp/lane roles), so a wrong address or
   permutation there shows up here.  What they cannot check is the hardware itself: that
   the PTX semantics assumed here are the ones the GPU implements (tests/kernels/test_cuda_kernels.py
   does that on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from owl_sparse.formats.bitmap import BitmapWeight
from owl_sparse.formats.mma_layout import mma_padded_shape, sparse24_from_mma, sparse24_to_mma
from owl_sparse.formats.sparse24 import Sparse24Weight

VALID_ORDERED = {0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110}


def random_24(n: int, k: int, seed: int, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight [n, k] and a 2:4 mask with 0, 1 or 2 kept entries per group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    drop = torch.rand(n, k // 4, 2, generator=g) < 0.15  # some groups keep fewer than 2
    mask &= ~torch.zeros_like(mask).scatter_(-1, keep, drop)
    mask = mask.view(n, k)
    mask[n // 2] = False  # an empty row
    return w, mask


SHAPES_24 = [(16, 128), (40, 200), (33, 196), (1, 4), (48, 260)]


@pytest.mark.parametrize("n,k", SHAPES_24)
def test_sparse24_mma_round_trip(n, k):
    w, mask = random_24(n, k, seed=n * 1000 + k)
    p = Sparse24Weight.from_dense(w, mask)
    vm, mm = sparse24_to_mma(p.values, p.meta)
    np_, kp = mma_padded_shape(n, k)
    assert vm.numel() == np_ * kp // 2 and vm.dtype == p.values.dtype
    assert tuple(mm.shape) == (np_ // 16, kp // 128, 32, 2) and mm.dtype == torch.int32
    values, meta = sparse24_from_mma(vm, mm, n, k)
    assert torch.equal(values, p.values) and torch.equal(meta, p.meta)


@pytest.mark.parametrize("n,k", SHAPES_24)
def test_sparse24_mma_is_a_permutation(n, k):
    ids = torch.arange(1, n * k // 2 + 1, dtype=torch.float64).view(n, k // 2)
    meta = torch.full((n, -(-k // 8)), 0x44, dtype=torch.uint8)
    vm, _ = sparse24_to_mma(ids, meta)
    nz = vm[vm != 0].sort().values
    assert torch.equal(nz, ids.flatten())  # each element exactly once, the rest padding


@pytest.mark.parametrize("n,k", SHAPES_24)
def test_sparse24_mma_metadata_is_ordered(n, k):
    w, mask = random_24(n, k, seed=7)
    p = Sparse24Weight.from_dense(w, mask)
    _, mm = sparse24_to_mma(p.values, p.meta)
    words = mm.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], -1).unique().tolist()
    assert set(nibbles) <= VALID_ORDERED, f"invalid metadata nibbles {set(nibbles) - VALID_ORDERED}"


def test_sparse24_mma_rejects_bad_input():
    with pytest.raises(ValueError, match="K % 4"):
        sparse24_to_mma(torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="meta must be uint8"):
        sparse24_to_mma(torch.zeros(4, 4), torch.zeros(4, 2, dtype=torch.uint8))


# ------------------------------------------------------------------ PTX semantics (emulated)
def lane_gt(lane: int) -> tuple[int, int]:
    return lane >> 2, lane & 3


def mma_sp_16832(a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, sel: int) -> torch.Tensor:
    """Emulate mma.sp.m16n8k32 for one warp. a [32, 8] (a0..a3 as pairs), b [32, 8]
    (b0..b3 as pairs), e [32] int64 metadata words, sel the sparsity selector.
    Returns d [32, 4] (fp64) per the accumulator layout."""
    comp = torch.zeros(16, 16, dtype=torch.float64)
    for lane in range(32):
        g, t = lane_gt(lane)
        for r in range(4):  # register r: rows g / g+8, columns 2t / 2t+8
            row, col = g + 8 * (r & 1), 2 * t + 8 * (r >> 1)
            comp[row, col : col + 2] = a[lane, 2 * r : 2 * r + 2]
    dense = torch.zeros(16, 32, dtype=torch.float64)
    for lane in range(32):
        g, t = lane_gt(lane)
        if t // 2 != sel:
            continue  # this lane's metadata is ignored under this selector
        half = t - 2 * sel  # logical columns 16*half .. +16 of the tile
        word = int(e[lane]) & 0xFFFFFFFF
        for row, bits in ((g, word & 0xFFFF), (g + 8, word >> 16)):
            for j in range(4):
                grp = 4 * half + j
                nib = (bits >> (4 * j)) & 0xF
                i0, i1 = nib & 3, nib >> 2
                assert nib in VALID_ORDERED, f"invalid metadata nibble {nib:#06b}"
                dense[row, 4 * grp + i0] = comp[row, 2 * grp]
                dense[row, 4 * grp + i1] = comp[row, 2 * grp + 1]
    bm = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane_gt(lane)
        for r in range(4):  # b_r: k = 2t + 8r (+1), n = g
            bm[2 * t + 8 * r : 2 * t + 8 * r + 2, g] = b[lane, 2 * r : 2 * r + 2]
    return c_fragment(dense @ bm)


def mma_16816(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Emulate dense mma.m16n8k16: a [32, 8] (a0..a3), b [32, 4] (b0, b1) -> d [32, 4]."""
    am = torch.zeros(16, 16, dtype=torch.float64)
    bm = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane_gt(lane)
        for r in range(4):
            row, col = g + 8 * (r & 1), 2 * t + 8 * (r >> 1)
            am[row, col : col + 2] = a[lane, 2 * r : 2 * r + 2]
        for r in range(2):
            bm[2 * t + 8 * r : 2 * t + 8 * r + 2, g] = b[lane, 2 * r : 2 * r + 2]
    return c_fragment(am @ bm)


def c_fragment(d: torch.Tensor) -> torch.Tensor:
    """[16, 8] -> per-lane accumulators: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)."""
    out = torch.zeros(32, 4, dtype=torch.float64)
    for lane in range(32):
        g, t = lane_gt(lane)
        out[lane] = torch.stack(
            [d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]]
        )
    return out


def ldmatrix_x4(smem: torch.Tensor, rows, cols) -> torch.Tensor:
    """Emulate ldmatrix.x4 (b16): lane 8i + j gives the address (rows[..], cols[..]) of row j
    of matrix i; lane (g, t) receives row g, elements 2t, 2t+1 of each matrix -> [32, 8]."""
    out = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane_gt(lane)
        for i in range(4):
            src = 8 * i + g
            out[lane, 2 * i : 2 * i + 2] = smem[
                rows[src], cols[src] + 2 * t : cols[src] + 2 * t + 2
            ]
    return out


def split_ranges(k_stages: int, splits: int):
    per = -(-k_stages // splits)
    return [(s0, min(k_stages, s0 + per)) for s0 in range(0, k_stages, per)]


def x_stage(x: torch.Tensor, n0: int, bn: int, st: int) -> torch.Tensor:
    """The shared [BN, 128] activation tile of stage st (zero past T and K)."""
    t, k = x.shape
    out = torch.zeros(bn, 128, dtype=torch.float64)
    rows = x[n0 : n0 + bn, st * 128 : st * 128 + 128].double()
    out[: rows.shape[0], : rows.shape[1]] = rows
    return out


def store_tile(y, acc, m0, n0, wm, wn, mt_n, nt_n):
    for i in range(mt_n):
        for j in range(nt_n):
            for lane in range(32):
                g, t = lane_gt(lane)
                row, tok = wm * mt_n * 16 + i * 16 + g, wn * nt_n * 8 + j * 8 + 2 * t
                for q, (dr, dt) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
                    gr, gt = m0 + row + dr, n0 + tok + dt
                    if gr < y.shape[1] and gt < y.shape[0]:
                        y[gt, gr] += acc[i, j, lane, q]


def stage_a_slot(vm, mm, m_tiles, k_stages, mtb, tiles_m, st):
    """The weight part of a prefill ring slot (A_SMEM): ``load_stage``'s cp.async index
    math, granule by granule -- fragments [tile][4 chunks][32 lanes] (16-byte granules)
    then metadata [tile][32 lanes] (8-byte words), zero past the last row tile."""
    gran = vm.double().view(-1, 8)  # one 16-byte granule = 8 halves
    words = mm.view(-1, 2)  # one uint2 per lane and stage
    a_slot = torch.zeros(tiles_m * 4 * 32, 8, dtype=torch.float64)
    for idx in range(tiles_m * 4 * 32):
        ti, q = divmod(idx, 4 * 32)
        mt = mtb + ti
        if mt < m_tiles:
            a_slot[idx] = gran[(mt * k_stages * 4 + st * 4) * 32 + q]
    m_slot = torch.zeros(tiles_m * 32, 2, dtype=torch.int64)
    for idx in range(tiles_m * 16):  # 16-byte granules = two uint2 words
        ti, q = divmod(idx, 16)
        mt = mtb + ti
        if mt < m_tiles:
            src = (mt * k_stages + st) * 32 + 2 * q
            m_slot[ti * 32 + 2 * q : ti * 32 + 2 * q + 2] = words[src : src + 2]
    return a_slot, m_slot


def emulate_sp24(x, vm, mm, n, k, wm_n, wn_n, mt_n, nt_n, splits, a_smem=False):
    """csrc/sparse24_mma.cu, block by block, warp by warp, lane by lane.  ``a_smem``: the
    prefill path, whose warps read their fragments (SmemFrags) from the staged slot."""
    t_tok = x.shape[0]
    np_, kp = mma_padded_shape(n, k)
    m_tiles, k_stages = np_ // 16, kp // 128
    bm, bn = wm_n * mt_n * 16, wn_n * nt_n * 8
    vals = vm.double().view(m_tiles, k_stages * 4, 32, 8)
    y = torch.zeros(t_tok, n, dtype=torch.float64)
    for bx in range(-(-n // bm)):
        for by in range(-(-t_tok // bn)):
            for st0, st1 in split_ranges(k_stages, splits):
                slots = {
                    st: stage_a_slot(vm, mm, m_tiles, k_stages, bx * (bm // 16), bm // 16, st)
                    for st in (range(st0, st1) if a_smem else ())
                }
                for warp in range(wm_n * wn_n):
                    wm, wn = warp % wm_n, warp // wm_n
                    mt0 = bx * (bm // 16) + wm * mt_n
                    acc = torch.zeros(mt_n, nt_n, 32, 4, dtype=torch.float64)
                    for st in range(st0, st1):
                        xs = x_stage(x, by * bn, bn, st)
                        for c in range(4):
                            for nt in range(nt_n):
                                rows = [wn * nt_n * 8 + nt * 8 + (ln & 7) for ln in range(32)]
                                cols = [c * 32 + 8 * (ln >> 3) for ln in range(32)]
                                b = ldmatrix_x4(xs, rows, cols)
                                for i in range(mt_n):
                                    if mt0 + i >= m_tiles:
                                        continue
                                    if a_smem:
                                        a_slot, m_slot = slots[st]
                                        base = wm * mt_n * 4 * 32 + (i * 4 + c) * 32
                                        a = a_slot[base : base + 32]
                                        mbase = wm * mt_n * 32 + i * 32
                                        e = m_slot[mbase : mbase + 32, c // 2]
                                    else:
                                        a = vals[mt0 + i, st * 4 + c]
                                        e = mm[mt0 + i, st, :, c // 2].to(torch.int64)
                                    acc[i, nt] += mma_sp_16832(a, b, e, c & 1)
                    store_tile(y, acc, bx * bm, by * bn, wm, wn, mt_n, nt_n)
    return y


@pytest.mark.parametrize(
    "n,k,t,cfg,splits,a_smem",
    [
        (40, 200, 5, (4, 1, 1, 1), 1, False),  # decode config, partial row block, K tail
        (33, 196, 11, (4, 1, 1, 2), 2, False),  # K % 8 == 4, split-K
        # prefill tile (4 x 2 warps of 4 x 8 MMA tiles, weights staged in shared memory):
        # a second row block with one valid row tile, a partial token tile, split-K
        (264, 260, 21, (4, 2, 4, 8), 2, True),
    ],
)
def test_sp24_kernel_emulation_matches_dense(n, k, t, cfg, splits, a_smem):
    w, mask = random_24(n, k, seed=n + k + t)
    p = Sparse24Weight.from_dense(w, mask)
    vm, mm = sparse24_to_mma(p.values, p.meta)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(3)).half()
    y = emulate_sp24(x, vm, mm, n, k, *cfg, splits, a_smem=a_smem)
    ref = x.double() @ p.to_dense().double().t()
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


# ---- the wgmma.sp prefill kernel (csrc/sparse24_wgmma.cuh) ---------------------------
WG_BN, WG_LBO, WG_SBO = 128, 2048, 128


def wgmma_x_offset(r: int, q: int) -> int:
    """core_offset<128> (wgmma_common.cuh): byte offset of granule q of token row r."""
    return ((q * (WG_BN // 8) + (r >> 3)) * 8 + (r & 7)) * 16


def smem_desc(addr: int, lbo: int, sbo: int) -> int:
    """smem_desc(): start address, leading / stride byte offsets in 16-byte units."""
    return ((addr >> 4) & 0x3FFF) | (((lbo >> 4) & 0x3FFF) << 16) | (((sbo >> 4) & 0x3FFF) << 32)


def read_b_k_major(smem: torch.Tensor, desc: int, k: int, n: int) -> torch.Tensor:
    """B [k, n] as wgmma reads a K-major, unswizzled operand (PTX ISA canonical layout:
    8 x 16-byte core matrices; LBO steps along K, SBO along N).  smem: fp64 per 2 bytes."""
    start, lbo, sbo = (
        (desc & 0x3FFF) << 4,
        ((desc >> 16) & 0x3FFF) << 4,
        ((desc >> 32) & 0x3FFF) << 4,
    )
    assert desc >> 46 == 0  # base offset 0, layout type 0 (no swizzle)
    b = torch.empty(k, n, dtype=torch.float64)
    for kk in range(k):
        for nn in range(n):
            byte = start + (kk // 8) * lbo + (nn // 8) * sbo + (nn % 8) * 16 + (kk % 8) * 2
            b[kk, nn] = smem[byte // 2]
    return b


def emulate_sp24_wgmma(x, vm, mm, n, k, splits):
    """csrc/sparse24_wgmma.cuh, block by block: two warpgroups of two m64 tiles; warp w of a
    warpgroup gives A fragment and metadata of m16 tile w; B through the descriptor."""
    t_tok = x.shape[0]
    np_, kp = mma_padded_shape(n, k)
    m_tiles, k_stages = np_ // 16, kp // 128
    bm, tiles_m = 256, 16
    y = torch.zeros(t_tok, n, dtype=torch.float64)
    for bx in range(-(-n // bm)):
        mtb = bx * tiles_m
        for by in range(-(-t_tok // WG_BN)):
            n0 = by * WG_BN
            for st0, st1 in split_ranges(k_stages, splits):
                acc = torch.zeros(2, 2, 4, 32, 64, dtype=torch.float64)  # [wg][i][w][lane]
                for st in range(st0, st1):
                    xs = torch.full((WG_BN * 128,), float("nan"), dtype=torch.float64)
                    for r in range(WG_BN):  # load_x, 16-byte granules
                        for q in range(16):
                            gt, gk = n0 + r, st * 128 + q * 8
                            vals = torch.zeros(8, dtype=torch.float64)
                            if gt < t_tok and gk < k:
                                vals = x[gt, gk : gk + 8].double()
                            off = wgmma_x_offset(r, q) // 2
                            xs[off : off + 8] = vals
                    a_slot, m_slot = stage_a_slot(vm, mm, m_tiles, k_stages, mtb, tiles_m, st)
                    for wg in range(2):
                        for i in range(2):
                            for w in range(4):
                                ti = (wg * 2 + i) * 4 + w
                                for c in range(4):
                                    desc = smem_desc(c * 4 * WG_LBO, WG_LBO, WG_SBO)
                                    bmat = read_b_k_major(xs, desc, 32, WG_BN)
                                    a = a_slot[(ti * 4 + c) * 32 : (ti * 4 + c) * 32 + 32]
                                    if mtb + ti < m_tiles:
                                        e = m_slot[ti * 32 : ti * 32 + 32, c // 2]
                                    else:
                                        e = torch.full((32,), 0x44444444, dtype=torch.int64)
                                    for j in range(WG_BN // 8):
                                        b = torch.zeros(32, 8, dtype=torch.float64)
                                        for lane in range(32):
                                            g, t = lane_gt(lane)
                                            for r in range(4):
                                                b[lane, 2 * r : 2 * r + 2] = bmat[
                                                    2 * t + 8 * r : 2 * t + 8 * r + 2, 8 * j + g
                                                ]
                                        d = mma_sp_16832(a, b, e, c & 1)
                                        acc[wg, i, w, :, 4 * j : 4 * j + 4] += d
                for wg in range(2):
                    for i in range(2):
                        for w in range(4):
                            for lane in range(32):
                                g, t = lane_gt(lane)
                                row = bx * bm + (wg * 2 + i) * 64 + w * 16 + g
                                for j in range(WG_BN // 8):
                                    for q, (dr, dt) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
                                        gr, gt = row + dr, n0 + 8 * j + 2 * t + dt
                                        if gr < n and gt < t_tok:
                                            y[gt, gr] += acc[wg, i, w, lane, 4 * j + q]
    return y


def core_stage(x: torch.Tensor, n0: int, bn: int, st: int) -> torch.Tensor:
    """load_x_core<bn>: the [bn, 128] activation tile of stage st in core-matrix layout,
    as fp64 per 2 bytes (zero past T and K; 8-byte granules land where 16-byte ones do)."""
    t_tok, k = x.shape
    xs = torch.full((bn * 128,), float("nan"), dtype=torch.float64)
    lbo = bn // 8 * 128
    for r in range(bn):
        for q in range(16):
            gt, gk = n0 + r, st * 128 + q * 8
            vals = torch.zeros(8, dtype=torch.float64)
            if gt < t_tok and gk < k:
                row = x[gt, gk : gk + 8].double()
                vals[: row.numel()] = row
            off = ((q * (bn // 8) + (r >> 3)) * 8 + (r & 7)) * 16
            assert off == q * lbo + (r >> 3) * 128 + (r & 7) * 16
            xs[off // 2 : off // 2 + 8] = vals
    return xs


@pytest.mark.parametrize("bn", [64, 128])
def test_core_tile_granule_paths_agree(bn):
    """load_x_core: the 8-byte granules of the K % 8 == 4 path put every activation
    column where the 16-byte path puts it (core_offset + 2 bytes per column), each byte of
    the tile written exactly once."""
    written = torch.zeros(bn * 256, dtype=torch.int32)
    for r in range(bn):
        for h in range(32):  # 4 columns per 8-byte granule
            off8 = ((h >> 1) * (bn // 8) + (r >> 3)) * 128 + (r & 7) * 16 + (h & 1) * 8
            for j in range(4):
                col = 4 * h + j
                off16 = ((col // 8) * (bn // 8) + (r >> 3)) * 128 + (r & 7) * 16 + 2 * (col % 8)
                assert off8 + 2 * j == off16
            written[off8 : off8 + 8] += 1
    assert bool((written == 1).all())


@pytest.mark.parametrize("nt_n", [8, 16])
def test_bitmap_wgmma_emulation_matches_dense(nt_n):
    """The Hopper bitmap tiles: two row blocks (the second with one valid row tile and
    three warps multiplying zeros), an empty tile, a partial token tile, split-K."""
    p = random_bitmap(72, 260, 0.3, seed=nt_n)
    x = torch.randn(nt_n * 8 - 3, 260, generator=torch.Generator().manual_seed(2)).half()
    y = emulate_bitmap_frag(x, p, 4, nt_n, 2, wgmma=True)
    ref = x.double() @ p.to_dense().double().t()
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


def test_sp24_wgmma_emulation_matches_dense():
    """One row block with row tiles past the end (zero A, ordered placeholder metadata), a
    partial token tile, split-K.  (K % 8 == 0 here; the kernel's 8-byte-granule path for
    K % 8 == 4 writes the same core-matrix rows in halves and is checked on the GPU.)"""
    n, k, t = 72, 256, 21
    w, mask = random_24(n, k, seed=7)
    p = Sparse24Weight.from_dense(w, mask)
    vm, mm = sparse24_to_mma(p.values, p.meta)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(9)).half()
    y = emulate_sp24_wgmma(x, vm, mm, n, k, splits=2)
    ref = x.double() @ p.to_dense().double().t()
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


def test_sp24_fragment_emulation_reproduces_weight():
    """The A fragments + metadata of every (row tile, chunk) decode to the dense weight."""
    n, k = 40, 260
    w, mask = random_24(n, k, seed=11)
    p = Sparse24Weight.from_dense(w, mask)
    vm, mm = sparse24_to_mma(p.values, p.meta)
    np_, kp = mma_padded_shape(n, k)
    vals = vm.double().view(np_ // 16, kp // 32, 32, 8)
    eye = torch.zeros(32, 8, dtype=torch.float64)  # B = identity on columns 0..7
    dense = torch.zeros(np_, kp, dtype=torch.float64)
    for mt in range(np_ // 16):
        for kc in range(kp // 32):
            for col0 in range(0, 32, 8):
                bm = torch.zeros(32, 8, dtype=torch.float64)
                bm[col0 : col0 + 8] = torch.eye(8, dtype=torch.float64)
                for lane in range(32):  # pack identity columns into B fragments
                    g, tt = lane_gt(lane)
                    for r in range(4):
                        eye[lane, 2 * r : 2 * r + 2] = bm[2 * tt + 8 * r : 2 * tt + 8 * r + 2, g]
                e = mm[mt, kc // 4, :, (kc % 4) // 2].to(torch.int64)
                d = mma_sp_16832(vals[mt, kc], eye, e, kc % 2)
                for lane in range(32):
                    g, tt = lane_gt(lane)
                    for q, (dr, dc) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
                        dense[16 * mt + g + dr, 32 * kc + col0 + 2 * tt + dc] = d[lane, q]
    assert torch.equal(dense[:n, :k], p.to_dense().double())
    assert not dense[n:].any() and not dense[:, k:].any()


# ------------------------------------------------------------------ bitmap kernel
def random_bitmap(n: int, k: int, density: float, seed: int) -> BitmapWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).half()
    mask = torch.rand(n, k, generator=g) < density
    mask[1] = False  # an empty row
    if k > 128 and n > 16:
        mask[16:32, 128:256] = False  # an all-zero tile
    return BitmapWeight.from_dense(w, mask)


def emulate_bitmap(x, p: BitmapWeight, wm_n, wn_n, mt_n, nt_n, splits):
    """csrc/bitmap_mma.cu, block by block; decode follows the lane algorithm exactly: the
    dense shared tile of the prefill configurations, or (one m16 tile per warp, WN == 1)
    the A registers each lane builds straight from the bitmap (frag_stage)."""
    if wn_n == 1 and mt_n == 1:
        return emulate_bitmap_frag(x, p, wm_n, nt_n, splits)
    n, t_tok = p.N, x.shape[0]
    np_, kp = p.padded_shape
    m_tiles, k_stages = np_ // 16, kp // 128
    bm, bn, n_tiles, n_warps = wm_n * mt_n * 16, wn_n * nt_n * 8, wm_n * mt_n, wm_n * wn_n
    words = p.bitmap.to(torch.int64) & 0xFFFFFFFF
    offs = p.tile_offsets.tolist()
    vals = p.values.double()
    y = torch.zeros(t_tok, n, dtype=torch.float64)
    for bx in range(-(-n // bm)):
        m0 = bx * bm
        for by in range(-(-t_tok // bn)):
            for st0, st1 in split_ranges(k_stages, splits):
                acc = torch.zeros(n_warps, mt_n, nt_n, 32, 4, dtype=torch.float64)
                for kt in range(st0, st1):
                    a_s = torch.full((bm, 136), float("nan"), dtype=torch.float64)
                    for warp in range(n_warps):
                        for ti in range(warp, n_tiles, n_warps):
                            decode_tile(a_s, words, offs, vals, m0, ti, kt, m_tiles, k_stages)
                    xs = x_stage(x, by * bn, bn, kt)
                    for warp in range(n_warps):
                        wm, wn = warp % wm_n, warp // wm_n
                        for kk in range(0, 128, 32):
                            a = [[None, None] for _ in range(mt_n)]
                            for i in range(mt_n):
                                for h in range(2):
                                    rows = [
                                        wm * mt_n * 16 + i * 16 + (ln & 7) + 8 * ((ln >> 3) & 1)
                                        for ln in range(32)
                                    ]
                                    cols = [kk + 16 * h + 8 * (ln >> 4) for ln in range(32)]
                                    a[i][h] = ldmatrix_x4(a_s, rows, cols)
                            for nt in range(nt_n):
                                rows = [wn * nt_n * 8 + nt * 8 + (ln & 7) for ln in range(32)]
                                cols = [kk + 8 * (ln >> 3) for ln in range(32)]
                                b = ldmatrix_x4(xs, rows, cols)
                                for i in range(mt_n):
                                    acc[warp, i, nt] += mma_16816(a[i][0], b[:, 0:4])
                                    acc[warp, i, nt] += mma_16816(a[i][1], b[:, 4:8])
                for warp in range(n_warps):
                    store_tile(y, acc[warp], m0, by * bn, warp % wm_n, warp // wm_n, mt_n, nt_n)
    return y


def staged_values(vals, off0, off1):
    """A tile's shared value slot: its granules from the one holding off0 on, clipped at
    the end of the values array like the cp.async source size."""
    g0 = off0 >> 3
    g1 = min((off1 + 7) >> 3, g0 + 257)
    vs = torch.zeros(2056, dtype=torch.float64)
    chunk = vals[g0 * 8 : g1 * 8]
    vs[: chunk.numel()] = chunk
    return vs


def popcount(w: int) -> int:
    return bin(w).count("1")


def frag_tile(words, offs, vals, rt, kt, m_tiles, k_stages):
    """frag_stage: the A registers of row tile rt, tile column kt, per k32 chunk c and k16
    half h as a [32 lanes, 8] tensor (registers a0..a3 as pairs); None when the warp skips
    the stage (past the last row tile, or an empty tile)."""
    if rt >= m_tiles:
        return None
    off0, off1 = offs[rt * k_stages + kt], offs[rt * k_stages + kt + 1]
    if off0 < 0 or off1 <= off0:
        return None
    vs = staged_values(vals, off0, off1)
    rows = [[int(words[rt * 16 + r, 4 * kt + q]) for q in range(4)] for r in range(16)]
    pre, cnt = [], []
    for lane in range(32):
        g, _ = lane_gt(lane)
        pg = [sum(popcount(w) for w in rows[g][:q]) for q in range(4)]
        ph = [sum(popcount(w) for w in rows[g + 8][:q]) for q in range(4)]
        pre.append((pg, ph))
        cnt.append((sum(map(popcount, rows[g])), sum(map(popcount, rows[g + 8]))))
    incl = [cg | (ch << 16) for cg, ch in cnt]
    for d in (4, 8, 16):  # __shfl_up_sync scan over the lanes
        incl = [incl[ln] + (incl[ln - d] if ln >= d else 0) for ln in range(32)]
    tot = incl[28]
    lo = tot & 0xFFFF
    assert lo + (tot >> 16) == off1 - off0  # a consistent weight reads its shared slot

    def pair(w, b, r0):
        s = w >> b
        r = r0 + popcount(w & ((1 << b) - 1))
        v0 = vs[r] if s & 1 else 0.0
        v1 = vs[r + (s & 1)] if s & 2 else 0.0
        return [v0, v1]

    frags = [[torch.zeros(32, 8, dtype=torch.float64) for _ in range(2)] for _ in range(4)]
    for lane in range(32):
        g, t = lane_gt(lane)
        (pg, ph), (cg, ch) = pre[lane], cnt[lane]
        bg = (off0 & 7) + (incl[lane] & 0xFFFF) - cg
        bh = (off0 & 7) + lo + (incl[lane] >> 16) - ch
        for c in range(4):
            for h in range(2):
                b = 16 * h + 2 * t
                regs = (
                    pair(rows[g][c], b, bg + pg[c]),
                    pair(rows[g + 8][c], b, bh + ph[c]),
                    pair(rows[g][c], b + 8, bg + pg[c]),
                    pair(rows[g + 8][c], b + 8, bh + ph[c]),
                )
                frags[c][h][lane] = torch.tensor([v for r in regs for v in r])
    return frags


def emulate_bitmap_frag(x, p: BitmapWeight, n_warps, nt_n, splits, wgmma=False):
    """The decode configurations: warp w multiplies row tile w of its block.  ``wgmma``:
    the Hopper variant -- the same A registers (zeros for a skipped tile), B read through
    the descriptor from the core-matrix activation tile, one m64nBNk16 per k16 step."""
    n, t_tok = p.N, x.shape[0]
    np_, kp = p.padded_shape
    m_tiles, k_stages = np_ // 16, kp // 128
    bm, bn = n_warps * 16, nt_n * 8
    words = p.bitmap.to(torch.int64) & 0xFFFFFFFF
    offs, vals = p.tile_offsets.tolist(), p.values.double()
    y = torch.zeros(t_tok, n, dtype=torch.float64)
    for bx in range(-(-n // bm)):
        for by in range(-(-t_tok // bn)):
            for st0, st1 in split_ranges(k_stages, splits):
                for warp in range(n_warps):
                    acc = torch.zeros(1, nt_n, 32, 4, dtype=torch.float64)
                    for kt in range(st0, st1):
                        rt = bx * bm // 16 + warp
                        frags = frag_tile(words, offs, vals, rt, kt, m_tiles, k_stages)
                        if wgmma:
                            zero = torch.zeros(32, 8, dtype=torch.float64)
                            frags = frags or [[zero, zero] for _ in range(4)]
                            xs = core_stage(x, by * bn, bn, kt)
                            lbo = bn // 8 * 128
                            for c in range(4):
                                for h in range(2):
                                    desc = smem_desc(2 * (2 * c + h) * lbo, lbo, 128)
                                    bmat = read_b_k_major(xs, desc, 16, bn)
                                    for nt in range(nt_n):
                                        b = torch.zeros(32, 4, dtype=torch.float64)
                                        for lane in range(32):
                                            g, t = lane_gt(lane)
                                            for r in range(2):
                                                k0 = 2 * t + 8 * r
                                                b[lane, 2 * r : 2 * r + 2] = bmat[
                                                    k0 : k0 + 2, 8 * nt + g
                                                ]
                                        acc[0, nt] += mma_16816(frags[c][h], b)
                            continue
                        if frags is None:
                            continue
                        xs = x_stage(x, by * bn, bn, kt)
                        for c in range(4):
                            for nt in range(nt_n):
                                rows = [nt * 8 + (ln & 7) for ln in range(32)]
                                cols = [c * 32 + 8 * (ln >> 3) for ln in range(32)]
                                b = ldmatrix_x4(xs, rows, cols)
                                acc[0, nt] += mma_16816(frags[c][0], b[:, 0:4])
                                acc[0, nt] += mma_16816(frags[c][1], b[:, 4:8])
                    store_tile(y, acc, bx * bm, by * bn, warp, 0, 1, nt_n)
    return y


def decode_tile(a_s, words, offs, vals, m0, ti, kt, m_tiles, k_stages):
    """One warp decoding row tile ti of tile column kt into a_s (lane algorithm)."""
    rt = m0 // 16 + ti
    off0 = off1 = 0
    if rt < m_tiles:
        off0, off1 = offs[rt * k_stages + kt], offs[rt * k_stages + kt + 1]
    if off1 <= off0:
        a_s[ti * 16 : ti * 16 + 16, :128] = 0.0
        return
    vs = staged_values(vals, off0, off1)
    lane_words = []
    for lane in range(32):
        rr, wc = lane >> 1, (lane & 1) * 2
        row = (rt * 16 + rr) if rt < m_tiles else None
        w0 = int(words[row, 4 * kt + wc]) if row is not None else 0
        w1 = int(words[row, 4 * kt + wc + 1]) if row is not None else 0
        lane_words.append((rr, wc, w0, w1))
    counts = [bin(w0).count("1") + bin(w1).count("1") for _, _, w0, w1 in lane_words]
    excl = [sum(counts[:lane]) for lane in range(32)]  # = inclusive shfl_up scan - own
    for lane, (rr, wc, w0, w1) in enumerate(lane_words):
        base = (off0 & 7) + excl[lane]
        for q, w in enumerate((w0, w1)):
            r = base + (bin(w0).count("1") if q else 0)
            for j in range(32):
                bit = (w >> j) & 1
                a_s[ti * 16 + rr, (wc + q) * 32 + j] = vs[r] if bit else 0.0
                r += bit


@pytest.mark.parametrize(
    "n,k,t,density,cfg,splits",
    [
        (40, 300, 5, 0.3, (4, 1, 1, 1), 1),  # partial tiles in N and K, empty row + tile
        (33, 256, 9, 0.5, (4, 1, 1, 2), 2),  # split-K
        (70, 260, 20, 1.0, (4, 1, 1, 4), 1),  # full tiles (row sums up to 1024), 2 blocks
        (20, 128, 3, 0.9, (2, 2, 2, 8), 1),  # prefill config, dense-ish tiles
        (40, 256, 70, 0.3, (4, 1, 1, 16), 2),  # 128-token register tile, split-K
    ],
)
def test_bitmap_kernel_emulation_matches_dense(n, k, t, density, cfg, splits):
    p = random_bitmap(n, k, density, seed=n + k)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(5)).half()
    y = emulate_bitmap(x, p, *cfg, splits)
    ref = x.double() @ p.to_dense().double().t()
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
