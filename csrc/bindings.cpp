// Thin torch binding of the owl-sparse CUDA kernels: validates tensors (errors name the
// shapes), allocates the output and the split-K workspace, launches on the current
// stream.  Registered as internal ops of the library `owl_sparse_C`; the public ops
// (owl_sparse::bitmap_linear / sparse24_linear) reach them through the dispatch table
// (owl_sparse/cuda_ext.py registers the backends "cuda_mma", "cuda_gemv", "cuda_sp" and
// "cuda_sp_wgmma").
//
//   owl_sparse_C::sparse24_mm(x, values_mma, meta_mma, n, k, bias=None, split_k=0,
//                             config=-1) -> y
//   owl_sparse_C::bitmap_mm(x, bitmap, values, tile_offsets, n, k, bias=None, split_k=0,
//                           max_tile_values=-1, config=-1) -> y
//   owl_sparse_C::bitmap_gemv(bitmap_mm's arguments but config; x of 1 to 8 tokens) -> y
//   owl_sparse_C::plan(kind, t, n, k, split_k, max_tile_values=-1, config=-1) -> [config,
//                                        block_m, block_n, grid_m, grid_n, splits, smem_bytes]
//   owl_sparse_C::sparse24_wgmma_config() -> the wgmma configuration's index here, or -1
//   owl_sparse_C::bitmap_wgmma_config(t) -> the same for bitmap_mm and t tokens, or -1
//
// split_k = 0 chooses automatically; > 0 forces that many K splits (tests, benchmarks).
// config = -1 chooses the configuration automatically (never a wgmma one); >= 0 asks for
// that one, which must run on this device as it is.
// max_tile_values: the most values any 16 x 128 tile of the bitmap weight holds (< 0:
// unknown).  A speed hint only: it sizes the kernel's shared buffers, and a tile that
// holds more is read from global memory, never truncated.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include <algorithm>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "owl_sparse_kernels.h"
#include "torch_check.h"

namespace {

constexpr int64_t kStageK = 128;

using owl_check::Msg;

at::IntArrayRef shape_str(const at::Tensor& t) { return t.sizes(); }

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The kernels read 16-byte granules: a view that starts mid-allocation gets copied.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

owl::DType check_x(const at::Tensor& x, int64_t n, int64_t k, const char* op) {
  OWL_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  OWL_CHECK(x.dim() == 2, op, ": x must be 2-D [T, K], got ", shape_str(x));
  OWL_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16, got ", x.scalar_type(), " (fp32 weights use the dense or Triton path)");
  OWL_CHECK(n >= 1 && k >= 1, op, ": bad weight shape N=", n, ", K=", k);
  OWL_CHECK(x.size(1) == k, op, ": x ", shape_str(x), " does not match the weight [N, K] = [", n,
              ", ", k, "]");
  OWL_CHECK(x.size(0) <= INT32_MAX && n * k < (int64_t(1) << 31), op, ": shape too large: x ",
              shape_str(x), ", weight [", n, ", ", k, "]");
  return x.scalar_type() == at::kHalf ? owl::DType::kHalf : owl::DType::kBFloat16;
}

void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n,
                const char* op) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  OWL_CHECK(b.device() == x.device(), op, ": bias is on ", b.device(), ", x on ", x.device());
  OWL_CHECK(b.dim() == 1 && b.size(0) == n, op, ": bias must be [", n, "], got ", shape_str(b));
  OWL_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias dtype ", b.scalar_type(),
              " must match x dtype ", x.scalar_type());
}

void check_same(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  OWL_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", x on ",
              x.device());
}

// What a planning error means for the caller (cudaGetErrorString alone is too terse).
std::string plan_error(cudaError_t err) {
  if (err == cudaErrorInvalidConfiguration)
    return "more token tiles or K splits than one launch takes (65535): pass fewer tokens per "
           "call or a smaller split_k";
  return cudaGetErrorString(err);
}

// Workspace for split-K: fp32 partials [splits, T, N] and zeroed int32 tile counters.
struct Workspace {
  at::Tensor partials, counters;
};

Workspace make_workspace(const owl::LaunchPlan& plan, const at::Tensor& x) {
  Workspace w;
  if (plan.splits > 1) {
    w.partials = at::empty({plan.partial_elems}, x.options().dtype(at::kFloat));
    w.counters = at::zeros({plan.counter_elems}, x.options().dtype(at::kInt));
  }
  return w;
}

