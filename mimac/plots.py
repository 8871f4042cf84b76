"""PNG plots of a run: loss curves, ACC/NMI over epochs, confusion matrix, cluster sizes.

Uses matplotlib's Agg backend (no display needed). Every plot reads the run's
``metrics.csv`` and the final metrics dict, so a finished run can be re-plotted.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from mimac import atomic
from mimac.runlog import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_losses(rows: list[dict[str, Any]], path: Path) -> list[str]:
    """One panel per loss term (``loss_*`` columns) against the epoch; a term that is zero
    at every epoch (e.g. a hinge penalty that never fires) gets no panel, only a note.
    Returns the columns plotted."""
    plt = _pyplot()
    keys = [k for k in rows[0] if k.startswith("loss_")] if rows else []
    flat = [k for k in keys if all(r.get(k) == 0 for r in rows)]
    keys = [k for k in keys if k not in flat]
    if not keys:
        return []
    cols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, k in zip(axes.flat, keys):
        ax.plot(epochs, [r.get(k, math.nan) for r in rows])
        ax.set_title(k[5:])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if flat:
        fig.suptitle(f"zero at every epoch (not shown): {', '.join(k[5:] for k in flat)}",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys


def plot_scores(rows: list[dict[str, Any]], path: Path) -> None:
    """ACC/NMI/ARI of the chosen head (solid) and the mean over heads (dashed) per evaluated epoch."""
    plt = _pyplot()
    ev = [r for r in rows if isinstance(r.get("acc"), float) and not math.isnan(r["acc"])]
    if not ev:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in ev]
    for key, colour in (("acc", "C0"), ("nmi", "C1"), ("ari", "C2")):
        ax.plot(epochs, [r[key] for r in ev], "-o", ms=3, color=colour, label=key.upper())
        if f"mean_{key}" in ev[0]:
            ax.plot(epochs, [r[f"mean_{key}"] for r in ev], "--", color=colour, alpha=0.6,
                    label=f"{key.upper()} (mean of heads)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_order(cluster_class: list[int] | np.ndarray, counts: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Row (class) and column (cluster) order that puts the ACC mapping's matches on the
    diagonal: clusters in the order of their matched class, several clusters of one class
    (majority mapping) by size, unmatched clusters last; classes in their order, except
    that with fewer clusters than classes the unmatched classes go last.

    Args:
        cluster_class: ``(K,)`` class of each cluster, -1 for none.
        counts: ``(C, K)`` class-by-cluster counts.

    Returns:
        ``(rows, cols)``: index arrays for ``counts[rows][:, cols]``.
    """
    to_class = np.asarray(cluster_class)
    counts = np.asarray(counts)
    key = np.where(to_class >= 0, to_class, np.iinfo(np.int64).max)
    cols = np.lexsort((-counts.sum(axis=0), key))
    matched = list(dict.fromkeys(int(c) for c in to_class[cols] if c >= 0))
    rows = np.arange(counts.shape[0])
    if len(matched) == len(to_class[to_class >= 0]):  # one-to-one: matched classes first
        rows = np.array(matched + [c for c in range(counts.shape[0]) if c not in matched])
    return rows, cols


def plot_confusion(matrix: np.ndarray, path: Path, cluster_class: list[int] | None = None,
                   class_names: list[str] | None = None) -> None:
    """Classes (rows) x clusters (columns) counts, ordered so that the ACC mapping's matches
    (``cluster_class``; if absent, computed from the matrix) lie on the diagonal; rows
    named ``class_names`` when given."""
    from mimac.metrics import cluster_mapping

    plt = _pyplot()
    m = np.asarray(matrix)
    if cluster_class is None:
        cluster_class = cluster_mapping(m, "auto")[0]
    rows, cols = confusion_order(cluster_class, m)
    m = m[rows][:, cols]
    names = class_names if class_names and len(class_names) == m.shape[0] else \
        [str(c) for c in range(m.shape[0])]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * m.shape[1], 1 + 0.45 * m.shape[0]))
    ax.imshow(m, cmap="Blues")
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(m.shape[1]), [str(c) for c in cols], fontsize=7)
    ax.set_yticks(range(m.shape[0]), [names[r] for r in rows], fontsize=7)
    ax.set_xlabel("cluster (ordered by its matched class)")
    ax.set_ylabel("class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cluster_sizes(sizes: list[int], path: Path) -> None:
    """Bar chart of the number of samples per cluster, with the uniform size dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(sizes)), 3))
    ax.bar(range(len(sizes)), sizes)
    ax.axhline(sum(sizes) / max(len(sizes), 1), ls="--", color="gray")
    ax.set_xlabel("cluster")
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(run_dir: str | Path, final: dict[str, Any]) -> list[Path]:
    """Write all plots of a run into ``run_dir``; returns the files written.

    Each plot is written atomically; one that fails keeps its previous file and
    does not stop the others.

    Raises:
        RuntimeError: after trying every plot, if some failed (each named with its cause).
    """
    run_dir = Path(run_dir)
    failed: list[str] = []
    try:
        rows = read_metrics(run_dir)
    except (ValueError, OSError) as exc:  # the curves need metrics.csv; the others do not
        rows, failed = [], [f"loss_curves.png, scores.png: {exc}"]
    out = []
    jobs = [("loss_curves.png", plot_losses, rows), ("scores.png", plot_scores, rows),
            ("cluster_sizes.png", plot_cluster_sizes, final.get("cluster_sizes")),
            ("confusion.png", functools.partial(plot_confusion, cluster_class=final.get(
                "cluster_class"), class_names=final.get("class_names")), final.get("confusion"))]
    for name, fn, data in jobs:
        if not data:
            continue
        try:
            with atomic.replacing(run_dir / name) as tmp:
                fn(data, tmp)
        except Exception as exc:  # noqa: BLE001 -- matplotlib missing, disk full, ...
            failed.append(str(exc) if isinstance(exc, atomic.RunFileError)
                          else f"{name}: {type(exc).__name__}: {exc}")
            continue
        if (run_dir / name).exists():
            out.append(run_dir / name)
    if failed:
        raise RuntimeError("; ".join(failed))
    return out
