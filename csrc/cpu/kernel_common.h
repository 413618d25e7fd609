// Scalar helpers shared by every ISA's kernels (internal to csrc/cpu).
//
// Everything here has internal linkage (an unnamed namespace): each ISA's translation unit
// compiles its own copy under its own target, so the linker can never hand the portable
// code a copy built with AVX-512 instructions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace owl_cpu {

// Lookup tables, constant-initialised (no code runs to build them) in kernels.cpp.
struct Tables {
  uint8_t meta24[256];         // 2:4: the 8-column mask of one meta byte (two groups)
  uint8_t expand16[256][16];   // AVX2: pshufb controls expanding one mask byte's 16-bit values
  int32_t expand32[256][8];    // AVX2: vpermps indices expanding one mask byte's fp32 values
  int32_t keep32[256][8];      // AVX2: all ones under the byte's set bits, zero elsewhere
  // AVX2: vpshufb controls (both 128-bit lanes reading the same 8 packed bf16 values) that
  // place one mask byte's values as fp32 (bf16 in the upper half, zero below), 8 lanes.
  uint8_t bf16to32[256][32];
  // AVX2, 2:4: vpshufb controls placing the 4 bf16 values of one meta byte (8 bytes,
  // broadcast to every 64-bit lane) as fp32 under their columns (lane g: group g, its two
  // values in column order), and the popcount of the byte's mask (4 unless an index repeats).
  uint8_t sp24to32[256][32];
  uint8_t pop24[256];
  constexpr Tables() : meta24(), expand16(), expand32(), keep32(), bf16to32(), sp24to32(), pop24() {
    for (int b = 0; b < 256; ++b) {
      int m = 0;
      for (int g = 0; g < 2; ++g) {
        const int nib = (b >> (4 * g)) & 0xf;
        m |= ((1 << (nib & 3)) | (1 << (nib >> 2))) << (4 * g);
        const int i0 = nib & 3, i1 = nib >> 2;
        const int lo = i0 < i1 ? i0 : i1, hi = i0 < i1 ? i1 : i0;
        for (int j = 0; j < 4; ++j) {
          uint8_t* c = sp24to32[b] + 16 * g + 4 * j;
          c[0] = c[1] = c[2] = c[3] = uint8_t(0x80);
          if (j == lo || j == hi) {
            const int v = 2 * g + (j == lo ? 0 : 1);  // the value's index among the byte's 4
            c[2] = uint8_t(2 * v);
            c[3] = uint8_t(2 * v + 1);
          }
        }
      }
      meta24[b] = uint8_t(m);
      int bits = 0;
      for (int j = 0; j < 8; ++j) bits += (m >> j) & 1;
      pop24[b] = uint8_t(bits);
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool on = (b >> j) & 1;
        expand16[b][2 * j] = on ? uint8_t(2 * rank) : uint8_t(0x80);  // 0x80: pshufb writes 0
        expand16[b][2 * j + 1] = on ? uint8_t(2 * rank + 1) : uint8_t(0x80);
        expand32[b][j] = on ? rank : 0;
        keep32[b][j] = on ? -1 : 0;
        bf16to32[b][4 * j] = bf16to32[b][4 * j + 1] = uint8_t(0x80);
        bf16to32[b][4 * j + 2] = on ? uint8_t(2 * rank) : uint8_t(0x80);
        bf16to32[b][4 * j + 3] = on ? uint8_t(2 * rank + 1) : uint8_t(0x80);
        rank += on ? 1 : 0;
      }
    }
  }
};
extern const Tables kTables;

namespace {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    // subnormal: value = man * 2^-24
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

// Round to nearest even; overflow gives inf, as a cast in torch does.
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // nan
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                   // below the smallest normal half
    // subnormal or zero: round(|f| * 2^24) with ties to even
    const float scaled = bits_to_f32(a) * 16777216.0f;
    const float r = std::nearbyint(scaled);
    return uint16_t(sign | uint16_t(r));
  }
  uint32_t m = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15, round
  return uint16_t(sign | uint16_t(m >> 13));
}

inline float load_f32(DType dtype, const void* p, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline void store_f32(DType dtype, void* p, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kBFloat16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

inline int elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// The kernels multiply bf16 by bf16 only on kAvx512Bf16; everything else in fp32.
inline bool bf16_compute(Isa isa, DType dtype) {
  return isa == Isa::kAvx512Bf16 && dtype == DType::kBFloat16;
}

// y[t, n] = sums[t] + bias[n], in the output dtype, for the tokens of one output row.
inline void store_row(DType dtype, const float* sums, int tokens, const void* bias, void* y,
                      int64_t ldy, int64_t n) {
  const float b = bias ? load_f32(dtype, bias, n) : 0.0f;
  for (int t = 0; t < tokens; ++t) store_f32(dtype, y, t * ldy + n, sums[t] + b);
}

// The 32-bit column mask of 2:4 columns [c, c + 32) of one row (meta row pointer mr), only
// the first `cols` of them (a multiple of 4) valid.
inline uint32_t meta24_mask(const uint8_t* mr, int64_t c, int cols) {
  uint32_t m = 0;
  const int bytes = (cols + 7) / 8;
  for (int b = 0; b < bytes; ++b) m |= uint32_t(kTables.meta24[mr[c / 8 + b]]) << (8 * b);
  return cols >= 32 ? m : m & ((1u << cols) - 1u);
}

}  // namespace
}  // namespace owl_cpu
