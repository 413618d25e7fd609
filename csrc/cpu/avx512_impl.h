// The AVX-512 kernels, compiled twice (kernels_avx512.cpp, kernels_avx512bf16.cpp) under a
// `#pragma GCC target` that enables their instruction set; OWL_NS names the namespace and
// OWL_BF16DOT (0 / 1) says whether bf16 weights multiply bf16 activations with vdpbf16ps.
//
// One 32-column word of a row: its bit mask m says which columns are kept; vpexpandw
// (vexpandps for fp32) puts the next popcount(m) packed values each under its set bit, zeros
// elsewhere.  The register form of the expand, its destination zeroed first (vpxord): the
// zero-masking expand still waits for its destination's old value on Zen 4/5, which chained
// every word to the one before, and the form with a memory operand is as slow (hot, one
// thread, SmolLM2's 1536 x 576 at 70%: 1.56 ns a word with either, 0.63 with this).
//   decode        a plain 64-byte load: reads the 32 values from p on, however few it uses
//   decode_exact  reads only the popcount(m) values it uses: one 32-byte load where they
//                 fill it (a 2:4 word), else a masked load (masked-off lanes are never
//                 read; 1.0 ns a word hot, but a 2:4 row of such loads streamed at ~10 GB/s,
//                 2.5x slower than the plain loads): near a weight's end, and 2:4 rows
#include <immintrin.h>

#include "loops.h"

// GCC 12 reports the deliberately undefined upper lanes inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace owl_cpu {
namespace OWL_NS {
namespace {

// The expand's destination is zeroed in the same asm statement: a compiler turns a
// zero-merging intrinsic back into the zero-masking form, which keeps the false dependency.
template <bool Exact>
inline __m512i expand16(uint32_t m, const uint16_t*& p) {
  const int n = __builtin_popcount(m);
  __m512i v;
  if (!Exact)
    v = _mm512_loadu_si512(p);
  else if (n == 16)  // a 2:4 word: exactly one 32-byte load
    v = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else
    v = _mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, unsigned(n)), p);
  __m512i e;
  asm("vpxord %0, %0, %0\n\tvpexpandw %1, %0%{%2%}%{z%}" : "=&v"(e) : "v"(v), "Yk"(__mmask32(m)));
  p += n;
  return e;
}

template <bool Exact>
inline __m512 expand32(uint32_t m16, const float*& p) {
  const int n = __builtin_popcount(m16);
  __m512 v;
  if (!Exact)
    v = _mm512_loadu_ps(p);
  else if (n == 8)  // half a 2:4 word: exactly one 32-byte load
    v = _mm512_castps256_ps512(_mm256_loadu_ps(p));
  else
    v = _mm512_maskz_loadu_ps(__mmask16(_bzhi_u32(0xffffu, unsigned(n))), p);
  __m512 e;
  asm("vpxord %0, %0, %0\n\tvexpandps %1, %0%{%2%}%{z%}" : "=&v"(e) : "v"(v), "Yk"(__mmask16(m16)));
  p += n;
  return e;
}

inline __mmask32 first(int cols) { return _bzhi_u32(0xffffffffu, unsigned(cols)); }

struct Pair {  // 32 weights as two fp32 vectors (columns 0-15, 16-31)
  __m512 lo, hi;
};

// The first cols (<= 32) of a pair's weights to out.  A masked store is slow on some CPUs
// (Zen 4): only the last, partial word uses one.
inline void store_pair(const Pair& w, float* out, int cols) {
  if (cols == 32) {
    _mm512_storeu_ps(out, w.lo);
    _mm512_storeu_ps(out + 16, w.hi);
    return;
  }
  const __mmask32 keep = first(cols);
  _mm512_mask_storeu_ps(out, __mmask16(keep & 0xffffu), w.lo);
  _mm512_mask_storeu_ps(out + 16, __mmask16(keep >> 16), w.hi);
}

struct Base {
  using Acc = __m512;
  static constexpr int kMaxAcc = 16;
  static Acc zero() { return _mm512_setzero_ps(); }
  static float sum(const Acc& a) { return _mm512_reduce_add_ps(a); }
};

