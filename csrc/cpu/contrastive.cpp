// Fused CPU kernel of the contrastive loss: row (and column) log-sum-exp of
// S = inv_tau * s(x_i, y_k) and its gradient, never storing S.
//
// Contract: mimac_kernels/dispatch.py. Design (losses.md, "Work saved by
// symmetry"): rows are cut into blocks of kBlock; a tile is a pair of blocks.
// For "all" the matrix is symmetric, so each unordered tile pair {I, K} is
// computed once and feeds row block I and row block K (forward: exp-sums of
// both; backward: G_ik + G_ki), i.e. half the dot products and exps of the
// plain design. For "cross" one tile feeds the row sums of A and the column
// sums of B. Backward recomputes tiles from the saved log-sum-exps. The
// rectangular problem of the losses across ranks (rows X against columns Y of
// another length, row i skipping column i + offset) runs the same tiles with
// the row statistics only: its backward adds V Y to dX and V^T X to dY in one
// sweep.
//
// Threads: tiles are scheduled in rounds in which no two tiles touch the same
// row block (a round-robin tournament over groups of up to 4 blocks, whose
// tiles one thread runs back to back while their blocks sit in its L2), so
// every thread writes its row and column statistics and gradients in place: no
// atomics, no private copies to merge, and a result that does not depend on
// the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mimac_cpu {

constexpr int kBlock = 64;  // rows per block: X, Y, YT and the tile stay in L2
constexpr int kDot = 0, kCosine = 1, kLogDot = 2;  // critic ids (cpu_backend.CRITIC_IDS)
// A common exp shift t serves a whole tile only if every row and column max is
// within this many natural-log units of t (so no row's sum underflows).
constexpr float kShiftSlack = 40.0f;

struct TileArgs {
  const float* x;   // X block, kBlock rows, stride ldx (padded, zero past D)
  const float* y;   // Y block, same layout
  const float* yt;  // Y block transposed: d rows of kBlock floats
  int ldx, d, dp;   // row stride, real D, padded D (multiple of 16)
  int nx, ny;       // valid rows of X and of Y
  bool rows_only;   // row statistics only (the diagonal tile of "all", the rectangular problem)
  bool mask;        // leave out the pairs k == i + mask_shift (tile-local indices)
  int mask_shift;
  // Labelled rectangular problem (null: none): int32 class ids of the tile's X rows and
  // of its Y columns (kBlock each, padded); a pair of one id is left out like the mask.
  const int *rl, *cl;
  int critic;
  float inv_tau, eps;
  // forward: running (max, sum) of the X rows and of the Y rows
  float *xm, *xs, *ym, *ys;
  // backward: log-sum-exp, incoming gradient and temperature centre (raw positive
  // score, see mimac_kernels/ops.py) of the X and Y rows; outputs
  const float *lx, *gx, *ly, *gy, *cx, *cy;
  float *dx, *dy;
};

