// CUDA kernels of the fused contrastive loss (contract: contrastive_kernels.h).
//
// Design: one CTA owns BM = 64 rows and sweeps every column tile of BN = 64, so
// per-row state stays on chip and nothing of size M x M exists. On the fast path the
// fragment kernels (see "fragment kernels": the score tile in registers) run the
// forward of fp16 and bf16 and the backward of bf16 (at D = 512 the wide backward, the
// score tile once for all of D); the rest runs these two, 4 warps per CTA:
//   S tile  = X_I Y_K^T on tensor cores: bf16/fp16 inputs by mma.sync m16n8k16 on
//             ldmatrix fragments, a 2 x 2 grid of warps each owning 32 x 32 of the tile;
//             float32 inputs WMMA m16n16k8 TF32 with the 3xTF32 split
//             (a = a_hi + a_lo, a.b ~ a_hi.b_hi + a_hi.b_lo + a_lo.b_hi), whose
//             error (~2^-22 relative per product) stays at float32 level; plain
//             1xTF32 (2^-11) would be ~1000x worse than float32 PyTorch.
//             Operands are staged through shared memory in KC-wide D chunks.
//   staging   two variants of each kernel (kFast, picked by fast_path() at launch):
//             the fast path (D a multiple of one 16-byte vector, 16-byte aligned
//             operands, the CTA's X rows within kXResidentMax) keeps the CTA's X
//             rows resident (staged once in 16-byte vectors) and brings the Y
//             chunks by 16-byte cp.async, double-buffered across chunks and tiles;
//             the general path stages X and Y one element at a time per chunk.
//   forward   online log-sum-exp per row, two threads per row: scores and the
//             running max in natural-log units, exp2 of their difference times
//             log2(e) (folding log2(e) into 1/tau instead would put S and the
//             log-sum-exp in different units, so their roundings, ~1e23 apart at
//             |S| ~ 1e30, would reach the exponent), by ex2.approx.ftz (exp2_ftz).
//             "cross" takes both sides in one pass where its inputs take the fragment
//             kernels (lse_cross_frag_kernel: a fixed shift below the bound of S, the
//             column sums by atomics, out-of-window blocks re-swept); elsewhere a second
//             pass with the roles of a and b swapped gives the column log-sum-exp (all
//             three critics are symmetric: f(x, y) = f(y, x)).
//   backward  recomputes the S tile, forms u_ik = gx_i P^row_ik + gy_k P^col_ik
//             (both log-sum-exps are known by then), V = inv_tau * u (/ x.y for
//             log_dot) and accumulates dX_I += V Y_K in tensor-core fragments held
//             in registers for a DO = 128 slice of D (grid.y walks the slices):
//             bf16 on the fast path, V split as hi + lo (two bf16 products, ~16
//             significant bits of V; Y exact in bf16; mma.sync on ldmatrix fragments,
//             .trans for the row-major Y slab, 2 x 2 warps of 32 rows x DO / 2);
//             else TF32, V rounded to TF32
//             (11 significant bits, the float exponent range: no fp16 underflow of
//             tiny weights), Y from bf16/fp16 exact in TF32, float32 inputs 3xTF32.
//             16-bit inputs with statistics on both sides take one exponential per
//             element, u_ik = e^(S_ik - c) (g_i e^(c - lse_i) + g_k e^(c - lse_k)),
//             c the CTA's largest row lse, on the interior tiles (no masked pair)
//             whose rows and columns all lie within kExpWindow of c (a
//             __syncthreads_and vote per tile, no host read); masked tiles, the
//             others, float32 and one-sided passes take the exact form.
//             Each CTA writes its rows' gradient once (no atomics); the
//             temperature gradient is one atomicAdd per CTA.

#include "contrastive_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <type_traits>

namespace {

using namespace nvcuda;

constexpr int BM = 64;        // rows per CTA
constexpr int BN = 64;        // columns per tile
constexpr int KC = 64;        // D chunk of the S = X Y^T staging
constexpr int DO = 128;       // D slice of the backward output per CTA
constexpr int NT = 128;       // threads per CTA: 4 warps x 16 rows
constexpr int LDS = BN + 4;   // S / V tile stride (floats), a multiple of 4 for WMMA
constexpr int LDO = DO + 4;   // Y slab and output staging stride (floats)
constexpr int JPT = BN / 2;   // tile columns per thread (2 threads per row)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(NT == 2 * BM, "two threads per row");
static_assert(BM == 16 * (NT / 32), "each warp owns 16 rows");

// Everything a row pass needs; passed by value to the kernels.
struct Pass {
  const void* x0;  // X rows: global row i < x_split lives in x0, else in x1 (Z = [a; b])
  const void* x1;
  int64_t x_split;
  const void* y0;  // Y rows (columns of S), same scheme
  const void* y1;
  int64_t y_split;
  int64_t rows, cols, d;
  int64_t x_hs, y_hs;  // elements per head of the X and the Y tensors (N * D)
  int diag;        // mask global column == global row + diag_offset ("all": offset 0)
  int64_t diag_offset;
  const float* inv_tau;
  float eps;
  // forward output
  float* lse;
  int64_t lse_hs;
  // backward inputs: log-sum-exp, incoming gradient and temperature centre (the raw
  // positive score, see mimac_kernels/ops.py) of X rows; log-sum-exp and gradient of Y
  // rows (their temperature terms are the row side of the pass with the roles swapped)
  const float* lx;
  const float* gx;
  const float* cx;
  int64_t lx_hs;
  const float* ly;
  const float* gy;
  int64_t ly_hs;
  // backward outputs: row i < out_split goes to out0, else out1 (each (H, N, D))
  float* out0;
  float* out1;
  int64_t out_split;
  int64_t out_hs;  // elements per head of the outputs
  float* grad_tau;
  int tau_mode;    // 0: none, 1: the row side's terms gx P^row (s - cx), centred
  // cross's one-pass forward (fragment kernels): the fixed shift per head, an upper
  // bound's level (see lse_cross_frag_kernel); the column exp-sums (H, cols), added to.
  // In lse_forward_frag_kernel a shift means: `lse` holds such sums, finish them.
  const float* shift;
  float* col_sum;
};

// --- tensor-core steps for S = X Y^T ---------------------------------------------------

template <typename T>
struct Mma;

// 16-bit inputs: ldmatrix fragments and mma.sync m16n8k16 (below); KS the k-step, LD the
// staging stride (elements): 144-byte rows keep every ldmatrix row 16-byte aligned and
// the 8 rows of one matrix on distinct bank groups.
template <>
struct Mma<__half> {
  static constexpr int KS = 16;
  static constexpr int LD = KC + 8;
  __device__ static __half zero() { return __float2half(0.0f); }
  __device__ static float to_float(__half v) { return __half2float(v); }
};

template <>
struct Mma<__nv_bfloat16> {
  static constexpr int KS = 16;
  static constexpr int LD = KC + 8;
  __device__ static __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// --- mma.sync m16n8k16 on ldmatrix fragments (the PTX ISA's documented layouts) -------------
// With g = lane / 4 and t = lane % 4, two 16-bit values per register (lower column or k in
// the low half): A (16 x 16) a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..),
// a[3] = (g+8, 2t+8..); B (16 x 8) b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g); the
// float accumulator c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1). One ldmatrix.x4
// brings four 8 x 8 matrices, lane 8i + j giving row j of matrix i (16 bytes, 16-byte
// aligned); .trans hands each lane the transposed elements, which turns row-major [k][n]
// rows into B fragments (no MOVM, unlike WMMA's row-major B). The CPU emulation models
// both with these layouts (mimac_emu::ldmatrix_x4, mma_16816).

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: `row` is this lane's row address.
template <bool kTrans>
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* row) {
#if defined(MIMAC_CUDA_EMULATION)
  ::mimac_emu::ldmatrix_x4(r, row, kTrans);
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
#endif
}

// d += A B over one m16n8k16 step, bf16 or fp16 operands (T), float accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  static_assert(sizeof(T) == 2, "16-bit operands");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#if defined(MIMAC_CUDA_EMULATION)
  const unsigned b[2] = {b0, b1};
  ::mimac_emu::mma_16816(d, a, b, d, kBf16);
#else
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Stores a 2 x 2 warp grid's accumulators (warp (wr, wc) holds acc[mi][nj], rows wr * 32 +
// mi * 16 of the 64-row block, columns wc * kCols + nj * 8) row-major at `out` (stride
// ld floats), from the documented layout: two 8-byte stores per fragment.
template <int kCols>
__device__ __forceinline__ void store_acc(float* out, int ld, const float (&acc)[2][kCols / 8][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int g = lane >> 2, tc = 2 * (lane & 3);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int nj = 0; nj < kCols / 8; ++nj) {
      float* o = out + ((warp >> 1) * 32 + mi * 16 + g) * ld + (warp & 1) * kCols + nj * 8 + tc;
      *reinterpret_cast<float2*>(o) = make_float2(acc[mi][nj][0], acc[mi][nj][1]);
      *reinterpret_cast<float2*>(o + 8 * ld) = make_float2(acc[mi][nj][2], acc[mi][nj][3]);
    }
  }
}

// hi = tf32(v), lo = tf32(v - hi), element-wise over a fragment.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    const float h = wmma::__float_to_tf32(v);
    hi.x[i] = h;
    lo.x[i] = wmma::__float_to_tf32(v - h);
  }
}

template <typename Frag>
__device__ __forceinline__ void round_tf32(Frag& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

// TF32 m16n16k8 with an optional 3xTF32 split: row-major A from float memory
// (stride kLdA), B from float memory in layout LayoutB (stride kLdB).
template <int kLdA, int kLdB, typename LayoutB, bool kSplit>
struct Tf32 {
  using C = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB>;
  struct A {
    FA hi, lo;
  };
  __device__ static void load_a(A& a, const float* p, unsigned ld = kLdA) {
    wmma::load_matrix_sync(a.hi, p, ld);
    if (kSplit) {
      split_tf32(a.hi, a.lo);
    } else {
      round_tf32(a.hi);
    }
  }
  __device__ static void mma(C& c, const A& a, const float* b) {
    FB bh;
    wmma::load_matrix_sync(bh, b, kLdB);
    if (kSplit) {
      FB bl;
      split_tf32(bh, bl);
      wmma::mma_sync(c, a.lo, bh, c);  // small terms first
      wmma::mma_sync(c, a.hi, bl, c);
    }
    // Unsplit, B is the backward's Y slab converted from bf16/fp16 (8 or 11 significant
    // bits): already exact in TF32 (11), so no rounding of it (which cost more issue
    // slots than the MMAs themselves).
    wmma::mma_sync(c, a.hi, bh, c);
  }
};

// float32 inputs: S = X Y^T in 3xTF32 (B = Y chunk read column-major).
template <>
struct Mma<float> : Tf32<KC + 4, KC + 4, wmma::col_major, true> {
  static constexpr int KS = 8;
  static constexpr int LD = KC + 4;  // floats; 272-byte rows keep fragments 32-byte aligned
  __device__ static float zero() { return 0.0f; }
  __device__ static float to_float(float v) { return v; }
};

// dX += V Y (always TF32; V and the Y slab are float in shared memory). Unsplit only
// for 16-bit inputs, whose Y needs no TF32 rounding (see Tf32::mma).
template <bool kSplit>
using MmaVY = Tf32<LDS, LDO, wmma::row_major, kSplit>;
using C2 = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// --- shared-memory layout -----------------------------------------------------------------

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }
__host__ __device__ constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// Elements of T per 16-byte vector of the fast path's staging.
template <typename T>
__host__ __device__ constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

// The fast path keeps the CTA's BM rows of X resident: all of D, padded with zeros
// to whole KC chunks, staged once per CTA (X never changes across column tiles).
// Row stride x_ld elements: the KC chunk's own padding, so fragment rows (WMMA: 32-byte,
// ldmatrix: 16-byte) and 16-byte vectors stay aligned.
template <typename T>
__host__ __device__ constexpr int64_t x_cols(int64_t d) {
  return (d + KC - 1) / KC * KC;
}
template <typename T>
__host__ __device__ constexpr int64_t x_ld(int64_t d) {
  return x_cols<T>(d) + (Mma<T>::LD - KC);
}
template <typename T>
__host__ __device__ constexpr size_t x_bytes(int64_t d) {
  return align128(BM * x_ld<T>(d) * sizeof(T));
}
// Resident X up to this size (bf16/fp16 D <= 512, float32 D <= 256): beyond it the
// general path's per-chunk staging keeps two CTAs per SM.
constexpr size_t kXResidentMax = 68 * 1024;

