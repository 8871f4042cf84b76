// Small kernels with known defects (and their correct twins) that show the
// emulation catches what it claims to; compiled into kernels.cpp (the one
// translation unit that owns the emulated shared memory), called by selftest.cpp.
#pragma once
#include <cuda_pipeline_primitives.h>

#include "selftest.h"

namespace {

using namespace nvcuda;
using Args = MimacEmuArgs;

// Variants 0, 1: out[t] = in[(t + 1) % n] through shared memory; 1 drops the barrier.
// Variants 2, 3: out[t] = in[t + 1] (0 for the last), then every thread overwrites
// its own slot; 2 has no barrier between the read and the write, so thread t may
// overwrite its slot before thread t - 1 read it (a write-after-read race): right
// when the threads run in order, wrong reversed. 3 has the barrier.
// Variants 4, 5: out[t] = in[(t + 32) % n], another warp's value; 4 syncs only its
// own warp before reading (right whenever warps advance in step, wrong when one
// warp runs ahead), 5 syncs the block.
// Variant 6: five __syncthreads_and in a row, the predicate false for thread 5 in
// round 1 and for the last thread in round 2 (each round's vote its own, also for the
// rounds after them): out[t] = the results as bits, 1 + 8 + 16 = 25.
__global__ void neighbour_kernel(Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x, n = blockDim.x;
  if (a.variant == 6) {
    int bits = 0;
    for (int round = 0; round < 5; ++round) {
      const bool no = (round == 1 && t == 5) || (round == 2 && t == n - 1);
      bits |= __syncthreads_and(no ? 0 : 1) << round;
    }
    a.out[t] = static_cast<float>(bits);
    return;
  }
  s[t] = a.in[t];
  if (a.variant >= 4) {
    if (a.variant == 4) __syncwarp();
    if (a.variant == 5) __syncthreads();
    a.out[t] = s[(t + 32) % n];
    return;
  }
  if (a.variant != 1) __syncthreads();
  if (a.variant < 2) {
    a.out[t] = s[(t + 1) % n];
    return;
  }
  const float next = t + 1 < n ? s[t + 1] : 0.0f;
  if (a.variant == 3) __syncthreads();
  s[t] = -1.0f;
  a.out[t] = next;
}

// Variant 0: fine; 1: only half the block reaches the barrier; 2: a write one
// float past the dynamic shared memory; 3: a partial-mask shuffle; 4: a 16-byte
// vector load (__ldg of uint4) one float past an aligned address; 5: its aligned twin
// (every thread t < 4 adds in[4 * (t / 4) .. + 3], summed as uint4 lanes of floats).
__global__ void defect_kernel(Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  if (a.variant != 1 || t < 64) __syncthreads();
  if (a.variant == 2 && t == 0) s[blockDim.x] = 1.0f;
  if (a.variant >= 4) {
    const float* src = a.in + 4 * (t / 4) + (a.variant == 4 ? 1 : 0);
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(src));
    a.out[t] = __uint_as_float(q.x) + __uint_as_float(q.y) + __uint_as_float(q.z) + __uint_as_float(q.w);
    return;
  }
  float v = a.in[t];
  v += __shfl_xor_sync(a.variant == 3 ? 0xffffu : 0xffffffffu, v, 1);
  a.out[t] = v;
}

