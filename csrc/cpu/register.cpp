// The CPU implementation of the ops owl_sparse::bitmap_linear / sparse24_linear /
// dense_linear (defined in owl_sparse/ops/library.py), registered for the CPU dispatch key,
// and the small library owl_sparse_cpu that configures it from Python:
//
//   owl_sparse_cpu::isa() -> str                 the instruction set the kernels use
//   owl_sparse_cpu::supported_isas() -> str[]    every one this CPU can run
//   owl_sparse_cpu::set_isa(str isa) -> ()       force one ("" = the best supported)
//   owl_sparse_cpu::set_backend(str fmt, str backend) -> ()
//                                                force "kernel" or "gemm" ("" = the table)
//   owl_sparse_cpu::set_table(str[] fmt, str[] dtype, int[] n, int[] k, int[] tokens,
//                             float[] sparsity, str[] backend) -> ()
//                                                the measured dispatch table of this ISA
//   owl_sparse_cpu::choose(str fmt, str dtype, int n, int k, int tokens, float sparsity)
//                                                -> str[]  [backend, reason]
//   owl_sparse_cpu::unpack_bitmap(bitmap, values, tile_offsets, int n, int k) -> Tensor
//   owl_sparse_cpu::unpack_sparse24(values, meta) -> Tensor
//   owl_sparse_cpu::set_poison(bool on) -> ()    tests: outputs start as NaN
//   owl_sparse_cpu::set_wide_panels(bool f16, bool bf16) -> ()
//                                                the GEMM backend widens 16-bit weights to
//                                                fp32 panels (where torch's GEMM in that
//                                                dtype is slow); wide_panels() -> int[2]
//   owl_sparse_cpu::backend_calls() -> int[]     kernel / gemm calls so far for bitmap, 2:4
//                                                and dense (six counters, in that order)
//   owl_sparse_cpu::read_bandwidth(Tensor t, int repeats) -> float   GB/s reading t
//
// Formats: "bitmap", "2:4" and "dense" (an nn.Linear weight as it is).  Backends: "kernel"
// runs the kernels of kernels.h on the weight's bytes as stored, <= 16 tokens per pass;
// "gemm" is torch's GEMM: for a packed weight on 16-row strips unpacked into a cache-sized
// panel (one per thread, reused by every layer), so no call ever holds a dense copy of a
// whole layer; for a dense weight on the weight itself.  The choice: forced backend, else
// the measured table (same lookup rules as owl_sparse/ops/dispatch.py), else the kernel up
// to 16 tokens (dense weights: 2) and the GEMM beyond.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../torch_check.h"
#include "kernels.h"

namespace {

using owl_cpu::Isa;

constexpr int64_t kValuesPad = 16;          // formats/bitmap.py VALUES_PAD
// The dense backend's panel (a thread's block of unpacked rows, one GEMM): torch's bf16 GEMM
// on one thread ran 1.0-1.9x as fast per row on 192-384-row panels as on a whole 4096-row
// weight (LLaMA-2-7B shapes, 16-256 tokens, ad hoc).
constexpr int64_t kPanelRows = 384;
constexpr int64_t kPanelBytes = 8 << 20;
constexpr int64_t kDenseKernelTokens = 2;  // dense weights off the table: the kernel up to this

std::atomic<int> g_forced_isa{-1};
std::atomic<bool> g_poison{false};  // tests: fill outputs with NaN before the kernels write
// The GEMM backend's panels for fp16 and bf16 weights: widened to fp32 (and x with them)
// where torch's GEMM in that dtype is slow on this CPU.  Python sets them from torch's own
// test (owl_sparse/ops/cpu.py); off until then.
std::atomic<bool> g_widen_f16{false}, g_widen_bf16{false};

bool widened(at::ScalarType t) {
  if (t == at::kHalf) return g_widen_f16.load(std::memory_order_relaxed);
  if (t == at::kBFloat16) return g_widen_bf16.load(std::memory_order_relaxed);
  return false;
}
constexpr int kFormats = 3;  // bitmap, 2:4, dense
std::atomic<int> g_forced_backend[kFormats] = {{-1}, {-1}, {-1}};  // -1 table, 0 kernel, 1 gemm
// Calls per (format, backend) since the library loaded: which backend really ran.
std::atomic<int64_t> g_backend_calls[kFormats][2] = {{{0}, {0}}, {{0}, {0}}, {{0}, {0}}};

int counted(int fmt, int backend) {
  g_backend_calls[fmt][backend].fetch_add(1, std::memory_order_relaxed);
  return backend;
}

Isa active_isa() {
  static const Isa detected = owl_cpu::detect_isa();
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  return forced >= 0 ? Isa(forced) : detected;
}

owl_cpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return owl_cpu::DType::kFloat32;
    case at::kBFloat16: return owl_cpu::DType::kBFloat16;
    default: return owl_cpu::DType::kFloat16;
  }
}

// dtype names as Python spells them (torch.int32), not c10's ("Int").
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// ------------------------------------------------------------------ dispatch table
struct Entry {
  int fmt;  // 0 bitmap, 1 2:4, 2 dense
  std::string dtype;
  int64_t n, k, tokens;
  double sparsity;
  int backend;  // 0 kernel, 1 gemm
};

std::mutex g_table_mutex;
std::shared_ptr<const std::vector<Entry>> g_table = std::make_shared<std::vector<Entry>>();