template <typename T, bool kFast>
__host__ __device__ constexpr size_t x_region(int64_t d) {
  return kFast ? x_bytes<T>(d) : 0;
}
// The per-chunk staging: two Y chunk buffers (fast path: chunk q in buffer q % 2 while
// chunk q + 1 is in flight), or the X chunk and the Y chunk. Both BM x KC, stride LD.
template <typename T>
__host__ __device__ constexpr size_t chunk_elems() {
  return BM * Mma<T>::LD;
}
template <typename T>
__host__ __device__ constexpr size_t staging_bytes() {
  return align128(2 * chunk_elems<T>() * sizeof(T));
}
// The backward's gradient product dX += V Y: bf16 inputs on the fast path run it in
// bf16 with V split as hi + lo (two products, fp32 accumulation: ~16 significant bits
// of V, more than TF32's 11; Y is exact in bf16), from a bf16 Y slab and two bf16 V
// tiles; every other variant in TF32 from a float Y slab and the float V tile.
template <typename T, bool kFast>
__host__ __device__ constexpr bool bf16_vy() {
  return kFast && std::is_same<T, __nv_bfloat16>::value;
}
constexpr int LDY = DO + 8;  // bf16 Y slab stride (elements): 272-byte rows
constexpr int LDV = BN + 8;  // bf16 V tile stride (elements): 144-byte rows
__host__ __device__ constexpr size_t float_slab_bytes() { return align128(BM * LDO * sizeof(float)); }
__host__ __device__ constexpr size_t bf16_slab_bytes() { return align128(BM * LDY * 2); }
__host__ __device__ constexpr size_t v_tile_bytes() { return align128(BM * LDV * 2); }
// The slab region: [Y slab] (+ [V hi] [V lo] for the bf16 product); the output
// staging (BM x LDO floats) reuses it at the end.
template <typename T, bool kFast = false>
__host__ __device__ constexpr size_t slab_bytes() {
  return bf16_vy<T, kFast>() ? bf16_slab_bytes() + 2 * v_tile_bytes() : float_slab_bytes();
}
static_assert(bf16_slab_bytes() + 2 * v_tile_bytes() >= float_slab_bytes(), "output staging fits");
__host__ __device__ constexpr size_t tile_bytes() { return align128(BM * LDS * sizeof(float)); }

// [resident X (fast path)] [staging] [S tile]
template <typename T, bool kFast = false>
__host__ __device__ constexpr size_t fwd_smem(int64_t d = 0) {
  return x_region<T, kFast>(d) + staging_bytes<T>() + tile_bytes();
}
// [resident X (fast path)] [staging] [Y slab, output staging] [S/V tile] [column stats:
// lse, g, one-exponential factor]
// [reduction scratch]; the general path's staging and slab share one region (union),
// the fast path's are apart: the next tile's first Y chunk is in flight meanwhile.
template <typename T, bool kFast = false>
__host__ __device__ constexpr size_t bwd_union() {
  return kFast ? staging_bytes<T>() + slab_bytes<T, kFast>()
               : cmax(staging_bytes<T>(), slab_bytes<T, kFast>());
}
template <typename T, bool kFast>
__host__ __device__ constexpr size_t slab_offset() {
  return kFast ? staging_bytes<T>() : 0;
}
template <typename T, bool kFast = false>
__host__ __device__ constexpr size_t bwd_smem(int64_t d = 0) {
  return x_region<T, kFast>(d) + bwd_union<T, kFast>() + tile_bytes() + align128(3 * BN * sizeof(float)) +
         align128(8 * sizeof(double));
}

static_assert(Mma<__half>::LD * 2 % 16 == 0 && Mma<float>::LD * 4 % 16 == 0 && LDO * 4 % 16 == 0,
              "16-byte vectors need 16-byte aligned rows in shared memory");

// --- staging ------------------------------------------------------------------------------

// Rows of one (possibly two-part) operand of one head: global row gr < split lives in
// p0, else in p1 (Z = [a; b]); n rows in all.
template <typename T>
struct Rows {
  const T* p0;
  const T* p1;
  int64_t split, n;
};

template <typename T>
struct Ops {
  Rows<T> x, y;
};

template <typename T>
__device__ __forceinline__ Ops<T> head_operands(const Pass& p, int64_t h) {
  const T* x0 = static_cast<const T*>(p.x0) + h * p.x_hs;
  const T* x1 = p.x1 ? static_cast<const T*>(p.x1) + h * p.x_hs : x0;
  const T* y0 = static_cast<const T*>(p.y0) + h * p.y_hs;
  const T* y1 = p.y1 ? static_cast<const T*>(p.y1) + h * p.y_hs : y0;
  return {{x0, x1, p.x_split, p.rows}, {y0, y1, p.y_split, p.cols}};
}

// Row `gr` of an operand, or nullptr past the end.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const Rows<T>& o, int64_t gr, int64_t d) {
  if (gr >= o.n) return nullptr;
  return gr < o.split ? o.p0 + gr * d : o.p1 + (gr - o.split) * d;
}

// Start of row gr of an operand (gr < o.n): two selects rather than a branch.
template <typename T>
__device__ __forceinline__ const T* row_start(const Rows<T>& o, int64_t gr, int64_t d) {
  const bool first = gr < o.split;
  return (first ? o.p0 : o.p1) + (first ? gr : gr - o.split) * d;
}

// General path: dst[r][c] = row(row0 + r)[dc + c] for r < 64, c < kWidth, one element
// at a time (any D, any alignment); zero outside the operand.
// kToFloat: convert to float (the Y slab of the backward), else copy the raw
// element (torch builds with __CUDA_NO_HALF_CONVERSIONS__: no implicit casts).
template <bool kToFloat, typename T, int kWidth>
__device__ __forceinline__ void stage_rows(typename std::conditional<kToFloat, float, T>::type* dst,
                                           int ld, const Rows<T>& o, int64_t row0, int64_t d,
                                           int64_t dc) {
  for (int idx = threadIdx.x; idx < 64 * kWidth; idx += NT) {
    const int r = idx / kWidth, c = idx % kWidth;
    const int64_t gc = dc + c;
    const T* src = row_ptr(o, row0 + r, d);
    const bool ok = src != nullptr && gc < d;
    if constexpr (kToFloat) {
      dst[r * ld + c] = ok ? Mma<T>::to_float(src[gc]) : 0.0f;
    } else {
      dst[r * ld + c] = ok ? src[gc] : Mma<T>::zero();
    }
  }
}

// Element k of a 16-byte vector of T (little-endian lanes), as float.
template <typename T>
__device__ __forceinline__ float vec_elem(const uint4& v, int k) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w[k]);
  } else {
    const unsigned short bits = static_cast<unsigned short>(w[k / 2] >> (16 * (k & 1)));
    if constexpr (std::is_same<T, __half>::value) {
      return __half2float(__ushort_as_half(bits));
    } else {
      return __bfloat162float(__ushort_as_bfloat16(bits));
    }
  }
}

