"""The ``torch`` backend: pure PyTorch, tiled over row blocks.

Forward and backward hold ``O(block x M)`` memory, never ``M x M``. It is the
fallback on every device, and in float64 the kernel-level oracle the other
backends are tested against (it also runs ``gradcheck``). Contract: ``contract``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mimac_kernels.contract import Grads, Problem, RectGrads, RectProblem, Stats, Upstream
from mimac_kernels.options import DTYPES

#: Elements of one (rows x M) similarity tile; bounds the working set.
TILE_ELEMS = int(os.environ.get("MIMAC_KERNELS_TORCH_TILE", str(1 << 21)))


def probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` for every floating dtype this backend handles, on any device."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not a floating type this backend handles"
    return None


def refusal(problem: Problem | RectProblem) -> str | None:
    """Never: plain tensor ops take any shape."""
    return None


def _block(m: int) -> int:
    return max(1, min(m, TILE_ELEMS // max(m, 1)))


def _acc(x: Tensor) -> Tensor:
    """Accumulation dtype: float32 for half types, float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _scores(x: Tensor, y: Tensor, critic: str, eps: float) -> tuple[Tensor, Tensor | None]:
    """Raw similarities s (rows of x against rows of y) and, for log_dot, the dot products."""
    dots = x @ y.transpose(-1, -2)
    if critic == "log_dot":
        return dots.clamp_min(eps).log(), dots
    return dots, None


def _dscore(w: Tensor, dots: Tensor | None, inv_tau: Tensor, eps: float) -> Tensor:
    """Chain dL/dS = w through S = inv_tau * s to dL/d(dot)."""
    w = w * inv_tau
    if dots is not None:  # d log(max(d, eps)) / dd = 1/d where d > eps, else 0
        w = torch.where(dots > eps, w / dots, torch.zeros_like(w))
    return w


def forward(problem: Problem) -> Stats:
    """Row (and column) log-sum-exps, one row block at a time."""
    a, b = _acc(problem.a), _acc(problem.b)
    critic, eps = problem.critic, problem.eps
    it = problem.inv_tau.to(a.dtype)
    h, n, _ = a.shape
    if problem.all_pairs:
        z = torch.cat([a, b], dim=1)
        m = 2 * n
        row_lse = torch.empty(h, m, dtype=a.dtype, device=a.device)
        bs = _block(m)
        for i0 in range(0, m, bs):
            i1 = min(i0 + bs, m)
            s = it * _scores(z[:, i0:i1], z, critic, eps)[0]
            idx = torch.arange(i0, i1, device=a.device)
            s[:, idx - i0, idx] = float("-inf")  # self-pair excluded
            row_lse[:, i0:i1] = torch.logsumexp(s, dim=-1)
        return Stats(row_lse, a.new_empty(h, 0))
    row_lse = torch.empty(h, n, dtype=a.dtype, device=a.device)
    col_lse = torch.full((h, n), float("-inf"), dtype=a.dtype, device=a.device)
    bs = _block(n)
    for i0 in range(0, n, bs):
        s = it * _scores(a[:, i0 : i0 + bs], b, critic, eps)[0]
        row_lse[:, i0 : i0 + bs] = torch.logsumexp(s, dim=-1)
        # Merged block by block: keeping every block's (H, N) partial would cost N^2 / block.
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(s, dim=-2))
    return Stats(row_lse, col_lse)


def backward(problem: Problem, stats: Stats, upstream: Upstream) -> Grads:
    """Gradients recomputed tile by tile (see ``contract``)."""
    a, b = _acc(problem.a), _acc(problem.b)
    critic, eps = problem.critic, problem.eps
    dt = a.dtype
    it = problem.inv_tau.to(dt)
    row_lse, col_lse = stats.row_lse.to(dt), stats.col_lse.to(dt)
    g_row, g_col = upstream.g_row.to(dt), upstream.g_col.to(dt)
    row_center, col_center = upstream.row_center.to(dt), upstream.col_center.to(dt)
    n = a.shape[1]
    g_it = torch.zeros((), dtype=dt, device=a.device)
    if problem.all_pairs:
        z = torch.cat([a, b], dim=1)
        m = 2 * n
        gz = torch.zeros_like(z)
        bs = _block(m)
        for i0 in range(0, m, bs):
            i1 = min(i0 + bs, m)
            s, dots = _scores(z[:, i0:i1], z, critic, eps)
            w = torch.exp(it * s - row_lse[:, i0:i1, None]) * g_row[:, i0:i1, None]
            idx = torch.arange(i0, i1, device=a.device)
            w[:, idx - i0, idx] = 0.0
            g_it = g_it + (w * (s - row_center[:, i0:i1, None])).sum()
            wd = _dscore(w, dots, it, eps)
            gz[:, i0:i1] += wd @ z  # row side: d s(z_i, z_k) / d z_i
            gz += wd.transpose(-1, -2) @ z[:, i0:i1]  # column side: d / d z_k
        return Grads(gz[:, :n], gz[:, n:], g_it)
    ga, gb = torch.zeros_like(a), torch.zeros_like(b)
    bs = _block(n)
    for i0 in range(0, n, bs):
        i1 = min(i0 + bs, n)
        s, dots = _scores(a[:, i0:i1], b, critic, eps)
        s_t = it * s
        w_row = torch.exp(s_t - row_lse[:, i0:i1, None]) * g_row[:, i0:i1, None]
        w_col = torch.exp(s_t - col_lse[:, None, :]) * g_col[:, None, :]
        g_it = g_it + (w_row * (s - row_center[:, i0:i1, None])).sum()
        g_it = g_it + (w_col * (s - col_center[:, None, :])).sum()
        wd = _dscore(w_row + w_col, dots, it, eps)
        ga[:, i0:i1] = wd @ b
        gb += wd.transpose(-1, -2) @ a[:, i0:i1]
    return Grads(ga, gb, g_it)


