// Torch glue for the CUDA launchers of contrastive_kernels.h: checks, device
// guard, current stream, output allocation, and their registration as torch
// operators (end of file). Contract: mimac_kernels/contract.py.

#include <ATen/ATen.h>
#include <torch/library.h>

// c10's stream header, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS and
// cuSPARSE headers, which a CUDA install need not have and these kernels do not use.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <mutex>
#include <optional>
#include <tuple>

#include "contrastive_kernels.h"

namespace {

int dtype_id(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MIMAC_F32;
    case at::kHalf: return MIMAC_F16;
    case at::kBFloat16: return MIMAC_BF16;
    default: TORCH_CHECK(false, "the cuda backend takes float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

#ifdef MIMAC_CUDA_EMULATION
// csrc/emulation runs these kernels on the CPU (tests): the tensors are host tensors.
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* kKernelDevice = "CPU tensors (the CUDA emulation)";
// The emulation keeps the running launch in globals (csrc/emulation/runtime.cpp), and torch's
// Python binding of an operator releases the GIL around the call: one call at a time.
std::mutex& emulation_mutex() {
  static std::mutex m;
  return m;
}
#define MIMAC_ONE_CALL_AT_A_TIME const std::lock_guard<std::mutex> one_call(emulation_mutex())
#else
#define MIMAC_ONE_CALL_AT_A_TIME static_cast<void>(0)
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* kKernelDevice = "CUDA tensors";
#endif

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_tau, int64_t critic) {
  TORCH_CHECK(on_kernel_device(a) && on_kernel_device(b) && on_kernel_device(inv_tau),
              "the cuda backend takes ", kKernelDevice, ", got a on ", a.device(), ", b on ", b.device(),
              ", inv_tau on ", inv_tau.device());
  TORCH_CHECK(a.device() == b.device() && a.device() == inv_tau.device(),
              "a, b and inv_tau must be on one device");
  TORCH_CHECK(a.dim() == 3 && a.sizes() == b.sizes(), "a and b must be (H, N, D) of one shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must have one dtype");
  TORCH_CHECK(inv_tau.numel() == 1, "inv_tau must be a 0-dim tensor");
  TORCH_CHECK(critic >= 0 && critic <= 2, "unknown critic id ", critic);
  TORCH_CHECK(a.size(0) <= 65535, "at most 65535 heads");
}

void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "mimac_kernels cuda ", what, " failed: ", cudaGetErrorString(e));
}

// A per-row statistic as dense float32; on another device the kernels would read host memory.
at::Tensor stat(const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "the statistics must be on ", like.device(), ", got ", t.device());
  return t.to(at::kFloat).contiguous();
}

// Two gradients and the temperature sum: the backward ops' `(Tensor, Tensor, Tensor)`.
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// cross's fixed shift per head (H,) float32 for the one-pass forward of 16-bit inputs:
// min(B, max(B - headroom, level)) below B = inv_tau max|a_i| max|b_j| (log_dot: inv_tau
// log(max(that, eps))), the Cauchy-Schwarz bound of S (contrastive_kernels.h). A NaN row
// counts as norm 0: its own sums carry the NaN to the exact re-sweep.
at::Tensor cross_shift(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_tau, int64_t critic,
                       double eps) {
  const auto max_norm = [](const at::Tensor& t) {
    const auto n = at::linalg_vector_norm(t, 2, at::IntArrayRef{-1}, false, at::kFloat);
    return at::nan_to_num(n, 0.0, std::numeric_limits<double>::infinity()).amax(-1);
  };
  auto bound = max_norm(a) * max_norm(b);
  if (critic == MIMAC_LOG_DOT) bound = bound.clamp_min(eps).log();
  bound = bound * inv_tau;
  return at::minimum(bound, (bound - MIMAC_SHIFT_HEADROOM).clamp_min(MIMAC_SHIFT_LEVEL)).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& a_in, const at::Tensor& b_in,
                                           const at::Tensor& inv_tau, int64_t critic, bool all, double eps) {
  MIMAC_ONE_CALL_AT_A_TIME;
  check_inputs(a_in, b_in, inv_tau, critic);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const auto it = stat(inv_tau, a);
  const int64_t h = a.size(0), n = a.size(1), d = a.size(2);
  const auto opts = a.options().dtype(at::kFloat);
  auto row = at::empty({h, all ? 2 * n : n}, opts);
  auto col = at::empty({h, all ? 0 : n}, opts);
  // the one-pass forward's shift: cross with 16-bit inputs (the launcher decides whether
  // its fast path applies; float32 always takes two passes)
  const bool one_pass = !all && a.scalar_type() != at::kFloat;
  const auto shift = one_pass ? cross_shift(a, b, it, critic, eps) : at::Tensor();
  check_launch(mimac_lse_forward(dtype_id(a.scalar_type()), a.data_ptr(), b.data_ptr(), it.data_ptr<float>(),
                                 h, n, d, static_cast<int>(critic), all ? 1 : 0, static_cast<float>(eps),
                                 row.data_ptr<float>(), all ? nullptr : col.data_ptr<float>(),
                                 one_pass ? shift.data_ptr<float>() : nullptr,
                                 c10::cuda::getCurrentCUDAStream()),
               "forward");
  return {row, col};
}

