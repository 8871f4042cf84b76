"""What a run writes: the confusion plot's order, predictions mapped to files, the loss plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mimac.config import load_config
from mimac.metrics import evaluate_clustering
from mimac.plots import confusion_order, plot_losses
from mimac.train import train

TINY = ["model.width=8", "crlc.heads=2", "crlc.hidden_dim=32", "crlc.proj_dim=16",
        "eval_every=1", "progress=false", "threads=1", "device=cpu"]


@pytest.mark.parametrize("k", [4, 6, 9])  # fewer, as many and more clusters than classes
def test_confusion_order_puts_the_acc_matches_on_the_diagonal(k: int) -> None:
    rng = np.random.default_rng(k)
    y = rng.integers(0, 6, 500)
    # predictions that follow the labels through a shuffled map, with noise
    pred = np.where(rng.random(500) < 0.6, rng.permutation(k)[y % k], rng.integers(0, k, 500))
    ev = evaluate_clustering(y, pred, k, num_classes=6)
    counts = np.zeros((6, k), dtype=np.int64)
    np.add.at(counts, (y, pred), 1)
    rows, cols = confusion_order(ev["cluster_class"], counts)
    ordered = counts[rows][:, cols]
    to_class = np.array(ev["cluster_class"])[cols]
    matched = sum(counts[c, j] for j, c in zip(cols, to_class) if c >= 0)
    assert matched / 500 == pytest.approx(ev["acc"])
    assert sorted(rows.tolist()) == list(range(6)) and sorted(cols.tolist()) == list(range(k))
    if ev["mapping"] == "hungarian":  # one cluster per class: exactly the diagonal
        assert np.trace(ordered) / 500 == pytest.approx(ev["acc"])
    else:  # several clusters per class: columns grouped by class, in class order
        assert list(to_class) == sorted(to_class)


def _write_folder(root: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for c, level in (("cat", 40), ("dog", 200)):
        for i in range(12):
            path = root / c / f"{c}{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = np.clip(level + rng.integers(-30, 30, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(path)
            files.append(str(path))
    return files


def test_folder_run_maps_predictions_to_files_and_names(tmp_path: Path) -> None:
    files = _write_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    final = train(load_config(None, [*TINY, "data.name=folder", f"data.root={tmp_path / 'imgs'}",
                                     "epochs=1", f"run_dir={run}"]), log=lambda s: None)
    pred = np.load(run / "predictions.npy")
    with (run / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == files
    assert [int(r["cluster"]) for r in rows] == pred.tolist()
    assert {r["label"] for r in rows} == {"cat", "dog"}
    to_class = final["cluster_class"]
    names = final["class_names"]
    assert names == ["cat", "dog"]
    assert all(r["matched_class"] == (names[to_class[int(r["cluster"])]]
                                      if to_class[int(r["cluster"])] >= 0 else "") for r in rows)
    saved = json.loads((run / "final_metrics.json").read_text())
    assert saved["class_names"] == ["cat", "dog"] and (run / "confusion.png").exists()


def test_loss_plot_drops_terms_that_stay_zero(tmp_path: Path) -> None:
    rows = [{"epoch": e, "loss_total": 5.0 - e, "loss_penalty": 0.0, "loss_prob": 1.0 / e}
            for e in (1, 2, 3)]
    assert plot_losses(rows, tmp_path / "l.png") == ["loss_total", "loss_prob"]
    assert (tmp_path / "l.png").exists()
