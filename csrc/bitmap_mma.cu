// Bitmap (unstructured) sparse x dense product on tensor cores: "load as sparse,
// compute as dense".  y[T, N] = x[T, K] @ W[N, K]^T with W in the bitmap format of
// owl_sparse/formats/bitmap.py (16 x 128 tiles, one bit per weight, kept values packed
// tile by tile, tile_offsets).
//
// Per 128-column stage, a block (WM x WN warps, BM = WM*MT*16 rows, BN = WN*NT*8 tokens):
// 1. cp.async (STAGES-deep ring) brings in only the compressed bytes: the BM x 4 bitmap
//    words, each row tile's packed values (contiguous from tile_offsets, 16-byte
//    granules, the first one aligned down), and the [BN x 128] activation tile.  Global
//    traffic is 1/8 + 2(1 - s) bytes per weight instead of 2.
// 2. Each warp decodes whole 16 x 128 tiles into a dense fp16/bf16 tile in shared memory:
//    lane l owns bitmap words 2l and 2l+1 (row l/2, 64 columns); a warp-wide exclusive
//    scan of popcounts gives each word's rank inside the tile; the lane builds its 64
//    columns in registers (running rank, predicated shared loads) and writes them with
//    four 16-byte stores per word.  Decoding works on raw 16-bit patterns, so it is the
//    same code for fp16 and bf16; all-empty tiles are a warp-uniform zero fill.
// 3. mma.sync m16n8k16 with A (the decoded tile) and B (activations) read by ldmatrix.x4;
//    rows are padded by 16 bytes so every ldmatrix phase is conflict-free.
// Steps 2 and 3 are for the prefill tiles, where several warps share a decoded tile.  In
// the decode configurations (<= 32 tokens) each warp owns one row tile, and there is no
// dense tile at all: lane (g, t) builds its own m16n8k16 A registers (rows g and g + 8,
// columns 2t, 2t + 1, 2t + 8, 2t + 9 of each k16 step) from its rows' bitmap words -- the
// rank of a position is its row's base (one packed warp scan of the two rows' popcounts)
// plus a masked popcount -- and reads only the kept values from the slot.  That removes
// the dense tile's stores, its ldmatrix reads and a block barrier per stage (ncu had the
// decode configurations bound by shared-memory traffic), and 17 KB of shared memory.
// Aimed at 8-512 tokens: the decode cost per weight tile is paid once per token tile,
// so the prefill configuration uses 128-token tiles.  Split-K fills the grid when the
// row x token grid is small.
//
// Shared memory per row tile's values is sized at run time (`vcap`) from the largest
// tile of the weight (the caller passes it, cached per packed weight), not for a full
// 2048-value tile: at 70% sparsity that is ~3x less shared memory per stage, hence more
// blocks per SM and deeper cp.async rings.  A tile whose values do not fit the slot is
// never truncated: its values are not staged, and the decode reads them from global
// memory instead (same bit ranks, slower, always correct).
//
// A second kernel on the same shared-memory ring, `bitmap_gemv_kernel`, serves 1-8 tokens
// on CUDA cores: no dense tile and no tensor cores.  Each lane walks the set bits of its two
// bitmap words (__ffs) and multiplies each kept value with the activations of its column,
// so the work is per kept weight, not per weight position; the two lanes of a row add their
// sums with one shuffle at the end.  It registers as its own backend ("cuda_gemv"), so the
// dispatch table picks it only where it was measured faster than the alternatives.
#include "wgmma_common.cuh"

