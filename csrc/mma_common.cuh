// Device helpers shared by the owl-sparse kernels: PTX wrappers (mma, ldmatrix,
// cp.async), the 16-bit type traits, the split-K epilogue, and the host-side plan
// helpers.  Plain CUDA: no torch headers, so nvcc alone can compile-check it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>

#include "owl_sparse_kernels.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "owl-sparse kernels need sm_80 or newer (mma.sp, cp.async, ldmatrix, bf16 mma)"
#endif

// mma.sp::ordered_metadata (PTX 8.5, CUDA 12.5) is the form ptxas recommends: the plain
// .sp form "is expected to have substantially reduced performance on some future
// architectures".  It requires idx0 < idx1 inside every group, which the canonical 2:4
// format guarantees (unused slots use indices (0, 1)).
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define OWL_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32"
#else
#define OWL_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32"
#endif

// Device code for Hopper's warpgroup MMA (wgmma) exists only where the compiler targets
// sm_90a (see wgmma_common.cuh).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define OWL_WGMMA_DEVICE 1
#endif

namespace owl {

// Every stage of both kernels covers 128 logical K columns: one bitmap tile column, and
// four m16n8k32 chunks of the 2:4 kernel.  Shared-memory rows of 128 halves are padded
// by 8 halves (16 bytes) so that the 8 row addresses of one ldmatrix phase fall in 8
// distinct groups of 4 banks (row stride 272 bytes = 68 words = 4 banks mod 32).
constexpr int kStageK = 128;
constexpr int kRowPad = 8;
constexpr int kSmemLd = kStageK + kRowPad;

template <typename T>
struct Traits;

// bits_to_float: a raw 16-bit pattern (low half of `bits`) as float.
template <>
struct Traits<__half> {
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static float bits_to_float(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
};

template <>
struct Traits<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static float bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async with zero fill: src_bytes < 16 copies that many bytes and zeroes the rest,
// src_bytes == 0 reads nothing.  This is how tiles are predicated at the T / K / N edges
// without branches and without ever reading out of bounds.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Weights are read exactly once per token tile: keep them out of L1 so the activations
// (re-read by every warp) stay there.
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ uint2 ldg_stream8(const void* p) {
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n"
               : "=r"(r.x), "=r"(r.y)
               : "l"(p));
  return r;
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and lane
// (g = lane/4, t = lane%4) receives row g, columns 2t and 2t+1 of matrix i in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Dense m16n8k16, fp32 accumulate in place.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Sparse m16n8k32 (A is 16 x 32 at 2:4, given as its 16 x 16 compressed values).
// kSel is the sparsity selector: 0 = lanes 4g+0 / 4g+1 supply the metadata word,
// 1 = lanes 4g+2 / 4g+3.  Using both selectors on consecutive chunks lets every lane
// load one useful metadata word (see meta_mma in owl_sparse_kernels.h).
template <typename T, int kSel>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                             uint32_t e);

template <>
__device__ __forceinline__ void mma_sp_16832<__half, 0>(float (&d)[4], const uint4& a,
                                                        const uint32_t (&b)[4], uint32_t e) {
  asm volatile(OWL_MMA_SP
               ".f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
               "{%0,%1,%2,%3}, %12, 0x0;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                 "r"(b[3]), "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__half, 1>(float (&d)[4], const uint4& a,
                                                        const uint32_t (&b)[4], uint32_t e) {
  asm volatile(OWL_MMA_SP
               ".f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
               "{%0,%1,%2,%3}, %12, 0x1;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                 "r"(b[3]), "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__nv_bfloat16, 0>(float (&d)[4], const uint4& a,
                                                               const uint32_t (&b)[4],
                                                               uint32_t e) {
  asm volatile(OWL_MMA_SP
               ".bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
               "{%0,%1,%2,%3}, %12, 0x0;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                 "r"(b[3]), "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__nv_bfloat16, 1>(float (&d)[4], const uint4& a,
                                                               const uint32_t (&b)[4],
                                                               uint32_t e) {
  asm volatile(OWL_MMA_SP
               ".bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
               "{%0,%1,%2,%3}, %12, 0x1;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                 "r"(b[3]), "r"(e));
}

// This thread's shared-memory writes (cp.async and plain stores: the generic proxy) made
// visible to reads through the async proxy (wgmma operands); a barrier follows.
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(OWL_WGMMA_DEVICE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// A STAGES-deep cp.async ring over a block's stages 0 .. nst - 1: load(slot, s) issues the
// copies of stage s into ring slot `slot`; body(slot, s) runs once stage s has landed,
// while the next STAGES - 1 stages load.  Every thread runs every iteration (barriers
// inside), so a body leaves early with `return`, never around a barrier.  The barrier at
// the top of each iteration also tells the loader that every warp is done with the slot
// it is about to overwrite (a body that issues wgmma must wait for it before returning).
// kAsyncProxy: the stages are read by wgmma, so each thread fences its landed copies
// into the async proxy before the barrier.
template <int STAGES, bool kAsyncProxy = false, typename Load, typename Body>
__device__ __forceinline__ void cp_async_ring(int nst, Load&& load, Body&& body) {
  static_assert(STAGES >= 2, "a ring needs two slots");
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nst) load(s, s);
    cp_async_commit();  // always commit so the group count stays in step
  }
  for (int s = 0; s < nst; ++s) {
    cp_async_wait<STAGES - 2>();
    if constexpr (kAsyncProxy) fence_proxy_async_smem();
    __syncthreads();  // stage s landed; all warps finished stage s - 1
    const int sn = s + STAGES - 1;
    if (sn < nst) load(sn % STAGES, sn);
    cp_async_commit();
    body(s % STAGES, s);
  }
}

// Load rows [n0, n0 + BN) x columns [k0, k0 + 128) of x ([T, K] row-major) into a
// shared tile [BN][kSmemLd].  Rows >= T and columns >= K are zero-filled (never read):
// padding weights are zero but 0 * garbage could still be NaN.  `vec16` (K % 8 == 0)
// moves 16-byte granules; otherwise K % 4 == 0 guarantees 8-byte ones.
template <int BN, int NTHREADS>
__device__ __forceinline__ void load_x_stage(uint16_t* xs, const uint16_t* x, int T, int K,
                                             int n0, int k0, bool vec16, int tid) {
  if (vec16) {
    constexpr int kGran = kStageK / 8;
#pragma unroll 2
    for (int idx = tid; idx < BN * kGran; idx += NTHREADS) {
      const int r = idx / kGran, g = idx % kGran;
      const int gt = n0 + r, gk = k0 + g * 8;
      const bool ok = gt < T && gk < K;
      const uint16_t* src = ok ? x + (int64_t)gt * K + gk : x;
      cp_async16(smem_addr(xs + r * kSmemLd + g * 8), src, ok ? 16 : 0);
    }
  } else {
    constexpr int kGran = kStageK / 4;
#pragma unroll 2
    for (int idx = tid; idx < BN * kGran; idx += NTHREADS) {
      const int r = idx / kGran, g = idx % kGran;
      const int gt = n0 + r, gk = k0 + g * 4;
      const bool ok = gt < T && gk < K;
      const uint16_t* src = ok ? x + (int64_t)gt * K + gk : x;
      cp_async8(smem_addr(xs + r * kSmemLd + g * 4), src, ok ? 8 : 0);
    }
  }
}

// Accumulator fragment (m16n8, fp32) of lane (g, t): d0 = (row g, col 2t), d1 = (g, 2t+1),
// d2 = (g+8, 2t), d3 = (g+8, 2t+1); rows are output features, columns tokens.  The block's
// tile goes to shared memory as cs[token][row] with a row stride of BM + 4 floats so that
// the 32 lanes' stores land in 32 distinct banks (stride 68: bank = 8t + g).
template <int BM>
__device__ __forceinline__ void acc_to_smem(float* cs, const float (&d)[4], int row, int tok) {
  constexpr int LD = BM + 4;
  cs[tok * LD + row] = d[0];
  cs[(tok + 1) * LD + row] = d[1];
  cs[tok * LD + row + 8] = d[2];
  cs[(tok + 1) * LD + row + 8] = d[3];
}

struct EpilogueArgs {
  void* y;
  const void* bias;
  float* partials;
  int32_t* counters;
  int T, N, splits;
};

// Write the block's tile (cs, fp32) to y, adding bias.  With split-K, first store the
// partial tile, then the last-arriving block of this output tile sums all partials in
// split order (deterministic) and writes y; it resets the tile counter to zero.
// Memory ordering is the classic threadfence reduction: partial stores, __threadfence,
// atomic ticket; the last block fences again and reads with ld.global.cg (L2).
// The ticket goes through cs's first word once the partial tile has left it, so no kernel
// has static shared memory (dynamic + static must fit the opt-in maximum that plans and
// allow_smem size the dynamic part against).
template <typename T, int BM, int BN, int NTHREADS>
__device__ void epilogue(float* cs, const EpilogueArgs& ep, int m0, int n0, int split,
                         int tile_id, int tid) {
  constexpr int LD = BM + 4;
  T* y = static_cast<T*>(ep.y);
  const T* bias = static_cast<const T*>(ep.bias);
  const int64_t TN = (int64_t)ep.T * ep.N;
  if (ep.splits > 1) {
    float* part = ep.partials + split * TN;
    for (int idx = tid; idx < BN * BM; idx += NTHREADS) {
      const int tok = idx / BM, row = idx % BM;
      const int gt = n0 + tok, gr = m0 + row;
      if (gt < ep.T && gr < ep.N) part[(int64_t)gt * ep.N + gr] = cs[tok * LD + row];
    }
    __threadfence();
    __syncthreads();  // every read of cs is done: its first word can carry the ticket
    int* is_last = reinterpret_cast<int*>(cs);
    if (tid == 0) *is_last = atomicAdd(ep.counters + tile_id, 1) == ep.splits - 1;
    __syncthreads();
    if (!*is_last) return;
    __threadfence();
    for (int idx = tid; idx < BN * BM; idx += NTHREADS) {
      const int tok = idx / BM, row = idx % BM;
      const int gt = n0 + tok, gr = m0 + row;
      if (gt >= ep.T || gr >= ep.N) continue;
      const int64_t off = (int64_t)gt * ep.N + gr;
      float s = 0.f;
      for (int k = 0; k < ep.splits; ++k) s += __ldcg(ep.partials + k * TN + off);
      if (bias != nullptr) s += Traits<T>::to_float(bias[gr]);
      y[off] = Traits<T>::from_float(s);
    }
    if (tid == 0) ep.counters[tile_id] = 0;
    return;
  }
  // Rows are the fastest index so a warp writes 32 consecutive features of one token.
  for (int idx = tid; idx < BN * BM; idx += NTHREADS) {
    const int tok = idx / BM, row = idx % BM;
    const int gt = n0 + tok, gr = m0 + row;
    if (gt >= ep.T || gr >= ep.N) continue;
    float s = cs[tok * LD + row];
    if (bias != nullptr) s += Traits<T>::to_float(bias[gr]);
    y[(int64_t)gt * ep.N + gr] = Traits<T>::from_float(s);
  }
}

// The end of both MMA kernels: wait for the cp.async ring to drain, stage the block's
// accumulators (MT x NT m16n8 fragments per warp, warp (wm, wn)) in shared memory as cs,
// then run the epilogue.  The ring is free once every warp passes the first barrier, so
// cs reuses it from the start of dynamic shared memory.
template <typename T, int MT, int NT, int BM, int BN, int NTHREADS>
__device__ __forceinline__ void store_block(uint8_t* smem, const float (&acc)[MT][NT][4],
                                            const EpilogueArgs& ep, int wm, int wn, int m0,
                                            int n0, int tid) {
  cp_async_wait<0>();
  __syncthreads();
  float* cs = reinterpret_cast<float*>(smem);
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
      acc_to_smem<BM>(cs, acc[i][j], wm * MT * 16 + i * 16 + g, wn * NT * 8 + j * 8 + 2 * t);
  __syncthreads();
  epilogue<T, BM, BN, NTHREADS>(cs, ep, m0, n0, blockIdx.z, blockIdx.y * gridDim.x + blockIdx.x,
                                tid);
}

// ---- host-side helpers -------------------------------------------------------------

struct DeviceLimits {
  int num_sms = 0;
  int max_smem_optin = 0;
  int cc_major = 0, cc_minor = 0;  // compute capability
};

// Cached per device: cudaDeviceGetAttribute is cheap but not free, and plans are made
// on every call.  An entry is published through `ready` (release / acquire) only once it
// is complete, so a host thread never plans from a half-written entry.
inline cudaError_t device_limits(int device, DeviceLimits* out) {
  constexpr int kMaxDevices = 64;
  static DeviceLimits cache[kMaxDevices];
  static std::atomic<bool> ready[kMaxDevices];
  static std::mutex fill;
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && ready[device].load(std::memory_order_acquire)) {
    *out = cache[device];
    return cudaSuccess;
  }
  DeviceLimits lim;
  cudaError_t err = cudaDeviceGetAttribute(&lim.num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&lim.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                               device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&lim.cc_major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&lim.cc_minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  if (cacheable) {
    const std::lock_guard<std::mutex> lock(fill);
    if (!ready[device].load(std::memory_order_relaxed)) {
      cache[device] = lim;
      ready[device].store(true, std::memory_order_release);
    }
  }
  *out = lim;
  return cudaSuccess;
}

// A plan's grid must fit one launch: gridDim.y (token tiles) and gridDim.z (splits) are
// at most 65535.
inline cudaError_t check_grid(const LaunchPlan& plan) {
  constexpr int kMaxGridYZ = 65535;
  return plan.grid_n > kMaxGridYZ || plan.splits > kMaxGridYZ ? cudaErrorInvalidConfiguration
                                                               : cudaSuccess;
}

// Raise a kernel's dynamic shared-memory limit past the 48 KB default, once per device
// (the attribute belongs to the function in each device's context).  `done` is a
// per-kernel bit set of devices already configured.  `bytes` is the most this kernel
// will ever ask for (clipped to the device's opt-in maximum; plans never exceed it).
template <typename Kernel>
inline cudaError_t allow_smem(Kernel* fn, int bytes, std::atomic<unsigned long long>& done) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = dev < 64 ? (1ull << dev) : 0ull;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  DeviceLimits lim;
  err = device_limits(dev, &lim);
  if (err != cudaSuccess) return err;
  if (bytes > lim.max_smem_optin) bytes = lim.max_smem_optin;
  err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

// Split K so that the grid has about `blocks_per_sm` blocks per multiprocessor: with
// 1-16 tokens a 4096-row layer has only 64 row blocks, half of an H100's 132 SMs, and
// a memory-bound kernel needs several blocks per SM to keep enough loads in flight.
// Each split keeps at least `min_stages` 128-wide K stages so the fp32 partial traffic
// stays small next to the weight traffic.
// `nearest`: round splits to the nearest whole number of waves' worth instead of up (a
// grid of 1.3 waves leaves most SMs idle for the last 0.3).
inline void choose_splits(int tiles, int k_stages, int requested, int num_sms,
                          int blocks_per_sm, int min_stages, LaunchPlan* plan,
                          bool nearest = false) {
  int splits = 1;
  if (requested > 0) {
    splits = requested;
  } else {
    const int target = num_sms * blocks_per_sm;
    if (tiles < target) splits = nearest ? (target + tiles / 2) / tiles : (target + tiles - 1) / tiles;
    int max_by_len = k_stages / (min_stages > 0 ? min_stages : 1);
    if (max_by_len < 1) max_by_len = 1;
    if (splits > max_by_len) splits = max_by_len;
    if (splits > 32) splits = 32;
  }
  if (splits > k_stages) splits = k_stages;
  if (splits < 1) splits = 1;
  const int per = (k_stages + splits - 1) / splits;
  plan->stages_per_split = per;
  plan->splits = (k_stages + per - 1) / per;  // no empty split
  plan->counter_elems = plan->splits > 1 ? (int64_t)tiles : 0;
}

}  // namespace owl
