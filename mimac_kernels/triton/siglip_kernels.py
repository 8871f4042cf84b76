"""The ``@triton.jit`` kernels of the sigmoid loss (SigLIP); launchers in ``siglip_backend``.

Notation (docs/losses.md, "The sigmoid loss"): rows ``A`` of one program's block
against the swept operand ``B``, ``s = a . b``, ``l = t s + bias``; the pair
``(a, b)`` is positive (z = +1) where ``b == a + offset``. Everything after
``tl.dot`` is float32.

- ``siglip_fwd_kernel``: A = X, B = Y; each program stores its rows' sums of
  ``softplus(-z l)`` over every column (no atomics: deterministic).
- backward, per panel of P columns: ``siglip_weights_kernel`` writes the panel's
  weights ``w_ij = -g_i z_ij / (1 + exp(z_ij l_ij))`` (``R x P``, the inputs' dtype)
  and adds each row's partials of dt = sum w s and db = sum w; then
  ``siglip_gemm_kernel`` twice: ``dX += t W Y_panel`` and ``dY_panel = t W^T X``.
  The scores are computed once per element and the gradients are plain GEMMs over
  the stored panel, tiled over D (a row block's whole gradient, 64 x 768 float32
  at D = 768, does not fit one program's registers).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(base, idx, mask, offs, d0, D):
    """Rows ``idx`` of a ``(rows, D)`` matrix, features ``d0 + offs``; zeros outside."""
    dd = d0 + offs
    ptrs = base + idx.to(tl.int64)[:, None] * D + dd[None, :]
    return tl.load(ptrs, mask=mask[:, None] & (dd[None, :] < D), other=0.0)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + a @ b`` in float32. ``DOT_F32`` (the interpreter with bfloat16) upcasts
    first: the CPU interpreter multiplies bfloat16's raw bit patterns otherwise."""
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _scores(A_h, B_h, a_idx, a_mask, b_idx, b_mask, D,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
            PREC: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """``(BLOCK_A, BLOCK_B)`` dot products of rows ``a_idx`` of A with rows ``b_idx`` of B."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        a = _load_rows(A_h, a_idx, a_mask, offs_d, d0, D)
        b = _load_rows(B_h, b_idx, b_mask, offs_d, d0, D)
        acc = _dot(a, tl.trans(b), acc, PREC, DOT_F32)
    return acc


@triton.jit
def _softplus(u):
    """``log(1 + exp(u))`` for any finite u: ``max(u, 0) + log1p(exp(-|u|))``, log1p as
    ``log(w) * e / (w - 1)`` with ``w = 1 + e`` (exact to a few ulps; ``w - 1`` is exact)."""
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    tiny = w == 1.0
    lp = tl.where(tiny, e, tl.log(w) * (e / tl.where(tiny, 1.0, w - 1.0)))
    return tl.maximum(u, 0.0) + lp


@triton.jit
def siglip_fwd_kernel(
    X, Y, SCALE, BIAS, OUT, R, C, D, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(R, BLOCK_M), H)``: ``OUT[h, i] = sum_j softplus(-z_ij l_ij)``."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    X_h = X + h * R * D
    Y_h = Y + h * C * D
    t = tl.load(SCALE)
    bias = tl.load(BIAS)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < C
        s = _scores(X_h, Y_h, rows, rmask, cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_D,
                    PREC, DOT_F32)  # fmt: skip
        logit = t * s + bias
        pos = cols[None, :] == rows[:, None] + offset
        term = _softplus(tl.where(pos, -logit, logit))
        total += tl.sum(tl.where(rmask[:, None] & cmask[None, :], term, 0.0), axis=1)
    tl.store(OUT + h * R + rows, total, mask=rmask)


@triton.jit
def siglip_weights_kernel(
    X, Y, SCALE, BIAS, G, W, PART, R, C, D, c0, P, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(R, BLOCK_M), H)``: the weights of one panel of columns ``c0 .. c0 + P``,
    ``W[h, i, j - c0] = -g_i z_ij / (1 + exp(z_ij l_ij))`` (W's dtype: the inputs'), and
    each row's ``sum_j w s`` and ``sum_j w`` added to ``PART[0 or 1, h, i]`` (one program
    per row block per launch, panels one launch after another: no races).
    """
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    X_h = X + h * R * D
    Y_h = Y + h * C * D
    W_h = W + h * R * P
    t = tl.load(SCALE)
    bias = tl.load(BIAS)
    g = tl.load(G + h * R + rows, mask=rmask, other=0.0)
    part_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    part_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(0, P, BLOCK_N):
        cols = c0 + j0 + tl.arange(0, BLOCK_N)
        cmask = (cols < C) & (cols < c0 + P)
        s = _scores(X_h, Y_h, rows, rmask, cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_D,
                    PREC, DOT_F32)  # fmt: skip
        logit = t * s + bias
        pos = cols[None, :] == rows[:, None] + offset
        zl = tl.where(pos, logit, -logit)
        # d softplus(-z l) / dl = -z sigmoid(-z l), no cancellation at the positive;
        # sigmoid(-u) from e = exp(-|u|) <= 1, which cannot overflow.
        e = tl.exp(-tl.abs(zl))
        w = tl.where(pos, -1.0, 1.0) * tl.where(zl >= 0, e, 1.0) / (1.0 + e) * g[:, None]
        valid = rmask[:, None] & cmask[None, :]
        w = tl.where(valid, w, 0.0)
        part_t += tl.sum(w * s, axis=1)
        part_b += tl.sum(w, axis=1)
        w_ptrs = W_h + rows.to(tl.int64)[:, None] * P + (cols - c0)[None, :]
        tl.store(w_ptrs, w.to(W.dtype.element_ty), mask=valid)
    pt = PART + h * R + rows
    pb = PART + (tl.num_programs(1) + h) * R + rows
    tl.store(pt, tl.load(pt, mask=rmask, other=0.0) + part_t, mask=rmask)
    tl.store(pb, tl.load(pb, mask=rmask, other=0.0) + part_b, mask=rmask)


@triton.jit
def siglip_gemm_kernel(
    A, B, OUT, SCALE, M, N, K, s_ah, s_am, s_ak, s_bh, s_bk, s_bn, s_oh, SPLIT, k_step, s_os,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), H * SPLIT)``: ``OUT[k, h] (+)= t A[h] @
    B[h]`` over the k-th of SPLIT ranges of ``k_step`` (a multiple of BLOCK_K) along K;
    OUT float32 ``(M, N)`` rows of stride N per head (``s_oh``) and split (``s_os``), added
    to with ``ACC``. A and B by strides: the weights or their transpose, then the columns
    or the rows. SPLIT > 1 keeps the SMs busy when M x N has few tiles (the column
    gradient of a panel: K = every row); the caller sums the splits in order."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = (tl.program_id(2) // SPLIT).to(tl.int64)
    k_lo = (tl.program_id(2) % SPLIT) * k_step
    k_hi = tl.minimum(K, k_lo + k_step)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask, nmask = rm < M, rn < N
    A_h = A + h * s_ah + rm.to(tl.int64)[:, None] * s_am
    B_h = B + h * s_bh + rn.to(tl.int64)[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k_hi
        a = tl.load(A_h + kk.to(tl.int64)[None, :] * s_ak, mask=mmask[:, None] & kmask[None, :],
                    other=0.0)  # fmt: skip
        b = tl.load(B_h + kk.to(tl.int64)[:, None] * s_bk, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)  # fmt: skip
        acc = _dot(a, b, acc, PREC, DOT_F32)
    split = (tl.program_id(2) % SPLIT).to(tl.int64)
    out_ptrs = OUT + split * s_os + h * s_oh + rm.to(tl.int64)[:, None] * N + rn[None, :]
    omask = mmask[:, None] & nmask[None, :]
    out = tl.load(SCALE) * acc
    if ACC:
        out += tl.load(out_ptrs, mask=omask, other=0.0)
    tl.store(out_ptrs, out, mask=omask)
