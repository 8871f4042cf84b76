"""The sigmoid loss (SigLIP) in plain torch ops, one block of rows at a time (no N x N).

Backend contract of the sigmoid loss (``mimac_kernels.siglip``), shared by the
``torch``, ``triton`` and ``cpu`` implementations:

- ``forward(x, y, scale, bias, offset)``: per-row sums ``sum_j softplus(-z_ij l_ij)``,
  ``l_ij = scale * x_i . y_j + bias``, ``z_ij = +1`` where ``j == i + offset``.
  x ``(H, R, D)``, y ``(H, C, D)``; returns ``(H, R)`` float32 (float64 for float64).
- ``backward(x, y, scale, bias, g, offset)``: gradients of ``sum_i g_i rowsum_i``
  (g ``(H, R)``): ``(dx, dy, dscale, dbias)``, the first two float32 (float64) of
  x's and y's shapes, the last two 0-dim.

``scale`` and ``bias`` are 0-dim tensors of the compute dtype on the inputs' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Score elements per block (rows x columns x heads), about 16 MiB of float32 per buffer.
BLOCK_ELEMENTS = 1 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_block(h: int, c: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, h * c))


def _signed_logits(
    xb: Tensor, yf: Tensor, scale: Tensor, bias: Tensor, r0: int, offset: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Scores ``s`` and ``z * l`` of rows ``r0 ..`` of a block, and ``z`` (+1/-1), each
    ``(H, rows, C)``."""
    s = xb @ yf.transpose(1, 2)
    logits = scale * s + bias
    rows = torch.arange(r0, r0 + xb.shape[1], device=xb.device) + offset
    cols = torch.arange(yf.shape[1], device=xb.device)
    pos = rows[:, None] == cols[None, :]
    z = torch.where(pos, 1.0, -1.0).to(s.dtype)
    return s, z * logits, z


def forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int) -> Tensor:
    """Per-row sums of ``-log sigmoid(z l)`` (see the module docstring), ``(H, R)``."""
    dt = compute_dtype(x.dtype)
    xf, yf = x.to(dt), y.to(dt)
    h, r, _ = xf.shape
    out = xf.new_empty(h, r)
    step = _rows_per_block(h, yf.shape[1])
    for r0 in range(0, r, step):
        _, zl, _ = _signed_logits(xf[:, r0 : r0 + step], yf, scale.to(dt), bias.to(dt), r0, offset)
        out[:, r0 : r0 + step] = -F.logsigmoid(zl).sum(-1)
    return out


def backward(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, g: Tensor, offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i g_i rowsum_i`` w.r.t. x, y, scale and bias."""
    dt = compute_dtype(x.dtype)
    xf, yf, g = x.to(dt), y.to(dt), g.to(dt)
    t, b = scale.to(dt), bias.to(dt)
    h, r, _ = xf.shape
    dx, dy = torch.empty_like(xf), torch.zeros_like(yf)
    dt_sum = xf.new_zeros(())
    db_sum = xf.new_zeros(())
    step = _rows_per_block(h, yf.shape[1])
    for r0 in range(0, r, step):
        xb = xf[:, r0 : r0 + step]
        s, zl, z = _signed_logits(xb, yf, t, b, r0, offset)
        # d softplus(-z l) / dl = -z sigmoid(-z l): no cancellation at the positive.
        w = -z * torch.sigmoid(-zl) * g[:, r0 : r0 + step, None]
        dx[:, r0 : r0 + step] = t * (w @ yf)
        dy += t * (w.transpose(1, 2) @ xb)
        dt_sum += (w * s).sum()
        db_sum += w.sum()
    return dx, dy, dt_sum, db_sum
