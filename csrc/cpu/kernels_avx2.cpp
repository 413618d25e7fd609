// AVX2 + FMA + F16C + BMI2 kernels (Haswell and later, Zen 1 and later).  No expand
// instruction: each byte of a 32-bit mask word (8 columns) indexes a shuffle table that
// moves its popcount packed values under their set bits (kTables.expand16 / expand32).
#if defined(__x86_64__)  // the target pragma and intrinsics are x86-64 only
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#include "loops.h"

namespace owl_cpu {
namespace avx2 {
namespace {

// 8 packed 16-bit values from p, of which the first `count` matter.  `exact`: read only
// those (the last row of a 2:4 weight has no padding after it).
inline __m128i load8x16(const uint16_t* p, int count, bool exact) {
  if (!exact) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));  // bitmap: 16 padding values
  if (count == 4) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint16_t buf[8] = {0};
  std::memcpy(buf, p, size_t(count) * 2);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

inline __m256 load8x32(const float* p, int count, bool exact) {
  if (!exact) return _mm256_loadu_ps(p);
  if (count == 4) return _mm256_castps128_ps256(_mm_loadu_ps(p));
  alignas(32) float buf[8] = {0};
  std::memcpy(buf, p, size_t(count) * 4);
  return _mm256_load_ps(buf);
}

// Byte j of mask word m times 2^S (a table row of 2^S bytes): a rotation (rorx, which
// leaves m in its register) and an and, not a copy, zero-extension, add and shift a byte;
// its popcount is the byte's (4096 x 4096 bf16 at 70%, one token, one thread, hot, Zen 3:
// 3.7-4.5 -> 3.0-3.3 ns a word, separate processes).
template <int S>
inline unsigned scaled_byte(uint32_t m, int j) {
  const unsigned r = unsigned(8 * j - S) & 31u;
  return ((m >> r) | (m << ((32u - r) & 31u))) & (0xffu << S);
}

template <int S, class T>
inline const T* table_row(const T (*table)[(1 << S) / sizeof(T)], unsigned off) {
  return reinterpret_cast<const T*>(reinterpret_cast<const char*>(table) + off);
}

// Table rows per dtype: bf16to32 and expand32 hold 32 bytes a mask byte, expand16 16.
template <DType D>
constexpr int kRowShift = D == DType::kFloat16 ? 4 : 5;

// The 8 weights of mask byte b (given as off = b << kRowShift<D>), widened to fp32 (16-bit)
// or zero-filled (fp32).
template <DType D>
inline __m256 expand8(unsigned off, const std::conditional_t<D == DType::kFloat32, float, uint16_t>*& p,
                      bool exact) {
  constexpr int S = kRowShift<D>;
  const int c = __builtin_popcount(off);
  __m256 out;
  if constexpr (D == DType::kFloat32) {
    // vpermps moves the values under their columns, an and with the byte's keep32 row
    // zeroes the others (a table load, not a broadcast, an and and a compare).
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table_row<S>(kTables.expand32, off)));
    const __m256 keep = _mm256_loadu_ps(reinterpret_cast<const float*>(table_row<S>(kTables.keep32, off)));
    out = _mm256_and_ps(_mm256_permutevar8x32_ps(load8x32(p, c, exact), idx), keep);
  } else if constexpr (D == DType::kBFloat16) {
    // The 8 values in both 128-bit lanes (a broadcast load), one in-lane vpshufb puts each
    // under its column as fp32: no widening after the shuffle.
    const __m256i v = exact ? _mm256_broadcastsi128_si256(load8x16(p, c, true))
                            : _mm256_broadcastsi128_si256(
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out = _mm256_castsi256_ps(_mm256_shuffle_epi8(
        v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table_row<S>(kTables.bf16to32, off)))));
  } else {
    const __m128i e = _mm_shuffle_epi8(load8x16(p, c, exact),
                                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(table_row<S>(kTables.expand16, off))));
    out = _mm256_cvtph_ps(e);
  }
  p += c;
  return out;
}

