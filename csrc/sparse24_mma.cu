// 2:4 sparse x dense product on sparse tensor cores: y[T, N] = x[T, K] @ W[N, K]^T.
//
// mma.sp.m16n8k32 (fp16 / bf16 in, fp32 accumulate) with the weights as the sparse A
// operand and the tokens as the n8 dimension.  Why this orientation: the weights are
// the only operand that is 2:4 sparse, and with tokens on n8 a decode step of 1-8
// tokens costs one n8 tile (1-16 tokens: two), where kernels that put the weights on
// the B side (cuSPARSELt, torch's semi-structured path) pad the token count to 32+.
//
// Data path per block (WM x WN warps, each warp MT m16 tiles x NT n8 tiles):
// - Weights go straight from global memory to registers: values_mma is stored in
//   fragment order, so one 16-byte load per lane and chunk is exactly the four A
//   registers, a warp reads 512 contiguous bytes per chunk, and no shared memory or
//   shuffles are needed.  Weights are read once: loads bypass L1 (no_allocate), and the
//   fragments of the next one or two stages are prefetched into spare register sets
//   while the current stage computes (software pipelining at register level).
// - Metadata: one 8-byte load per lane and stage (two 32-bit words); word h serves
//   chunks 2h (sparsity selector 0, lanes t = 0, 1) and 2h + 1 (selector 1, lanes
//   t = 2, 3), so all 32 lanes load useful bytes.
// - Activations are shared by all warps of the block: a STAGES-deep cp.async ring of
//   [BN tokens x 128 k] tiles in shared memory (zero-filled past T and K), read as B
//   fragments with ldmatrix.x4 (one instruction per chunk and n8 tile).
// - Split-K (grid.z) when the row x token grid is too small to fill the SMs (decode);
//   fp32 partials are reduced by the last block of each tile (mma_common.cuh).
#include "mma_common.cuh"

namespace owl {
namespace {

struct Sp24Params {
  const uint16_t* x;
  const uint4* values;  // fragment order, 16 bytes per lane and chunk
  const uint2* meta;    // 8 bytes per lane and stage
  EpilogueArgs ep;
  int T, N, K;
  int m_tiles;   // Np / 16
  int k_stages;  // Kp / 128
  int stages_per_split;
  bool vec16;  // K % 8 == 0: 16-byte cp.async for x
};

template <int MT>
struct AFrag {
  uint4 v[MT][4];  // [m tile][chunk]
  uint2 m[MT];     // metadata words for chunks (0, 1) and (2, 3)
};

template <typename T, int WM, int WN, int MT, int NT, int STAGES>
struct Sp24Kernel {
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int BM = WM * MT * 16;
  static constexpr int BN = WN * NT * 8;
  static constexpr int kXBytes = STAGES * BN * kSmemLd * 2;
  static constexpr int kCBytes = BN * (BM + 4) * 4;
  static constexpr int kSmemBytes = kXBytes > kCBytes ? kXBytes : kCBytes;
  // Weight prefetch distance in stages.  Decode is bound by how many weight bytes each SM
  // keeps in flight: with one m16 tile per warp (36 registers per stage) prefetch two
  // stages ahead (about 4.5 KB per warp in flight); the prefill tiles hold 2 m16 tiles
  // and 64 accumulators, so one stage ahead keeps them clear of spills.
  static constexpr int kDepth = MT == 1 ? 2 : 1;

  // Fragments of stage `st` (absolute stage index) for this warp's m tiles.  Tiles past
  // the last row tile (N not a multiple of BM) are never loaded and never multiplied.
  __device__ static void load_a(const Sp24Params& p, int mt0, int st, int lane,
                                AFrag<MT>& f) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int mt = mt0 + i;
      if (mt < p.m_tiles) {
        const uint4* src = p.values + ((int64_t)mt * p.k_stages * 4 + st * 4) * 32 + lane;
        const uint2* msrc = p.meta + ((int64_t)mt * p.k_stages + st) * 32 + lane;
        if constexpr (WN == 1) {  // read once: keep them out of L1
#pragma unroll
          for (int c = 0; c < 4; ++c) f.v[i][c] = ldg_stream16(src + c * 32);
          f.m[i] = ldg_stream8(msrc);
        } else {  // WN warps load the same fragments: let the second one hit L1
#pragma unroll
          for (int c = 0; c < 4; ++c) f.v[i][c] = __ldg(src + c * 32);
          f.m[i] = __ldg(msrc);
        }
      }
    }
  }

