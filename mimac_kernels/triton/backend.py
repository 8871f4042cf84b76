"""The ``triton`` backend: checks, buffers, grids and kernel launches.

Contract: ``mimac_kernels.contract``. Nothing here reads a device value back to the
host: ``inv_tau``, the per-head shifts and the gradient scale stay on the device and
the kernels load them. ``probe`` never touches the GPU beyond a capability query of
the inputs' device. ``dispatch`` imports this module only when asked about Triton; an
import failure (no triton) becomes the backend's reason.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from mimac_kernels.contract import (
    Grads,
    Problem,
    RectGrads,
    RectProblem,
    Stats,
    Upstream,
    heads_refusal,
    kernel_dtype_refusal,
)
from mimac_kernels.triton import configs, kernels
from mimac_kernels.triton.configs import TileConfig

Grid = Callable[[int, int], tuple[int, ...]]


def probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if the Triton kernels can run on ``device``/``dtype``, else why not."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    elif device.type != "cuda":
        return f"Triton backend runs on CUDA devices, not {device.type}"
    else:
        why = _cuda_reason(device, dtype)
        if why is not None:
            return why
    return kernel_dtype_refusal(dtype)


def _cuda_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Driver and architecture of ``device`` (the inputs' GPU; cached by ``dispatch``)."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (driver missing or CPU-only torch build)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 5):
        return f"Triton kernels need compute capability >= 7.5, {device} is {major}.{minor}"
    if dtype == torch.bfloat16 and major < 8:
        return f"bfloat16 tensor-core dots need compute capability >= 8.0, {device} is {major}.{minor}"
    return None


def refusal(problem: Problem | RectProblem) -> str | None:
    """The heads lie on one grid axis (at most 65,535)."""
    return heads_refusal(problem)


def _precision(dtype: torch.dtype) -> dict:
    """``tl.dot`` settings: PREC (float32 inputs) and DOT_F32 (see ``kernels._mm``)."""
    return {
        "PREC": configs.float32_precision() if dtype == torch.float32 else "ieee",
        "DOT_F32": configs.interpreting() and dtype == torch.bfloat16,
    }


def _device_guard(t: Tensor):
    """Launch on ``t``'s GPU (Triton uses the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@functools.cache
