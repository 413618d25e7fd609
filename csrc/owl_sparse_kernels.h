// Host-side interface of the owl-sparse CUDA kernels.
//
// Plain C++ plus the CUDA runtime types: no torch, no device code.  The kernels
// (sparse24_mma.cu, bitmap_mma.cu) implement these functions; bindings.cpp validates
// torch tensors, allocates outputs and workspaces, and calls them.  Keeping torch out
// of the kernel translation units lets `nvcc -c` compile-check them on any machine
// with a CUDA toolkit (tests/test_cuda_compile.py).
//
// Both products compute y[T, N] = x[T, K] @ W[N, K]^T (+ bias[N]) with W packed in a
// sparse format.  Weights are the MMA "A" operand (rows = output features), tokens are
// the n8 dimension of the MMA: a decode step with 1-8 tokens uses one n8 tile instead
// of padding the token count to 32 or 64 as dense-weight-as-B kernels must.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace owl {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// A launch plan: which tile configuration, how many K splits, and the workspace the
// caller must provide.  Split-K writes fp32 partial tiles to `partials`
// ([splits, T, N]) and the last block of each output tile (found with `counters`,
// one int32 per output tile, zero on entry and reset to zero on exit) reduces them in
// a fixed order, so results are deterministic.
struct LaunchPlan {
  int config = 0;          // index into the kernel's configuration table
  int block_m = 0;         // rows (output features) per block
  int block_n = 0;         // tokens per block
  int grid_m = 0;          // blocks along N
  int grid_n = 0;          // blocks along T
  int splits = 1;          // blocks along K
  int stages_per_split = 0;  // 128-wide K stages each split handles
  int smem_bytes = 0;      // dynamic shared memory per block
  int64_t partial_elems = 0;  // fp32 elements of `partials` (0 when splits == 1)
  int64_t counter_elems = 0;  // int32 elements of `counters` (0 when splits == 1)
};

// ---- 2:4 sparse tensor-core product (mma.sp m16n8k32) ---------------------------
//
// values_mma: 16-bit, Np*Kp/2 elements in fragment order (owl_sparse/formats/mma_layout.py):
//   [Np/16][Kp/32][32 lanes][8], where lane (g = lane/4, t = lane%4) holds the
//   compressed columns 2t, 2t+1 (rows g, g+8) and 2t+8, 2t+9 (rows g, g+8) of one
//   16 x 16 compressed tile, in the order of the mma.sp A registers a0..a3.
// meta_mma: int32 [Np/16][Kp/128][32 lanes][2]: word h of lane (g, t) for stage s is
//   meta16[16*mt + g][4*(2s+h) + t] | meta16[16*mt + g + 8][4*(2s+h) + t] << 16,
//   where meta16 is the canonical 16-bit metadata word of 16 logical columns.
// Np = ceil(N/16)*16, Kp = ceil(K/128)*128 (zero values / indices (0,1) in padding).
struct Sparse24Args {
  const void* x = nullptr;           // [T, K] row-major (16-byte aligned)
  const void* values_mma = nullptr;  // see above (16-byte aligned)
  const int32_t* meta_mma = nullptr;  // see above (16-byte aligned)
  const void* bias = nullptr;        // [N] or nullptr
  void* y = nullptr;                 // [T, N] row-major
  float* partials = nullptr;         // [splits, T, N] when splits > 1
  int32_t* counters = nullptr;       // [grid_m * grid_n] zeros when splits > 1
  int T = 0, N = 0, K = 0;
  DType dtype = DType::kHalf;
};

// Choose configuration and split count.  `requested_splits` <= 0 picks automatically
// (fill the multiprocessors); > 0 forces that many splits (clamped to the K stages),
// used by tests to exercise the split-K reduction.  Returns cudaSuccess or the error of
// the device query.
// `config` >= 0 asks for that configuration (tests, and the wgmma backend): it must run
// on this device as it is (cudaErrorNotSupported otherwise), it is never swapped.
cudaError_t sparse24_plan(int T, int N, int K, int requested_splits, int device,
                          LaunchPlan* plan, int config = -1);

// The index of the wgmma.sp configuration (Hopper's warpgroup sparse tensor cores) when
// this build has sm_90a machine code and `device` is compute capability 9.0, else -1.
int sparse24_wgmma_config(int device);
cudaError_t sparse24_run(const Sparse24Args& args, const LaunchPlan& plan,
                         cudaStream_t stream);

// ---- bitmap product (decode 16 x 128 tiles to shared memory, mma.sync m16n8k16) -----
//
// bitmap: int32 [Np, Kp/32] (Kp = ceil(K/128)*128), values: 16-bit [nv] (kept values
// tile by tile), tile_offsets: int32 [Np/16 * Kp/128 + 1]; the layout of
// owl_sparse/formats/bitmap.py.
struct BitmapArgs {
  const void* x = nullptr;              // [T, K] row-major (16-byte aligned)
  const int32_t* bitmap = nullptr;      // 16-byte aligned
  const void* values = nullptr;         // 16-byte aligned
  const int32_t* tile_offsets = nullptr;
  int64_t num_values = 0;               // elements of `values` (never read past)
  int64_t max_tile_values = -1;         // most values in one 16 x 128 tile; < 0 = unknown
                                        // (a speed hint: shared slots are sized by it,
                                        // larger tiles are read from global memory)
  const void* bias = nullptr;
  void* y = nullptr;
  float* partials = nullptr;
  int32_t* counters = nullptr;
  int T = 0, N = 0, K = 0;
  DType dtype = DType::kHalf;
};

// `config` as for sparse24_plan (>= 0: that configuration, never swapped).
cudaError_t bitmap_plan(int T, int N, int K, int requested_splits, int64_t max_tile_values,
                        int device, LaunchPlan* plan, int config = -1);

// The bitmap configuration on Hopper's warpgroup MMA for T tokens (33-128 are what it is
// for; 1-128 run), or -1: T > 128, not an sm_90a build, or not compute capability 9.0.
int bitmap_wgmma_config(int T, int device);
cudaError_t bitmap_run(const BitmapArgs& args, const LaunchPlan& plan,
                       cudaStream_t stream);

// The CUDA-core kernel for 1-8 tokens (same arguments; T > 8 is cudaErrorInvalidValue).
// (one configuration per token count: `config` must be < 0)
cudaError_t bitmap_gemv_plan(int T, int N, int K, int requested_splits, int64_t max_tile_values,
                             int device, LaunchPlan* plan, int config = -1);
cudaError_t bitmap_gemv_run(const BitmapArgs& args, const LaunchPlan& plan,
                            cudaStream_t stream);

}  // namespace owl
