"""PML's NTXent with labels in plain torch ops, one block of rows at a time (no N x N).

For each positive pair (a, p): ``softplus(M_a - S_ap)``, where ``M_a`` is the
log-sum-exp of row a's scores over its negatives only (label-masked, never total
minus positives) and ``S = inv_tau * z_a . z_k`` (docs/losses.md, "Labels").

- ``forward(z, inv_tau, labels)``: per-anchor sums ``sum_{p in P(a)} softplus(M_a -
  S_ap)`` ``(H, N)`` in the compute dtype (float32; float64 for float64 inputs) and
  ``M`` ``(H, N)`` (``-inf`` where an anchor has no negative) in float64.
- ``backward(z, inv_tau, labels, neg_lse, g)``: gradients of ``sum(g * sums)`` w.r.t.
  z ``(H, N, D)`` and ``inv_tau`` (0-dim), scores recomputed block by block.

``z`` ``(H, N, D)`` holds the rows as the critic scores them (cosine rows already
unit-normed), ``labels`` ``(N,)`` integer, ``inv_tau`` a 0-dim tensor of the compute
dtype. Working memory: about a dozen ``H x block x N`` tiles of ``TILE_ELEMS / 4``
elements each.

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
    z: Tensor, labels: Tensor, inv_tau: Tensor, i0: int, i1: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw scores ``s`` and ``S = inv_tau * s`` ``(H, rows, N)`` of rows ``i0 .. i1`` in
    ``inv_tau``'s dtype, and their masks ``(rows, N)``: positives (same label, not the
    row itself) and negatives (another label)."""
    s = (z[:, i0:i1] @ z.transpose(-1, -2)).to(inv_tau.dtype)
    same = labels[i0:i1, None] == labels[None, :]
    rows = torch.arange(i0, i1, device=z.device)
    not_self = rows[:, None] != torch.arange(z.shape[1], device=z.device)[None, :]
    return s, inv_tau * s, same & not_self, ~same


def forward(z: Tensor, inv_tau: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-anchor sums of the pair losses and the negatives' log-sum-exps, both ``(H, N)``."""
    z = z.to(compute_dtype(z.dtype))
    wide = _wide(z.dtype, z.device)
    it = inv_tau.to(wide)
    h, n, _ = z.shape
    sums = torch.empty(h, n, dtype=wide, device=z.device)
    neg_lse = torch.empty(h, n, dtype=wide, device=z.device)
    bs = _rows_per_block(h, n)
    for i0 in range(0, n, bs):
        i1 = min(i0 + bs, n)
        _, scores, pos, neg = _block(z, labels, it, i0, i1)
        # All -inf (no negative) gives M = -inf and softplus(-inf) = 0, PML's value.
        m = torch.logsumexp(scores.masked_fill(~neg, float("-inf")), dim=-1)
        neg_lse[:, i0:i1] = m
        terms = F.softplus(torch.where(pos, m[..., None] - scores, float("-inf")))
        sums[:, i0:i1] = terms.sum(-1)
    return sums.to(z.dtype), neg_lse


def backward(
    z: Tensor, inv_tau: Tensor, labels: Tensor, neg_lse: Tensor, g: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(g * sums)`` w.r.t. z ``(H, N, D)`` and ``inv_tau`` (0-dim)."""
    z = z.to(compute_dtype(z.dtype))
    dt, wide = z.dtype, _wide(z.dtype, z.device)
    it, neg_lse, g = inv_tau.to(wide), neg_lse.to(wide), g.to(wide)
    h, n, _ = z.shape
    gz = torch.zeros_like(z)
    g_it = torch.zeros((), dtype=wide, device=z.device)
    bs = _rows_per_block(h, n)
    for i0 in range(0, n, bs):
        i1 = min(i0 + bs, n)
        s, scores, pos, neg = _block(z, labels, it, i0, i1)
        m, gb = neg_lse[:, i0:i1, None], g[:, i0:i1, None]
        # sigma(M - S) without overflow: the masked entries are 0, never inf * 0.
        sig = torch.where(pos, torch.sigmoid(m - scores), 0.0)
        q = torch.where(neg, torch.exp(scores - m), 0.0)  # the negatives' softmax
        w = gb * (sig.sum(-1, keepdim=True) * q - sig)  # dL/dS
        # dL/d(inv_tau) = sum_a g_a sum_p sigma_ap (E_q[s] - s_ap): centred term by term.
        mean_neg = (q * s).sum(-1, keepdim=True)
        g_it = g_it + (gb * sig * (mean_neg - s)).sum()
        wd = (w * it).to(dt)
        gz[:, i0:i1] += wd @ z  # d S_ik / d z_i
        gz += wd.transpose(-1, -2) @ z[:, i0:i1]  # d S_ik / d z_k
    return gz, g_it.to(dt)
