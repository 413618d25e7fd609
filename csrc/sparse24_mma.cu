// 2:4 sparse x dense product on sparse tensor cores: y[T, N] = x[T, K] @ W[N, K]^T.
//
// mma.sp.m16n8k32 (fp16 / bf16 in, fp32 accumulate) with the weights as the sparse A
// operand and the tokens as the n8 dimension.  Why this orientation: the weights are
// the only operand that is 2:4 sparse, and with tokens on n8 a decode step of 1-8
// tokens costs one n8 tile (1-16 tokens: two), where kernels that put the weights on
// the B side (cuSPARSELt, torch's semi-structured path) pad the token count to 32+.
//
// Data path per block (WM x WN warps, each warp MT m16 tiles x NT n8 tiles):
// - Weights, decode / small batches (A_SMEM = false): straight from global memory to
//   registers.  values_mma is stored in fragment order, so one 16-byte load per lane and
//   chunk is exactly the four A registers, a warp reads 512 contiguous bytes per chunk,
//   and no shared memory or shuffles are needed.  Weights are read once: loads bypass L1
//   (no_allocate), and the fragments of the next one or two stages are prefetched into
//   spare register sets while the current stage computes (register-level pipelining).
// - Weights, prefill (A_SMEM = true): the same fragment-order bytes go through the
//   cp.async ring into shared memory (2 KB per m16 tile and stage, contiguous in global
//   and in shared memory), and each warp reads its fragments with one conflict-free
//   16-byte shared load per lane, m tile and chunk.  Large warp tiles (64 rows x 64
//   tokens: 4 m16 x 8 n8) make every weight fragment feed 8 MMAs and every activation
//   fragment 4, the register blocking a compute-bound GEMM needs; with A from registers
//   the prefill tile had to stay small (the prefetch sets cost registers) and re-read
//   its weights from L2 once per 128 tokens and warp.
// - Metadata: one 8-byte word pair per lane and stage; word h serves chunks 2h (sparsity
//   selector 0, lanes t = 0, 1) and 2h + 1 (selector 1, lanes t = 2, 3), so all 32 lanes
//   load useful bytes.
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

// Copies of stage `st` of the weights into shared memory (prefill tiles): for each of the
// block's kTilesM m16 tiles from `mtb` on, its 2 KB of fragments to `as` ([tile][4 chunks]
// [32 lanes] x 16 bytes) and its 256 bytes of metadata to `ms` ([tile][32 lanes] x 8
// bytes), both contiguous in global memory.  Tiles past the last row tile are zero-filled.
template <int kTilesM, int kThreads>
__device__ __forceinline__ void load_a_stage(const Sp24Params& p, uint8_t* as, uint8_t* ms,
                                             int mtb, int st, int tid) {
  constexpr int kAGran = 4 * 32;  // 16-byte granules per m tile and stage
  for (int idx = tid; idx < kTilesM * kAGran; idx += kThreads) {
    const int ti = idx / kAGran, q = idx % kAGran;
    const int mt = mtb + ti;
    const bool ok = mt < p.m_tiles;
    const uint4* src =
        ok ? p.values + ((int64_t)mt * p.k_stages * 4 + st * 4) * 32 + q : p.values;
    cp_async16(smem_addr(as + idx * 16), src, ok ? 16 : 0);
  }
  constexpr int kMGran = 32 * 8 / 16;
  for (int idx = tid; idx < kTilesM * kMGran; idx += kThreads) {
    const int ti = idx / kMGran, q = idx % kMGran;
    const int mt = mtb + ti;
    const bool ok = mt < p.m_tiles;
    const uint2* src = ok ? p.meta + ((int64_t)mt * p.k_stages + st) * 32 + 2 * q : p.meta;
    cp_async16(smem_addr(ms + idx * 16), src, ok ? 16 : 0);
  }
}