namespace owl {
namespace {

// Largest shared buffer of one row tile's values: 2048 values plus the up-to-7 values
// in front of the first one that the aligned 16-byte granule also brings in.
constexpr int kMaxValsPerTile = 2048 + 8;

// Values a tile's staged granules span, rounded to whole 16-byte granules, for a tile
// whose values are [off0, off1).
__host__ __device__ __forceinline__ int64_t staged_halves(int64_t off0, int64_t off1) {
  return (((off1 + 7) >> 3) - (off0 >> 3)) * 8;
}

// Per-tile slot size (halves, a multiple of 8) for tiles of at most `max_tile_values`
// values; < 0 = unknown (full tiles).
inline int vals_capacity(int64_t max_tile_values) {
  if (max_tile_values < 0 || max_tile_values >= 2048) return kMaxValsPerTile;
  const int64_t need = (max_tile_values + 14 + 7) / 8 * 8;  // worst granule alignment
  return (int)(need < kMaxValsPerTile ? need : kMaxValsPerTile);
}

// Whether a tile's values are read from its shared slot: they fit the slot, and the
// tile's bit count (`total`, warp-uniform) matches its offsets, so no rank can leave the
// slot.  A tile whose bitmap and offsets disagree (a corrupt weight that skipped
// validation) takes the bounds-checked global path instead of reading past shared memory.
__device__ __forceinline__ bool staged_in_smem(int64_t off0, int64_t off1, int total, int vcap) {
  return staged_halves(off0, off1) <= vcap && total == off1 - off0;
}

// Reads of one tile's packed values, index r from the tile's first granule: from its
// shared slot, or (a tile too large for the slot) from global memory, bounds-checked.
struct SmemValues {
  const uint16_t* vs;
  __device__ __forceinline__ uint32_t operator()(int r) const { return vs[r]; }
};
struct GlobalValues {
  const uint16_t* base;
  int64_t left;  // values from base to the end of the array
  __device__ __forceinline__ uint32_t operator()(int r) const {
    return r < left ? __ldg(base + r) : 0u;
  }
};

struct BitmapParams {
  const uint16_t* x;
  const uint32_t* bitmap;   // [Np, Kp/32]
  const uint16_t* values;   // [num_values]
  const int32_t* tile_offsets;
  int64_t num_values;
  EpilogueArgs ep;
  int T, N, K;
  int m_tiles;   // Np / 16
  int k_stages;  // Kp / 128 (= tile columns)
  int stages_per_split;
  int vcap;  // halves per tile slot (multiple of 8, <= kMaxValsPerTile)
  bool vec16;
};

template <typename T, int WM, int WN, int MT, int NT, int STAGES, bool WG = false>
struct BitmapKernel {
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kWarps = WM * WN;
  static constexpr int BM = WM * MT * 16;
  static constexpr int BN = WN * NT * 8;
  static constexpr int kTiles = BM / 16;
  // Per-stage ring slot: activations, values (vcap halves per row tile), bitmap words;
  // every part a 16-byte multiple (vcap is a multiple of 8).
  // Activation tile: rows padded for ldmatrix, or (WG: the warpgroup reads it through a
  // wgmma descriptor) the unpadded core-matrix layout of wgmma_common.cuh.
  static constexpr int kXHalves = WG ? BN * kStageK : BN * kSmemLd;
  static constexpr int kBWords = BM * 4;
  // Decode configurations build A fragments in registers (no dense tile); the others
  // decode into a dense tile (single buffer).
  static constexpr bool kFragA = WN == 1 && MT == 1;
  static constexpr int kABytes = kFragA ? 0 : BM * kSmemLd * 2;
  static constexpr int kCBytes = BN * (BM + 4) * 4;
  static_assert((kXHalves * 2) % 16 == 0, "ring slots must keep 16-byte alignment");

  __host__ __device__ static int slot_bytes(int vcap) {
    return kXHalves * 2 + kTiles * vcap * 2 + kBWords * 4;
  }
  __host__ __device__ static int ring_bytes(int vcap) { return STAGES * slot_bytes(vcap); }
  __host__ __device__ static int smem_bytes(int vcap) {
    const int main_bytes = ring_bytes(vcap) + kABytes;
    return main_bytes > kCBytes ? main_bytes : kCBytes;
  }

  struct Slot {
    uint16_t* xs;
    uint16_t* vs;
    uint32_t* bs;
  };

  __device__ static Slot slot(uint8_t* smem, int i, int vcap) {
    uint8_t* base = smem + i * slot_bytes(vcap);
    Slot s;
    s.xs = reinterpret_cast<uint16_t*>(base);
    s.vs = reinterpret_cast<uint16_t*>(base + kXHalves * 2);
    s.bs = reinterpret_cast<uint32_t*>(base + kXHalves * 2 + kTiles * vcap * 2);
    return s;
  }

  // Issue the copies of tile column `kt` into ring slot `sl`.
  __device__ static void load_stage(const BitmapParams& p, const Slot& sl, int m0, int n0, int kt,
                                    int tid) {
    const int words_per_row = p.k_stages * 4;
    // Bitmap: one 16-byte granule (4 words) per row; rows past Np read as empty.
    for (int r = tid; r < BM; r += kThreads) {
      const int gr = m0 + r;
      const bool ok = gr < p.m_tiles * 16;
      const uint32_t* src = ok ? p.bitmap + (int64_t)gr * words_per_row + kt * 4 : p.bitmap;
      cp_async16(smem_addr(sl.bs + r * 4), src, ok ? 16 : 0);
    }
    // Values: warp w copies row tiles w, w + kWarps, ...; granule-aligned so that every
    // copy is a 16-byte cp.async; the final granule of the array is clipped (never read
    // past num_values).  Tiles larger than the slot stay in global memory (decode).
    const int warp = tid >> 5, lane = tid & 31;
    for (int ti = warp; ti < kTiles; ti += kWarps) {
      const int rt = m0 / 16 + ti;
      if (rt >= p.m_tiles) continue;
      const int64_t t = (int64_t)rt * p.k_stages + kt;
      const int64_t off0 = __ldg(p.tile_offsets + t), off1 = __ldg(p.tile_offsets + t + 1);
      if (off0 < 0 || off1 <= off0 || staged_halves(off0, off1) > p.vcap) continue;
      const int64_t g0 = off0 >> 3, g1 = (off1 + 7) >> 3;
      uint16_t* dst = sl.vs + ti * p.vcap;
      for (int64_t gi = g0 + lane; gi < g1; gi += 32) {
        const int64_t left = p.num_values - gi * 8;
        const int bytes = left >= 8 ? 16 : (left > 0 ? (int)left * 2 : 0);
        cp_async16(smem_addr(dst + (gi - g0) * 8), bytes > 0 ? p.values + gi * 8 : p.values,
                   bytes);
      }
    }
    if constexpr (WG)
      load_x_core<BN, kThreads>(reinterpret_cast<uint8_t*>(sl.xs), p.x, p.T, p.K, n0,
                                kt * kStageK, p.vec16, tid);
    else
      load_x_stage<BN, kThreads>(sl.xs, p.x, p.T, p.K, n0, kt * kStageK, p.vec16, tid);
  }

