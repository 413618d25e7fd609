// The AVX-512 kernels with AVX512_BF16 (Cooper Lake / Sapphire Rapids, Zen 4 and later):
// bf16 weights multiply bf16 activations with vdpbf16ps (fp32 accumulation).
#if defined(__x86_64__)  // the target pragma and intrinsics are x86-64 only
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,bmi,bmi2,popcnt,fma,f16c")
#define OWL_NS avx512bf16
#define OWL_BF16DOT 1
#include "avx512_impl.h"
#endif  // __x86_64__