// fp32 activations; W = the 32 weights widened to fp32 once per word.
template <DType D>
struct Widened : Base {
  using VT = std::conditional_t<D == DType::kFloat32, float, uint16_t>;
  using XT = float;
  using W = Pair;
  template <bool Exact>
  static W decode_as(uint32_t m, const VT*& p) {
    if constexpr (D == DType::kFloat32) {
      const __m512 lo = expand32<Exact>(m & 0xffffu, p);
      return {lo, expand32<Exact>(m >> 16, p)};
    } else {
      const __m512i e = expand16<Exact>(m, p);
      const __m256i lo = _mm512_extracti64x4_epi64(e, 0), hi = _mm512_extracti64x4_epi64(e, 1);
      if constexpr (D == DType::kFloat16) return {_mm512_cvtph_ps(lo), _mm512_cvtph_ps(hi)};
      return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo), 16)),
              _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16))};
    }
  }
  static W decode(uint32_t m, const VT*& p) { return decode_as<false>(m, p); }
  static W decode_exact(uint32_t m, const VT*& p) { return decode_as<true>(m, p); }
  static W load(const VT* p) {
    if constexpr (D == DType::kFloat32) {
      return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)};
    } else {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
      if constexpr (D == DType::kFloat16) return {_mm512_cvtph_ps(lo), _mm512_cvtph_ps(hi)};
      return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo), 16)),
              _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16))};
    }
  }
  static void fma(Acc& acc, const W& w, const XT* x) {
    acc = _mm512_fmadd_ps(w.lo, _mm512_loadu_ps(x), acc);
    acc = _mm512_fmadd_ps(w.hi, _mm512_loadu_ps(x + 16), acc);
  }
  static void store_f32(const W& w, float* out, int cols) { store_pair(w, out, cols); }
};

#if OWL_BF16DOT
// bf16 weights and activations: vdpbf16ps multiplies 32 pairs into 16 fp32 lanes.
struct Bf16Dot : Base {
  using VT = uint16_t;
  using XT = uint16_t;
  using W = __m512i;
  static W decode(uint32_t m, const VT*& p) { return expand16<false>(m, p); }
  static W decode_exact(uint32_t m, const VT*& p) { return expand16<true>(m, p); }
  static W load(const VT* p) { return _mm512_loadu_si512(p); }
  static void fma(Acc& acc, const W& w, const XT* x) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
  }
};
using Bf16Ops = Bf16Dot;
#else
using Bf16Ops = Widened<DType::kBFloat16>;
#endif

struct Copy16 {
  using VT = uint16_t;
  using OT = VT;
  using W = __m512i;
  static W decode(uint32_t m, const VT*& p) { return expand16<false>(m, p); }
  static W decode_exact(uint32_t m, const VT*& p) { return expand16<true>(m, p); }
  // A masked store is slow on some CPUs (Zen 4): only the last, partial word uses one.
  static void store(const W& w, VT* out, int cols) {
    if (cols == 32)
      _mm512_storeu_si512(out, w);
    else
      _mm512_mask_storeu_epi16(out, first(cols), w);
  }
};

struct Copy32 {
  using VT = float;
  using OT = VT;
  using W = Pair;
  template <bool Exact>
  static W decode_as(uint32_t m, const VT*& p) {
    const __m512 lo = expand32<Exact>(m & 0xffffu, p);
    return {lo, expand32<Exact>(m >> 16, p)};
  }
  static W decode(uint32_t m, const VT*& p) { return decode_as<false>(m, p); }
  static W decode_exact(uint32_t m, const VT*& p) { return decode_as<true>(m, p); }
  static void store(const W& w, VT* out, int cols) { store_pair(w, out, cols); }
};

}  // namespace

OWL_CPU_ENTRY_POINTS(Widened<DType::kFloat32>, Widened<DType::kFloat16>, Bf16Ops, Copy32, Copy16,
                     Widened<DType::kFloat16>, Widened<DType::kBFloat16>)

}  // namespace OWL_NS
}  // namespace owl_cpu