template <int MT>
struct AFrag {
  uint4 v[MT][4];  // [m tile][chunk]
  uint2 m[MT];     // metadata words for chunks (0, 1) and (2, 3)
};

// Sources of a warp's A fragments for compute(): a(i, c) is m tile i's chunk c, e(i, c)
// its metadata word.  RegFrags reads a prefetched register set; SmemFrags a ring slot.
template <int MT>
struct RegFrags {
  const AFrag<MT>& f;
  __device__ __forceinline__ uint4 a(int i, int c) const { return f.v[i][c]; }
  __device__ __forceinline__ uint32_t e(int i, int c) const {
    return c < 2 ? f.m[i].x : f.m[i].y;
  }
};

template <int MT>
struct SmemFrags {
  const uint4* as;  // this warp's first m tile in the slot: [m tile][chunk][lane]
  uint2 m[MT];
  __device__ __forceinline__ SmemFrags(const uint4* a_tiles, const uint2* meta_tiles, int lane)
      : as(a_tiles + lane) {
#pragma unroll
    for (int i = 0; i < MT; ++i) m[i] = meta_tiles[i * 32 + lane];
  }
  __device__ __forceinline__ uint4 a(int i, int c) const { return as[(i * 4 + c) * 32]; }
  __device__ __forceinline__ uint32_t e(int i, int c) const { return c < 2 ? m[i].x : m[i].y; }
};

template <typename T, int WM, int WN, int MT, int NT, int STAGES, bool A_SMEM>
struct Sp24Kernel {
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int BM = WM * MT * 16;
  static constexpr int BN = WN * NT * 8;
  static constexpr int kTilesM = BM / 16;
  // Ring slot: the activation tile, then (A_SMEM) the block's weight fragments
  // [m tile][4 chunks][32 lanes] x 16 bytes and metadata [m tile][32 lanes] x 8 bytes.
  static constexpr int kXBytes = BN * kSmemLd * 2;
  static constexpr int kABytes = A_SMEM ? kTilesM * 4 * 32 * 16 : 0;
  static constexpr int kMBytes = A_SMEM ? kTilesM * 32 * 8 : 0;
  static constexpr int kSlotBytes = kXBytes + kABytes + kMBytes;
  static constexpr int kRingBytes = STAGES * kSlotBytes;
  static constexpr int kCBytes = BN * (BM + 4) * 4;
  static constexpr int kSmemBytes = kRingBytes > kCBytes ? kRingBytes : kCBytes;
  static_assert(kXBytes % 16 == 0 && kABytes % 16 == 0 && kMBytes % 16 == 0,
                "ring slots must keep 16-byte alignment");

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

  // Copies of stage `st` into ring slot `slot` (A_SMEM): activations, then the block's
  // weight fragments and metadata (load_a_stage).
  __device__ static void load_stage(const Sp24Params& p, uint8_t* slot, int mtb, int n0, int st,
                                    int tid) {
    load_x_stage<BN, kThreads>(reinterpret_cast<uint16_t*>(slot), p.x, p.T, p.K, n0,
                               st * kStageK, p.vec16, tid);
    load_a_stage<kTilesM, kThreads>(p, slot + kXBytes, slot + kXBytes + kABytes, mtb, st, tid);
  }

