"""The fused losses across ranks: local rows against the gathered columns of every rank.

Convention (open_clip's local loss with gathered features, lightly's
``gather_distributed``): each rank returns the mean over its own rows, so the
mean of the ranks' values is the single-process loss over the concatenated
batch. The gather keeps its gradient: its backward sums every rank's column
gradient and hands each rank its own slice, so the gradient a rank gets for
its local inputs is ``world_size x`` the single-process gradient, and DDP's
averaging of parameter gradients yields exactly the single-process gradient.
A temperature is not gathered: each rank's temperature gradient is that of its
own mean, and their average (what DDP applies) is the single-process gradient.

The log_dot closed form at tau = 1 (in ``functional``) needs only every rank's
column sums (:func:`sum_with_grad`), not the rows.

Kernels: each rank's rows against the gathered columns is the rectangular
problem of ``contract.RectProblem`` (for ``all`` the local rows ``[a; b]`` skip
their own columns, which start at ``offset = rank x 2 N_local`` in the gathered
``[a_0; b_0; a_1; b_1; ...]``), run by the backend ``dispatch.resolve`` picks for
it under the single-process rules: the fused kernels (Triton on a GPU, the C++
kernel on CPU) where they run, the tiled torch backend for float64 and as the
fallback.

Memory: the gathered columns, ``2 x world_size x N_local x D`` elements per
head, are the only global tensors; similarities are formed tile by tile (the
torch backend: one row block at a time, ``O(block x M_global)``), never
``M_local x M_global``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mimac_kernels import dispatch
from mimac_kernels.contract import Problem, RectProblem
from mimac_kernels.options import DTYPES


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 1 whose backward returns this rank's share of the summed gradient.

    Owned here rather than taken from ``torch.distributed.nn``: the latter was seen
    to return wrong input gradients for non-contiguous incoming gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group, ctx.n = group, x.shape[1]
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()  # a transposed or expanded gradient must be densified first
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[:, rank * ctx.n : (rank + 1) * ctx.n].contiguous(), None


def gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's ``x`` along dim 1, keeping the gradient path.

    Shape: ``(H, N, D)`` -> ``(H, world_size * N, D)``, ranks in order.
    """
    return _GatherWithGrad.apply(x, group)


