// A CPU emulation of the CUDA subset the kernels in csrc/cuda use, so that CI
// (no GPU) runs those kernels' own source: indexing, masking, shared-memory
// staging, barriers, warp shuffles, the launch configuration and the launchers'
// pass logic, against the float64 reference.
//
// How: every CUDA thread of a block is a fiber (ucontext) on one OS thread;
// __syncthreads() and warp-collective calls yield until every thread of the
// block (warp) has arrived, so a run is deterministic. Blocks run one after
// another. WMMA fragments hold the whole 16x16 (or 16x8) tile in every lane:
// load/mma/store have the API's matrix semantics, with TF32 inputs truncated
// to 10 mantissa bits as the tensor cores do, and their preconditions checked
// (32-byte aligned pointers, ldm a multiple of 16 bytes, arguments uniform
// across the warp). ldmatrix and mma.sync m16n8k16, by contrast, keep each lane's
// own registers in the PTX ISA's documented fragment layout (mimac_emu::ldmatrix_x4,
// mma_16816): a lane's wrong address or register shows in the result.
//
// What it checks beyond values: barrier divergence (a thread exits or waits at
// another barrier while the block waits), dynamic shared memory over 48 KiB
// without cudaFuncSetAttribute or over sm_80's 163 KiB, writes past the
// dynamic shared memory the launch asked for, launch bounds, misaligned 16-byte
// vector loads (__ldg of uint4); ldmatrix row addresses not 16-byte aligned or
// outside the dynamic shared memory, and a warp whose lanes are not all at the same
// ldmatrix / mma.sync; ex2.approx.ftz as mimac_emu::ex2_approx_ftz; cp.async (__pipeline_memcpy_async and its commit
// and wait groups): a read of a destination before its wait (NaN bytes), a write to
// it in flight, misaligned addresses, a thread exiting with copies in flight.
//
// Races between two barriers: a fiber runs from one barrier to the next without
// a switch, so a race gives the right answer under one thread order and a
// wrong one under another. set_schedule() picks the order: threads in
// lockstep sweeps (in order, reversed, shuffled), or one warp at a time to its
// next block barrier (warps in order or reversed); blocks in order or reversed
// alike. A kernel without races gives the same bits under every schedule,
// which is what the tests compare.
//
// What it cannot see: timing, bank conflicts, register pressure, and races
// that only a finer interleaving than whole barrier-to-barrier runs exposes.
// Only dynamic shared memory (`extern __shared__ T name[]`) is emulated, and
// kernels take one by-value argument. Used through csrc/emulation/kernels.cpp.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

// --- runtime types ------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace mimac_emu {

constexpr size_t kDefaultSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kSm80Smem = 166912;         // sm_80 opt-in maximum per block (163 KiB): the default
constexpr size_t kMaxSmem = 232448;          // sm_90's (227 KiB), the most set_smem_optin allows
constexpr int kWarp = 32;

struct ThreadState {
  dim3 thread_idx;
  dim3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int lane;
  int warp;
};

// The running fiber's state (valid only inside a kernel).
const ThreadState& current();
// Block-wide and warp-wide barriers: yield until everyone has arrived.
void sync_block();
// __syncthreads_and: a block barrier that returns 1 when every thread's predicate was
// non-zero, else 0.
int sync_block_and(int predicate);
void sync_warp();
// Scratch slot of this lane in its warp (for shuffles and uniformity checks).
void* warp_slot(int lane);
// Abort the launch with a message (never returns to the caller).
[[noreturn]] void fail(const char* what);

// This lane's next collective call (load_matrix_sync, mma_sync) since its warp's
// last barrier. The first lane to reach a call records it in `key` (and its
// result in `value`); the other lanes compare with it: the arguments must be
// uniform across a warp, and an mma with identical operands reuses the result
// instead of recomputing the tile 32 times.
struct Record {
  std::vector<unsigned char> key, value;
};
Record& next_record(bool& first);

