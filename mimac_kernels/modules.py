"""Drop-in ``nn.Module`` losses with the signatures users already call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from mimac_kernels.functional import (
    check_positive_number,
    contrastive_loss_with_scale,
    fused_contrastive_loss,
)
from mimac_kernels.labels import (
    gather_labels,
    supervised_contrastive_loss,
    supervised_ntxent_loss,
)
from mimac_kernels.memory_bank import MemoryBank
from mimac_kernels.siglip import sigmoid_contrastive_loss


class _AllPairsLoss(nn.Module):
    """Shared body of the fixed-temperature losses over all other rows (``critic`` set by each)."""

    critic: str

    def __init__(self, temperature: float, backend: str, group: Any) -> None:
        super().__init__()
        self.temperature = check_positive_number(temperature, "temperature")
        self.backend = backend
        self.group = group

    def _loss(self, a: Tensor, b: Tensor) -> Tensor:
        return fused_contrastive_loss(
            a, b, temperature=self.temperature, critic=self.critic, negatives="all",
            backend=self.backend, group=self.group,
        )


class NTXentLoss(_AllPairsLoss):
    """lightly's ``NTXentLoss``: cosine critic; without a memory bank every other row
    of ``[out0; out1]`` is a negative, with one (``memory_bank_size``) the bank's rows
    are (MoCo; lightly's ``memory_bank_size=(K, D)``). Called with labels,
    pytorch-metric-learning's ``NTXentLoss``.

    ``forward(out0, out1)``: lightly's two views. ``forward(embeddings, labels)`` (an
    integer second argument, or ``labels=``): PML's loss with labels, every row with the
    same label a positive, per positive pair only the anchor's negatives beside it in
    the denominator, mean over pairs (``supervised_ntxent_loss``; torch backend, row
    blocks, no N x N; not with a memory bank). Note the defaults: lightly's temperature
    0.5 here, PML's is 0.07.

    With a bank, row i's logits are ``[out0_i . out1_i | out0_i . bank^T] / tau`` (unit
    rows; no in-batch negatives), computed without the N x K matrix
    (``fused_contrastive_loss(queue=)``); the loss uses the bank as it was before the
    call; then, if ``out0`` requires grad (a training step: lightly's rule), the
    normalised ``out1`` is written into the bank, FIFO (``memory_bank.MemoryBank``:
    lightly's pointer rule, the bank float32 and not in the state dict). The bank
    receives no gradient.

    Args:
        temperature: ``tau``, a float > 0.
        memory_bank_size: 0 (no bank, SimCLR), ``(K, D)`` (lightly's form: K random
            unit rows of width D drawn now from the global generator, as lightly draws
            them), or an int K (the width taken from the first batch, the random rows
            drawn then).
        backend: passed to ``fused_contrastive_loss`` (with labels: not ``cuda``).
        group: a process group (lightly's ``gather_distributed=True``). Without a bank:
            every rank's rows are negatives; see ``fused_contrastive_loss`` for the
            gradient convention. With a bank: the loss is this rank's rows against the
            bank, and every rank's ``out1`` is written into it (rank order), as lightly.
            With labels: this rank's anchors against every rank's rows and labels.

    Shape:
        out0, out1: ``(N, D)``, the two views' embeddings (this rank's); or embeddings
        ``(N, D)`` and labels ``(N,)``. Output: scalar. ``memory_bank.bank``: ``(K, D)``.

    Example:
        >>> loss = NTXentLoss(temperature=0.5)(torch.randn(8, 32), torch.randn(8, 32))
        >>> loss = NTXentLoss(0.07)(torch.randn(8, 32), torch.tensor([0, 1] * 4))
        >>> moco = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 32))
    """

    critic = "cosine"

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int | Sequence[int] = 0,
        backend: str = "auto",
        group: Any = None,
    ) -> None:
        super().__init__(temperature, backend, group)
        self.memory_bank = MemoryBank(memory_bank_size, group=group)

    def forward(
        self, out0: Tensor, out1: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        if labels is None and isinstance(out1, Tensor) and _is_integer(out1):
            out1, labels = None, out1  # PML's call: loss(embeddings, labels)
        if labels is None:
            if out1 is None:
                raise TypeError("NTXentLoss needs out1 (the second view) or labels")
            return self._two_views(out0, out1)
        if self.memory_bank.size:
            raise ValueError("NTXentLoss with labels takes no memory bank (memory_bank_size="
                             f"{self.memory_bank.size}): call it with out0 and out1")
        if out1 is not None:
            raise TypeError("NTXentLoss takes out1 (two views) or labels (one set of rows), "
                            "not both")
        return supervised_ntxent_loss(
            out0, labels, temperature=self.temperature, backend=self.backend, group=self.group
        )

    def _two_views(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank.size == 0:
            return self._loss(out0, out1)
        for name, t in (("out0", out0), ("out1", out1)):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.numel() == 0:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} must have a non-empty shape (N, D) with a memory bank, got {shape}"
                )
        dim = self.memory_bank.dim
        if dim is not None and out0.shape[-1] != dim:
            raise ValueError(
                f"out0 and out1 must have the memory bank's width D={dim} "
                f"(memory_bank_size={(self.memory_bank.size, dim)}), got {tuple(out0.shape)}"
            )
        # The bank before this call, in the inputs' dtype and on their device (a copy:
        # the bank is written below, while the backward still needs these rows).
        bank = self.memory_bank.materialize(out0)
        negatives = bank.detach().to(device=out0.device, dtype=out0.dtype, copy=True)
        loss = fused_contrastive_loss(
            out0, out1, temperature=self.temperature, critic="cosine", backend=self.backend,
            group=self.group, queue=negatives,
        )
        if out0.requires_grad:
            self.memory_bank.enqueue(functional.normalize(out1.detach(), dim=1))
        return loss


class SupConLoss(nn.Module):
    """pytorch-metric-learning's ``SupConLoss``: supervised contrast, cosine critic.

    ``-(1/|P(i)|) sum_{p in P(i)} log(e^{S_ip} / sum_{k != i} e^{S_ik})`` per anchor i
    (``P(i)``: the other rows with its label), averaged over the anchors that have a
    positive (``supervised_contrastive_loss``: any backend with rectangular kernels,
    no N x N). As PML's, 0 (gradient 0) where no anchor has a positive or every row
    has one label (no negative pair in the batch).

    Args:
        temperature: ``tau``, a float > 0.
        backend: passed to ``supervised_contrastive_loss``.
        group: a process group: this rank's anchors against every rank's rows
            (``supervised_contrastive_loss``'s convention: the ranks' mean is the
            single-process loss).

    Shape:
        embeddings: ``(N, D)`` (or ``(H, N, D)``), labels: ``(N,)`` integer (this rank's).
        Output: scalar.

    Example:
        >>> loss = SupConLoss(0.1)(torch.randn(8, 32), torch.tensor([0, 1, 2, 0, 1, 2, 3, 3]))
    """

    def __init__(self, temperature: float = 0.1, backend: str = "auto", group: Any = None) -> None:
        super().__init__()
        self.temperature = check_positive_number(temperature, "temperature")
        self.backend = backend
        self.group = group

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        loss = supervised_contrastive_loss(
            embeddings, labels, temperature=self.temperature, backend=self.backend,
            group=self.group,
        )
        # PML computes nothing without a negative pair (one label in the batch): its 0,
        # selected on the device (no host read), with a zero gradient.
        every = labels if self.group is None else gather_labels(labels, self.group)
        has_negative = (every != every[0]).any()
        return torch.where(has_negative, loss, torch.zeros_like(loss))


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` on one device: symmetric InfoNCE over the batch.

    Features are expected already normalised (dot critic); ``logit_scale`` is the
    multiplier ``1 / tau`` (a float or a 0-dim tensor, usually ``model.logit_scale.exp()``)
    and receives its exact gradient, formed directly (no overflow through ``tau`` at
    large scales). With a process ``group``, open_clip's
    ``local_loss=True, gather_with_grad=True``: local rows against every rank's columns.

    Shape:
        image_features, text_features: ``(N, D)``. Output: scalar, or
        ``{"contrastive_loss": scalar}`` with ``output_dict=True``.
    """

    def __init__(self, backend: str = "auto", group: Any = None) -> None:
        super().__init__()
        self.backend = backend
        self.group = group

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        # 1 / tau is passed as such: dL/dscale directly, without dL/dtau * dtau/dscale,
        # which overflows float32 at large scales.
        loss = contrastive_loss_with_scale(
            image_features, text_features, logit_scale, critic="dot", negatives="cross",
            symmetric=True, backend=self.backend, group=self.group,
        )
        return {"contrastive_loss": loss} if output_dict else loss


class ProbabilityContrastLoss(_AllPairsLoss):
    """CRLC's probability contrastive loss: log-of-dot-product critic, all negatives.

    At the default ``temperature=1.0`` it runs the linear-time closed form (also
    across the ranks of a process ``group``) wherever that is exact: non-negative
    rows whose dot products do not straddle ``eps`` (docs/losses.md).

    Shape:
        p1, p2: ``(N, C)`` or ``(H, N, C)`` probability rows (smoothed, so dot
        products stay away from 0). Output: scalar, averaged over heads and rows.
    """

    critic = "log_dot"

    def __init__(self, temperature: float = 1.0, backend: str = "auto", group: Any = None) -> None:
        super().__init__(temperature, backend, group)

    def forward(self, p1: Tensor, p2: Tensor) -> Tensor:
        return self._loss(p1, p2)


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: the sigmoid loss, fused (docs/losses.md).

    ``-(1/N) sum_ij log sigmoid(z_ij (t x_i . y_j + b))``, ``z_ii = +1``, ``-1`` elsewhere.
    ``logit_scale`` t (open_clip passes ``model.logit_scale.exp()``) and ``logit_bias``
    b are floats or 0-dim tensors and receive their exact gradients. With a process
    ``group``, open_clip's multi-rank loss (its ``rank``/``world_size``): local images
    against own texts with labels and every other rank's texts as negatives, the
    texts gathered with gradient (``sigmoid_contrastive_loss``).

    Shape:
        image_features, text_features: ``(N, D)`` (or ``(H, N, D)``). Output: scalar, or
        ``{"contrastive_loss": scalar}`` with ``output_dict=True``.
    """

    def __init__(self, backend: str = "auto", group: Any = None) -> None:
        super().__init__()
        self.backend = backend
        self.group = group

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        logit_bias: float | Tensor,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        loss = sigmoid_contrastive_loss(
            image_features, text_features, logit_scale, logit_bias, backend=self.backend,
            group=self.group,
        )
        return {"contrastive_loss": loss} if output_dict else loss
