// The loops every ISA shares (internal to csrc/cpu): which packed bytes feed which outputs.
// An ISA supplies an Ops type per dtype:
//
//   VT, XT     value and activation element types (XT: the compute dtype)
//   Acc, W     an accumulator vector of fp32 lanes, and 32 decoded weights
//   kMaxAcc    accumulators its register file holds
//   zero(), sum(acc)                 a fresh accumulator; its lanes added up
//   decode(m, p)                     the 32 weights of mask m from the values at p,
//                                    p += popcount(m); may read any of the kDecodeReach
//                                    values from p on, however few it uses
//   decode_exact(m, p)               the same, never reading past the popcount(m) values
//                                    it uses (2:4 rows; a weight's last values)
//   load(p)                          the 32 weights p[0:32] of a dense row (no mask)
//   fma(acc, w, x)                   acc += w . x[0:32]
//
//   store_f32(w, out, cols)          (XT = float only) writes the first cols (<= 32) of
//                                    the decoded weights to out as fp32
//
// and, for unpacking, a copy type per value width (Copy16, Copy32) with VT, OT (= VT), W,
// decode, decode_exact and store(w, out, cols), which writes the first cols (<= 32)
// weights as they are stored (no conversion); WidenCopy below makes one that writes 16-bit
// values as fp32 from the Ops of their dtype.
#pragma once

#include <algorithm>

#include "kernel_common.h"

