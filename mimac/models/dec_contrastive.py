"""DEC + contrastive + anchor loss ("Cluster Analysis with Deep Embeddings and Contrastive
Learning", Sundareswaran et al. 2021).

Three views per image: the clean image ``x`` and two augmentations ``x1, x2``.

* Instance loss: NT-Xent (cosine, tau = 0.5, all negatives) on
  ``z = normalize(MLP(h))`` of ``x1, x2``, through ``mimac_kernels``.
* Cluster loss (DEC): Student-t soft assignment of the backbone feature ``h`` to
  learnable centres, ``q_ik ∝ (1 + |h_i - mu_k|^2)^-1``; sharpened target
  ``p_ik ∝ q_ik^2 / f_k`` with ``f_k = sum_i q_ik`` (per batch, no gradient);
  loss ``KL(P || Q)`` on the clean view.
* Anchor loss: ``KL(q(x) || q(x1)) + KL(q(x) || q(x2))``, the clean view's
  assignment detached: the augmented views are pulled to the clean view's clusters.

The centres are initialised by k-means (:mod:`mimac.models.kmeans`, on the
device) on the clean images' features in :meth:`DECContrastive.prepare`, which
the trainer runs before epoch ``pretrain_epochs + 1``; until then only the
instance loss trains the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimac.distributed import all_reduce_
from mimac.models.backbones import build_backbone, resolve_backbone_name
from mimac.models.heads import MLPHead
from mimac.models.kmeans import kmeans
from mimac.models.method import ClusteringMethod, ViewSpec
from mimac_kernels import fused_contrastive_loss

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def student_t_log_q(h: Tensor, centres: Tensor, dof: float = 1.0) -> Tensor:
    """Log of DEC's soft assignment ``q_ik ∝ (1 + |h_i - mu_k|^2 / a)^(-(a + 1) / 2)``.

    Computed as a log-softmax of ``-(a + 1)/2 * log1p(d^2 / a)`` so no power of a
    large distance under- or overflows; float32 even under autocast.

    Shape:
        h: ``(B, F)``; centres: ``(K, F)``; output ``(B, K)`` (rows: log-probabilities).
    """
    h, centres = h.float(), centres.float()
    # The difference form (not |h|^2 - 2 h.mu + |mu|^2) is exact near the centres,
    # where the gradient matters; B x K x F stays small (K is the cluster count).
    d2 = (h[:, None, :] - centres[None, :, :]).square().sum(dim=-1)
    return torch.log_softmax(-0.5 * (dof + 1.0) * torch.log1p(d2 / dof), dim=-1)


def target_distribution(q: Tensor, group: Any = None) -> Tensor:
    """DEC's sharpened target ``p_ik = (q_ik^2 / f_k) / sum_j (q_ij^2 / f_j)``, ``f_k = sum_i q_ik``.

    Squaring sharpens confident assignments; dividing by the cluster frequency
    keeps large clusters from absorbing everything. No gradient flows.

    Args:
        q: soft assignments.
        group: a process group: ``f_k`` sums over every rank's rows (the global batch).

    Shape:
        q: ``(B, K)``; output ``(B, K)``, rows sum to 1.
    """
    q = q.detach().float()
    freq = all_reduce_(q.sum(dim=0, keepdim=True), group)
    w = q.square() / freq.clamp_min(1e-12)
    return w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


def kl_rows(p: Tensor, log_q: Tensor) -> Tensor:
    """``mean_i KL(p_i || q_i) = mean_i sum_k p_ik (log p_ik - log q_ik)``; 0 log 0 = 0.

    Shape:
        p: ``(B, K)`` probabilities; log_q: ``(B, K)`` log-probabilities; output scalar.
    """
    return (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1).mean()


class DECContrastive(ClusteringMethod):
    """DEC clustering on a contrastively trained backbone, with the anchor loss.

    Args:
        backbone: module mapping images to ``(B, F)`` features, with ``out_dim = F``.
        num_clusters: ``K``.
        proj_dim, hidden_dim: instance head ``F -> hidden -> proj_dim``.
        temperature: NT-Xent temperature (0.5 in the paper).
        instance_weight, cluster_weight, anchor_weight: loss weights (all 1 in the paper).
        pretrain_epochs: epochs of instance loss only before the k-means initialisation.
        kmeans_restarts, kmeans_iters: k-means settings; seed: its seed.
        kernel_backend: ``mimac_kernels`` backend.

    Shape:
        views: ``[x (clean), x1, x2]``, each ``(B, C, S, S)``;
        :meth:`cluster_probs` -> ``(1, B, K)``.
    """

    name = "dec_contrastive"
    centres_ready: Tensor

    def __init__(
        self, backbone: nn.Module, num_clusters: int, *, proj_dim: int = 128,
        hidden_dim: int | None = None, temperature: float = 0.5, instance_weight: float = 1.0,
        cluster_weight: float = 1.0, anchor_weight: float = 1.0, pretrain_epochs: int = 0,
        kmeans_restarts: int = 5, kmeans_iters: int = 100, seed: int = 0,
        kernel_backend: str = "auto",
    ) -> None:
        super().__init__(num_clusters, 1)
        feat = int(backbone.out_dim)
        self.backbone = backbone
        self.instance_head = MLPHead(feat, hidden_dim or feat, proj_dim)
        self.centres = nn.Parameter(torch.zeros(num_clusters, feat))
        # A buffer, so a checkpoint says whether k-means has run (resume skips it then).
        self.register_buffer("centres_ready", torch.zeros((), dtype=torch.bool))
        self.temperature, self.kernel_backend = temperature, kernel_backend
        self.weights = (instance_weight, cluster_weight, anchor_weight)
        self.pretrain_epochs = pretrain_epochs
        self.kmeans_restarts, self.kmeans_iters, self.seed = kmeans_restarts, kmeans_iters, seed

    @classmethod
    def from_config(cls, cfg: Any, in_channels: int, image_size: int,
                    num_clusters: int) -> DECContrastive:
        m, c = cfg.model, cfg.dec_contrastive
        # Value checks: mimac.config.validate, before any data is read.
        name = resolve_backbone_name(m.backbone, in_channels, image_size)
        extra = {"width": m.width} if name == "small_cnn" else {}
        backbone = build_backbone(name, in_channels, image_size, **extra)
        return cls(
            backbone, num_clusters, proj_dim=c.proj_dim, hidden_dim=c.hidden_dim,
            temperature=c.temperature, instance_weight=c.instance_weight,
            cluster_weight=c.cluster_weight, anchor_weight=c.anchor_weight,
            pretrain_epochs=c.pretrain_epochs, kmeans_restarts=c.kmeans_restarts,
            kmeans_iters=c.kmeans_iters, seed=cfg.seed, kernel_backend=cfg.kernel_backend,
        )

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(augment=False), ViewSpec(), ViewSpec()]

    def prepare_epoch(self) -> int:
        return self.pretrain_epochs

    def may_skip_parameters(self) -> bool:
        return self.pretrain_epochs > 0  # the centres get no gradient before k-means

    @torch.no_grad()
    def prepare(self, batches: Iterable[Tensor]) -> None:
        """k-means on the clean images' features -> the centres.

        Features are taken with batch-statistics BN, as the losses see them (an
        untrained network's running statistics would give features of another
        scale); the BN running buffers are restored afterwards, so this pass
        leaves no trace but the centres.
        """
        saved = {n: b.clone() for n, b in self.backbone.named_buffers()
                 if n.rsplit(".", 1)[-1] in _BN_BUFFERS}
        was_training = self.training
        self.backbone.train()
        try:
            feats: list[Tensor] = []
            prev: Tensor | None = None
            for x in batches:
                if x.shape[0] < 2 and prev is not None:  # train-mode BN needs 2+ rows
                    x = torch.cat([prev, x])
                    feats.pop()
                feats.append(self.backbone(x).float())
                prev = x
        finally:
            self.train(was_training)
            buffers = dict(self.backbone.named_buffers())
            for n, b in saved.items():
                buffers[n].copy_(b)
        res = kmeans(torch.cat(feats), self.num_clusters, n_init=self.kmeans_restarts,
                     max_iter=self.kmeans_iters, seed=self.seed)
        self.centres.copy_(res.centres)
        self.centres_ready.fill_(True)

    def log_q(self, h: Tensor) -> Tensor:
        """Log soft assignments ``(B, K)`` of features ``h`` ``(B, F)``."""
        return student_t_log_q(h, self.centres)

    def losses(self, views: list[Tensor], group: Any = None) -> dict[str, Tensor]:
        """Terms ``instance`` (NT-Xent), ``cluster`` (KL(P||Q)), ``anchor`` and ``total``.

        Before the centres are initialised the cluster and anchor terms are
        reported as 0 and do not train anything.
        """
        if len(views) != 3:
            raise ValueError(f"dec_contrastive needs 3 views (clean, aug, aug), got {len(views)}")
        batch = views[0].shape[0]
        # One backbone pass over all views: bigger matmuls, and BN sees every view.
        h = self.backbone(torch.cat(views, dim=0))
        z = F.normalize(self.instance_head(h).float(), dim=-1)
        instance = fused_contrastive_loss(  # NT-Xent, as lightly's NTXentLoss
            z[batch:2 * batch], z[2 * batch:], temperature=self.temperature, critic="cosine",
            negatives="all", backend=self.kernel_backend, group=group)
        w_inst, w_clu, w_anc = self.weights
        zero = instance.new_zeros(())
        cluster, anchor = zero, zero
        if bool(self.centres_ready):
            log_q = self.log_q(h).view(3, batch, -1)  # (view, B, K)
            q_clean = log_q[0].exp()
            cluster = kl_rows(target_distribution(q_clean, group), log_q[0])
            anchor_p = q_clean.detach()
            anchor = kl_rows(anchor_p, log_q[1]) + kl_rows(anchor_p, log_q[2])
        total = w_inst * instance + w_clu * cluster + w_anc * anchor
        return {"total": total, "instance": instance, "cluster": cluster, "anchor": anchor}

    def cluster_probs(self, x: Tensor) -> Tensor:
        return self.log_q(self.backbone(x)).exp().unsqueeze(0)