at::Tensor sparse24_mm(const at::Tensor& x_in, const at::Tensor& values_mma,
                       const at::Tensor& meta_mma, int64_t n, int64_t k,
                       const c10::optional<at::Tensor>& bias, int64_t split_k, int64_t config) {
  const char* op = "owl_sparse_C::sparse24_mm";
  const owl::DType dt = check_x(x_in, n, k, op);
  OWL_CHECK(k % 4 == 0, op, ": 2:4 needs K % 4 == 0, got K=", k);
  const int64_t np = (n + 15) / 16 * 16, kp = (k + kStageK - 1) / kStageK * kStageK;
  check_same(values_mma, x_in, "values_mma", op);
  check_same(meta_mma, x_in, "meta_mma", op);
  OWL_CHECK(values_mma.scalar_type() == x_in.scalar_type(), op, ": values_mma dtype ",
              values_mma.scalar_type(), " must match x dtype ", x_in.scalar_type());
  OWL_CHECK(values_mma.numel() == np * kp / 2, op, ": values_mma ", shape_str(values_mma),
              " must hold Np*Kp/2 = ", np, "*", kp, "/2 = ", np * kp / 2,
              " elements for weight [", n, ", ", k, "] (use owl_sparse.formats.mma_layout)");
  OWL_CHECK(meta_mma.scalar_type() == at::kInt, op, ": meta_mma must be int32, got ",
              meta_mma.scalar_type());
  OWL_CHECK(meta_mma.numel() == np / 16 * (kp / kStageK) * 64, op, ": meta_mma ",
              shape_str(meta_mma), " must be [", np / 16, ", ", kp / kStageK,
              ", 32, 2] for weight [", n, ", ", k, "]");
  check_bias(bias, x_in, n, op);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t t = x_in.size(0);
  at::Tensor y = at::empty({t, n}, x_in.options());
  if (t == 0) return y;
  const at::Tensor x = aligned_contiguous(x_in);
  const at::Tensor v = aligned_contiguous(values_mma);
  const at::Tensor m = aligned_contiguous(meta_mma);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();

  owl::LaunchPlan plan;
  cudaError_t err = owl::sparse24_plan((int)t, (int)n, (int)k, (int)split_k,
                                       x.device().index(), &plan, (int)config);
  OWL_CHECK(err == cudaSuccess, op, ": planning failed for x ", shape_str(x), ", weight [", n,
              ", ", k, "], config ", config, ": ", plan_error(err));
  Workspace ws = make_workspace(plan, x);
  owl::Sparse24Args a;
  a.x = x.data_ptr();
  a.values_mma = v.data_ptr();
  a.meta_mma = m.data_ptr<int32_t>();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.partials = ws.partials.defined() ? ws.partials.data_ptr<float>() : nullptr;
  a.counters = ws.counters.defined() ? ws.counters.data_ptr<int32_t>() : nullptr;
  a.T = (int)t;
  a.N = (int)n;
  a.K = (int)k;
  a.dtype = dt;
  err = owl::sparse24_run(a, plan, c10::cuda::getCurrentCUDAStream());
  OWL_CHECK(err == cudaSuccess, op, ": launch failed for x ", shape_str(x), ", weight [", n,
              ", ", k, "] (config ", plan.config, ", ", plan.splits, " splits, ", plan.smem_bytes,
              " B shared): ", cudaGetErrorString(err));
  return y;
}