namespace owl_cpu {
namespace {
namespace loops {

// Software prefetch distances of the bitmap kernels (tuned on Zen 4, see benchmarks/).
constexpr int kPrefetchValues = 1024;  // values ahead of the one being read (16-row groups)
constexpr int64_t kChunkBytes = 16384; // activations of the column tiles a row group visits
// Rows streamed one after the other (dense, and 2:4 below kRowGroupTokens): bytes ahead of
// the word being read, fetched with the non-temporal hint (a weight streamed once per call
// then leaves the caches to the model's other data; +2% a decode step of SmolLM2-135M's
// tied LM head, interleaved A/B; 2:4 4096 x 11008, one token, one thread, ns a word: bf16
// 2.45 -> 1.8, fp32 6.3 -> 3.6 with it, 4096-wide rows unchanged).
constexpr int64_t kRowPrefetchBytes = 2048;
// The values a decode(m, p) may read from p on (a 32-column word's worth): the loops call
// decode_exact where fewer are left before the weight's end.
constexpr int64_t kDecodeReach = 32;
// From this many tokens on, a bitmap row group goes word by word across its rows (sharing
// each word's activation loads), below it row by row (4096 x 4096 at 70%, one thread, ns a
// word: 2 tokens 0.78 row by row / 0.97 word by word, 4: 1.17 / 1.20, 8: 2.62 / 1.85).
constexpr int kWordMajorTokens = 5;
// From this many tokens on, the 2:4 kernel takes rows in groups, word by word across them
// (4096 x 4096, one thread, ns a word, one row / groups: bf16 4 tokens 2.17 / 2.11, 8: 4.52
// / 3.59; fp32 4: 7.0-8.0 / 4.1-4.6, 8: 10.2-12.1 / 8.0-8.4); a single row streams alone.
constexpr int kRowGroupTokens = 4;
// 2:4 row groups: values fetched ahead of the word being read, in each row.
constexpr int64_t kSp24PrefetchValues = 512;
// 2:4 rows in two token blocks: the activations of the words a chunk spans (L2-resident;
// one thread, 16 tokens: 5.5 ns a word at 64 KB, 5.9 at 16 KB).
constexpr int64_t kSp24ChunkBytes = 65536;

// Rows [row0, row0 + R) of one 16-row bitmap strip, T tokens, column tiles [ct0, ct1).
// The activations hold XS >= T tokens (x: the first of this call's T; word c's vectors
// are XS apart).  cur[ct]: where the strip's first unvisited row starts in column tile ct
// (values go row by row inside a tile, so the R rows' values follow each other), updated.
// accmem: the rows' accumulators, row i's T at accmem[i * XS], read and written back
// (registers in between).  Every word's values must end at or before nnz (a weight whose
// bits outnumber its offsets would otherwise read past the values): false, reading
// nothing more, when one does not.
template <class Ops, int R, int T, int XS = T>
bool bitmap_rows(const BitmapView& w, const typename Ops::XT* x, int64_t strip, int row0,
                 int64_t ct0, int64_t ct1, int32_t* cur, typename Ops::Acc* accmem,
                 int64_t ahead = 0) {
  // More accumulators than the register file holds (one token, whole strips, on AVX2 and
  // the portable path): the rows go in a loop, not unrolled, each row's accumulators read
  // from accmem and written back around its words.  Unrolled over the 16 rows, the AVX2
  // bf16 kernel was 17760 instructions of code, far more than the op cache and
  // L1i hold: front-end bound (4096 x 4096 at 70%, one thread, hot, Zen 3: 5.6 ns a word;
  // 3.7-4.5 rolled, in separate processes on a VM whose speed moves +-30%).
  constexpr bool kInMemory = R > 1 && R * T > Ops::kMaxAcc;
  static_assert(!kInMemory || T < kWordMajorTokens, "word by word needs register accumulators");
  typename Ops::Acc acc[kInMemory ? 1 : R][T];
  if constexpr (!kInMemory)
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) acc[i][t] = accmem[i * XS + t];
  const int64_t nct = w.col_tiles(), wpr = nct * 4, last_tile = w.strips() * nct;
  const uint32_t* bm =
      reinterpret_cast<const uint32_t*>(w.bitmap) + (strip * kTileN + row0) * wpr;
  const auto* vals = static_cast<const typename Ops::VT*>(w.values);
  const typename Ops::VT* end = vals + w.nnz();
  // This strip's bitmap is 16 rows of 4 * nct words: while it is read tile by tile, the
  // next group's (or strip's) words are fetched, 256 bytes per tile.
  const uint32_t* next_bitmap = bm + R * wpr;
  for (int64_t ct = ct0; ct < ct1; ++ct) {
    const typename Ops::VT* p = vals + cur[ct];
    if (ahead > 0) {
      // The values of the tile `ahead` tiles on (all its rows), which the groups reach one
      // chunk later: groups of fewer than 16 rows read a chunk's values in short pieces
      // from several tiles at once, an order the hardware prefetchers do not follow.
      const int64_t t = strip * nct + ct + ahead;
      if (t < last_tile) {
        const int64_t a = w.tile_offsets[t], b = w.tile_offsets[t + 1];
        if (a >= 0 && b <= w.nnz())  // a corrupt weight (refused later) fetches nothing
          for (const char* q = reinterpret_cast<const char*>(vals + a);
               q < reinterpret_cast<const char*>(vals + b); q += 64)
            __builtin_prefetch(q);
      }
    }
    const uint32_t* words = bm + ct * 4;
    const typename Ops::XT* xc = x + ct * 4 * XS * 32;  // 4 words of XS tokens
    // R rows of a tile hold at most R * 128 values: only near the end is a check needed,
    // and there each word decodes exactly (never reading past the last value).
    const bool near_end = end - p < R * kTileK + kDecodeReach;
    for (int line = 0; line < 4; ++line) __builtin_prefetch(next_bitmap + ct * 64 + line * 16);
    if constexpr (R > 1 && T >= kWordMajorTokens) {
      // Word by word across the R rows: a word's T activation vectors are loaded once for
      // all R rows (R * T accumulators + T activations + R weights fit the registers).
      // Each row's values start where the rows before it in this tile end.
      const typename Ops::VT* pr[R];
      pr[0] = p;
#pragma GCC unroll 16
      for (int i = 1; i < R; ++i) {
        const uint32_t* wi = words + (i - 1) * wpr;
        pr[i] = pr[i - 1] + __builtin_popcount(wi[0]) + __builtin_popcount(wi[1]) +
                __builtin_popcount(wi[2]) + __builtin_popcount(wi[3]);
      }
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
#pragma GCC unroll 16
        for (int i = 0; i < R; ++i) {
          const uint32_t m = words[i * wpr + k];
          if (near_end && pr[i] + __builtin_popcount(m) > end) return false;
          const typename Ops::W e =
              near_end ? Ops::decode_exact(m, pr[i]) : Ops::decode(m, pr[i]);
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) Ops::fma(acc[i][t], e, xc + (k * XS + t) * 32);
        }
      }
      p = pr[R - 1];
    } else {
      // Row by row: each decoded word meets its T activation vectors (L1-resident: the
      // chunking below keeps them there); row i's 4 words into its T accumulators a.
      const auto row = [&](int i, typename Ops::Acc* a) {
        if constexpr (R == kTileN) __builtin_prefetch(p + kPrefetchValues);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          const uint32_t m = words[i * wpr + k];
          if (near_end && p + __builtin_popcount(m) > end) return false;
          const typename Ops::W e = near_end ? Ops::decode_exact(m, p) : Ops::decode(m, p);
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) Ops::fma(a[t], e, xc + (k * XS + t) * 32);
        }
        return true;
      };
      if constexpr (kInMemory) {
#pragma GCC unroll 1
        for (int i = 0; i < R; ++i) {
          typename Ops::Acc a[T];
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) a[t] = accmem[i * XS + t];
          if (!row(i, a)) return false;
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) accmem[i * XS + t] = a[t];
        }
      } else {
        // The R x T accumulators in registers.
#pragma GCC unroll 16
        for (int i = 0; i < R; ++i)
          if (!row(i, acc[i])) return false;
      }
    }
    cur[ct] = int32_t(p - vals);
  }
  if constexpr (!kInMemory)
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) accmem[i * XS + t] = acc[i][t];
  return true;
}

