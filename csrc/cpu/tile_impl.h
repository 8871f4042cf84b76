// Tile kernels of the CPU backend, written once and compiled once per ISA.
//
// contrastive.cpp includes this file several times, each time inside its own
// namespace and `#pragma GCC target` region with MIMAC_VEC_BYTES set (64 for
// AVX-512, 32 for AVX2+FMA, 16 for the baseline). Hence: no include guard, no
// #include here (everything used is declared before the first inclusion), and
// GCC vector extensions instead of intrinsics, so one source serves every ISA.
//
// A tile is one (X block, Y block) pair of B = kBlock rows each, taken from
// the padded, row-major operands (row stride Dp, a multiple of 16 floats, zero
// beyond D). The tile matrix T[i][k] = x_i . y_k is computed once and feeds
// both the row statistics of X and the column statistics of Y (the symmetry
// of S for "all", the column log-sum-exp for "cross"; see losses.md).

typedef float vf __attribute__((vector_size(MIMAC_VEC_BYTES)));
typedef int vi __attribute__((vector_size(MIMAC_VEC_BYTES)));
// Unaligned, aliasing view used for every load/store: the scratch buffers are
// 64-byte aligned, but row offsets need not be multiples of the vector size.
typedef float vfu __attribute__((vector_size(MIMAC_VEC_BYTES), aligned(4), may_alias));
typedef int viu __attribute__((vector_size(MIMAC_VEC_BYTES), aligned(4), may_alias));

constexpr int VL = MIMAC_VEC_BYTES / 4;
// Register blocking of the two micro-kernels: R rows x C vectors of
// accumulators. 16 accumulators fit the 32 zmm registers of AVX-512 with room
// for the operands; the 16-register ISAs take 8.
constexpr int SR = 4;                                   // S = X Y^T: rows per micro-tile
constexpr int SC = (VL == 16) ? 4 : 2;                  // S = X Y^T: vectors of columns
constexpr int UR = 4;                                   // dX += V Y: rows per micro-tile
constexpr int UC = (VL == 16) ? 4 : 2;                  // dX += V Y: vectors along D
static_assert(kBlock % (SC * VL) == 0, "block must be a multiple of the S micro-tile width");
static_assert(kBlock % SR == 0 && kBlock % UR == 0, "block must be a multiple of the micro-tile rows");