class _SumWithGrad(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: every rank uses the sum
    in the same way, so one rank's input gets the sum of every rank's incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_with_grad(x: Tensor, group=None) -> Tensor:
    """Elementwise sum of every rank's ``x`` (same shape on every rank), differentiable."""
    return _SumWithGrad.apply(x, group)


class _RectLoss(torch.autograd.Function):
    """Per-row losses ``lse - inv_tau * pos`` of rows ``x`` against columns ``y`` (row ``i``
    skipping column ``i + offset`` unless ``offset`` is None) on ``backend`` (a name or
    ``"auto"``, resolved for the ``RectProblem``). As in ``ops``, the positive enters here
    so that the temperature gradient is summed centred, element by element."""

    @staticmethod
    def forward(ctx, x, y, inv_tau, pos, critic, eps, offset, backend):
        problem = RectProblem(x, y, inv_tau, critic, eps, offset)
        name = dispatch.resolve(backend, problem)
        lse = dispatch.get_backend(name).rect_forward(problem)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        lse = lse.to(dt)
        ctx.save_for_backward(x, y, inv_tau, pos, lse)
        ctx.args = (critic, eps, offset, name)
        return lse - inv_tau.to(dt) * pos.to(dt)

    @staticmethod
    def backward(ctx, g):
        x, y, inv_tau, pos, lse = ctx.saved_tensors
        critic, eps, offset, name = ctx.args
        g = g.contiguous()
        problem = RectProblem(x, y, inv_tau, critic, eps, offset)
        grads = dispatch.get_backend(name).rect_backward(problem, lse, g, pos)
        g_pos = (-inv_tau.to(g.dtype) * g).to(pos.dtype)
        return (grads.x.to(x.dtype), grads.y.to(y.dtype), grads.inv_tau.to(inv_tau.dtype),
                g_pos, None, None, None, None)  # fmt: skip


def rect_row_losses(
    x: Tensor,
    y: Tensor,
    inv_tau: Tensor,
    pos: Tensor,
    critic: str,
    eps: float = 1e-12,
    *,
    offset: int | None,
    backend: str = "auto",
) -> Tensor:
    """Per-row losses ``lse_i - inv_tau * pos_i`` of rows ``x`` against columns ``y`` on the
    fused rectangular kernels (row i skips column ``i + offset``; ``None``: none), with
    their gradients: one rank's share of the losses across ranks. ``cosine`` takes unit
    rows (the kernels' contract: the caller normalises, as ``fused_contrastive_loss`` does).

    Shape: x ``(R, D)`` or ``(H, R, D)``, y ``(C, D)`` or ``(H, C, D)``, pos ``(R,)`` or
    ``(H, R)`` (raw positive scores); inv_tau 0-dim. Returns ``(R,)`` or ``(H, R)``.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x, y, pos = x.unsqueeze(0), y.unsqueeze(0), pos.unsqueeze(0)
    rows = _RectLoss.apply(x, y, inv_tau, pos, critic, eps, offset, backend)
    return rows.squeeze(0) if squeeze else rows


def check_equal_inputs(x: Tensor, group) -> None:
    """Refuse per-rank inputs of different shapes or dtypes, on every rank alike.

    Unequal N: the mean of rank means would not be the global mean. Unequal H, D or
    dtype: the all-gather itself would fail (gloo aborts the process, NCCL may hang).
    ``x``: this rank's ``(H, N, D)`` rows, of a dtype ``fused_contrastive_loss`` checked.
    """
    world = dist.get_world_size(group)
    code = DTYPES.index(x.dtype)
    mine = torch.tensor([*x.shape, code], dtype=torch.int64, device=x.device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    got = [tuple(int(v) for v in t) for t in every]
    if len({(h, d, c) for h, _, d, c in got}) != 1:
        shown = [f"H={h}, D={d}, {DTYPES[c]}" for h, _, d, c in got]
        raise ValueError(
            f"with group=, every rank must pass the same heads H, features D and dtype; "
            f"got per rank: {shown}"
        )
    sizes = [n for _, n, _, _ in got]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"with group=, every rank must pass the same batch size N; got N per rank = {sizes} "
            "(drop the last uneven batch, e.g. DataLoader(drop_last=True))"
        )


def distributed_losses(
    problem: Problem, pos_raw: Tensor, group, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Per-row (and per-column) losses of this rank's rows against every rank's columns,
    on ``backend`` (``"auto"`` or a name, as ``fused_contrastive_loss`` takes it).

    Shape:
        problem.a, problem.b: ``(H, N, D)`` local; pos_raw: ``(H, N)`` unscaled positive
        scores.
        Returns ``(H, 2N)`` and ``(H, 0)`` for ``all`` (rows ``[a; b]`` against every
        rank's ``[a_r; b_r]``), ``(H, N)`` and ``(H, N)`` for ``cross`` (``a`` against
        ``b_all``, ``b`` against ``a_all``).
    """
    a, b, inv_tau, critic, eps = problem.a, problem.b, problem.inv_tau, problem.critic, problem.eps
    check_equal_inputs(a, group)
    if problem.all_pairs:
        # One rectangular problem: the local rows [a; b] against every rank's [a_r; b_r],
        # gathered in rank order, so this rank's own columns start at rank * 2N.
        z = torch.cat([a, b], dim=1)
        z_all = gather_with_grad(z, group)
        offset = dist.get_rank(group) * z.shape[1]
        pos = torch.cat([pos_raw, pos_raw], dim=-1)
        rows = _RectLoss.apply(z, z_all, inv_tau, pos, critic, eps, offset, backend)
        return rows, rows[..., :0]
    a_all, b_all = gather_with_grad(a, group), gather_with_grad(b, group)
    row = _RectLoss.apply(a, b_all, inv_tau, pos_raw, critic, eps, None, backend)
    col = _RectLoss.apply(b, a_all, inv_tau, pos_raw, critic, eps, None, backend)  # f(x,y)=f(y,x)
    return row, col