  // 32 columns of one row from one bitmap word: bit j set -> next packed value
  // (`vals(r)`: a SmemValues or GlobalValues reader).
  template <typename Vals>
  __device__ static void expand_word(uint32_t w, int r, const Vals& vals, uint16_t* dst) {
    uint32_t out[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t b0 = (w >> (2 * j)) & 1u;
      const uint32_t v0 = b0 ? vals(r) : 0u;
      r += b0;
      const uint32_t b1 = (w >> (2 * j + 1)) & 1u;
      const uint32_t v1 = b1 ? vals(r) : 0u;
      r += b1;
      out[j] = v0 | (v1 << 16);
    }
    uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
    for (int q = 0; q < 4; ++q)
      d[q] = make_uint4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]);
  }

  // For this lane's two bitmap words of row tile `ti` in slot `sl` (row lane / 2, words
  // 2 (lane & 1) and + 1), whose values are [off0, off1): op(word, rank of its first value,
  // values reader, h) for h = 0, 1.  Ranks come from a warp-wide scan of the popcounts over
  // the tile's words in row-major order; the reader is the tile's shared slot or, where the
  // values do not fit it or disagree with the bitmap, the values array in global memory.
  // Warp-collective: all 32 lanes call it with the same tile.
  template <typename Op>
  __device__ static void with_lane_words(const BitmapParams& p, const Slot& sl, int ti,
                                         int64_t off0, int64_t off1, int lane, Op&& op) {
    const uint2 ww =
        *reinterpret_cast<const uint2*>(sl.bs + (ti * 16 + (lane >> 1)) * 4 + (lane & 1) * 2);
    const int c0 = __popc(ww.x);
    const int mine = c0 + __popc(ww.y);
    int incl = mine;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    const int base = (int)(off0 & 7) + incl - mine;
    const int total = __shfl_sync(0xffffffffu, incl, 31);
    if (staged_in_smem(off0, off1, total, p.vcap)) {  // warp-uniform
      const SmemValues vals{sl.vs + ti * p.vcap};
      op(ww.x, base, vals, 0);
      op(ww.y, base + c0, vals, 1);
    } else {
      const int64_t g = off0 & ~int64_t(7);
      const GlobalValues vals{p.values + g, p.num_values - g};
      op(ww.x, base, vals, 0);
      op(ww.y, base + c0, vals, 1);
    }
  }

  // The cp.async ring (cp_async_ring) over this block's stages st0 .. st0 + nst - 1:
  // body(slot, kt) runs on each landed stage while the next STAGES - 1 load.
  template <bool kAsyncProxy = false, typename Body>
  __device__ static void for_each_stage(const BitmapParams& p, uint8_t* smem, int m0, int n0,
                                        int st0, int nst, int tid, Body&& body) {
    cp_async_ring<STAGES, kAsyncProxy>(
        nst,
        [&](int sl, int s) { load_stage(p, slot(smem, sl, p.vcap), m0, n0, st0 + s, tid); },
        [&](int sl, int s) { body(slot(smem, sl, p.vcap), st0 + s); });
  }

  // Decode the block's row tiles of tile column `kt` (slot `sl`) into `as` [BM][kSmemLd].
  __device__ static void decode(const BitmapParams& p, const Slot& sl, uint16_t* as, int m0, int kt,
                                int tid) {
    const int warp = tid >> 5, lane = tid & 31;
    const int rr = lane >> 1, wc = (lane & 1) * 2;  // this lane: row rr, words wc, wc + 1
    for (int ti = warp; ti < kTiles; ti += kWarps) {
      const int rt = m0 / 16 + ti;
      uint16_t* dst = as + (ti * 16 + rr) * kSmemLd + wc * 32;
      int64_t off0 = 0, off1 = 0;
      if (rt < p.m_tiles) {
        const int64_t t = (int64_t)rt * p.k_stages + kt;
        off0 = __ldg(p.tile_offsets + t);
        off1 = __ldg(p.tile_offsets + t + 1);
      }
      if (off0 < 0 || off1 <= off0) {  // empty (or padding) tile: warp-uniform zero fill
        uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
        for (int q = 0; q < 8; ++q) d[q] = make_uint4(0u, 0u, 0u, 0u);
        continue;
      }
      with_lane_words(p, sl, ti, off0, off1, lane,
                      [&](uint32_t w, int r, const auto& vals, int h) {
                        expand_word(w, r, vals, dst + 32 * h);
                      });
    }
  }

  // ---- decode configurations: A fragments straight from the bitmap (kFragA) ------------
  // One A register of m16n8k16: the two positions (row, bit b and b + 1 of word w) whose
  // first value has rank `r0` in the tile's run if bit b is set; zero where a bit is clear.
  template <typename Vals>
  __device__ static uint32_t frag_pair(uint32_t w, int b, int r0, const Vals& vals) {
    const uint32_t s = w >> b;
    const int r = r0 + __popc(w & ((1u << b) - 1u));
    const uint32_t v0 = (s & 1u) ? vals(r) : 0u;
    const uint32_t v1 = (s & 2u) ? vals(r + (int)(s & 1u)) : 0u;
    return v0 | (v1 << 16);
  }