// Fast path: as stage_rows for `width` columns, in 16-byte vectors (ld.global.nc: the
// operands are read-only for the kernel's life). Needs d, dc and width multiples of
// vec_elems<T>() and 16-byte aligned operands (fast_path() checks), so that a vector
// lies wholly inside a row or wholly past its end (zeros there). One row pointer per
// vector instead of one per element. `width` is a multiple of 2 * vec_elems<T>(), so
// every thread copies the same number of vectors: a counted loop (unrolled where the
// width is a constant) with no remainder.
template <bool kToFloat, typename T>
__device__ __forceinline__ void stage_vec(typename std::conditional<kToFloat, float, T>::type* dst,
                                          int ld, const Rows<T>& o, int64_t row0, int64_t d,
                                          int64_t dc, int width) {
  constexpr int V = vec_elems<T>();
  static_assert(64 * 2 == NT, "64 rows x width / V vectors: a whole number per thread");
  const int per_row = width / V, per_thread = width / (2 * V);
#pragma unroll 8
  for (int i = 0; i < per_thread; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * NT;
    const int r = idx / per_row, c = (idx - r * per_row) * V;
    const int64_t gr = row0 + r, gc = dc + c;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (gr < o.n && gc < d) v = __ldg(reinterpret_cast<const uint4*>(row_start(o, gr, d) + gc));
    if constexpr (kToFloat) {
#pragma unroll
      for (int k = 0; k < V; k += 4) {
        *reinterpret_cast<float4*>(dst + r * ld + c + k) = make_float4(
            vec_elem<T>(v, k), vec_elem<T>(v, k + 1), vec_elem<T>(v, k + 2), vec_elem<T>(v, k + 3));
      }
    } else {
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  }
}

// Shared-memory operands of the score GEMM: X (the resident rows in the fast path,
// row stride xld, else the current chunk), the Y chunk (fast path: the first of its
// two buffers), and the S tile.
template <typename T>
struct Tiles {
  T* xs;
  unsigned xld;
  T* ys;
  float* ss;
};

// Carves the staging region (after the resident X) into Tiles.
template <typename T, bool kFast>
__device__ __forceinline__ Tiles<T> carve(unsigned char* smem, int64_t d, size_t tile_offset) {
  unsigned char* stage = smem + x_region<T, kFast>(d);
  T* xs = reinterpret_cast<T*>(kFast ? smem : stage);
  T* ys = reinterpret_cast<T*>(stage) + (kFast ? 0 : chunk_elems<T>());
  const unsigned xld = kFast ? static_cast<unsigned>(x_ld<T>(d)) : Mma<T>::LD;
  return {xs, xld, ys, reinterpret_cast<float*>(stage + tile_offset)};
}

// Fast path: the CTA's rows of X, all of D, once. No barrier of its own: tile_dots
// stages the first Y chunk and waits at a barrier before any fragment load.
template <typename T, bool kFast>
__device__ __forceinline__ void stage_resident_x(const Pass& p, const Ops<T>& op, const Tiles<T>& t,
                                                 int64_t row0) {
  if constexpr (kFast)
    stage_vec<false, T>(t.xs, t.xld, op.x, row0, p.d, 0, static_cast<int>(x_cols<T>(p.d)));
}

// Fast path: the BM x KC chunk (col0, dc) of Y into `buf` by cp.async, 16 bytes per
// copy; zeros (plain stores) past the operand.
template <typename T>
__device__ __forceinline__ void issue_y_chunk(T* buf, const Rows<T>& o, int64_t col0, int64_t d,
                                              int64_t dc) {
  constexpr int V = vec_elems<T>(), per_row = KC / V;
#pragma unroll
  for (int i = 0; i < KC / (2 * V); ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * NT;
    const int r = idx / per_row, c = (idx - r * per_row) * V;
    const int64_t gr = col0 + r, gc = dc + c;
    T* dst = buf + r * Mma<T>::LD + c;
    if (gr < o.n && gc < d) {
      __pipeline_memcpy_async(dst, row_start(o, gr, d) + gc, 16);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Fast path, before the column loop: the first Y chunk in flight into buffer 0.
template <typename T, bool kFast>
__device__ __forceinline__ void prefetch_first_chunk(const Ops<T>& op, const Tiles<T>& t, int64_t d) {
  if constexpr (kFast) {
    issue_y_chunk(t.ys, op.y, 0, d, 0);
    __pipeline_commit();
  }
}

// S tile (raw dot products, float, stride LDS) of rows row0.. against columns col0..
// Fast path: `q` counts the CTA's Y chunks; chunk q is in buffer q % 2 and, while its
// MMAs run, chunk q + 1 (the next D chunk, else the next tile's first) is in flight
// into the other buffer (issued after the barrier that frees it).
// kVote: the first barrier is __syncthreads_and(vote), whose result tile_dots returns
// (1 otherwise).
template <typename T, bool kFast, bool kVote = false>
__device__ __forceinline__ int tile_dots(const Pass& p, const Ops<T>& op, const Tiles<T>& t,
                                         int64_t row0, int64_t col0, int& q, int vote = 1) {
  using M = Mma<T>;
  // 16-bit inputs: ldmatrix + mma.sync on a 2 x 2 warp grid, a warp owning 32 rows x BN / 2
  // columns of S (A and B fragment bytes per k-step: 2 x 16 rows each, against 16 + 64 for
  // a warp owning 16 rows x BN); float32: 3xTF32 WMMA, a warp owning 16 rows x BN.
  constexpr bool kPtx = sizeof(T) == 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  using CW = typename std::conditional<kPtx, float, typename Mma<float>::C>::type;
  CW acc[kPtx ? 1 : BN / 16];
  float accp[2][BN / 16][4] = {};  // kPtx: [mi][nj] of the warp's 32 x BN / 2 block
  if constexpr (!kPtx) {
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
  }
  int all = 1;
  for (int64_t dc = 0; dc < p.d; dc += KC) {
    // staging (and whatever shares it) is free
    if (kVote && dc == 0) {
      all = __syncthreads_and(vote);
    } else {
      __syncthreads();
    }
    const T* ys = t.ys;
    if constexpr (kFast) {
      static_assert(KC % (2 * vec_elems<T>()) == 0 && DO % (2 * vec_elems<T>()) == 0, "whole vectors");
      const bool last = dc + KC >= p.d;
      const int64_t next_col = last ? col0 + BN : col0;
      if (next_col < p.cols)
        issue_y_chunk(t.ys + ((q + 1) & 1) * chunk_elems<T>(), op.y, next_col, p.d, last ? 0 : dc + KC);
      __pipeline_commit();       // an empty group after the last chunk: the wait stays uniform
      __pipeline_wait_prior(1);  // this thread's copies of chunk q have landed
      __syncthreads();           // and everyone's
      ys += (q & 1) * chunk_elems<T>();
      ++q;
    } else {
      stage_rows<false, T, KC>(t.xs, M::LD, op.x, row0, p.d, dc);
      stage_rows<false, T, KC>(t.ys, M::LD, op.y, col0, p.d, dc);
      __syncthreads();
    }
    if constexpr (kPtx) {
      static_assert(BM == 64 && BN == 64 && NT == 128, "2 x 2 warps of 32 x 32");
      // A (X rows, row-major): lane l addresses row l % 16 of a 16-row block at k offset
      // 8 (l / 16), matrices 0..3 = a[0..3]. B (the Y chunk, [n][k]): lane l addresses
      // column n = l % 8 + 8 (l / 16) at k offset 8 ((l / 8) % 2), matrices 0..3 = b[0],
      // b[1] of columns 0..7, then of columns 8..15 (no .trans: rows of [n][k] are B's
      // columns, as the fragment wants them).
      const int xr = (warp >> 1) * 32 + (lane & 15), yn = (warp & 1) * (BN / 2) + (lane & 7) + (lane >> 4) * 8;
      const T* xa = t.xs + xr * t.xld + (kFast ? dc : 0) + (lane >> 4) * 8;
      const T* yb = ys + yn * M::LD + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int ks = 0; ks < KC; ks += M::KS) {
        unsigned fa[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) ldsm_x4<false>(fa[mi], xa + mi * 16 * t.xld + ks);
#pragma unroll
        for (int nb = 0; nb < BN / 32; ++nb) {
          unsigned fb[4];
          ldsm_x4<false>(fb, yb + nb * 16 * M::LD + ks);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_16816<T>(accp[mi][2 * nb], fa[mi], fb[0], fb[1]);
            mma_16816<T>(accp[mi][2 * nb + 1], fa[mi], fb[2], fb[3]);
          }
        }
      }
    } else {
      const T* xa = t.xs + warp * 16 * t.xld + (kFast ? dc : 0);
#pragma unroll
      for (int ks = 0; ks < KC; ks += M::KS) {
        typename M::A fa;
        M::load_a(fa, xa + ks, t.xld);
#pragma unroll
        for (int n = 0; n < BN / 16; ++n) M::mma(acc[n], fa, ys + n * 16 * M::LD + ks);
      }
    }
  }
  if constexpr (kPtx) {
    store_acc<BN / 2>(t.ss, LDS, accp);
  } else {
#pragma unroll
    for (int n = 0; n < BN / 16; ++n)
      wmma::store_matrix_sync(t.ss + warp * 16 * LDS + n * 16, acc[n], LDS, wmma::mem_row_major);
  }
  __syncthreads();
  return all;
}

// One row's mask over one column tile, in tile-local ints (computed once per tile, so
// the per-element test is two 32-bit compares): columns c >= limit lie past S's
// columns (all of them when the row itself is past S's rows: limit 0); column skip
// (-1: none) is the row's excluded pair, global column == row + diag_offset.
struct TileMask {
  int limit, skip;
  __device__ bool masked(int c) const { return c >= limit || c == skip; }
};

__device__ __forceinline__ TileMask tile_mask(const Pass& p, int64_t gi, int64_t col0, bool row_ok) {
  const int64_t left = p.cols - col0, dg = gi + p.diag_offset - col0;
  return {row_ok ? static_cast<int>(left < BN ? left : BN) : 0,
          p.diag && dg >= 0 && dg < BN ? static_cast<int>(dg) : -1};
}

// 2^x by ex2.approx.ftz.f32: one MUFU.EX2, without exp2f's fix-up of results below
// 2^-126 (three more instructions per call); those come out as zero. Every sum here
// has a term of at least 2^-126 times its total (the forward's sum holds 2^0 for its
// max; a row's weights sum to its g), so nothing it drops is seen in float32.
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(MIMAC_CUDA_EMULATION)
  return ::mimac_emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

template <int kCritic>
__device__ __forceinline__ float raw_score(float dot, float eps) {
  if (kCritic == MIMAC_LOG_DOT) return logf(dot < eps ? eps : dot);  // `<` keeps NaN
  return dot;
}

// --- the backward's one-exponential form ------------------------------------------------------

// Whether the backward may take one exponential per element: 16-bit inputs, whose V is
// rounded to bf16 hi + lo (~16 significant bits) or TF32 (11) right after, so the
// form's extra rounding (below) does not show; float32 keeps two exponentials.
template <typename T>
__host__ __device__ constexpr bool kOneExp() {
  return sizeof(T) == 2;
}

// The window of a statistic around the shift c (natural log): |lse - c| <= kExpWindow.
// With c the row block's largest lse, every weight that matters in float32 (S - lse >=
// -16.6, i.e. 2^-24 of its row's or column's total) has |S - c| <= 56.6: the exponent
// (S - c) log2(e) and S - c are rounded to at most 2^-18 absolute, ~3e-6 relative in
// the weight, as is u = g e^(c - lse). e^(S - c) flushes to zero below e^-87.3, so
// a dropped weight is below e^(-87.3 + 40) of its side's total, and all 2^31 columns
// below e^-25.8 (6e-12) of it. e^(S - c) <= e^40 for any pair the sums hold.
constexpr float kExpWindow = 40.0f;
// u and v below 2^126: u_i + v_k stays finite.
constexpr float kExpFactorMax = 8.507059173023462e37f;  // 2^126
// |g| max(1/tau, 1) below 2^100: on an unmasked pair e^(S - c) u_i = g_i e^(S - lse_i)
// <= g_i (S <= lse_i, and as much for the columns), so V = (1/tau) u stays finite.
constexpr float kExpGradMax = 1.2676506002282294e30f;  // 2^100

// One row's or column's statistic `lse`, gradient g and factor f = g e^(c - lse): lse
// within the window, f below kExpFactorMax and g (1/tau) below kExpGradMax (NaN or
// infinite values fail).
__device__ __forceinline__ bool one_exp_ok(float lse, float c, float g, float f, float it) {
  return fabsf(lse - c) <= kExpWindow && fabsf(f) < kExpFactorMax &&
         fabsf(g) * fmaxf(it, 1.0f) < kExpGradMax;
}

// Whether the BM x BN tile (row0, col0) holds a masked pair: rows past S's rows,
// columns past its columns, or a row's excluded column (global column == row +
// diag_offset). Uniform across the CTA.
__device__ __forceinline__ bool tile_has_mask(const Pass& p, int64_t row0, int64_t col0) {
  if (row0 + BM > p.rows || col0 + BN > p.cols) return true;
  const int64_t first = row0 + p.diag_offset, last = row0 + BM - 1 + p.diag_offset;
  return p.diag && first < col0 + BN && last >= col0;
}

// The largest `v` of the block's kWarps warps of threads (NaN skipped), through
// `scratch` (kWarps floats); a block barrier.
template <int kWarps = NT / 32>
__device__ __forceinline__ float block_max_lse(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float m = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// --- kernels ---------------------------------------------------------------------------------

// kFast: the fast path (16-byte vector staging, resident X; fast_path() picks it).
// Launch bounds with an explicit minimum of CTAs per SM give ptxas its register budget
// (without one its own heuristic spilled in some variants): 3 CTAs (<= 168 registers)
// for 16-bit inputs, 1 for float32 (the 3xTF32 fragments need more).
template <typename T, int kCritic, bool kFast>
__global__ void __launch_bounds__(NT, sizeof(T) == 4 ? 1 : 3) lse_forward_kernel(Pass p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const Tiles<T> t = carve<T, kFast>(smem, p.d, staging_bytes<T>());
  float* ss = t.ss;

  const int64_t h = blockIdx.z, row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const Ops<T> op = head_operands<T>(p, h);
  stage_resident_x<T, kFast>(p, op, t, row0);
  prefetch_first_chunk<T, kFast>(op, t, p.d);
  int q = 0;  // Y chunks so far (fast path)
  const float it = *p.inv_tau;
  const int r = threadIdx.x >> 1, part = threadIdx.x & 1;
  const int64_t gi = row0 + r;
  float m = -INFINITY, l = 0.0f;  // running max (natural log) and sum

  for (int64_t col0 = 0; col0 < p.cols; col0 += BN) {
    tile_dots<T, kFast>(p, op, t, row0, col0, q);
    // Pass 1: this thread's scaled, masked scores of the tile, kept in registers.
    float v[JPT];
    float tmax = -INFINITY;
    const TileMask mask = tile_mask(p, gi, col0, true);
#pragma unroll
    for (int j = 0; j < JPT; ++j) {
      const int c = 2 * j + part;  // interleaved: fewer bank conflicts than halves
      const float sn = raw_score<kCritic>(ss[r * LDS + c], p.eps) * it;
      v[j] = mask.masked(c) ? -INFINITY : sn;
      tmax = fmaxf(tmax, v[j]);  // fmaxf skips NaN; the sum below still carries it
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const float mnew = fmaxf(m, tmax);
    // Pass 2: rescaled sum.
    float sum = 0.0f;
    if (mnew != -INFINITY) {
#pragma unroll
      for (int j = 0; j < JPT; ++j) sum += exp2_ftz((v[j] - mnew) * kLog2e);
    } else {
      // Every score so far masked or NaN (fmaxf skipped the NaNs): keep a NaN in the
      // sum, or a row whose every score is NaN would come out as -inf.
#pragma unroll
      for (int j = 0; j < JPT; ++j) {
        if (v[j] != v[j]) sum = v[j];
      }
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    // m = mnew = -inf: l is 0 or NaN so far, and stays NaN once it is.
    l = (mnew == -INFINITY) ? l + sum : l * exp2_ftz((m - mnew) * kLog2e) + sum;
    m = mnew;
  }
  if (part == 0 && gi < p.rows) p.lse[h * p.lse_hs + gi] = m + log2f(l) * kLn2;
#endif
}

// Register budget of a whole SM's file per CTA (see the forward): the DO-wide
// gradient accumulators live in registers.
template <typename T, int kCritic, bool kSplit, bool kFast>
__global__ void __launch_bounds__(NT, 1) lse_backward_kernel(Pass p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const Tiles<T> t = carve<T, kFast>(smem, p.d, bwd_union<T, kFast>());
  unsigned char* stage = smem + x_region<T, kFast>(p.d);
  float* slab = reinterpret_cast<float*>(stage + slab_offset<T, kFast>());  // general: in the staging
  constexpr bool kBf16 = bf16_vy<T, kFast>();
  __nv_bfloat16* yb = reinterpret_cast<__nv_bfloat16*>(slab);  // kBf16: the bf16 Y slab
  __nv_bfloat16* v_hi = reinterpret_cast<__nv_bfloat16*>(stage + slab_offset<T, kFast>() + bf16_slab_bytes());
  __nv_bfloat16* v_lo = v_hi + v_tile_bytes() / 2;
  float* ss = t.ss;
  float* s_ly = reinterpret_cast<float*>(stage + bwd_union<T, kFast>() + tile_bytes());
  float* s_gy = s_ly + BN;
  float* s_vy = s_gy + BN;
  double* s_red = reinterpret_cast<double*>(stage + bwd_union<T, kFast>() + tile_bytes() +
                                            align128(3 * BN * sizeof(float)));

  const int64_t h = blockIdx.z, row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t dout0 = static_cast<int64_t>(blockIdx.y) * DO;
  const Ops<T> op = head_operands<T>(p, h);
  stage_resident_x<T, kFast>(p, op, t, row0);
  prefetch_first_chunk<T, kFast>(op, t, p.d);
  int q = 0;  // Y chunks so far (fast path)
  // A side without statistics (null: the rectangular problem's columns, or its rows
  // in the dY pass) carries no weight at all.
  const bool x_side = p.lx != nullptr, y_side = p.ly != nullptr;
  const float* lx = x_side ? p.lx + h * p.lx_hs : nullptr;
  const float* gx = x_side ? p.gx + h * p.lx_hs : nullptr;
  const float* cx = x_side ? p.cx + h * p.lx_hs : nullptr;
  const float* ly = y_side ? p.ly + h * p.ly_hs : nullptr;
  const float* gy = y_side ? p.gy + h * p.ly_hs : nullptr;
  const float it = *p.inv_tau;
  const int warp = threadIdx.x / 32, r = threadIdx.x >> 1, part = threadIdx.x & 1;
  const int64_t gi = row0 + r;
  const bool row_ok = gi < p.rows;
  const float lxi = row_ok && x_side ? lx[gi] : 0.0f;  // natural log, as the scores below
  const float gxi = row_ok && x_side ? gx[gi] : 0.0f;
  const float cxi = row_ok && x_side ? cx[gi] : 0.0f;
  const bool want_tau = p.tau_mode != 0 && blockIdx.y == 0;  // count each pair once

  // One exponential per element (16-bit inputs, both sides weighted): with a shift c
  // common to the tile's rows and columns, u_i = g_i e^(c - lse_i), v_k = g_k e^(c - lse_k)
  // and W_ik = e^(S_ik - c) (u_i + v_k), for the interior tiles whose statistics pass
  // the window test (one_exp_ok); the others take both exponentials.
  const bool one_exp = kOneExp<T>() && x_side && y_side;
  float shift = 0.0f, uxi = 0.0f;
  int row_vote = 1;
  if (one_exp) {
    shift = block_max_lse(row_ok ? lxi : -INFINITY, reinterpret_cast<float*>(s_red));
    uxi = row_ok ? gxi * exp2_ftz((shift - lxi) * kLog2e) : 0.0f;
    row_vote = !row_ok || one_exp_ok(lxi, shift, gxi, uxi, it);
  }

  // The gradient accumulators: TF32 WMMA fragments, a warp owning 16 rows x DO; or, for
  // the bf16 product, mma.sync fragments of a 2 x 2 warp grid, a warp owning 32 rows x
  // DO / 2 (per k-step 2 x 16 V rows and DO / 2 Y columns: 4/5 of the fragment bytes of
  // 16 rows x DO).
  C2 acc[kBf16 ? 1 : DO / 16];
  float accb[kBf16 ? 2 : 1][kBf16 ? DO / 16 : 1][4] = {};
#pragma unroll
  for (int n = 0; n < (kBf16 ? 1 : DO / 16); ++n) wmma::fill_fragment(acc[n], 0.0f);
  const int lane = threadIdx.x & 31, wr = warp >> 1, wc = warp & 1;
  double tau = 0.0;

  for (int64_t col0 = 0; col0 < p.cols; col0 += BN) {
    int vote = row_vote;
    if (threadIdx.x < BN) {
      const int64_t gk = col0 + threadIdx.x;
      const bool ok = y_side && gk < p.cols;
      const float lk = ok ? ly[gk] : 0.0f, gv = ok ? gy[gk] : 0.0f;
      s_ly[threadIdx.x] = lk;
      s_gy[threadIdx.x] = gv;
      if (one_exp) {
        const float v = ok ? gv * exp2_ftz((shift - lk) * kLog2e) : 0.0f;
        s_vy[threadIdx.x] = v;
        vote = vote && (!ok || one_exp_ok(lk, shift, gv, v, it));
      }
    }
    // ends with __syncthreads; the first barrier also ANDs the votes (uniform). Tiles
    // with a masked pair (the diagonal of `all`, ragged edges) take the exact form.
    const bool fast_tile = tile_dots<T, kFast, kOneExp<T>()>(p, op, t, row0, col0, q, vote) &&
                           one_exp && !tile_has_mask(p, row0, col0);
    float tau_tile = 0.0f;
    const TileMask mask = tile_mask(p, gi, col0, row_ok);
    // The per-element pass: V and the temperature terms of this thread's columns.
    const auto element_pass = [&](auto one_exp_tag) {
      constexpr bool kOne = decltype(one_exp_tag)::value;
#pragma unroll 4
      for (int j = 0; j < JPT / 2; ++j) {
        const int c = 4 * j + 2 * part;  // this thread's column pair (c, c + 1): 8-byte accesses
        const float2 dots = *reinterpret_cast<const float2*>(ss + r * LDS + c);
        float vv[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float dot = e ? dots.y : dots.x;
          const float s = raw_score<kCritic>(dot, p.eps);
          const float sn = s * it;
          float w, u;
          if constexpr (kOne) {
            // An interior tile: no masked pair, S <= lse of both sides, so e^(S - c) <= e^40.
            const float ex = exp2_ftz((sn - shift) * kLog2e);
            w = ex * uxi;
            u = fmaf(ex, s_vy[c + e], w);
          } else {
            w = x_side ? gxi * exp2_ftz((sn - lxi) * kLog2e) : 0.0f;  // through row i's lse
            u = w + (y_side ? s_gy[c + e] * exp2_ftz((sn - s_ly[c + e]) * kLog2e) : 0.0f);  // + column k's
            if (mask.masked(c + e)) u = w = 0.0f;
          }
          // Each side centred on its own positive score, per element: the weights of
          // a row sum to its g, so this is the loss's temperature gradient with no
          // float32 cancellation between two large totals.
          tau_tile += w * (s - cxi);
          vv[e] = u * it;  // dL/d(dot)
          if (kCritic == MIMAC_LOG_DOT) vv[e] = dot > p.eps ? vv[e] / dot : 0.0f;
        }
        if constexpr (kBf16) {
          const __nv_bfloat162 hi = __floats2bfloat162_rn(vv[0], vv[1]);
          // no remainder of an infinity or NaN (hi carries it; inf - inf would be NaN);
          // interior one-exponential tiles have none (kExpGradMax) but for log_dot's 1/dot
          constexpr bool kFinite = kOne && kCritic != MIMAC_LOG_DOT;
          const float rest0 = kFinite || fabsf(vv[0]) < INFINITY ? vv[0] - __low2float(hi) : 0.0f;
          const float rest1 = kFinite || fabsf(vv[1]) < INFINITY ? vv[1] - __high2float(hi) : 0.0f;
          *reinterpret_cast<__nv_bfloat162*>(v_hi + r * LDV + c) = hi;
          *reinterpret_cast<__nv_bfloat162*>(v_lo + r * LDV + c) = __floats2bfloat162_rn(rest0, rest1);
        } else {
          *reinterpret_cast<float2*>(ss + r * LDS + c) = make_float2(vv[0], vv[1]);
        }
      }
    };
#if defined(MIMAC_CUDA_EMULATION)
    if (threadIdx.x == 0) ::mimac_emu::tally(fast_tile ? "bwd_tiles_one_exp" : "bwd_tiles_two_exp");
#endif
    if (fast_tile) {
      element_pass(std::true_type{});
    } else {
      element_pass(std::false_type{});
    }
    if (want_tau) tau += tau_tile;
    __syncthreads();  // V complete, staging free
    if constexpr (kBf16) {
      stage_vec<false, T>(yb, LDY, op.y, col0, p.d, dout0, DO);
    } else if constexpr (kFast) {
      stage_vec<true, T>(slab, LDO, op.y, col0, p.d, dout0, DO);
    } else {
      stage_rows<true, T, DO>(slab, LDO, op.y, col0, p.d, dout0);
    }
    __syncthreads();
    if constexpr (kBf16) {
      static_assert(BM == 64 && NT == 128 && DO % 32 == 0, "2 x 2 warps of 32 rows x DO / 2");
      // ldmatrix row addresses: lane l reads row l % 16 of a 16-row block at column
      // offset 8 (l / 16), which lays out matrices 0..3 as a[0..3] (A, V rows) and, with
      // .trans on the [k][n] Y slab, as b[0], b[1] of two adjacent 8-column blocks.
      const int lr = lane & 15, lc = (lane >> 4) * 8;
#pragma unroll 2
      for (int ks = 0; ks < BN; ks += 16) {
        unsigned ah[2][4], al[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int row = wr * 32 + mi * 16 + lr;
          ldsm_x4<false>(ah[mi], v_hi + row * LDV + ks + lc);
          ldsm_x4<false>(al[mi], v_lo + row * LDV + ks + lc);
        }
#pragma unroll
        for (int nb = 0; nb < DO / 32; ++nb) {
          unsigned b[4];
          ldsm_x4<true>(b, yb + (ks + lr) * LDY + wc * (DO / 2) + nb * 16 + lc);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              // small terms first
              mma_16816<__nv_bfloat16>(accb[mi][2 * nb + h], al[mi], b[2 * h], b[2 * h + 1]);
              mma_16816<__nv_bfloat16>(accb[mi][2 * nb + h], ah[mi], b[2 * h], b[2 * h + 1]);
            }
          }
        }
      }
    } else {
      using VY = MmaVY<kSplit>;
#pragma unroll 2
      for (int ks = 0; ks < BN; ks += 8) {
        typename VY::A fv;
        VY::load_a(fv, ss + warp * 16 * LDS + ks);
#pragma unroll
        for (int n = 0; n < DO / 16; ++n) VY::mma(acc[n], fv, slab + ks * LDO + n * 16);
      }
    }
    __syncthreads();  // everyone is done with V and the slab before they are rewritten
  }

  float* out = slab;  // output staging reuses the union
  if constexpr (kBf16) {
    store_acc<DO / 2>(out, LDO, accb);
  } else {
#pragma unroll
    for (int n = 0; n < DO / 16; ++n)
      wmma::store_matrix_sync(out + warp * 16 * LDO + n * 16, acc[n], LDO, wmma::mem_row_major);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * DO; idx += NT) {
    const int rr = idx / DO, c = idx % DO;
    const int64_t g = row0 + rr, gd = dout0 + c;
    if (g < p.rows && gd < p.d) {
      float* dst = g < p.out_split ? p.out0 + h * p.out_hs + g * p.d
                                   : p.out1 + h * p.out_hs + (g - p.out_split) * p.d;
      dst[gd] = out[rr * LDO + c];
    }
  }

  if (want_tau) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) tau += __shfl_xor_sync(0xffffffffu, tau, off);
    if ((threadIdx.x & 31) == 0) s_red[warp] = tau;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < NT / 32; ++w) total += s_red[w];
      atomicAdd(p.grad_tau, static_cast<float>(total));
    }
  }
