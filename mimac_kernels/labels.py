"""Labelled contrast: every row with the same label is a positive (docs/losses.md, "Labels").

``supervised_contrastive_loss`` is SupCon (Khosla et al. 2020, the "outside" form,
pytorch-metric-learning's ``SupConLoss``): each anchor's log-sum-exp over every other
row is the rectangular problem of the kernels (``contract.RectProblem``, rows and
columns both the embeddings, offset 0), run on any backend that has it; the
positives' mean score is linear in the rows, formed from per-class sums in O(N D).

``supervised_ntxent_loss`` is pytorch-metric-learning's ``NTXentLoss`` with labels: per
positive pair, the denominator holds the pair and the anchor's negatives only. Its
negatives-only log-sum-exp needs a label mask inside the score loop: the torch backend
runs it in row blocks (``labels_torch``), the triton and cpu backends on their labelled
rectangular kernels (``labels_kernels``); cuda, whose kernels lack the mask, refuses it
by name (``contract.LABEL_MASK_REFUSAL``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimac_kernels import dispatch, distributed, labels_kernels, labels_torch
from mimac_kernels.contract import RectProblem
from mimac_kernels.distributed import _RectLoss
from mimac_kernels.functional import (
    _check,
    _check_group,
    _inverse_temperature,
    _normalize,
    _wide_dtype,
)
from mimac_kernels.options import DEFAULT_EPS

#: Critics whose score is linear in the columns, so the positives' sum factors.
LABEL_CRITICS: tuple[str, ...] = ("cosine", "dot")
#: Why the critic ``log_dot`` takes no labels.
LOG_DOT_REFUSAL = (
    "critic='log_dot' takes no labels: log(z_i . z_p) is not linear in z_p, so the "
    "positives' sum has no O(N D) form"
)


def supervised_contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "cosine",
    reduction: str = "mean",
    backend: str = "auto",
    eps: float = DEFAULT_EPS,
    group: object | None = None,
) -> Tensor:
    """SupCon: ``l_i = -(1/|P(i)|) sum_{p in P(i)} log(e^{S_ip} / sum_{k != i} e^{S_ik})``,
    ``P(i)`` the other rows with row i's label, ``S = s / tau``.

    Anchors without a positive are dropped from the mean; where no anchor has one the
    loss is 0 (gradient 0), never NaN. No N x N matrix: the log-sum-exps run on the
    kernels' rectangular problem, the positives' sum is ``z_i . (c_label - z_i)`` with
    the per-class sums c.

    Args:
        embeddings: rows, float16/bfloat16/float32 (float64 on the torch backend).
        labels: integer tensor, one label per row, on the rows' device.
        temperature: ``tau > 0``, a float or a 0-dim tensor (may require grad).
        critic: ``"cosine"`` (rows normalised, PML's default) or ``"dot"``.
        reduction: ``"mean"`` (over heads and anchors with a positive), ``"sum"`` or
            ``"none"`` (per-anchor values, 0 for anchors without a positive).
        backend: ``"auto"`` or a name, as ``fused_contrastive_loss`` takes it (every
            backend with rectangular kernels).
        eps: clamp of the norms (cosine), as ``fused_contrastive_loss``.
        group: a ``torch.distributed`` process group: this rank's rows are anchors
            against every rank's rows and labels (gathered; the rows with gradient).
            ``mean``: this rank's anchors' sum times ``world_size`` over the number of
            anchors with a positive on all ranks, so the ranks' mean is the
            single-process loss and input gradients are ``world_size x`` the
            single-process ones (``fused_contrastive_loss``'s convention); ``sum`` and
            ``none``: this rank's anchors. Every rank passes the same N, H, D, dtype.

    Shape:
        embeddings: ``(N, D)`` or ``(H, N, D)`` (heads share the labels); labels: ``(N,)``.
        Output: scalar, or ``(N,)`` / ``(H, N)`` for ``none``; float32 (float64 for
        float64 inputs).

    Example:
        >>> z, y = torch.randn(8, 16), torch.tensor([0, 1, 0, 1, 2, 2, 0, 3])
        >>> supervised_contrastive_loss(z, y).shape
        torch.Size([])
    """
    z, squeeze = _prepare(embeddings, labels, critic, reduction, backend, eps)
    inv_tau = _inverse_temperature(temperature, embeddings)
    acc = inv_tau.dtype
    columns, labels_all, offset, world = _columns(z, labels, group)
    _, ids_all, counts = torch.unique(labels_all, return_inverse=True, return_counts=True)
    ids = ids_all[offset : offset + z.shape[1]]  # this rank's anchors
    n_pos = (counts[ids] - 1).to(acc)  # |P(i)|, (N,)
    has_pos = n_pos > 0
    # sum_{p in P(i)} z_i . z_p = z_i . (c_{label_i} - z_i): the difference before the dot
    # (one rounding of c for a single positive), the sums in float64 where there is one.
    wide, wide_cols = z.to(_wide_dtype(z)), columns.to(_wide_dtype(z))
    class_sums = wide_cols.new_zeros(z.shape[0], counts.numel(), z.shape[2])
    class_sums = class_sums.index_add(1, ids_all, wide_cols)
    pos_sum = (wide * (class_sums[:, ids] - wide)).sum(-1)  # (H, N)
    pos_mean = (pos_sum / n_pos.clamp_min(1).to(pos_sum.dtype)).to(acc)
    # Row i against every column but itself (``offset``: this rank's own columns); the
    # positive mean is the centre of the temperature sum, summed element by element.
    rows = _RectLoss.apply(z, columns, inv_tau, pos_mean, critic, eps, offset, backend)
    per_anchor = torch.where(has_pos, rows, torch.zeros_like(rows))
    if squeeze:
        per_anchor = per_anchor.squeeze(0)
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    # Anchors with a positive, on every rank (no anchor: 0 / 1, a documented 0).
    anchors = (counts[ids_all] > 1).sum().clamp_min(1) * z.shape[0]
    return per_anchor.sum() * world / anchors.to(acc)


def gather_labels(labels: Tensor, group: object) -> Tensor:
    """Every rank's ``labels`` ``(N,)`` concatenated in rank order, ``(world_size * N,)``
    (same N on every rank: ``distributed.check_equal_inputs``)."""
    world = torch.distributed.get_world_size(group)
    mine = labels.to(torch.int64).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(parts, mine, group=group)
    return torch.cat(parts)


def supervised_ntxent_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    critic: str = "cosine",
    reduction: str = "mean",
    backend: str = "auto",
    eps: float = DEFAULT_EPS,
    group: object | None = None,
) -> Tensor:
    """pytorch-metric-learning's ``NTXentLoss`` with labels: for every positive pair (a, p),
    ``-log(e^{S_ap} / (e^{S_ap} + sum_{n: label_n != label_a} e^{S_an}))``, mean over pairs.

    The other positives are not in the denominator. An anchor without a negative gives
    its pairs 0 (PML's value); a batch without a positive pair gives 0 (gradient 0).
    Runs on the torch backend in row blocks (O(block x N) memory) and on the triton and
    cpu backends' labelled rectangular kernels (the positives in label blocks), never
    N x N; cuda raises ``BackendUnavailable`` (its kernels have no label mask).

    Args:
        embeddings, labels, temperature, critic, eps: as ``supervised_contrastive_loss``
            (PML's default temperature 0.07).
        reduction: ``"mean"`` (over heads and positive pairs), ``"sum"`` or ``"none"``
            (per-anchor sums over its positive pairs).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"``.
        group: as ``supervised_contrastive_loss``: this rank's anchors against every
            rank's rows; ``mean`` is this rank's pairs' sum times ``world_size`` over the
            number of positive pairs on all ranks (the ranks' mean is the loss).

    Shape:
        embeddings: ``(N, D)`` or ``(H, N, D)``; labels: ``(N,)``. Output: scalar, or
        ``(N,)`` / ``(H, N)`` for ``none``; float32 (float64 for float64 inputs).
    """
    name = _ntxent_backend(embeddings, labels, critic, reduction, backend, eps)
    z, squeeze = _prepare(embeddings, labels, critic, reduction, backend, eps,
                          widen=name == "torch")  # fmt: skip
    inv_tau = _inverse_temperature(temperature, embeddings)
    columns, labels_all, offset, world = _columns(z, labels, group)
    if name == "torch":
        per_anchor = _LabelledNTXent.apply(z, columns, inv_tau, labels, labels_all, offset)
    else:
        per_anchor = labels_kernels.LabelledNTXentKernels.apply(
            z, columns, inv_tau, labels, labels_all, offset, critic, eps, name
        )
    if squeeze:
        per_anchor = per_anchor.squeeze(0)
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    _, ids, counts = torch.unique(labels_all, return_inverse=True, return_counts=True)
    pairs = (counts[ids] - 1).sum().clamp_min(1) * z.shape[0]  # every rank's; none: 0 / 1
    return per_anchor.sum() * world / pairs.to(per_anchor.dtype)


def _ntxent_backend(
    embeddings: Tensor, labels: Tensor, critic: str, reduction: str, backend: str, eps: float
) -> str:
    """The backend of PML's NTXent with labels: ``backend`` resolved for the labelled
    rectangular problem of the rows against themselves (a group's gathered columns
    differ only in number, which no refusal looks at)."""
    _check(embeddings, embeddings, critic, "all", True, reduction, backend, eps)
    if critic not in LABEL_CRITICS:
        raise ValueError(LOG_DOT_REFUSAL)
    check_labels(labels, embeddings)
    z = (embeddings.unsqueeze(0) if embeddings.dim() == 2 else embeddings).detach()
    it = torch.ones((), dtype=torch.float32, device=z.device)
    problem = RectProblem(z, z, it, critic, eps, 0, row_labels=labels, col_labels=labels)
    return dispatch.resolve(backend, problem)


def _columns(
    z: Tensor, labels: Tensor, group: object | None
) -> tuple[Tensor, Tensor, int, int]:
    """The columns and their labels (every rank's with a group, gathered in rank order,
    the rows with gradient), this rank's first column and the world size."""
    if group is None:
        return z, labels, 0, 1
    _check_group(group)
    distributed.check_equal_inputs(z, group)
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    columns = distributed.gather_with_grad(z, group)
    return columns, gather_labels(labels, group), rank * z.shape[1], world


class _LabelledNTXent(torch.autograd.Function):
    """Per-anchor sums of PML's pair losses ``(H, R)`` (``labels_torch``), rows x against
    columns y, with the negatives' log-sum-exps saved and the scores recomputed in the
    backward."""

    @staticmethod
    def forward(ctx, x, y, inv_tau, row_labels, col_labels, offset):
        sums, neg_lse = labels_torch.forward(x, y, inv_tau, row_labels, col_labels, offset)
        ctx.save_for_backward(x, y, inv_tau, row_labels, col_labels, neg_lse)
        ctx.offset = offset
        return sums

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y, inv_tau, row_labels, col_labels, neg_lse = ctx.saved_tensors
        gx, gy, g_it = labels_torch.backward(
            x, y, inv_tau, row_labels, col_labels, ctx.offset, neg_lse, g.contiguous()
        )
        return gx.to(x.dtype), gy.to(y.dtype), g_it.to(inv_tau.dtype), None, None, None


def _prepare(
    embeddings: Tensor, labels: Tensor, critic: str, reduction: str, backend: str, eps: float,
    widen: bool = False,
) -> tuple[Tensor, bool]:
    """Check the inputs; the rows as ``(H, N, D)`` (normalised for cosine; ``widen``: in
    float32 for half inputs, as the torch blocks compute, rather than rounded back to
    the inputs' dtype for the kernels) and whether the caller's were 2-d."""
    _check(embeddings, embeddings, critic, "all", True, reduction, backend, eps)
    if critic not in LABEL_CRITICS:
        raise ValueError(LOG_DOT_REFUSAL)
    check_labels(labels, embeddings)
    squeeze = embeddings.dim() == 2
    z = embeddings.unsqueeze(0) if squeeze else embeddings
    if widen:
        z = z.to(labels_torch.compute_dtype(z.dtype))
    if critic == "cosine":
        z = _normalize(z, eps)
    return z, squeeze


def check_labels(labels: object, embeddings: Tensor) -> None:
    """Raise naming ``labels`` unless it is an integer tensor of shape ``(N,)`` on the
    rows' device (``embeddings`` ``(N, D)`` or ``(H, N, D)``)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integers, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    n = embeddings.shape[-2]
    if labels.shape != (n,):
        raise ValueError(
            f"labels must have shape (N,) = ({n},), one per row of the embeddings "
            f"{tuple(embeddings.shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != embeddings.device:
        raise ValueError(
            f"labels are on {labels.device} but the embeddings are on {embeddings.device}"
        )