  template <typename Frags>
  __device__ static void compute(const uint16_t* xb, const Frags& fr, int mt0, int m_tiles,
                                 int wn, int lane, float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint4 a[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) a[i] = fr.a(i, c);
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
            if (c & 1)
              mma_sp_16832<T, 1>(acc[i][nt], a[i], b, fr.e(i, c));
            else
              mma_sp_16832<T, 0>(acc[i][nt], a[i], b, fr.e(i, c));
          }
        }
      }
    }
  }

  // One step of the register path: wait for x stage s, refill the ring, prefetch the
  // weights of stage s + 2 into `pf`, multiply with `cur`.  Decode is bound by how many
  // weight bytes each SM keeps in flight: with one m16 tile per warp (36 registers per
  // stage) prefetching two stages ahead keeps about 4.5 KB per warp in flight.  The caller
  // rotates three register sets by hand so that every register index is a compile-time
  // constant.
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
    if (s + 2 < nst) load_a(p, mt0, st0 + s + 2, tid & 31, pf);
    compute(xs + (s % STAGES) * BN * kSmemLd, RegFrags<MT>{cur}, mt0, p.m_tiles, wn, tid & 31,
            acc);
  }

  __device__ static void run_registers(const Sp24Params& p, uint8_t* smem, int st0, int nst,
                                       int n0, int mt0, int wn, int tid,
                                       float (&acc)[MT][NT][4]) {
    uint16_t* xs = reinterpret_cast<uint16_t*>(smem);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nst)
        load_x_stage<BN, kThreads>(xs + s * BN * kSmemLd, p.x, p.T, p.K, n0,
                                   (st0 + s) * kStageK, p.vec16, tid);
      cp_async_commit();
    }
    AFrag<MT> f0, f1, f2;
    if (nst > 0) load_a(p, mt0, st0, tid & 31, f0);
    if (nst > 1) load_a(p, mt0, st0 + 1, tid & 31, f1);
    for (int s = 0; s < nst; s += 3) {
      step(p, xs, s, nst, st0, n0, mt0, wn, tid, f0, f2, acc);
      if (s + 1 < nst) step(p, xs, s + 1, nst, st0, n0, mt0, wn, tid, f1, f0, acc);
      if (s + 2 < nst) step(p, xs, s + 2, nst, st0, n0, mt0, wn, tid, f2, f1, acc);
    }
  }

  __device__ static void run_smem(const Sp24Params& p, uint8_t* smem, int st0, int nst, int n0,
                                  int mt0, int wm, int wn, int tid, float (&acc)[MT][NT][4]) {
    const int mtb = blockIdx.x * kTilesM;
    cp_async_ring<STAGES>(
        nst,
        [&](int sl, int s) { load_stage(p, smem + sl * kSlotBytes, mtb, n0, st0 + s, tid); },
        [&](int sl, int s) {
          const uint8_t* slot = smem + sl * kSlotBytes;
          const SmemFrags<MT> fr(
              reinterpret_cast<const uint4*>(slot + kXBytes) + wm * MT * 4 * 32,
              reinterpret_cast<const uint2*>(slot + kXBytes + kABytes) + wm * MT * 32, tid & 31);
          compute(reinterpret_cast<const uint16_t*>(slot), fr, mt0, p.m_tiles, wn, tid & 31, acc);
        });
  }

  __device__ static void run(const Sp24Params& p) {
    extern __shared__ __align__(16) uint8_t smem[];
    const int tid = threadIdx.x, warp = tid >> 5;
    const int wm = warp % WM, wn = warp / WM;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int mt0 = blockIdx.x * kTilesM + wm * MT;
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

    if constexpr (A_SMEM)
      run_smem(p, smem, st0, nst, n0, mt0, wm, wn, tid, acc);
    else
      run_registers(p, smem, st0, nst, n0, mt0, wn, tid, acc);
    store_block<T, MT, NT, BM, BN, kThreads>(smem, acc, p.ep, wm, wn, m0, n0, tid);
  }
};

// The prefill tile asks for one resident block per SM so that ptxas may use up to 255
// registers (128 accumulators per thread); the decode tiles keep ptxas's choice.
template <typename T, int WM, int WN, int MT, int NT, int STAGES, bool A_SMEM>
__global__ void __launch_bounds__(WM* WN * 32, A_SMEM ? 1 : 0)
    sp24_kernel(const Sp24Params p) {
  Sp24Kernel<T, WM, WN, MT, NT, STAGES, A_SMEM>::run(p);
}

}  // namespace
}  // namespace owl

#include "sparse24_wgmma.cuh"