  __device__ static void compute(const uint16_t* xb, const AFrag<MT>& f, int mt0, int m_tiles,
                                 int wn, int lane, float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // ldmatrix.x4: matrix j = tokens (lane & 7) x k [32c + 8j, 32c + 8j + 8); lane
        // (g, t) receives x[token g][32c + 8j + 2t .. +1] = B register j of m16n8k32.
        uint32_t b[4];
        const uint16_t* row = xb + (wn * NT * 8 + nt * 8 + (lane & 7)) * kSmemLd;
        ldmatrix_x4(b, smem_addr(row + c * 32 + 8 * (lane >> 3)));
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (mt0 + i < m_tiles) {
            const uint32_t e = (c < 2) ? f.m[i].x : f.m[i].y;
            if (c & 1)
              mma_sp_16832<T, 1>(acc[i][nt], f.v[i][c], b, e);
            else
              mma_sp_16832<T, 0>(acc[i][nt], f.v[i][c], b, e);
          }
        }
      }
    }
  }

  // One pipeline step: wait for x stage s, refill the ring, prefetch the weights of stage
  // s + kDepth into `pf`, multiply with `cur`.  The caller rotates kDepth + 1 register
  // sets by hand so that every register index is a compile-time constant.
  __device__ static void step(const Sp24Params& p, uint16_t* xs, int s, int nst, int st0,
                              int n0, int mt0, int wn, int tid, const AFrag<MT>& cur,
                              AFrag<MT>& pf, float (&acc)[MT][NT][4]) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage s visible to all; everyone is done with stage s - 1
    const int sn = s + STAGES - 1;
    if (sn < nst)
      load_x_stage<BN, kThreads>(xs + (sn % STAGES) * BN * kSmemLd, p.x, p.T, p.K, n0,
                                 (st0 + sn) * kStageK, p.vec16, tid);
    cp_async_commit();  // always commit so the group count stays in step
    if (s + kDepth < nst) load_a(p, mt0, st0 + s + kDepth, tid & 31, pf);
    compute(xs + (s % STAGES) * BN * kSmemLd, cur, mt0, p.m_tiles, wn, tid & 31, acc);
  }

  __device__ static void run(const Sp24Params& p) {
    extern __shared__ __align__(16) uint8_t smem[];
    uint16_t* xs = reinterpret_cast<uint16_t*>(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WM, wn = warp / WM;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int mt0 = blockIdx.x * (BM / 16) + wm * MT;
    const int st0 = blockIdx.z * p.stages_per_split;
    const int st1 = min(p.k_stages, st0 + p.stages_per_split);
    const int nst = st1 - st0;

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nst)
        load_x_stage<BN, kThreads>(xs + s * BN * kSmemLd, p.x, p.T, p.K, n0,
                                   (st0 + s) * kStageK, p.vec16, tid);
      cp_async_commit();
    }
    AFrag<MT> f0, f1, f2;
    if (nst > 0) load_a(p, mt0, st0, lane, f0);
    if constexpr (kDepth == 1) {
      for (int s = 0; s < nst; s += 2) {
        step(p, xs, s, nst, st0, n0, mt0, wn, tid, f0, f1, acc);
        if (s + 1 < nst) step(p, xs, s + 1, nst, st0, n0, mt0, wn, tid, f1, f0, acc);
      }
    } else {
      if (nst > 1) load_a(p, mt0, st0 + 1, lane, f1);
      for (int s = 0; s < nst; s += 3) {
        step(p, xs, s, nst, st0, n0, mt0, wn, tid, f0, f2, acc);
        if (s + 1 < nst) step(p, xs, s + 1, nst, st0, n0, mt0, wn, tid, f1, f0, acc);
        if (s + 2 < nst) step(p, xs, s + 2, nst, st0, n0, mt0, wn, tid, f2, f1, acc);
      }
    }
    store_block<T, MT, NT, BM, BN, kThreads>(smem, acc, p.ep, wm, wn, m0, n0, tid);
  }
};

template <typename T, int WM, int WN, int MT, int NT, int STAGES>
__global__ void __launch_bounds__(WM* WN * 32) sp24_kernel(const Sp24Params p) {
  Sp24Kernel<T, WM, WN, MT, NT, STAGES>::run(p);
}

// Configuration table.  Decode / small batches (<= 32 tokens): 4 warps stacked along N,
// one m16 tile each, the whole block shares one token tile; NT grows with T so the
// weights (the bytes that matter) are read once per 8, 16 or 32 tokens.  Prefill: 2 x 2
// warps with 2 x 8 MMA tiles each (64 rows x 128 tokens per block), the usual
// register-blocked GEMM shape, where each weight fragment feeds 8 MMAs.
struct Sp24Config {
  int wm, wn, mt, nt, stages;
  int max_tokens;  // use this config up to this many tokens
};