  // The A registers of warp `warp`'s row tile in tile column `kt` (slot `sl`):
  // use(c, a) for each k32 chunk c, a[h] = the m16n8k16 A registers of k16 step 2c + h.
  // Returns false, calling nothing, for a tile past the last row tile or an empty one
  // (warp-uniform).  Lane (g, t) holds rows g and g + 8: 4 bitmap words each.  Row bases
  // come from one inclusive scan over g of both rows' popcounts packed in one int (each
  // partial sum <= 1024); lane 28 (g = 7) ends with the totals of rows 0-7 (low half) and
  // 8-15 (high half).  No barrier inside.
  template <typename Use>
  __device__ static bool frag_tile(const BitmapParams& p, const Slot& sl, int m0, int warp,
                                   int kt, int lane, Use&& use) {
    const int rt = m0 / 16 + warp;
    if (rt >= p.m_tiles) return false;  // past the last row tile
    const int64_t tix = (int64_t)rt * p.k_stages + kt;
    const int64_t off0 = __ldg(p.tile_offsets + tix), off1 = __ldg(p.tile_offsets + tix + 1);
    if (off0 < 0 || off1 <= off0) return false;  // empty tile
    const int g = lane >> 2, t = lane & 3;
    const uint4 wg = *reinterpret_cast<const uint4*>(sl.bs + (warp * 16 + g) * 4);
    const uint4 wh = *reinterpret_cast<const uint4*>(sl.bs + (warp * 16 + g + 8) * 4);
    const uint32_t rg[4] = {wg.x, wg.y, wg.z, wg.w}, rh[4] = {wh.x, wh.y, wh.z, wh.w};
    int pg[4], ph[4];  // values of the row before each word
    pg[0] = ph[0] = 0;
#pragma unroll
    for (int q = 1; q < 4; ++q) {
      pg[q] = pg[q - 1] + __popc(rg[q - 1]);
      ph[q] = ph[q - 1] + __popc(rh[q - 1]);
    }
    const int cg = pg[3] + __popc(rg[3]), ch = ph[3] + __popc(rh[3]);
    int incl = cg | (ch << 16);
#pragma unroll
    for (int d = 4; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    const int tot = __shfl_sync(0xffffffffu, incl, 28);
    const int lo = tot & 0xffff;
    const int base = (int)(off0 & 7);  // the slot starts at the first value's granule
    const int bg = base + (incl & 0xffff) - cg;
    const int bh = base + lo + (incl >> 16) - ch;
    auto build = [&](const auto& vals) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // k32 chunk c: k16 steps 2c, 2c + 1 = word c, halves
        uint32_t a[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int b = 16 * h + 2 * t;
          a[h][0] = frag_pair(rg[c], b, bg + pg[c], vals);
          a[h][1] = frag_pair(rh[c], b, bh + ph[c], vals);
          a[h][2] = frag_pair(rg[c], b + 8, bg + pg[c], vals);
          a[h][3] = frag_pair(rh[c], b + 8, bh + ph[c], vals);
        }
        use(c, a);
      }
    };
    if (staged_in_smem(off0, off1, lo + (tot >> 16), p.vcap)) {  // warp-uniform
      build(SmemValues{sl.vs + warp * p.vcap});
    } else {
      const int64_t g0 = off0 & ~int64_t(7);
      build(GlobalValues{p.values + g0, p.num_values - g0});
    }
    return true;
  }

  // mma.sync path: warp `warp` multiplies its row tile into acc (B by ldmatrix).
  __device__ static void frag_stage(const BitmapParams& p, const Slot& sl, int m0, int warp,
                                    int kt, int lane, float (&acc)[MT][NT][4]) {
    frag_tile(p, sl, m0, warp, kt, lane, [&](int c, const uint32_t (&a)[2][4]) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t bb[4];
        const uint16_t* row = sl.xs + (nt * 8 + (lane & 7)) * kSmemLd;
        ldmatrix_x4(bb, smem_addr(row + c * 32 + 8 * (lane >> 3)));
        mma_16816<T>(acc[0][nt], a[0], bb[0], bb[1]);
        mma_16816<T>(acc[0][nt], a[1], bb[2], bb[3]);
      }
    });
  }

#if defined(OWL_WGMMA_DEVICE)
  // wgmma path (WG): the block's four warps are one warpgroup, warp w supplying m16 tile w
  // of the m64 x BN product; each k16 step is one wgmma.mma_async m64nBNk16 with B read
  // from the core-matrix activation tile.  Every warp issues every wgmma (a collective):
  // an empty or out-of-range tile multiplies zeros.
  __device__ static void wgmma_stage(const BitmapParams& p, const Slot& sl, int m0, int warp,
                                     int kt, int lane, float (&acc)[BN / 2]) {
    uint32_t a[4][2][4];
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 4; ++r) a[c][h][r] = 0u;
    frag_tile(p, sl, m0, warp, kt, lane, [&](int c, const uint32_t (&ac)[2][4]) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 4; ++r) a[c][h][r] = ac[h][r];
    });
    const uint32_t xs = smem_addr(sl.xs);
    // The wgmmas read A and the accumulators asynchronously: pinned before the fence
    // (their writes may not sink past it; ptxas would serialize the wgmmas) and after the
    // wait.
    auto keep_operands = [&] {
      wgmma_keep(acc);
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h) wgmma_keep(a[c][h]);
    };
    keep_operands();
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint64_t desc =
            smem_desc(xs + (2 * (2 * c + h)) * kCoreLBO<BN>, kCoreLBO<BN>, kCoreSBO);
        wgmma_m64k16<T, BN>(acc, a[c][h], desc);
      }
    wgmma_commit();
    wgmma_wait_all();  // the slot may be refilled after the next barrier
    keep_operands();
  }
