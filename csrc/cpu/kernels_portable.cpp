// Plain C++ kernels: any CPU.  A word's weights are expanded into 32 floats and multiplied
// as a dense run (the compiler vectorises it for the baseline instruction set).
#include "loops.h"

namespace owl_cpu {
namespace portable {
namespace {

template <class VT>
inline void expand(uint32_t m, const VT*& p, VT* out) {
  for (int j = 0; j < 32; ++j) {
    if (m >> j & 1u)
      out[j] = *p++;
    else
      out[j] = VT(0);
  }
}

template <DType D>
struct Ops {
  using VT = std::conditional_t<D == DType::kFloat32, float, uint16_t>;
  using XT = float;
  using Acc = float;
  struct W {
    float v[32];
  };
  // One row at a time: the portable path favours a short build over speed (it only runs
  // where no vector instruction set is available).
  static constexpr int kMaxAcc = 1;
  static Acc zero() { return 0.0f; }
  static float sum(const Acc& a) { return a; }
  __attribute__((noinline)) static W decode(uint32_t m, const VT*& p) {
    W w;
    for (int j = 0; j < 32; ++j) {
      if (m >> j & 1u) {
        const VT v = *p++;
        if constexpr (D == DType::kFloat32) w.v[j] = v;
        else if constexpr (D == DType::kFloat16) w.v[j] = f16_to_f32(v);
        else w.v[j] = bf16_to_f32(v);
      } else {
        w.v[j] = 0.0f;
      }
    }
    return w;
  }
  static W decode_exact(uint32_t m, const VT*& p) { return decode(m, p); }
  static W load(const VT* p) {
    const VT* q = p;
    return decode(0xffffffffu, q);
  }
  __attribute__((noinline)) static void fma(Acc& acc, const W& w, const XT* x) {
    float s = 0.0f;
    for (int j = 0; j < 32; ++j) s += w.v[j] * x[j];
    acc += s;
  }
  static void store_f32(const W& w, float* out, int cols) { std::memcpy(out, w.v, size_t(cols) * 4); }
};

template <class T>
struct Copy {
  using VT = T;
  using OT = T;
  struct W {
    T v[32];
  };
  static W decode(uint32_t m, const VT*& p) {
    W w;
    expand(m, p, w.v);
    return w;
  }
  static W decode_exact(uint32_t m, const VT*& p) { return decode(m, p); }
  static void store(const W& w, VT* out, int cols) { std::memcpy(out, w.v, size_t(cols) * sizeof(T)); }
};

}  // namespace

OWL_CPU_ENTRY_POINTS(Ops<DType::kFloat32>, Ops<DType::kFloat16>, Ops<DType::kBFloat16>,
                     Copy<float>, Copy<uint16_t>, Ops<DType::kFloat16>, Ops<DType::kBFloat16>)

}  // namespace portable
}  // namespace owl_cpu