std::atomic<uint64_t> g_table_version{0};  // bumped by every set_table

std::shared_ptr<const std::vector<Entry>> table() {
  std::lock_guard<std::mutex> lock(g_table_mutex);
  return g_table;
}

int64_t token_bucket(int64_t t) {
  int64_t b = 1;
  while (b < t) b <<= 1;
  return b;
}

int format_index(const std::string& fmt) {
  OWL_CHECK_VALUE(fmt == "bitmap" || fmt == "2:4" || fmt == "dense", "unknown format '",
                  fmt.c_str(), "': expected 'bitmap', '2:4' or 'dense'");
  return fmt == "bitmap" ? 0 : fmt == "2:4" ? 1 : 2;
}

int backend_index(const std::string& name) {
  OWL_CHECK_VALUE(name == "kernel" || name == "gemm", "unknown CPU backend '", name.c_str(),
                  "': expected 'kernel' or 'gemm'");
  return name == "kernel" ? 0 : 1;
}

struct Choice {
  int backend;
  std::string why;
};

// `explain`: also say why (the `choose` op); the kernels' own calls skip formatting it
// and take `choose_fast`.
Choice choose_backend(int fmt, const char* dtype, int64_t n, int64_t k, int64_t tokens,
                      double sparsity, bool explain = false) {
  const int forced = g_forced_backend[fmt].load(std::memory_order_relaxed);
  if (forced >= 0) return {forced, explain ? "forced" : ""};
  const int64_t bucket = token_bucket(tokens);
  const auto entries = table();
  // The shape itself, else the nearest measured one within 2x (|log2 N/N'| + |log2 K/K'| <= 1).
  const Entry* best = nullptr;
  double best_shape = 1.0 + 1e-9, best_sp = 0;
  for (const Entry& e : *entries) {
    if (e.fmt != fmt || e.tokens != bucket || e.dtype != dtype) continue;
    const double d = std::fabs(std::log2(double(n) / e.n)) + std::fabs(std::log2(double(k) / e.k));
    const double ds = std::fabs(e.sparsity - sparsity);
    if (d < best_shape - 1e-12 || (std::fabs(d - best_shape) <= 1e-12 && ds < best_sp)) {
      best = &e, best_shape = d, best_sp = ds;
    }
  }
  if (best != nullptr) {
    if (!explain) return {best->backend, ""};
    char why[160];
    std::snprintf(why, sizeof(why), "table %s %lldx%lld, %lld tokens, sparsity %.3f",
                  owl_cpu::isa_name(active_isa()), (long long)best->n, (long long)best->k,
                  (long long)best->tokens, best->sparsity);
    return {best->backend, why};
  }
  const bool kernel =
      fmt == 2 ? tokens <= kDenseKernelTokens : tokens <= owl_cpu::kMaxTokens;
  if (!explain) return {kernel ? 0 : 1, ""};
  const std::string rule = std::string("cpu ") + owl_cpu::isa_name(active_isa()) + " default rule: ";
  if (fmt == 2)  // dense weights: the kernel won at 1-2 tokens on every shape measured
    return {kernel ? 0 : 1, rule + (kernel ? "kernel up to 2 tokens" : "torch GEMM beyond 2 tokens")};
  return {kernel ? 0 : 1, rule + (kernel ? "kernel up to 16 tokens" : "dense panels beyond 16 tokens")};
}

// The backend of a kernel call: choose_backend's answer, remembered per calling thread
// for each (format, dtype, shape, token count, sparsity) until the table changes (a decode
// step asks the same ~200 questions every token; scanning the table took ~0.3 us a call).
int choose_fast(int fmt, at::ScalarType dtype, int64_t n, int64_t k, int64_t tokens,
                double sparsity) {
  const int forced = g_forced_backend[fmt].load(std::memory_order_relaxed);
  if (forced >= 0) return forced;
  struct Key {
    int fmt;
    at::ScalarType dtype;
    int64_t n, k, tokens;
    double sparsity;
    bool operator==(const Key& o) const {
      return fmt == o.fmt && dtype == o.dtype && n == o.n && k == o.k && tokens == o.tokens &&
             sparsity == o.sparsity;
    }
  };
  struct Hash {
    size_t operator()(const Key& key) const {
      size_t h = std::hash<double>()(key.sparsity);
      for (int64_t v : {int64_t(key.fmt), int64_t(key.dtype), key.n, key.k, key.tokens})
        h = h * 1000003u ^ std::hash<int64_t>()(v);
      return h;
    }
  };
  thread_local std::unordered_map<Key, int, Hash> cache;
  thread_local uint64_t version = ~uint64_t(0);
  const uint64_t now = g_table_version.load(std::memory_order_acquire);
  if (version != now || cache.size() > 4096) cache.clear(), version = now;
  const Key key{fmt, dtype, n, k, tokens, sparsity};
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const int backend = choose_backend(fmt, dtype_name(dtype), n, k, tokens, sparsity).backend;
  cache.emplace(key, backend);
  return backend;
}

// ------------------------------------------------------------------ checks