Grads3 backward(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& inv_tau,
                int64_t critic, bool all, double eps, const at::Tensor& row_lse,
                                 const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col,
                                 const at::Tensor& row_center, const at::Tensor& col_center) {
  MIMAC_ONE_CALL_AT_A_TIME;
  check_inputs(a_in, b_in, inv_tau, critic);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const auto it = stat(inv_tau, a);
  const int64_t h = a.size(0), n = a.size(1), d = a.size(2);
  const int64_t rows = all ? 2 * n : n;
  const auto lr = stat(row_lse, a), gr = stat(g_row, a), cr = stat(row_center, a);
  TORCH_CHECK(lr.numel() == h * rows && gr.numel() == h * rows && cr.numel() == h * rows,
              "row_lse/g_row/row_center must be (H, ", rows, ")");
  at::Tensor lc, gc, cc;
  if (!all) {
    lc = stat(col_lse, a);
    gc = stat(g_col, a);
    cc = stat(col_center, a);
    TORCH_CHECK(lc.numel() == h * n && gc.numel() == h * n && cc.numel() == h * n,
                "col_lse/g_col/col_center must be (H, N)");
  }
  const auto opts = a.options().dtype(at::kFloat);
  auto ga = at::empty({h, n, d}, opts);  // every element is written by the kernels
  auto gb = at::empty({h, n, d}, opts);
  auto gt = at::zeros({}, opts);  // accumulated with atomicAdd
  check_launch(mimac_lse_backward(dtype_id(a.scalar_type()), a.data_ptr(), b.data_ptr(), it.data_ptr<float>(),
                                  h, n, d, static_cast<int>(critic), all ? 1 : 0, static_cast<float>(eps),
                                  lr.data_ptr<float>(), all ? nullptr : lc.data_ptr<float>(),
                                  gr.data_ptr<float>(), all ? nullptr : gc.data_ptr<float>(),
                                  cr.data_ptr<float>(), all ? nullptr : cc.data_ptr<float>(),
                                  ga.data_ptr<float>(), gb.data_ptr<float>(), gt.data_ptr<float>(),
                                  c10::cuda::getCurrentCUDAStream()),
               "backward");
  return {ga, gb, gt};
}

// The rectangular problem: rows x (H, R, D) against columns y (H, C, D), row i leaving
// out column i + offset when an offset is given.
void check_rect(const at::Tensor& x, const at::Tensor& y, const at::Tensor& inv_tau, int64_t critic) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(0) == y.size(0) && x.size(2) == y.size(2),
              "x and y must be (H, R, D) and (H, C, D), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) > 0 && y.size(1) > 0 && x.size(2) > 0, "x and y must not be empty");
  check_inputs(x, x, inv_tau, critic);
  check_inputs(y, y, inv_tau, critic);
  TORCH_CHECK(x.device() == y.device() && x.scalar_type() == y.scalar_type(),
              "x and y must share a device and a dtype");
}

// The schema is the CPU extension's; these kernels have no label mask (the cuda backend
// refuses a labelled problem before any call: contract.LABEL_MASK_REFUSAL).
void refuse_labels(const std::optional<at::Tensor>& rl, const std::optional<at::Tensor>& cl) {
  TORCH_CHECK(!rl && !cl, "the cuda kernels have no label mask: row_labels and col_labels "
              "must be None");
}

at::Tensor rect_forward(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& inv_tau,
                        int64_t critic, std::optional<int64_t> offset, double eps,
                        const std::optional<at::Tensor>& row_labels,
                        const std::optional<at::Tensor>& col_labels) {
  MIMAC_ONE_CALL_AT_A_TIME;
  refuse_labels(row_labels, col_labels);
  check_rect(x_in, y_in, inv_tau, critic);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), y = y_in.contiguous();
  const auto it = stat(inv_tau, x);
  const int64_t h = x.size(0), r = x.size(1), c = y.size(1), d = x.size(2);
  auto lse = at::empty({h, r}, x.options().dtype(at::kFloat));
  check_launch(mimac_rect_forward(dtype_id(x.scalar_type()), x.data_ptr(), y.data_ptr(),
                                  it.data_ptr<float>(), h, r, c, d, static_cast<int>(critic),
                                  offset ? 1 : 0, offset.value_or(0), static_cast<float>(eps),
                                  lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "rect forward");
  return lse;
}