def _autotuned(name: str) -> Callable:
    """``triton.autotune`` around kernel ``name`` (only with MIMAC_KERNELS_AUTOTUNE=1).

    Buffers the kernel accumulates into atomically are zeroed between trials.
    """
    kernel, square, reset = {
        "fwd": (kernels.fwd_exp_sums_kernel, True, ["ROW_SUM", "COL_SUM"]),
        "finalize": (kernels.lse_finalize_kernel, False, []),
        "bwd": (kernels.bwd_rows_kernel, False, ["DX", "TAU_PART"]),
    }[name]
    cands = [
        triton.Config(
            {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
            num_warps=c["num_warps"],
            num_stages=c["num_stages"],
        )
        for c in configs.autotune_configs(square)
    ]
    key = ["R", "C", "D", "SKIP", "LOG_DOT"] + (["ALL", "ROWS_ONLY"] if name == "fwd" else [])
    return triton.autotune(configs=cands, key=key, reset_to_zero=reset or None)(kernel)


def _launch(name: str, kernel, grid: Grid, cfg: TileConfig, *args, **consts) -> None:
    """Launch with the heuristic tiles, or through the autotuner when asked for."""
    if configs.autotune_enabled() and not configs.interpreting():
        _autotuned(name)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
        return
    kernel[grid(cfg.block_m, cfg.block_n)](
        *args,
        **consts,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _col_chunks(c: int, block_n: int, col_blocks: int) -> int:
    return triton.cdiv(triton.cdiv(c, block_n), col_blocks)


def _shift(x: Tensor, y: Tensor | None, inv_tau: Tensor, critic: str, eps: float) -> Tensor:
    """Per-head shift of the forward pass (``(H,)`` float32): ``shift_from_bound`` of
    an upper bound of S.

    s = x.y <= max|x| max|y| (Cauchy-Schwarz; log_dot: the log of that). For
    cosine the rows should be unit, making this 1/tau, but the norms are cheap
    (O(H N D) against the O(H N^2 D) kernel) and keep a caller who passes
    unnormalised rows from overflowing exp. NaN rows are left out of the
    bound: their NaN reaches the output through their own dot products, not
    through every row of the head.
    """

    def max_norm(t: Tensor) -> Tensor:
        n = torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)
        return torch.nan_to_num(n, nan=0.0, posinf=float("inf")).amax(dim=-1)

    nx = max_norm(x)
    bound = nx * (nx if y is None else max_norm(y))
    if critic == "log_dot":
        bound = bound.clamp_min(eps).log()
    return shift_from_bound(inv_tau * bound).contiguous()


def shift_from_bound(bound: Tensor) -> Tensor:
    """The forward's fixed shift from an upper bound ``B`` of S (any shape, float32):
    ``min(B, max(B - SHIFT_HEADROOM, SHIFT_LEVEL))`` (``kernels``: no term or sum can
    overflow, and rows far below a large bound keep their one-pass sums)."""
    return torch.minimum(bound, (bound - kernels.SHIFT_HEADROOM).clamp_min(kernels.SHIFT_LEVEL))


def _require(problem: Problem | RectProblem) -> Tensor:
    """Refuse what the kernels cannot take (a direct call, past ``dispatch``); returns
    ``inv_tau`` as float32."""
    why = kernel_dtype_refusal(problem.dtype) or refusal(problem)
    if why is not None:
        raise ValueError(f"the triton backend cannot run this problem: {why}")
    return problem.inv_tau.to(torch.float32)


def _lse_finalize(
    p: Problem | RectProblem, inv_tau: Tensor, operands: tuple[Tensor, Tensor], shift: Tensor,
    sums: Tensor,
) -> Tensor:
    """Turn shifted exp-sums ``(H, rows)`` of ``x`` against ``y`` (``operands``) into
    log-sum-exps, redoing underflowed rows (a labelled row without a negative: -inf)."""
    x, y = operands
    labels = _labels(p)
    h, rows = sums.shape
    cols, d = y.shape[1], x.shape[2]
    cfg = configs.finalize_config(d, x.element_size())
    lse = torch.empty_like(sums)
    _launch(
        "finalize",
        kernels.lse_finalize_kernel,
        lambda bm, bn: (triton.cdiv(rows, bm), h),
        cfg,
        x, y, inv_tau, shift, sums, lse, rows, cols, d, p.eps, _offset(p), *labels[:2],
        SKIP=_skips(p), LABELS=labels[2], LOG_DOT=p.critic == "log_dot", BLOCK_D=cfg.block_d,
        SINGLE_D=cfg.single_d, **_precision(x.dtype),
    )  # fmt: skip
    return lse


def _all_pairs(p: Problem | RectProblem) -> bool:
    return isinstance(p, Problem) and p.all_pairs


def _skips(p: Problem | RectProblem) -> bool:
    """Whether the kernels mask the pairs ``col == row + offset`` (``all``'s diagonal)."""
    return _all_pairs(p) or (isinstance(p, RectProblem) and p.offset is not None)


def _offset(p: Problem | RectProblem) -> int:
    return (p.offset or 0) if isinstance(p, RectProblem) else 0


def _labels(p: Problem | RectProblem, swapped: bool = False) -> tuple[Tensor, Tensor, bool]:
    """The kernels' ``RL``, ``CL`` (int64, the operands' rows and columns; ``swapped``:
    the columns' launch of ``rect_backward``) and ``LABELS``. Without labels, ``inv_tau``
    stands in for both pointers (never read)."""
    if isinstance(p, RectProblem) and p.labelled:
        rl, cl = p.row_labels, p.col_labels
        return (cl, rl, True) if swapped else (rl, cl, True)
    return p.inv_tau, p.inv_tau, False


def _exp_sums(
    p: Problem | RectProblem, inv_tau: Tensor, operands: tuple[Tensor, Tensor], shift: Tensor,
    sums: tuple[Tensor, Tensor],
) -> None:
    """One launch of ``fwd_exp_sums_kernel``: the shifted exp-sums of the rows of ``x``
    against ``y`` (``operands``) into ``sums`` (rows, columns; one buffer twice for
    ``all``, whose symmetric tiles add to both their rows and their columns; the
    rectangular problem adds no column sums and passes the row buffer twice)."""
    x, y = operands
    h, r, d = x.shape
    c = y.shape[1]
    all_pairs = _all_pairs(p)
    rl, cl, labelled = _labels(p)
    cfg = configs.forward_config(d, x.element_size())
    tr = triton.cdiv(r, cfg.block_m)
    # all: only the tiles on and above the diagonal run; cross: every tile.
    tc = tr if all_pairs else triton.cdiv(c, cfg.block_n)
    tiles = tr * (tr + 1) // 2 * h if all_pairs else tr * tc * h
    col_blocks = configs.column_blocks_per_program(
        tr * h, tc, tiles, configs.target_programs(x.device)
    )
    _launch(
        "fwd",
        kernels.fwd_exp_sums_kernel,
        lambda bm, bn: (triton.cdiv(r, bm), _col_chunks(c, bn, col_blocks), h),
        cfg,
        x, y, inv_tau, shift, sums[0], sums[1], r, c, d, p.eps, col_blocks, _offset(p), rl, cl,
        ALL=all_pairs, SKIP=_skips(p), LABELS=labelled, ROWS_ONLY=isinstance(p, RectProblem),
        LOG_DOT=p.critic == "log_dot", BLOCK_D=cfg.block_d,
        SINGLE_D=cfg.single_d, **_precision(x.dtype),
    )  # fmt: skip


def forward(problem: Problem) -> Stats:
    """Row (and column) log-sum-exp of ``S = inv_tau * s(a, b)`` (shapes: ``contract``),
    float32."""
    inv_tau = _require(problem)
    a, b, critic, eps = problem.a, problem.b, problem.critic, problem.eps
    h, n, _ = a.shape
    with _device_guard(a):
        if problem.all_pairs:
            z = torch.cat([a, b], dim=1)  # (H, 2N, D): rows and columns are the same matrix
            shift = _shift(z, None, inv_tau, critic, eps)
            sums = torch.zeros(h, 2 * n, dtype=torch.float32, device=a.device)
            _exp_sums(problem, inv_tau, (z, z), shift, (sums, sums))
            row_lse = _lse_finalize(problem, inv_tau, (z, z), shift, sums)
            return Stats(row_lse, row_lse.new_empty(h, 0))
        shift = _shift(a, b, inv_tau, critic, eps)
        row_sum = torch.zeros(h, n, dtype=torch.float32, device=a.device)
        col_sum = torch.zeros(h, n, dtype=torch.float32, device=a.device)
        _exp_sums(problem, inv_tau, (a, b), shift, (row_sum, col_sum))
        row_lse = _lse_finalize(problem, inv_tau, (a, b), shift, row_sum)
        # Columns of S(a, b) are the rows of S(b, a): the same kernel, operands swapped.
        col_lse = _lse_finalize(problem, inv_tau, (b, a), shift, col_sum)
        return Stats(row_lse, col_lse)


def _grad_scale(*gs: Tensor) -> Tensor:
    """Largest |g| (0-dim float32, on device), 1 where that is 0 or not finite."""
    top = torch.stack([g.abs().amax().to(torch.float32) for g in gs if g.numel()]).amax()
    return torch.where(torch.isfinite(top) & (top > 0), top, torch.ones_like(top))


@dataclass(frozen=True)
class _OneExp:
    """What the backward's one-exponential tiles need (``kernels.bwd_rows_kernel``):
    the forward's shift ``(H,)``, a per-head flag ``(H,)`` int32 that every statistic
    lies in the window around it, and ``v = g e^(shift - lse)`` of each side."""

    shift: Tensor
    fast: Tensor
    v_row: Tensor
    v_col: Tensor


def _one_exp(shift: Tensor, lse: tuple[Tensor, Tensor], g: tuple[Tensor, Tensor]) -> _OneExp:
    """Flags and factors from the statistics: a head is fast when ``lse - shift`` of every
    row and column lies in ``[log UNDERFLOW, log OVERFLOW]`` (the forward kept their
    one-pass sums), so that ``e^(shift - lse)`` cannot overflow. NaN fails the test."""
    lo, hi = math.log(kernels.UNDERFLOW.value), math.log(kernels.OVERFLOW.value)
    ok = torch.ones_like(shift, dtype=torch.bool)
    for t in lse:
        if t.numel():
            d = t - shift[:, None]
            ok &= ((d >= lo) & (d <= hi)).all(dim=1)
    v = [gi * torch.exp(shift[:, None] - t) if t.numel() else t for t, gi in zip(lse, g)]
    return _OneExp(shift, ok.to(torch.int32), v[0].contiguous(), v[1].contiguous())


def _bwd_rows(
    p: Problem | RectProblem,
    inv_tau: Tensor,
    operands: tuple[Tensor, Tensor],
    rows: tuple[Tensor, Tensor, Tensor],
    cols: tuple[Tensor, Tensor, Tensor],
    gscale: Tensor,
    one: _OneExp,
    offset: int = 0,
    swapped: bool = False,
) -> tuple[Tensor, Tensor]:
    """One launch of ``bwd_rows_kernel`` for the rows of ``x`` against ``y``
    (``operands``). ``rows``: (lse, g, center) of the rows; ``cols``: (lse, g, v) of the
    columns (``v``: ``_OneExp``). ``offset``: the mask ``col == row + offset`` (rows and
    columns swapped, its negative, and ``swapped`` the labels). Returns (dX float32 (H, R, D), temperature partials)."""
    x, y = operands
    (lse_r, g_r, center_r), (lse_c, g_c, v_c) = rows, cols
    critic = p.critic
    h, r, d = x.shape
    c = y.shape[1]
    rl, cl, labelled = _labels(p, swapped)
    cfg = configs.backward_config(d, x.element_size(), critic == "log_dot")
    tr, tc, slices = triton.cdiv(r, cfg.block_m), triton.cdiv(c, cfg.block_n), cfg.d_slices(d)
    col_blocks = configs.column_blocks_per_program(
        tr * h * slices, tc, tr * tc * h * slices, configs.target_programs(x.device)
    )
    tune = configs.autotune_enabled() and not configs.interpreting()
    atomic = _col_chunks(c, cfg.block_n, col_blocks) > 1 or not cfg.single_d or tune
    dx = (torch.zeros if atomic else torch.empty)(h, r, d, dtype=torch.float32, device=x.device)
    # One temperature partial per program, sized for the smallest tiles the
    # autotuner may pick; unused slots stay 0.
    small = min(cfg.block_m, cfg.block_n, *((64,) if tune else ()))
    most = triton.cdiv(r, small) * _col_chunks(c, small, col_blocks)
    parts = torch.zeros(h * most, dtype=torch.float32, device=x.device)
    _launch(
        "bwd",
        kernels.bwd_rows_kernel,
        lambda bm, bn: (triton.cdiv(r, bm) * slices, _col_chunks(c, bn, col_blocks), h),
        cfg,
        x, y, inv_tau, lse_r, lse_c, g_r, g_c, center_r, gscale, one.shift, one.fast, v_c, dx,
        parts, r, c, d, p.eps, col_blocks, offset, rl, cl,
        SKIP=_skips(p), LABELS=labelled, LOG_DOT=critic == "log_dot", ATOMIC=atomic,
        GRAD_TF32=critic == "log_dot" and x.dtype == torch.float16,
        ONE_EXP=x.element_size() <= 2, BLOCK_D=cfg.block_d,
        SINGLE_D=cfg.single_d, SLICE_D=cfg.grad_d, **_precision(x.dtype),
    )  # fmt: skip
    return dx, parts


def backward(problem: Problem, stats: Stats, upstream: Upstream) -> Grads:
    """Gradients of ``sum(g_row * row_lse) + sum(g_col * col_lse)`` and the centred
    temperature sum (``contract``): float32 ``(H, N, D)`` twice and a 0-dim float32."""
    inv_tau = _require(problem)
    row_lse, col_lse, g_row, g_col, row_center, col_center = (
        t.to(torch.float32).contiguous()
        for t in (stats.row_lse, stats.col_lse, upstream.g_row, upstream.g_col,
                  upstream.row_center, upstream.col_center)
    )  # fmt: skip
    a, b = problem.a, problem.b
    n = a.shape[1]
    with _device_guard(a):
        crit, eps = problem.critic, problem.eps
        if problem.all_pairs:
            z = torch.cat([a, b], dim=1)
            one = _one_exp(_shift(z, None, inv_tau, crit, eps), (row_lse, col_lse), (g_row, g_col))
            dz, parts = _bwd_rows(
                problem, inv_tau, (z, z), (row_lse, g_row, row_center),
                (row_lse, g_row, one.v_row), _grad_scale(g_row), one, 0,
            )  # fmt: skip
            return Grads(dz[:, :n], dz[:, n:], parts.sum())
        one = _one_exp(_shift(a, b, inv_tau, crit, eps), (row_lse, col_lse), (g_row, g_col))
        gscale = _grad_scale(g_row, g_col)
        da, parts_a = _bwd_rows(
            problem, inv_tau, (a, b), (row_lse, g_row, row_center), (col_lse, g_col, one.v_col),
            gscale, one,
        )  # fmt: skip
        db, parts_b = _bwd_rows(
            problem, inv_tau, (b, a), (col_lse, g_col, col_center), (row_lse, g_row, one.v_row),
            gscale, one,
        )  # fmt: skip
        return Grads(da, db, parts_a.sum() + parts_b.sum())


def rect_forward(problem: RectProblem) -> Tensor:
    """Row log-sum-exp ``(H, R)`` float32 of the rows x against the columns y
    (``contract``): the forward's two kernels without the symmetric triangle, no column
    sums, the pairs ``col == row + offset`` masked."""
    inv_tau = _require(problem)
    x, y = problem.x, problem.y
    h, r, _ = x.shape
    with _device_guard(x):
        shift = _shift(x, y, inv_tau, problem.critic, problem.eps)
        sums = torch.zeros(h, r, dtype=torch.float32, device=x.device)
        _exp_sums(problem, inv_tau, (x, y), shift, (sums, sums))
        return _lse_finalize(problem, inv_tau, (x, y), shift, sums)


def rect_backward(problem: RectProblem, lse: Tensor, g: Tensor, center: Tensor) -> RectGrads:
    """Gradients of ``sum(g * lse)`` w.r.t. x ``(H, R, D)`` and y ``(H, C, D)`` (float32) and
    the centred temperature sum (``contract``).

    Two launches of ``bwd_rows_kernel``: x's rows against y with the row statistics
    (the columns carry none: lse = +inf, g = 0, so their term is exactly 0), then y's
    rows against x with the statistics on the column side and none on the rows (whose
    temperature partials are then 0), the mask's offset negated; the second only where
    ``problem.columns_grad`` (a detached queue's gradient is zeros, not computed).
    """
    inv_tau = _require(problem)
    lse, g, center = (t.to(torch.float32).contiguous() for t in (lse, g, center))
    x, y = problem.x, problem.y
    h, c = y.shape[0], y.shape[1]
    off = _offset(problem)
    with _device_guard(x):
        gscale = _grad_scale(g)
        # +inf, not a large finite value: exp(S - lse) must be 0 even where S overflows
        # no further than to a finite number, and 0 * exp(...) must not meet an inf.
        none_lse = torch.full((h, c), float("inf"), dtype=torch.float32, device=x.device)
        none_g = torch.zeros(h, c, dtype=torch.float32, device=x.device)
        shift = _shift(x, y, inv_tau, problem.critic, problem.eps)  # the forward's
        one = _one_exp(shift, (lse, none_g[:, :0]), (g, none_g[:, :0]))
        dx, parts = _bwd_rows(
            problem, inv_tau, (x, y), (lse, g, center), (none_lse, none_g, none_g), gscale,
            one, off,
        )  # fmt: skip
        if not problem.columns_grad:  # a detached queue: its product would be dropped
            return RectGrads(dx, torch.zeros(y.shape, dtype=torch.float32, device=y.device),
                             parts.sum())  # fmt: skip
        dy, _ = _bwd_rows(
            problem, inv_tau, (y, x), (none_lse, none_g, none_g), (lse, g, one.v_row), gscale,
            one, -off, swapped=True,
        )  # fmt: skip
        return RectGrads(dx, dy, parts.sum())
