// Fused CPU kernel of the sigmoid loss (SigLIP), float32, never storing the N x N scores.
//
// Contract: mimac_kernels/siglip_torch.py (the module docstring). l_ij = t x_i.y_j + b,
// z_ij = +1 where j == i + offset, else -1. Forward: per-row sums of
// softplus(-z l). Backward: w_ij = -g_i z / (1 + exp(z l)); dx_i = t sum_j w_ij y_j,
// dy_j = t sum_i w_ij x_i, dt = sum w s, db = sum w. dx runs over row blocks, dy over
// column blocks (the scores recomputed): every thread writes only its own rows, so the
// result does not depend on the thread count. Registered as torch ops
// (mimac_siglip::forward / backward) beside the contrastive kernel's module.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mimac_siglip {

constexpr int64_t kRows = 16;  // rows per block: their dot products reuse each column in L1
constexpr int64_t kCols = 64;  // columns per tile

// The two hot loops, compiled for AVX-512, AVX2 + FMA and the baseline and picked at
// load time (GCC's function multiversioning), so one cached build runs on any x86-64.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MIMAC_SIGLIP_CLONES \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define MIMAC_SIGLIP_CLONES
#endif

// s[i * kCols + j] = a_i . b_j for nr rows of a and nc rows of b (both of stride d); four
// columns at a time share each load of a_i.
MIMAC_SIGLIP_CLONES
void dots_tile(const float* a, const float* b, int64_t d, int64_t nr, int64_t nc, float* s) {
  for (int64_t i = 0; i < nr; ++i) {
    const float* ai = a + i * d;
    int64_t j = 0;
    for (; j + 4 <= nc; j += 4) {
      const float *b0 = b + j * d, *b1 = b0 + d, *b2 = b1 + d, *b3 = b2 + d;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < d; ++k) {
        s0 += ai[k] * b0[k];
        s1 += ai[k] * b1[k];
        s2 += ai[k] * b2[k];
        s3 += ai[k] * b3[k];
      }
      s[i * kCols + j] = s0;
      s[i * kCols + j + 1] = s1;
      s[i * kCols + j + 2] = s2;
      s[i * kCols + j + 3] = s3;
    }
    for (; j < nc; ++j) {
      const float* bj = b + j * d;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < d; ++k) acc += ai[k] * bj[k];
      s[i * kCols + j] = acc;
    }
  }
}

// out[k] += sum_j w[j] b_j[k] over nc rows of b (stride d).
MIMAC_SIGLIP_CLONES
void weighted_rows(const float* w, const float* b, int64_t d, int64_t nc, float* out) {
  for (int64_t j = 0; j < nc; ++j) {
    const float wj = w[j];
    const float* bj = b + j * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) out[k] += wj * bj[k];
  }
}

inline float softplus(float u) { return std::max(u, 0.0f) + std::log1p(std::exp(-std::fabs(u))); }

void check(const torch::Tensor& x, const torch::Tensor& y) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, "x and y must be (H, R, D) and (H, C, D)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat,
              "x and y must be float32");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2), "x and y: H and D must agree");
}

// Scores of rows [r0, r1) of head h against columns [c0, c1): s[(i - r0) * kCols + (j - c0)].
void scores(const float* x, const float* y, int64_t d, int64_t r0, int64_t r1, int64_t c0,
            int64_t c1, float* s) {
  dots_tile(x + r0 * d, y + c0 * d, d, r1 - r0, c1 - c0, s);
}

torch::Tensor forward(torch::Tensor x, torch::Tensor y, double scale, double bias,
                      int64_t offset) {
  check(x, y);
  const int64_t h = x.size(0), r = x.size(1), c = y.size(1), d = x.size(2);
  auto out = torch::empty({h, r}, x.options());
  const float t = static_cast<float>(scale), b = static_cast<float>(bias);
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (r + kRows - 1) / kRows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < h * blocks; ++task) {
    const int64_t hh = task / blocks, r0 = (task % blocks) * kRows, r1 = std::min(r, r0 + kRows);
    const float* xh = xp + hh * r * d;
    const float* yh = yp + hh * c * d;
    std::vector<float> s(kRows * kCols);
    double acc[kRows] = {0.0};
    for (int64_t c0 = 0; c0 < c; c0 += kCols) {
      const int64_t c1 = std::min(c, c0 + kCols);
      scores(xh, yh, d, r0, r1, c0, c1, s.data());
      for (int64_t i = r0; i < r1; ++i) {
        float part = 0.0f;
        for (int64_t j = c0; j < c1; ++j) {
          const float l = t * s[(i - r0) * kCols + (j - c0)] + b;
          part += softplus(j == i + offset ? -l : l);
        }
        acc[i - r0] += part;
      }
    }
    for (int64_t i = r0; i < r1; ++i) op[hh * r + i] = static_cast<float>(acc[i - r0]);
  }
  return out;
}

