"""CRLC: Clustering by maximizing mutual information across views (Do et al., ICCV 2021).

One backbone, a representation head (feature contrast, NT-Xent cosine) and a
clustering head of ``H`` sub-heads (probability contrast with the
log-of-dot-product critic). Both contrastive losses run through
``mimac_kernels.fused_contrastive_loss``; all sub-heads go in one call as an
``(H, B, C)`` tensor, and the ``log_dot`` critic at ``tau = 1`` takes the
kernel library's exact linear-time closed form.

    L = lambda_fc * L_FC + (1/H) sum_h [L_PC^h - lambda_ent * H(p_bar^h) + w * penalty^h]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimac.losses import logit_penalty, marginal_entropy, smooth_probs
from mimac.models.backbones import build_backbone, resolve_backbone_name
from mimac.models.heads import MLPHead, MultiHeadMLP
from mimac.models.method import ClusteringMethod, ViewSpec
from mimac_kernels import fused_contrastive_loss


class CRLC(ClusteringMethod):
    """The CRLC model and its loss.

    Args:
        backbone: module mapping images to ``(B, F)`` features, with ``out_dim = F``.
        num_clusters: ``C``.
        heads: number of clustering sub-heads ``H``.
        proj_dim: representation size (128 in the paper).
        hidden_dim: hidden size of every head (default ``F``: 512 for the ResNets).
        alpha: probability smoothing ``p~ = (1 - alpha) p + alpha / C``.
        lambda_fc, lambda_ent: weights of the feature loss and of the marginal entropy.
        temperature: NT-Xent temperature of the feature loss.
        logit_bound, penalty_weight: logit hinge band and its weight.
        head_batch_norm: BN in the heads' hidden layers.
        kernel_backend: ``mimac_kernels`` backend for the feature loss.

    Shape:
        views: two tensors ``(B, C_in, S, S)``; :meth:`cluster_probs` -> ``(H, B, C)``.
    """

    name = "crlc"

    def __init__(
        self,
        backbone: nn.Module,
        num_clusters: int,
        *,
        heads: int = 10,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        alpha: float = 0.1,
        lambda_fc: float = 10.0,
        lambda_ent: float = 1.0,
        temperature: float = 0.1,
        logit_bound: float = 25.0,
        penalty_weight: float = 0.01,
        head_batch_norm: bool = False,
        kernel_backend: str = "auto",
    ) -> None:
        super().__init__(num_clusters, heads)
        feat = int(backbone.out_dim)
        hidden = hidden_dim or feat
        self.backbone = backbone
        self.rep_head = MLPHead(feat, hidden, proj_dim, batch_norm=head_batch_norm)
        self.cluster_head = MultiHeadMLP(feat, hidden, num_clusters, heads, batch_norm=head_batch_norm)
        self.alpha, self.lambda_fc, self.lambda_ent = alpha, lambda_fc, lambda_ent
        self.temperature = temperature
        self.logit_bound, self.penalty_weight = logit_bound, penalty_weight
        self.kernel_backend = kernel_backend

    @classmethod
    def from_config(cls, cfg: Any, in_channels: int, image_size: int, num_clusters: int) -> CRLC:
        m, c = cfg.model, cfg.crlc
        name = resolve_backbone_name(m.backbone, in_channels, image_size)
        extra = {"width": m.width} if name == "small_cnn" else {}
        backbone = build_backbone(name, in_channels, image_size, **extra)
        return cls(
            backbone, num_clusters, heads=c.heads, proj_dim=c.proj_dim, hidden_dim=c.hidden_dim,
            alpha=c.alpha, lambda_fc=c.lambda_fc, lambda_ent=c.lambda_ent,
            temperature=c.temperature, logit_bound=c.logit_bound,
            penalty_weight=c.penalty_weight, head_batch_norm=c.head_batch_norm,
            kernel_backend=cfg.kernel_backend,
        )

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(), ViewSpec()]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, C_in, S, S)`` -> (representation ``z`` ``(B, proj_dim)``, L2-normalised;
        clustering logits ``(H, B, C)``)."""
        h = self.backbone(x)
        z = F.normalize(self.rep_head(h).float(), dim=-1)
        return z, self.cluster_head(h)

    def _terms(self, views: list[Tensor], group: Any = None) -> dict[str, Tensor]:
        if len(views) != 2:
            raise ValueError(f"CRLC needs 2 views, got {len(views)}")
        batch = views[0].shape[0]
        # One backbone pass over both views: bigger matmuls, and BN sees both views.
        z, logits = self(torch.cat(views, dim=0))
        z1, z2 = z[:batch], z[batch:]
        logits = logits.float()
        probs = logits.softmax(dim=-1)  # (H, 2B, C)
        p1, p2 = probs[:, :batch], probs[:, batch:]
        feature = fused_contrastive_loss(
            z1, z2, temperature=self.temperature, critic="cosine", negatives="all",
            backend=self.kernel_backend, group=group,
        )
        pt1, pt2 = smooth_probs(p1, self.alpha), smooth_probs(p2, self.alpha)
        # tau = 1 and log_dot: the exact O(B C) closed form, every head in one call.
        prob = fused_contrastive_loss(
            pt1, pt2, temperature=1.0, critic="log_dot", negatives="all", reduction="none",
            group=group,
        ).mean(dim=-1)  # (H,)
        entropy = 0.5 * (marginal_entropy(p1, group=group)
                         + marginal_entropy(p2, group=group))  # (H,)
        penalty = 0.5 * (
            logit_penalty(logits[:, :batch], self.logit_bound)
            + logit_penalty(logits[:, batch:], self.logit_bound)
        )  # (H,)
        per_head = prob - self.lambda_ent * entropy + self.penalty_weight * penalty
        return {
            "feature": feature, "prob": prob, "entropy": entropy, "penalty": penalty,
            "per_head": per_head, "total": self.lambda_fc * feature + per_head.mean(),
        }

    def losses(self, views: list[Tensor], group: Any = None) -> dict[str, Tensor]:
        """Terms ``feature`` (L_FC), ``prob`` (mean L_PC), ``entropy`` (mean H(p_bar)),
        ``penalty`` (mean hinge) and ``total``, all scalars."""
        t = self._terms(views, group)
        return {
            "total": t["total"], "feature": t["feature"], "prob": t["prob"].mean(),
            "entropy": t["entropy"].mean(), "penalty": t["penalty"].mean(),
        }

    def head_losses(self, views: list[Tensor]) -> Tensor:
        """Each sub-head's own loss ``L_PC^h - lambda_ent H(p_bar^h) + w penalty^h`` ``(H,)``."""
        return self._terms(views)["per_head"].detach()

    def cluster_probs(self, x: Tensor) -> Tensor:
        return self.cluster_head(self.backbone(x)).float().softmax(dim=-1)