constexpr Sp24Config kSp24Configs[] = {
    {4, 1, 1, 1, 3, 8},
    {4, 1, 1, 2, 3, 16},
    {4, 1, 1, 4, 3, 32},
    {2, 2, 2, 8, 3, 1 << 30},
};
constexpr int kNumSp24Configs = sizeof(kSp24Configs) / sizeof(kSp24Configs[0]);

template <typename T, int WM, int WN, int MT, int NT, int STAGES>
cudaError_t launch_sp24(const Sp24Params& p, const LaunchPlan& plan, cudaStream_t stream) {
  using K = Sp24Kernel<T, WM, WN, MT, NT, STAGES>;
  auto* fn = &sp24_kernel<T, WM, WN, MT, NT, STAGES>;
  static std::atomic<unsigned long long> smem_set{0};
  const cudaError_t err = allow_smem(fn, K::kSmemBytes, smem_set);
  if (err != cudaSuccess) return err;
  dim3 grid(plan.grid_m, plan.grid_n, plan.splits);
  fn<<<grid, K::kThreads, K::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_sp24(const Sp24Params& p, const LaunchPlan& plan, cudaStream_t stream) {
  switch (plan.config) {
    case 0: return launch_sp24<T, 4, 1, 1, 1, 3>(p, plan, stream);
    case 1: return launch_sp24<T, 4, 1, 1, 2, 3>(p, plan, stream);
    case 2: return launch_sp24<T, 4, 1, 1, 4, 3>(p, plan, stream);
    case 3: return launch_sp24<T, 2, 2, 2, 8, 3>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

int sp24_smem_bytes(const Sp24Config& c) {
  const int bm = c.wm * c.mt * 16, bn = c.wn * c.nt * 8;
  const int xb = c.stages * bn * kSmemLd * 2, cb = bn * (bm + 4) * 4;
  return xb > cb ? xb : cb;
}

}  // namespace

cudaError_t sparse24_plan(int T, int N, int K, int requested_splits, int device,
                          LaunchPlan* plan) {
  if (T <= 0 || N <= 0 || K <= 0 || K % 4 != 0) return cudaErrorInvalidValue;
  DeviceLimits lim;
  cudaError_t err = device_limits(device, &lim);
  if (err != cudaSuccess) return err;
  int ci = 0;
  while (ci + 1 < kNumSp24Configs && T > kSp24Configs[ci].max_tokens) ++ci;
  // Fall back to smaller token tiles where the device has less shared memory.
  while (ci > 0 && sp24_smem_bytes(kSp24Configs[ci]) > lim.max_smem_optin) --ci;
  const Sp24Config& c = kSp24Configs[ci];
  LaunchPlan out;
  out.config = ci;
  out.block_m = c.wm * c.mt * 16;
  out.block_n = c.wn * c.nt * 8;
  out.grid_m = (N + out.block_m - 1) / out.block_m;
  out.grid_n = (T + out.block_n - 1) / out.block_n;
  out.smem_bytes = sp24_smem_bytes(c);
  const int k_stages = (K + kStageK - 1) / kStageK;
  // Small tiles: many blocks fit per SM; aim for 4 per SM.  Each split keeps >= 4 stages
  // (512 columns) so partial sums cost < 1/64 of the weight bytes at 16 tokens.
  choose_splits(out.grid_m * out.grid_n, k_stages, requested_splits, lim.num_sms,
                ci < 3 ? 4 : 1, 4, &out);
  out.partial_elems = out.splits > 1 ? (int64_t)out.splits * T * N : 0;
  *plan = out;
  return cudaSuccess;
}

cudaError_t sparse24_run(const Sparse24Args& a, const LaunchPlan& plan, cudaStream_t stream) {
  if (plan.splits > 1 && (a.partials == nullptr || a.counters == nullptr))
    return cudaErrorInvalidValue;
  Sp24Params p;
  p.x = static_cast<const uint16_t*>(a.x);
  p.values = static_cast<const uint4*>(a.values_mma);
  p.meta = reinterpret_cast<const uint2*>(a.meta_mma);
  p.ep.y = a.y;
  p.ep.bias = a.bias;
  p.ep.partials = a.partials;
  p.ep.counters = a.counters;
  p.ep.T = a.T;
  p.ep.N = a.N;
  p.ep.splits = plan.splits;
  p.T = a.T;
  p.N = a.N;
  p.K = a.K;
  p.m_tiles = (a.N + 15) / 16;
  p.k_stages = (a.K + kStageK - 1) / kStageK;
  p.stages_per_split = plan.stages_per_split;
  p.vec16 = (a.K % 8) == 0;
  if (a.dtype == DType::kHalf) return dispatch_sp24<__half>(p, plan, stream);
  return dispatch_sp24<__nv_bfloat16>(p, plan, stream);
}

}  // namespace owl