// The offsets of strip s's tiles, checked to lie in [0, nnz] (cur[ct] = start of tile ct).
inline bool strip_starts(const BitmapView& w, int64_t s, int32_t* cur) {
  const int64_t nct = w.col_tiles();
  for (int64_t ct = 0; ct < nct; ++ct) {
    cur[ct] = w.tile_offsets[s * nct + ct];
    if (cur[ct] < 0 || cur[ct] > w.nnz()) return false;
  }
  return true;
}

// After a whole strip: each tile's values must end where the next tile's begin.
inline bool strip_ends(const BitmapView& w, int64_t s, const int32_t* cur) {
  const int64_t nct = w.col_tiles();
  for (int64_t ct = 0; ct < nct; ++ct)
    if (cur[ct] != w.tile_offsets[s * nct + ct + 1]) return false;
  return true;
}

// Rows per group for T tokens: as many as keep R * T <= max accumulators (a power of two).
constexpr int group_rows(int max_acc, int tokens) {
  int r = 16;
  while (r > 1 && r * tokens > max_acc) r /= 2;
  return r;
}

// The tokens of a bitmap call's first block: T, or half of T (rounded up) where T tokens
// leave one row a group and half of them two or more, the rows of a group then sharing each
// word's activations.  The blocks take turns over each chunk of column tiles, so its values
// come from memory once (4096 x 4096 bf16, one thread, 16 tokens: 4.5 ns a word in one
// block; two passes over the weight, 3.7, but at 50% they read its values twice).
template <class Ops, int T>
constexpr int first_block() {
  return group_rows(Ops::kMaxAcc, T) == 1 && group_rows(Ops::kMaxAcc, (T + 1) / 2) > 1
             ? (T + 1) / 2
             : T;
}

// Whole strips.  With fewer than 16 rows per group, the groups take turns over chunks of
// column tiles small enough that the chunk's activations (all T tokens) stay in L1 between
// them (kChunkBytes), the accumulators waiting in memory meanwhile; with two token blocks,
// the blocks take turns over each chunk the same way.  The first group of a chunk fetches
// the next chunk's values (11008 x 4096 bf16 at 70%, from memory, 2 threads, 4 tokens:
// 3.3 ms with each group fetching only its own part of the tiles ahead, 1.1 with this).
template <class Ops, int T>
bool bitmap_strips(DType dtype, const BitmapView& w, const Activations& x, const void* bias,
                   void* y, int64_t ldy, int64_t row_begin, int64_t row_end, int32_t* cur) {
  constexpr int B1 = first_block<Ops, T>(), B2 = T - B1;
  // One token: a whole strip a group, row by row (a row's accumulator lives in a register
  // only while its words are read), its values one sequential stream, wherever the register
  // file holds fewer than 16 accumulators (AVX2: 8-row groups took chunks of tiles in turn,
  // the first fetching the next chunk's values ahead: 4096 x 4096 bf16 at 70%, one thread,
  // weights rotated, speed over torch's bf16 GEMV in the same process 1.2-1.6x in 8-row
  // groups, 1.7-2.2x as whole strips, three processes each, on a 2-core Zen 3).
  constexpr int R1 = B1 == 1 ? kTileN : group_rows(Ops::kMaxAcc, B1);
  constexpr int R2 = group_rows(Ops::kMaxAcc, B2 > 0 ? B2 : 1);
  const auto* xs = static_cast<const typename Ops::XT*>(x.data);
  const int64_t nct = w.col_tiles();
  constexpr int64_t kChunk =
      std::max<int64_t>(1, kChunkBytes / (4 * T * 32 * int64_t(sizeof(typename Ops::XT))));
  const int64_t chunk = R1 == kTileN ? nct : kChunk;
  static_assert(B2 == 0 || (R1 < kTileN && kChunk <= 64), "two blocks need small chunks");
  int32_t chunk_starts[B2 > 0 ? kChunk : 1];  // a chunk's tile starts, for the second block
  alignas(64) typename Ops::Acc accmem[kTileN * T];
  float sums[kTileN * T];
  for (int64_t s = row_begin / kTileN; s * kTileN < row_end; ++s) {
    if (!strip_starts(w, s, cur)) return false;
    for (int j = 0; j < kTileN * T; ++j) accmem[j] = Ops::zero();
    for (int64_t c0 = 0; c0 < nct; c0 += chunk) {
      const int64_t c1 = std::min(nct, c0 + chunk);
      if constexpr (B2 > 0) std::copy(cur + c0, cur + c1, chunk_starts);
      for (int r0 = 0; r0 < kTileN; r0 += R1)
        if (!bitmap_rows<Ops, R1, B1, T>(w, xs, s, r0, c0, c1, cur, accmem + r0 * T,
                                         R1 < kTileN && r0 == 0 ? chunk : 0))
          return false;
      if constexpr (B2 > 0) {
        std::copy(chunk_starts, chunk_starts + (c1 - c0), cur + c0);
        for (int r0 = 0; r0 < kTileN; r0 += R2)
          if (!bitmap_rows<Ops, R2, B2, T>(w, xs + B1 * 32, s, r0, c0, c1, cur,
                                           accmem + r0 * T + B1))
            return false;
      }
    }
    if (!strip_ends(w, s, cur)) return false;
    for (int j = 0; j < kTileN * T; ++j) sums[j] = Ops::sum(accmem[j]);
    for (int i = 0; i < kTileN; ++i) {
      const int64_t n = s * kTileN + i;
      if (n < row_end) store_row(dtype, sums + i * T, T, bias, y, ldy, n);
    }
  }
  return true;
}

