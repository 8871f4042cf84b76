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

Memory: the gathered columns, ``2 x world_size x N_local x D`` elements per
head, are the only global tensors; similarities are formed one row block at
a time (``O(block x M_global)``), never ``M_local x M_global``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mimac_kernels import torch_backend
from mimac_kernels.contract import Problem
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
    """Per-row losses ``lse - inv_tau * pos`` of ``x`` against ``y`` (self-pairs skipped),
    tiled; see ``torch_backend.rect_*``. As in ``ops``, the positive enters here so that
    the temperature gradient is summed centred, element by element."""

    @staticmethod
    def forward(ctx, x, y, inv_tau, pos, critic, eps, skip):
        lse = torch_backend.rect_forward(x, y, inv_tau, critic=critic, eps=eps, skip=skip)
        ctx.save_for_backward(x, y, inv_tau, pos, lse)
        ctx.args = (critic, eps, skip)
        return lse - inv_tau.to(lse.dtype) * pos.to(lse.dtype)

    @staticmethod
    def backward(ctx, g):
        x, y, inv_tau, pos, lse = ctx.saved_tensors
        critic, eps, skip = ctx.args
        g = g.contiguous()
        gx, gy, gt = torch_backend.rect_backward(
            x, y, inv_tau, critic=critic, eps=eps, skip=skip, lse=lse, g=g, center=pos
        )
        g_pos = (-inv_tau.to(g.dtype) * g).to(pos.dtype)
        return gx.to(x.dtype), gy.to(y.dtype), gt.to(inv_tau.dtype), g_pos, None, None, None


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


def distributed_losses(problem: Problem, pos_raw: Tensor, group) -> tuple[Tensor, Tensor]:
    """Per-row (and per-column) losses of this rank's rows against every rank's columns.

    Shape:
        problem.a, problem.b: ``(H, N, D)`` local; pos_raw: ``(H, N)`` unscaled positive
        scores.
        Returns ``(H, 2N)`` and ``(H, 0)`` for ``all`` (rows ``[a; b]`` against
        ``[a_all; b_all]``), ``(H, N)`` and ``(H, N)`` for ``cross`` (``a`` against
        ``b_all``, ``b`` against ``a_all``).
    """
    a, b, inv_tau, critic, eps = problem.a, problem.b, problem.inv_tau, problem.critic, problem.eps
    check_equal_inputs(a, group)
    n = a.shape[1]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    a_all, b_all = gather_with_grad(a, group), gather_with_grad(b, group)
    own = torch.arange(n, device=a.device) + rank * n
    if problem.all_pairs:
        z_all = torch.cat([a_all, b_all], dim=1)
        row_a = _RectLoss.apply(a, z_all, inv_tau, pos_raw, critic, eps, own)
        row_b = _RectLoss.apply(b, z_all, inv_tau, pos_raw, critic, eps, own + world * n)
        return torch.cat([row_a, row_b], dim=1), row_a[..., :0]
    row = _RectLoss.apply(a, b_all, inv_tau, pos_raw, critic, eps, None)
    col = _RectLoss.apply(b, a_all, inv_tau, pos_raw, critic, eps, None)  # f(x, y) = f(y, x)
    return row, col