// cp.async (cuda_pipeline_primitives.h): this thread's copy of `size` bytes (4, 8
// or 16; the last `zfill` of them zeros) from global `src` to shared `dst`, both
// aligned to `size`. The destination reads as NaN bytes until async_wait completes
// the copy's group; a write to it before then, or a thread exiting with copies in
// flight, fails the launch. async_commit closes the thread's open copies into a
// group; async_wait(n) completes all but the newest n committed groups, in order.
void async_copy(void* dst, const void* src, size_t size, size_t zfill);
void async_commit();
void async_wait(size_t prior);

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA): a warp collective. Lane
// 8i + j passes the address of row j of matrix i (8 consecutive 16-bit values, the
// address 16-byte aligned and inside the launch's dynamic shared memory, else the
// launch fails naming the lane). With g = lane / 4 and t = lane % 4, r[i] receives
// matrix i's elements (g, 2t) and (g, 2t + 1), the first in the low half; .trans
// (trans = true) receives (2t, g) and (2t + 1, g).
void ldmatrix_x4(uint32_t r[4], const void* row, bool trans);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA): a warp
// collective, D = A B + C over the warp's fragments in the documented layout (g = lane
// / 4, t = lane % 4; two 16-bit values per register, the lower column or k in the low
// half): a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..), a[3] =
// A(g+8, 2t+8..); b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g); c, d: [0..1] =
// (g, 2t..2t+1), [2..3] = (g+8, 2t..2t+1). Every lane's own registers enter the
// product (a lane's wrong fragment shows in its rows and columns of D); products
// summed in k order with fmaf, as the WMMA model. d may alias c.
void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], bool bf16);

using Body = void (*)(void* kernel, void* arg);
cudaError_t launch(const void* kernel, Body body, void* arg, dim3 grid, dim3 block, size_t smem);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
cudaError_t last_error();
// The dynamic shared memory all blocks use (blocks run one at a time).
void register_dynamic_smem(unsigned char* base, size_t size);
// Order of the blocks of a launch and of the threads of a block between two
// barriers. kInOrder, kReversed, kShuffled (a fresh permutation per sweep, from
// `seed`): every thread to its next barrier, block or warp, per sweep.
// kWarpsInOrder, kWarpsReversed: one warp at a time through its warp
// collectives to the next block barrier. Any of them is an order a GPU may run.
enum Schedule : int { kInOrder = 0, kReversed = 1, kShuffled = 2, kWarpsInOrder = 3, kWarpsReversed = 4 };
void set_schedule(Schedule schedule, uint64_t seed);
// The device's opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin):
// sm_80's 166,912 bytes unless set otherwise (sm_86/sm_89 have 101,376, sm_90 232,448), for
// every later launch.
void set_smem_optin(size_t bytes);
size_t smem_optin();
// Named event counts a kernel built for the emulation records (for instance which
// form of a computation a tile took), read and cleared by the tests.
void tally(const char* name);
int64_t tally_count(const char* name);
void clear_tallies();

}  // namespace mimac_emu

#define threadIdx (::mimac_emu::current().thread_idx)
#define blockIdx (::mimac_emu::current().block_idx)
#define blockDim (::mimac_emu::current().block_dim)
#define gridDim (::mimac_emu::current().grid_dim)

inline void __syncthreads() { ::mimac_emu::sync_block(); }
inline int __syncthreads_and(int predicate) { return ::mimac_emu::sync_block_and(predicate); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::mimac_emu::fail("__syncwarp: only the full mask is emulated");
  ::mimac_emu::sync_warp();
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu) ::mimac_emu::fail("__shfl_xor_sync: only the full mask is emulated");
  const int lane = ::mimac_emu::current().lane;
  std::memcpy(::mimac_emu::warp_slot(lane), &v, sizeof(T));
  ::mimac_emu::sync_warp();
  T out;
  std::memcpy(&out, ::mimac_emu::warp_slot((lane ^ lane_mask) & 31), sizeof(T));
  ::mimac_emu::sync_warp();  // nobody overwrites a slot before every lane has read
  return out;
}

// --- vector types and 16-byte loads -------------------------------------------------

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ld.global.nc.v4: a misaligned vector address faults on a GPU ("misaligned
// address"); here it fails the launch, naming the load.
inline uint4 __ldg(const uint4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    ::mimac_emu::fail("__ldg: 16-byte vector load from an address not 16-byte aligned");
  uint4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

namespace mimac_emu {
// ex2.approx.ftz.f32: 2^x with a subnormal input read as zero and a subnormal result
// flushed to zero (the hardware's approximation, within 2 ulp, is taken as exact).
inline float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}
}  // namespace mimac_emu

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Fibers run on one OS thread: a plain add is atomic here.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() { return ::mimac_emu::last_error(); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || device != 0) return cudaErrorInvalidValue;
  *value = static_cast<int>(::mimac_emu::smem_optin());
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e);
// Launches run to completion in issue order here: the stream's memset is a plain one.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::mimac_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

