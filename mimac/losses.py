"""Loss terms of the clustering methods that are not contrastive kernels.

The contrastive terms (NT-Xent on features, the log-of-dot-product probability
contrast) come from :mod:`mimac_kernels`; the small per-batch terms here are
plain torch, cheap (O(B*C)) and differentiable by autograd.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mimac.distributed import batch_sum, world_size

#: Floor inside log() for the marginal entropy: a cluster with zero mass
#: contributes 0 * log(eps) = 0 instead of NaN.
ENTROPY_EPS = 1e-12


def marginal_entropy(probs: Tensor, eps: float = ENTROPY_EPS, group: Any = None) -> Tensor:
    """Entropy H(p_bar) of the batch-mean cluster distribution (natural log).

    Maximising it spreads the batch over all clusters and so prevents the
    trivial solution where every sample falls into one cluster.

    Args:
        probs: softmax probabilities (rows sum to 1), unsmoothed.
        eps: floor inside the log.
        group: a process group: ``p_bar`` is the mean over every rank's rows
            (equal row counts), the same value on every rank.

    Shape:
        probs: ``(..., B, C)`` (a leading head axis is allowed).
        Output: ``(...)``: one entropy per head; a scalar for 2-d input.

    Example:
        >>> marginal_entropy(torch.eye(4))  # uniform marginal: log 4
        tensor(1.3863)
    """
    p = probs.float()
    if group is None:
        p_bar = p.mean(dim=-2)
    else:
        p_bar = batch_sum(p.sum(dim=-2), group) / (p.shape[-2] * world_size(group))
    return -(p_bar * p_bar.clamp_min(eps).log()).sum(dim=-1)


def logit_penalty(logits: Tensor, bound: float = 25.0) -> Tensor:
    """Hinge keeping logits inside ``[-bound, bound]``: ``0.5 * mean_i sum_k relu(|l_ik| - b)^2``.

    Softmax is invariant to a shift of all logits, so without this term they
    can drift to huge magnitudes, saturate the softmax and stop its gradient.
    The squared hinge has the gradient ``sign(l) * (|l| - b)`` outside the band,
    the gradient the CRLC authors' code applies; it is zero inside the band.

    Args:
        logits: clustering logits.
        bound: allowed magnitude ``b > 0``.

    Shape:
        logits: ``(..., B, C)``.
        Output: ``(...)``: sum over clusters, mean over the batch rows.

    Example:
        >>> logit_penalty(torch.tensor([[27.0, -20.0]]), bound=25.0)
        tensor(2.)
    """
    excess = (logits.float().abs() - bound).clamp_min(0.0)
    return 0.5 * excess.square().sum(dim=-1).mean(dim=-1)


def smooth_probs(probs: Tensor, alpha: float) -> Tensor:
    """Mix probabilities with the uniform distribution: ``(1 - alpha) p + alpha / C``.

    Keeps every dot product ``p_i . p_k >= alpha^2 / C`` away from zero, so the
    log-of-dot-product critic and its gradient stay finite.

    Shape:
        probs: ``(..., C)``; output the same shape.
    """
    num_clusters = probs.shape[-1]
    return (1.0 - alpha) * probs + alpha / num_clusters