#endif

  __device__ static void compute(const uint16_t* xs, const uint16_t* as, int wm, int wn, int lane,
                                 float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int kk = 0; kk < kStageK; kk += 32) {
      // A: two k16 steps per m tile.  ldmatrix.x4 matrix j = rows 8*(j&1) .. +8,
      // columns 8*(j>>1) .. +8 -> registers a0..a3 of m16n8k16.
      uint32_t a[MT][2][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = wm * MT * 16 + i * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
          ldmatrix_x4(a[i][h], smem_addr(as + row * kSmemLd + kk + 16 * h + 8 * (lane >> 4)));
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // B: matrix j = tokens (lane & 7) x k [kk + 8j, +8): registers {b0, b1} of the
        // first k16 step, then of the second.
        uint32_t b[4];
        const uint16_t* row = xs + (wn * NT * 8 + nt * 8 + (lane & 7)) * kSmemLd;
        ldmatrix_x4(b, smem_addr(row + kk + 8 * (lane >> 3)));
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_16816<T>(acc[i][nt], a[i][0], b[0], b[1]);
          mma_16816<T>(acc[i][nt], a[i][1], b[2], b[3]);
        }
      }
    }
  }

  // ---- CUDA-core path for up to TOK <= BN tokens (bitmap_gemv_kernel) ----------------
  __host__ __device__ static int gemv_smem_bytes(int vcap) {
    return ring_bytes(vcap) > kCBytes ? ring_bytes(vcap) : kCBytes;
  }

  // acc[t] += value * x[t][column] over the set bits of word `w` (32 columns from `xs`).
  template <int TOK, typename Vals>
  __device__ static void fma_word(uint32_t w, int r, const Vals& vals, const uint16_t* xs,
                                  float (&acc)[TOK]) {
    while (w != 0u) {
      const int b = __ffs(w) - 1;
      w &= w - 1u;
      const float v = Traits<T>::bits_to_float(vals(r++));
#pragma unroll
      for (int t = 0; t < TOK; ++t)
        acc[t] = fmaf(v, Traits<T>::bits_to_float(xs[t * kSmemLd + b]), acc[t]);
    }
  }

  template <int TOK>
  __device__ static void run_gemv(const BitmapParams& p) {
    static_assert(kTiles == kWarps && TOK <= BN, "one row tile per warp; tokens in the x tile");
    extern __shared__ __align__(16) uint8_t smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int st0 = blockIdx.z * p.stages_per_split;
    const int st1 = min(p.k_stages, st0 + p.stages_per_split);
    const int nst = st1 - st0;
    const int rr = lane >> 1, wc = (lane & 1) * 2;  // this lane: row rr, words wc, wc + 1
    const int rt = m0 / 16 + warp;                  // this warp's row tile
    float acc[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = 0.f;

    for_each_stage(p, smem, m0, n0, st0, nst, tid, [&](const Slot& cur, int kt) {
      if (rt >= p.m_tiles) return;  // warp-uniform: past the last row tile
      const int64_t t = (int64_t)rt * p.k_stages + kt;
      const int64_t off0 = __ldg(p.tile_offsets + t), off1 = __ldg(p.tile_offsets + t + 1);
      if (off0 < 0 || off1 <= off0) return;  // empty tile (warp-uniform)
      const uint16_t* xs = cur.xs + wc * 32;
      with_lane_words(p, cur, warp, off0, off1, lane,
                      [&](uint32_t w, int r, const auto& vals, int h) {
                        fma_word<TOK>(w, r, vals, xs + 32 * h, acc);
                      });
    });
    // Lanes 2i and 2i + 1 hold the two halves of row i of the warp's tile.
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], 1);
    cp_async_wait<0>();
    __syncthreads();  // the ring is free: cs reuses it
    constexpr int LD = BM + 4;
    float* cs = reinterpret_cast<float*>(smem);
    for (int i = tid; i < BN * LD; i += kThreads) cs[i] = 0.f;
    __syncthreads();
    if ((lane & 1) == 0) {
#pragma unroll
      for (int t = 0; t < TOK; ++t) cs[t * LD + warp * 16 + rr] = acc[t];
    }
    __syncthreads();
    epilogue<T, BM, BN, kThreads>(cs, p.ep, m0, n0, blockIdx.z, blockIdx.y * gridDim.x + blockIdx.x,
                                  tid);
  }

  __device__ static void run(const BitmapParams& p) {
    extern __shared__ __align__(16) uint8_t smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WM, wn = warp / WM;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int st0 = blockIdx.z * p.stages_per_split;
    const int st1 = min(p.k_stages, st0 + p.stages_per_split);
    const int nst = st1 - st0;

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

    if constexpr (WG) {
      static_assert(kFragA && kWarps == 4 && (BN == 64 || BN == 128), "one warpgroup, m64");
#if defined(OWL_WGMMA_DEVICE)
      float accw[BN / 2];
#pragma unroll
      for (int q = 0; q < BN / 2; ++q) accw[q] = 0.f;
      for_each_stage<true>(p, smem, m0, n0, st0, nst, tid, [&](const Slot& cur, int kt) {
        wgmma_stage(p, cur, m0, warp, kt, lane, accw);
      });
      // the m64nN accumulators are the m16n8 ones of warp w, n8 block j = q / 4
#pragma unroll
      for (int q = 0; q < BN / 2; ++q) acc[0][q / 4][q % 4] = accw[q];
#else
      __trap();  // not built for sm_90a: bitmap_plan never offers this configuration
#endif
    } else if constexpr (kFragA) {
      static_assert(kTiles == kWarps, "one row tile per warp");
      for_each_stage(p, smem, m0, n0, st0, nst, tid, [&](const Slot& cur, int kt) {
        frag_stage(p, cur, m0, warp, kt, lane, acc);
      });
    } else {
      // (the barrier at the top of each stage also frees `as` from the previous stage)
      uint16_t* as = reinterpret_cast<uint16_t*>(smem + ring_bytes(p.vcap));
      for_each_stage(p, smem, m0, n0, st0, nst, tid, [&](const Slot& cur, int kt) {
        decode(p, cur, as, m0, kt, tid);
        __syncthreads();  // decoded tile visible to all warps
        compute(cur.xs, as, wm, wn, lane, acc);
      });
    }
    store_block<T, MT, NT, BM, BN, kThreads>(smem, acc, p.ep, wm, wn, m0, n0, tid);
  }
};

