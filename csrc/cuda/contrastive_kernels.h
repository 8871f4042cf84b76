// C interface of the CUDA contrastive-loss kernels (no torch header anywhere,
// so `nvcc -c contrastive_kernels.cu` checks them on a machine without torch
// CUDA or a GPU). binding.cpp is the torch glue around these launchers.
//
// Contract (mimac_kernels/dispatch.py), on (H, N, D) row-major inputs:
//   forward:  all   -> row_lse (H, 2N): log sum_{k != i} exp(S_ik) over Z = [a; b]
//             cross -> row_lse (H, N), col_lse (H, N) of S_ij = f(a_i, b_j); `shift`
//             (H,) float32 (cross only, may be null): min(B, max(B - MIMAC_SHIFT_HEADROOM,
//             MIMAC_SHIFT_LEVEL)) for an upper bound B of S per head, which lets 16-bit
//             inputs take both sides in one pass (rows whose sums leave its window are
//             re-swept exactly)
//   backward: gradients of sum(g_row * row_lse) + sum(g_col * col_lse) w.r.t.
//             a, b (float32, (H, N, D), every element written), and the centred
//             temperature sum  sum W_row (s - row_center_i) + W_col (s - col_center_k)
//             (*grad_inv_tau is ADDED to atomically: zero it first).
//   rect:     rows x (H, R, D) against columns y (H, C, D), row i leaving out column
//             i + offset when skip != 0: lse (H, R); backward given lse, g, center (H, R):
//             grad_x (H, R, D), grad_y (H, C, D) and the centred temperature sum
//             sum_ik W_ik (s_ik - center_i) (*grad_inv_tau ADDED to, as above).
// S = inv_tau * s with s = x.y (dot, cosine on unit rows) or log(max(x.y, eps)).
// inv_tau is a device pointer to one float. All launches go to `stream`.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum MimacDtype { MIMAC_F32 = 0, MIMAC_F16 = 1, MIMAC_BF16 = 2 };
enum MimacCritic { MIMAC_DOT = 0, MIMAC_COSINE = 1, MIMAC_LOG_DOT = 2 };
// The one-pass shift's rule (mimac_lse_forward's `shift`): no term passes e^64, and a row
// far below a large bound keeps its one-pass sum (the Triton kernels' SHIFT_HEADROOM and
// SHIFT_LEVEL).
#define MIMAC_SHIFT_HEADROOM 64.0
#define MIMAC_SHIFT_LEVEL 32.0

cudaError_t mimac_lse_forward(int dtype, const void* a, const void* b, const float* inv_tau,
                              int64_t heads, int64_t n, int64_t d, int critic, int all, float eps,
                              float* row_lse, float* col_lse, const float* shift,
                              cudaStream_t stream);

cudaError_t mimac_lse_backward(int dtype, const void* a, const void* b, const float* inv_tau,
                               int64_t heads, int64_t n, int64_t d, int critic, int all, float eps,
                               const float* row_lse, const float* col_lse, const float* g_row,
                               const float* g_col, const float* row_center,
                               const float* col_center, float* grad_a, float* grad_b,
                               float* grad_inv_tau, cudaStream_t stream);

cudaError_t mimac_rect_forward(int dtype, const void* x, const void* y, const float* inv_tau,
                               int64_t heads, int64_t r, int64_t c, int64_t d, int critic, int skip,
                               int64_t offset, float eps, float* lse, cudaStream_t stream);

cudaError_t mimac_rect_backward(int dtype, const void* x, const void* y, const float* inv_tau,
                                int64_t heads, int64_t r, int64_t c, int64_t d, int critic,
                                int skip, int64_t offset, float eps, const float* lse,
                                const float* g, const float* center, float* grad_x, float* grad_y,
                                float* grad_inv_tau, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
