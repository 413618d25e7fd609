// The CPU kernels' entry points: instruction-set detection, the activation workspace, and
// the switch to the chosen ISA's implementation (kernels_*.cpp).  Portable code only: it
// runs before anything knows which instructions the CPU has.
#include "kernels.h"

#include <algorithm>
#include <initializer_list>

#include "kernel_common.h"

namespace owl_cpu {

#define OWL_DECLARE_ISA(NS)                                                                    \
  namespace NS {                                                                               \
  bool bitmap_linear(DType, const BitmapView&, const Activations&, const void*, void*, int64_t, \
                     int64_t, int64_t, int32_t*);                                              \
  bool sparse24_linear(DType, const Sparse24View&, const Activations&, const void*, void*,     \
                       int64_t, int64_t, int64_t);                                             \
  bool dense_linear(DType, const DenseView&, const Activations&, const void*, void*, int64_t,  \
                    int64_t, int64_t);                                                         \
  bool bitmap_unpack(DType, const BitmapView&, int64_t, int64_t, void*, int64_t, bool);       \
  bool sparse24_unpack(DType, const Sparse24View&, int64_t, int64_t, void*, int64_t, bool);   \
  }
OWL_DECLARE_ISA(portable)
#if defined(__x86_64__)
OWL_DECLARE_ISA(avx2)
OWL_DECLARE_ISA(avx512)
OWL_DECLARE_ISA(avx512bf16)
#endif
#undef OWL_DECLARE_ISA

constexpr Tables kTables;

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi2");
  switch (isa) {
    case Isa::kAvx512Bf16: return avx512 && __builtin_cpu_supports("avx512bf16");
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return true;
  }
#else
  return isa == Isa::kPortable;
#endif
}

Isa detect_isa() {
  for (Isa isa : {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2})
    if (isa_supported(isa)) return isa;
  return Isa::kPortable;
}

size_t activation_bytes(Isa isa, DType dtype, int tokens, int64_t ld) {
  return size_t(tokens) * size_t(ld) * (bf16_compute(isa, dtype) ? 2 : 4);
}

Activations prepare_activations(Isa isa, DType dtype, const void* x, int tokens, int64_t k,
                                int64_t ldx, void* workspace, int64_t ld) {
  const int64_t words = ld / 32;
  if (bf16_compute(isa, dtype)) {
    auto* out = static_cast<uint16_t*>(workspace);
    const auto* in = static_cast<const uint16_t*>(x);
    for (int t = 0; t < tokens; ++t)
      for (int64_t w = 0; w < words; ++w) {
        uint16_t* o = out + (w * tokens + t) * 32;
        const int64_t c0 = w * 32, n = std::min<int64_t>(32, std::max<int64_t>(0, k - c0));
        std::memcpy(o, in + t * ldx + c0, size_t(n) * 2);
        std::memset(o + n, 0, size_t(32 - n) * 2);
      }
  } else {
    auto* out = static_cast<float*>(workspace);
    for (int t = 0; t < tokens; ++t)
      for (int64_t c = 0; c < ld; ++c)
        out[((c / 32) * tokens + t) * 32 + c % 32] = c < k ? load_f32(dtype, x, t * ldx + c) : 0.0f;
  }
  return Activations{workspace, tokens, ld};
}

#if defined(__x86_64__)
#define OWL_SWITCH(CALL)                                     \
  switch (isa) {                                             \
    case Isa::kAvx512Bf16: return avx512bf16::CALL;          \
    case Isa::kAvx512: return avx512::CALL;                  \
    case Isa::kAvx2: return avx2::CALL;                      \
    default: return portable::CALL;                          \
  }
#else
#define OWL_SWITCH(CALL) return portable::CALL;
#endif

bool bitmap_linear(Isa isa, DType dtype, const BitmapView& w, const Activations& x,
                   const void* bias, void* y, int64_t ldy, int64_t row_begin, int64_t row_end,
                   int32_t* scratch) {
  OWL_SWITCH(bitmap_linear(dtype, w, x, bias, y, ldy, row_begin, row_end, scratch))
}

bool sparse24_linear(Isa isa, DType dtype, const Sparse24View& w, const Activations& x,
                     const void* bias, void* y, int64_t ldy, int64_t row_begin, int64_t row_end) {
  OWL_SWITCH(sparse24_linear(dtype, w, x, bias, y, ldy, row_begin, row_end))
}

bool dense_linear(Isa isa, DType dtype, const DenseView& w, const Activations& x,
                  const void* bias, void* y, int64_t ldy, int64_t row_begin, int64_t row_end) {
  OWL_SWITCH(dense_linear(dtype, w, x, bias, y, ldy, row_begin, row_end))
}

bool bitmap_unpack(Isa isa, DType dtype, const BitmapView& w, int64_t row_begin,
                   int64_t row_end, void* panel, int64_t ldp, bool widen) {
  OWL_SWITCH(bitmap_unpack(dtype, w, row_begin, row_end, panel, ldp, widen))
}

bool sparse24_unpack(Isa isa, DType dtype, const Sparse24View& w, int64_t row_begin,
                     int64_t row_end, void* panel, int64_t ldp, bool widen) {
  OWL_SWITCH(sparse24_unpack(dtype, w, row_begin, row_end, panel, ldp, widen))
}
#undef OWL_SWITCH

}  // namespace owl_cpu