Grads3 rect_backward(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& inv_tau,
                     int64_t critic, std::optional<int64_t> offset, double eps, const at::Tensor& lse,
                     const at::Tensor& g, const at::Tensor& center, bool columns_grad,
                     const std::optional<at::Tensor>& row_labels,
                     const std::optional<at::Tensor>& col_labels) {
  MIMAC_ONE_CALL_AT_A_TIME;
  refuse_labels(row_labels, col_labels);
  check_rect(x_in, y_in, inv_tau, critic);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), y = y_in.contiguous();
  const auto it = stat(inv_tau, x);
  const int64_t h = x.size(0), r = x.size(1), c = y.size(1), d = x.size(2);
  const auto l = stat(lse, x), gg = stat(g, x), cc = stat(center, x);
  TORCH_CHECK(l.numel() == h * r && gg.numel() == h * r && cc.numel() == h * r,
              "lse/g/center must be (H, ", r, ")");
  const auto opts = x.options().dtype(at::kFloat);
  auto gx = at::empty({h, r, d}, opts);  // every element is written by the kernels
  // Without the columns' gradient (a detached queue) its pass is not launched: zeros.
  auto gy = columns_grad ? at::empty({h, c, d}, opts) : at::zeros({h, c, d}, opts);
  auto gt = at::zeros({}, opts);  // accumulated with atomicAdd
  check_launch(mimac_rect_backward(dtype_id(x.scalar_type()), x.data_ptr(), y.data_ptr(),
                                   it.data_ptr<float>(), h, r, c, d, static_cast<int>(critic),
                                   offset ? 1 : 0, offset.value_or(0), static_cast<float>(eps),
                                   l.data_ptr<float>(), gg.data_ptr<float>(), cc.data_ptr<float>(),
                                   gx.data_ptr<float>(),
                                   columns_grad ? gy.data_ptr<float>() : nullptr,
                                   gt.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream()),
               "rect backward");
  return {gx, gy, gt};
}

// The dispatcher's view. The GPU build registers torch.ops.mimac_cuda for the CUDA key; the
// CPU emulation (csrc/emulation) runs these same functions on host tensors, so it registers
// them for the CPU key, under its own namespace, torch.ops.mimac_cuda_emu: a process may load
// both builds (a GPU machine running the emulated tests), and a namespace is defined once.
// Fake implementations: mimac_kernels/extension_fakes.py.
#ifdef MIMAC_CUDA_EMULATION
#define MIMAC_CUDA_OPS mimac_cuda_emu
#define MIMAC_CUDA_KEY CPU
#else
#define MIMAC_CUDA_OPS mimac_cuda
#define MIMAC_CUDA_KEY CUDA
#endif
// TORCH_LIBRARY pastes its namespace argument (##), which would not expand a macro: expand first.
#define MIMAC_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

MIMAC_TORCH_LIBRARY(MIMAC_CUDA_OPS, m) {
  m.def("forward(Tensor a, Tensor b, Tensor inv_tau, int critic, bool all_pairs, float eps) "
        "-> (Tensor row_lse, Tensor col_lse)");
  m.def("backward(Tensor a, Tensor b, Tensor inv_tau, int critic, bool all_pairs, float eps, "
        "Tensor row_lse, Tensor col_lse, Tensor g_row, Tensor g_col, Tensor row_center, "
        "Tensor col_center) -> (Tensor grad_a, Tensor grad_b, Tensor grad_tau)");
  m.def("rect_forward(Tensor x, Tensor y, Tensor inv_tau, int critic, int? offset, float eps, "
        "Tensor? row_labels=None, Tensor? col_labels=None) -> Tensor");
  m.def("rect_backward(Tensor x, Tensor y, Tensor inv_tau, int critic, int? offset, float eps, "
        "Tensor lse, Tensor g, Tensor center, bool columns_grad=True, Tensor? row_labels=None, "
        "Tensor? col_labels=None) -> (Tensor grad_x, Tensor grad_y, Tensor grad_tau)");
}

TORCH_LIBRARY_IMPL(MIMAC_CUDA_OPS, MIMAC_CUDA_KEY, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
  m.impl("rect_forward", &rect_forward);
  m.impl("rect_backward", &rect_backward);
}

// Not differentiable themselves: mimac_kernels/ops.py pairs forward and backward under
// autograd. A fallthrough makes their outputs plain tensors, instead of the autograd
// fallback's graph node that only warns once a backward reaches it.
TORCH_LIBRARY_IMPL(MIMAC_CUDA_OPS, Autograd, m) {
  for (const char* op : {"forward", "backward", "rect_forward", "rect_backward"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}
