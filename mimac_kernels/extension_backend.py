"""What the two compiled backends (``cpu``, ``cuda``) share: argument encoding and the calls.

Both extensions register the same torch operators (``torch.ops.mimac_cpu`` for the CPU
dispatch key, ``torch.ops.mimac_cuda`` for CUDA, ``torch.ops.mimac_cuda_emu`` for the
CUDA kernels on the CPU emulation): ``forward(a, b, inv_tau, critic, all_pairs, eps)``
and ``backward(..., row_lse, col_lse, g_row, g_col, row_center, col_center)``, and for
the rectangular problem ``rect_forward(x, y, inv_tau, critic, offset, eps)`` and
``rect_backward(..., lse, g, center)`` (``critic``: an id of ``CRITIC_IDS``; ``offset``:
an int or ``None``), with the kernel-level contract of ``mimac_kernels.contract``
(their fake implementations: ``mimac_kernels.extension_fakes``); they differ only in
where they run, which ``cpu_backend``/``cuda_backend`` check. ``extension.load(kind)``
returns the namespace.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimac_kernels import extension
from mimac_kernels.contract import (
    LABEL_MASK_REFUSAL,
    Grads,
    Problem,
    RectGrads,
    RectProblem,
    Stats,
    Upstream,
)

#: Critic name -> id of the C++ kernels (``csrc/cpu/contrastive.cpp``, ``csrc/cuda/binding.cpp``).
CRITIC_IDS = {"dot": 0, "cosine": 1, "log_dot": 2}


def _inv_tau(problem: Problem | RectProblem) -> Tensor:
    # A device pointer for CUDA, a host value for the CPU kernel: float32 beside the data.
    return problem.inv_tau.detach().to(device=problem.device, dtype=torch.float32)


def _head(problem: Problem) -> tuple[Tensor, Tensor, Tensor, int, bool, float]:
    """The leading arguments of both extension calls (cosine inputs arrive normalised)."""
    critic_id = CRITIC_IDS[problem.critic]
    return problem.a, problem.b, _inv_tau(problem), critic_id, problem.all_pairs, float(problem.eps)


def _rect_head(problem: RectProblem) -> tuple[Tensor, Tensor, Tensor, int, int | None, float]:
    """The leading arguments of both rectangular calls."""
    critic_id = CRITIC_IDS[problem.critic]
    return problem.x, problem.y, _inv_tau(problem), critic_id, problem.offset, float(problem.eps)


def forward(kind: str, problem: Problem) -> Stats:
    """Row/column log-sum-exps on the ``kind`` extension, float32 (shapes: ``contract``)."""
    row, col = extension.load(kind).forward(*_head(problem))
    return Stats(row, col)


def backward(kind: str, problem: Problem, stats: Stats, upstream: Upstream) -> Grads:
    """Gradients and the centred temperature sum on the ``kind`` extension: float32
    ``(H, N, D)`` twice and a 0-dim float32 tensor."""
    f32 = [
        t.float().contiguous()
        for t in (stats.row_lse, stats.col_lse, upstream.g_row, upstream.g_col,
                  upstream.row_center, upstream.col_center)
    ]  # fmt: skip
    ga, gb, gt = extension.load(kind).backward(*_head(problem), *f32)
    return Grads(ga, gb, gt)


def _rect_labels(kind: str, problem: RectProblem) -> dict[str, Tensor]:
    """The labels as the kernels take them: int32 class ids of the rows and of the columns
    (one numbering for both), or none. The cuda kernels have no label mask: a labelled
    problem is refused there, never run unmasked."""
    if not problem.labelled:
        return {}
    if kind == "cuda":
        raise ValueError(f"the cuda kernels cannot run this problem: {LABEL_MASK_REFUSAL}")
    rl, cl = problem.row_labels, problem.col_labels
    _, ids = torch.unique(torch.cat([rl, cl]), return_inverse=True)
    ids = ids.to(torch.int32)
    return {"row_labels": ids[: rl.numel()].contiguous(), "col_labels": ids[rl.numel() :]}


def rect_forward(kind: str, problem: RectProblem) -> Tensor:
    """Row log-sum-exp ``(H, R)`` float32 of a ``RectProblem`` on the ``kind`` extension
    (pairs of one label left out as well, where it has labels)."""
    labels = _rect_labels(kind, problem)  # refuses before any build
    return extension.load(kind).rect_forward(*_rect_head(problem), **labels)


def rect_backward(
    kind: str, problem: RectProblem, lse: Tensor, g: Tensor, center: Tensor
) -> RectGrads:
    """Gradients ``(H, R, D)``, ``(H, C, D)`` float32 and the centred temperature sum
    (0-dim) of a ``RectProblem`` on the ``kind`` extension."""
    labels = _rect_labels(kind, problem)
    f32 = [t.float().contiguous() for t in (lse, g, center)]
    ops = extension.load(kind)
    # columns_grad=False: no dY product (zeros come back), on both kernels.
    gx, gy, gt = ops.rect_backward(*_rect_head(problem), *f32,
                                   columns_grad=problem.columns_grad, **labels)  # fmt: skip
    return RectGrads(gx, gy, gt)
