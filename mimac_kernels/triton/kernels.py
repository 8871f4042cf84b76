"""The ``@triton.jit`` kernels of the Triton backend (launchers live in ``backend``).

Notation: rows ``X`` (``(H, R, D)``) against columns ``Y`` (``(H, C, D)``),
``S_ik = inv_tau * s(x_i, y_k)``. For ``negatives="all"`` both are ``Z = [a; b]``
and the diagonal is masked; for ``"cross"`` ``X = a``, ``Y = b``. The
rectangular problem of the losses across ranks (local rows against gathered
columns) runs the same kernels with ``ALL`` off: ``SKIP`` masks the pairs
``k == i + OFFSET`` (``all``: ``SKIP`` with ``OFFSET = 0``), and the forward's
``ROWS_ONLY`` drops the column sums nobody reads.
Everything after ``tl.dot`` is float32. Every exponential is one ``exp2`` of
``(S - shift) * log2(e)``: the difference is taken in natural units first so
that the rounding of the scaling is relative to it, not to ``|S| ~ 1/tau``
(the temperature gradient, a sum of ``P * s`` that nearly cancels against
the positives, is sensitive to that).

Forward = ``fwd_exp_sums_kernel`` (one pass over the tiles, one exp per
element, sums shifted by a per-head constant derived from an upper bound of S,
merged with atomics)
then ``lse_finalize_kernel`` (``lse = shift + log(sum)``; rows whose sum
underflowed are recomputed exactly with a running max).
Backward = ``bwd_rows_kernel``: recomputes the tiles of a row block and
accumulates that block's gradient in registers.
Both loops over column tiles run in two parts: the tiles inside the matrix and
off the diagonal without the validity mask (its compares and selects were a
sixth of the issue slots), then the diagonal and ragged tiles with it.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
#: Shifted exp-sums below this are recomputed with a running max: the shift
#: (an upper bound of S) was so far above the row's terms that they neared
#: float32's subnormal range (2^-126), where relative precision is lost.
UNDERFLOW = tl.constexpr(8.673617379884035e-19)  # 2^-60
#: Shifted exp-sums above this are recomputed too: the shift (below the bound, see
#: SHIFT_LEVEL) lay far under the row's largest terms, and their exponent S - shift
#: and log(sum) are rounded relative to their size (~|log sum| 2^-24 of lse). Rows
#: 17-30 above the shift already break the "2x plain float32" rule of the
#: temperature gradient (test_underflowing_shift_...); 2^24 = e^16.6 keeps them out.
OVERFLOW = tl.constexpr(16777216.0)  # 2^24
#: The forward's shift (host side, ``backend.shift_from_bound``) is the Cauchy-Schwarz
#: bound B of S, clamped to at most SHIFT_LEVEL but never more than SHIFT_HEADROOM
#: below B. Terms are then at most e^64 (2^92.3) and a row's sum over up to 2^31
#: columns at most 2^123.3, below float32's 2^128. A row keeps its one-pass sum
#: (between UNDERFLOW = e^-41.6 and OVERFLOW = e^16.6) when its exp-sum lies in that
#: window around the shift. Unit rows at tau = 0.01 (B = 100, shift 36): typical rows,
#: whose maxima lie near 0.3-0.4 B, keep their one-pass sums, where the bound as the
#: shift sent every one of them to the re-sweep; rows far above the shift (positives
#: near cosine 1) are re-swept. Why not simply B - 64: the exponent of a row's
#: dominant terms, S - shift, is rounded relative to its size, and the level keeps
#: that size at the old |S - B| for tau >= 1/32 (B <= 32: the shift is B).
SHIFT_HEADROOM = 64.0
SHIFT_LEVEL = 32.0


@triton.jit
def _load_tile(base, idx64, idx_mask, offs_d, d0, D):
    """Rows ``idx`` of a ``(rows, D)`` matrix, features ``d0 + offs_d``; zeros outside."""
    dd = d0 + offs_d
    ptrs = base + idx64[:, None] * D + dd[None, :]
    return tl.load(ptrs, mask=idx_mask[:, None] & (dd[None, :] < D), other=0.0)


@triton.jit
def _mm(x, y, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + x @ y`` with float32 accumulation.

    ``DOT_F32`` upcasts the operands first. Only the launcher's interpreter
    path sets it, for bfloat16: Triton's CPU interpreter multiplies the raw
    bfloat16 bit patterns (stored as uint16) instead of their values. The
    upcast is exact (a bf16 x bf16 product fits a float32 mantissa).
    """
    if DOT_F32:
        out = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(x, y, acc, input_precision=PREC)
    return out