#endif
}

// --- fragment kernels: 16-bit inputs on the fast path ------------------------------------------
//
// The score tile never leaves registers. A CTA of RW = 2 warps owns BM = 64 rows, each
// warp 32 of them (two m16 tiles) against all BN = 64 columns of a tile (eight n8
// tiles): per k-step a warp loads 2 A and 4 B ldmatrix.x4 for 16 mma.sync, 1.5 fragment
// bytes per score element against 2 for the 2 x 2 grid above. Both kernels keep the
// CTA's X rows resident and the whole Y tile (all of D) double-buffered across tiles by
// 16-byte cp.async, so the next tile's copy overlaps this tile's work.
//   forward   the online log-sum-exp runs on the accumulators: each lane holds 16
//             scores of each of its 4 rows, a row's 64 live in the 4 lanes of a quad
//             (two xor shuffles give the tile's row max); each lane keeps its own
//             partial sum, the quad adds them once at the end.
//   backward  (bf16 only) V is formed on the accumulators too, and the mma.sync C
//             layout of two adjacent n8 tiles is the A layout of one k16 step: V goes
//             straight into dX += V Y as bf16 hi + lo fragments (no S or V round trip
//             through shared memory); Y's B fragments come from the same staged tile by
//             ldmatrix.trans. A warp's dX accumulators are 32 rows x DO (128 registers),
//             so it takes the tile's S in two halves of 32 columns (2 fragment bytes per
//             element: the A fragments load twice).
// Interior tiles (no masked pair) skip the mask tests; the backward's one-exponential
// form and its window vote are those of lse_backward_kernel.
//
// MIMAC_COST_FORM (the static cost model's compile, benchmarks/cuda_cost.py, never a
// build that runs): 1 compiles only the interior tiles' pass in the one-exponential
// form, 2 only the exact form, so that the SASS of the column loop is the code a tile
// of that form runs (a static count cannot tell which side of a per-tile branch runs);
// both compile only issue_rows' copy of whole tiles.

constexpr int RW = 2;                 // warps per CTA of the fragment kernels
constexpr int RNT = 32 * RW;          // their threads per CTA
constexpr int RMI = BM / (16 * RW);   // m16 tiles per warp: a warp owns 32 rows
constexpr int RNJ = BN / 8;           // n8 tiles per row band
static_assert(RNT == BN && RNT == BM, "one thread per column (statistics) and per row");

// A Y tile: BN rows, all of D padded to whole KC chunks (stride x_ld, as the resident X).
template <typename T>
__host__ __device__ constexpr size_t y_tile_bytes(int64_t d) {
  return align128(BN * x_ld<T>(d) * sizeof(T));
}
// [resident X] [Y tile 0] [Y tile 1]
template <typename T>
__host__ __device__ constexpr size_t fwd_frag_smem(int64_t d) {
  return x_bytes<T>(d) + 2 * y_tile_bytes<T>(d);
}
// The backward fragment kernels' statistics at the start of shared memory, at fixed
// offsets (no address registers): [columns: lse, g, one-exponential factor] [rows: lse,
// g, centre, factor] [reduction scratch] [each of the kThreads threads' temperature sums:
// exact tiles, then one-exponential tiles (times 1/tau)], in shared memory rather than
// registers across the column loop.
template <int kThreads>
struct BwdStats {
  static constexpr size_t kBytes = 3 * BN * sizeof(float) + 4 * BM * sizeof(float) + 128 + 2 * kThreads * sizeof(double);
  static_assert(kBytes % 128 == 0 && kThreads / 32 * sizeof(double) <= 128, "tiles stay 128-byte aligned");
  float *ly, *gy, *vy, *lx, *gx, *cx, *ux;
  double *red, *tau;
  __device__ explicit BwdStats(unsigned char* smem)
      : ly(reinterpret_cast<float*>(smem)), gy(ly + BN), vy(gy + BN), lx(vy + BN), gx(lx + BM),
        cx(gx + BM), ux(cx + BM), red(reinterpret_cast<double*>(ux + BM)), tau(red + 128 / sizeof(double)) {}
};

// The backward: [statistics (BwdStats)] [resident X] [Y tile 0] [Y tile 1]
constexpr size_t kFragStats = BwdStats<RNT>::kBytes;
template <typename T>
__host__ __device__ constexpr size_t bwd_frag_smem(int64_t d) {
  return kFragStats + fwd_frag_smem<T>(d);
}

// Sixteen zero bytes in global memory: the source of the copies past an operand's rows
// or past D, so that every slot of a tile comes by the same cp.async (no zero-store
// branch in the column loop).
__device__ uint4 g_zero16;

// The 64 rows row0.. of an operand, columns [0, width) (width: whole KC chunks), into
// dst (stride ld) by 16-byte cp.async, by the CTA's kThreads threads; zeros past the
// operand's rows and past D. A thread copies vector (tid % 8) of every KC chunk in rows
// tid / 8 + kStep i (kStep = kThreads / 8 rows per pass): no division.
template <typename T, int kThreads = RNT>
__device__ __forceinline__ void issue_rows(T* dst, int ld, const Rows<T>& o, int64_t row0, int64_t d,
                                           int width) {
  constexpr int V = vec_elems<T>(), kStep = kThreads / 8, kPasses = 64 / kStep;
  static_assert(KC == 8 * V && kThreads % 64 == 0 && kPasses >= 1, "8 vectors per chunk row");
  const int cv = (threadIdx.x & 7) * V, r0 = threadIdx.x >> 3;
#if defined(MIMAC_COST_FORM)
  const bool whole = true;  // the cost model's compile: the interior tiles' copy only
#else
  const bool whole = width == d && row0 + 64 <= o.n && (row0 >= o.split || row0 + 64 <= o.split);
#endif
  if (whole) {
    // All 64 rows in one part of the operand and D whole chunks (every tile of an
    // aligned problem but the last): no zero source, a pointer walk of kStep rows per
    // step instead of a row lookup per copy (the lookup was an eighth of the backward's
    // issue).
    const T* src = row_start(o, row0 + r0, d) + cv;
    T* to = dst + r0 * ld + cv;
    const int64_t step = kStep * d;
#pragma unroll 1  // one chunk per trip: the cost model counts its trips from the bytes
    for (int kc = 0; kc < width; kc += KC) {
      const T* from = src + kc;
#pragma unroll
      for (int i = 0; i < kPasses; ++i, from += step)
        __pipeline_memcpy_async(to + kStep * i * ld + kc, from, 16);
    }
    return;
  }
  for (int kc = 0; kc < width; kc += KC) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = r0 + kStep * i, c = kc + cv;
      const int64_t gr = row0 + r;
      const void* src = gr < o.n && c < d ? static_cast<const void*>(row_start(o, gr, d) + c)
                                          : static_cast<const void*>(&g_zero16);
      __pipeline_memcpy_async(dst + r * ld + c, src, 16);
    }
  }
}

