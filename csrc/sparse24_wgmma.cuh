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
//   through a matrix descriptor: the stage's [128 tokens x 128 k] tile in the core-matrix
//   layout of wgmma_common.cuh (leading byte offset 2048, stride byte offset 128); chunk c
//   starts 4 core matrices (8 KB) further along K.
// The accumulators (64 fp32 per thread and m64 tile) follow the mma m16n8 C layout per
// warp and n8 block, so the block tile goes through the same shared-memory epilogue.
// Ordering: cp.async fills shared memory through the generic proxy and wgmma reads it
// through the async proxy, so every thread fences (fence.proxy.async) after its copies
// land and before the stage barrier; wgmma.fence orders the A registers just loaded.
//
// Machine code only for sm_90a (see wgmma_common.cuh); elsewhere the kernel body is a
// trap and sparse24_plan never offers the configuration.
#pragma once

#include "wgmma_common.cuh"

namespace owl {
namespace {

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
  static constexpr uint32_t kLBO = kCoreLBO<BN>;

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

    cp_async_ring<STAGES, true>(
        nst,
        [&](int sl, int s) {
          uint8_t* slot = smem + sl * kSlotBytes;
          load_x_core<BN, kThreads>(slot, p.x, p.T, p.K, n0, (st0 + s) * kStageK, p.vec16, tid);
          load_a_stage<kTilesM, kThreads>(p, slot + kXBytes, slot + kXBytes + kABytes, mtb,
                                          st0 + s, tid);
        },
        [&](int sl, int) {
          const uint8_t* slot = smem + sl * kSlotBytes;
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
            m[i] = mtb + ti < p.m_tiles ? ms[ti * 32 + lane]
                                        : make_uint2(0x44444444u, 0x44444444u);
          }
          const uint32_t xs = smem_addr(slot);
          // The wgmmas read A, the metadata and the accumulators asynchronously: pinned
          // before the fence (their writes may not sink past it) and after the wait.
          auto keep_operands = [&] {
#pragma unroll
            for (int i = 0; i < kM64; ++i) {
              wgmma_keep(acc[i]);
              wgmma_keep(m[i]);
#pragma unroll
              for (int c = 0; c < 4; ++c) wgmma_keep(a[i][c]);
            }
          };
          keep_operands();
          wgmma_fence();
          // (m64 tiles past the last row tile multiply zeros: no branch around a wgmma,
          // which would make ptxas serialize them)
#pragma unroll
          for (int i = 0; i < kM64; ++i) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint64_t desc = smem_desc(xs + c * 4 * kLBO, kLBO, kCoreSBO);
              const uint32_t e = c < 2 ? m[i].x : m[i].y;
              if (c & 1)
                wgmma_sp_m64n128k32<T, 1>(acc[i], a[i][c], desc, e);
              else
                wgmma_sp_m64n128k32<T, 0>(acc[i], a[i][c], desc, e);
            }
          }
          wgmma_commit();
          wgmma_wait_all();  // the slot may be refilled after the next barrier
          keep_operands();
        });

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