// Per-thread tile buffers (64-byte aligned for the vector loads).
struct Scratch {
  float *tile, *tile2, *colv, *colv2, *rowv;
  float* base;
  Scratch() {
    const size_t n = 2 * kBlock * kBlock + 3 * kBlock;
    base = static_cast<float*>(::operator new[](n * sizeof(float), std::align_val_t(64)));
    tile = base;
    tile2 = tile + kBlock * kBlock;
    colv = tile2 + kBlock * kBlock;
    colv2 = colv + kBlock;
    rowv = colv2 + kBlock;
  }
  ~Scratch() { ::operator delete[](base, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Online log-sum-exp: fold a partial sum p taken with shift t into (m, s).
inline void lse_merge(float& m, float& s, float t, float p) {
  if (p == 0.0f) return;  // nothing (also every all-masked row); NaN passes
  if (t > m) {
    s = s * std::exp(m - t) + p;  // m = -inf on first use: exp gives 0
    m = t;
  } else {
    s += p * std::exp(t - m);  // NaN t or p makes s NaN, as it should
  }
}

// One copy of the tile kernels per instruction set; chosen at run time, so the
// cached binary runs on any x86-64 (no -march=native).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MIMAC_X86_MULTI 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi,bmi2")
namespace isa_avx512 {
#define MIMAC_VEC_BYTES 64
#include "tile_impl.h"
#undef MIMAC_VEC_BYTES
}  // namespace isa_avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
namespace isa_avx2 {
#define MIMAC_VEC_BYTES 32
#include "tile_impl.h"
#undef MIMAC_VEC_BYTES
}  // namespace isa_avx2
#pragma GCC pop_options
#endif
namespace isa_base {
#define MIMAC_VEC_BYTES 16
#include "tile_impl.h"
#undef MIMAC_VEC_BYTES
}  // namespace isa_base

struct Kernels {
  const char* name;
  void (*fwd)(const TileArgs&, Scratch&);
  double (*bwd)(const TileArgs&, Scratch&);
};

std::vector<Kernels> supported_kernels() {
  std::vector<Kernels> ks;
#ifdef MIMAC_X86_MULTI
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    ks.push_back({"avx512", isa_avx512::forward_tile, isa_avx512::backward_tile});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    ks.push_back({"avx2", isa_avx2::forward_tile, isa_avx2::backward_tile});
#endif
  ks.push_back({"base", isa_base::forward_tile, isa_base::backward_tile});
  return ks;  // best first
}

Kernels& active_kernels() {
  static Kernels k = supported_kernels().front();
  return k;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const auto& k : supported_kernels()) names.emplace_back(k.name);
  return names;
}

std::string get_isa() { return active_kernels().name; }

// Select the instruction set by name (tests and benchmarks compare them).
void set_isa(const std::string& name) {
  for (const auto& k : supported_kernels())
    if (name == k.name) {
      active_kernels() = k;
      return;
    }
  TORCH_CHECK(false, "instruction set '", name, "' is not supported on this CPU");
}

// ---------------------------------------------------------------------------
// Operands: padded copies so that the tile kernels need no bounds checks.

struct Operand {
  at::Tensor rows;  // (H, nb*kBlock, Dp): zero rows and columns in the padding
  at::Tensor trans; // (H, nb, D, kBlock): each block transposed (column operands only)
  int64_t n, nb;
};

int64_t padded_dim(int64_t d) { return (d + 15) / 16 * 16; }
int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// `columns`: the operand also serves as the tile's Y side, which the S micro-kernel
// reads transposed ("cross" needs that for b only, "all" for its one operand).
Operand make_operand(const at::Tensor& x /* (H, n, D) float32 */, bool columns) {
  const int64_t h = x.size(0), n = x.size(1), d = x.size(2);
  const int64_t nb = num_blocks(n);
  Operand op;
  op.n = n;
  op.nb = nb;
  op.rows = at::constant_pad_nd(x, {0, padded_dim(d) - d, 0, nb * kBlock - n}).contiguous();
  if (columns) op.trans = op.rows.narrow(2, 0, d).reshape({h, nb, kBlock, d}).transpose(2, 3).contiguous();
  return op;
}

at::Tensor pad_vec(const at::Tensor& v /* (H, n) */, int64_t rows) {
  return at::constant_pad_nd(v.to(at::kFloat), {0, rows - v.size(1)}).contiguous();
}

// A tile of the schedule: blocks (bx, by) of head h; diag when bx == by in "all".
struct Tile {
  int64_t h, bx, by;
};

// Round-robin schedule over groups of g consecutive blocks. "all": P = ng rounded
// up to odd; in round r group r takes its diagonal group tile and the others pair
// up as (r + j, r - j) mod P, so every unordered pair appears once and no group
// twice in a round. Otherwise (X and Y with ngx and ngy groups; "cross" has
// ngx == ngy): max(ngx, ngy) rounds of min(ngx, ngy) group tiles, round r pairing
// group j of the shorter side with group j + r (mod its length) of the longer.
// A thread runs the tiles of its group tile itself, in a fixed order: rows of
// group I against the blocks of group K (for a diagonal group of "all", the
// pairs i <= k), so the g X blocks, the g Y blocks and their gradient rows stay
// in its L2 for g tiles each instead of coming from memory for every tile.
struct Schedule {
  bool all;
  int64_t nb, nby, heads, g;  // X blocks, Y blocks (nby == nb for "all" and "cross")
  int64_t groups() const { return (nb + g - 1) / g; }
  int64_t groups_y() const { return (nby + g - 1) / g; }
  int64_t rounds() const { return all ? (groups() | 1) : std::max(groups(), groups_y()); }
  int64_t per_round() const {
    return heads * (all ? ((groups() | 1) + 1) / 2 : std::min(groups(), groups_y()));
  }
  // Group tile w of round r (group indices in bx, by); false if it is a bye.
  bool group_tile(int64_t r, int64_t w, Tile& t) const {
    const int64_t ng = groups(), per_head = per_round() / heads;
    t.h = w / per_head;
    const int64_t j = w % per_head;
    if (!all) {
      const int64_t ngy = groups_y();
      if (ng <= ngy) {
        t.bx = j;
        t.by = (j + r) % ngy;
      } else {
        t.by = j;
        t.bx = (j + r) % ng;
      }
      return true;
    }
    const int64_t p = ng | 1;
    t.bx = (r + j) % p;
    t.by = (r - j + p) % p;
    return t.bx < ng && t.by < ng;
  }
};

// Blocks per group when the caller has not set one (set_group): as many as keep
// the group tile's working set (X, Y, Y^T, dX, dY: 5 blocks of kBlock x Dp floats
// per block of the group) within kGroupBytes, at most 4, and fewer while that
// would leave under kMinGroups groups to spread over the threads (a round of
// "all" then still has 32 group tiles). Depends on the problem only, never on
// the thread count, so neither does the result. Measured on a 2-core EPYC
// (benchmarks/NOTES.md): at D = 512, groups of 4 (2.5 MiB) still beat 1 and 2,
// so the cap is set by the L3 share rather than the 1 MiB L2.
constexpr int64_t kGroupBytes = 4 * 1024 * 1024;
constexpr int64_t kMaxGroup = 4, kMinGroups = 64;
int64_t g_forced_group = 0;  // 0: automatic

int64_t group_size(int64_t nb, int64_t dp) {
  if (g_forced_group > 0) return g_forced_group;
  int64_t g = kGroupBytes / (5 * kBlock * dp * static_cast<int64_t>(sizeof(float)));
  g = std::max<int64_t>(1, std::min(g, kMaxGroup));
  while (g > 1 && (nb + g - 1) / g < kMinGroups) --g;
  return g;
}

void set_group(int64_t g) {
  TORCH_CHECK(g >= 0, "group must be >= 0 (0: automatic), got ", g);
  g_forced_group = g;
}

int64_t get_group(int64_t n_rows, int64_t d) {
  TORCH_CHECK(n_rows >= 0 && d >= 1, "group: expected n_rows >= 0 and d >= 1, got n_rows=", n_rows,
              ", d=", d);
  return group_size(num_blocks(n_rows), padded_dim(d));
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// Runs fn(tile, scratch) over the schedule, round by round; returns the sum of
// what fn returns (the temperature-gradient shares).
template <typename Fn>
double run_schedule(const Schedule& sched, Fn fn) {
  double tau = 0.0;
  const int64_t rounds = sched.rounds(), per_round = sched.per_round();
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads()) reduction(+ : tau)
#endif
  {
    Scratch sc;
    for (int64_t r = 0; r < rounds; ++r) {
      // The implicit barrier at the end of each round keeps rounds apart: group
      // tiles of one round touch disjoint row blocks, those of different rounds may not.
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t w = 0; w < per_round; ++w) {
        Tile gt;
        if (!sched.group_tile(r, w, gt)) continue;
        const int64_t i1 = std::min(sched.nb, (gt.bx + 1) * sched.g);
        const int64_t k1 = std::min(sched.nby, (gt.by + 1) * sched.g);
        const bool diag_group = sched.all && gt.bx == gt.by;
        for (int64_t i = gt.bx * sched.g; i < i1; ++i)
          for (int64_t k = diag_group ? i : gt.by * sched.g; k < k1; ++k)
            tau += fn(Tile{gt.h, i, k}, sc);
      }
    }
  }
  return tau;
}

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_tau, int64_t critic) {
  TORCH_CHECK(a.dim() == 3 && a.sizes() == b.sizes(), "a and b must be (H, N, D) of one shape");
  TORCH_CHECK(critic >= 0 && critic <= 2, "unknown critic id ", critic);
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && inv_tau.device().is_cpu(),
              "the cpu backend takes CPU tensors");
  for (const auto& t : {a, b})
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                    t.scalar_type() == at::kBFloat16,
                "the cpu backend takes float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(inv_tau.numel() == 1, "inv_tau must be a 0-dim tensor");
}