// acc[mi][nj] = S of the warp's rows (m16 tile mi) against tile columns nj * 8.. over all
// of D: `xa` and `yb` are this lane's ldmatrix row addresses in the resident X and the
// Y tile (see tile_dots), `width` whole KC chunks (zeros past D).
template <typename T, int kNJ = RNJ>
__device__ __forceinline__ void frag_scores(float (&acc)[RMI][kNJ][4], const T* xa, const T* yb,
                                            int ld, int width) {
#pragma unroll
  for (int mi = 0; mi < RMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.0f;
  for (int kc = 0; kc < width; kc += KC) {
#pragma unroll
    for (int ks = 0; ks < KC; ks += 16) {
      unsigned fa[RMI][4];
#pragma unroll
      for (int mi = 0; mi < RMI; ++mi) ldsm_x4<false>(fa[mi], xa + mi * 16 * ld + kc + ks);
#pragma unroll
      for (int nb = 0; nb < kNJ / 2; ++nb) {
        unsigned fb[4];
        ldsm_x4<false>(fb, yb + nb * 16 * ld + kc + ks);
#pragma unroll
        for (int mi = 0; mi < RMI; ++mi) {
          mma_16816<T>(acc[mi][2 * nb], fa[mi], fb[0], fb[1]);
          mma_16816<T>(acc[mi][2 * nb + 1], fa[mi], fb[2], fb[3]);
        }
      }
    }
  }
}

// A fragment kernel's start (kThreads threads): the CTA's X rows into xs and the first
// Y tile into ys in flight, one cp.async group; the emulation counts the CTA under `name`.
template <typename T, int kThreads = RNT>
__device__ __forceinline__ void frag_start(const char* name, T* xs, T* ys, int ld, const Ops<T>& op,
                                           int64_t row0, int64_t d, int width) {
#if defined(MIMAC_CUDA_EMULATION)
  if (threadIdx.x == 0) ::mimac_emu::tally(name);
#else
  (void)name;
#endif
  issue_rows<T, kThreads>(xs, ld, op.x, row0, d, width);
  issue_rows<T, kThreads>(ys, ld, op.y, 0, d, width);
  __pipeline_commit();
}

// The forward fragment kernels' shared memory, [resident X] [Y tile 0] [Y tile 1], its
// strides, and this lane's ldmatrix row addresses: `xa` in X (warp * 32 + lane % 16,
// k offset 8 (lane / 16)), `yoff` into a Y tile (see frag_scores).
template <typename T>
struct FwdFrag {
  int ld, width, ytile, yoff;
  T *xs, *ys;
  const T* xa;
  __device__ FwdFrag(unsigned char* smem, int64_t d)
      : ld(static_cast<int>(x_ld<T>(d))), width(static_cast<int>(x_cols<T>(d))),
        ytile(static_cast<int>(y_tile_bytes<T>(d) / sizeof(T))),
        yoff(((threadIdx.x & 7) + ((threadIdx.x & 31) >> 4) * 8) * ld + ((threadIdx.x >> 3) & 1) * 8),
        xs(reinterpret_cast<T*>(smem)), ys(reinterpret_cast<T*>(smem + x_bytes<T>(d))),
        xa(xs + (threadIdx.x / 32 * 32 + (threadIdx.x & 15)) * ld + ((threadIdx.x & 31) >> 4) * 8) {}
};

// The end of a forward fragment kernel: each row's sum of its quad's partial sums
// (lanes 4g..4g + 3 hold row (mi, hf)'s 16-column parts), written by the quad's first
// lane as out(mi, hf, sum) to `lse` (rows past the end skipped).
template <typename Out>
__device__ __forceinline__ void frag_row_out(const Pass& p, int64_t h, int64_t row0, const float (&l)[RMI][2],
                                             Out out) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mi = 0; mi < RMI; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float s = l[mi][hf];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      const int64_t gi = row0 + threadIdx.x / 32 * 32 + mi * 16 + hf * 8 + (lane >> 2);
      if ((lane & 3) == 0 && gi < p.rows) p.lse[h * p.lse_hs + gi] = out(mi, hf, s);
    }
  }
}

// The forward fragment kernels' column-tile start: the next tile's copy into the other
// buffer (an empty group after the last tile: the wait stays uniform), then this tile's
// copies (and X's) landed, from every thread. Returns this tile's Y.
template <typename T>
__device__ __forceinline__ const T* frag_next_tile(T* ys, int ytile, int buf, int ld, const Rows<T>& y,
                                                   int64_t col0, int64_t cols, int64_t d, int width) {
  __syncthreads();  // the previous tile's readers of the other buffer are done
  if (col0 + BN < cols) issue_rows(ys + (buf ^ 1) * ytile, ld, y, col0 + BN, d, width);
  __pipeline_commit();
  __pipeline_wait_prior(1);
  __syncthreads();
  return ys + buf * ytile;
}

// Whether the tile (row0, col0) runs the masked pass (any masked pair), as the cost
// model's compile sees it (MIMAC_COST_FORM: interior tiles only).
__device__ __forceinline__ bool frag_masked_tile(const Pass& p, int64_t row0, int64_t col0) {
#if defined(MIMAC_COST_FORM)
  (void)p, (void)row0, (void)col0;
  return false;
#else
  return tile_has_mask(p, row0, col0);
#endif
}

// A shifted exp-sum of the one-pass forward is kept when it lies in [kSumLow, kSumHigh]
// (the log-sum-exp is then shift + log(sum)); outside it the row is re-swept with a
// running max. Below: its terms neared float32's subnormals (2^-126), where relative
// precision goes (ex2.approx.ftz flushes them). Above: the shift lay far under the row's
// largest terms, whose exponents S - shift and log(sum) are rounded relative to their
// size. The window of the Triton kernels (mimac_kernels/triton/kernels.py).
constexpr float kSumLow = 8.673617379884035e-19f;  // 2^-60
constexpr float kSumHigh = 16777216.0f;            // 2^24

template <typename T, int kCritic>
__global__ void __launch_bounds__(RNT, 4) lse_forward_frag_kernel(Pass p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const FwdFrag<T> f(smem, p.d);

  const int64_t h = blockIdx.z, row0 = static_cast<int64_t>(blockIdx.x) * BM;
  if (p.shift != nullptr) {
    // The one-pass forward left shifted exp-sums in `lse` (one thread per row): a block
    // whose sums all lie in the window finishes them and is done, any other is re-swept
    // whole below (NaN fails the test: the sweep gives the row's exact NaN or value).
    const int64_t gi = row0 + threadIdx.x;
    float out = 0.0f;
    bool keep = true;
    if (gi < p.rows) {
      const float sum = p.lse[h * p.lse_hs + gi];
      keep = sum >= kSumLow && sum <= kSumHigh;
      out = p.shift[h] + log2f(sum) * kLn2;
    }
    if (__syncthreads_and(keep)) {
      if (gi < p.rows) p.lse[h * p.lse_hs + gi] = out;
      return;
    }
  }
  const Ops<T> op = head_operands<T>(p, h);
  frag_start("frag_fwd_ctas", f.xs, f.ys, f.ld, op, row0, p.d, f.width);
  const float it = *p.inv_tau;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, tc = 2 * (lane & 3);
  // Row (mi, hf) of this lane: warp * 32 + mi * 16 + hf * 8 + g. Running max (natural
  // log, shared by the quad) and this lane's partial sum.
  float m[RMI][2], l[RMI][2];
#pragma unroll
  for (int mi = 0; mi < RMI; ++mi) m[mi][0] = m[mi][1] = -INFINITY, l[mi][0] = l[mi][1] = 0.0f;

  int buf = 0;
  for (int64_t col0 = 0; col0 < p.cols; col0 += BN, buf ^= 1) {
    const T* yb = frag_next_tile(f.ys, f.ytile, buf, f.ld, op.y, col0, p.cols, p.d, f.width);
    float acc[RMI][RNJ][4];
    frag_scores<T>(acc, f.xa, yb + f.yoff, f.ld, f.width);

    const auto pass = [&](auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;
#pragma unroll
      for (int mi = 0; mi < RMI; ++mi) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int64_t gi = row0 + warp * 32 + mi * 16 + hf * 8 + g;
          const TileMask mask = tile_mask(p, gi, col0, gi < p.rows);
          float v[RNJ][2];
          float tmax = -INFINITY;
#pragma unroll
          for (int nj = 0; nj < RNJ; ++nj) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float sn = raw_score<kCritic>(acc[mi][nj][2 * hf + e], p.eps) * it;
              v[nj][e] = kMasked && mask.masked(nj * 8 + tc + e) ? -INFINITY : sn;
              tmax = fmaxf(tmax, v[nj][e]);  // fmaxf skips NaN; the sum below still carries it
            }
          }
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
          tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
          const float mold = m[mi][hf], mnew = fmaxf(mold, tmax);
          // Every score so far masked or NaN (mnew = -inf): a reference of 0 leaves
          // e^-inf = 0 for the masked and NaN for the NaNs, which the sum keeps.
          const bool live = mnew != -INFINITY;
          const float ref = live ? mnew : 0.0f;
          float sum = 0.0f;
#pragma unroll
          for (int nj = 0; nj < RNJ; ++nj) {
#pragma unroll
            for (int e = 0; e < 2; ++e) sum += exp2_ftz((v[nj][e] - ref) * kLog2e);
          }
          // mold = -inf < mnew: e^-inf = 0 rescales the empty (0, or NaN: kept) sum.
          l[mi][hf] = fmaf(l[mi][hf], live ? exp2_ftz((mold - mnew) * kLog2e) : 1.0f, sum);
          m[mi][hf] = mnew;
        }
      }
    };
    if (frag_masked_tile(p, row0, col0)) {
      pass(std::true_type{});
    } else {
      pass(std::false_type{});
    }
  }
  frag_row_out(p, h, row0, l, [&](int mi, int hf, float s) { return m[mi][hf] + log2f(s) * kLn2; });
#endif
}

// One step of the column sums' reduction (lse_cross_frag_kernel): the lanes 2 kHalf
// apart (lane bit kHalf / 2 * 4: 16, 8, 4) swap halves of their first 2 kHalf column
// sums, each keeping and adding the half its bit names.
template <int kHalf>
__device__ __forceinline__ void column_halving(float (&c)[2 * RNJ], int lane) {
  const bool up = (lane & (2 * kHalf)) != 0;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float send = up ? c[j] : c[j + kHalf], keep = up ? c[j + kHalf] : c[j];
    c[j] = keep + __shfl_xor_sync(0xffffffffu, send, 2 * kHalf);
  }
}

// cross's forward in one pass: the rows' and the columns' shifted exp-sums of every
// tile at once, one exponential per element, e_ik = e^(S_ik - shift) with the head's
// fixed shift (binding.cpp: min(B, max(B - 64, 32)), MIMAC_SHIFT_*, below the bound B of
// S, so no term passes e^64 and no sum over < 2^31 columns overflows). A CTA owns its
// rows' sums (written raw to `lse`); a tile's column sums meet across the CTAs by
// atomicAdd on `col_sum`. lse_forward_frag_kernel then finishes both sides, re-sweeping
// the blocks with a sum outside [kSumLow, kSumHigh]. The column sum of a tile: each lane
// adds its 4 rows per column, then three xor-shuffle steps over the 8 lanes of one
// column pair halve the columns a lane keeps (8, 4, 2 of its 16) while summing the
// other lanes' rows, which leaves lane l with columns 2l and 2l + 1 of its warp's 32
// rows: two atomics per lane and tile, no shared memory.
template <typename T, int kCritic>
__global__ void __launch_bounds__(RNT, 4) lse_cross_frag_kernel(Pass p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const FwdFrag<T> f(smem, p.d);

  const int64_t h = blockIdx.z, row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const Ops<T> op = head_operands<T>(p, h);
  frag_start("frag_cross_ctas", f.xs, f.ys, f.ld, op, row0, p.d, f.width);
  // e = 2^(s * it log2(e) - shift log2(e)): one FFMA and one MUFU per element
  const float itl = *p.inv_tau * kLog2e, shl = p.shift[h] * kLog2e;
  float* col_sum = p.col_sum + h * p.cols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, tc = 2 * (lane & 3);
  float l[RMI][2];  // this lane's partial row sums, row (mi, hf) as in the forward
#pragma unroll
  for (int mi = 0; mi < RMI; ++mi) l[mi][0] = l[mi][1] = 0.0f;

  int buf = 0;
  for (int64_t col0 = 0; col0 < p.cols; col0 += BN, buf ^= 1) {
    const T* yb = frag_next_tile(f.ys, f.ytile, buf, f.ld, op.y, col0, p.cols, p.d, f.width);
    float acc[RMI][RNJ][4];
    frag_scores<T>(acc, f.xa, yb + f.yoff, f.ld, f.width);

    float c[2 * RNJ];  // column nj * 8 + tc + e at c[2 nj + e]: this lane's 4 rows
    const auto pass = [&](auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;
#pragma unroll
      for (int j = 0; j < 2 * RNJ; ++j) c[j] = 0.0f;
#pragma unroll
      for (int mi = 0; mi < RMI; ++mi) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int64_t gi = row0 + warp * 32 + mi * 16 + hf * 8 + g;
          const TileMask mask = tile_mask(p, gi, col0, gi < p.rows);
          float sum = 0.0f;
#pragma unroll
          for (int nj = 0; nj < RNJ; ++nj) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = exp2_ftz(fmaf(raw_score<kCritic>(acc[mi][nj][2 * hf + e], p.eps), itl, -shl));
              if (kMasked && mask.masked(nj * 8 + tc + e)) x = 0.0f;
              sum += x;
              c[2 * nj + e] += x;
            }
          }
          l[mi][hf] += sum;
        }
      }
    };
    if (frag_masked_tile(p, row0, col0)) {
      pass(std::true_type{});
    } else {
      pass(std::false_type{});
    }
    // Sum the 8 lanes g of each column pair: at the step over lane bit b (16, 8, 4) a
    // lane keeps the upper or the lower half of its columns, by that bit.
    column_halving<8>(c, lane);
    column_halving<4>(c, lane);
    column_halving<2>(c, lane);
    // lane l now holds columns 2l, 2l + 1 of the tile over the warp's 32 rows
    const int64_t col = col0 + 2 * lane;
    if (col < p.cols) atomicAdd(col_sum + col, c[0]);
    if (col + 1 < p.cols) atomicAdd(col_sum + col + 1, c[1]);
  }
  frag_row_out(p, h, row0, l, [](int, int, float s) { return s; });  // raw: finished later