void check_x(const at::Tensor& x, const at::Tensor& values, int64_t n, int64_t k,
             const char* fmt) {
  OWL_CHECK_VALUE(x.device().is_cpu(), fmt, ": x must be a CPU tensor, got ", x.device());
  OWL_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "x has shape ", x.sizes(), " but the ", fmt,
                  " weight is [", n, ", ", k, "]: the last dim must be ", k);
  OWL_CHECK_VALUE(x.scalar_type() == values.scalar_type(), "x dtype ",
                  dtype_name(x.scalar_type()), " does not match the packed weight dtype ",
                  dtype_name(values.scalar_type()));
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  std::initializer_list<int64_t> shape) {
  OWL_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  OWL_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", dtype_name(dtype),
                  ", got ", dtype_name(t.scalar_type()));
  OWL_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), name, " must have shape ",
                  at::IntArrayRef(shape), ", got ", t.sizes());
  OWL_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (shape ", t.sizes(), ")");
}

void check_values(const at::Tensor& v, const char* name) {
  OWL_CHECK_VALUE(v.device().is_cpu(), name, " must be a CPU tensor, got ", v.device());
  const auto t = v.scalar_type();
  OWL_CHECK_VALUE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
                  " must be float32, bfloat16 or float16, got ", dtype_name(t));
  OWL_CHECK_VALUE(v.is_contiguous(), name, " must be contiguous (shape ", v.sizes(), ")");
}

at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& values,
                        int64_t n) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor& b = *bias;
  OWL_CHECK_VALUE(b.device().is_cpu() && b.dim() == 1 && b.size(0) == n &&
                      b.scalar_type() == values.scalar_type(),
                  "bias must be [", n, "] ", dtype_name(values.scalar_type()), " on cpu, got ", b.sizes(),
                  " ", dtype_name(b.scalar_type()), " on ", b.device());
  return b.contiguous();
}

owl_cpu::BitmapView bitmap_view(const at::Tensor& bitmap, const at::Tensor& values,
                                const at::Tensor& offsets, int64_t n, int64_t k) {
  OWL_CHECK_VALUE(n >= 1 && k >= 1, "bitmap: N and K must be positive, got N=", n, ", K=", k);
  const int64_t np = (n + 15) / 16 * 16, kp = (k + 127) / 128 * 128;
  OWL_CHECK_VALUE(np * kp < (int64_t(1) << 31), "bitmap: weight [", n, ", ", k,
                  "] too large (int32 offsets)");
  check_tensor(bitmap, "bitmap.bitmap", at::kInt, {np, kp / 32});
  check_values(values, "bitmap.values");
  OWL_CHECK_VALUE(values.dim() == 1 && values.numel() >= kValuesPad,
                  "bitmap.values must be 1-D with at least ", kValuesPad, " elements, got ",
                  values.sizes());
  const int64_t tiles = (np / 16) * (kp / 128);
  check_tensor(offsets, "bitmap.tile_offsets", at::kInt, {tiles + 1});
  const int64_t nnz = values.numel() - kValuesPad;
  const int32_t last = offsets.data_ptr<int32_t>()[tiles];
  OWL_CHECK_VALUE(last == nnz, "bitmap.tile_offsets ends at ", int64_t(last), " but values hold ",
                  nnz, " kept entries (+", kValuesPad, " padding)");
  owl_cpu::BitmapView w{bitmap.data_ptr<int32_t>(), values.data_ptr(),
                        offsets.data_ptr<int32_t>(), n, k};
  w.nnz_count = nnz;
  return w;
}

owl_cpu::Sparse24View sparse24_view(const at::Tensor& values, const at::Tensor& meta) {
  check_values(values, "sparse24.values");
  OWL_CHECK_VALUE(values.dim() == 2 && values.size(0) >= 1 && values.size(1) >= 2 &&
                      values.size(1) % 2 == 0,
                  "sparse24.values must be [N, K/2] with N >= 1 and K % 4 == 0, got ",
                  values.sizes());
  const int64_t n = values.size(0), k = 2 * values.size(1);
  check_tensor(meta, "sparse24.meta", at::kByte, {n, (k + 7) / 8});
  return owl_cpu::Sparse24View{values.data_ptr(), meta.data_ptr<uint8_t>(), n, k};
}

void fail_corrupt(const char* fmt) {
  OWL_CHECK_VALUE(false, fmt,
                  ": the packed weight is inconsistent (bitmap: popcounts that disagree with "
                  "tile_offsets; 2:4: a group whose two indices are equal); validate() names "
                  "the first bad entry");
}

// ------------------------------------------------------------------ the two backends
// run(p, r0, r1) over rows [0, rows[p]) of every part p < parts (the weights of one call),
// in pieces of `unit` rows (a part's last may be shorter), the pieces of all parts shared out
// among torch's threads in one parallel region; an inconsistent weight is a ValueError.
template <class Run>
void over_parts(const int64_t* rows, size_t parts, int64_t unit, const Run& run,
                const char* fmt) {
  c10::SmallVector<int64_t, 8> first(parts + 1, 0);  // the parts' first piece
  for (size_t p = 0; p < parts; ++p) first[p + 1] = first[p] + (rows[p] + unit - 1) / unit;
  std::atomic<bool> ok{true};
  at::parallel_for(0, first[parts], 1, [&](int64_t b, int64_t e) {
    size_t p = size_t(std::upper_bound(first.begin(), first.end(), b) - first.begin()) - 1;
    for (int64_t u = b; u < e && ok.load(std::memory_order_relaxed); ++u) {
      while (u >= first[p + 1]) ++p;
      const int64_t r0 = (u - first[p]) * unit;
      if (!run(p, r0, std::min(r0 + unit, rows[p]))) ok.store(false);
    }
  });
  if (!ok.load()) fail_corrupt(fmt);
}

