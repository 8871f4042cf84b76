"""PML's NTXent with labels on a backend with labelled rectangular kernels (triton, cpu).

Per positive pair (a, p) the loss is ``softplus(M_a - S_ap)`` (docs/losses.md, "Labels"),
``M_a = log sum_{n: label_n != label_a} e^{S_an}`` the negatives' log-sum-exp:

- ``M`` is ``rect_forward`` of the rows against the columns with their labels (a pair of
  one label is left out like the self-pair, inside the score loop; never total minus
  positives). Its gradient is ``rect_backward`` with the row weights
  ``w_a = g_a sum_p sigma(M_a - S_ap)``.
- The positive pairs need only same-label scores: rows sorted by label, in blocks of
  whole classes (or slices of a large one) against the contiguous columns of their
  classes (columns sorted by label too), ``O(block x range)`` memory, never N x N; the
  elementwise parts in float64 as ``labels_torch``.
- The temperature gradient ``sum_a sum_p g_a sigma_ap (E_q[s]_a - s_ap)`` (``q`` the
  negatives' softmax) is the kernels' centred sum with the centre ``c_a = sum_p
  sigma_ap s_ap / sum_p sigma_ap``: ``sum_ak W_ak (s_ak - c_a) = sum_a w_a (E_q[s]_a -
  c_a)``, summed element by element in the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mimac_kernels import dispatch
from mimac_kernels.contract import RectProblem
from mimac_kernels.torch_backend import TILE_ELEMS


def _wide(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


class _Classes:
    """Rows and columns sorted by label, and the blocks of sorted rows with the column
    range ``[c0, c1)`` (sorted order) of their classes: whole classes together while
    rows x columns stay within the budget, a large class in slices of its rows."""

    def __init__(self, row_labels: Tensor, col_labels: Tensor, heads: int) -> None:
        self.row_labels, self.col_labels = row_labels, col_labels
        self.row_order = torch.argsort(row_labels, stable=True)
        self.col_order = torch.argsort(col_labels, stable=True)
        rl, cl = row_labels[self.row_order], col_labels[self.col_order]
        lo = torch.searchsorted(cl, rl, side="left").tolist()
        hi = torch.searchsorted(cl, rl, side="right").tolist()
        budget = max(1, TILE_ELEMS // 4 // max(1, heads))
        self.blocks: list[tuple[int, int, int, int]] = []  # (r0, r1, c0, c1)
        r, n = 0, len(lo)
        while r < n:
            r1, c0, c1 = r + 1, lo[r], hi[r]
            while r1 < n and (r1 + 1 - r) * (max(c1, hi[r1]) - c0) <= budget:
                c1 = max(c1, hi[r1])
                r1 += 1
            self.blocks.append((r, r1, c0, c1))
            r = r1

    def scores(
        self, x: Tensor, y: Tensor, inv_tau: Tensor, block: tuple[int, int, int, int],
        offset: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Rows and columns (original indices) of ``block``, raw scores ``s`` ``(H, rows,
        cols)`` (a float32 product, widened), ``S = inv_tau * s`` and the positives'
        mask ``(rows, cols)``: same label, not the row's own column ``row + offset``."""
        r0, r1, c0, c1 = block
        rows, cols = self.row_order[r0:r1], self.col_order[c0:c1]
        wide = inv_tau.dtype
        s = (x[:, rows].float() @ y[:, cols].float().transpose(-1, -2)).to(wide)
        same = self.row_labels[rows, None] == self.col_labels[None, cols]
        pos = same & (rows[:, None] + offset != cols[None, :])
        return rows, cols, s, inv_tau * s, pos