// One warp: C = A B (16x16x16) from row-major A and B in shared memory.
// Variant 0: half inputs; 1: tf32 (16x16x8, K = 16 in two steps); 2: A at a
// misaligned address; 3: every lane passes its own A pointer; 4: ldm not a
// multiple of 16 bytes.
__global__ void wmma_kernel(Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x;
  float* c = reinterpret_cast<float*>(smem);  // 16 x 16
  if (a.variant == 1) {
    float* fa = c + 256;
    float* fb = fa + 256;
    for (int i = lane; i < 256; i += 32) {
      fa[i] = a.in[i];
      fb[i] = a.in[256 + i];
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> A;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> B;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> C;
    wmma::fill_fragment(C, 0.0f);
    for (int k = 0; k < 16; k += 8) {
      wmma::load_matrix_sync(A, fa + k, 16);
      wmma::load_matrix_sync(B, fb + k * 16, 16);
      wmma::mma_sync(C, A, B, C);
    }
    wmma::store_matrix_sync(c, C, 16, wmma::mem_row_major);
  } else {
    __half* ha = reinterpret_cast<__half*>(c + 256);
    __half* hb = ha + 512;
    for (int i = lane; i < 256; i += 32) {
      ha[i] = __float2half(a.in[i]);
      hb[i] = __float2half(a.in[256 + i]);
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> A;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> B;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> C;
    wmma::fill_fragment(C, 0.0f);
    const __half* pa = a.variant == 2 ? ha + 8 : a.variant == 3 ? ha + 256 * (lane & 1) : ha;
    wmma::load_matrix_sync(A, pa, a.variant == 4 ? 12 : 16);
    wmma::load_matrix_sync(B, hb, 16);
    wmma::mma_sync(C, A, B, C);
    wmma::store_matrix_sync(c, C, 16, wmma::mem_row_major);
  }
  __syncwarp();
  for (int i = lane; i < 256; i += 32) a.out[i] = c[i];
}

// cp.async: thread t copies in[4t .. 4t + 3] (16 bytes) into shared memory, then every
// thread reads its right neighbour's four floats: out = in rolled by -4.
// Variant 0: commit, wait, barrier, read (right). 1: the read before the wait (the
// destinations still read as NaN). 2: two groups, the first half of each copy in
// the older one; __pipeline_wait_prior(1) completes only that (the second halves read
// NaN), the last wait comes after the reads. 3: a shared destination 4 bytes past a
// 16-byte boundary. 4: the thread exits without a wait. 5: a plain store into the
// destination while the copy is in flight.
__global__ void async_kernel(Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x, n = 4 * blockDim.x;
  float* dst = s + 4 * t + (a.variant == 3 ? 1 : 0);
  if (a.variant == 2) {
    __pipeline_memcpy_async(dst, a.in + 4 * t, 8);
    __pipeline_commit();
    __pipeline_memcpy_async(dst + 2, a.in + 4 * t + 2, 8);
    __pipeline_commit();
    __pipeline_wait_prior(1);
  } else {
    __pipeline_memcpy_async(dst, a.in + 4 * t, 16);
    __pipeline_commit();
    if (a.variant == 5) s[4 * t] = 0.0f;
    if (a.variant == 4) return;
    if (a.variant != 1) __pipeline_wait_prior(0);
  }
  __syncthreads();
  for (int k = 0; k < 4; ++k) a.out[4 * t + k] = s[(4 * t + 4 + k) % n];
  __syncthreads();  // every read done before any copy still in flight completes
  __pipeline_wait_prior(0);
}

// One warp: C (16 x 16) = A B from row-major bf16 A and B ([k][n]) in shared memory, by
// ldmatrix.x4 (A), ldmatrix.x4.trans (B: two 8-column blocks per call) and two
// mma.sync m16n8k16, C written from the accumulator layout. Variant 0: right. 1: lane
// 3's A row address 8 bytes off (not 16-byte aligned). 2: lane 0's B row address in
// global memory. 3: lane 5 swaps its A registers a[0] and a[1] (a wrong lane's
// fragment: rows 1 and 9 of C take each other's k = 2, 3 terms). 4: B loaded without
// .trans (the fragments of B^T). 5: lanes 16..31 skip the mma (a diverged warp; they
// wait at a warp barrier instead). 6: as 0 in fp16.
template <typename T>
T to16(float v);
template <>
__half to16<__half>(float v) {
  return __float2half(v);
}
template <>
__nv_bfloat16 to16<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

template <typename T>
__device__ void ldmatrix_test(const Args& a, unsigned char* smem) {
  const int lane = threadIdx.x;
  constexpr int kLd = 24;  // row stride: 48-byte rows keep every row 16-byte aligned
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + 16 * kLd;
  for (int i = lane; i < 256; i += 32) {
    sa[i / 16 * kLd + i % 16] = to16<T>(a.in[i]);
    sb[i / 16 * kLd + i % 16] = to16<T>(a.in[256 + i]);
  }
  __syncwarp();
  const int lr = lane & 15, lc = (lane >> 4) * 8;
  unsigned fa[4], fb[4];
  const T* pa = sa + lr * kLd + lc + (a.variant == 1 && lane == 3 ? 4 : 0);
  ldsm_x4<false>(fa, pa);
  const T* pb = a.variant == 2 && lane == 0 ? reinterpret_cast<const T*>(a.out) : sb + lr * kLd + lc;
  if (a.variant == 4) {
    ldsm_x4<false>(fb, pb);
  } else {
    ldsm_x4<true>(fb, pb);
  }
  if (a.variant == 3 && lane == 5) {
    const unsigned t0 = fa[0];
    fa[0] = fa[1];
    fa[1] = t0;
  }
  float c[2][4] = {};
  if (a.variant == 5 && lane >= 16) {
    __syncwarp();
  } else {
    for (int h = 0; h < 2; ++h) mma_16816<T>(c[h], fa, fb[2 * h], fb[2 * h + 1]);
  }
  const int g = lane >> 2, tc = 2 * (lane & 3);
  for (int h = 0; h < 2; ++h) {
    for (int e = 0; e < 4; ++e) a.out[(g + 8 * (e / 2)) * 16 + h * 8 + tc + e % 2] = c[h][e];
  }
}

__global__ void ldmatrix_kernel(Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  if (a.variant == 6) {
    ldmatrix_test<__half>(a, smem);
  } else {
    ldmatrix_test<__nv_bfloat16>(a, smem);
  }
}

}  // namespace

extern "C" cudaError_t mimac_emu_selftest_launch(int kernel, const MimacEmuArgs* args, int threads,
                                                 size_t smem_bytes, int smem_attribute) {
  void (*k)(Args) = kernel == 0   ? neighbour_kernel
                    : kernel == 1 ? defect_kernel
                    : kernel == 2 ? wmma_kernel
                    : kernel == 3 ? async_kernel
                                  : ldmatrix_kernel;
  // As contrastive_kernels.cu's launcher: return the error, and clear it so that it
  // does not fail the next launch (a real kernel's) through cudaGetLastError().
  if (smem_attribute > 0) {
    const cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_attribute);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return e;
    }
  }
  Args a = *args;
  void* argv[] = {&a};
  const cudaError_t e = cudaLaunchKernel(k, dim3(1), dim3(static_cast<unsigned>(threads)), argv, smem_bytes, nullptr);
  (void)cudaGetLastError();
  return e;
}
