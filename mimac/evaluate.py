"""Evaluation of a trained method: unsupervised head choice, predictions, metrics."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mimac.models.method import ClusteringMethod
from mimac.views import ViewMaker

#: Offset added to the run seed for the evaluation generator, so evaluating never
#: consumes the training generators (a resumed run evaluates identically).
EVAL_SEED_OFFSET = 1_000_003


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def head_scores(
    method: ClusteringMethod, images: Tensor, views: ViewMaker, batch_size: int, seed: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> Tensor:
    """Mean per-head loss over the data on augmented views ``(H,)``; no labels involved.

    Batches follow a seeded permutation of the same size as in training (the
    contrastive losses depend on the batch size through the negatives).
    """
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    n = images.shape[0]
    perm = torch.randperm(n, generator=gen).to(images.device)
    total = torch.zeros(method.num_heads, dtype=torch.float64)
    count = 0
    for sl in _batches(n, batch_size):
        idx = perm[sl]
        if idx.numel() < 2:
            continue
        x = images[idx].float().div_(255.0)
        with autocast():
            scores = method.head_losses(views(x, gen))
        total += scores.double().cpu() * idx.numel()
        count += idx.numel()
    return (total / max(count, 1)).float()


@torch.no_grad()
def predict_all(
    method: ClusteringMethod, images: Tensor, views: ViewMaker, batch_size: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> Tensor:
    """Cluster probabilities of every head on the clean images, ``(H, N, K)`` float32 on CPU."""
    out = []
    for sl in _batches(images.shape[0], batch_size):
        x = views.clean(images[sl].float().div_(255.0))
        with autocast():
            out.append(method.cluster_probs(x).float().cpu())
    return torch.cat(out, dim=1)


def evaluate_method(
    method: ClusteringMethod, images: Tensor, labels: Tensor, views: ViewMaker, *,
    batch_size: int, eval_batch_size: int, seed: int, num_classes: int | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Choose the head without labels, predict, and score against ``labels`` if any.

    Args:
        images: ``(N, C, H, W)`` uint8 on the method's device.
        labels: ``(N,)`` int64, -1 for unlabelled (ignored by the metrics).
        num_classes: the dataset's number of classes (else the largest label + 1).

    Returns:
        ``head`` (chosen index), ``head_scores``, ``cluster_sizes`` of the chosen
        head, ``pred`` (``(N,)`` numpy, chosen head), and when labelled: ``acc``,
        ``nmi``, ``ari`` of the chosen head, ``mapping`` (``"hungarian"``, or
        ``"majority"`` with more clusters than classes), ``cluster_class`` (the class
        each cluster is mapped to for ACC, -1: none), ``mean_acc``/``mean_nmi``/``mean_ari``
        and ``std_*`` over all heads, ``per_head`` lists, ``confusion``
        (classes x clusters), ``n_labelled``.
    """
    from mimac.metrics import confusion, evaluate_clustering

    was_training = method.training
    method.eval()
    try:
        scores = head_scores(method, images, views, batch_size, seed, autocast)
        head = method.select_head(scores)
        probs = predict_all(method, images, views, eval_batch_size, autocast)
    finally:
        method.train(was_training)
    head_pred = probs.argmax(dim=-1).numpy()  # (H, N)
    k = method.num_clusters
    pred = head_pred[head]
    out: dict[str, Any] = {
        "head": head,
        "head_scores": [round(float(s), 6) for s in scores],
        "cluster_sizes": np.bincount(pred, minlength=k).tolist(),
        "pred": pred,
    }
    y = labels.cpu().numpy()
    if (y >= 0).any():
        per_head = [evaluate_clustering(y, p, k, num_classes=num_classes) for p in head_pred]
        chosen = per_head[head]
        out.update(acc=chosen["acc"], nmi=chosen["nmi"], ari=chosen["ari"],
                   mapping=chosen["mapping"], cluster_class=chosen["cluster_class"],
                   n_labelled=int(chosen["n_labelled"]))
        for m in ("acc", "nmi", "ari"):
            vals = np.array([r[m] for r in per_head], dtype=np.float64)
            out[f"mean_{m}"], out[f"std_{m}"] = float(vals.mean()), float(vals.std())
        out["per_head"] = {m: [float(r[m]) for r in per_head] for m in ("acc", "nmi", "ari")}
        out["confusion"] = np.asarray(confusion(y, pred, k, num_classes=num_classes)).tolist()
    return out


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Recompute the metrics of a run from its newest readable checkpoint.

    ``overrides`` change the run's config for the evaluation only, e.g.
    ``["data.split=test"]`` for the train -> test protocol. The result is also
    written to ``eval_metrics.json`` (``eval_metrics_<split>.json`` if the split differs).
    """
    from mimac import atomic, divergence
    from mimac.checkpoint import load_checkpoint
    from mimac.config import load_config
    from mimac.outputs import CONFIG_FILE, FINAL_METRICS, final_metrics, format_metrics
    from mimac.run_setup import build, evaluate

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE, overrides or [])
    s = build(cfg)
    state, path = load_checkpoint(run_dir, quarantine=False,  # wrong shapes: try the previous
                                  apply=lambda st, _: s.method.load_state_dict(st["model"]))
    ev = evaluate(s, min(cfg.batch_size, len(s.images)))
    final = final_metrics(s, ev, float(state.get("train_time_s", 0.0)), [])
    final["checkpoint"], final["checkpoint_epoch"] = path.name, int(state["epoch"])
    flags = divergence.flag_degenerate(final)
    saved_file = run_dir / FINAL_METRICS
    saved = json.loads(saved_file.read_text()) if saved_file.exists() else {}
    same = cfg.data.split == saved.get("split", cfg.data.split)
    name = "eval_metrics.json" if same else f"eval_metrics_{cfg.data.split}.json"
    atomic.write_text(run_dir / name, json.dumps(final, indent=2))
    log(f"{path.name} (epoch {state['epoch']}):")
    log(format_metrics(final))
    for text in flags:
        log(f"WARNING: {text}")
    return final