// run(r0, r1) over the rows [0, rows) of one weight (over_parts with one part).
template <class Run>
void over_rows(int64_t rows, int64_t unit, const Run& run, const char* fmt) {
  over_parts(&rows, 1, unit, [&](size_t, int64_t r0, int64_t r1) { return run(r0, r1); }, fmt);
}

// x [..., K] as rows of K elements: the first row, the row count, the row stride in
// elements.  A contiguous x is read in place (no tensor is made: a decode step calls the
// kernels ~200 times a token); otherwise `held` is x reshaped to 2-D (a copy where its rows
// are not evenly strided or not contiguous).
struct XRows {
  const char* data;
  int64_t rows, stride, elem;
  at::ScalarType dtype;
  at::Tensor held;
};

XRows rows_of(const at::Tensor& x, int64_t k) {
  if (x.is_contiguous())
    return {static_cast<const char*>(x.data_ptr()), x.numel() / k, k, int64_t(x.element_size()),
            x.scalar_type(), at::Tensor()};
  at::Tensor x2d = x.reshape({-1, k});
  if (x2d.stride(1) != 1) x2d = x2d.contiguous();
  return {static_cast<const char*>(x2d.data_ptr()), x2d.size(0), x2d.stride(0),
          int64_t(x2d.element_size()), x2d.scalar_type(), x2d};
}

// x as a 2-D tensor (the GEMM backend's operand).
at::Tensor as_2d(const XRows& x, const at::Tensor& orig) {
  if (x.held.defined()) return x.held;
  return orig.view({x.rows, x.stride});
}

