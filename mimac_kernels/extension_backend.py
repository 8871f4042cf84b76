"""What the two compiled backends (``cpu``, ``cuda``) share: argument encoding and the calls.

Both extensions expose ``forward(a, b, inv_tau, critic_id, all, eps)`` and
``backward(..., row_lse, col_lse, g_row, g_col, row_center, col_center)`` with the
kernel-level contract of ``mimac_kernels.contract``; they differ only in where they
run, which ``cpu_backend``/``cuda_backend`` check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimac_kernels import extension
from mimac_kernels.contract import Grads, Problem, Stats, Upstream

#: Critic name -> id of the C++ kernels (``csrc/cpu/contrastive.cpp``, ``csrc/cuda/binding.cpp``).
CRITIC_IDS = {"dot": 0, "cosine": 1, "log_dot": 2}


def _head(problem: Problem) -> tuple[Tensor, Tensor, Tensor, int, bool, float]:
    """The leading arguments of both extension calls (cosine inputs arrive normalised)."""
    # inv_tau: a device pointer for CUDA, a host value for the CPU kernel, float32 beside the data.
    inv_tau = problem.inv_tau.detach().to(device=problem.device, dtype=torch.float32)
    critic_id = CRITIC_IDS[problem.critic]
    return problem.a, problem.b, inv_tau, critic_id, problem.all_pairs, float(problem.eps)


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
