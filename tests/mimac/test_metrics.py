"""Clustering metrics, one test per pitfall of the evaluation protocol."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from mimac.metrics import cluster_accuracy, confusion, evaluate_clustering


def brute_force_acc(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """Best one-to-one mapping by trying every assignment of clusters to classes."""
    c = int(y_true.max()) + 1
    d = max(c, k)
    best = 0
    for perm in itertools.permutations(range(d), k):  # cluster j -> class perm[j]
        best = max(best, int(sum(np.asarray(perm)[y_pred] == y_true)))
    return best / y_true.size


@pytest.mark.parametrize("as_torch", [False, True])
def test_permuted_labels_score_one(as_torch):
    y = np.repeat(np.arange(5), 7)
    perm = np.array([3, 0, 4, 1, 2])
    t, p = (torch.from_numpy(y), torch.from_numpy(perm[y])) if as_torch else (y, perm[y])
    assert cluster_accuracy(t, p, 5) == 1.0
    r = evaluate_clustering(t, p, 5)
    assert (r["acc"], r["nmi"], r["ari"], r["n_labelled"], r["mapping"]) == \
        (1.0, 1.0, 1.0, 35, "hungarian")


def test_empty_cluster_does_not_shift_labels():
    # Three classes of two; the model never uses cluster 0. By hand: cluster 1 holds both
    # class-0 samples, cluster 2 holds classes 1 and 2. Best mapping 1->0, 2->1 (or 2),
    # 0->the class left over: 2 + 2 + 0 = 4 correct of 6 = 0.667.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [1, 1, 2, 2, 2, 2]
    assert cluster_accuracy(y_true, y_pred, num_clusters=3) == pytest.approx(4 / 6)
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(4 / 6)  # K inferred as 3
    # The last cluster empty instead: K must come from the config, not from the ids seen.
    assert cluster_accuracy(y_true, [0, 0, 1, 1, 1, 1], num_clusters=3) == pytest.approx(4 / 6)
    # Confusion keeps the empty cluster's column.
    np.testing.assert_array_equal(confusion(y_true, y_pred, 3),
                                  [[0, 2, 0], [0, 0, 2], [0, 0, 2]])


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(0)
    for k, c in [(4, 4), (3, 5), (5, 5)]:
        for _ in range(10):
            y = rng.integers(0, c, 40)
            p = rng.integers(0, k, 40)
            y[:c] = np.arange(c)  # every class present
            assert cluster_accuracy(y, p, k) == pytest.approx(brute_force_acc(y, p, k))


def test_fewer_clusters_than_classes():
    # Two clusters for three classes: only two classes can be matched.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 1, 1, 1]
    r = evaluate_clustering(y_true, y_pred, 2)
    assert r["acc"] == pytest.approx(4 / 6) and r["mapping"] == "hungarian"


def test_num_classes_from_the_dataset_not_the_labels_seen():
    # Three clusters, three classes, but the labelled rows hold only classes 0 and 1:
    # inferred from the labels, C = 2 < K would switch to the lenient majority mapping.
    y_true, y_pred = [0, 0, 1, 1], [0, 1, 2, 2]
    assert evaluate_clustering(y_true, y_pred, 3)["mapping"] == "majority"
    r = evaluate_clustering(y_true, y_pred, 3, num_classes=3)
    assert r["mapping"] == "hungarian" and r["acc"] == pytest.approx(3 / 4)
    assert cluster_accuracy(y_true, y_pred, 3, num_classes=3) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="label 1 is out of range"):
        evaluate_clustering(y_true, y_pred, 3, num_classes=1)


def test_more_clusters_than_classes_uses_majority_mapping():
    # Over-clustering: clusters 0 and 1 both hold class 0, clusters 2 and 3 class 1.
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [0, 1, 0, 2, 3, 2]
    r = evaluate_clustering(y_true, y_pred, 4)
    assert r["acc"] == 1.0 and r["mapping"] == "majority"
    # Forced one-to-one, clusters 1 and 3 are left unmatched: 4 of 6.
    assert cluster_accuracy(y_true, y_pred, 4, mapping="hungarian") == pytest.approx(4 / 6)
    # Majority per cluster, by hand: cluster 0 = {0, 0, 1} -> 2, cluster 1 = {1, 1} -> 2.
    assert cluster_accuracy([0, 0, 1, 1, 1], [0, 0, 0, 1, 1], 3) == pytest.approx(4 / 5)


def test_unlabelled_samples_are_ignored():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    p = rng.integers(0, 6, 200)
    mask = rng.random(200) < 0.3
    y_masked = np.where(mask, -1, y)
    full = evaluate_clustering(y[~mask], p[~mask], 6)
    part = evaluate_clustering(y_masked, p, 6)
    assert part == full and part["n_labelled"] == int((~mask).sum())
    assert confusion(y_masked, p, 6).sum() == (~mask).sum()


def test_nmi_ari_equal_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 10, 500)
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 10, 500))
    r = evaluate_clustering(torch.from_numpy(y), torch.from_numpy(p), 10)
    assert r["nmi"] == pytest.approx(normalized_mutual_info_score(y, p), abs=1e-12)
    assert r["nmi"] == pytest.approx(
        normalized_mutual_info_score(y, p, average_method="arithmetic"), abs=1e-12)
    assert r["ari"] == pytest.approx(adjusted_rand_score(y, p), abs=1e-12)
    assert 0.5 < r["acc"] < 1.0


def test_confusion_shape_and_counts():
    m = confusion(np.array([0, 1, 1, 2]), np.array([4, 0, 0, 1]), 5)
    assert m.shape == (3, 5) and m.dtype == np.int64
    assert m[0, 4] == 1 and m[1, 0] == 2 and m[2, 1] == 1 and m.sum() == 4


def test_errors():
    with pytest.raises(ValueError, match="length"):
        cluster_accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        cluster_accuracy([0, 1, 2], [0, 1, 3], num_clusters=3)
    with pytest.raises(ValueError, match=">= 0"):
        cluster_accuracy([0, 1, 2], [0, -1, 1])
    with pytest.raises(ValueError, match="no labelled samples"):
        evaluate_clustering([-1, -1], [0, 1], 2)
    with pytest.raises(ValueError, match="1-D"):
        cluster_accuracy(np.zeros((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="mapping"):
        cluster_accuracy([0, 1], [0, 1], 2, mapping="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer"):
        cluster_accuracy([0.5, 1.0], [0, 1])
