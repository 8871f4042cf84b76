"""The ``@triton.jit`` kernels of the sigmoid loss (SigLIP); launchers in ``siglip_backend``.

Notation (docs/losses.md, "The sigmoid loss"): rows ``A`` of one program's block
against the swept operand ``B``, ``s = a . b``, ``l = t s + bias``; the pair
``(a, b)`` is positive (z = +1) where ``b == a + offset``. Everything after
``tl.dot`` is float32.

- ``siglip_fwd_kernel``: A = X, B = Y; each program stores its rows' sums of
  ``softplus(-z l)`` over every column (no atomics: deterministic).
- ``siglip_bwd_kernel``: one slice of D of the gradient of the program's block,
  ``t sum_b w_ab b[slice]``, ``w = -z g / (1 + exp(z l))``, the scores recomputed
  over the whole of D. Launched twice: rows (A = X, g by A's rows, plus each row's
  partials of dt = sum w s and db = sum w) and columns (A = Y, B = X, offset
  negated, g by B's rows).
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
def siglip_bwd_kernel(
    A, B, SCALE, BIAS, G, OUT, PART, NA, NB, D, offset,
    G_ON_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(NA, BLOCK_M), cdiv(D, BLOCK_G), H)``: ``OUT[h, a, slice] =
    t sum_b w_ab B[h, b, slice]`` (float32). ``G``: ``(H, rows of X)``, X being A when
    ``G_ON_A`` else B. With ``G_ON_A`` the programs of slice 0 also store each row's
    ``sum_b w_ab s_ab`` and ``sum_b w_ab`` into ``PART[0, h, a]`` and ``PART[1, h, a]``.
    """
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    arow = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    amask = arow < NA
    A_h = A + h * NA * D
    B_h = B + h * NB * D
    t = tl.load(SCALE)
    bias = tl.load(BIAS)
    offs_g = sl * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = offs_g < D
    if G_ON_A:
        g_rows = tl.load(G + h * NA + arow, mask=amask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    part_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    part_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, NB, BLOCK_N):
        bcol = c0 + tl.arange(0, BLOCK_N)
        bmask = bcol < NB
        s = _scores(A_h, B_h, arow, amask, bcol, bmask, D, BLOCK_M, BLOCK_N, BLOCK_D,
                    PREC, DOT_F32)  # fmt: skip
        logit = t * s + bias
        pos = bcol[None, :] == arow[:, None] + offset
        zl = tl.where(pos, logit, -logit)
        # d softplus(-z l) / dl = -z sigmoid(-z l), no cancellation at the positive;
        # sigmoid(-u) from e = exp(-|u|) <= 1, which cannot overflow.
        e = tl.exp(-tl.abs(zl))
        w = tl.where(pos, -1.0, 1.0) * tl.where(zl >= 0, e, 1.0) / (1.0 + e)
        if G_ON_A:
            w = w * g_rows[:, None]
        else:
            w = w * tl.load(G + h * NB + bcol, mask=bmask, other=0.0)[None, :]
        w = tl.where(amask[:, None] & bmask[None, :], w, 0.0)
        if G_ON_A:
            part_t += tl.sum(w * s, axis=1)
            part_b += tl.sum(w, axis=1)
        b_slice = _load_rows(B_h, bcol, bmask, tl.arange(0, BLOCK_G), sl * BLOCK_G, D)
        acc = _dot(w.to(b_slice.dtype), b_slice, acc, PREC, DOT_F32)
    out_ptrs = OUT + h * NA * D + arow.to(tl.int64)[:, None] * D + offs_g[None, :]
    tl.store(out_ptrs, t * acc, mask=amask[:, None] & gmask[None, :])
    if G_ON_A:
        first = amask & ((arow * 0 + sl) == 0)
        tl.store(PART + h * NA + arow, part_t, mask=first)
        tl.store(PART + (tl.num_programs(2) + h) * NA + arow, part_b, mask=first)
