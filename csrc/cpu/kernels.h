// owl-sparse CPU kernels: y[T, N] = x[T, K] @ W^T (+ bias) straight from the packed bytes.
//
// Plain C++ (no torch headers): register.cpp validates torch tensors, allocates the
// output, splits the rows over threads and calls these functions; a compiler alone can
// check and test them.  Layouts are exactly those of owl_sparse/formats/bitmap.py and
// sparse24.py: bitmap = 16 x 128 tiles, one bit per weight (int32 words, bit j = column
// 32w + j), kept values packed tile by tile and row by row inside a tile; 2:4 = values
// [N, K/2] and 2-bit in-group indices, two groups per meta byte.
//
// Every kernel reads each packed byte once per call for all T tokens (T <= kMaxTokens),
// accumulates in fp32 and writes y in the values' dtype.  The instruction set is chosen at
// run time (detect_isa); one binary runs on any x86-64 (or other) CPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace owl_cpu {

enum class Isa : int {
  kPortable = 0,    // plain C++ (any CPU)
  kAvx2 = 1,        // AVX2 + FMA + F16C + BMI2: per-byte shuffle tables expand 8 columns
  kAvx512 = 2,      // AVX-512 F/BW/VL + VBMI2: vpexpandw places 32 values under a mask
  kAvx512Bf16 = 3,  // kAvx512 + AVX512_BF16: bf16 weights multiply with vdpbf16ps
};

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kMaxTokens = 16;  // token counts per kernel call (more: call again)
constexpr int kTileN = 16, kTileK = 128;

const char* isa_name(Isa isa);
Isa detect_isa();  // the best Isa this CPU (and OS) supports
bool isa_supported(Isa isa);

struct BitmapView {
  const int32_t* bitmap;        // [Np, Kp/32]
  const void* values;           // [nnz + 16], dtype
  const int32_t* tile_offsets;  // [Np/16 * Kp/128 + 1]
  int64_t n, k;                 // logical shape
  int64_t padded_k() const { return (k + kTileK - 1) / kTileK * kTileK; }
  int64_t strips() const { return (n + kTileN - 1) / kTileN; }
  int64_t col_tiles() const { return padded_k() / kTileK; }
  int64_t nnz_count = 0;        // kept values (values.numel() - 16)
  int64_t nnz() const { return nnz_count; }
};

// A dense weight (nn.Linear's [N, K], row-major with row stride ld >= K elements): read
// row after row, front to back (loops.h dense_row), each weight byte once per call for all
// tokens, like the packed kernels.
struct DenseView {
  const void* values;  // [N, ld], dtype
  int64_t n, k, ld;
  int64_t padded_k() const { return (k + 31) / 32 * 32; }
};

struct Sparse24View {
  const void* values;   // [N, K/2], dtype
  const uint8_t* meta;  // [N, ceil(K/8)]
  int64_t n, k;         // K % 4 == 0
  int64_t padded_k() const { return (k + 31) / 32 * 32; }
};

// The activations as the kernels read them, in the compute dtype (bf16 for kAvx512Bf16 with
// bf16 weights, fp32 otherwise), zero beyond column K up to ld (a multiple of 32), blocked
// by 32 columns with the tokens inside: (t, c) is element ((c / 32) * T + t) * 32 + c % 32,
// so one word's T activation vectors lie next to each other.
struct Activations {
  const void* data;
  int tokens;
  int64_t ld;  // padded K of the weight
};

// Bytes of the activation workspace for T tokens of a weight whose padded K is ld.
size_t activation_bytes(Isa isa, DType dtype, int tokens, int64_t ld);
// Converts x [T, K] (row stride ldx elements, dtype) into the workspace.
Activations prepare_activations(Isa isa, DType dtype, const void* x, int tokens, int64_t k,
                                int64_t ldx, void* workspace, int64_t ld);

// Output rows [row_begin, row_end) of y (row stride ldy, dtype), for all tokens.
// bitmap: rows are whole 16-row strips, row_begin % 16 == 0 (row_end may be N);
// `scratch` holds col_tiles() int32.  bias: [N] in dtype or nullptr.
//
// These functions, and the unpacking ones, return false for a weight whose contents are
// inconsistent (bitmap: popcounts that disagree with tile_offsets; 2:4: a group whose two
// indices are equal); they never read outside the packed tensors, and y is then garbage.

bool bitmap_linear(Isa isa, DType dtype, const BitmapView& w, const Activations& x,
                   const void* bias, void* y, int64_t ldy, int64_t row_begin, int64_t row_end,
                   int32_t* scratch);
bool sparse24_linear(Isa isa, DType dtype, const Sparse24View& w, const Activations& x,
                     const void* bias, void* y, int64_t ldy, int64_t row_begin, int64_t row_end);

bool dense_linear(Isa isa, DType dtype, const DenseView& w, const Activations& x,
                  const void* bias, void* y, int64_t ldy, int64_t row_begin, int64_t row_end);

// Dense rows [row_begin, row_end) of W into panel (row stride ldp >= K); columns beyond K
// are not written.  The panel holds dtype, or fp32 where `widen` (16-bit values widened, for
// CPUs whose 16-bit GEMM in torch is slow; ignored for fp32).  bitmap: row_begin % 16 == 0.
bool bitmap_unpack(Isa isa, DType dtype, const BitmapView& w, int64_t row_begin,
                   int64_t row_end, void* panel, int64_t ldp, bool widen);
bool sparse24_unpack(Isa isa, DType dtype, const Sparse24View& w, int64_t row_begin,
                     int64_t row_end, void* panel, int64_t ldp, bool widen);

}  // namespace owl_cpu