TileArgs base_args(const Operand& xo, const Operand& yo, const Tile& t, int64_t d, int critic,
                   float inv_tau, float eps, bool diag /* the diagonal tile of "all" */) {
  const int64_t dp = xo.rows.size(2), rp = xo.nb * kBlock;
  TileArgs a{};
  const float* xr = xo.rows.data_ptr<float>() + (t.h * rp + t.bx * kBlock) * dp;
  const float* yr = yo.rows.data_ptr<float>() + (t.h * yo.nb * kBlock + t.by * kBlock) * dp;
  a.x = xr;
  a.y = yr;
  a.yt = yo.trans.data_ptr<float>() + (t.h * yo.nb + t.by) * d * kBlock;
  a.ldx = static_cast<int>(dp);
  a.d = static_cast<int>(d);
  a.dp = static_cast<int>(dp);
  a.nx = static_cast<int>(std::min<int64_t>(kBlock, xo.n - t.bx * kBlock));
  a.ny = static_cast<int>(std::min<int64_t>(kBlock, yo.n - t.by * kBlock));
  a.rows_only = a.mask = diag;
  a.mask_shift = 0;
  a.critic = critic;
  a.inv_tau = inv_tau;
  a.eps = eps;
  return a;
}

float read_inv_tau(const at::Tensor& inv_tau) { return inv_tau.to(at::kFloat).item<float>(); }