def forward_positives(
    x: Tensor, y: Tensor, inv_tau: Tensor, cls: _Classes, offset: int, m: Tensor
) -> Tensor:
    """``sum_{p in P(a)} softplus(M_a - S_ap)`` per row ``(H, R)`` in float64 (``m``:
    the negatives' log-sum-exps ``(H, R)``, -inf for a row without a negative)."""
    wide = _wide(x.device)
    it, m = inv_tau.to(wide), m.to(wide)
    sums = torch.zeros(x.shape[0], x.shape[1], dtype=wide, device=x.device)
    for block in cls.blocks:
        rows, _, _, sc, pos = cls.scores(x, y, it, block, offset)
        # All -inf (no negative): softplus(-inf) = 0, PML's value.
        terms = F.softplus(torch.where(pos, m[:, rows, None] - sc, float("-inf")))
        sums[:, rows] = terms.sum(-1)
    return sums


def backward_positives(
    x: Tensor, y: Tensor, inv_tau: Tensor, cls: _Classes, offset: int, m: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The positive pairs' part of the gradient of ``sum(g * sums)``: float32 dX ``(H, R,
    D)``, dY ``(H, C, D)`` from ``dS_ap = -g_a sigma(M_a - S_ap)``; the row weights of
    the negatives ``w_a = g_a sum_p sigma_ap`` and the centres ``c_a = sum_p sigma_ap
    s_ap / sum_p sigma_ap`` (0 where that sum is 0), both ``(H, R)`` float64."""
    wide = _wide(x.device)
    it, m, g = inv_tau.to(wide), m.to(wide), g.to(wide)
    h, r, _ = x.shape
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gy = torch.zeros(y.shape, dtype=torch.float32, device=x.device)
    w = torch.zeros(h, r, dtype=wide, device=x.device)
    center = torch.zeros(h, r, dtype=wide, device=x.device)
    for block in cls.blocks:
        rows, cols, s, sc, pos = cls.scores(x, y, it, block, offset)
        sig = torch.where(pos, torch.sigmoid(m[:, rows, None] - sc), 0.0)
        tot = sig.sum(-1)
        w[:, rows] = g[:, rows] * tot
        center[:, rows] = (sig * s).sum(-1) / torch.where(tot > 0, tot, 1.0)
        ds = (-(g[:, rows, None] * sig) * it).float()  # dL/ds of the positives
        gx[:, rows] += ds @ y[:, cols].float()
        gy.index_add_(1, cols, ds.transpose(-1, -2) @ x[:, rows].float())
    return gx, gy, w, center


class LabelledNTXentKernels(torch.autograd.Function):
    """Per-anchor sums of PML's pair losses ``(H, R)`` of rows ``x`` against columns ``y``
    (kernel-level: cosine rows already unit) on the backend ``name``: the negatives'
    log-sum-exps by its labelled rectangular kernels, the positives in label blocks."""

    @staticmethod
    def forward(ctx, x, y, inv_tau, row_labels, col_labels, offset, critic, eps, name):
        problem = RectProblem(
            x, y, inv_tau, critic, eps, offset, row_labels=row_labels, col_labels=col_labels
        )
        m = dispatch.get_backend(name).rect_forward(problem).to(torch.float32)
        cls = _Classes(problem.row_labels, problem.col_labels, x.shape[0])
        sums = forward_positives(problem.x, problem.y, inv_tau, cls, offset, m)
        ctx.save_for_backward(x, y, inv_tau, row_labels, col_labels, m)
        ctx.args = (offset, critic, eps, name, cls)
        return sums.to(torch.float32)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y, inv_tau, row_labels, col_labels, m = ctx.saved_tensors
        offset, critic, eps, name, cls = ctx.args
        problem = RectProblem(
            x, y, inv_tau, critic, eps, offset, row_labels=row_labels, col_labels=col_labels
        )
        gx, gy, w, center = backward_positives(
            problem.x, problem.y, inv_tau, cls, offset, m, g.contiguous()
        )
        # A row without a negative (M = -inf) has w = 0: +inf keeps e^(S - lse) at 0.
        lse = torch.where(torch.isfinite(m) | torch.isnan(m), m, float("inf"))
        neg = dispatch.get_backend(name).rect_backward(
            problem, lse, w.to(torch.float32), center.to(torch.float32)
        )
        return ((gx + neg.x).to(x.dtype), (gy + neg.y).to(y.dtype),
                neg.inv_tau.to(inv_tau.dtype), None, None, None, None, None, None)  # fmt: skip
