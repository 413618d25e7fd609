// Hopper warpgroup MMA (wgmma, sm_90a) pieces shared by the 2:4 and bitmap kernels:
// fences, the shared-memory matrix descriptor, the activation tile in the "core matrix"
// layout the descriptor describes, and the inline-PTX wrappers.
//
// Activations are the B operand, K-major ([tokens][k] rows, as x is stored), unswizzled:
// an 8-token x 8-k block of 16-bit values is one 128-byte "core matrix" (8 rows of 16
// contiguous bytes); core matrix (token group j, k granule q) of a [BN x 128] stage tile
// sits at (q * BN / 8 + j) * 128 bytes.  The descriptor's leading byte offset is the step
// to the next core matrix along K (BN / 8 * 128 bytes), its stride byte offset the step to
// the next 8 tokens (128 bytes); a k16 step starts 2 core matrices further along K.
//
// Device code exists only where the compiler targets sm_90a (__CUDA_ARCH_FEAT_SM90_ALL);
// setup.py and the JIT build add that target on compute capability 9.0 together with
// -DOWL_SPARSE_SM90A, which is what the host planners check (owl::wgmma_available).
#pragma once

#include "mma_common.cuh"

namespace owl {

// Whether this build has sm_90a machine code and `device` can run it (compute capability
// 9.0 exactly: arch-specific code runs on no other GPU).
inline bool wgmma_available(int device) {
#if defined(OWL_SPARSE_SM90A)
  DeviceLimits lim;
  if (device_limits(device, &lim) != cudaSuccess) return false;
  return lim.cc_major == 9 && lim.cc_minor == 0;
#else
  (void)device;
  return false;
#endif
}

// Byte offset of 16-byte granule q (k columns 8q .. 8q + 7) of token row r in a [BN x 128]
// core-matrix tile, and the descriptor offsets of that tile.
template <int BN>
__host__ __device__ constexpr int core_offset(int r, int q) {
  return ((q * (BN / 8) + (r >> 3)) * 8 + (r & 7)) * 16;
}
template <int BN>
constexpr uint32_t kCoreLBO = (BN / 8) * 128;  // next core matrix along K
constexpr uint32_t kCoreSBO = 128;             // next 8 tokens

// Which piece of the tile copy number `idx` of load_x_core moves.  Consecutive copies
// fill one core matrix (8 token rows) before moving along K, so the 8 lanes of a 16-byte
// shared-store phase (16 lanes of an 8-byte one) write one contiguous 128-byte core matrix:
// no bank conflicts (row-major order would put a warp's stores LBO apart, all in the same
// 4 banks: 16-way conflicts).  From global memory a warp still reads whole 32-byte sectors
// (64 contiguous bytes per token row, 32 on the 8-byte path).
struct CoreCopy {
  int row;     // token row in the tile
  int offset;  // byte offset in the core-matrix tile
  int col;     // first k column, relative to the tile
};
template <int BN>
__host__ __device__ constexpr CoreCopy core_copy16(int idx) {  // 16-byte granules
  const int r = (idx >> 7) * 8 + (idx & 7), q = (idx >> 3) & 15;
  return {r, core_offset<BN>(r, q), q * 8};
}
template <int BN>
__host__ __device__ constexpr CoreCopy core_copy8(int idx) {  // 8-byte halves
  const int r = (idx >> 8) * 8 + ((idx >> 1) & 7), q = (idx >> 4) & 15, half = idx & 1;
  return {r, core_offset<BN>(r, q) + half * 8, q * 8 + half * 4};
}

// Rows [n0, n0 + BN) x columns [k0, k0 + 128) of x ([T, K] row-major) into the core-matrix
// tile `xs`; rows >= T and columns >= K zero-filled (never read).  `vec16` (K % 8 == 0)
// moves 16-byte granules, otherwise two 8-byte halves per core-matrix row.
template <int BN, int NTHREADS>
__device__ __forceinline__ void load_x_core(uint8_t* xs, const uint16_t* x, int T, int K, int n0,
                                            int k0, bool vec16, int tid) {
  if (vec16) {
    for (int idx = tid; idx < BN * 16; idx += NTHREADS) {
      const CoreCopy c = core_copy16<BN>(idx);
      const int gt = n0 + c.row, gk = k0 + c.col;
      const bool ok = gt < T && gk < K;
      const uint16_t* src = ok ? x + (int64_t)gt * K + gk : x;
      cp_async16(smem_addr(xs + c.offset), src, ok ? 16 : 0);
    }
  } else {
    for (int idx = tid; idx < BN * 32; idx += NTHREADS) {
      const CoreCopy c = core_copy8<BN>(idx);
      const int gt = n0 + c.row, gk = k0 + c.col;
      const bool ok = gt < T && gk < K;
      const uint16_t* src = ok ? x + (int64_t)gt * K + gk : x;
      cp_async8(smem_addr(xs + c.offset), src, ok ? 8 : 0);
    }
  }
}

#if defined(OWL_WGMMA_DEVICE)
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Register operands of wgmma.mma_async are read asynchronously: they must stay untouched
// until wgmma.wait_group.  An empty asm that "modifies" them after the wait keeps every
// one of them live (and in place) up to that point, whatever the compiler schedules.
template <int N>
__device__ __forceinline__ void wgmma_keep(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_keep(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
__device__ __forceinline__ void wgmma_keep(uint4& r) {
  asm volatile("" : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)::"memory");
}
__device__ __forceinline__ void wgmma_keep(uint2& r) {
  asm volatile("" : "+r"(r.x), "+r"(r.y)::"memory");
}

// Shared-memory matrix descriptor, no swizzle: start address, leading and stride byte
// offsets (all in 16-byte units, 14 bits each), base offset 0, layout type 0.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr >> 4) & 0x3FFFu) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3FFFu) << 32);
}

// Accumulator operand lists of the m64n64 (32 registers) and m64n128 (64) shapes.
#define OWL_WGMMA_ACC32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define OWL_WGMMA_ACC64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define OWL_WGMMA_OUT32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define OWL_WGMMA_OUT64(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// wgmma.mma_async.sp m64n128k32, fp32 accumulate in place (scale-d = 1), A from registers
// (a: the warp's compressed m16 x 16 fragment), B K-major from `desc_b`, metadata `e`,
// sparsity selector kSel (an immediate operand).
#define OWL_WGMMA_SP_M64N128K32(TY)                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"                         \
               "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." TY "." TY " "      \
               OWL_WGMMA_ACC64 ", {%64, %65, %66, %67}, %68, %69, %71, p, 1, 1, 0;\n}\n" \
               : OWL_WGMMA_OUT64(d)                                                  \
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc_b), "r"(e), "r"(1),  \
                 "n"(kSel))

