"""PML's NTXent with labels in plain torch ops, one block of rows at a time (no N x N).

For each positive pair (a, p): ``softplus(M_a - S_ap)``, where ``M_a`` is the
log-sum-exp of row a's scores over its negatives only (label-masked, never total
minus positives) and ``S = inv_tau * x_a . y_k`` (docs/losses.md, "Labels"). Rows
``x`` ``(H, R, D)`` with labels ``(R,)`` against columns ``y`` ``(H, C, D)`` with labels
``(C,)``; row i's own column is ``i + offset`` (neither positive nor negative). One
process: x = y, offset 0; across ranks: local rows against every rank's columns.

- ``forward(x, y, inv_tau, row_labels, col_labels, offset)``: per-row sums
  ``sum_{p in P(a)} softplus(M_a - S_ap)`` ``(H, R)`` in the compute dtype (float32;
  float64 for float64 inputs) and ``M`` ``(H, R)`` (``-inf`` where a row has no
  negative) in float64.
- ``backward(x, y, inv_tau, row_labels, col_labels, offset, neg_lse, g)``: gradients of
  ``sum(g * sums)`` w.r.t. x ``(H, R, D)``, y ``(H, C, D)`` and ``inv_tau`` (0-dim),
  scores recomputed block by block.

x and y hold the rows as the critic scores them (cosine rows already unit-normed),
labels are integer, ``inv_tau`` a 0-dim tensor. Working memory: about a dozen
``H x block x C`` tiles of ``TILE_ELEMS / 4`` elements each.

Precision: the scores come from a matmul in the compute dtype, everything after it
(S, M, the weights) in float64 where the device has it. Every pair's loss and weight
depends on its row's ``M - S_ap``, two numbers of size up to ``1 / tau``: in float32
their rounding (an ulp of ``1 / tau``, shared by the whole row) biases every weight
of the row alike, and the temperature gradient, a sum of such weights, by several
ulps, where the dense formula's independent roundings average out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mimac_kernels.torch_backend import TILE_ELEMS


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_block(h: int, n: int) -> int:
    # A quarter of the torch backend's tile: each block holds about a dozen float64
    # temporaries of its size (the backend's hold a few float32 ones).
    return max(1, TILE_ELEMS // 4 // max(1, h * n))


def _wide(dt: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS does not), else ``dt``."""
    return dt if device.type == "mps" else torch.float64


def _block(
    x: Tensor, y: Tensor, labels: tuple[Tensor, Tensor], inv_tau: Tensor, rows: range,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw scores ``s`` and ``S = inv_tau * s`` ``(H, rows, C)`` of the block ``rows`` in
    ``inv_tau``'s dtype, and their masks ``(rows, C)``: positives (same label, not the
    row's own column) and negatives (another label)."""
    i0, i1 = rows.start, rows.stop
    s = (x[:, i0:i1] @ y.transpose(-1, -2)).to(inv_tau.dtype)
    row_labels, col_labels = labels
    same = row_labels[i0:i1, None] == col_labels[None, :]
    own = torch.arange(i0, i1, device=x.device)[:, None] + offset
    not_self = own != torch.arange(y.shape[1], device=x.device)[None, :]
    return s, inv_tau * s, same & not_self, ~same


def forward(
    x: Tensor, y: Tensor, inv_tau: Tensor, row_labels: Tensor, col_labels: Tensor,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Per-row sums of the pair losses and the negatives' log-sum-exps, both ``(H, R)``."""
    dt = compute_dtype(x.dtype)
    x, y = x.to(dt), y.to(dt)
    wide = _wide(dt, x.device)
    it = inv_tau.to(wide)
    h, r, _ = x.shape
    sums = torch.empty(h, r, dtype=wide, device=x.device)
    neg_lse = torch.empty(h, r, dtype=wide, device=x.device)
    bs = _rows_per_block(h, y.shape[1])
    for i0 in range(0, r, bs):
        i1 = min(i0 + bs, r)
        _, scores, pos, neg = _block(x, y, (row_labels, col_labels), it, range(i0, i1), offset)
        # All -inf (no negative) gives M = -inf and softplus(-inf) = 0, PML's value.
        m = torch.logsumexp(scores.masked_fill(~neg, float("-inf")), dim=-1)
        neg_lse[:, i0:i1] = m
        terms = F.softplus(torch.where(pos, m[..., None] - scores, float("-inf")))
        sums[:, i0:i1] = terms.sum(-1)
    return sums.to(dt), neg_lse


def backward(
    x: Tensor, y: Tensor, inv_tau: Tensor, row_labels: Tensor, col_labels: Tensor,
    offset: int, neg_lse: Tensor, g: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum(g * sums)`` w.r.t. x ``(H, R, D)``, y ``(H, C, D)`` and
    ``inv_tau`` (0-dim)."""
    dt = compute_dtype(x.dtype)
    x, y = x.to(dt), y.to(dt)
    wide = _wide(dt, x.device)
    it, neg_lse, g = inv_tau.to(wide), neg_lse.to(wide), g.to(wide)
    h, r, _ = x.shape
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    g_it = torch.zeros((), dtype=wide, device=x.device)
    bs = _rows_per_block(h, y.shape[1])
    for i0 in range(0, r, bs):
        i1 = min(i0 + bs, r)
        s, scores, pos, neg = _block(x, y, (row_labels, col_labels), it, range(i0, i1), offset)
        m, gb = neg_lse[:, i0:i1, None], g[:, i0:i1, None]
        # sigma(M - S) without overflow: the masked entries are 0, never inf * 0.
        sig = torch.where(pos, torch.sigmoid(m - scores), 0.0)
        q = torch.where(neg, torch.exp(scores - m), 0.0)  # the negatives' softmax
        w = gb * (sig.sum(-1, keepdim=True) * q - sig)  # dL/dS
        # dL/d(inv_tau) = sum_a g_a sum_p sigma_ap (E_q[s] - s_ap): centred term by term.
        mean_neg = (q * s).sum(-1, keepdim=True)
        g_it = g_it + (gb * sig * (mean_neg - s)).sum()
        wd = (w * it).to(dt)
        gx[:, i0:i1] = wd @ y  # d S_ik / d x_i
        gy += wd.transpose(-1, -2) @ x[:, i0:i1]  # d S_ik / d y_k
    return gx, gy, g_it.to(dt)