// The 32-bit column mask of 2:4 columns [32c, 32c + 32) from four meta bytes.
inline uint32_t meta24_word(const uint8_t* mr) {
  return uint32_t(kTables.meta24[mr[0]]) | uint32_t(kTables.meta24[mr[1]]) << 8 |
         uint32_t(kTables.meta24[mr[2]]) << 16 | uint32_t(kTables.meta24[mr[3]]) << 24;
}

// One row's dot products with T tokens, the row read front to back as one stream:
// word(c) gives the 32 decoded weights of whole word c (c < full), last() those of a
// partial last word (when `partial`).  A accumulators per token (alternating words) hide
// the multiply's latency.
template <class Ops, int T, class Word, class Last>
void stream_row(int64_t full, bool partial, const typename Ops::XT* x, const Word& word,
                const Last& last, float* sums) {
  constexpr int A = T <= 4 ? 2 : 1;
  typename Ops::Acc acc[A][T];
#pragma GCC unroll 16
  for (int a = 0; a < A; ++a)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[a][t] = Ops::zero();
  int64_t c = 0;
  for (; c + A <= full; c += A) {
#pragma GCC unroll 2
    for (int a = 0; a < A; ++a) {
      const typename Ops::W e = word(c + a);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) Ops::fma(acc[a][t], e, x + ((c + a) * T + t) * 32);
    }
  }
  for (; c < full; ++c) {
    const typename Ops::W e = word(c);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) Ops::fma(acc[0][t], e, x + (c * T + t) * 32);
  }
  if (partial) {
    const typename Ops::W e = last();
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) Ops::fma(acc[0][t], e, x + (full * T + t) * 32);
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    sums[t] = Ops::sum(acc[0][t]);
#pragma GCC unroll 2
    for (int a = 1; a < A; ++a) sums[t] += Ops::sum(acc[a][t]);
  }
}

// R rows' dot products with T of the XS tokens (x: the first of the T), words [c0, c1),
// word by word across the rows: each word's T activation vectors are loaded once for all R
// rows.  word(i, c): row i's decoded word c.  accmem: row i's T accumulators at
// accmem[i * XS], read and written back (registers in between).
template <class Ops, int R, int T, int XS, class Word>
void rows_words(int64_t c0, int64_t c1, const typename Ops::XT* x, const Word& word,
                typename Ops::Acc* accmem) {
  typename Ops::Acc acc[R][T];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[i][t] = accmem[i * XS + t];
  for (int64_t c = c0; c < c1; ++c) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const typename Ops::W e = word(i, c);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) Ops::fma(acc[i][t], e, x + (c * XS + t) * 32);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) accmem[i * XS + t] = acc[i][t];
}

