"""IMC-SwAV: Information Maximization Clustering via Multi-View Self-Labelling
(Ntelemis, Jin, Thomas; Knowledge-Based Systems 2022).

Per image, ``L`` large and ``S`` small random crops (multi-crop). Every crop goes
through the backbone (``h``), a linear projection (``z``, 512 -> 512 -> 128, no
non-linearity, as the authors' code) and a bias-free prototype layer on the
L2-normalised ``z`` (``u``, one score per prototype; the prototype vectors are
re-normalised to unit length before every step).

* SwAV loss: for each large crop ``i``, codes ``q_i = Sinkhorn(u_i / eps)``
  (no gradient, equipartition over the batch); every other crop ``p`` predicts
  them, ``-sum_k q_ik log softmax(u_p / tau)_k``; mean over the ``L (L+S-1)`` pairs.
* Classifier ``y`` (MLP F -> 1024 -> 1024 -> K, BN/ReLU) on *detached* ``h``.
* MI loss over all crop pairs ``(j, i)``: joint ``P(y, u) = (1/B) sum_b p_y p_u^T``
  of ``p_y = softmax(y_j)`` and ``p_u = softmax(u_i / tau)`` (``u`` detached, as the
  authors' code: the MI trains only the classifier), normalised;
  ``L_MI = H(Y|U) - 4 H(Y)``.
* Logit penalty ``0.01 sum_k relu(|y_k| - 5)`` (mean over rows and crops).

``L = L_SwAV + L_MI + penalty``. Prototypes get no update during the first
``freeze_prototypes_epochs`` epochs (the learning-rate warm-up), as in SwAV.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimac.config import MIN_CROP
from mimac.distributed import all_reduce_, batch_sum, world_size
from mimac.models.backbones import build_backbone, resolve_backbone_name
from mimac.models.method import ClusteringMethod, ViewSpec

#: Floor inside the logs of the MI terms (an empty joint cell contributes 0, not NaN).
MI_EPS = 1e-12
#: The paper's crop sizes for CIFAR: 28 px large, 18 px small; the default small size
#: keeps that ratio.
SMALL_TO_LARGE = 18 / 28


def _global_logsumexp0(x: Tensor, group: Any) -> Tensor:
    """``logsumexp`` over dim 0 of the rows of every rank ``(1, P)`` (no gradient)."""
    if group is None:
        return torch.logsumexp(x, dim=0, keepdim=True)
    top = all_reduce_(x.amax(dim=0, keepdim=True), group, torch.distributed.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = all_reduce_((x - top).exp().sum(dim=0, keepdim=True), group)
    return total.log() + top


@torch.no_grad()
def sinkhorn_codes(scores: Tensor, epsilon: float = 0.05, iters: int = 3, group: Any = None) -> Tensor:
    """SwAV's Sinkhorn-Knopp codes, in the log domain (finite for any score size).

    Starts from ``Q = exp(scores / eps)`` (samples x prototypes) and alternately
    rescales every prototype column to total mass ``1/K`` and every sample row to
    ``1/B``; returns ``B * Q`` (rows sum to 1: a distribution over prototypes per
    sample; columns sum to about ``B/K``: the batch is spread evenly). Working
    with ``log Q`` and ``logsumexp`` avoids ``exp(scores / eps)``, which overflows
    float32 at ``|score| / eps > 88`` and bf16 much earlier; it always runs in
    float32, also under autocast.

    Args:
        scores: prototype scores ``(B, K)``, any float dtype; no gradient is taken.
        epsilon: entropic regularisation (0.05 in SwAV and IMC-SwAV).
        iters: Sinkhorn iterations (3).
        group: a process group: the columns are normalised over every rank's rows
            (as SwAV's all-reduced sums), so the codes are those of the global batch.

    Shape:
        scores ``(B, K)`` -> codes ``(B, K)`` float32 (this rank's rows).
    """
    batch, k = scores.shape
    batch *= world_size(group)
    with torch.autocast(scores.device.type, enabled=False):
        log_q = scores.detach().float() / epsilon
        for _ in range(iters):
            log_q = log_q - _global_logsumexp0(log_q, group) - math.log(k)
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(batch)
        return torch.exp(log_q + math.log(batch))


def mi_loss(py: Tensor, pu: Tensor, entropy_weight: float = 4.0,
            group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """IMC-SwAV's ``H(Y|U) - w H(Y)`` for every pair of crops at once.

    Args:
        py: classifier probabilities ``(Vy, B, K)``.
        pu: prototype distributions ``(Vu, B, P)``.
        entropy_weight: ``w`` (4 in the paper).
        group: a process group: the joint is summed over every rank's rows.

    Returns:
        ``(loss, H(Y|U), H(Y))``, each ``(Vy, Vu)``: pair ``(j, i)`` uses ``py[j]`` and ``pu[i]``.
    """
    joint = batch_sum(torch.einsum("jbk,ibl->jikl", py.float(), pu.float()) / py.shape[1], group)
    joint = joint / joint.sum(dim=(-2, -1), keepdim=True)  # (Vy, Vu, K, P), sums to 1
    p_u = joint.sum(dim=-2, keepdim=True)  # (Vy, Vu, 1, P)
    p_y = joint.sum(dim=-1)  # (Vy, Vu, K)
    log_joint = joint.clamp_min(MI_EPS).log()
    cond = -(joint * (log_joint - p_u.clamp_min(MI_EPS).log())).sum(dim=(-2, -1))
    marg = -(p_y * p_y.clamp_min(MI_EPS).log()).sum(dim=-1)
    return cond - entropy_weight * marg, cond, marg


def linear_logit_penalty(logits: Tensor, bound: float = 5.0) -> Tensor:
    """``mean over rows of sum_k relu(|y_k| - bound)`` (the paper's hinge, not squared).

    Shape:
        logits ``(..., B, K)`` -> scalar (mean over everything but the class axis).
    """
    return (logits.float().abs() - bound).clamp_min(0.0).sum(dim=-1).mean()


class AnySizeBackbone(nn.Module):
    """Lets a flattening backbone (``SmallConvNet``) take crops of any size.

    The small net flattens its last feature map, so its projection expects the
    map size of the size it was built for; small crops give a smaller map. The
    map is adaptive-average-pooled to the built size first (identity at that
    size), so the same layers see large and small crops and spatial layout is
    kept, which matters for 8x8 digits. Backbones with global pooling are used as is.

    Shape:
        Input ``(B, C, S, S)``, any ``S >= 4``; output ``(B, out_dim)``.
    """

    def __init__(self, net: nn.Module, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.net = net
        self.out_dim = int(net.out_dim)
        was_training = net.training
        net.eval()  # eval-mode BN: the probe leaves the running statistics alone
        with torch.no_grad():
            probe = net.features(torch.zeros(1, in_channels, image_size, image_size))
        net.train(was_training)
        self.side = int(probe.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        h = self.net.features(x)
        if h.shape[-1] != self.side or h.shape[-2] != self.side:
            h = F.adaptive_avg_pool2d(h, self.side)
        return self.net.proj(torch.flatten(h, 1))


def _classifier(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class IMCSwAV(ClusteringMethod):
    """The IMC-SwAV model and its loss.

    Args:
        backbone: module mapping crops of every size used to ``(B, F)``, with ``out_dim``.
        num_clusters: ``K`` (classifier outputs).
        crops: the view specs, large crops first.
        num_large: how many of ``crops`` are large (their codes are predicted).
        proj_dim, hidden_dim: linear projection ``F -> hidden -> proj_dim``.
        prototypes: number of prototypes ``P``.
        temperature, epsilon, sinkhorn_iters: SwAV's ``tau``, ``eps`` and iterations.
        classifier_hidden: hidden width of the classifier.
        entropy_weight, logit_bound, penalty_weight: MI weight and logit hinge.
        freeze_prototypes_epochs: epochs during which the prototypes get no update.

    Shape:
        views: one ``(B, C, S_v, S_v)`` per crop; :meth:`cluster_probs` -> ``(1, B, K)``.
    """

    name = "imc_swav"

    def __init__(
        self, backbone: nn.Module, num_clusters: int, crops: list[ViewSpec], num_large: int, *,
        proj_dim: int = 128, hidden_dim: int | None = None, prototypes: int = 1000,
        temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3,
        classifier_hidden: int = 1024, entropy_weight: float = 4.0, logit_bound: float = 5.0,
        penalty_weight: float = 0.01, freeze_prototypes_epochs: int = 0,
    ) -> None:
        super().__init__(num_clusters, 1)
        feat = int(backbone.out_dim)
        hidden = hidden_dim or feat
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(feat, hidden), nn.Linear(hidden, proj_dim))
        self.prototypes = nn.Linear(proj_dim, prototypes, bias=False)
        self.classifier = _classifier(feat, classifier_hidden, num_clusters)
        self.crops, self.num_large = list(crops), num_large
        self.temperature, self.epsilon, self.sinkhorn_iters = temperature, epsilon, sinkhorn_iters
        self.entropy_weight = entropy_weight
        self.logit_bound, self.penalty_weight = logit_bound, penalty_weight
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.prototypes_frozen = False
        self.normalize_prototypes()

    @classmethod
    def from_config(cls, cfg: Any, in_channels: int, image_size: int, num_clusters: int) -> IMCSwAV:
        m, c = cfg.model, cfg.imc_swav
        large = c.large_size or image_size
        small = c.small_size or max(MIN_CROP, round(large * SMALL_TO_LARGE))
        for key, size in (("large_size", large), ("small_size", small)):
            if size > image_size:
                raise ValueError(
                    f"config key 'imc_swav.{key}' is {size} px but the images are {image_size} px: "
                    f"multi-crop sizes must fit in the image (set imc_swav.{key} <= {image_size})")
            if size < MIN_CROP:
                raise ValueError(f"config key 'imc_swav.{key}' must be at least {MIN_CROP} px, got {size}")
        if small > large:
            raise ValueError(f"config key 'imc_swav.small_size' ({small}) must not exceed "
                             f"'imc_swav.large_size' ({large})")
        big = {"size": large, **({"crop_scale": tuple(c.large_scale)} if c.large_scale else {})}
        crops = ([ViewSpec.of(**big)] * c.large_crops
                 + [ViewSpec.of(size=small, crop_scale=tuple(c.small_scale))] * c.small_crops)
        name = resolve_backbone_name(m.backbone, in_channels, large)
        extra = {"width": m.width} if name == "small_cnn" else {}
        backbone = build_backbone(name, in_channels, large, **extra)
        if getattr(backbone, "flatten", False):
            backbone = AnySizeBackbone(backbone, in_channels, large)
        freeze = c.freeze_prototypes_epochs
        return cls(
            backbone, num_clusters, crops, c.large_crops, proj_dim=c.proj_dim,
            hidden_dim=c.hidden_dim, prototypes=c.prototypes, temperature=c.temperature,
            epsilon=c.epsilon, sinkhorn_iters=c.sinkhorn_iters,
            classifier_hidden=c.classifier_hidden, entropy_weight=c.entropy_weight,
            logit_bound=c.logit_bound, penalty_weight=c.penalty_weight,
            freeze_prototypes_epochs=cfg.optim.warmup_epochs if freeze is None else freeze,
        )

    def view_specs(self) -> list[ViewSpec]:
        return list(self.crops)

    def may_skip_parameters(self) -> bool:
        return self.freeze_prototypes_epochs > 0

    def on_epoch_start(self, epoch: int) -> None:
        self.prototypes_frozen = epoch <= self.freeze_prototypes_epochs

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Unit-length prototype vectors (rows of the prototype layer's weight)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def after_step(self) -> None:
        self.normalize_prototypes()

    def _features(self, views: list[Tensor]) -> list[Tensor]:
        """Backbone features of every view, one pass per run of same-size views
        (as SwAV: bigger batches, and BN statistics per resolution)."""
        out: list[Tensor] = []
        i = 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
                j += 1
            h = self.backbone(torch.cat(views[i:j]))
            out += list(h.chunk(j - i))
            i = j
        return out

    def losses(self, views: list[Tensor], group: Any = None) -> dict[str, Tensor]:
        """Terms ``swav``, ``mi`` (= ``cond_entropy - w * entropy``), ``cond_entropy``
        (H(Y|U)), ``entropy`` (H(Y)), ``penalty`` (the hinge, before its weight) and
        ``total``; means over crop pairs."""
        if len(views) != len(self.crops):
            raise ValueError(f"imc_swav needs {len(self.crops)} crops, got {len(views)}")
        self.normalize_prototypes()  # also right after a resume or a manual weight load
        feats = self._features(views)
        h = torch.stack(feats)  # (V, B, F)
        z = F.normalize(self.projection(h).float(), dim=-1)
        # Frozen prototypes enter as a constant: no gradient at all, so the optimizer skips
        # them (no moment update, no weight decay), as SwAV does, also under DDP.
        weight = self.prototypes.weight.detach() if self.prototypes_frozen else self.prototypes.weight
        u = F.linear(z.to(weight.dtype), weight).float()  # (V, B, P)
        log_p = torch.log_softmax(u / self.temperature, dim=-1)
        swav_terms = []
        for i in range(self.num_large):
            q = sinkhorn_codes(u[i], self.epsilon, self.sinkhorn_iters, group)  # (B, P)
            ce = -(q.unsqueeze(0) * log_p).sum(dim=-1).mean(dim=-1)  # (V,)
            swav_terms.append(torch.cat([ce[:i], ce[i + 1:]]))
        swav = torch.cat(swav_terms).mean()
        # The classifier sees detached features, one crop at a time (BN statistics per crop).
        y = torch.stack([self.classifier(f.detach()) for f in feats]).float()  # (V, B, K)
        mi, cond, marg = mi_loss(y.softmax(dim=-1), log_p.detach().exp(), self.entropy_weight,
                                 group)
        penalty = linear_logit_penalty(y, self.logit_bound)
        total = swav + mi.mean() + self.penalty_weight * penalty
        return {"total": total, "swav": swav, "mi": mi.mean(), "cond_entropy": cond.mean(),
                "entropy": marg.mean(), "penalty": penalty}

    def cluster_probs(self, x: Tensor) -> Tensor:
        return self.classifier(self.backbone(x)).float().softmax(dim=-1).unsqueeze(0)
