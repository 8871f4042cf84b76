"""``reference_contrastive_loss``: the losses written out directly, with the full matrix.

The float64 oracle the library is checked against, and a baseline to compare with:
it forms the ``M x M`` similarity matrix, so it is for small batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimac_kernels.options import DEFAULT_EPS


def reference_contrastive_loss(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "cosine",
    negatives: str = "all",
    symmetric: bool = True,
    reduction: str = "mean",
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """The losses of docs/losses.md with the full similarity matrix, in ``dtype``.

    Arguments as ``fused_contrastive_loss`` (no backend, no group). By default it
    computes in float64, the accuracy every backend is measured against. With
    ``dtype=None`` it computes in the inputs' dtype (no float32 accumulation forced):
    "plain PyTorch", the eager baseline whose own error bounds the backends'.
    Differentiable; memory ``O(M^2)`` per head (``M = 2N`` for ``all``, ``N`` for
    ``cross``).

    Shape:
        a, b: ``(N, D)`` or ``(H, N, D)``. Output: scalar for ``mean``/``sum``; for
        ``none``, ``(2N,)`` (``all``) or ``(N,)`` (``cross``), with a leading ``H`` for
        3-d inputs.

    Example:
        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> reference_contrastive_loss(a, b, temperature=0.5).dtype
        torch.float64
    """
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
        if isinstance(temperature, Tensor):
            temperature = temperature.to(dtype)
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a[None], b[None]
    per_row = _per_row(a, b, temperature, critic=critic, negatives=negatives,
                       symmetric=symmetric, eps=eps)
    if squeeze:
        per_row = per_row[0]
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction != "none":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return per_row


def _similarities(
    a: Tensor, b: Tensor, temperature: float | Tensor, critic: str, eps: float
) -> Tensor:
    """``S = s(a_i, b_j) / tau`` for every pair: ``(..., N, N)``."""
    if critic == "cosine":
        a = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
        b = b / b.norm(dim=-1, keepdim=True).clamp_min(eps)
    elif critic not in ("dot", "log_dot"):
        raise ValueError(f"critic must be 'cosine', 'dot' or 'log_dot', got {critic!r}")
    d = a @ b.transpose(-1, -2)
    return (d.clamp_min(eps).log() if critic == "log_dot" else d) / temperature


def _positive_pairs(n: int, negatives: str, device: torch.device) -> Tensor:
    """Column of each row's positive in ``S``: ``(2N,)`` over ``[a; b]`` for ``all``
    (row i pairs with i + N and back), ``(N,)`` (the diagonal) for ``cross``."""
    if negatives == "all":
        return torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device)
    return torch.arange(n, device=device)


def _per_row(
    a: Tensor, b: Tensor, temperature: float | Tensor, *, critic: str, negatives: str,
    symmetric: bool, eps: float,
) -> Tensor:
    """Unreduced losses of ``(H, N, D)`` inputs: ``(H, 2N)`` or ``(H, N)``."""
    n = a.shape[1]
    pos = _positive_pairs(n, negatives, a.device)
    if negatives == "all":
        z = torch.cat([a, b], dim=1)
        s = _similarities(z, z, temperature, critic, eps)
        eye = torch.eye(2 * n, dtype=torch.bool, device=a.device)
        s_pos = s.gather(-1, pos.expand(s.shape[0], -1)[..., None])[..., 0]
        per_row = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=-1) - s_pos
    elif negatives == "cross":
        s = _similarities(a, b, temperature, critic, eps)
        diag = s.diagonal(dim1=-2, dim2=-1)
        rows = torch.logsumexp(s, dim=-1) - diag
        cols = torch.logsumexp(s, dim=-2) - diag
        per_row = 0.5 * (rows + cols) if symmetric else rows
    else:
        raise ValueError(f"negatives must be 'all' or 'cross', got {negatives!r}")
    return per_row