// cuda_runtime.h's typed overload, for kernels of one argument.
template <typename A>
cudaError_t cudaLaunchKernel(void (*kernel)(A), dim3 grid, dim3 block, void** args,
                             size_t smem = 0, cudaStream_t = nullptr) {
  struct Call {
    static void body(void* k, void* arg) {
      reinterpret_cast<void (*)(A)>(k)(*static_cast<typename std::remove_reference<A>::type*>(arg));
    }
  };
  return ::mimac_emu::launch(reinterpret_cast<const void*>(kernel), &Call::body, args[0], grid,
                             block, smem);
}

// --- half and bfloat16 (storage types; no implicit conversions, as torch builds) -----

namespace mimac_emu {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);  // round to nearest even
inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
}  // namespace mimac_emu

struct __half {
  uint16_t __x = 0;
};
typedef __half half;
struct __nv_bfloat16 {
  uint16_t __x = 0;
};

inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return ::mimac_emu::half_to_float(h.__x); }
inline __half __float2half(float f) { return __half{::mimac_emu::float_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return ::mimac_emu::bf16_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{::mimac_emu::float_to_bf16(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// --- WMMA -------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// cvt.rna.tf32.f32: round to nearest, ties away from zero; the low 13 bits cleared.
inline float __float_to_tf32(float v) {
  const uint32_t u = ::mimac_emu::float_bits(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return v;  // inf, NaN
  return ::mimac_emu::bits_float((u + 0x1000u) & 0xffffe000u);
}

namespace detail {
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};
template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// A fragment operand as float, as the tensor cores read it.
inline float operand(float v, std::true_type /*tf32*/) {
  return ::mimac_emu::bits_float(::mimac_emu::float_bits(v) & 0xffffe000u);  // truncated
}
inline float operand(float v, std::false_type) { return v; }
inline float operand(__half v, std::false_type) { return __half2float(v); }
inline float operand(__nv_bfloat16 v, std::false_type) { return __bfloat162float(v); }

// Alignment and stride as the hardware needs them; `uniform`: every lane of the
// warp passes the same pointer and stride (checked against the first lane's record).
void check_pointer(const char* what, const void* ptr, unsigned ldm, size_t elem_bytes, bool uniform);
void check_uniform_fragment(const char* what, const void* data, size_t bytes);
// d = a b + c through the warp's record: computed by the first lane, reused by the others.
bool reuse_mma(const void* parts[3], const size_t sizes[3], void* d, size_t d_bytes, bool& first,
               ::mimac_emu::Record*& rec);
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::storage<T>::type;
  using shape = detail::shape<Use, M, N, K>;
  static constexpr int rows = shape::rows, cols = shape::cols;
  static constexpr int num_elements = rows * cols;  // the whole tile in every lane
  static constexpr bool is_tf32 = std::is_same<T, precision::tf32>::value;
  element_type x[num_elements];
  // logical element (r, c) of the tile
  element_type& at(int r, int c) { return x[r * cols + c]; }
  const element_type& at(int r, int c) const { return x[r * cols + c]; }
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads are not emulated");
  static_assert(std::is_same<P, typename F::element_type>::value, "pointer type must match the fragment");
  detail::check_pointer("load_matrix_sync", p, ldm, sizeof(P), true);
  constexpr bool row = std::is_same<L, row_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.at(r, c) = row ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm,
                              layout_t layout) {
  using F = fragment<accumulator, M, N, K, T, void>;
  detail::check_pointer("store_matrix_sync", p, ldm, sizeof(T), false);
  detail::check_uniform_fragment("store_matrix_sync", f.x, sizeof(f.x));
  if (::mimac_emu::current().lane == 0) {
    for (int r = 0; r < F::rows; ++r)
      for (int c = 0; c < F::cols; ++c)
        p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.at(r, c);
  }
  ::mimac_emu::sync_warp();  // the store is complete for the warp when it returns
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, float, void>& c) {
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TB, LB>;
  const void* parts[3] = {a.x, b.x, c.x};
  const size_t sizes[3] = {sizeof(a.x), sizeof(b.x), sizeof(c.x)};
  bool first = false;
  ::mimac_emu::Record* rec = nullptr;
  if (detail::reuse_mma(parts, sizes, d.x, sizeof(d.x), first, rec)) return;
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        acc = fmaf(detail::operand(a.at(i, k), std::integral_constant<bool, FA::is_tf32>{}),
                   detail::operand(b.at(k, j), std::integral_constant<bool, FB::is_tf32>{}), acc);
      }
      out[i * N + j] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof(out));  // d may alias c
  if (first) rec->value.assign(reinterpret_cast<const unsigned char*>(out),
                               reinterpret_cast<const unsigned char*>(out) + sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