#endif
}

// Two bf16 values as one register of an mma.sync fragment (the first in the low half).
__device__ __forceinline__ unsigned pack_bf16x2(__nv_bfloat162 v) {
  unsigned u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// The CTA's row statistics (threads < BM, one per row) into shared memory, and for the
// one-exponential form (statistics on both sides) its shift c, the CTA's largest row
// lse, with the rows' factors u_i (times 1/tau: V = e^(S - c) (u_i + v_k) / tau straight
// from the sum, finite: one_exp_ok bounds g max(1/tau, 1); the tile's temperature terms
// divide it out) and the rows' vote for that form. Returns c (0 without the form).
template <int kThreads>
__device__ __forceinline__ float bwd_row_stats(const Pass& p, const BwdStats<kThreads>& s, int64_t h,
                                               int64_t row0, float it, bool one_exp, int& row_vote) {
  const bool row_thread = kThreads == BM || threadIdx.x < BM;  // folds for one thread per row
  const int64_t gr = row0 + threadIdx.x;
  const bool mine = row_thread && gr < p.rows, own_ok = mine && p.lx != nullptr;
  const float lxr = own_ok ? p.lx[h * p.lx_hs + gr] : 0.0f, gxr = own_ok ? p.gx[h * p.lx_hs + gr] : 0.0f;
  s.tau[threadIdx.x] = s.tau[kThreads + threadIdx.x] = 0.0;
  if (row_thread) {
    s.lx[threadIdx.x] = lxr;
    s.gx[threadIdx.x] = gxr;
    s.cx[threadIdx.x] = own_ok ? p.cx[h * p.lx_hs + gr] : 0.0f;
  }
  row_vote = 1;
  if (!one_exp) return 0.0f;
  const float shift = block_max_lse<kThreads / 32>(mine ? lxr : -INFINITY, reinterpret_cast<float*>(s.red));
  const float u = mine ? gxr * exp2_ftz((shift - lxr) * kLog2e) : 0.0f;
  row_vote = !mine || one_exp_ok(lxr, shift, gxr, u, it);
  if (row_thread) s.ux[threadIdx.x] = u * it;
  return shift;
}

// A column tile's start in the backward fragment kernels: its column statistics (threads
// < BN, one per column) and their vote, then the wait for this tile's Y (the next one
// stays in flight) and a barrier. Returns whether the tile takes the one-exponential
// form: every row and column in its window, statistics on both sides, no masked pair.
template <int kThreads>
__device__ __forceinline__ bool bwd_tile_stats(const Pass& p, const BwdStats<kThreads>& s, int64_t h,
                                               int64_t row0, int64_t col0, float it, float shift,
                                               bool one_exp, int row_vote) {
  int vote = row_vote;
  if (kThreads == BN || threadIdx.x < BN) {  // folds for one thread per column
    const int64_t gk = col0 + threadIdx.x;
    const bool ok = p.ly != nullptr && gk < p.cols;
    const float lk = ok ? p.ly[h * p.ly_hs + gk] : 0.0f, gv = ok ? p.gy[h * p.ly_hs + gk] : 0.0f;
    s.ly[threadIdx.x] = lk;
    s.gy[threadIdx.x] = gv;
    if (one_exp) {
      const float v = ok ? gv * exp2_ftz((shift - lk) * kLog2e) : 0.0f;
      s.vy[threadIdx.x] = v * it;
      vote = vote && (!ok || one_exp_ok(lk, shift, gv, v, it));
    }
  }
  __pipeline_wait_prior(1);
  const bool all_ok = __syncthreads_and(vote);  // everyone's copies and statistics are in
#if defined(MIMAC_COST_FORM)
  const bool fast_tile = MIMAC_COST_FORM == 1;
  (void)all_ok, (void)row0;
#else
  const bool fast_tile = all_ok && one_exp && !tile_has_mask(p, row0, col0);
#endif
#if defined(MIMAC_CUDA_EMULATION)
  if (threadIdx.x == 0) ::mimac_emu::tally(fast_tile ? "bwd_tiles_one_exp" : "bwd_tiles_two_exp");
#endif
  return fast_tile;
}

// The end of a backward fragment kernel: this warp's dX accumulators (rows r0.., D
// columns dout0..) straight to the gradient rows, two 8-byte stores per fragment; then,
// with want_tau, the CTA's temperature sum, one atomicAdd.
template <int kThreads>
__device__ __forceinline__ void bwd_finish(const Pass& p, const BwdStats<kThreads>& s, int64_t h, int64_t r0,
                                           int dout0, const float (&accd)[RMI][DO / 8][4], bool want_tau,
                                           float it) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = 2 * (lane & 3);
#pragma unroll
  for (int mi = 0; mi < RMI; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int64_t gi = r0 + mi * 16 + hf * 8 + g;
      if (gi >= p.rows) continue;
      float* dst = gi < p.out_split ? p.out0 + h * p.out_hs + gi * p.d
                                    : p.out1 + h * p.out_hs + (gi - p.out_split) * p.d;
#pragma unroll
      for (int nj = 0; nj < DO / 8; ++nj) {
        const int gd = dout0 + nj * 8 + tc;  // D is a whole number of 16-byte vectors: gd + 1 < d
        if (gd < p.d) *reinterpret_cast<float2*>(dst + gd) = make_float2(accd[mi][nj][2 * hf], accd[mi][nj][2 * hf + 1]);
      }
    }
  }
  if (!want_tau) return;
  double t = s.tau[threadIdx.x] + s.tau[kThreads + threadIdx.x] / it;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
  __syncthreads();  // the scratch held the shift
  if (lane == 0) s.red[threadIdx.x / 32] = t;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += s.red[w];
    atomicAdd(p.grad_tau, static_cast<float>(total));
  }
}

// What element_v reads: the statistics of the CTA's rows (lse, g, centre, one-exponential
// factor) and of the tile's columns (lse, g, factor) in shared memory (BwdStats), and the
// scalars: 1/tau, the one-exponential shift c, eps; which sides carry statistics.
struct ElementStats {
  const float *lx, *gx, *cx, *ux, *ly, *gy, *vy;
  float it, it_log2e, shift_log2e, eps;
  bool x_side, y_side;
  template <int kThreads>
  __device__ ElementStats(const BwdStats<kThreads>& s, const Pass& p, float inv_tau, float shift)
      : lx(s.lx), gx(s.gx), cx(s.cx), ux(s.ux), ly(s.ly), gy(s.gy), vy(s.vy), it(inv_tau),
        it_log2e(inv_tau * kLog2e), shift_log2e(shift * kLog2e), eps(p.eps), x_side(p.lx != nullptr),
        y_side(p.ly != nullptr) {}
};

// V of one score element (dL/d(dot); in the one-exponential form times 1/tau already)
// of tile row r and tile column c, adding its temperature term to `tau` (one-exponential
// tiles: times 1/tau, divided out once at the end); masked: the pair is left out (the
// exact form only: a one-exponential tile has no masked pair).
template <int kCritic, bool kOne, int kTau>
__device__ __forceinline__ float element_v(float dot, const ElementStats& st, int r, int c, bool masked,
                                           float& tau) {
  const float s = raw_score<kCritic>(dot, st.eps);
  float w, u;
  if constexpr (kOne) {
    // e^(S - c) as 2^(s it log2(e) - c log2(e)): one FFMA for the exponent
    const float ex = exp2_ftz(fmaf(s, st.it_log2e, -st.shift_log2e));
    w = ex * st.ux[r];
    u = fmaf(ex, st.vy[c], w);
  } else {
    const float sn = s * st.it;
    w = st.x_side ? st.gx[r] * exp2_ftz((sn - st.lx[r]) * kLog2e) : 0.0f;
    u = w + (st.y_side ? st.gy[c] * exp2_ftz((sn - st.ly[c]) * kLog2e) : 0.0f);
    if (masked) u = w = 0.0f;
  }
  if constexpr (kTau != 0) tau += w * (s - st.cx[r]);
  float v = kOne ? u : u * st.it;
  if (kCritic == MIMAC_LOG_DOT) v = dot > st.eps ? v / dot : 0.0f;
  return v;
}

// Two V values as bf16 hi + lo registers of an mma.sync A fragment (the first in the low
// half). kFinite: neither can be infinite or NaN (else no remainder: hi carries it, and
// inf - inf would be NaN).
template <bool kFinite>
__device__ __forceinline__ void split_v(float v0, float v1, unsigned& hi_reg, unsigned& lo_reg) {
  const __nv_bfloat162 hi = __floats2bfloat162_rn(v0, v1);
  const float rest0 = kFinite || fabsf(v0) < INFINITY ? v0 - __low2float(hi) : 0.0f;
  const float rest1 = kFinite || fabsf(v1) < INFINITY ? v1 - __high2float(hi) : 0.0f;
  hi_reg = pack_bf16x2(hi);
  lo_reg = pack_bf16x2(__floats2bfloat162_rn(rest0, rest1));
}

// bf16 inputs: dX (one DO slice, grid.y) of the CTA's rows; kTau: Pass::tau_mode.
template <typename T, int kCritic, int kTau>
__global__ void __launch_bounds__(RNT, 1) lse_backward_frag_kernel(Pass p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(std::is_same<T, __nv_bfloat16>::value, "V and Y meet in bf16");
  extern __shared__ __align__(128) unsigned char smem[];
  const int ld = static_cast<int>(x_ld<T>(p.d)), width = static_cast<int>(x_cols<T>(p.d));
  const BwdStats<RNT> ss(smem);
  T* xs = reinterpret_cast<T*>(smem + kFragStats);
  T* ys = reinterpret_cast<T*>(smem + kFragStats + x_bytes<T>(p.d));
  const int ytile = static_cast<int>(y_tile_bytes<T>(p.d) / sizeof(T));

  const int64_t h = blockIdx.z, row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int dout0 = static_cast<int>(blockIdx.y) * DO;
  const Ops<T> op = head_operands<T>(p, h);
  frag_start("frag_bwd_ctas", xs, ys, ld, op, row0, p.d, width);
  const float it = *p.inv_tau;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, tc = 2 * (lane & 3);
  const bool one_exp = p.lx != nullptr && p.ly != nullptr;  // statistics on both sides
  int row_vote;
  const float shift = bwd_row_stats(p, ss, h, row0, it, one_exp, row_vote);
  const ElementStats st(ss, p, it, shift);

  const T* xa = xs + (warp * 32 + (lane & 15)) * ld + (lane >> 4) * 8;
  const int yoff = ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8;
  // dX += V Y: lane l's ldmatrix.trans row address in the [k][n] Y tile, k = tile column
  // l % 16, n = D column 8 (l / 16): matrices b[0], b[1] of two adjacent n8 blocks.
  const int yt = (lane & 15) * ld + dout0 + (lane >> 4) * 8;
  float accd[RMI][DO / 8][4];
#pragma unroll
  for (int mi = 0; mi < RMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < DO / 8; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) accd[mi][nj][e] = 0.0f;
  const bool want_tau = kTau != 0 && blockIdx.y == 0;  // count each pair once

  T* yb = ys;               // this tile's Y
  T* yn = ys + ytile;       // the next one's
  for (int64_t col0 = 0; col0 < p.cols; col0 += BN) {
    __syncthreads();  // the previous tile's readers of the other buffer and the statistics are done
    if (col0 + BN < p.cols) issue_rows(yn, ld, op.y, col0 + BN, p.d, width);
    __pipeline_commit();
    const bool fast_tile = bwd_tile_stats(p, ss, h, row0, col0, it, shift, one_exp, row_vote);
    // The tile in two halves of 32 columns: S of a half (32 registers), then its V into
    // dX; the whole tile's S besides the DO-wide dX accumulators would leave ptxas no room.
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      float acc[RMI][RNJ / 2][4];
      frag_scores<T, RNJ / 2>(acc, xa, yb + yoff + half * (BN / 2) * ld, ld, width);

      // V of the half's elements (m16 tile mi, n8 tile nj, accumulator slot 2 hf + e) as
      // the A fragments of dX's k-step kk, and the temperature terms (as
      // lse_backward_kernel's element pass).
      const auto pass = [&](auto one_tag) {
        constexpr bool kOne = decltype(one_tag)::value;
        float tau_tile = 0.0f;
#pragma unroll
        for (int kk = 0; kk < BN / 32; ++kk) {
          unsigned ah[RMI][4], al[RMI][4];
#pragma unroll
          for (int mi = 0; mi < RMI; ++mi) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // A register q: row half q % 2, n8 tile 2 kk + q / 2
              const int nj = 2 * kk + q / 2, hf = q & 1, r = warp * 32 + mi * 16 + hf * 8 + g;
              const int c = half * (BN / 2) + nj * 8 + tc;
              const int64_t gi = row0 + r;
              const TileMask mask = tile_mask(p, gi, col0, gi < p.rows);
              float vv[2];
#pragma unroll
              for (int e = 0; e < 2; ++e)
                vv[e] = element_v<kCritic, kOne, kTau>(acc[mi][nj][2 * hf + e], st, r, c + e,
                                                       mask.masked(c + e), tau_tile);
              split_v<kOne && kCritic != MIMAC_LOG_DOT>(vv[0], vv[1], ah[mi][q], al[mi][q]);
            }
          }
#pragma unroll
          for (int nb = 0; nb < DO / 16; ++nb) {
            if (dout0 + nb * 16 >= width) break;  // past D (zeros there): a uniform exit
            unsigned b[4];
            ldsm_x4<true>(b, yb + yt + (half * (BN / 2) + kk * 16) * ld + nb * 16);
#pragma unroll
            for (int mi = 0; mi < RMI; ++mi) {
#pragma unroll
              for (int hb = 0; hb < 2; ++hb) {
                // small terms first
                mma_16816<T>(accd[mi][2 * nb + hb], al[mi], b[2 * hb], b[2 * hb + 1]);
                mma_16816<T>(accd[mi][2 * nb + hb], ah[mi], b[2 * hb], b[2 * hb + 1]);
              }
            }
          }
        }
        if (want_tau) ss.tau[(kOne ? RNT : 0) + threadIdx.x] += tau_tile;
      };
      if (fast_tile) {
        pass(std::true_type{});
      } else {
        pass(std::false_type{});
      }
    }
    T* const was = yb;
    yb = yn;
    yn = was;
  }

  bwd_finish(p, ss, h, row0 + warp * 32, dout0, accd, want_tau, it);
