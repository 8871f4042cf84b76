"""The interface every clustering method implements, so the trainer has no method branches.

A method is an ``nn.Module`` that declares which views of a batch it needs,
turns those views into named loss terms, predicts cluster ids, and says which
parameters go in which optimizer group. The trainer only calls the methods
below; hooks that a method does not need have no-op defaults.

Life cycle, as the trainer drives it::

    method = METHODS[cfg.method].from_config(cfg, in_channels, image_size, num_clusters)
    groups = method.param_groups(cfg.optim)                  # -> optimizer
    for epoch ...:
        if epoch == method.prepare_epoch() + 1:
            method.prepare(batches)                          # once (by default before epoch 1)
        method.on_epoch_start(epoch)
        for each batch x (B, C, H, W) in [0, 1]:
            views = [make(view_spec, x) for view_spec in method.view_specs()]
            terms = method.losses(views, group); terms["total"].backward(); step
            method.after_step()
    scores = mean over data of method.head_losses(views)   # (H,), no labels
    method.select_head(scores)
    out = method.predict(x)                                  # labels of the chosen head, per-head too
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """One view a method needs per image.

    Attributes:
        augment: ``True``: a random augmentation of the image; ``False``: the
            clean image (only converted to float and resized to the view size).
        overrides: fields of the dataset's ``AugmentConfig`` to change for this
            view, e.g. ``{"size": 18, "crop_scale": (0.08, 0.4)}`` for a
            multi-crop small view. Empty: the run's augmentation as configured.
    """

    augment: bool = True
    overrides: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def of(augment: bool = True, **overrides: Any) -> ViewSpec:
        """Build a spec from keyword overrides (kept hashable as sorted pairs)."""
        return ViewSpec(augment, tuple(sorted(overrides.items())))


class ClusteringMethod(nn.Module):
    """Base class of the clustering methods (CRLC, IMC-SwAV, DEC + contrastive).

    Subclasses set ``name`` and implement :meth:`from_config`, :meth:`view_specs`,
    :meth:`losses`, :meth:`cluster_probs`; they may override the hooks.
    ``selected_head`` is a buffer (saved in checkpoints) holding the sub-head
    that :meth:`predict` reports, chosen by :meth:`select_head` without labels.

    The trainer passes ``group`` (a process group) to :meth:`losses` in data-parallel
    training steps (None otherwise, e.g. in evaluation on rank 0): the views then hold
    this rank's rows only, and every batch-level quantity (contrastive negatives,
    marginals, Sinkhorn sums, DEC frequencies) must span all ranks through it (see
    :mod:`mimac.distributed` for the convention).
    """

    name: ClassVar[str] = "base"
    selected_head: Tensor

    def __init__(self, num_clusters: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        self.num_clusters = num_clusters
        self.num_heads = num_heads
        self.register_buffer("selected_head", torch.zeros((), dtype=torch.long))

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_config(
        cls, cfg: Any, in_channels: int, image_size: int, num_clusters: int
    ) -> ClusteringMethod:
        """Build the method from the run config (``mimac.config.Config``)."""
        raise NotImplementedError

    # ---- training -----------------------------------------------------------------
    def view_specs(self) -> list[ViewSpec]:
        """The views :meth:`losses` expects, in order (default: two augmented views)."""
        return [ViewSpec(), ViewSpec()]

    @property
    def num_views(self) -> int:
        """Number of views per image."""
        return len(self.view_specs())

    def losses(self, views: list[Tensor], group: Any = None) -> dict[str, Tensor]:
        """Named scalar loss terms of one batch, plus ``"total"`` (the one to minimise).

        Args:
            views: one tensor per :meth:`view_specs` entry, each ``(B, C, S_v, S_v)``
                float in ``[0, 1]``; row ``i`` of every view is the same image.
            group: the process group the batch is split over (None: one process).
        """
        raise NotImplementedError

    def head_losses(self, views: list[Tensor]) -> Tensor:
        """Per-head unsupervised criterion ``(H,)`` used to choose the head (lower is better).

        Default: the total loss, for single-head methods.
        """
        return self.losses(views)["total"].detach().reshape(1)

    def param_groups(self, optim_cfg: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups: weight decay on weights, none on biases and norms.

        A tensor with fewer than two dimensions is a bias or a norm scale/shift,
        and so is any parameter named ``bias*`` (the batched heads' ``(H, 1, D)``
        biases); decaying those only hurts (it pulls BN scales to zero).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                is_bias = p.dim() <= 1 or name.rsplit(".", 1)[-1].startswith("bias")
                (no_decay if is_bias else decay).append(p)
        groups = [{"params": decay, "weight_decay": float(optim_cfg.weight_decay)}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def may_skip_parameters(self) -> bool:
        """True if some step can leave a trainable parameter without a gradient (DDP then
        has to look for unused parameters each step, which costs a graph traversal)."""
        return False

    def prepare_epoch(self) -> int:
        """After which epoch :meth:`prepare` runs: 0 (default) before the first epoch,
        ``n`` after ``n`` epochs (e.g. k-means on features learned in a warm-up)."""
        return 0

    def prepare(self, batches: Iterable[Tensor]) -> None:
        """Once, before epoch ``prepare_epoch() + 1`` (e.g. k-means initialisation), never
        again on resume once done (its result is in the checkpoint); default: nothing.

        Args:
            batches: clean images ``(B, C, S, S)`` in ``[0, 1]`` covering the data once.
        """

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (1-based), e.g. to freeze prototypes during warm-up."""

    def after_step(self) -> None:
        """Called after each optimizer step, e.g. to re-normalise prototypes."""

    # ---- prediction ---------------------------------------------------------------
    def cluster_probs(self, x: Tensor) -> Tensor:
        """Cluster probabilities of every head, ``(H, B, K)`` float32, for clean images ``x``."""
        raise NotImplementedError

    def select_head(self, scores: Tensor) -> int:
        """Choose the head with the lowest unsupervised score ``(H,)``; returns its index."""
        if scores.numel() != self.num_heads:
            raise ValueError(f"expected {self.num_heads} head scores, got {scores.numel()}")
        best = int(torch.argmin(scores.detach().float().cpu()))
        self.selected_head.fill_(best)
        return best

    @torch.no_grad()
    def predict(self, x: Tensor) -> dict[str, Tensor]:
        """Cluster assignments of clean images ``x`` ``(B, C, S, S)``.

        Returns:
            ``labels`` ``(B,)`` and ``probs`` ``(B, K)`` of the selected head,
            ``head_labels`` ``(H, B)`` and ``head_probs`` ``(H, B, K)`` of every
            head, and ``head`` (0-dim, the selected index).
        """
        probs = self.cluster_probs(x).float()
        head_labels = probs.argmax(dim=-1)
        h = int(self.selected_head)
        return {
            "labels": head_labels[h],
            "probs": probs[h],
            "head_labels": head_labels,
            "head_probs": probs,
            "head": self.selected_head.clone(),
        }