static inline vf ld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline vi ldi(const int* p) { return *reinterpret_cast<const viu*>(p); }
static inline void st(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// x - 0 folds to a plain broadcast (x + 0 does not: -0 + 0 = +0).
static inline vf splat(float x) { return x - vf{}; }
static inline vi isplat(int x) { return vi{} + x; }
// Bitwise select (portable across GCC and clang vector extensions).
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
// max that keeps NaN out of the running max; NaN still reaches the sums.
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
static inline vi lanes() {
  vi l;
  for (int j = 0; j < VL; ++j) l[j] = j;
  return l;
}
static inline float hsum(vf v) {
  float s = 0.f;
  for (int j = 0; j < VL; ++j) s += v[j];
  return s;
}
static inline float hmax(vf v) {
  float m = v[0];
  for (int j = 1; j < VL; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// exp(x) in float32, ~1 ulp (Cephes polynomial on x - n ln2). Arguments below
// -87 give exactly 0 (so a masked -inf gives 0); NaN stays NaN.
static inline vf vexp(vf x) {
  const vf lo = splat(-87.0f), hi = splat(88.0f);
  vi under = x < lo;
  vf xc = sel(x > hi, hi, sel(under, lo, x));
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf t = xc * 1.44269504088896341f + shifter;
  vi n = (vi)t - isplat(0x4B400000);
  vf nf = t - shifter;
  vf r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * (r * r) + r + 1.0f;
  vf scale = (vf)((n + 127) << 23);
  return sel(under, vf{}, y * scale);
}

// log(x) for x > 0 in float32, ~1 ulp (Cephes). NaN and +inf come back as themselves
// (the bit decoding would turn +inf into log(2^128)). Subnormal x (an eps below
// float32's smallest normal, as the kernel-level contract allows) has no implicit
// leading bit, so it is scaled by 2^24 into the normal range first.
static inline vf vlog(vf x) {
  const vf one = splat(1.0f);
  vi sub = x < splat(1.17549435e-38f);
  vf xn = sel(sub, x * 16777216.0f, x);
  vi bits = (vi)xn;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & 0x807fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  vi small = m < 0.707106781186547524f;
  vf ef = __builtin_convertvector(e, vf) - sel(small, one, vf{}) - sel(sub, splat(24.0f), vf{});
  m = sel(small, m + m, m) - one;
  vf z = m * m;
  vf p = splat(7.0376836292e-2f);
  p = p * m + -1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m + -1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m + -1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m + -2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  vf y = p * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  vf r = m + y + ef * 0.693359375f;
  return sel((x != x) | (x == splat(__builtin_inff())), x, r);
}

// ---------------------------------------------------------------------------
// Micro-kernels

// T[r][c] = sum_d X[r][d] * YT[d][c] for an R x (C*VL) block. YT is the packed
// transpose of the Y block (D rows of kBlock floats): the D loop broadcasts one
// x and streams contiguous y vectors, so no horizontal sums are needed.
template <int R, int C>
static inline void mk_nt(const float* X, int ldx, const float* YT, float* T, int D) {
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vf{};
  for (int d = 0; d < D; ++d) {
    vf y[C];
    for (int c = 0; c < C; ++c) y[c] = ld(YT + (long)d * kBlock + c * VL);
    for (int r = 0; r < R; ++r) {
      vf x = splat(X[(long)r * ldx + d]);
      for (int c = 0; c < C; ++c) acc[r][c] += x * y[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) st(T + r * kBlock + c * VL, acc[r][c]);
}

// out[r][d] += sum_k W(r, k) * Y[k][d], W(r, k) = W[r*wr + k*wk]: one routine
// serves the row update (V, wr = B, wk = 1) and the column update (V^T, wr = 1,
// wk = B) without transposing V.
template <int R, int C>
static inline void mk_nn(const float* W, int wr, int wk, const float* Y, int ldy, float* out,
                         int ldo, int K) {
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vf{};
  for (int k = 0; k < K; ++k) {
    vf y[C];
    for (int c = 0; c < C; ++c) y[c] = ld(Y + (long)k * ldy + c * VL);
    for (int r = 0; r < R; ++r) {
      vf w = splat(W[r * wr + k * wk]);
      for (int c = 0; c < C; ++c) acc[r][c] += w * y[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float* o = out + (long)r * ldo + c * VL;
      st(o, ld(o) + acc[r][c]);
    }
}

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// T (kBlock x kBlock) = X Y^T for the first nx rows (rounded up to SR) and the
// column groups that hold the first ny columns.
static void tile_gemm_nt(const float* X, int ldx, const float* YT, float* T, int nx, int ny, int D) {
  const int rows = round_up(nx, SR);
  for (int c0 = 0; c0 < ny; c0 += SC * VL)
    for (int i0 = 0; i0 < rows; i0 += SR)
      mk_nt<SR, SC>(X + (long)i0 * ldx, ldx, YT + c0, T + i0 * kBlock + c0, D);
}

// out (rows x Dp, stride Dp) += W Y over K inner rows; rows rounded up to UR
// (the caller zeroes W there), D in chunks of UC vectors with a shorter tail.
static void tile_gemm_nn(const float* W, int wr, int wk, const float* Y, float* out, int rows, int K,
                         int Dp) {
  rows = round_up(rows, UR);
  for (int d0 = 0; d0 < Dp; d0 += UC * VL) {
    const int nv = (Dp - d0) / VL < UC ? (Dp - d0) / VL : UC;
    for (int i0 = 0; i0 < rows; i0 += UR) {
      const float* w = W + (long)i0 * wr;
      float* o = out + (long)i0 * Dp + d0;
      switch (nv) {
        case 1: mk_nn<UR, 1>(w, wr, wk, Y + d0, Dp, o, Dp, K); break;
        case 2: mk_nn<UR, 2>(w, wr, wk, Y + d0, Dp, o, Dp, K); break;
#if MIMAC_VEC_BYTES == 64
        case 3: mk_nn<UR, 3>(w, wr, wk, Y + d0, Dp, o, Dp, K); break;
        case 4: mk_nn<UR, 4>(w, wr, wk, Y + d0, Dp, o, Dp, K); break;
#endif
        default: break;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Tile sweeps. T holds the raw dot products x_i . y_k on entry.

// Raw score s from a dot product (log_dot clamps at eps; `d < eps` keeps NaN).
static inline vf score(vf d, int critic, float eps) {
  if (critic != kLogDot) return d;
  return vlog(sel(d < eps, splat(eps), d));
}

// Forward: merge the tile's exp-sums into the running (max, sum) of its rows
// and, unless `a.rows_only`, of its columns. One exp per element when a common
// shift suits every row and column of the tile (the usual case), else two.
static void forward_tile(const TileArgs& a, Scratch& sc) {
  float* T = sc.tile;
  float* cmax = sc.colv;
  float* csum = sc.colv2;
  float* rmax = sc.rowv;
  const int nx = a.nx, ny = a.ny, kend = round_up(ny, VL);
  tile_gemm_nt(a.x, a.ldx, a.yt, T, nx, ny, a.d);

  const vi lane = lanes();
  const vf ninf = splat(-__builtin_inff());
  for (int k0 = 0; k0 < kend; k0 += VL) st(cmax + k0, ninf);
  // Pass 1: S = inv_tau * s with masks, row and column maxima.
  for (int i = 0; i < nx; ++i) {
    float* row = T + i * kBlock;
    vf rm = ninf;
    for (int k0 = 0; k0 < kend; k0 += VL) {
      vi kk = lane + k0;
      vi bad = kk >= ny;
      if (a.mask) bad |= (kk == i + a.mask_shift);
      if (a.rl) bad |= (ldi(a.cl + k0) == isplat(a.rl[i]));  // one label: not a negative
      vf s = sel(bad, ninf, score(ld(row + k0), a.critic, a.eps) * a.inv_tau);
      st(row + k0, s);
      rm = vmax(rm, s);
      st(cmax + k0, vmax(ld(cmax + k0), s));
    }
    rmax[i] = hmax(rm);
  }

  if (a.rows_only) {  // each row with its own shift
    for (int i = 0; i < nx; ++i) {
      const float* row = T + i * kBlock;
      const float sh = rmax[i] == -__builtin_inff() ? 0.f : rmax[i];
      vf acc = vf{};
      for (int k0 = 0; k0 < kend; k0 += VL) acc += vexp(ld(row + k0) - sh);
      lse_merge(a.xm[i], a.xs[i], rmax[i], hsum(acc));
    }
    return;
  }

  float t = -__builtin_inff(), rmin = __builtin_inff(), cmin = __builtin_inff();
  for (int i = 0; i < nx; ++i) {
    t = rmax[i] > t ? rmax[i] : t;
    rmin = rmax[i] < rmin ? rmax[i] : rmin;
  }
  for (int k = 0; k < ny; ++k) cmin = cmax[k] < cmin ? cmax[k] : cmin;
  for (int k0 = 0; k0 < kend; k0 += VL) st(csum + k0, vf{});

  if (t - rmin <= kShiftSlack && t - cmin <= kShiftSlack) {
    // Common shift t: e = exp(S - t) serves the row sum and the column sum.
    for (int i = 0; i < nx; ++i) {
      const float* row = T + i * kBlock;
      vf acc = vf{};
      for (int k0 = 0; k0 < kend; k0 += VL) {
        vf e = vexp(ld(row + k0) - t);
        acc += e;
        st(csum + k0, ld(csum + k0) + e);
      }
      lse_merge(a.xm[i], a.xs[i], t, hsum(acc));
    }
    for (int k = 0; k < ny; ++k) lse_merge(a.ym[k], a.ys[k], t, csum[k]);
    return;
  }
  // Wide spread (or NaN): separate row and column shifts, two exps.
  for (int k0 = 0; k0 < kend; k0 += VL) {
    vf c = ld(cmax + k0);
    st(cmax + k0, sel(c == ninf, vf{}, c));  // safe shifts; the merge sees the true max
  }
  for (int i = 0; i < nx; ++i) {
    const float* row = T + i * kBlock;
    const float sh = rmax[i] == -__builtin_inff() ? 0.f : rmax[i];
    vf acc = vf{};
    for (int k0 = 0; k0 < kend; k0 += VL) {
      vf s = ld(row + k0);
      acc += vexp(s - sh);
      st(csum + k0, ld(csum + k0) + vexp(s - ld(cmax + k0)));
    }
    lse_merge(a.xm[i], a.xs[i], rmax[i], hsum(acc));
  }
  for (int k = 0; k < ny; ++k) {
    // the column max was replaced by its safe value; an all-masked column sums to 0
    lse_merge(a.ym[k], a.ys[k], cmax[k], csum[k]);
  }
}

// Backward: u_ik = gx_i exp(S_ik - lx_i) [+ gy_k exp(S_ik - ly_k) unless rows_only],
// V = u (dot, cosine) or u / d (log_dot, 0 where d <= eps), then
// dX += V Y and dY += V^T X. Returns sum(u * s), this tile's share of the
// temperature gradient (an off-diagonal tile stands for both (i, k) and (k, i)).
static double backward_tile(const TileArgs& a, Scratch& sc) {
  float* T = sc.tile;   // dots, then V
  float* Sb = sc.tile2; // scores s (log_dot only)
  float* beta = sc.colv;
  const int nx = a.nx, ny = a.ny, kend = round_up(ny, VL);
  const bool logdot = a.critic == kLogDot;
  tile_gemm_nt(a.x, a.ldx, a.yt, T, nx, ny, a.d);

  const vi lane = lanes();
  const vf ninf = splat(-__builtin_inff());
  // Pass 1: tile max of S over valid entries (to pick the shift).
  vf tm = ninf;
  for (int i = 0; i < nx; ++i) {
    float* row = T + i * kBlock;
    for (int k0 = 0; k0 < kend; k0 += VL) {
      vi kk = lane + k0;
      vi bad = kk >= ny;
      if (a.mask) bad |= (kk == i + a.mask_shift);
      if (a.rl) bad |= (ldi(a.cl + k0) == isplat(a.rl[i]));  // one label: not a negative
      vf s = score(ld(row + k0), a.critic, a.eps);
      if (logdot) st(Sb + i * kBlock + k0, s);
      tm = vmax(tm, sel(bad, ninf, s * a.inv_tau));
    }
  }
  const float t = hmax(tm);
  float lxmin = __builtin_inff(), lymin = __builtin_inff();
  for (int i = 0; i < nx; ++i) lxmin = a.lx[i] < lxmin ? a.lx[i] : lxmin;
  if (!a.rows_only)
    for (int k = 0; k < ny; ++k) lymin = a.ly[k] < lymin ? a.ly[k] : lymin;
  const bool common = !a.rows_only && t - lxmin <= kShiftSlack && t - lymin <= kShiftSlack;
  if (common)
    for (int k = 0; k < kend; ++k) beta[k] = k < ny ? a.gy[k] * std::exp(t - a.ly[k]) : 0.f;

  vf tau = vf{};
  for (int i = 0; i < nx; ++i) {
    float* row = T + i * kBlock;
    const float* srow = logdot ? Sb + i * kBlock : row;
    const float gx = a.gx[i], lx = a.lx[i];
    const vf cx = splat(a.cx[i]);
    const float alpha = common ? gx * std::exp(t - lx) : 0.f;
    for (int k0 = 0; k0 < kend; k0 += VL) {
      vi kk = lane + k0;
      vi bad = kk >= ny;
      if (a.mask) bad |= (kk == i + a.mask_shift);
      if (a.rl) bad |= (ldi(a.cl + k0) == isplat(a.rl[i]));  // one label: not a negative
      vf d = ld(row + k0);
      vf s = logdot ? ld(srow + k0) : d;
      vf S = sel(bad, ninf, s * a.inv_tau);
      // Row part wr (weight of row i's lse) and column part wc (row k's, or
      // column k's for cross); the temperature sum centres each on its own
      // positive score, element by element, so nothing cancels in float32.
      vf wr, wc;
      if (common) {
        vf e = vexp(S - t);
        wr = e * alpha;
        wc = e * ld(beta + k0);
      } else {
        wr = vexp(S - lx) * gx;
        wc = a.rows_only ? vf{} : vexp(S - ld(a.ly + k0)) * ld(a.gy + k0);
      }
      vf u = sel(bad, vf{}, wr + wc);
      vf cy = a.rows_only ? vf{} : ld(a.cy + k0);
      tau += sel(bad, vf{}, wr * (s - cx) + wc * (s - cy));
      vf v = logdot ? sel(d > a.eps, u / d, vf{}) : u;
      st(row + k0, v);
    }
  }
  // Rows past nx feed the row update's rounded-up micro-tiles: make them zero.
  for (int i = nx; i < round_up(nx, UR); ++i)
    for (int k0 = 0; k0 < kend; k0 += VL) st(T + i * kBlock + k0, vf{});

  tile_gemm_nn(T, kBlock, 1, a.y, a.dx, nx, ny, a.dp);  // dX += V Y
  if (a.dy) tile_gemm_nn(T, 1, kBlock, a.x, a.dy, ny, nx, a.dp);  // dY += V^T X (null: not asked)
  return (double)hsum(tau);
}