#endif
}

// --- the wide backward: bf16 D = 512, the score tile once for all four D slices -------------
//
// lse_backward_frag_kernel recomputes a tile's S in each DO-wide output slice of D (4x at
// D = 512, each time over all of D). Here a CTA of 2 x 4 warps owns 64 rows and all of D:
// warp (rw, ds) = (warp % 2, warp / 2) accumulates dX of rows rw * 32.. in D slice ds * DO..
// (128 registers) and keeps its rows' X over that slice as A fragments in registers (64:
// X is staged once, into the second Y buffer's place, and not kept in shared memory).
// Each column tile goes in quarters of WQ = 16 columns:
//   1. every warp multiplies its X slice by the quarter's Y columns over the same D slice
//      (8 k-steps): a partial S of 32 x 16, stored to shared memory;
//   2. barrier; warp (rw, ds) adds the four partials of rows rw * 32.. for columns ds * 4..
//      of the quarter, one row per lane, and forms V there (element_v: both forms, the
//      temperature terms), stored as bf16 hi + lo into the V tile;
//   3. barrier; every warp loads its rows' V as the A fragments of one k16 step by
//      ldmatrix and adds V Y into its dX slice (Y's B fragments by ldmatrix.trans).
// Every score element is formed, exponentiated and weighted once (by one warp), S's
// tensor work is done once per tile, and per tile the warps read Y's fragments twice
// (S and dX), against four times each in the narrow kernel's four slices.
constexpr int WS = 4;            // D slices of the wide backward (its warp columns)
constexpr int WNT = RNT * WS;    // its threads: 2 x 4 warps
constexpr int WQ = 16;           // columns per quarter tile
constexpr int LDP = 20;          // partial S row stride (floats): conflict-free float4 reads
constexpr int LDW = 24;          // V tile row stride (bf16): 48-byte rows for ldmatrix
static_assert(BN % WQ == 0 && WQ == 4 * WS && 32 * LDP % 4 == 0, "4 columns per reducing lane");
// [statistics: columns lse, g, factor; rows lse, g, centre, factor; reduction scratch;
// per-thread temperature sums] [Y tile 0] [Y tile 1 (first X)] [partials] [V hi] [V lo]
constexpr size_t kWideStats = BwdStats<WNT>::kBytes;
constexpr size_t kWidePartials = 2 * WS * 32 * LDP * sizeof(float);
constexpr size_t kWideV = BM * LDW * 2;
static_assert(kWideStats % 128 == 0 && kWidePartials % 128 == 0 && kWideV % 128 == 0, "aligned regions");
template <typename T>
__host__ __device__ constexpr size_t bwd_wide_smem(int64_t d) {
  return kWideStats + 2 * y_tile_bytes<T>(d) + kWidePartials + 2 * kWideV;
}
// D takes the wide backward when its staged width is WS slices exactly (D in (448, 512]).
template <typename T>
__host__ __device__ constexpr bool wide_width(int64_t d) {
  return x_cols<T>(d) == WS * DO;
}

template <typename T, int kCritic, int kTau>
__global__ void __launch_bounds__(WNT, 1) lse_backward_wide_kernel(Pass p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(std::is_same<T, __nv_bfloat16>::value, "V and Y meet in bf16");
  extern __shared__ __align__(128) unsigned char smem[];
  // the staged width is WS * DO (wide_width): strides and offsets are constants
  constexpr int ld = static_cast<int>(x_ld<T>(WS * DO)), width = WS * DO;
  constexpr int ytile = static_cast<int>(y_tile_bytes<T>(WS * DO) / sizeof(T));
  constexpr size_t kTail = kWideStats + 2 * y_tile_bytes<T>(WS * DO);
  const BwdStats<WNT> ss(smem);
  T* ys = reinterpret_cast<T*>(smem + kWideStats);
  float* part = reinterpret_cast<float*>(smem + kTail);
  T* v_hi = reinterpret_cast<T*>(smem + kTail + kWidePartials);
  T* v_lo = v_hi + kWideV / sizeof(T);

  const int64_t h = blockIdx.z, row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const Ops<T> op = head_operands<T>(p, h);
  frag_start<T, WNT>("wide_bwd_ctas", ys + ytile, ys, ld, op, row0, p.d, width);  // X: 2nd buffer
  const float it = *p.inv_tau;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, tc = 2 * (lane & 3);
  const int rw = warp & 1, ds = warp >> 1, dout0 = ds * DO;
  const bool one_exp = p.lx != nullptr && p.ly != nullptr;  // statistics on both sides
  int row_vote;
  const float shift = bwd_row_stats(p, ss, h, row0, it, one_exp, row_vote);
  const ElementStats st(ss, p, it, shift);

  __pipeline_wait_prior(0);
  __syncthreads();  // X and the first Y tile in, from every thread
  // This warp's X block as A fragments: rows rw * 32 + mi * 16.., D dout0 + 16 ks..
  unsigned fa[RMI][DO / 16][4];
  {
    const T* xa = ys + ytile + (rw * 32 + (lane & 15)) * ld + dout0 + (lane >> 4) * 8;
#pragma unroll
    for (int mi = 0; mi < RMI; ++mi)
#pragma unroll
      for (int ks = 0; ks < DO / 16; ++ks) ldsm_x4<false>(fa[mi][ks], xa + mi * 16 * ld + ks * 16);
  }
  float accd[RMI][DO / 8][4];
#pragma unroll
  for (int mi = 0; mi < RMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < DO / 8; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) accd[mi][nj][e] = 0.0f;
  const int yoff = ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8 + dout0;  // S's B
  const int yt = (lane & 15) * ld + dout0 + (lane >> 4) * 8;                           // dX's B
  const int rr = rw * 32 + lane;  // the row this lane reduces
  const int64_t gi = row0 + rr;

  int buf = 0;  // this tile's Y buffer; the other holds the next tile (X at first)
  for (int64_t col0 = 0; col0 < p.cols; col0 += BN, buf ^= 1) {
    __syncthreads();  // the other buffer's readers (X's, at first) and the statistics are done
    if (col0 + BN < p.cols) issue_rows<T, WNT>(ys + (buf ^ 1) * ytile, ld, op.y, col0 + BN, p.d, width);
    const T* yb = ys + buf * ytile;
    __pipeline_commit();
    const bool fast_tile = bwd_tile_stats(p, ss, h, row0, col0, it, shift, one_exp, row_vote);
    const TileMask mask = tile_mask(p, gi, col0, gi < p.rows);
#pragma unroll 1
    for (int qt = 0; qt < BN / WQ; ++qt) {
      // 1. the partial S of this warp's rows and D slice, the quarter's 16 columns
      {
        float acc[RMI][2][4];
#pragma unroll
        for (int mi = 0; mi < RMI; ++mi)
#pragma unroll
          for (int nj = 0; nj < 2; ++nj)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.0f;
        const T* yq = yb + yoff + qt * WQ * ld;
#pragma unroll
        for (int ks = 0; ks < DO / 16; ++ks) {
          unsigned fb[4];
          ldsm_x4<false>(fb, yq + ks * 16);
#pragma unroll
          for (int mi = 0; mi < RMI; ++mi) {
            mma_16816<T>(acc[mi][0], fa[mi][ks], fb[0], fb[1]);
            mma_16816<T>(acc[mi][1], fa[mi][ks], fb[2], fb[3]);
          }
        }
#pragma unroll
        for (int mi = 0; mi < RMI; ++mi)
#pragma unroll
          for (int nj = 0; nj < 2; ++nj)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
              *reinterpret_cast<float2*>(part + (warp * 32 + mi * 16 + hf * 8 + g) * LDP + nj * 8 + tc) =
                  make_float2(acc[mi][nj][2 * hf], acc[mi][nj][2 * hf + 1]);
      }
      __syncthreads();  // every partial in
      // 2. row rr, tile columns c0..c0 + 3: S from the four slices' partials, then V
      {
        const int c0 = qt * WQ + ds * 4;
        float sv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < WS; ++k) {
          const float4 q = *reinterpret_cast<const float4*>(part + ((2 * k + rw) * 32 + lane) * LDP + ds * 4);
          sv[0] += q.x, sv[1] += q.y, sv[2] += q.z, sv[3] += q.w;
        }
        const auto pass = [&](auto one_tag) {
          constexpr bool kOne = decltype(one_tag)::value;
          float tau_tile = 0.0f;
          // a pair of columns at a time: fewer registers live beside dX and X
#pragma unroll 1
          for (int pr = 0; pr < 2; ++pr) {
            const int c = c0 + 2 * pr;
            const float v0 = element_v<kCritic, kOne, kTau>(pr ? sv[2] : sv[0], st, rr, c, mask.masked(c), tau_tile);
            const float v1 = element_v<kCritic, kOne, kTau>(pr ? sv[3] : sv[1], st, rr, c + 1, mask.masked(c + 1),
                                                            tau_tile);
            unsigned hi, lo;
            split_v<kOne && kCritic != MIMAC_LOG_DOT>(v0, v1, hi, lo);
            *reinterpret_cast<unsigned*>(v_hi + rr * LDW + c - qt * WQ) = hi;
            *reinterpret_cast<unsigned*>(v_lo + rr * LDW + c - qt * WQ) = lo;
          }
          if (kTau != 0) ss.tau[(kOne ? WNT : 0) + threadIdx.x] += tau_tile;
        };
        if (fast_tile) {
          pass(std::true_type{});
        } else {
          pass(std::false_type{});
        }
      }
      __syncthreads();  // the quarter's V in
      // 3. dX += V Y: V of this warp's rows as one k16 step's A fragments
      {
        unsigned ah[RMI][4], al[RMI][4];
#pragma unroll
        for (int mi = 0; mi < RMI; ++mi) {
          const int vr = (rw * 32 + mi * 16 + (lane & 15)) * LDW + (lane >> 4) * 8;
          ldsm_x4<false>(ah[mi], v_hi + vr);
          ldsm_x4<false>(al[mi], v_lo + vr);
        }
#pragma unroll
        for (int nb = 0; nb < DO / 16; ++nb) {
          unsigned b[4];
          ldsm_x4<true>(b, yb + yt + qt * WQ * ld + nb * 16);
#pragma unroll
          for (int mi = 0; mi < RMI; ++mi) {
#pragma unroll
            for (int hb = 0; hb < 2; ++hb) {
              mma_16816<T>(accd[mi][2 * nb + hb], al[mi], b[2 * hb], b[2 * hb + 1]);  // small first
              mma_16816<T>(accd[mi][2 * nb + hb], ah[mi], b[2 * hb], b[2 * hb + 1]);
            }
          }
        }
      }
    }
  }

  bwd_finish(p, ss, h, row0 + rw * 32, dout0, accd, kTau != 0, it);
#endif
}

// --- launchers -------------------------------------------------------------------------------

// A failed runtime call also stays behind as the thread's "last error", which the
// next cudaGetLastError() reports, ours or torch's; the launchers return their
// error and clear it, so it fails this call only.
template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, const Pass& p, cudaStream_t stream,
                   int threads = NT) {
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return e;
    }
  }
  // cudaLaunchKernel rather than <<<>>>: plain C++, so csrc/emulation runs this file on a CPU.
  void* args[] = {const_cast<Pass*>(&p)};
  const cudaError_t e = cudaLaunchKernel(kernel, grid, dim3(threads), args, smem, stream);
  const cudaError_t last = cudaGetLastError();
  return e != cudaSuccess ? e : last;
}

dim3 grid_for(const Pass& p, int64_t heads, int64_t slices) {
  return dim3(static_cast<unsigned>((p.rows + BM - 1) / BM), static_cast<unsigned>(slices),
              static_cast<unsigned>(heads));
}

