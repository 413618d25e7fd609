// 2:4 prefill on Hopper's warpgroup tensor cores: wgmma.mma_async.sp (sm_90a only).
//
// Included by sparse24_mma.cu (it shares Sp24Params, the A / metadata staging and the
// epilogue).  A block is two warpgroups (256 threads) and covers 256 rows x 128 tokens;
// each warpgroup owns two m64 tiles and issues, per 128-column stage, 2 x 4
// wgmma.mma_async.sp.m64n128k32 with
// - A (the compressed weights) from registers: warp w of a warpgroup supplies m16 tile w
//   of the m64 tile, whose register fragment is the mma.sp.m16n8k32 one -- exactly what
//   values_mma stores, so one 16-byte shared load per lane, tile and chunk from the
//   staged fragments (the same staging as the mma.sp prefill tile);
// - the metadata register and sparsity selector of mma.sp.m16n8k32 (meta_mma, word c / 2
//   and selector c % 2 for chunk c), warp w again giving the rows of its m16 tile;
// - B (the activations, K-major) read by the tensor cores straight from shared memory
//   through a matrix descriptor: the stage's [128 tokens x 128 k] tile is stored as 8 x 8
//   "core matrices" of 128 contiguous bytes (no swizzle), core matrix (token group j,
//   k granule q) at (q * 16 + j) * 128 bytes, so the descriptor's leading byte offset (to
//   the next core matrix along K) is 2048 and its stride byte offset (to the next 8
//   tokens) 128; chunk c starts 4 core matrices (8 KB) further along K.
// The accumulators (64 fp32 per thread and m64 tile) follow the mma m16n8 C layout per
// warp and n8 block, so the block tile goes through the same shared-memory epilogue.
// Ordering: cp.async fills shared memory through the generic proxy and wgmma reads it
// through the async proxy, so every thread fences (fence.proxy.async) after its copies
// land and before the stage barrier; wgmma.fence orders the A registers just loaded.
//
// Compiled into machine code only for sm_90a (-gencode arch=compute_90a,code=sm_90a,
// which setup.py / the JIT build add on Hopper together with -DOWL_SPARSE_SM90A);
// elsewhere the kernel body is a trap and sparse24_plan never offers the configuration.
#pragma once

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define OWL_WGMMA_DEVICE 1
#endif

namespace owl {
namespace {

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
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Shared-memory matrix descriptor, no swizzle: start address, leading and stride byte
// offsets (all in 16-byte units, 14 bits each), base offset 0, layout type 0.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr >> 4) & 0x3FFFu) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3FFFu) << 32);
}

// wgmma.mma_async.sp m64n128k32, fp32 accumulate in place (scale-d = 1), A from registers
// (a: the warp's compressed m16 x 16 fragment), B K-major from `desc_b`, metadata `e`,
// sparsity selector kSel.
template <typename T, int kSel>
__device__ __forceinline__ void wgmma_sp_m64n128k32(float (&d)[64], const uint4& a,
                                                    uint64_t desc_b, uint32_t e);

template <>
__device__ __forceinline__ void wgmma_sp_m64n128k32<__half, 0>(float (&d)[64], const uint4& a,
                                                                uint64_t desc_b, uint32_t e) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, 0, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc_b), "r"(e), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_sp_m64n128k32<__half, 1>(float (&d)[64], const uint4& a,
                                                                uint64_t desc_b, uint32_t e) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, 1, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc_b), "r"(e), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_sp_m64n128k32<__nv_bfloat16, 0>(float (&d)[64], const uint4& a,
                                                                uint64_t desc_b, uint32_t e) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, 0, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc_b), "r"(e), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_sp_m64n128k32<__nv_bfloat16, 1>(float (&d)[64], const uint4& a,
                                                                uint64_t desc_b, uint32_t e) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %70, 0;\n"
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, 1, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc_b), "r"(e), "r"(1));
}

#endif  // OWL_WGMMA_DEVICE

template <typename T, int STAGES>
struct Sp24WgmmaKernel {
  static constexpr int kGroups = 2;  // warpgroups per block
  static constexpr int kThreads = kGroups * 128;
  static constexpr int kM64 = 2;  // m64 tiles per warpgroup
  static constexpr int BM = kGroups * kM64 * 64;
  static constexpr int BN = 128;
  static constexpr int kTilesM = BM / 16;
  static constexpr int kXBytes = BN * kStageK * 2;  // core-matrix layout, no padding
  static constexpr int kABytes = kTilesM * 4 * 32 * 16;
  static constexpr int kMBytes = kTilesM * 32 * 8;
  static constexpr int kSlotBytes = kXBytes + kABytes + kMBytes;
  static constexpr int kRingBytes = STAGES * kSlotBytes;
  static constexpr int kCBytes = BN * (BM + 4) * 4;
  static constexpr int kSmemBytes = kRingBytes > kCBytes ? kRingBytes : kCBytes;
  static constexpr uint32_t kLBO = (BN / 8) * 128;  // next core matrix along K
  static constexpr uint32_t kSBO = 128;             // next 8 tokens

  // Byte offset of 16-byte granule q (k columns 8q .. 8q + 7) of token row r in the x tile.
  __host__ __device__ static constexpr int x_offset(int r, int q) {
    return ((q * (BN / 8) + (r >> 3)) * 8 + (r & 7)) * 16;
  }

