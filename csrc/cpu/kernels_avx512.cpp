// AVX-512 F/BW/VL/DQ + VBMI2 kernels (Ice Lake and later, Zen 4 and later); bf16 weights are
// widened to fp32.  Chosen at run time only where the CPU has these (see kernels.cpp).
#if defined(__x86_64__)  // the target pragma and intrinsics are x86-64 only
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,bmi,bmi2,popcnt,fma,f16c")
#define OWL_NS avx512
#define OWL_BF16DOT 0
#include "avx512_impl.h"
#endif  // __x86_64__