// bitmap_mm (tensor cores) and bitmap_gemv (CUDA cores, 1-8 tokens): same checks and
// arguments, different kernel.
at::Tensor bitmap_op(const at::Tensor& x_in, const at::Tensor& bitmap, const at::Tensor& values,
                     const at::Tensor& tile_offsets, int64_t n, int64_t k,
                     const c10::optional<at::Tensor>& bias, int64_t split_k,
                     int64_t max_tile_values, int64_t config, bool gemv) {
  const char* op = gemv ? "owl_sparse_C::bitmap_gemv" : "owl_sparse_C::bitmap_mm";
  const owl::DType dt = check_x(x_in, n, k, op);
  const int64_t np = (n + 15) / 16 * 16, kp = (k + kStageK - 1) / kStageK * kStageK;
  const int64_t tiles = np / 16 * (kp / kStageK);
  check_same(bitmap, x_in, "bitmap", op);
  check_same(values, x_in, "values", op);
  check_same(tile_offsets, x_in, "tile_offsets", op);
  OWL_CHECK(bitmap.scalar_type() == at::kInt && bitmap.dim() == 2 && bitmap.size(0) == np &&
                  bitmap.size(1) == kp / 32,
              op, ": bitmap must be int32 [", np, ", ", kp / 32, "] for weight [", n, ", ", k,
              "], got ", bitmap.scalar_type(), " ", shape_str(bitmap));
  OWL_CHECK(values.scalar_type() == x_in.scalar_type() && values.dim() == 1, op,
              ": values must be 1-D ", x_in.scalar_type(), ", got ", values.scalar_type(), " ",
              shape_str(values));
  OWL_CHECK(tile_offsets.scalar_type() == at::kInt && tile_offsets.dim() == 1 &&
                  tile_offsets.size(0) == tiles + 1,
              op, ": tile_offsets must be int32 [", tiles + 1, "] for weight [", n, ", ", k,
              "], got ", tile_offsets.scalar_type(), " ", shape_str(tile_offsets));
  check_bias(bias, x_in, n, op);
  OWL_CHECK(!gemv || x_in.size(0) <= 8, op, ": handles 1 to 8 tokens, got x ", shape_str(x_in),
            " (use bitmap_mm)");

  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t t = x_in.size(0);
  at::Tensor y = at::empty({t, n}, x_in.options());
  if (t == 0) return y;
  // x rows must start on 8-byte boundaries for the kernel's cp.async: pad K to a
  // multiple of 4 with zero columns (their bitmap bits are 0; Kp is unchanged).
  at::Tensor x = x_in;
  int64_t k_run = k;
  if (k % 4 != 0) {
    k_run = (k + 3) / 4 * 4;
    x = at::constant_pad_nd(x_in, {0, k_run - k}, 0);
  }
  x = aligned_contiguous(x);
  const at::Tensor bm = aligned_contiguous(bitmap);
  const at::Tensor v = aligned_contiguous(values);
  const at::Tensor off = tile_offsets.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();

  owl::LaunchPlan plan;
  auto* plan_fn = gemv ? &owl::bitmap_gemv_plan : &owl::bitmap_plan;
  cudaError_t err = plan_fn((int)t, (int)n, (int)k_run, (int)split_k, max_tile_values,
                            x.device().index(), &plan, (int)config);
  OWL_CHECK(err == cudaSuccess, op, ": planning failed for x ", shape_str(x_in), ", weight [",
              n, ", ", k, "], config ", config, ": ", plan_error(err));
  Workspace ws = make_workspace(plan, x);
  owl::BitmapArgs a;
  a.x = x.data_ptr();
  a.bitmap = bm.data_ptr<int32_t>();
  a.values = v.data_ptr();
  a.tile_offsets = off.data_ptr<int32_t>();
  a.num_values = v.numel();
  a.max_tile_values = max_tile_values;
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.partials = ws.partials.defined() ? ws.partials.data_ptr<float>() : nullptr;
  a.counters = ws.counters.defined() ? ws.counters.data_ptr<int32_t>() : nullptr;
  a.T = (int)t;
  a.N = (int)n;
  a.K = (int)k_run;
  a.dtype = dt;
  err = (gemv ? owl::bitmap_gemv_run : owl::bitmap_run)(a, plan,
                                                       c10::cuda::getCurrentCUDAStream());
  OWL_CHECK(err == cudaSuccess, op, ": launch failed for x ", shape_str(x_in), ", weight [", n,
              ", ", k, "] (config ", plan.config, ", ", plan.splits, " splits, ", plan.smem_bytes,
              " B shared): ", cudaGetErrorString(err));
  return y;
}

at::Tensor bitmap_mm(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                     const at::Tensor& tile_offsets, int64_t n, int64_t k,
                     const c10::optional<at::Tensor>& bias, int64_t split_k,
                     int64_t max_tile_values, int64_t config) {
  return bitmap_op(x, bitmap, values, tile_offsets, n, k, bias, split_k, max_tile_values, config,
                   false);
}

at::Tensor bitmap_gemv(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                       const at::Tensor& tile_offsets, int64_t n, int64_t k,
                       const c10::optional<at::Tensor>& bias, int64_t split_k,
                       int64_t max_tile_values) {
  return bitmap_op(x, bitmap, values, tile_offsets, n, k, bias, split_k, max_tile_values, -1,
                   true);
}