// 2:4 row n, all T tokens: the 16 values of each 32 columns are contiguous in the row, so
// a row is read front to back, values and meta bytes each one sequential stream (rows one
// after the other: R rows interleaved, 2R streams, ran at ~16 GB/s on 4096-wide rows, where
// the hardware prefetchers lose track).  The last 32 columns of a row may be partial
// (K % 32 != 0).  Each word's values are found from its index alone (row + 16c), not
// chained through the popcounts before it.
// False when a group's two indices are not distinct (its mask then has fewer bits than the
// two values it stores): such a weight is corrupt, and the result would be wrong.
// Whether Ops decodes a 2:4 word from its meta bytes itself (decode24), else the words go
// through the 32-bit column mask (meta24_word) and decode_exact.
template <class Ops, class = void>
struct HasDecode24 : std::false_type {};
template <class Ops>
struct HasDecode24<Ops, std::void_t<decltype(&Ops::decode24)>> : std::true_type {};

template <class Ops>
struct Sp24Words {
  using VT = typename Ops::VT;
  explicit Sp24Words(const Sparse24View& w)
      : meta(w.meta), vals(static_cast<const VT*>(w.values)), k(w.k) {}
  const uint8_t* meta;
  const VT* vals;
  int64_t k, mb = (k + 7) / 8, half = k / 2, full = k / 32;
  // Row n's whole word c; its popcount added to bits (16 a word unless a group is corrupt).
  typename Ops::W word(int64_t n, int64_t c, uint32_t& bits) const {
    if constexpr (HasDecode24<Ops>::value)
      return Ops::decode24(meta + n * mb + c * 4, vals + n * half + c * 16, bits);
    const uint32_t m = meta24_word(meta + n * mb + c * 4);
    bits += uint32_t(__builtin_popcount(m));
    const VT* p = vals + n * half + c * 16;
    return Ops::decode_exact(m, p);
  }
  // Row n's partial last word (K % 32 != 0); ok false when its groups are corrupt.
  typename Ops::W last(int64_t n, bool& ok) const {
    const int cols = int(k - full * 32);
    const uint32_t m = meta24_mask(meta + n * mb, full * 32, cols);
    ok = ok && __builtin_popcount(m) == cols / 2;
    const VT* p = vals + n * half + full * 16;
    return Ops::decode_exact(m, p);
  }
};

template <class Ops, int T>
bool sp24_row(const Sparse24View& w, const typename Ops::XT* x, int64_t n, float* sums) {
  const Sp24Words<Ops> d(w);
  uint32_t bits = 0;
  bool ok = true;
  stream_row<Ops, T>(
      d.full, w.k % 32 != 0, x,
      [&](int64_t c) {
        // A hint only: addresses past the weight's end are never read.
        __builtin_prefetch(
            reinterpret_cast<const char*>(d.vals + n * d.half + c * 16) + kRowPrefetchBytes, 0, 0);
        return d.word(n, c, bits);
      },
      [&] { return d.last(n, ok); }, sums);
  return ok && bits == uint32_t(d.full) * 16;
}