// A grow-only, 64-byte aligned buffer (the dense backend's panel): allocated once per
// calling thread, reused by every layer and every call.
class Buffer {
 public:
  void* get(size_t bytes) {
    if (bytes > size_) {
      data_.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      size_ = data_ ? bytes : 0;
      OWL_CHECK(data_ != nullptr, "out of memory for a ", int64_t(bytes), "-byte panel");
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

// Sparse: passes of <= kMaxTokens tokens over the packed bytes, of about equal size (20
// tokens: 10 + 10); y [rows, sum of the weights' N] contiguous, weight i's outputs in its
// columns after those of the weights before it (one weight: y [rows, N]).  The weights share
// x (same K): one conversion of x and one parallel region a pass for all of them.
template <class View, class Kernel>
void run_sparse(const View* ws, size_t count, int64_t unit, const XRows& x,
                const at::Tensor& bias, at::Tensor& y, const char* fmt, const Kernel& kernel) {
  const Isa isa = active_isa();
  const auto dtype = kernel_dtype(x.dtype);
  const int64_t ld = ws[0].padded_k(), tokens = x.rows;
  const int64_t passes = (tokens + owl_cpu::kMaxTokens - 1) / owl_cpu::kMaxTokens;
  const int64_t per_pass = (tokens + passes - 1) / passes;
  c10::SmallVector<int64_t, 8> rows(count), col(count);
  int64_t ldy = 0;
  for (size_t i = 0; i < count; ++i) rows[i] = ws[i].n, col[i] = ldy, ldy += ws[i].n;
  // The caller's; workers only read it.  64-byte aligned: the kernels read it in 64-byte
  // vectors, and one split across two cache lines costs two loads (std::vector's storage
  // starts 16 bytes into a page once it is large: 1.7x slower at 16 tokens).
  thread_local Buffer acts;
  for (int64_t t0 = 0; t0 < tokens; t0 += per_pass) {
    const int t = int(std::min<int64_t>(per_pass, tokens - t0));
    void* ws_mem = acts.get(owl_cpu::activation_bytes(isa, dtype, t, ld));
    const char* xp = x.data + t0 * x.stride * x.elem;
    const owl_cpu::Activations a = owl_cpu::prepare_activations(
        isa, dtype, xp, t, ws[0].k, x.stride, ws_mem, ld);
    char* yp = static_cast<char*>(y.data_ptr()) + t0 * ldy * x.elem;
    const void* bp = bias.defined() ? bias.data_ptr() : nullptr;  // one weight only
    over_parts(rows.data(), count, unit, [&](size_t p, int64_t r0, int64_t r1) {
      return kernel(isa, dtype, ws[p], a, bp, yp + col[p] * x.elem, ldy, r0, r1);
    }, fmt);
  }
}

// Dense: each thread takes its share of the rows in blocks, unpacks a block into its own
// panel (cache-sized, reused by every layer) and multiplies x by it with torch's GEMM on
// that thread alone (inside the parallel region torch's GEMM runs single-threaded), into
// y's columns of those rows: no barrier between unpacking and multiplying, the block still
// in the core's cache when the GEMM reads it, and never more than a panel a thread of dense
// weights.  (One shared 4 MB panel unpacked by all threads, then one two-thread GEMM per
// panel, ran at 0.51-0.99x torch dense at 64 and 256 tokens on LLaMA-2-7B shapes, bf16,
// weights from memory; this way 0.76-1.10x: benchmarks/results/cpu-kernels-2026-12-07d.)
// Where 16-bit weights are widened (widened()), the panel, x and the GEMM are fp32, its
// output [T, rows] goes to a second per-thread buffer, and is rounded once into y (torch's
// bf16 GEMM on a 2-core Zen 3 without AVX-512: 16 GFLOP/s against 92 in fp32, 4096 x 4096,
// 256 tokens).  unpack(isa, dtype, w, r0, r1, panel, ldp, widen) fills the panel.
template <class View, class Unpack>
void run_dense(const View& w, const at::Tensor& x2d, const at::Tensor& bias, at::Tensor& y,
               const char* fmt, const Unpack& unpack) {
  const Isa isa = active_isa();
  const auto dtype = kernel_dtype(x2d.scalar_type());
  const bool widen = widened(x2d.scalar_type());
  const at::Tensor x = widen ? x2d.to(at::kFloat).contiguous()
                             : (x2d.stride(1) == 1 ? x2d : x2d.contiguous());
  const at::Tensor b = widen && bias.defined() ? bias.to(at::kFloat) : bias;
  const int64_t elem = x.element_size();
  // Blocks of whole 16-row strips, at most kPanelRows rows and kPanelBytes each, as many
  // for every thread (parallel_for gives each thread a contiguous run of them).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t strips = (w.n + 15) / 16;
  const int64_t most = std::max<int64_t>(1, std::min(kPanelRows, kPanelBytes / (w.k * elem)) / 16);
  const int64_t blocks = ((strips + most - 1) / most + threads - 1) / threads * threads;
  const int64_t per = (strips + blocks - 1) / blocks;
  over_rows(w.n, per * 16, [&](int64_t r0, int64_t r1) {
    thread_local Buffer buffer;
    char* panel = static_cast<char*>(buffer.get(size_t((r1 - r0) * w.k * elem)));
    if (!unpack(isa, dtype, w, r0, r1, panel, w.k, widen)) return false;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor p = at::from_blob(panel, {r1 - r0, w.k}, x.options());
    at::Tensor o = y.narrow(1, r0, r1 - r0);
    if (widen) {
      thread_local Buffer out_buffer;
      at::Tensor o32 = at::from_blob(out_buffer.get(size_t(x.size(0) * (r1 - r0) * 4)),
                                     {x.size(0), r1 - r0}, x.options());
      if (b.defined())
        at::addmm_out(o32, b.narrow(0, r0, r1 - r0), x, p.t());
      else
        at::mm_out(o32, x, p.t());
      o.copy_(o32);
    } else if (b.defined()) {
      at::addmm_out(o, b.narrow(0, r0, r1 - r0), x, p.t());
    } else {
      at::mm_out(o, x, p.t());
    }
    return true;
  }, fmt);
}

at::Tensor output_for(const at::Tensor& x, int64_t n) {
  c10::SmallVector<int64_t, 6> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  if (g_poison.load(std::memory_order_relaxed)) y.fill_(std::nan(""));
  return y;
}


// ------------------------------------------------------------------ the ops
// The bitmap kernel on rows [r0, r1) of v (run_sparse's kernel argument).
bool bitmap_kernel(Isa isa, owl_cpu::DType d, const owl_cpu::BitmapView& v,
                   const owl_cpu::Activations& a, const void* bp, void* yp, int64_t ldy, int64_t r0,
                   int64_t r1) {
  thread_local std::vector<int32_t> scratch;
  scratch.resize(size_t(v.col_tiles()));
  return owl_cpu::bitmap_linear(isa, d, v, a, bp, yp, ldy, r0, r1, scratch.data());
}

at::Tensor bitmap_linear(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                         const at::Tensor& tile_offsets, const c10::optional<at::Tensor>& bias,
                         int64_t n, int64_t k) {
  const owl_cpu::BitmapView w = bitmap_view(bitmap, values, tile_offsets, n, k);
  check_x(x, values, n, k, "bitmap");
  const at::Tensor b = checked_bias(bias, values, n);
  at::Tensor y = output_for(x, n);
  const XRows xr = rows_of(x, k);
  if (xr.rows == 0) return y;
  const double sparsity = 1.0 - double(w.nnz()) / (double(n) * double(k));
  if (counted(0, choose_fast(0, xr.dtype, n, k, xr.rows, sparsity)) == 0) {
    run_sparse(&w, 1, 16, xr, b, y, "bitmap", bitmap_kernel);
  } else {
    at::Tensor y2d = y.view({-1, n});
    run_dense(w, as_2d(xr, x), b, y2d, "bitmap", owl_cpu::bitmap_unpack);
  }
  return y;
}

// The bitmap weights of a layer that read the same x (q/k/v, gate/up): y [..., sum of ns],
// weight i's x @ W_i^T in its columns after those of the weights before it.  On the kernel
// backend one conversion of x and one parallel region cover them all (a decode step would
// pay both once a weight); where the table picks the GEMM for any of them, each weight runs
// as bitmap_linear does and is copied into its columns.
at::Tensor bitmap_linear_group(const at::Tensor& x, at::TensorList bitmaps, at::TensorList values,
                               at::TensorList tile_offsets, at::IntArrayRef ns, int64_t k) {
  const size_t count = bitmaps.size();
  OWL_CHECK_VALUE(count >= 1 && values.size() == count && tile_offsets.size() == count &&
                      ns.size() == count,
                  "bitmap_linear_group: bitmaps, values, tile_offsets and out_features need one "
                  "entry per weight (at least one), got ", int64_t(count), ", ",
                  int64_t(values.size()), ", ", int64_t(tile_offsets.size()), ", ",
                  int64_t(ns.size()));
  c10::SmallVector<owl_cpu::BitmapView, 8> ws;
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    ws.push_back(bitmap_view(bitmaps[i], values[i], tile_offsets[i], ns[i], k));
    check_x(x, values[i], ns[i], k, "bitmap");
    total += ns[i];
  }
  at::Tensor y = output_for(x, total);
  const XRows xr = rows_of(x, k);
  if (xr.rows == 0) return y;
  bool kernel = true;
  for (const owl_cpu::BitmapView& w : ws) {
    const double sparsity = 1.0 - double(w.nnz()) / (double(w.n) * double(w.k));
    kernel = kernel && choose_fast(0, xr.dtype, w.n, k, xr.rows, sparsity) == 0;
  }
  if (!kernel) {
    int64_t col = 0;
    for (size_t i = 0; i < count; ++i) {
      y.narrow(-1, col, ns[i]).copy_(
          bitmap_linear(x, bitmaps[i], values[i], tile_offsets[i], c10::nullopt, ns[i], k));
      col += ns[i];
    }
    return y;
  }
  for (size_t i = 0; i < count; ++i) counted(0, 0);
  run_sparse(ws.data(), count, 16, xr, at::Tensor(), y, "bitmap", bitmap_kernel);
  return y;
}

at::Tensor sparse24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const c10::optional<at::Tensor>& bias) {
  const owl_cpu::Sparse24View w = sparse24_view(values, meta);
  check_x(x, values, w.n, w.k, "2:4");
  const at::Tensor b = checked_bias(bias, values, w.n);
  at::Tensor y = output_for(x, w.n);
  const XRows xr = rows_of(x, w.k);
  if (xr.rows == 0) return y;
  if (counted(1, choose_fast(1, xr.dtype, w.n, w.k, xr.rows, 0.5)) == 0) {
    run_sparse(&w, 1, 16, xr, b, y, "2:4",
               [](Isa isa, owl_cpu::DType d, const owl_cpu::Sparse24View& v,
                  const owl_cpu::Activations& a, const void* bp, void* yp, int64_t ldy,
                  int64_t r0, int64_t r1) {
                 return owl_cpu::sparse24_linear(isa, d, v, a, bp, yp, ldy, r0, r1);
               });
  } else {
    at::Tensor y2d = y.view({-1, w.n});
    run_dense(w, as_2d(xr, x), b, y2d, "2:4", owl_cpu::sparse24_unpack);
  }
  return y;
}

// An nn.Linear weight [N, K], contiguous.
owl_cpu::DenseView dense_view(const at::Tensor& weight) {
  check_values(weight, "weight");
  OWL_CHECK_VALUE(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1,
                  "weight must be [N, K] with N, K >= 1, got ", weight.sizes());
  return owl_cpu::DenseView{weight.data_ptr(), weight.size(0), weight.size(1), weight.size(1)};
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias) {
  OWL_CHECK_VALUE(weight.device().is_cpu(), "dense_linear: weight must be a CPU tensor, got ",
                  weight.device());
  const at::Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
  const owl_cpu::DenseView w = dense_view(wc);
  check_x(x, wc, w.n, w.k, "dense");
  const at::Tensor b = checked_bias(bias, wc, w.n);
  const XRows xr = rows_of(x, w.k);
  if (xr.rows == 0) return output_for(x, w.n);
  if (counted(2, choose_fast(2, xr.dtype, w.n, w.k, xr.rows, 0.0)) == 1) {
    if (widened(xr.dtype)) {
      // Blocks of rows widened to fp32 panels, as for packed weights (no fp32 copy of the
      // whole weight).
      at::Tensor y = output_for(x, w.n);
      at::Tensor y2d = y.view({-1, w.n});
      run_dense(w, as_2d(xr, x), b, y2d, "dense",
                [&wc](Isa, owl_cpu::DType, const owl_cpu::DenseView&, int64_t r0, int64_t r1,
                      void* panel, int64_t ldp, bool) {
                  at::from_blob(panel, {r1 - r0, wc.size(1)}, {ldp, 1},
                                wc.options().dtype(at::kFloat))
                      .copy_(wc.narrow(0, r0, r1 - r0));
                  return true;
                });
      return y;
    }
    // Contiguous, as the fake implementation says (the compiled decode step does not check
    // its ops' output strides at run time).
    return at::linear(x, wc, b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt)
        .contiguous();
  }
  at::Tensor y = output_for(x, w.n);
  run_sparse(&w, 1, 16, xr, b, y, "dense",
             [](Isa isa, owl_cpu::DType d, const owl_cpu::DenseView& v,
                const owl_cpu::Activations& a, const void* bp, void* yp, int64_t ldy, int64_t r0,
                int64_t r1) { return owl_cpu::dense_linear(isa, d, v, a, bp, yp, ldy, r0, r1); });
  return y;
}

at::Tensor unpack_bitmap(const at::Tensor& bitmap, const at::Tensor& values,
                         const at::Tensor& tile_offsets, int64_t n, int64_t k) {
  const owl_cpu::BitmapView w = bitmap_view(bitmap, values, tile_offsets, n, k);
  at::Tensor out = at::empty({n, k}, values.options());
  const Isa isa = active_isa();
  const auto dtype = kernel_dtype(values.scalar_type());
  over_rows(n, 16, [&](int64_t r0, int64_t r1) {
    return owl_cpu::bitmap_unpack(isa, dtype, w, r0, r1,
                                  static_cast<char*>(out.data_ptr()) + r0 * k * out.element_size(), k,
                                  false);
  }, "bitmap");
  return out;
}

at::Tensor unpack_sparse24(const at::Tensor& values, const at::Tensor& meta) {
  const owl_cpu::Sparse24View w = sparse24_view(values, meta);
  at::Tensor out = at::empty({w.n, w.k}, values.options());
  const Isa isa = active_isa();
  const auto dtype = kernel_dtype(values.scalar_type());
  over_rows(w.n, 16, [&](int64_t r0, int64_t r1) {
    return owl_cpu::sparse24_unpack(isa, dtype, w, r0, r1,
                                    static_cast<char*>(out.data_ptr()) + r0 * w.k * out.element_size(),
                                    w.k, false);
  }, "2:4");
  return out;
}

// ------------------------------------------------------------------ configuration ops
const Isa kIsas[] = {Isa::kPortable, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16};

std::string isa() { return owl_cpu::isa_name(active_isa()); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa i : kIsas)
    if (owl_cpu::isa_supported(i)) out.push_back(owl_cpu::isa_name(i));
  return out;
}