std::vector<int64_t> plan_op(const std::string& kind, int64_t t, int64_t n, int64_t k,
                             int64_t split_k, int64_t max_tile_values, int64_t config) {
  int device = 0;
  OWL_CHECK(cudaGetDevice(&device) == cudaSuccess, "owl_sparse_C::plan: no CUDA device");
  owl::LaunchPlan p;
  cudaError_t err;
  if (kind == "sparse24") {
    err = owl::sparse24_plan((int)t, (int)n, (int)k, (int)split_k, device, &p, (int)config);
  } else if (kind == "bitmap" || kind == "bitmap_gemv") {
    err = (kind == "bitmap" ? owl::bitmap_plan : owl::bitmap_gemv_plan)(
        (int)t, (int)n, (int)((k + 3) / 4 * 4), (int)split_k, max_tile_values, device, &p,
        (int)config);
  } else {
    OWL_CHECK(false, "owl_sparse_C::plan: kind must be 'sparse24', 'bitmap' or 'bitmap_gemv', got '",
              kind.c_str(), "'");
  }
  OWL_CHECK(err == cudaSuccess, "owl_sparse_C::plan(", kind.c_str(), ", T=", t, ", N=", n, ", K=", k,
              "): ", plan_error(err));
  return {p.config, p.block_m, p.block_n, p.grid_m, p.grid_n, p.splits, p.smem_bytes};
}

// The wgmma.sp configuration's index on the current device, or -1 (not an sm_90a build,
// or not a compute capability 9.0 GPU).
int64_t sparse24_wgmma_config_op() {
  int device = 0;
  OWL_CHECK(cudaGetDevice(&device) == cudaSuccess,
            "owl_sparse_C::sparse24_wgmma_config: no CUDA device");
  return owl::sparse24_wgmma_config(device);
}

// The bitmap configuration on Hopper's warpgroup MMA for t tokens here, or -1.
int64_t bitmap_wgmma_config_op(int64_t t) {
  int device = 0;
  OWL_CHECK(cudaGetDevice(&device) == cudaSuccess,
            "owl_sparse_C::bitmap_wgmma_config: no CUDA device");
  return owl::bitmap_wgmma_config((int)t, device);
}

// Shape-only implementations for tracing (torch.compile, fake tensors).
at::Tensor sparse24_mm_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, int64_t n,
                            int64_t, const c10::optional<at::Tensor>&, int64_t, int64_t) {
  return at::empty({x.size(0), n}, x.options());
}

at::Tensor bitmap_mm_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, int64_t n, int64_t,
                          const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t) {
  return at::empty({x.size(0), n}, x.options());
}

at::Tensor bitmap_gemv_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t n, int64_t,
                            const c10::optional<at::Tensor>&, int64_t, int64_t) {
  return at::empty({x.size(0), n}, x.options());
}

}  // namespace

TORCH_LIBRARY(owl_sparse_C, m) {
  m.def(
      "sparse24_mm(Tensor x, Tensor values_mma, Tensor meta_mma, int n, int k, "
      "Tensor? bias=None, int split_k=0, int config=-1) -> Tensor");
  m.def(
      "bitmap_mm(Tensor x, Tensor bitmap, Tensor values, Tensor tile_offsets, int n, int k, "
      "Tensor? bias=None, int split_k=0, int max_tile_values=-1, int config=-1) -> Tensor");
  m.def(
      "bitmap_gemv(Tensor x, Tensor bitmap, Tensor values, Tensor tile_offsets, int n, int k, "
      "Tensor? bias=None, int split_k=0, int max_tile_values=-1) -> Tensor");
  m.def(
      "plan(str kind, int t, int n, int k, int split_k=0, int max_tile_values=-1, "
      "int config=-1) -> int[]",
      &plan_op);
  m.def("sparse24_wgmma_config() -> int", &sparse24_wgmma_config_op);
  m.def("bitmap_wgmma_config(int t) -> int", &bitmap_wgmma_config_op);
}

TORCH_LIBRARY_IMPL(owl_sparse_C, CUDA, m) {
  m.impl("sparse24_mm", &sparse24_mm);
  m.impl("bitmap_mm", &bitmap_mm);
  m.impl("bitmap_gemv", &bitmap_gemv);
}

TORCH_LIBRARY_IMPL(owl_sparse_C, Meta, m) {
  m.impl("sparse24_mm", &sparse24_mm_meta);
  m.impl("bitmap_mm", &bitmap_mm_meta);
  m.impl("bitmap_gemv", &bitmap_gemv_meta);
}

// Module init for the setup.py build (`import owl_sparse._C` runs the registrations
// above).  The JIT build loads the library with torch.ops.load_library instead.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