// Rows [n0, n0 + R), word by word across them (each word's activations loaded once).
// Where T tokens split into two blocks (first_block), the blocks take turns over chunks of
// words (kSp24ChunkBytes of activations), so the rows' values come from memory once (4096 x
// 4096 bf16, one thread, 16 tokens: 8.7 ns a word in one block of one row; 5.5 in blocks,
// about as two passes of 8 that read the weight twice; 11008 x 4096 from memory, 2 threads:
// 4.4 ms against 4.6-5.8 in two passes).  sums: [R][T].
template <class Ops, int R, int T>
bool sp24_rows(const Sparse24View& w, const typename Ops::XT* x, int64_t n0, float* sums) {
  constexpr int B1 = first_block<Ops, T>(), B2 = T - B1;
  constexpr int64_t kChunk =
      B2 > 0 ? std::max<int64_t>(1, kSp24ChunkBytes / (T * 32 * int64_t(sizeof(typename Ops::XT))))
             : int64_t(1) << 40;
  const Sp24Words<Ops> d(w);
  uint32_t bits[R] = {};
  bool ok = true;
  alignas(64) typename Ops::Acc accmem[R * T];
  for (int j = 0; j < R * T; ++j) accmem[j] = Ops::zero();
  const auto whole = [&](int i, int64_t c) {
    // 2R streams at once, more than the hardware prefetchers follow: fetch each row's
    // values and meta bytes ahead (hints only: past a row's end they are never read).
    __builtin_prefetch(d.vals + (n0 + i) * d.half + c * 16 + kSp24PrefetchValues);
    __builtin_prefetch(d.meta + (n0 + i) * d.mb + c * 4 + kSp24PrefetchValues / 4);
    return d.word(n0 + i, c, bits[i]);
  };
  const auto again = [&](int i, int64_t c) {  // the second block: counted once already
    uint32_t unused = 0;
    return d.word(n0 + i, c, unused);
  };
  const auto last = [&](int i, int64_t) { return d.last(n0 + i, ok); };
  for (int64_t c0 = 0; c0 < d.full; c0 += kChunk) {
    const int64_t c1 = std::min(d.full, c0 + kChunk);
    rows_words<Ops, R, B1, T>(c0, c1, x, whole, accmem);
    if constexpr (B2 > 0) rows_words<Ops, R, B2, T>(c0, c1, x + B1 * 32, again, accmem + B1);
  }
  if (w.k % 32 != 0) {
    rows_words<Ops, R, B1, T>(d.full, d.full + 1, x, last, accmem);
    if constexpr (B2 > 0)
      rows_words<Ops, R, B2, T>(d.full, d.full + 1, x + B1 * 32, last, accmem + B1);
  }
  for (int j = 0; j < R * T; ++j) sums[j] = Ops::sum(accmem[j]);
  for (int i = 0; i < R; ++i) ok = ok && bits[i] == uint32_t(d.full) * 16;
  return ok;
}

template <class Ops, int T>
bool sp24_span(DType dtype, const Sparse24View& w, const Activations& x, const void* bias,
               void* y, int64_t ldy, int64_t row_begin, int64_t row_end) {
  const auto* xs = static_cast<const typename Ops::XT*>(x.data);
  constexpr int G = T >= kRowGroupTokens ? group_rows(Ops::kMaxAcc, first_block<Ops, T>()) : 1;
  float sums[G * T];
  int64_t n = row_begin;
  if constexpr (G > 1) {
    for (; n + G <= row_end; n += G) {
      if (!sp24_rows<Ops, G, T>(w, xs, n, sums)) return false;
      for (int i = 0; i < G; ++i) store_row(dtype, sums + i * T, T, bias, y, ldy, n + i);
    }
  }
  for (; n < row_end; ++n) {
    if (!sp24_row<Ops, T>(w, xs, n, sums)) return false;
    store_row(dtype, sums, T, bias, y, ldy, n);
  }
  return true;
}

// Dense row n, all T tokens.  Rows go one after the other, each read front to back (one
// sequential stream, which the hardware prefetchers follow; R rows interleaved, as the
// packed loops go, were measured slower on short rows).  The last 32 columns of a row may
// be partial (K % 32 != 0), read exactly (no byte past the row's K-th value).
template <class Ops, int T>
void dense_row(const DenseView& w, const typename Ops::XT* x, int64_t n, float* sums) {
  const int64_t full = w.k / 32;
  const auto* row = static_cast<const typename Ops::VT*>(w.values) + n * w.ld;
  stream_row<Ops, T>(
      full, w.k % 32 != 0, x,
      [&](int64_t c) {
        // A hint only: addresses past the weight's end are never read.
        __builtin_prefetch(reinterpret_cast<const char*>(row + c * 32) + kRowPrefetchBytes, 0, 0);
        return Ops::load(row + c * 32);
      },
      [&] {
        const typename Ops::VT* p = row + full * 32;
        return Ops::decode_exact((1u << (w.k - full * 32)) - 1u, p);
      },
      sums);
}

template <class Ops, int T>
bool dense_span(DType dtype, const DenseView& w, const Activations& x, const void* bias, void* y,
                int64_t ldy, int64_t row_begin, int64_t row_end) {
  const auto* xs = static_cast<const typename Ops::XT*>(x.data);
  float sums[T];
  for (int64_t n = row_begin; n < row_end; ++n) {
    dense_row<Ops, T>(w, xs, n, sums);
    store_row(dtype, sums, T, bias, y, ldy, n);
  }
  return true;
}

// Runs F::template run<Ops, T>(args...) for the runtime token count (1..kMaxTokens).
template <class Ops, class F, class... A>
bool by_tokens(int tokens, A&&... a) {
  switch (tokens) {
#define OWL_CASE(T) \
  case T: return F::template run<Ops, T>(a...);
    OWL_CASE(1) OWL_CASE(2) OWL_CASE(3) OWL_CASE(4) OWL_CASE(5) OWL_CASE(6) OWL_CASE(7)
    OWL_CASE(8) OWL_CASE(9) OWL_CASE(10) OWL_CASE(11) OWL_CASE(12) OWL_CASE(13) OWL_CASE(14)
    OWL_CASE(15) OWL_CASE(16)
#undef OWL_CASE
    default: return false;
  }
}