// The current device's opt-in shared memory per block: 163 KiB on sm_80/sm_87, 227 KiB
// on sm_90, but 99 KiB on sm_86/sm_89, where the fast path's largest layouts do not fit.
size_t device_smem_optin() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;  // unknown: the general path (52 KiB at most) runs everywhere
  }
  return static_cast<size_t>(bytes);
}

// The fast path's preconditions: whole 16-byte vectors per row (D a multiple of
// vec_elems<T>(), every operand 16-byte aligned; head strides N * D keep that), the
// resident X within kXResidentMax and the kernel's shared memory `smem` within the
// device's. Anything else runs the general path.
template <typename T>
bool fast_path(const Pass& p, size_t smem) {
  const auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.d % vec_elems<T>() == 0 && x_bytes<T>(p.d) <= kXResidentMax && aligned(p.x0) &&
         aligned(p.x1) && aligned(p.y0) && aligned(p.y1) && smem <= device_smem_optin();
}

template <typename T, int kCritic>
cudaError_t forward_as(const Pass& p, dim3 grid, cudaStream_t s) {
  if constexpr (sizeof(T) == 2) {
    if (fast_path<T>(p, fwd_frag_smem<T>(p.d)))
      return launch(lse_forward_frag_kernel<T, kCritic>, grid, fwd_frag_smem<T>(p.d), p, s, RNT);
  }
  if (fast_path<T>(p, fwd_smem<T, true>(p.d)))
    return launch(lse_forward_kernel<T, kCritic, true>, grid, fwd_smem<T, true>(p.d), p, s);
  return launch(lse_forward_kernel<T, kCritic, false>, grid, fwd_smem<T, false>(p.d), p, s);
}

template <typename T>
cudaError_t forward_pass(const Pass& p, int critic, int64_t heads, cudaStream_t s) {
  const dim3 grid = grid_for(p, heads, 1);
  if (critic == MIMAC_LOG_DOT) return forward_as<T, MIMAC_LOG_DOT>(p, grid, s);
  return forward_as<T, MIMAC_DOT>(p, grid, s);  // cosine == dot here
}

template <typename T, int kCritic>
cudaError_t backward_as(const Pass& p, dim3 grid, cudaStream_t s) {
  constexpr bool kSplit = sizeof(T) == 4;  // float32: 3xTF32 for dX += V Y too
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const size_t wide = bwd_wide_smem<T>(p.d);
    if (wide_width<T>(p.d) && fast_path<T>(p, wide)) {
      const dim3 rows(grid.x, 1, grid.z);  // one CTA per row block: all of D
      if (p.tau_mode == 1) return launch(lse_backward_wide_kernel<T, kCritic, 1>, rows, wide, p, s, WNT);
      return launch(lse_backward_wide_kernel<T, kCritic, 0>, rows, wide, p, s, WNT);
    }
    const size_t smem = bwd_frag_smem<T>(p.d);
    if (fast_path<T>(p, smem)) {
      if (p.tau_mode == 1) return launch(lse_backward_frag_kernel<T, kCritic, 1>, grid, smem, p, s, RNT);
      return launch(lse_backward_frag_kernel<T, kCritic, 0>, grid, smem, p, s, RNT);
    }
  }
  if (fast_path<T>(p, bwd_smem<T, true>(p.d)))
    return launch(lse_backward_kernel<T, kCritic, kSplit, true>, grid, bwd_smem<T, true>(p.d), p, s);
  return launch(lse_backward_kernel<T, kCritic, kSplit, false>, grid, bwd_smem<T, false>(p.d), p, s);
}

template <typename T>
cudaError_t backward_pass(const Pass& p, int critic, int64_t heads, cudaStream_t s) {
  const dim3 grid = grid_for(p, heads, (p.d + DO - 1) / DO);
  if (critic == MIMAC_LOG_DOT) return backward_as<T, MIMAC_LOG_DOT>(p, grid, s);
  return backward_as<T, MIMAC_DOT>(p, grid, s);
}

template <typename F>
cudaError_t by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case MIMAC_F32: return f(float{});
    case MIMAC_F16: return f(__half{});
    case MIMAC_BF16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

bool bad_sizes(int64_t heads, int64_t n, int64_t d, int critic) {
  return heads <= 0 || heads > 65535 || n <= 0 || d <= 0 || 2 * n / BM >= (int64_t{1} << 31) ||
         (critic != MIMAC_DOT && critic != MIMAC_COSINE && critic != MIMAC_LOG_DOT);
}

Pass base_pass(const void* a, const void* b, const float* inv_tau, int64_t n, int64_t d, float eps, bool all) {
  Pass p{};
  p.inv_tau = inv_tau;
  p.eps = eps;
  p.d = d;
  p.x_hs = p.y_hs = p.out_hs = n * d;
  if (all) {  // rows and columns are Z = [a; b]
    p.x0 = p.y0 = a;
    p.x1 = p.y1 = b;
    p.x_split = p.y_split = n;
    p.rows = p.cols = 2 * n;
    p.diag = 1;
  } else {  // rows a, columns b
    p.x0 = a;
    p.y0 = b;
    p.x_split = p.y_split = n;
    p.rows = p.cols = n;
  }
  return p;
}

template <typename V>
void swap_values(V& a, V& b) {
  const V t = a;
  a = b;
  b = t;
}

Pass swapped(Pass p) {  // rows and columns exchanged (cross: rows b, columns a)
  swap_values(p.x0, p.y0);
  swap_values(p.x1, p.y1);
  swap_values(p.x_split, p.y_split);
  swap_values(p.rows, p.cols);
  swap_values(p.x_hs, p.y_hs);
  p.diag_offset = -p.diag_offset;  // col == row + o  <=>  row == col - o
  return p;
}

// The rectangular problem: rows x (H, r, D) against columns y (H, c, D), row i
// skipping column i + offset when skip is set.
Pass rect_pass(const void* x, const void* y, const float* inv_tau, int64_t r, int64_t c, int64_t d,
               float eps, int skip, int64_t offset) {
  Pass p{};
  p.inv_tau = inv_tau;
  p.eps = eps;
  p.d = d;
  p.x0 = x;
  p.y0 = y;
  p.x_split = r;
  p.y_split = c;
  p.rows = r;
  p.cols = c;
  p.x_hs = r * d;
  p.y_hs = c * d;
  p.diag = skip != 0;
  p.diag_offset = offset;
  return p;
}

bool bad_rect_sizes(int64_t heads, int64_t r, int64_t c, int64_t d, int critic) {
  return bad_sizes(heads, r, d, critic) || bad_sizes(heads, c, d, critic);
}

// Whether cross's forward takes one pass: a shift given, 16-bit inputs on the fragment
// kernels' fast path.
template <typename T>
bool one_pass(const Pass& p) {
  return sizeof(T) == 2 && p.shift != nullptr && !p.diag && fast_path<T>(p, fwd_frag_smem<T>(p.d));
}

// cross in one pass (one_pass): the sums of both sides by lse_cross_frag_kernel, then
// each side finished, or re-swept block by block, by lse_forward_frag_kernel.
template <typename T, int kCritic>
cudaError_t cross_one_pass_as(Pass p, float* col_lse, int64_t heads, cudaStream_t s) {
  if constexpr (sizeof(T) == 2) {
    const size_t smem = fwd_frag_smem<T>(p.d);
    const dim3 grid = grid_for(p, heads, 1);
    cudaError_t e = cudaMemsetAsync(col_lse, 0, static_cast<size_t>(heads * p.cols) * sizeof(float), s);
    if (e != cudaSuccess) return e;
    p.col_sum = col_lse;
    e = launch(lse_cross_frag_kernel<T, kCritic>, grid, smem, p, s, RNT);
    if (e != cudaSuccess) return e;
    e = launch(lse_forward_frag_kernel<T, kCritic>, grid, smem, p, s, RNT);
    if (e != cudaSuccess) return e;
    Pass q = swapped(p);
    q.lse = col_lse;
    q.lse_hs = q.rows;
    return launch(lse_forward_frag_kernel<T, kCritic>, grid_for(q, heads, 1), smem, q, s, RNT);
  }
  (void)p, (void)col_lse, (void)heads, (void)s;
  return cudaErrorInvalidValue;  // no fragment kernels for float32 (one_pass is false)
}

}  // namespace

extern "C" cudaError_t mimac_lse_forward(int dtype, const void* a, const void* b, const float* inv_tau,
                                         int64_t heads, int64_t n, int64_t d, int critic, int all,
                                         float eps, float* row_lse, float* col_lse,
                                         const float* shift, cudaStream_t stream) {
  if (bad_sizes(heads, n, d, critic)) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    Pass p = base_pass(a, b, inv_tau, n, d, eps, all != 0);
    p.lse = row_lse;
    p.lse_hs = p.rows;
    if (!all) {
      Pass one = p;
      one.shift = shift;
      if (one_pass<T>(one)) {
        return critic == MIMAC_LOG_DOT ? cross_one_pass_as<T, MIMAC_LOG_DOT>(one, col_lse, heads, stream)
                                       : cross_one_pass_as<T, MIMAC_DOT>(one, col_lse, heads, stream);
      }
    }
    cudaError_t e = forward_pass<T>(p, critic, heads, stream);
    if (e != cudaSuccess || all) return e;
    Pass q = swapped(p);
    q.lse = col_lse;
    return forward_pass<T>(q, critic, heads, stream);
  });
}

extern "C" cudaError_t mimac_lse_backward(int dtype, const void* a, const void* b,
                                          const float* inv_tau, int64_t heads, int64_t n, int64_t d,
                                          int critic, int all, float eps, const float* row_lse,
                                          const float* col_lse, const float* g_row,
                                          const float* g_col, const float* row_center,
                                          const float* col_center, float* grad_a, float* grad_b,
                                          float* grad_inv_tau, cudaStream_t stream) {
  if (bad_sizes(heads, n, d, critic)) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    Pass p = base_pass(a, b, inv_tau, n, d, eps, all != 0);
    p.grad_tau = grad_inv_tau;
    if (all) {
      // u_ik = g_i P_ik + g_k P_ki; the sweep over all k of row i visits each
      // ordered pair once as (i, k), so the temperature takes the row side only.
      p.lx = p.ly = row_lse;
      p.gx = p.gy = g_row;
      p.cx = row_center;
      p.lx_hs = p.ly_hs = 2 * n;
      p.out0 = grad_a;
      p.out1 = grad_b;
      p.out_split = n;
      p.tau_mode = 1;
      return backward_pass<T>(p, critic, heads, stream);
    }
    // rows a: u_ij = g_row_i P^row_ij + g_col_j P^col_ij, all of it into the temperature
    p.lx = row_lse;
    p.gx = g_row;
    p.cx = row_center;
    p.ly = col_lse;
    p.gy = g_col;
    p.lx_hs = p.ly_hs = n;
    p.out0 = p.out1 = grad_a;
    p.out_split = n;
    p.tau_mode = 1;
    cudaError_t e = backward_pass<T>(p, critic, heads, stream);
    if (e != cudaSuccess) return e;
    // rows b (S transposed): the same u, roles swapped; the temperature's column side
    // is this pass's row side
    Pass q = swapped(p);
    q.lx = col_lse;
    q.gx = g_col;
    q.cx = col_center;
    q.ly = row_lse;
    q.gy = g_row;
    q.out0 = q.out1 = grad_b;
    q.tau_mode = 1;
    return backward_pass<T>(q, critic, heads, stream);
  });
}

extern "C" cudaError_t mimac_rect_forward(int dtype, const void* x, const void* y,
                                          const float* inv_tau, int64_t heads, int64_t r,
                                          int64_t c, int64_t d, int critic, int skip,
                                          int64_t offset, float eps, float* lse,
                                          cudaStream_t stream) {
  if (bad_rect_sizes(heads, r, c, d, critic)) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    Pass p = rect_pass(x, y, inv_tau, r, c, d, eps, skip, offset);
    p.lse = lse;
    p.lse_hs = r;
    return forward_pass<T>(p, critic, heads, stream);
  });
}

extern "C" cudaError_t mimac_rect_backward(int dtype, const void* x, const void* y,
                                           const float* inv_tau, int64_t heads, int64_t r,
                                           int64_t c, int64_t d, int critic, int skip,
                                           int64_t offset, float eps, const float* lse,
                                           const float* g, const float* center, float* grad_x,
                                           float* grad_y, float* grad_inv_tau,
                                           cudaStream_t stream) {
  if (bad_rect_sizes(heads, r, c, d, critic)) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    // rows x: u_ik = g_i P_ik, the columns carry no statistics; the temperature sum
    // is all here (row side, centred on the rows' centres)
    Pass p = rect_pass(x, y, inv_tau, r, c, d, eps, skip, offset);
    p.grad_tau = grad_inv_tau;
    p.lx = lse;
    p.gx = g;
    p.cx = center;
    p.lx_hs = r;
    p.out0 = p.out1 = grad_x;
    p.out_split = r;
    p.out_hs = r * d;
    p.tau_mode = 1;
    cudaError_t e = backward_pass<T>(p, critic, heads, stream);
    if (e != cudaSuccess || grad_y == nullptr) return e;  // null: the columns' not asked for
    // rows y (S transposed): the same u, seen from the column side
    Pass q = swapped(p);
    q.lx = q.gx = q.cx = nullptr;
    q.lx_hs = 0;
    q.ly = lse;
    q.gy = g;
    q.ly_hs = r;
    q.out0 = q.out1 = grad_y;
    q.out_split = c;
    q.out_hs = c * d;
    q.tau_mode = 0;
    return backward_pass<T>(q, critic, heads, stream);
  });
}
