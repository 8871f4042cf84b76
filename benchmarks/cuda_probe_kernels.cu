// Small CUDA kernels whose SASS counts are known by construction (never launched).
//
// benchmarks/test_cuda_cost.py compiles this file with nvcc for sm_90a and checks
// that the static model counts, per iteration of probe_loop's loop and per warp,
// exactly what the source says: K_EXP exp2 per thread, one bf16 WMMA m16n16k16
// (16 x 16 x 16 MACs) and one TF32 WMMA m16n16k8 (16 x 16 x 8 MACs, at the TF32 rate).

#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

constexpr int K_EXP = 3;

extern "C" __global__ void __launch_bounds__(32)
    probe_loop(const float* x, const __nv_bfloat16* a, const float* t, float* out, int n) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc_tf32;
  wmma::fill_fragment(acc, 0.0f);
  wmma::fill_fragment(acc_tf32, 0.0f);
  float s = 0.0f;
#pragma unroll 1
  for (int i = 0; i < n; ++i) {
    const float v = x[i * 32 + threadIdx.x];
#pragma unroll
    for (int j = 0; j < K_EXP; ++j) s += exp2f(v + static_cast<float>(j));  // distinct arguments
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, a + i * 512, 16);
    wmma::load_matrix_sync(fb, a + i * 512 + 256, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> ta;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> tb;
    wmma::load_matrix_sync(ta, t + i * 256, 8);
    wmma::load_matrix_sync(tb, t + i * 256 + 128, 8);
    wmma::mma_sync(acc_tf32, ta, tb, acc_tf32);
  }
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(out + 256, acc_tf32, 16, wmma::mem_row_major);
  out[512 + threadIdx.x] = s;
}