struct BitmapRun {
  template <class Ops, int T, class... A>
  static bool run(A&&... a) { return bitmap_strips<Ops, T>(a...); }
};

struct DenseRun {
  template <class Ops, int T, class... A>
  static bool run(A&&... a) { return dense_span<Ops, T>(a...); }
};

struct Sp24Run {
  template <class Ops, int T, class... A>
  static bool run(A&&... a) { return sp24_span<Ops, T>(a...); }
};

// The copy type that unpacks 16-bit values of an Ops (XT = float) into an fp32 panel.
template <class Ops>
struct WidenCopy {
  using VT = typename Ops::VT;
  using OT = float;
  using W = typename Ops::W;
  static W decode(uint32_t m, const VT*& p) { return Ops::decode(m, p); }
  static W decode_exact(uint32_t m, const VT*& p) { return Ops::decode_exact(m, p); }
  static void store(const W& w, float* out, int cols) { Ops::store_f32(w, out, cols); }
};

template <class Ops>
bool bitmap_unpack(const BitmapView& w, int64_t row_begin, int64_t row_end, void* panel,
                   int64_t ldp) {
  const int64_t nct = w.col_tiles(), wpr = nct * 4;
  const auto* bm = reinterpret_cast<const uint32_t*>(w.bitmap);
  const auto* vals = static_cast<const typename Ops::VT*>(w.values);
  const typename Ops::VT* end = vals + w.nnz();
  auto* out = static_cast<typename Ops::OT*>(panel);
  for (int64_t s = row_begin / kTileN; s * kTileN < row_end; ++s) {
    // The next strip's bitmap, 256 bytes a tile, fetched while this one is read, and the
    // values ahead in each row, as in bitmap_rows (without them: 2.2 ns a word, one thread,
    // 4096 x 4096 at 70% in L3, most of it waiting for the rows' first bitmap words).
    const uint32_t* next_bitmap = bm + (s + 1) * kTileN * wpr;
    for (int64_t ct = 0; ct < nct; ++ct) {
      const int64_t tile = s * nct + ct;
      if (w.tile_offsets[tile] < 0 || w.tile_offsets[tile] > w.nnz()) return false;
      const typename Ops::VT* p = vals + w.tile_offsets[tile];
      for (int line = 0; line < 4; ++line) __builtin_prefetch(next_bitmap + ct * 64 + line * 16);
      if ((s + 1) * kTileN <= row_end && (ct + 1) * kTileK <= w.k &&
          end - p >= kTileN * kTileK + kDecodeReach) {
        // A whole tile of whole words, far from the values' end: no checks a word (the
        // tile's end is checked below).
        const uint32_t* words = bm + s * kTileN * wpr + ct * 4;
        typename Ops::OT* o = out + (s * kTileN - row_begin) * ldp + ct * kTileK;
        for (int r = 0; r < kTileN; ++r) {
          __builtin_prefetch(p + kPrefetchValues);
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k)
            Ops::store(Ops::decode(words[r * wpr + k], p), o + r * ldp + k * 32, 32);
        }
        if (p != vals + w.tile_offsets[tile + 1]) return false;
        continue;
      }
      for (int r = 0; r < kTileN; ++r) {
        const int64_t n = s * kTileN + r;
        __builtin_prefetch(p + kPrefetchValues);
        for (int k = 0; k < 4; ++k) {
          const int64_t col = ct * kTileK + k * 32;
          const uint32_t m = bm[n * wpr + ct * 4 + k];
          if (p + __builtin_popcount(m) > end) return false;
          const typename Ops::W e =
              end - p < kDecodeReach ? Ops::decode_exact(m, p) : Ops::decode(m, p);
          if (n < row_end && col < w.k)
            Ops::store(e, out + (n - row_begin) * ldp + col, int(w.k - col < 32 ? w.k - col : 32));
        }
      }
      if (p != vals + w.tile_offsets[tile + 1]) return false;
    }
  }
  return true;
}