template <DType D>
struct Ops {
  using VT = std::conditional_t<D == DType::kFloat32, float, uint16_t>;
  using XT = float;
  using Acc = __m256;
  struct W {
    __m256 q[4];
  };
  static constexpr int kMaxAcc = 8;
  static Acc zero() { return _mm256_setzero_ps(); }
  static float sum(const Acc& a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static W decode_with(uint32_t m, const VT*& p, bool exact) {
    W w;
    for (int j = 0; j < 4; ++j) w.q[j] = expand8<D>(scaled_byte<kRowShift<D>>(m, j), p, exact);
    return w;
  }
  static W decode(uint32_t m, const VT*& p) { return decode_with(m, p, false); }
  static W decode_exact(uint32_t m, const VT*& p) { return decode_with(m, p, true); }
  // A whole 2:4 word (4 meta bytes, its 16 values at p); bits += its mask's popcount (16
  // unless a group repeats an index).  bf16: each meta byte's 4 values (8 bytes, exactly
  // those) broadcast, one vpshufb places them as fp32 (no mask, popcount or pointer chain).
  static W decode24(const uint8_t* meta, const VT* p, uint32_t& bits) {
    W w;
    if constexpr (D == DType::kBFloat16) {
      for (int j = 0; j < 4; ++j) {
        int64_t q;
        std::memcpy(&q, p + 4 * j, 8);
        bits += kTables.pop24[meta[j]];
        w.q[j] = _mm256_castsi256_ps(_mm256_shuffle_epi8(
            _mm256_set1_epi64x(q),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTables.sp24to32[meta[j]]))));
      }
    } else {
      uint32_t m = 0;
      for (int j = 0; j < 4; ++j) m |= uint32_t(kTables.meta24[meta[j]]) << (8 * j);
      bits += uint32_t(__builtin_popcount(m));
      w = decode_exact(m, p);
    }
    return w;
  }
  static W load(const VT* p) {
    W w;
    for (int j = 0; j < 4; ++j) {
      if constexpr (D == DType::kFloat32) {
        w.q[j] = _mm256_loadu_ps(p + 8 * j);
      } else {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * j));
        if constexpr (D == DType::kFloat16)
          w.q[j] = _mm256_cvtph_ps(h);
        else
          w.q[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
    }
    return w;
  }
  // acc += w . x as a tree: one add on acc's chain a word (four chained FMAs made the
  // one-token kernel latency-bound: 4096 x 4096 bf16 at 70%, one thread, hot, 8.9 -> 5.1 ns
  // a word, Zen 3); the products use the FMA pipes as before, the adds the idle add pipes.
  static void fma(Acc& acc, const W& w, const XT* x) {
    __m256 a = _mm256_mul_ps(w.q[0], _mm256_loadu_ps(x));
    __m256 b = _mm256_mul_ps(w.q[2], _mm256_loadu_ps(x + 16));
    a = _mm256_fmadd_ps(w.q[1], _mm256_loadu_ps(x + 8), a);
    b = _mm256_fmadd_ps(w.q[3], _mm256_loadu_ps(x + 24), b);
    acc = _mm256_add_ps(acc, _mm256_add_ps(a, b));
  }
  static void store_f32(const W& w, float* out, int cols) {
    if (cols == 32) {
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + 8 * j, w.q[j]);
      return;
    }
    alignas(32) float buf[32];
    for (int j = 0; j < 4; ++j) _mm256_store_ps(buf + 8 * j, w.q[j]);
    std::memcpy(out, buf, size_t(cols) * 4);
  }
};

// Unpacking: the values as stored (16-bit) or zero-filled fp32, 8 columns at a time.
template <bool Wide>
struct Copy {
  using VT = std::conditional_t<Wide, float, uint16_t>;
  using OT = VT;
  struct W {
    VT v[32];
  };
  static W decode_with(uint32_t m, const VT*& p, bool exact) {
    W w;
    for (int j = 0; j < 4; ++j) {
      if constexpr (Wide) {
        _mm256_storeu_ps(w.v + 8 * j, expand8<DType::kFloat32>(scaled_byte<kRowShift<DType::kFloat32>>(m, j), p, exact));
      } else {
        constexpr int S = kRowShift<DType::kFloat16>;  // expand16: 16-byte rows
        const unsigned off = scaled_byte<S>(m, j);
        const int c = __builtin_popcount(off);
        const __m128i e = _mm_shuffle_epi8(
            load8x16(p, c, exact), _mm_loadu_si128(reinterpret_cast<const __m128i*>(table_row<S>(kTables.expand16, off))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(w.v + 8 * j), e);
        p += c;
      }
    }
    return w;
  }
  static W decode(uint32_t m, const VT*& p) { return decode_with(m, p, false); }
  static W decode_exact(uint32_t m, const VT*& p) { return decode_with(m, p, true); }
  static void store(const W& w, VT* out, int cols) { std::memcpy(out, w.v, size_t(cols) * sizeof(VT)); }
};

}  // namespace

OWL_CPU_ENTRY_POINTS(Ops<DType::kFloat32>, Ops<DType::kFloat16>, Ops<DType::kBFloat16>, Copy<true>,
                     Copy<false>, Ops<DType::kFloat16>, Ops<DType::kBFloat16>)

}  // namespace avx2
}  // namespace owl_cpu
#endif  // __x86_64__