// Two gradients and the temperature sum: the backward ops' `(Tensor, Tensor, Tensor)`.
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& a, const at::Tensor& b,
                                           const at::Tensor& inv_tau, int64_t critic, bool all,
                                           double eps) {
  check_inputs(a, b, inv_tau, critic);
  const int64_t h = a.size(0), n = a.size(1), d = a.size(2);
  const float it = read_inv_tau(inv_tau);
  const auto af = a.to(at::kFloat), bf = b.to(at::kFloat);
  const Operand xo = make_operand(all ? at::cat({af, bf}, 1) : af, /*columns=*/all);
  const Operand yo = all ? xo : make_operand(bf, /*columns=*/true);
  const int64_t rx = xo.nb * kBlock, ry = yo.nb * kBlock;
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto xm = at::full({h, rx}, -INFINITY, opts), xs = at::zeros({h, rx}, opts);
  auto ym = all ? xm : at::full({h, ry}, -INFINITY, opts);
  auto ys = all ? xs : at::zeros({h, ry}, opts);
  float *pxm = xm.data_ptr<float>(), *pxs = xs.data_ptr<float>();
  float *pym = ym.data_ptr<float>(), *pys = ys.data_ptr<float>();
  const Kernels k = active_kernels();
  const Schedule sched{all, xo.nb, yo.nb, h, group_size(xo.nb, xo.rows.size(2))};
  {
    run_schedule(sched, [&](const Tile& t, Scratch& sc) {
      const bool diag = all && t.bx == t.by;
      TileArgs ta = base_args(xo, yo, t, d, static_cast<int>(critic), it, static_cast<float>(eps), diag);
      ta.xm = pxm + t.h * rx + t.bx * kBlock;
      ta.xs = pxs + t.h * rx + t.bx * kBlock;
      ta.ym = pym + t.h * ry + t.by * kBlock;
      ta.ys = pys + t.h * ry + t.by * kBlock;
      k.fwd(ta, sc);
      return 0.0;
    });
  }
  auto lse = (xm + xs.log()).narrow(1, 0, xo.n).contiguous();
  if (all) return {lse, at::empty({h, 0}, opts)};
  return {lse, (ym + ys.log()).narrow(1, 0, n).contiguous()};
}