template <class Ops>
bool sp24_unpack(const Sparse24View& w, int64_t row_begin, int64_t row_end, void* panel,
                 int64_t ldp) {
  const int64_t k = w.k, mb = (k + 7) / 8, half = k / 2;
  const auto* vals = static_cast<const typename Ops::VT*>(w.values);
  auto* out = static_cast<typename Ops::OT*>(panel);
  for (int64_t n = row_begin; n < row_end; ++n) {
    const typename Ops::VT* p = vals + n * half;
    for (int64_t col = 0; col < k; col += 32) {
      const int cols = int(k - col < 32 ? k - col : 32);
      const uint32_t m =
          cols == 32 ? meta24_word(w.meta + n * mb + col / 8) : meta24_mask(w.meta + n * mb, col, cols);
      if (__builtin_popcount(m) != cols / 2) return false;
      const typename Ops::W e = Ops::decode_exact(m, p);
      Ops::store(e, out + (n - row_begin) * ldp + col, cols);
    }
  }
  return true;
}

}  // namespace loops
}  // namespace

// The five entry points of one ISA, given its Ops per dtype (F32, F16, BF16), its copy types
// and the Ops (XT = float) that widen fp16 and bf16 values for unpacking.
#define OWL_CPU_ENTRY_POINTS(F32, F16, BF16, COPY32, COPY16, WIDE16, WIDEBF16)                                                  \
  bool bitmap_linear(DType dtype, const BitmapView& w, const Activations& x, const void* bias, \
                     void* y, int64_t ldy, int64_t r0, int64_t r1, int32_t* scratch) {         \
    if (dtype == DType::kFloat32)                                                               \
      return loops::by_tokens<F32, loops::BitmapRun>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1, scratch); \
    else if (dtype == DType::kFloat16)                                                          \
      return loops::by_tokens<F16, loops::BitmapRun>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1, scratch); \
    else                                                                                        \
      return loops::by_tokens<BF16, loops::BitmapRun>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1, scratch); \
  }                                                                                             \
  bool sparse24_linear(DType dtype, const Sparse24View& w, const Activations& x,               \
                       const void* bias, void* y, int64_t ldy, int64_t r0, int64_t r1) {       \
    if (dtype == DType::kFloat32)                                                               \
      return loops::by_tokens<F32, loops::Sp24Run>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1);     \
    else if (dtype == DType::kFloat16)                                                          \
      return loops::by_tokens<F16, loops::Sp24Run>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1);     \
    else                                                                                        \
      return loops::by_tokens<BF16, loops::Sp24Run>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1);    \
  }                                                                                             \
  bool dense_linear(DType dtype, const DenseView& w, const Activations& x, const void* bias,    \
                    void* y, int64_t ldy, int64_t r0, int64_t r1) {                            \
    if (dtype == DType::kFloat32)                                                               \
      return loops::by_tokens<F32, loops::DenseRun>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1);    \
    else if (dtype == DType::kFloat16)                                                          \
      return loops::by_tokens<F16, loops::DenseRun>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1);    \
    else                                                                                        \
      return loops::by_tokens<BF16, loops::DenseRun>(x.tokens, dtype, w, x, bias, y, ldy, r0, r1);   \
  }                                                                                             \
  bool bitmap_unpack(DType dtype, const BitmapView& w, int64_t r0, int64_t r1, void* panel,     \
                     int64_t ldp, bool widen) {                                                 \
    if (dtype == DType::kFloat32) return loops::bitmap_unpack<COPY32>(w, r0, r1, panel, ldp);   \
    if (!widen) return loops::bitmap_unpack<COPY16>(w, r0, r1, panel, ldp);                     \
    if (dtype == DType::kFloat16)                                                               \
      return loops::bitmap_unpack<loops::WidenCopy<WIDE16>>(w, r0, r1, panel, ldp);             \
    return loops::bitmap_unpack<loops::WidenCopy<WIDEBF16>>(w, r0, r1, panel, ldp);             \
  }                                                                                             \
  bool sparse24_unpack(DType dtype, const Sparse24View& w, int64_t r0, int64_t r1, void* panel, \
                       int64_t ldp, bool widen) {                                               \
    if (dtype == DType::kFloat32) return loops::sp24_unpack<COPY32>(w, r0, r1, panel, ldp);     \
    if (!widen) return loops::sp24_unpack<COPY16>(w, r0, r1, panel, ldp);                       \
    if (dtype == DType::kFloat16)                                                               \
      return loops::sp24_unpack<loops::WidenCopy<WIDE16>>(w, r0, r1, panel, ldp);               \
    return loops::sp24_unpack<loops::WidenCopy<WIDEBF16>>(w, r0, r1, panel, ldp);               \
  }

}  // namespace owl_cpu
