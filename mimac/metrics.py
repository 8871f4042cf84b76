"""Clustering metrics: ACC (best cluster-to-class mapping), NMI and ARI.

The pitfalls handled here:

* The contingency matrix is sized by the configured number of clusters K, not by the cluster
  ids that happen to occur, so an empty cluster never shifts the others' ids.
* Hungarian matching (``scipy.optimize.linear_sum_assignment`` on ``w.max() - w``) when
  K <= number of classes: a one-to-one mapping, unmatched clusters count as wrong.
* When K > classes (over-clustering) a one-to-one mapping would leave clusters unmatched and
  punish a finer partition; ACC then uses the many-to-one **majority** mapping (each cluster
  takes its most frequent class), as IIC/SCAN do for over-clustering, and the result says so
  (``"mapping": "majority"``).
* Labels of -1 mark unlabelled samples and are left out of every metric.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["cluster_accuracy", "cluster_mapping", "confusion", "evaluate_clustering"]

Mapping = Literal["auto", "hungarian", "majority"]


def _as_int_array(a: Any, name: str) -> np.ndarray:
    """numpy array, torch tensor (any device) or sequence -> 1-D int64 numpy array."""
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if (
        arr.size
        and not np.issubdtype(arr.dtype, np.integer)
        and not np.all(np.equal(np.mod(arr, 1), 0))
    ):
        raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _prepare(y_true: Any, y_pred: Any, num_clusters: int | None, num_classes: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Validate, drop unlabelled samples; return (labels, preds, num_classes, num_clusters)."""
    t = _as_int_array(y_true, "y_true")
    p = _as_int_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.size and t.min() < -1:
        raise ValueError(f"labels must be >= 0, or -1 for unlabelled; found {t.min()}")
    if p.size and p.min() < 0:
        raise ValueError(f"predicted cluster ids must be >= 0; found {p.min()}")
    if num_clusters is not None:
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be positive, got {num_clusters}")
        if p.size and p.max() >= num_clusters:
            raise ValueError(f"predicted cluster id {p.max()} is out of range "
                             f"[0, {num_clusters}) for num_clusters={num_clusters}")
    keep = t >= 0
    if not keep.any():
        raise ValueError("no labelled samples (every label is -1): clustering metrics need "
                         "ground truth")
    t, p = t[keep], p[keep]
    k = num_clusters if num_clusters is not None else int(p.max()) + 1
    if num_classes is None:
        return t, p, int(t.max()) + 1, k
    if t.max() >= num_classes:
        raise ValueError(f"label {t.max()} is out of range [0, {num_classes}) for num_classes={num_classes}")
    return t, p, num_classes, k


def _contingency(t: np.ndarray, p: np.ndarray, num_classes: int, num_clusters: int
                 ) -> np.ndarray:
    """``(num_classes, num_clusters)`` counts; ``w[c, k]`` = samples of class c in cluster k."""
    flat = np.bincount(t * num_clusters + p, minlength=num_classes * num_clusters)
    return flat.reshape(num_classes, num_clusters)


def confusion(y_true: Any, y_pred: Any, num_clusters: int, *,
              num_classes: int | None = None) -> np.ndarray:
    """Class-by-cluster counts for plots; unlabelled samples (-1) are left out.

    Args:
        y_true: ``(N,)`` labels in ``0..C-1`` or -1.
        y_pred: ``(N,)`` cluster ids in ``[0, num_clusters)``.
        num_clusters: K, the configured number of clusters (sizes the matrix).
        num_classes: the dataset's C (default ``max(label) + 1``).

    Returns:
        ``(C, K)`` int64 array.
    """
    t, p, c, k = _prepare(y_true, y_pred, num_clusters, num_classes)
    return _contingency(t, p, c, k)


def cluster_mapping(w: np.ndarray, mapping: Mapping) -> tuple[np.ndarray, str]:
    """The class each cluster is mapped to, ``(K,)`` (-1: none), from the ``(C, K)`` counts.

    ``hungarian``: one-to-one, the assignment that maximises the matched counts (padded
    square: with fewer classes than clusters some clusters match nothing); ``majority``:
    each cluster to its most frequent class; ``auto``: majority when K > C.
    """
    c, k = w.shape
    if mapping == "auto":
        mapping = "majority" if k > c else "hungarian"
    if mapping == "majority":
        return w.argmax(axis=0), "majority"
    if mapping != "hungarian":
        raise ValueError(f"mapping must be auto|hungarian|majority, got {mapping!r}")
    d = max(c, k)
    square = np.zeros((d, d), dtype=np.int64)  # padded: empty clusters/classes match nothing
    square[:c, :k] = w
    rows, cols = linear_sum_assignment(square.max() - square)
    to_class = np.full(k, -1, dtype=np.int64)
    for r, col in zip(rows, cols):
        if r < c and col < k:
            to_class[col] = r
    return to_class, "hungarian"


def _accuracy(t: np.ndarray, p: np.ndarray, c: int, k: int, mapping: Mapping
              ) -> tuple[float, str, np.ndarray]:
    """ACC, the mapping used and the class of each cluster ``(K,)``."""
    w = _contingency(t, p, c, k)
    to_class, used = cluster_mapping(w, mapping)
    hits = sum(int(w[cls, j]) for j, cls in enumerate(to_class) if cls >= 0)
    return hits / t.size, used, to_class


def cluster_accuracy(y_true: Any, y_pred: Any, num_clusters: int | None = None, *,
                     mapping: Mapping = "auto", num_classes: int | None = None) -> float:
    """Clustering accuracy under the best mapping of clusters to classes.

    Args:
        y_true: ``(N,)`` int labels ``0..C-1``; -1 = unlabelled (ignored). numpy or torch.
        y_pred: ``(N,)`` cluster ids in ``[0, num_clusters)``. numpy or torch.
        num_clusters: the configured K. Pass it: without it K is inferred as
            ``max(y_pred) + 1``, which is only right when the last cluster is not empty.
        mapping: ``"auto"`` (Hungarian when K <= C, majority when K > C), or force one.
        num_classes: the dataset's C. Pass it: without it C is inferred as
            ``max(y_true) + 1``, too small when the labelled rows lack the last class.

    Returns:
        accuracy in [0, 1].

    Raises:
        ValueError: mismatched lengths, predictions outside ``[0, num_clusters)``, no
            labelled sample.

    Example:
        >>> cluster_accuracy([0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 2, 2], num_clusters=3)
        0.6666666666666666
    """
    t, p, c, k = _prepare(y_true, y_pred, num_clusters, num_classes)
    return _accuracy(t, p, c, k, mapping)[0]


def evaluate_clustering(y_true: Any, y_pred: Any, num_clusters: int | None = None, *,
                        mapping: Mapping = "auto", num_classes: int | None = None) -> dict[str, Any]:
    """ACC, NMI and ARI on the labelled samples.

    NMI is scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean normalisation),
    ARI its ``adjusted_rand_score``; neither depends on the mapping.

    Args: as :func:`cluster_accuracy`.

    Returns:
        ``{"acc": float, "nmi": float, "ari": float, "n_labelled": int,
        "mapping": "hungarian" | "majority", "cluster_class": [int] * K}``; the last is
        the class each cluster is mapped to for ACC (-1: none).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t, p, c, k = _prepare(y_true, y_pred, num_clusters, num_classes)
    acc, used, to_class = _accuracy(t, p, c, k, mapping)
    return {
        "acc": acc,
        "nmi": float(normalized_mutual_info_score(t, p, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(t, p)),
        "n_labelled": int(t.size),
        "mapping": used,
        "cluster_class": to_class.tolist(),
    }