  // The [BN x 128] activation tile of stage `st` in core-matrix layout; rows >= T and
  // columns >= K zero-filled (never read).
  __device__ static void load_x(const Sp24Params& p, uint8_t* xs, int n0, int st, int tid) {
    const int k0 = st * kStageK;
    if (p.vec16) {
      for (int idx = tid; idx < BN * 16; idx += kThreads) {
        const int r = idx >> 4, q = idx & 15;
        const int gt = n0 + r, gk = k0 + q * 8;
        const bool ok = gt < p.T && gk < p.K;
        const uint16_t* src = ok ? p.x + (int64_t)gt * p.K + gk : p.x;
        cp_async16(smem_addr(xs + x_offset(r, q)), src, ok ? 16 : 0);
      }
    } else {  // K % 8 == 4: 8-byte granules, two per 16-byte core-matrix row
      for (int idx = tid; idx < BN * 32; idx += kThreads) {
        const int r = idx >> 5, h = idx & 31;
        const int gt = n0 + r, gk = k0 + h * 4;
        const bool ok = gt < p.T && gk < p.K;
        const uint16_t* src = ok ? p.x + (int64_t)gt * p.K + gk : p.x;
        cp_async8(smem_addr(xs + x_offset(r, h >> 1) + (h & 1) * 8), src, ok ? 8 : 0);
      }
    }
  }

  __device__ static void run(const Sp24Params& p) {
#if defined(OWL_WGMMA_DEVICE)
    extern __shared__ __align__(16) uint8_t smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, w = warp & 3;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int mtb = blockIdx.x * kTilesM;
    const int st0 = blockIdx.z * p.stages_per_split;
    const int st1 = min(p.k_stages, st0 + p.stages_per_split);
    const int nst = st1 - st0;

    float acc[kM64][64];
#pragma unroll
    for (int i = 0; i < kM64; ++i)
#pragma unroll
      for (int q = 0; q < 64; ++q) acc[i][q] = 0.f;

    auto load = [&](int sl, int s) {
      uint8_t* slot = smem + sl * kSlotBytes;
      load_x(p, slot, n0, st0 + s, tid);
      load_a_stage<kTilesM, kThreads>(p, slot + kXBytes, slot + kXBytes + kABytes, mtb, st0 + s,
                                      tid);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nst) load(s, s);
      cp_async_commit();
    }
    for (int s = 0; s < nst; ++s) {
      cp_async_wait<STAGES - 2>();
      fence_proxy_async_smem();  // this thread's copies, visible to the async proxy
      __syncthreads();  // stage s landed everywhere; every warpgroup finished stage s - 1
      const int sn = s + STAGES - 1;
      if (sn < nst) load(sn % STAGES, sn);
      cp_async_commit();

      const uint8_t* slot = smem + (s % STAGES) * kSlotBytes;
      const uint4* as = reinterpret_cast<const uint4*>(slot + kXBytes);
      const uint2* ms = reinterpret_cast<const uint2*>(slot + kXBytes + kABytes);
      uint4 a[kM64][4];
      uint2 m[kM64];
#pragma unroll
      for (int i = 0; i < kM64; ++i) {
        const int ti = (wg * kM64 + i) * 4 + w;  // this warp's m16 tile in the block
#pragma unroll
        for (int c = 0; c < 4; ++c) a[i][c] = as[(ti * 4 + c) * 32 + lane];
        // a row tile past the end holds zeros; give it valid (ordered) metadata
        m[i] = mtb + ti < p.m_tiles ? ms[ti * 32 + lane] : make_uint2(0x44444444u, 0x44444444u);
      }
      const uint32_t xs = smem_addr(slot);
      wgmma_fence();
#pragma unroll
      for (int i = 0; i < kM64; ++i) {
        // (m64 tiles past the last row tile multiply zeros: no branch around a wgmma, which
        // would make ptxas serialize them)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint64_t desc = smem_desc(xs + c * 4 * kLBO, kLBO, kSBO);
          if (c & 1)
            wgmma_sp_m64n128k32<T, 1>(acc[i], a[i][c], desc, c < 2 ? m[i].x : m[i].y);
          else
            wgmma_sp_m64n128k32<T, 0>(acc[i], a[i][c], desc, c < 2 ? m[i].x : m[i].y);
        }
      }
      wgmma_commit();
      wgmma_wait_all();  // before the barrier that lets this slot be refilled
    }

    cp_async_wait<0>();
    __syncthreads();
    float* cs = reinterpret_cast<float*>(smem);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < kM64; ++i) {
      const int row = (wg * kM64 + i) * 64 + w * 16 + g;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const float d[4] = {acc[i][4 * j], acc[i][4 * j + 1], acc[i][4 * j + 2],
                            acc[i][4 * j + 3]};
        acc_to_smem<BM>(cs, d, row, 8 * j + 2 * t);
      }
    }
    __syncthreads();
    epilogue<T, BM, BN, kThreads>(cs, p.ep, m0, n0, blockIdx.z,
                                  blockIdx.y * gridDim.x + blockIdx.x, tid);
#else
    (void)p;
    __trap();  // not built for sm_90a: sparse24_plan never offers this configuration
#endif
  }
};

template <typename T, int STAGES>
__global__ void __launch_bounds__(256, 1) sp24_wgmma_kernel(const Sp24Params p) {
  Sp24WgmmaKernel<T, STAGES>::run(p);
}

}  // namespace
}  // namespace owl