// Resident blocks per SM that a configuration's registers are budgeted for
// (__launch_bounds__; the planner never counts on more).  Tiles of one m16 tile per warp
// ask for 4 up to 32 tokens (<= 128 registers: without it ptxas chose 80 and spilled on
// sm_80), 3 at 64 tokens and 2 at 128 (their accumulators spill at 128 registers); the
// prefill tiles keep ptxas's choice (0).
constexpr int bitmap_min_blocks(int mt, int nt) {
  return mt != 1 ? 0 : (nt <= 4 ? 4 : (nt <= 8 ? 3 : 2));
}

template <typename T, int WM, int WN, int MT, int NT, int STAGES, bool WG>
__global__ void __launch_bounds__(WM* WN * 32, bitmap_min_blocks(MT, NT))
    bitmap_kernel(const BitmapParams p) {
  BitmapKernel<T, WM, WN, MT, NT, STAGES, WG>::run(p);
}

// Launch `fn` on the plan's grid with `smem` bytes of dynamic shared memory (the plan must
// have been made for the same value-slot size); the kernel's limit is raised once to
// `max_smem`, the most any plan asks of it (full-size slots).
template <typename Kernel>
cudaError_t launch_planned(Kernel* fn, int threads, int smem, int max_smem,
                           std::atomic<unsigned long long>& smem_set, const BitmapParams& p,
                           const LaunchPlan& plan, cudaStream_t stream) {
  if (smem != plan.smem_bytes) return cudaErrorInvalidValue;  // plan made for another vcap
  const cudaError_t err = allow_smem(fn, max_smem, smem_set);
  if (err != cudaSuccess) return err;
  dim3 grid(plan.grid_m, plan.grid_n, plan.splits);
  fn<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The CUDA-core kernel: 64 rows (one row tile per warp) x up to 8 tokens, on the decode
// configuration's 4-stage ring (no dense tile, so less shared memory).
using GemvKernel = BitmapKernel<__half, 4, 1, 1, 1, 4>;  // layout only (same for bf16)
constexpr int kGemvTokens[] = {1, 2, 4, 8};
constexpr int kNumGemvConfigs = sizeof(kGemvTokens) / sizeof(kGemvTokens[0]);

constexpr int kGemvBlocksPerSm = 6;  // <= 85 registers (ptxas: 56-72)

template <typename T, int TOK>
__global__ void __launch_bounds__(128, kGemvBlocksPerSm) bitmap_gemv_kernel(const BitmapParams p) {
  BitmapKernel<T, 4, 1, 1, 1, 4>::template run_gemv<TOK>(p);
}

template <typename T, int TOK>
cudaError_t launch_gemv(const BitmapParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  static std::atomic<unsigned long long> smem_set{0};
  return launch_planned(&bitmap_gemv_kernel<T, TOK>, GemvKernel::kThreads,
                        GemvKernel::gemv_smem_bytes(p.vcap),
                        GemvKernel::gemv_smem_bytes(kMaxValsPerTile), smem_set, p, plan, stream);
}

template <typename T>
cudaError_t dispatch_gemv(const BitmapParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  switch (plan.config) {
    case 0: return launch_gemv<T, 1>(p, plan, stream);
    case 1: return launch_gemv<T, 2>(p, plan, stream);
    case 2: return launch_gemv<T, 4>(p, plan, stream);
    case 3: return launch_gemv<T, 8>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Configuration table (4 warps each).  Up to 128 tokens: each warp owns one m16 tile of a
// 64-row block and all of the block's tokens, building its A registers from the bitmap
// (kFragA); up to 32 tokens a 4-deep ring keeps three stages of weight bytes in flight
// (decode is bound by bytes in flight per SM, not by math), the 64- and 128-token tiles
// have larger activation tiles, so three and two stages.  Beyond 128 tokens: 2 x 2 warps
// with 2 m16 tiles and 8 n8 tiles each (64 rows x 128 tokens) sharing a decoded dense
// tile, so one decode feeds 16 MMAs per warp and k16 step.
// The last two are the 64- and 128-token register tiles on Hopper's warpgroup MMA (one
// wgmma.mma_async per k16 step for the whole block, B read by the tensor cores from
// shared memory once per block instead of once per warp by ldmatrix); sm_90a builds on
// compute capability 9.0 only, never chosen automatically (backend "cuda_mma_wgmma").
struct BitmapConfig {
  int wm, wn, mt, nt, stages;
  int max_tokens;
  bool wg = false;
};

constexpr BitmapConfig kBitmapConfigs[] = {
    {4, 1, 1, 1, 4, 8},
    {4, 1, 1, 2, 4, 16},
    {4, 1, 1, 4, 4, 32},
    {4, 1, 1, 8, 3, 64},
    {4, 1, 1, 16, 2, 128},
    {2, 2, 2, 8, 2, 1 << 30},
    {4, 1, 1, 8, 3, 0, true},
    {4, 1, 1, 16, 2, 0, true},
};
constexpr int kNumBitmapConfigs = sizeof(kBitmapConfigs) / sizeof(kBitmapConfigs[0]);
constexpr int kNumAutoBitmapConfigs = 6;  // the automatic choice never goes past these
constexpr int kBitmapWgmma64 = 6, kBitmapWgmma128 = 7;

// Same arithmetic as BitmapKernel::smem_bytes (launch_planned checks that they agree).
int bitmap_smem_bytes(const BitmapConfig& c, int vcap) {
  const int bm = c.wm * c.mt * 16, bn = c.wn * c.nt * 8;
  const int slot = bn * (c.wg ? kStageK : kSmemLd) * 2 + (bm / 16) * vcap * 2 + bm * 4 * 4;
  const bool frag_a = c.wn == 1 && c.mt == 1;  // no dense tile (BitmapKernel::kFragA)
  const int main_bytes = c.stages * slot + (frag_a ? 0 : bm * kSmemLd * 2);
  const int cb = bn * (bm + 4) * 4;
  return main_bytes > cb ? main_bytes : cb;
}

template <typename T, int WM, int WN, int MT, int NT, int STAGES, bool WG = false>
cudaError_t launch_bitmap(const BitmapParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  using K = BitmapKernel<T, WM, WN, MT, NT, STAGES, WG>;
  static std::atomic<unsigned long long> smem_set{0};
  return launch_planned(&bitmap_kernel<T, WM, WN, MT, NT, STAGES, WG>, K::kThreads,
                        K::smem_bytes(p.vcap), K::smem_bytes(kMaxValsPerTile), smem_set, p, plan,
                        stream);
}

template <typename T>
cudaError_t dispatch_bitmap(const BitmapParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  switch (plan.config) {
    case 0: return launch_bitmap<T, 4, 1, 1, 1, 4>(p, plan, stream);
    case 1: return launch_bitmap<T, 4, 1, 1, 2, 4>(p, plan, stream);
    case 2: return launch_bitmap<T, 4, 1, 1, 4, 4>(p, plan, stream);
    case 3: return launch_bitmap<T, 4, 1, 1, 8, 3>(p, plan, stream);
    case 4: return launch_bitmap<T, 4, 1, 1, 16, 2>(p, plan, stream);
    case 5: return launch_bitmap<T, 2, 2, 2, 8, 2>(p, plan, stream);
    case kBitmapWgmma64: return launch_bitmap<T, 4, 1, 1, 8, 3, true>(p, plan, stream);
    case kBitmapWgmma128: return launch_bitmap<T, 4, 1, 1, 16, 2, true>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

namespace {

// Grid, shared memory and split-K of a plan whose config, block_m and block_n are set:
// as many blocks per SM as shared memory allows (at most `max_per_sm`, the kernel's
// register limit from its __launch_bounds__), rounded to whole waves.
void finish_plan(int T, int N, int K, int requested_splits, int smem_bytes, int max_per_sm,
                 const DeviceLimits& lim, LaunchPlan* out) {
  out->grid_m = (N + out->block_m - 1) / out->block_m;
  out->grid_n = (T + out->block_n - 1) / out->block_n;
  out->smem_bytes = smem_bytes;
  const int k_stages = (K + kStageK - 1) / kStageK;
  int per_sm = (lim.max_smem_optin + 1024) / (smem_bytes + 1024);
  per_sm = per_sm < 1 ? 1 : (per_sm > max_per_sm ? max_per_sm : per_sm);
  choose_splits(out->grid_m * out->grid_n, k_stages, requested_splits, lim.num_sms, per_sm, 4,
                out, true);
  out->partial_elems = out->splits > 1 ? (int64_t)out->splits * T * N : 0;
}

BitmapParams make_params(const BitmapArgs& a, const LaunchPlan& plan) {
  BitmapParams p;
  p.x = static_cast<const uint16_t*>(a.x);
  p.bitmap = reinterpret_cast<const uint32_t*>(a.bitmap);
  p.values = static_cast<const uint16_t*>(a.values);
  p.tile_offsets = a.tile_offsets;
  p.num_values = a.num_values;
  p.ep.y = a.y;
  p.ep.bias = a.bias;
  p.ep.partials = a.partials;
  p.ep.counters = a.counters;
  p.ep.T = a.T;
  p.ep.N = a.N;
  p.ep.splits = plan.splits;
  p.T = a.T;
  p.N = a.N;
  p.K = a.K;
  p.m_tiles = (a.N + 15) / 16;
  p.k_stages = (a.K + kStageK - 1) / kStageK;
  p.stages_per_split = plan.stages_per_split;
  p.vcap = vals_capacity(a.max_tile_values);
  p.vec16 = (a.K % 8) == 0;
  return p;
}

}  // namespace

cudaError_t bitmap_plan(int T, int N, int K, int requested_splits, int64_t max_tile_values,
                        int device, LaunchPlan* plan, int config) {
  if (T <= 0 || N <= 0 || K <= 0 || K % 4 != 0) return cudaErrorInvalidValue;
  if (config >= kNumBitmapConfigs) return cudaErrorInvalidValue;
  DeviceLimits lim;
  cudaError_t err = device_limits(device, &lim);
  if (err != cudaSuccess) return err;
  const int vcap = vals_capacity(max_tile_values);
  int ci = config;
  if (ci < 0) {
    ci = 0;
    while (ci + 1 < kNumAutoBitmapConfigs && T > kBitmapConfigs[ci].max_tokens) ++ci;
    while (ci > 0 && bitmap_smem_bytes(kBitmapConfigs[ci], vcap) > lim.max_smem_optin) --ci;
  } else {  // asked for by index: it must run here as it is
    if (kBitmapConfigs[ci].wg && !wgmma_available(device)) return cudaErrorNotSupported;
    if (bitmap_smem_bytes(kBitmapConfigs[ci], vcap) > lim.max_smem_optin)
      return cudaErrorNotSupported;
  }
  const BitmapConfig& c = kBitmapConfigs[ci];
  LaunchPlan out;
  out.config = ci;
  out.block_m = c.wm * c.mt * 16;
  out.block_n = c.wn * c.nt * 8;
  const int min_blocks = bitmap_min_blocks(c.mt, c.nt);
  finish_plan(T, N, K, requested_splits, bitmap_smem_bytes(c, vcap),
              min_blocks > 0 ? min_blocks : 4, lim, &out);
  *plan = out;
  return check_grid(out);
}

int bitmap_wgmma_config(int T, int device) {
  if (T <= 0 || T > 128 || !wgmma_available(device)) return -1;
  return T <= 64 ? kBitmapWgmma64 : kBitmapWgmma128;
}

cudaError_t bitmap_run(const BitmapArgs& a, const LaunchPlan& plan, cudaStream_t stream) {
  if (plan.splits > 1 && (a.partials == nullptr || a.counters == nullptr))
    return cudaErrorInvalidValue;
  const BitmapParams p = make_params(a, plan);
  if (a.dtype == DType::kHalf) return dispatch_bitmap<__half>(p, plan, stream);
  return dispatch_bitmap<__nv_bfloat16>(p, plan, stream);
}

cudaError_t bitmap_gemv_plan(int T, int N, int K, int requested_splits, int64_t max_tile_values,
                             int device, LaunchPlan* plan, int config) {
  if (T <= 0 || T > kGemvTokens[kNumGemvConfigs - 1] || N <= 0 || K <= 0 || K % 4 != 0 ||
      config >= 0)
    return cudaErrorInvalidValue;
  DeviceLimits lim;
  cudaError_t err = device_limits(device, &lim);
  if (err != cudaSuccess) return err;
  int ci = 0;
  while (T > kGemvTokens[ci]) ++ci;
  LaunchPlan out;
  out.config = ci;
  out.block_m = GemvKernel::BM;
  out.block_n = GemvKernel::BN;
  finish_plan(T, N, K, requested_splits,
              GemvKernel::gemv_smem_bytes(vals_capacity(max_tile_values)), kGemvBlocksPerSm, lim,
              &out);
  *plan = out;
  return check_grid(out);
}

cudaError_t bitmap_gemv_run(const BitmapArgs& a, const LaunchPlan& plan, cudaStream_t stream) {
  if (plan.splits > 1 && (a.partials == nullptr || a.counters == nullptr))
    return cudaErrorInvalidValue;
  if (plan.config < 0 || plan.config >= kNumGemvConfigs || a.T > kGemvTokens[plan.config])
    return cudaErrorInvalidValue;
  const BitmapParams p = make_params(a, plan);
  if (a.dtype == DType::kHalf) return dispatch_gemv<__half>(p, plan, stream);
  return dispatch_gemv<__nv_bfloat16>(p, plan, stream);
}

}  // namespace owl