void set_isa(const std::string& name) {
  if (name.empty()) {
    g_forced_isa.store(-1);
    return;
  }
  for (Isa i : kIsas) {
    if (name == owl_cpu::isa_name(i)) {
      OWL_CHECK_VALUE(owl_cpu::isa_supported(i), "this CPU cannot run the '", name.c_str(),
                      "' kernels");
      g_forced_isa.store(int(i));
      return;
    }
  }
  OWL_CHECK_VALUE(false, "unknown instruction set '", name.c_str(),
                  "': expected portable, avx2, avx512 or avx512_bf16");
}

void set_poison(bool on) { g_poison.store(on); }

void set_wide_panels(bool f16, bool bf16) {
  g_widen_f16.store(f16);
  g_widen_bf16.store(bf16);
}

std::vector<int64_t> wide_panels() { return {g_widen_f16.load(), g_widen_bf16.load()}; }

std::vector<int64_t> backend_calls() {
  std::vector<int64_t> out;
  for (auto& fmt : g_backend_calls)
    for (auto& c : fmt) out.push_back(c.load(std::memory_order_relaxed));
  return out;
}

// Read bandwidth of this machine: GB/s of summing `t` (any dtype, contiguous) with torch's
// threads, 8 independent 64-bit accumulators per thread (what a streaming kernel can get).
double read_bandwidth(const at::Tensor& t, int64_t repeats) {
  OWL_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous() && t.nbytes() % 64 == 0,
                  "read_bandwidth needs a contiguous CPU tensor of a multiple of 64 bytes");
  const auto* p = static_cast<const uint64_t*>(t.data_ptr());
  const int64_t words = int64_t(t.nbytes() / 8);
  std::atomic<uint64_t> sink{0};
  double best = 0;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, words / 8, 4096, [&](int64_t b, int64_t e) {
      uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = b; i < e; ++i)
        for (int j = 0; j < 8; ++j) a[j] += p[i * 8 + j];
      sink.fetch_add(a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7]);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(t.nbytes()) / s / 1e9);
  }
  return sink.load() == 42 ? best + 0.0 : best;  // sink keeps the loads alive
}