template <typename T>
struct WgmmaSp;
template <>
struct WgmmaSp<__half> {
  template <int kSel>
  __device__ __forceinline__ static void run(float (&d)[64], const uint4& a, uint64_t desc_b,
                                             uint32_t e) {
    OWL_WGMMA_SP_M64N128K32("f16");
  }
};
template <>
struct WgmmaSp<__nv_bfloat16> {
  template <int kSel>
  __device__ __forceinline__ static void run(float (&d)[64], const uint4& a, uint64_t desc_b,
                                             uint32_t e) {
    OWL_WGMMA_SP_M64N128K32("bf16");
  }
};

template <typename T, int kSel>
__device__ __forceinline__ void wgmma_sp_m64n128k32(float (&d)[64], const uint4& a,
                                                    uint64_t desc_b, uint32_t e) {
  WgmmaSp<T>::template run<kSel>(d, a, desc_b, e);
}

// Dense wgmma.mma_async m64nNk16 (N = 64 or 128), fp32 accumulate in place, A from
// registers (the warp's m16 x 16 fragment in the mma.m16n8k16 A layout), B K-major from
// `desc_b`.
// ACC / OUT: the accumulator operand list and constraints; AB: the A registers and the B
// descriptor operands, SCALE the scale-d operand (they follow the accumulators).
#define OWL_WGMMA_M64K16(N, TY, ACC, OUT, AB, SCALE)                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                   \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " ACC    \
               ", " AB ", p, 1, 1, 0;\n}\n"                                          \
               : OUT(d)                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define OWL_WGMMA_AB32 "{%32, %33, %34, %35}, %36"
#define OWL_WGMMA_AB64 "{%64, %65, %66, %67}, %68"

template <typename T, int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], const uint32_t (&a)[4],
                                             uint64_t desc_b);
template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 64>(float (&d)[32], const uint32_t (&a)[4],
                                                         uint64_t desc_b) {
  OWL_WGMMA_M64K16(64, "f16", OWL_WGMMA_ACC32, OWL_WGMMA_OUT32, OWL_WGMMA_AB32, "%37");
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 64>(float (&d)[32],
                                                                const uint32_t (&a)[4],
                                                                uint64_t desc_b) {
  OWL_WGMMA_M64K16(64, "bf16", OWL_WGMMA_ACC32, OWL_WGMMA_OUT32, OWL_WGMMA_AB32, "%37");
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 128>(float (&d)[64], const uint32_t (&a)[4],
                                                          uint64_t desc_b) {
  OWL_WGMMA_M64K16(128, "f16", OWL_WGMMA_ACC64, OWL_WGMMA_OUT64, OWL_WGMMA_AB64, "%69");
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 128>(float (&d)[64],
                                                                 const uint32_t (&a)[4],
                                                                 uint64_t desc_b) {
  OWL_WGMMA_M64K16(128, "bf16", OWL_WGMMA_ACC64, OWL_WGMMA_OUT64, OWL_WGMMA_AB64, "%69");
}

#endif  // OWL_WGMMA_DEVICE

}  // namespace owl