Grads3 backward(const at::Tensor& a, const at::Tensor& b, const at::Tensor& inv_tau,
                int64_t critic, bool all, double eps, const at::Tensor& row_lse,
                const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col,
                const at::Tensor& row_center, const at::Tensor& col_center) {
  check_inputs(a, b, inv_tau, critic);
  const int64_t h = a.size(0), n = a.size(1), d = a.size(2);
  // The statistics are read per head at fixed offsets: a wrong shape would read past them.
  const int64_t rows = all ? 2 * n : n, cols = all ? 0 : n;
  for (const auto* v : {&row_lse, &g_row, &row_center})
    TORCH_CHECK(v->dim() == 2 && v->size(0) == h && v->size(1) == rows,
                "row statistics must be (H, ", rows, "), got ", v->sizes());
  for (const auto* v : {&col_lse, &g_col, &col_center})
    TORCH_CHECK(v->dim() == 2 && v->size(0) == h && v->size(1) == cols,
                "column statistics must be (H, ", cols, "), got ", v->sizes());
  const float it = read_inv_tau(inv_tau);
  const auto af = a.to(at::kFloat), bf = b.to(at::kFloat);
  const Operand xo = make_operand(all ? at::cat({af, bf}, 1) : af, /*columns=*/all);
  const Operand yo = all ? xo : make_operand(bf, /*columns=*/true);
  const int64_t rx = xo.nb * kBlock, ry = yo.nb * kBlock, dp = xo.rows.size(2);
  // Padded rows get lse 0 and gradient 0: their weights vanish.
  const auto lx = pad_vec(row_lse, rx), gx = pad_vec(g_row, rx);
  const auto ly = all ? lx : pad_vec(col_lse, ry), gy = all ? gx : pad_vec(g_col, ry);
  const auto cx = pad_vec(row_center, rx), cy = all ? cx : pad_vec(col_center, ry);
  auto gxo = at::zeros({h, rx, dp}, at::kFloat);
  auto gyo = all ? gxo : at::zeros({h, ry, dp}, at::kFloat);
  const float *plx = lx.data_ptr<float>(), *pgx = gx.data_ptr<float>();
  const float *ply = ly.data_ptr<float>(), *pgy = gy.data_ptr<float>();
  const float *pcx = cx.data_ptr<float>(), *pcy = cy.data_ptr<float>();
  float *pdx = gxo.data_ptr<float>(), *pdy = gyo.data_ptr<float>();
  const Kernels k = active_kernels();
  const Schedule sched{all, xo.nb, yo.nb, h, group_size(xo.nb, xo.rows.size(2))};
  double tau;
  {
    tau = run_schedule(sched, [&](const Tile& t, Scratch& sc) {
      const bool diag = all && t.bx == t.by;
      TileArgs ta = base_args(xo, yo, t, d, static_cast<int>(critic), it, static_cast<float>(eps), diag);
      ta.lx = plx + t.h * rx + t.bx * kBlock;
      ta.gx = pgx + t.h * rx + t.bx * kBlock;
      ta.ly = ply + t.h * ry + t.by * kBlock;
      ta.gy = pgy + t.h * ry + t.by * kBlock;
      ta.cx = pcx + t.h * rx + t.bx * kBlock;
      ta.cy = pcy + t.h * ry + t.by * kBlock;
      ta.dx = pdx + (t.h * rx + t.bx * kBlock) * dp;
      ta.dy = pdy + (t.h * ry + t.by * kBlock) * dp;
      return k.bwd(ta, sc);
    });
  }
  // dS/ds = inv_tau: applied once here instead of per element, in place (no extra copy).
  gxo.mul_(it);
  if (!all) gyo.mul_(it);
  auto g_tau = at::scalar_tensor(static_cast<float>(tau), at::kFloat);
  const auto gz = gxo.narrow(2, 0, d), gw = gyo.narrow(2, 0, d);
  if (all) return {gz.narrow(1, 0, n).contiguous(), gz.narrow(1, n, n).contiguous(), g_tau};
  return {gz.narrow(1, 0, n).contiguous(), gw.narrow(1, 0, n).contiguous(), g_tau};
}

// ---------------------------------------------------------------------------
// The rectangular problem: rows x (H, R, D) against columns y (H, C, D), row i
// leaving out column i + offset when an offset is given and, with labels (int32 class
// ids, (R,) and (C,)), every column of its own id (PML's NTXent negatives).

void check_rect(const at::Tensor& x, const at::Tensor& y, const at::Tensor& inv_tau, int64_t critic) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(0) == y.size(0) && x.size(2) == y.size(2),
              "x and y must be (H, R, D) and (H, C, D), got ", x.sizes(), " and ", y.sizes());
  check_inputs(x, x, inv_tau, critic);
  check_inputs(y, y, inv_tau, critic);
}

