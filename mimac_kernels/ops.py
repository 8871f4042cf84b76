"""The custom ops: the quadratic part of every loss.

``mimac_kernels::lse_fwd`` computes, without storing the similarity matrix,
the per-row (and, for ``cross``, per-column) values ``lse - inv_tau * pos``:
the log-sum-exp of the scaled similarities minus the scaled positive score,
i.e. the unreduced losses. It also returns the log-sum-exps themselves (not
differentiable) for the backward. ``mimac_kernels::lse_bwd`` recomputes the
matrix tile by tile for the gradient. Both carry fake implementations and
``register_autograd`` joins them, so the pair passes ``torch.library.opcheck``
and traces under ``torch.compile(fullgraph=True)``.

Why the positives enter the op, as the *centres* ``row_center``/``col_center`` of
``contract.Upstream``: the temperature gradient is ``sum_ik W_ik s_ik - sum_i g_i
pos_i``, two large terms that nearly cancel. Inside the backward each row's weights
sum to ``g_i``, so the backends form ``sum_ik W_ik (s_ik - pos_i)`` element by
element, as accurate as the plain full-matrix loss, instead of subtracting two
float32 totals afterwards.

The options (critic, negatives, eps, backend) are keyword-only arguments of both ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimac_kernels import dispatch
from mimac_kernels.contract import Problem, Stats, Upstream


def _stat_dtype(a: Tensor) -> torch.dtype:
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _stat_shapes(a: Tensor, negatives: str) -> tuple[int, int]:
    n = a.shape[1]
    return (2 * n, 0) if negatives == "all" else (n, n)


@torch.library.custom_op("mimac_kernels::lse_fwd", mutates_args=())
def lse_fwd(
    a: Tensor,
    b: Tensor,
    inv_tau: Tensor,
    row_center: Tensor,
    col_center: Tensor,
    *,
    critic: str,
    negatives: str,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unreduced losses ``lse - inv_tau * center`` of rows and columns, plus the lse themselves.

    Shape:
        a, b: ``(H, N, D)``. row_center, col_center: the raw positive scores (unscaled),
        ``(H, 2N)`` and ``(H, 0)`` for ``all``, ``(H, N)`` and ``(H, N)`` for
        ``cross``. Returns ``(row_loss, col_loss, row_lse, col_lse)`` of those shapes.
    """
    problem = Problem(a, b, inv_tau, critic, negatives, eps)
    stats = dispatch.get_backend(dispatch.resolve(backend, problem)).forward(problem)
    dt = _stat_dtype(a)
    row_lse, col_lse = stats.row_lse.to(dt), stats.col_lse.to(dt)
    it = inv_tau.to(dt)
    outs = (row_lse - it * row_center.to(dt), col_lse - it * col_center.to(dt), row_lse, col_lse)
    # Outputs may not alias inputs or each other, and must be dense like the fake's.
    return _unaliased(outs, (a, b, inv_tau, row_center, col_center))


@lse_fwd.register_fake
def _(a, b, inv_tau, row_center, col_center, *, critic, negatives, eps, backend):
    dt = _stat_dtype(a)
    return tuple(a.new_empty(a.shape[0], k, dtype=dt) for k in _stat_shapes(a, negatives) * 2)


@torch.library.custom_op("mimac_kernels::lse_bwd", mutates_args=())
def lse_bwd(
    a: Tensor,
    b: Tensor,
    inv_tau: Tensor,
    stats: list[Tensor],
    upstream: list[Tensor],
    *,
    critic: str,
    negatives: str,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``sum(g_row * row_lse) + sum(g_col * col_lse)`` w.r.t. a and b, and the
    temperature gradient of the losses, ``sum W (s - center)`` (see the module docstring).

    ``stats``: the fields of ``contract.Stats`` (row_lse, col_lse); ``upstream``: those of
    ``contract.Upstream`` (g_row, g_col, row_center, col_center), in order.
    """
    problem = Problem(a, b, inv_tau, critic, negatives, eps)
    grads = dispatch.get_backend(dispatch.resolve(backend, problem)).backward(
        problem,
        Stats(*(t.contiguous() for t in stats)),
        Upstream(*(t.contiguous() for t in upstream)),
    )
    return _unaliased(
        (grads.a.to(a.dtype), grads.b.to(b.dtype), grads.inv_tau.to(inv_tau.dtype).reshape(())),
        (a, b, inv_tau, *stats, *upstream),
    )


@lse_bwd.register_fake
def _(a, b, inv_tau, stats, upstream, *, critic, negatives, eps, backend):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(inv_tau)


def _unaliased(outs: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Dense outputs that share no storage with each other or the op's inputs.

    Backends may return views of one buffer (e.g. the two halves of ``grad z``);
    those are copied here, once, instead of in every backend.
    """
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    result = []
    for t in outs:
        t = t.contiguous()  # the fake impls promise dense outputs
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        result.append(t)
    return tuple(result)


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    a, b, inv_tau, row_center, col_center = inputs
    _, _, row_lse, col_lse = output
    ctx.mark_non_differentiable(row_lse, col_lse)
    ctx.save_for_backward(a, b, inv_tau, row_lse, col_lse, row_center, col_center)
    ctx.options = dict(keyword_only_inputs)


def _backward(ctx, g_row: Tensor | None, g_col: Tensor | None, _g_rl=None, _g_cl=None):
    a, b, inv_tau, row_lse, col_lse, row_center, col_center = ctx.saved_tensors
    # A `.sum().backward()` hands in stride-0 (expanded) gradients: densify.
    g_row = torch.zeros_like(row_lse) if g_row is None else g_row.contiguous()
    g_col = torch.zeros_like(col_lse) if g_col is None else g_col.contiguous()
    ga, gb, gt = lse_bwd(
        a, b, inv_tau, [row_lse, col_lse], [g_row, g_col, row_center, col_center], **ctx.options
    )
    it = inv_tau.to(g_row.dtype)
    g_row_center = (-it * g_row).to(row_center.dtype)
    g_col_center = (-it * g_col).to(col_center.dtype)
    return ga, gb, gt, g_row_center, g_col_center


lse_fwd.register_autograd(_backward, setup_context=_setup_context)