def _same_label(problem: RectProblem, i0: int, i1: int) -> Tensor:
    """``(rows, C)``: the pairs of rows ``[i0, i1)`` with their column's label."""
    return problem.row_labels[i0:i1, None] == problem.col_labels[None, :]


def _skipped(problem: RectProblem, i0: int, i1: int) -> tuple[Tensor, Tensor] | None:
    """(tile rows, columns) of the pairs left out among rows ``[i0, i1)``, or ``None``."""
    if problem.offset is None:
        return None
    rows = torch.arange(i0, i1, device=problem.device)
    cols = rows + problem.offset
    keep = (cols >= 0) & (cols < problem.y.shape[1])
    return rows[keep] - i0, cols[keep]


def rect_forward(problem: RectProblem) -> Tensor:
    """Row log-sum-exp of the rows ``x`` against the columns ``y``, one row block at a time
    (``contract``).

    Shape: x ``(H, R, D)``, y ``(H, C, D)``; returns ``(H, R)``.
    """
    x, y = _acc(problem.x), _acc(problem.y)
    it = problem.inv_tau.to(x.dtype)
    r = x.shape[1]
    out = torch.empty(x.shape[0], r, dtype=x.dtype, device=x.device)
    bs = _block(y.shape[1])
    for i0 in range(0, r, bs):
        i1 = min(i0 + bs, r)
        s = it * _scores(x[:, i0:i1], y, problem.critic, problem.eps)[0]
        skip = _skipped(problem, i0, i1)
        if skip is not None:
            s[:, skip[0], skip[1]] = float("-inf")
        if problem.labelled:
            s = s.masked_fill(_same_label(problem, i0, i1), float("-inf"))
        out[:, i0:i1] = torch.logsumexp(s, dim=-1)
    return out


def rect_backward(problem: RectProblem, lse: Tensor, g: Tensor, center: Tensor) -> RectGrads:
    """Gradients of ``sum(g * lse)`` w.r.t. x and y, recomputed by tiles, and the centred
    temperature sum ``sum_ik W_ik (s_ik - center_i)`` (``contract``).

    Shape: lse, g, center ``(H, R)``; returns x ``(H, R, D)``, y ``(H, C, D)``, 0-dim.
    """
    x, y = _acc(problem.x), _acc(problem.y)
    critic, eps = problem.critic, problem.eps
    it = problem.inv_tau.to(x.dtype)
    lse, g, center = lse.to(x.dtype), g.to(x.dtype), center.to(x.dtype)
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    g_it = torch.zeros((), dtype=x.dtype, device=x.device)
    r = x.shape[1]
    bs = _block(y.shape[1])
    for i0 in range(0, r, bs):
        i1 = min(i0 + bs, r)
        s, dots = _scores(x[:, i0:i1], y, critic, eps)
        w = torch.exp(it * s - lse[:, i0:i1, None]) * g[:, i0:i1, None]
        skip = _skipped(problem, i0, i1)
        if skip is not None:
            w[:, skip[0], skip[1]] = 0.0
        if problem.labelled:  # masked_fill also drops exp(-inf - -inf) of a row of none
            w = w.masked_fill(_same_label(problem, i0, i1), 0.0)
        g_it = g_it + (w * (s - center[:, i0:i1, None])).sum()
        wd = _dscore(w, dots, it, eps)
        gx[:, i0:i1] = wd @ y
        if problem.columns_grad:
            gy += wd.transpose(-1, -2) @ x[:, i0:i1]
    return RectGrads(gx, gy, g_it)