// The tile's mask of the pairs col == row + offset, in tile-local indices.
void set_rect_mask(TileArgs& ta, const Tile& t, const std::optional<int64_t>& offset) {
  ta.rows_only = true;
  ta.mask = false;
  if (!offset) return;
  const int64_t shift = *offset + (t.bx - t.by) * kBlock;
  if (shift <= -kBlock || shift >= kBlock) return;  // no such pair in this tile
  ta.mask = true;
  ta.mask_shift = static_cast<int>(shift);
}

// Class ids padded to whole blocks (the tiles read a block's ids by vectors); an
// undefined tensor without labels.
at::Tensor pad_labels(const std::optional<at::Tensor>& labels, int64_t n, int64_t padded,
                      const char* name) {
  if (!labels) return at::Tensor();
  const at::Tensor& l = *labels;
  TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kInt && l.dim() == 1 && l.size(0) == n,
              name, " must be an int32 CPU tensor of shape (", n, "), got ", l.scalar_type(), " ",
              l.sizes());
  auto out = at::full({padded}, -1, at::TensorOptions().dtype(at::kInt));
  out.narrow(0, 0, n).copy_(l);
  return out;
}

// Points the tile's class ids at its blocks (left null without labels).
void set_rect_labels(TileArgs& ta, const Tile& t, const at::Tensor& rl, const at::Tensor& cl) {
  if (!rl.defined()) return;
  ta.rl = rl.data_ptr<int>() + t.bx * kBlock;
  ta.cl = cl.data_ptr<int>() + t.by * kBlock;
}

void check_labels_pair(const std::optional<at::Tensor>& rl, const std::optional<at::Tensor>& cl) {
  TORCH_CHECK(rl.has_value() == cl.has_value(),
              "row_labels and col_labels must be given together or not at all");
}

at::Tensor rect_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& inv_tau,
                        int64_t critic, std::optional<int64_t> offset, double eps,
                        const std::optional<at::Tensor>& row_labels,
                        const std::optional<at::Tensor>& col_labels) {
  check_rect(x, y, inv_tau, critic);
  check_labels_pair(row_labels, col_labels);
  const int64_t h = x.size(0), d = x.size(2);
  const float it = read_inv_tau(inv_tau);
  const Operand xo = make_operand(x.to(at::kFloat), /*columns=*/false);
  const Operand yo = make_operand(y.to(at::kFloat), /*columns=*/true);
  const int64_t rx = xo.nb * kBlock;
  const at::Tensor rl = pad_labels(row_labels, xo.n, rx, "row_labels");
  const at::Tensor cl = pad_labels(col_labels, yo.n, yo.nb * kBlock, "col_labels");
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto xm = at::full({h, rx}, -INFINITY, opts), xs = at::zeros({h, rx}, opts);
  float *pxm = xm.data_ptr<float>(), *pxs = xs.data_ptr<float>();
  const Kernels k = active_kernels();
  const Schedule sched{false, xo.nb, yo.nb, h, group_size(std::min(xo.nb, yo.nb), xo.rows.size(2))};
  {
    run_schedule(sched, [&](const Tile& t, Scratch& sc) {
      TileArgs ta = base_args(xo, yo, t, d, static_cast<int>(critic), it, static_cast<float>(eps), false);
      set_rect_mask(ta, t, offset);
      set_rect_labels(ta, t, rl, cl);
      ta.xm = pxm + t.h * rx + t.bx * kBlock;
      ta.xs = pxs + t.h * rx + t.bx * kBlock;
      k.fwd(ta, sc);
      return 0.0;
    });
  }
  return (xm + xs.log()).narrow(1, 0, xo.n).contiguous();
}