namespace owl {
namespace {

// Configuration table.  Decode / small batches (<= 32 tokens): 4 warps stacked along N,
// one m16 tile each, weights from global memory into registers, the whole block shares one
// token tile; NT grows with T so the weights (the bytes that matter) are read once per 8,
// 16 or 32 tokens.  Beyond 32 tokens: 4 x 2 warps of 64 rows x 64 tokens (256 rows x 128
// tokens per block, weights staged in shared memory), three stages where shared memory
// allows (227 KB on sm_90), else two (sm_80's 163 KB); split-K fills the GPU when the
// grid of tiles is small.  A device with less shared memory falls back along `fallback`.
// The wgmma configuration (sm_90a builds on compute capability 9.0 only) is never chosen
// automatically: callers ask for it by index (backend "cuda_sp_wgmma", chosen only where
// the dispatch table measured it correct and faster).
enum class Sp24Kind : int { kRegA, kSmemA, kWgmma };

struct Sp24Config {
  Sp24Kind kind;
  int wm, wn, mt, nt, stages;  // kWgmma: wm warpgroups of mt m16 tiles, nt n8 tiles
  int max_tokens;  // automatic choice: use this config up to this many tokens
  int fallback;    // the config to try where this one's shared memory does not fit
};

constexpr Sp24Config kSp24Configs[] = {
    {Sp24Kind::kRegA, 4, 1, 1, 1, 3, 8, -1},
    {Sp24Kind::kRegA, 4, 1, 1, 2, 3, 16, 0},
    {Sp24Kind::kRegA, 4, 1, 1, 4, 3, 32, 1},
    {Sp24Kind::kSmemA, 4, 2, 4, 8, 3, 1 << 30, 4},
    {Sp24Kind::kSmemA, 4, 2, 4, 8, 2, 1 << 30, 2},
    {Sp24Kind::kWgmma, 2, 1, 8, 16, 3, 0, -1},
};
constexpr int kNumSp24Configs = sizeof(kSp24Configs) / sizeof(kSp24Configs[0]);
constexpr int kWgmmaConfig = 5;

bool sp24_prefill(const Sp24Config& c) { return c.kind != Sp24Kind::kRegA; }

// Same arithmetic as Sp24Kernel / Sp24WgmmaKernel::kSmemBytes (the launch checks it).
int sp24_smem_bytes(const Sp24Config& c) {
  const int bm = c.wm * c.mt * 16, bn = c.wn * c.nt * 8, tiles = bm / 16;
  const int x_bytes = c.kind == Sp24Kind::kWgmma ? bn * kStageK * 2 : bn * kSmemLd * 2;
  const int slot = x_bytes + (sp24_prefill(c) ? tiles * (4 * 32 * 16 + 32 * 8) : 0);
  const int ring = c.stages * slot, cb = bn * (bm + 4) * 4;
  return ring > cb ? ring : cb;
}

template <typename Kernel>
cudaError_t launch_checked(Kernel* fn, int threads, int smem, const Sp24Params& p,
                           const LaunchPlan& plan, std::atomic<unsigned long long>& smem_set,
                           cudaStream_t stream) {
  if (plan.smem_bytes != smem) return cudaErrorInvalidValue;  // a plan of another config
  const cudaError_t err = allow_smem(fn, smem, smem_set);
  if (err != cudaSuccess) return err;
  dim3 grid(plan.grid_m, plan.grid_n, plan.splits);
  fn<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int WM, int WN, int MT, int NT, int STAGES, bool A_SMEM>
cudaError_t launch_sp24(const Sp24Params& p, const LaunchPlan& plan, cudaStream_t stream) {
  using K = Sp24Kernel<T, WM, WN, MT, NT, STAGES, A_SMEM>;
  static_assert(A_SMEM || MT == 1, "the register path holds one m16 tile per warp");
  static std::atomic<unsigned long long> smem_set{0};
  return launch_checked(&sp24_kernel<T, WM, WN, MT, NT, STAGES, A_SMEM>, K::kThreads,
                        K::kSmemBytes, p, plan, smem_set, stream);
}

template <typename T, int STAGES>
cudaError_t launch_sp24_wgmma(const Sp24Params& p, const LaunchPlan& plan, cudaStream_t stream) {
  using K = Sp24WgmmaKernel<T, STAGES>;
  static std::atomic<unsigned long long> smem_set{0};
  return launch_checked(&sp24_wgmma_kernel<T, STAGES>, K::kThreads, K::kSmemBytes, p, plan,
                        smem_set, stream);
}

template <typename T>
cudaError_t dispatch_sp24(const Sp24Params& p, const LaunchPlan& plan, cudaStream_t stream) {
  switch (plan.config) {
    case 0: return launch_sp24<T, 4, 1, 1, 1, 3, false>(p, plan, stream);
    case 1: return launch_sp24<T, 4, 1, 1, 2, 3, false>(p, plan, stream);
    case 2: return launch_sp24<T, 4, 1, 1, 4, 3, false>(p, plan, stream);
    case 3: return launch_sp24<T, 4, 2, 4, 8, 3, true>(p, plan, stream);
    case 4: return launch_sp24<T, 4, 2, 4, 8, 2, true>(p, plan, stream);
    case kWgmmaConfig: return launch_sp24_wgmma<T, 3>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int sparse24_wgmma_config(int device) { return wgmma_available(device) ? kWgmmaConfig : -1; }

cudaError_t sparse24_plan(int T, int N, int K, int requested_splits, int device,
                          LaunchPlan* plan, int config) {
  if (T <= 0 || N <= 0 || K <= 0 || K % 4 != 0) return cudaErrorInvalidValue;
  if (config >= kNumSp24Configs) return cudaErrorInvalidValue;
  DeviceLimits lim;
  cudaError_t err = device_limits(device, &lim);
  if (err != cudaSuccess) return err;
  int ci = config;
  if (ci < 0) {
    ci = 0;
    while (ci + 1 < kNumSp24Configs && T > kSp24Configs[ci].max_tokens) ++ci;
    // Fall back to smaller tiles where the device has less shared memory.
    while (ci > 0 && sp24_smem_bytes(kSp24Configs[ci]) > lim.max_smem_optin)
      ci = kSp24Configs[ci].fallback;
    if (ci < 0) ci = 0;
  } else {  // asked for by index: it must run here as it is
    if (kSp24Configs[ci].kind == Sp24Kind::kWgmma && !wgmma_available(device))
      return cudaErrorNotSupported;
    if (sp24_smem_bytes(kSp24Configs[ci]) > lim.max_smem_optin) return cudaErrorNotSupported;
  }
  const Sp24Config& c = kSp24Configs[ci];
  LaunchPlan out;
  out.config = ci;
  out.block_m = c.wm * c.mt * 16;
  out.block_n = c.wn * c.nt * 8;
  out.grid_m = (N + out.block_m - 1) / out.block_m;
  out.grid_n = (T + out.block_n - 1) / out.block_n;
  out.smem_bytes = sp24_smem_bytes(c);
  const int k_stages = (K + kStageK - 1) / kStageK;
  // Decode tiles: many blocks fit per SM; aim for 4 per SM.  The prefill tiles are one
  // block per SM; their splits round to whole waves.  Each split keeps >= 4 stages (512
  // columns) so partial sums cost < 1/64 of the weight bytes at 16 tokens.
  const bool prefill = sp24_prefill(c);
  choose_splits(out.grid_m * out.grid_n, k_stages, requested_splits, lim.num_sms,
                prefill ? 1 : 4, 4, &out, prefill);
  out.partial_elems = out.splits > 1 ? (int64_t)out.splits * T * N : 0;
  *plan = out;
  return check_grid(out);
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