void set_backend(const std::string& fmt, const std::string& backend) {
  g_forced_backend[format_index(fmt)].store(backend.empty() ? -1 : backend_index(backend));
}

void set_table(const std::vector<std::string>& fmt, const std::vector<std::string>& dtype,
               const std::vector<int64_t>& n, const std::vector<int64_t>& k,
               const std::vector<int64_t>& tokens, const std::vector<double>& sparsity,
               const std::vector<std::string>& backend) {
  const size_t m = fmt.size();
  OWL_CHECK_VALUE(dtype.size() == m && n.size() == m && k.size() == m && tokens.size() == m &&
                      sparsity.size() == m && backend.size() == m,
                  "set_table: every column must have ", int64_t(m), " entries");
  auto entries = std::make_shared<std::vector<Entry>>();
  for (size_t i = 0; i < m; ++i) {
    OWL_CHECK_VALUE(n[i] >= 1 && k[i] >= 1 && tokens[i] >= 1 && token_bucket(tokens[i]) == tokens[i],
                    "set_table: entry ", int64_t(i), " needs N, K >= 1 and power-of-two tokens");
    entries->push_back({format_index(fmt[i]), dtype[i], n[i], k[i], tokens[i], sparsity[i],
                        backend_index(backend[i])});
  }
  std::lock_guard<std::mutex> lock(g_table_mutex);
  g_table = std::move(entries);
  g_table_version.fetch_add(1, std::memory_order_release);
}

std::vector<std::string> choose(const std::string& fmt, const std::string& dtype, int64_t n,
                                int64_t k, int64_t tokens, double sparsity) {
  const Choice c = choose_backend(format_index(fmt), dtype.c_str(), n, k, tokens, sparsity, true);
  return {c.backend == 0 ? "kernel" : "gemm", c.why};
}

}  // namespace