@triton.jit
def _grad_mm(w, y, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr, GRAD_TF32: tl.constexpr):
    """``acc + w @ y`` for the gradient GEMM (w float32 unless already rounded).

    ``GRAD_TF32`` (float16 inputs with log_dot): w = W / dot can exceed float16's
    range (65504) although the gradient does not, so w stays float32 and the GEMM
    runs in TF32: float16 values are exact in TF32 (same 10-bit mantissa) and
    TF32 has float32's exponent range.
    """
    if GRAD_TF32:
        out = tl.dot(w, y.to(tl.float32), acc, input_precision="tf32")
    else:
        out = _mm(w, y, acc, PREC, DOT_F32)
    return out


@triton.jit
def _tile_dots(
    x,
    X_h,
    Y_h,
    rows64,
    rmask,
    cols64,
    cmask,
    offs_d,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Dot products (BLOCK_M, BLOCK_N) float32 of a row block against a column block.

    ``SINGLE_D``: ``x`` is the whole row block (loaded once by the caller) and the
    column tile is returned too, for reuse in the gradient GEMM. Otherwise D is
    walked in BLOCK_D chunks (a plain GEMM main loop) and ``x`` is ignored.
    """
    if SINGLE_D:
        y = _load_tile(Y_h, cols64, cmask, offs_d, 0, D)
        dots = _mm(x, tl.trans(y), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, DOT_F32)
    else:
        y = x  # unused in this specialisation
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            xc = _load_tile(X_h, rows64, rmask, offs_d, d0, D)
            yc = _load_tile(Y_h, cols64, cmask, offs_d, d0, D)
            dots = _mm(xc, tl.trans(yc), dots, PREC, DOT_F32)
    return dots, y


@triton.jit
def _scaled_scores(dots, inv_tau, eps, LOG_DOT: tl.constexpr):
    """``S = inv_tau * s`` from the dot products (float32, natural units).

    ``log_dot``: ``s = ln(max(d, eps))``, the clamp written ``where(d < eps, eps, d)``
    so that a NaN dot stays NaN. Forward and backward both build S with this
    one function, so the S the backward exponentiates against the stored
    log-sum-exp is (up to the GEMM's summation order) the S that was summed.
    The product may be contracted with the subtraction that follows (one FFMA,
    the exact product minus the shift); the backward rounds it (``_rounded``).
    """
    if LOG_DOT:
        s = tl.log(tl.where(dots < eps, eps, dots))
    else:
        s = dots
    return s * inv_tau, s


@triton.jit
def _rounded(s, inv_tau):
    """``inv_tau * s`` rounded to float32 on its own, as plain PyTorch's S.

    ``fma(s, inv_tau, +0.0)`` is one correctly rounded product that the compiler
    cannot contract with the subtraction after it. Why: the stored lse of a row
    whose largest term dominates is that term's S rounded to float32 (the shift
    plus the log of the shifted sum, or the running max plus log(1 + ...), rounds
    to it), so the backward's ``S - lse`` must take the same rounded S to give
    exactly 0 there. A contracted ``fma(s, inv_tau, -lse)`` subtracts it from the
    exact product instead: up to half an ulp of |S| off, an error of the weights
    that grows with |S| (2e-3 at |S| ~ 6e4, where plain float32 PyTorch stays
    near 4e-6).
    """
    return tl.fma(s, inv_tau, 0.0)


@triton.jit
def _exp(x):
    """``exp(x)`` as one ``exp2``; x is a difference (S - shift), so the scaling
    by log2(e) rounds relative to that small number, not to |S| ~ 1/tau."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _valid(rows, rmask, cols, cmask, SKIP: tl.constexpr, offset, RL, CL, LABELS: tl.constexpr):
    """Pairs that enter the sums: in range and, with ``SKIP``, not ``col == row + offset``
    (the diagonal of ``all``, the self-pairs among gathered columns) and, with
    ``LABELS``, not of one label (``RL`` (R,) and ``CL`` (C,) int64: PML's NTXent
    negatives)."""
    ok = rmask[:, None] & cmask[None, :]
    if SKIP:
        ok = ok & (rows[:, None] + offset != cols[None, :])
    if LABELS:
        lr = tl.load(RL + rows, mask=rmask, other=0)
        lc = tl.load(CL + cols, mask=cmask, other=0)
        ok = ok & (lr[:, None] != lc[None, :])
    return ok


@triton.jit
def _skip_blocks(ib, k_lo, hf, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column blocks ``[a, b)`` (clamped to ``[k_lo, hf]``) holding the skipped pairs
    ``col = row + offset`` of row block ``ib``."""
    lo = tl.maximum(ib * BLOCK_M + offset, 0)
    hi = tl.maximum((ib + 1) * BLOCK_M + offset, 0)
    a = tl.minimum(tl.maximum(lo // BLOCK_N, k_lo), hf)
    b = tl.minimum(tl.maximum(tl.cdiv(hi, BLOCK_N), k_lo), hf)
    return a, b


@triton.jit
def _split_masks(X):
    """Whether interior tiles take the unmasked loop: half inputs (tensor cores) only.
    float32's FMA dots need so many registers that a second copy of the tile body
    made ptxas spill."""
    return X.dtype.element_ty != tl.float32


@triton.jit
def _fwd_tile(
    kb, ib, x, row_acc, rows, rmask, rows64, offs_d, X_h, Y_h, COL_h, inv_tau, shift,
    C, D, eps, offset, RL, CL, MASKED: tl.constexpr, ALL: tl.constexpr, SKIP: tl.constexpr,
    LABELS: tl.constexpr, ROWS_ONLY: tl.constexpr, LOG_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """One column tile ``kb`` of ``fwd_exp_sums_kernel``: adds its column sums to
    ``COL_h`` and returns ``row_acc`` plus its row sums. ``MASKED``: select with the
    validity mask (otherwise every pair of the tile is in range and off the diagonal).
    """
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    cols64 = cols.to(tl.int64)
    dots, _y = _tile_dots(
        x, X_h, Y_h, rows64, rmask, cols64, cmask, offs_d, D,
        BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, PREC, DOT_F32,
    )  # fmt: skip
    sc, _s = _scaled_scores(dots, inv_tau, eps, LOG_DOT)
    e = _exp(sc - shift)
    if MASKED:
        e = tl.where(_valid(rows, rmask, cols, cmask, SKIP, offset, RL, CL, LABELS), e, 0.0)
    row_acc += tl.sum(e, axis=1)
    # Relaxed atomics: only the sums matter, and the next kernel launch orders every
    # add before the reads. all: the diagonal tile already holds both halves.
    if ROWS_ONLY:
        pass
    elif ALL and MASKED:
        if kb != ib:
            tl.atomic_add(COL_h + cols, tl.sum(e, axis=0), mask=cmask, sem="relaxed")
    else:
        tl.atomic_add(COL_h + cols, tl.sum(e, axis=0), mask=cmask, sem="relaxed")
    return row_acc


@triton.jit
def fwd_exp_sums_kernel(
    X,
    Y,
    INV_TAU,
    SHIFT,
    ROW_SUM,
    COL_SUM,
    R,
    C,
    D,
    eps,
    COL_BLOCKS,
    OFFSET,
    RL,
    CL,
    ALL: tl.constexpr,
    SKIP: tl.constexpr,
    LABELS: tl.constexpr,
    ROWS_ONLY: tl.constexpr,
    LOG_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Add ``sum_k exp(S_ik - shift_h)`` into ROW_SUM (and the column sums into COL_SUM).

    Grid ``(row blocks, column chunks, H)``; program (I, c) walks column blocks
    ``[c * COL_BLOCKS, (c + 1) * COL_BLOCKS)``. The shift is the same for every
    element of a head, so each exp serves the row sum *and* the column sum, and
    partial sums of different programs merge by plain atomic adds.

    ``ALL`` (X is Y, S symmetric): only tiles K >= I are visited; tile (I, K)
    feeds row block I with its row sums and row block K with its column sums
    (skipped on the diagonal tile, which already holds both halves), so every
    element of S is computed once for both of its rows: half the work.
    Otherwise (cross) COL_SUM receives the column sums of every tile, unless
    ``ROWS_ONLY`` (the rectangular problem: COL_SUM is not touched).

    Shape: X (H, R, D), Y (H, C, D), SHIFT (H,), ROW_SUM (H, R) and COL_SUM
    (H, C) float32, zero-initialised (ALL: COL_SUM is ROW_SUM).
    """
    ib = tl.program_id(0)
    cb = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    n_kb = tl.cdiv(C, BLOCK_N)
    k_lo = cb * COL_BLOCKS
    k_hi = tl.minimum(k_lo + COL_BLOCKS, n_kb)
    if ALL:
        k_lo = tl.maximum(k_lo, ib)
    if k_lo < k_hi:
        inv_tau = tl.load(INV_TAU)
        shift = tl.load(SHIFT + h)
        X_h = X + h * R * D
        Y_h = Y + h * C * D
        rows = ib * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < R
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        x = _load_tile(X_h, rows64, rmask, offs_d, 0, D)  # whole row block if SINGLE_D
        row_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        # all: column sums go to the rows' own buffer (S is symmetric).
        COL_h = ROW_SUM + h * R if ALL else COL_SUM + h * C
        # Masked tiles: the diagonal one of `all` ([a, b)), the ragged last column
        # block ([hf, k_hi)) and, for a ragged last row block, all of them (its zero
        # rows would add exp(-shift) to the column sums).
        hf = tl.maximum(tl.minimum(k_hi, C // BLOCK_N), k_lo)
        # LABELS: every tile takes the label mask.
        if (ib + 1) * BLOCK_M > R or not _split_masks(X) or LABELS:
            hf = k_lo
        if ALL:
            a = tl.minimum(tl.maximum(ib, k_lo), hf)
            b = tl.minimum(tl.maximum(ib + 1, k_lo), hf)
        elif SKIP:
            a, b = _skip_blocks(ib, k_lo, hf, OFFSET, BLOCK_M, BLOCK_N)
        else:
            a = k_lo
            b = k_lo
        if _split_masks(X):  # noqa: SIM102 - two static conditions (constexpr folding)
            if not LABELS:  # with labels no tile is unmasked: the loop is not compiled
                for j in range(k_lo, hf - (b - a)):
                    kb = tl.where(j >= a, j + (b - a), j)
                    row_acc = _fwd_tile(
                        kb, ib, x, row_acc, rows, rmask, rows64, offs_d, X_h, Y_h, COL_h,
                        inv_tau, shift, C, D, eps, OFFSET, RL, CL, False, ALL, SKIP, LABELS,
                        ROWS_ONLY, LOG_DOT, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, PREC, DOT_F32,
                    )  # fmt: skip
        for j in range((b - a) + (k_hi - hf)):
            kb = tl.where(j < b - a, a + j, hf + j - (b - a))
            row_acc = _fwd_tile(
                kb, ib, x, row_acc, rows, rmask, rows64, offs_d, X_h, Y_h, COL_h, inv_tau,
                shift, C, D, eps, OFFSET, RL, CL, True, ALL, SKIP, LABELS, ROWS_ONLY,
                LOG_DOT, BLOCK_M,
                BLOCK_N, BLOCK_D, SINGLE_D, PREC, DOT_F32,
            )  # fmt: skip
        tl.atomic_add(ROW_SUM + h * R + rows, row_acc, mask=rmask, sem="relaxed")


@triton.jit
def lse_finalize_kernel(
    X,
    Y,
    INV_TAU,
    SHIFT,
    SUM,
    LSE,
    R,
    C,
    D,
    eps,
    OFFSET,
    RL,
    CL,
    SKIP: tl.constexpr,
    LABELS: tl.constexpr,
    LOG_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """``LSE = shift + log(SUM)``; row blocks with a sum outside [UNDERFLOW, OVERFLOW]
    are redone exactly.

    Grid ``(row blocks, H)``. The exact path is the classic online
    log-sum-exp (running max, rescaled sum) over every column block; it only
    runs where the fixed shift failed (a large ``1/tau`` with rows far below
    the bound), so normally this kernel reads R floats and writes R floats.
    NaN sums are not "underflowed" and stay NaN.

    Shape: X (H, R, D), Y (H, C, D), SUM and LSE (H, R) float32.
    """
    ib = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = ib * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    s = tl.load(SUM + h * R + rows, mask=rmask, other=1.0)
    # Outside [UNDERFLOW, OVERFLOW] the shift lay too far from the row's terms.
    need = ((s < UNDERFLOW) | ((s > OVERFLOW) & (s != float("inf")))) & rmask
    lse = tl.load(SHIFT + h) + tl.log(tl.where(need, 1.0, s))  # `need` rows are redone
    if tl.sum(need.to(tl.int32), axis=0) > 0:
        inv_tau = tl.load(INV_TAU)
        X_h = X + h * R * D
        Y_h = Y + h * C * D
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        x = _load_tile(X_h, rows64, rmask, offs_d, 0, D)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for kb in range(tl.cdiv(C, BLOCK_N)):
            cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < C
            dots, _y = _tile_dots(
                x, X_h, Y_h, rows64, rmask, cols.to(tl.int64), cmask, offs_d, D,
                BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, PREC, DOT_F32,
            )  # fmt: skip
            sc, _s = _scaled_scores(dots, inv_tau, eps, LOG_DOT)
            ok = _valid(rows, rmask, cols, cmask, SKIP, OFFSET, RL, CL, LABELS)
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far
            acc = acc * _exp(m - m_ref) + tl.sum(_exp(sc - m_ref[:, None]), axis=1)
            m = m_new
        exact = m + tl.log(tl.where(rmask, acc, 1.0))  # rows past R: no log(0)
        lse = tl.where(need, exact, lse)
    tl.store(LSE + h * R + rows, lse, mask=rmask)


@triton.jit
def _bwd_tile(
    kb, x, acc, tau_acc, rows, rmask, rows64, offs_d, d_lo, X_h, Y_h, DX_h, REF_C_h, F_C_h,
    ref_r, f_r, c_r, inv_tau, inv_gs, gs, C, D, eps, offset, RL, CL,
    MASKED: tl.constexpr, SKIP: tl.constexpr, LABELS: tl.constexpr, LOG_DOT: tl.constexpr, GRAD_TF32: tl.constexpr,
    ONE_EXP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, SLICE_D: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """One column tile ``kb`` of ``bwd_rows_kernel``: returns (acc, tau_acc) updated.
    ``d_lo``: first feature of the program's gradient slice (``SLICE_D`` wide).

    The weights are ``f_r[i] exp(S_ik - ref_r[i]) + f_c[k] exp(S_ik - ref_c[k])``:
    with (ref, f) = (lse, g) on both sides (two exponentials), or, ``ONE_EXP``, with
    the head's shift as ``ref_r`` (a scalar) on both sides, ``f_r = g_r e^(shift -
    lse_r)`` and ``F_C_h`` holding ``g_c e^(shift - lse_c)`` (``REF_C_h`` unread): one
    exponential per element (the caller checks that the factors cannot overflow).

    ``MASKED``: select with the validity mask (the diagonal tiles of ``all`` and the
    ragged last column block); otherwise every pair of the tile is in range and off
    the diagonal (rows past R carry no weight of their own, see the caller).
    """
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    cols64 = cols.to(tl.int64)
    f_c = tl.load(F_C_h + cols, mask=cmask, other=0.0)
    if not ONE_EXP:
        ref_c = tl.load(REF_C_h + cols, mask=cmask, other=float("inf"))
    dots, y = _tile_dots(
        x, X_h, Y_h, rows64, rmask, cols64, cmask, offs_d, D,
        BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, PREC, DOT_F32,
    )  # fmt: skip
    _sc, s = _scaled_scores(dots, inv_tau, eps, LOG_DOT)
    sc = _rounded(s, inv_tau)
    # The self-pair of `all` may overflow to inf here (S_ii = 1/tau far above a
    # row's lse at tiny tau); every use below selects with `valid`, which drops it.
    if ONE_EXP:
        e = _exp(sc - ref_r)
        w_r = f_r[:, None] * e
        w = w_r + f_c[None, :] * e
    else:
        w_r = f_r[:, None] * _exp(sc - ref_r[:, None])
        w = w_r + f_c[None, :] * _exp(sc - ref_c[None, :])
    if LOG_DOT:
        # d s / d dot = 1/dot, 0 where clamped; a NaN dot fails `<=` and stays NaN.
        w = tl.where(dots <= eps, 0.0, w / tl.where(dots <= eps, 1.0, dots))
    # Centred per element: the weights of a row sum to g_r, so this is the
    # temperature gradient of the loss itself, with no float32 cancellation.
    t = w_r * (s - c_r[:, None])
    wq = w * inv_gs
    if MASKED:
        valid = _valid(rows, rmask, cols, cmask, SKIP, offset, RL, CL, LABELS)
        t = tl.where(valid, t, 0.0)
        wq = tl.where(valid, wq, 0.0)
    tau_acc += tl.sum(t, axis=1)
    if not GRAD_TF32:
        wq = wq.to(Y_h.dtype.element_ty)
    if SINGLE_D and SLICE_D == BLOCK_D:
        acc = _grad_mm(wq, y, acc, PREC, DOT_F32, GRAD_TF32)
    elif SINGLE_D:
        # The program's slice of the columns' features (a second, narrower read of
        # tile rows the score GEMM just streamed: served by L1/L2).
        ys = _load_tile(Y_h, cols64, cmask, tl.arange(0, SLICE_D), d_lo, D)
        acc = _grad_mm(wq, ys, acc, PREC, DOT_F32, GRAD_TF32)
    else:
        # D too wide for a register tile: add each chunk's share straight away.
        for d0 in range(0, D, BLOCK_D):
            yc = _load_tile(Y_h, cols64, cmask, offs_d, d0, D)
            part = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            part = _grad_mm(wq, yc, part, PREC, DOT_F32, GRAD_TF32)
            part = part * (gs * inv_tau)
            dd = d0 + offs_d
            ptrs = DX_h + rows64[:, None] * D + dd[None, :]
            tl.atomic_add(ptrs, part, mask=rmask[:, None] & (dd[None, :] < D), sem="relaxed")
    return acc, tau_acc


@triton.jit
def _bwd_interior(
    k_lo, hf, a, b, x, acc, tau_acc, rows, rmask, rows64, offs_d, d_lo, X_h, Y_h, DX_h,
    REF_C_h, F_C_h, ref_r, f_r, c_r, inv_tau, inv_gs, gs, C, D, eps, offset,
    SKIP: tl.constexpr, LOG_DOT: tl.constexpr, GRAD_TF32: tl.constexpr, ONE_EXP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, SLICE_D: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """The unmasked column tiles of ``bwd_rows_kernel``: ``[k_lo, hf)`` without the
    masked blocks ``[a, b)``; (ref, f) as in ``_bwd_tile``. Returns (acc, tau_acc)."""
    for j in range(k_lo, hf - (b - a)):
        kb = tl.where(j >= a, j + (b - a), j)
        acc, tau_acc = _bwd_tile(
            kb, x, acc, tau_acc, rows, rmask, rows64, offs_d, d_lo, X_h, Y_h, DX_h,
            REF_C_h, F_C_h, ref_r, f_r, c_r, inv_tau, inv_gs, gs, C, D, eps, offset, 0, 0,
            False, SKIP, False, LOG_DOT, GRAD_TF32, ONE_EXP, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D,
            SLICE_D, PREC, DOT_F32,
        )  # fmt: skip
    return acc, tau_acc


@triton.jit
def bwd_rows_kernel(
    X,
    Y,
    INV_TAU,
    LSE_R,
    LSE_C,
    G_R,
    G_C,
    CENTER_R,
    GSCALE,
    SHIFT,
    FAST,
    V_C,
    DX,
    TAU_PART,
    R,
    C,
    D,
    eps,
    COL_BLOCKS,
    OFFSET,
    RL,
    CL,
    SKIP: tl.constexpr,
    LABELS: tl.constexpr,
    LOG_DOT: tl.constexpr,
    ATOMIC: tl.constexpr,
    GRAD_TF32: tl.constexpr,
    ONE_EXP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    SLICE_D: tl.constexpr,
    PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Gradient of the rows X of ``sum(g_r * lse_r) + sum(g_c * lse_c)``.

    ``W_ik = g_r[i] exp(S_ik - lse_r[i]) + g_c[k] exp(S_ik - lse_c[k])`` is the
    whole weight of the pair (i, k) on x_i: for ``cross`` the row and column
    losses, for ``all`` (lse_c = lse_r, g_c = g_r) the two entries S_ik = S_ki
    of the symmetric matrix. ``dX_i = inv_tau * sum_k W_ik c_ik y_k`` with
    ``c = 1`` (dot) or ``1 / dot`` (log_dot, 0 where the dot was clamped).
    For cross the launcher calls this kernel a second time with a and b (and
    their statistics) swapped to get dB.

    The temperature sum takes the row half only, ``sum g_r P_ik (s_ik - c_i)``
    with the row's centre ``c_i`` (its raw positive score, see ``ops``):
    the other half comes from the swapped call (cross) or is the same entry
    seen from row k (all). One float per program goes to TAU_PART; the host
    sums them (deterministic, no atomics).

    Grid ``(row blocks x D slices, column chunks, H)``; the row block's gradient stays in
    registers and is stored once (``ATOMIC``: added, when several column
    chunks or D chunks share it). ``SINGLE_D`` with ``SLICE_D < BLOCK_D`` (D too wide
    for one register tile of the gradient, e.g. 512): the row block stays whole for
    the score GEMM and each program keeps the gradient of one ``SLICE_D``-wide slice
    of the features, ``cdiv(D, SLICE_D)`` programs per row block. They recompute the
    scores (more tensor-core work) instead of adding every tile's partial gradient
    to DX with float32 atomics (L2 traffic that costs more; ``benchmarks/static_cost``). W is divided by GSCALE (the largest |g|)
    before it is rounded to the input dtype for the tensor cores, so float16
    keeps its precision when g is tiny (1/M for the mean); see ``_grad_mm``
    for float16 with log_dot.

    ``ONE_EXP`` (half inputs) with a head's ``FAST`` flag set: the interior tiles take
    ``W_ik = e^(S_ik - shift) (u_i + v_k)``, ``u = g_r e^(shift - lse_r)`` and ``V_C``
    = ``g_c e^(shift - lse_c)``, one exponential per element instead of two
    (``_bwd_tile``). The rounding of ``S - shift`` (|S - shift| up to ~100) adds a
    relative error near 1e-5 to W, far below the rounding of W to the half dtype for
    the gradient GEMM.

    Shape: X (H, R, D), Y (H, C, D), LSE_R, G_R, CENTER_R (H, R), LSE_C, G_C, V_C (H, C),
    SHIFT (H,) float32 and FAST (H,) int32 (read with ONE_EXP only),
    DX (H, R, D) float32, TAU_PART (H * row blocks * column chunks,).
    """
    if SINGLE_D and SLICE_D < BLOCK_D:
        n_sl = tl.cdiv(D, SLICE_D)
        ib = tl.program_id(0) // n_sl
        d_lo = (tl.program_id(0) % n_sl) * SLICE_D
    else:
        ib = tl.program_id(0)
        d_lo = 0
    cb = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    n_kb = tl.cdiv(C, BLOCK_N)
    k_lo = cb * COL_BLOCKS
    k_hi = tl.minimum(k_lo + COL_BLOCKS, n_kb)
    inv_tau = tl.load(INV_TAU)
    gs = tl.load(GSCALE)
    inv_gs = 1.0 / gs
    X_h = X + h * R * D
    Y_h = Y + h * C * D
    DX_h = DX + h * R * D
    rows = ib * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    # +inf outside the matrix: exp(S - lse) is then 0 there, not an overflow.
    lse_r = tl.load(LSE_R + h * R + rows, mask=rmask, other=float("inf"))
    g_r = tl.load(G_R + h * R + rows, mask=rmask, other=0.0)
    c_r = tl.load(CENTER_R + h * R + rows, mask=rmask, other=0.0)
    x = _load_tile(X_h, rows64, rmask, offs_d, 0, D)
    acc = tl.zeros([BLOCK_M, SLICE_D], dtype=tl.float32)
    tau_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Tiles that need the validity mask: the diagonal ones of `all` ([a, b)) and the
    # ragged last column block ([hf, k_hi)). The rest run unmasked: rows past R have
    # g_r = 0 and lse_r = +inf (no row weight, no temperature term; their dX rows are
    # not stored) and columns are all in range.
    hf = tl.maximum(tl.minimum(k_hi, C // BLOCK_N), k_lo)
    if not _split_masks(X) or LABELS:  # LABELS: every tile takes the label mask
        hf = k_lo
    if SKIP:
        a, b = _skip_blocks(ib, k_lo, hf, OFFSET, BLOCK_M, BLOCK_N)
    else:
        a = k_lo
        b = k_lo
    # ONE_EXP: the head's FAST flag says every row and column sum of the forward lay in
    # [UNDERFLOW, OVERFLOW] around the shift, so lse - shift is in [-41.6, 16.6] and the
    # factors g e^(shift - lse) are finite; the interior tiles then take one exponential
    # per element. Otherwise (and on masked tiles) two, against each side's own lse.
    # With labels every tile is masked: the interior loops are not compiled.
    if not LABELS:
        fast = False
        if ONE_EXP:
            fast = tl.load(FAST + h) != 0
        if fast:
            shift = tl.load(SHIFT + h)
            u_r = g_r * _exp(shift - lse_r)  # rows past R: 0 * e^-inf = 0
            acc, tau_acc = _bwd_interior(
                k_lo, hf, a, b, x, acc, tau_acc, rows, rmask, rows64, offs_d, d_lo, X_h, Y_h, DX_h,
                LSE_C + h * C, V_C + h * C, shift, u_r, c_r, inv_tau, inv_gs, gs, C, D, eps, OFFSET,
                SKIP, LOG_DOT, GRAD_TF32, True, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, SLICE_D, PREC,
                DOT_F32,
            )  # fmt: skip
        elif _split_masks(X):
            acc, tau_acc = _bwd_interior(
                k_lo, hf, a, b, x, acc, tau_acc, rows, rmask, rows64, offs_d, d_lo, X_h, Y_h, DX_h,
                LSE_C + h * C, G_C + h * C, lse_r, g_r, c_r, inv_tau, inv_gs, gs, C, D, eps, OFFSET,
                SKIP, LOG_DOT, GRAD_TF32, False, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, SLICE_D, PREC,
                DOT_F32,
            )  # fmt: skip
    for j in range((b - a) + (k_hi - hf)):
        kb = tl.where(j < b - a, a + j, hf + j - (b - a))
        acc, tau_acc = _bwd_tile(
            kb, x, acc, tau_acc, rows, rmask, rows64, offs_d, d_lo, X_h, Y_h, DX_h,
            LSE_C + h * C, G_C + h * C, lse_r, g_r, c_r, inv_tau, inv_gs, gs, C, D, eps, OFFSET,
            RL, CL, True, SKIP, LABELS, LOG_DOT, GRAD_TF32, False, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D,
            SLICE_D, PREC, DOT_F32,
        )  # fmt: skip
    if SINGLE_D:
        out = acc * (gs * inv_tau)
        dd = d_lo + tl.arange(0, SLICE_D)
        ptrs = DX_h + rows64[:, None] * D + dd[None, :]
        omask = rmask[:, None] & (dd[None, :] < D)
        if ATOMIC:
            tl.atomic_add(ptrs, out, mask=omask, sem="relaxed")
        else:
            tl.store(ptrs, out, mask=omask)
    # One partial per (row block, column chunk, head): the first slice's (every slice
    # sums the same terms).
    if d_lo == 0:
        pid = (h * tl.cdiv(R, BLOCK_M) + ib) * tl.num_programs(1) + cb
        tl.store(TAU_PART + pid, tl.sum(tau_acc, axis=0))