// w_ij of the backward: d softplus(-z l) / dl times the row's upstream weight.
inline float weight(float l, bool positive, float g) {
  return positive ? -g / (1.0f + std::exp(l)) : g / (1.0f + std::exp(-l));
}

std::vector<torch::Tensor> backward(torch::Tensor x, torch::Tensor y, double scale, double bias,
                                    torch::Tensor g, int64_t offset) {
  check(x, y);
  TORCH_CHECK(g.scalar_type() == torch::kFloat && g.is_contiguous(), "g must be float32");
  const int64_t h = x.size(0), r = x.size(1), c = y.size(1), d = x.size(2);
  const float t = static_cast<float>(scale), b = static_cast<float>(bias);
  auto dx = torch::zeros_like(x);
  auto dy = torch::zeros_like(y);
  // Per-row partials of dt and db, summed below in a fixed order.
  auto parts = torch::zeros({2, h, r}, torch::TensorOptions().dtype(torch::kDouble));
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* dyp = dy.data_ptr<float>();
  double* dtp = parts.data_ptr<double>();
  double* dbp = dtp + h * r;

  const int64_t row_blocks = (r + kRows - 1) / kRows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < h * row_blocks; ++task) {
    const int64_t hh = task / row_blocks, r0 = (task % row_blocks) * kRows;
    const int64_t r1 = std::min(r, r0 + kRows);
    const float* xh = xp + hh * r * d;
    const float* yh = yp + hh * c * d;
    std::vector<float> s(kRows * kCols);
    float w_row[kCols];
    for (int64_t c0 = 0; c0 < c; c0 += kCols) {
      const int64_t c1 = std::min(c, c0 + kCols);
      scores(xh, yh, d, r0, r1, c0, c1, s.data());
      for (int64_t i = r0; i < r1; ++i) {
        const float gi = gp[hh * r + i];
        float st = 0.0f, sb = 0.0f;
        for (int64_t j = c0; j < c1; ++j) {
          const float sij = s[(i - r0) * kCols + (j - c0)];
          const float w = weight(t * sij + b, j == i + offset, gi);
          w_row[j - c0] = w;
          st += w * sij;
          sb += w;
        }
        weighted_rows(w_row, yh + c0 * d, d, c1 - c0, dxp + (hh * r + i) * d);
        dtp[hh * r + i] += st;
        dbp[hh * r + i] += sb;
      }
    }
  }

  const int64_t col_blocks = (c + kRows - 1) / kRows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < h * col_blocks; ++task) {
    const int64_t hh = task / col_blocks, c0 = (task % col_blocks) * kRows;
    const int64_t c1 = std::min(c, c0 + kRows);
    const float* xh = xp + hh * r * d;
    const float* yh = yp + hh * c * d;
    std::vector<float> s(kRows * kCols);  // s[(j - c0) * kCols + (i - i0)]: columns as rows
    float w_row[kCols];
    for (int64_t i0 = 0; i0 < r; i0 += kCols) {
      const int64_t i1 = std::min(r, i0 + kCols);
      scores(yh, xh, d, c0, c1, i0, i1, s.data());
      for (int64_t j = c0; j < c1; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          const float sij = s[(j - c0) * kCols + (i - i0)];
          w_row[i - i0] = weight(t * sij + b, j == i + offset, gp[hh * r + i]);
        }
        weighted_rows(w_row, xh + i0 * d, d, i1 - i0, dyp + (hh * c + j) * d);
      }
    }
  }
  dx.mul_(t);
  dy.mul_(t);
  auto sums = parts.sum({1, 2}).to(torch::kFloat);
  return {dx, dy, sums[0], sums[1]};
}

}  // namespace mimac_siglip

TORCH_LIBRARY(mimac_siglip, m) {
  m.def("forward(Tensor x, Tensor y, float scale, float bias, int offset) -> Tensor");
  m.def("backward(Tensor x, Tensor y, float scale, float bias, Tensor g, int offset) -> Tensor[]");
  m.impl("forward", torch::kCPU, &mimac_siglip::forward);
  m.impl("backward", torch::kCPU, &mimac_siglip::backward);
}