TORCH_LIBRARY(owl_sparse_cpu, m) {
  m.def("isa() -> str", &isa);
  m.def("supported_isas() -> str[]", &supported_isas);
  m.def("set_isa(str isa) -> ()", &set_isa);
  m.def("set_backend(str fmt, str backend) -> ()", &set_backend);
  m.def("set_table(str[] fmt, str[] dtype, int[] n, int[] k, int[] tokens, float[] sparsity, "
        "str[] backend) -> ()",
        &set_table);
  m.def("choose(str fmt, str dtype, int n, int k, int tokens, float sparsity) -> str[]", &choose);
  m.def("unpack_bitmap(Tensor bitmap, Tensor values, Tensor tile_offsets, int n, int k) -> Tensor",
        &unpack_bitmap);
  m.def("unpack_sparse24(Tensor values, Tensor meta) -> Tensor", &unpack_sparse24);
  m.def("set_poison(bool on) -> ()", &set_poison);
  m.def("set_wide_panels(bool f16, bool bf16) -> ()", &set_wide_panels);
  m.def("wide_panels() -> int[]", &wide_panels);
  m.def("backend_calls() -> int[]", &backend_calls);
  m.def("read_bandwidth(Tensor t, int repeats) -> float", &read_bandwidth);
}

TORCH_LIBRARY_IMPL(owl_sparse, CPU, m) {
  m.impl("bitmap_linear", &bitmap_linear);
  m.impl("bitmap_linear_group", &bitmap_linear_group);
  m.impl("sparse24_linear", &sparse24_linear);
  m.impl("dense_linear", &dense_linear);
}

// ------------------------------------------------------------------ C shims
// The same three ops as plain C functions, for inductor's C++ wrapper to call directly
// (torch._inductor.config.aot_inductor.custom_ops_to_c_shims): a compiled decode step then
// skips the boxed dispatcher call (op lookup by name, argument boxing, tensor handles) on
// each of its ~200 linear layers.  Each records itself for torch.profiler under the op's
// name, as the dispatcher would (benchmarks time the linear layers by it).  Named as inductor names a shim (aoti_torch_<device>_<op>);
// CPU tensors only, as these functions are the CPU implementation (owl_sparse/ops/cpu.py
// registers them for CPU graphs only).
#define OWL_SHIM extern "C" __attribute__((visibility("default"))) AOTITorchError

namespace {
const at::Tensor& tensor_of(AtenTensorHandle h) {
  return *torch::aot_inductor::tensor_handle_to_tensor_pointer(h);
}
std::vector<at::Tensor> tensors_of(const AtenTensorHandle* hs, int64_t len) {
  std::vector<at::Tensor> out;
  out.reserve(size_t(len));
  for (int64_t i = 0; i < len; ++i) out.push_back(tensor_of(hs[i]));
  return out;
}
c10::optional<at::Tensor> optional_of(const AtenTensorHandle* h) {
  return h ? c10::optional<at::Tensor>(tensor_of(*h)) : c10::nullopt;
}
}  // namespace

OWL_SHIM aoti_torch_cpu_bitmap_linear(AtenTensorHandle x, AtenTensorHandle bitmap,
                                      AtenTensorHandle values, AtenTensorHandle tile_offsets,
                                      AtenTensorHandle* bias, int64_t n, int64_t k,
                                      AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    RECORD_FUNCTION("owl_sparse::bitmap_linear", c10::ArrayRef<const c10::IValue>());
    *ret0 = torch::aot_inductor::new_tensor_handle(bitmap_linear(
        tensor_of(x), tensor_of(bitmap), tensor_of(values), tensor_of(tile_offsets),
        optional_of(bias), n, k));
  });
}

OWL_SHIM aoti_torch_cpu_bitmap_linear_group(
    AtenTensorHandle x, const AtenTensorHandle* bitmaps, int64_t bitmaps_len_,
    const AtenTensorHandle* values, int64_t values_len_, const AtenTensorHandle* tile_offsets,
    int64_t tile_offsets_len_, const int64_t* ns, int64_t ns_len_, int64_t k,
    AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    RECORD_FUNCTION("owl_sparse::bitmap_linear_group", c10::ArrayRef<const c10::IValue>());
    *ret0 = torch::aot_inductor::new_tensor_handle(bitmap_linear_group(
        tensor_of(x), tensors_of(bitmaps, bitmaps_len_), tensors_of(values, values_len_),
        tensors_of(tile_offsets, tile_offsets_len_), at::IntArrayRef(ns, size_t(ns_len_)), k));
  });
}

OWL_SHIM aoti_torch_cpu_sparse24_linear(AtenTensorHandle x, AtenTensorHandle values,
                                        AtenTensorHandle meta, AtenTensorHandle* bias,
                                        AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    RECORD_FUNCTION("owl_sparse::sparse24_linear", c10::ArrayRef<const c10::IValue>());
    *ret0 = torch::aot_inductor::new_tensor_handle(
        sparse24_linear(tensor_of(x), tensor_of(values), tensor_of(meta), optional_of(bias)));
  });
}

OWL_SHIM aoti_torch_cpu_dense_linear(AtenTensorHandle x, AtenTensorHandle weight,
                                     AtenTensorHandle* bias, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    RECORD_FUNCTION("owl_sparse::dense_linear", c10::ArrayRef<const c10::IValue>());
    *ret0 = torch::aot_inductor::new_tensor_handle(
        dense_linear(tensor_of(x), tensor_of(weight), optional_of(bias)));
  });
}

// `import owl_sparse._cpu` (the setup.py build) loads this library, which registers the ops
// above; the module itself is empty.  The JIT build is loaded as a plain library instead.
extern "C" PyObject* PyInit__cpu(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_cpu", nullptr, -1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