Grads3 rect_backward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& inv_tau,
                     int64_t critic, std::optional<int64_t> offset, double eps,
                     const at::Tensor& lse, const at::Tensor& g, const at::Tensor& center,
                     bool columns_grad, const std::optional<at::Tensor>& row_labels,
                     const std::optional<at::Tensor>& col_labels) {
  check_rect(x, y, inv_tau, critic);
  check_labels_pair(row_labels, col_labels);
  const int64_t h = x.size(0), r = x.size(1), c = y.size(1), d = x.size(2);
  for (const auto* v : {&lse, &g, &center})
    TORCH_CHECK(v->dim() == 2 && v->size(0) == h && v->size(1) == r,
                "lse, g and center must be (H, ", r, "), got ", v->sizes());
  const float it = read_inv_tau(inv_tau);
  // Both operands serve as tile rows (dX, dY) and y as the columns of the scores.
  const Operand xo = make_operand(x.to(at::kFloat), /*columns=*/false);
  const Operand yo = make_operand(y.to(at::kFloat), /*columns=*/true);
  const int64_t rx = xo.nb * kBlock, ry = yo.nb * kBlock, dp = xo.rows.size(2);
  const at::Tensor rl = pad_labels(row_labels, xo.n, rx, "row_labels");
  const at::Tensor cl = pad_labels(col_labels, yo.n, ry, "col_labels");
  // Padded rows get lse 0 and gradient 0: their weights vanish.
  const auto lx = pad_vec(lse, rx), gx = pad_vec(g, rx), cx = pad_vec(center, rx);
  // Without the columns' gradient (a detached queue) no dY product runs: zeros come back.
  auto gxo = at::zeros({h, rx, dp}, at::kFloat);
  auto gyo = at::zeros({h, columns_grad ? ry : c, columns_grad ? dp : d}, at::kFloat);
  const float *plx = lx.data_ptr<float>(), *pgx = gx.data_ptr<float>(), *pcx = cx.data_ptr<float>();
  float *pdx = gxo.data_ptr<float>(), *pdy = gyo.data_ptr<float>();
  const Kernels k = active_kernels();
  const Schedule sched{false, xo.nb, yo.nb, h, group_size(std::min(xo.nb, yo.nb), dp)};
  double tau;
  {
    tau = run_schedule(sched, [&](const Tile& t, Scratch& sc) {
      TileArgs ta = base_args(xo, yo, t, d, static_cast<int>(critic), it, static_cast<float>(eps), false);
      set_rect_mask(ta, t, offset);
      set_rect_labels(ta, t, rl, cl);
      ta.lx = plx + t.h * rx + t.bx * kBlock;
      ta.gx = pgx + t.h * rx + t.bx * kBlock;
      ta.cx = pcx + t.h * rx + t.bx * kBlock;
      ta.dx = pdx + (t.h * rx + t.bx * kBlock) * dp;
      ta.dy = columns_grad ? pdy + (t.h * ry + t.by * kBlock) * dp : nullptr;
      return k.bwd(ta, sc);
    });
  }
  gxo.mul_(it);
  if (columns_grad) gyo.mul_(it);
  auto g_tau = at::scalar_tensor(static_cast<float>(tau), at::kFloat);
  return {gxo.narrow(2, 0, d).narrow(1, 0, r).contiguous(),
          gyo.narrow(2, 0, d).narrow(1, 0, c).contiguous(), g_tau};
}

}  // namespace mimac_cpu

// The dispatcher's view (torch.ops.mimac_cpu; schemas: mimac_kernels/extension_fakes.py has
// their fake implementations). The kernels run on CPU tensors only, so they are the CPU
// key's; the helpers without tensors (ISA and group-tile choice) take no dispatch key.
// No GIL handling here: torch's Python binding of an operator releases it around the call.
TORCH_LIBRARY(mimac_cpu, m) {
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
  m.def("isa() -> str", &mimac_cpu::get_isa);
  m.def("set_isa(str name) -> ()", &mimac_cpu::set_isa);
  m.def("available_isas() -> str[]", &mimac_cpu::available_isas);
  m.def("set_group(int g) -> ()", &mimac_cpu::set_group);
  m.def("group(int n_rows, int d) -> int", &mimac_cpu::get_group);
  m.def("block() -> int", []() -> int64_t { return mimac_cpu::kBlock; });
}

TORCH_LIBRARY_IMPL(mimac_cpu, CPU, m) {
  m.impl("forward", &mimac_cpu::forward);
  m.impl("backward", &mimac_cpu::backward);
  m.impl("rect_forward", &mimac_cpu::rect_forward);
  m.impl("rect_backward", &mimac_cpu::rect_backward);
}

// Not differentiable themselves: mimac_kernels/ops.py pairs forward and backward under
// autograd. A fallthrough makes their outputs plain tensors, instead of the autograd
// fallback's graph node that only warns once a backward reaches it.
TORCH_LIBRARY_IMPL(mimac_cpu, Autograd, m) {
  for (const char* op : {"forward", "backward", "rect_forward", "rect_backward"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}
