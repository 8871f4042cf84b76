"""What a finished run writes and prints: final metrics, predictions, plots, the summary.

The files are described in ``docs/run_folder.md``.
"""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimac import atomic
from mimac.run_setup import Setup

CONFIG_FILE = "config.yaml"
FINAL_METRICS = "final_metrics.json"
PREDICTIONS = "predictions.npy"
PREDICTIONS_CSV = "predictions.csv"
HEAD_SELECTION = "lowest unsupervised loss of each sub-head on the data (no labels)"


def final_metrics(s: Setup, ev: dict[str, Any], train_time: float,
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation ``ev`` (without its predictions) plus what the run was: method,
    data, device, timing, versions."""
    cfg, dev = s.cfg, s.device
    rates = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), float)]
    out = {k: v for k, v in ev.items() if k != "pred"}
    if s.class_names:
        out["class_names"] = list(s.class_names)
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else platform.processor() or platform.machine())
    out.update({
        "method": cfg.method, "dataset": cfg.data.name, "split": cfg.data.split,
        "num_images": int(s.images.shape[0]), "num_clusters": s.method.num_clusters,
        "num_heads": s.method.num_heads, "head_selection": HEAD_SELECTION,
        "epochs": cfg.epochs, "seed": cfg.seed, "device": str(dev), "device_name": device_name,
        "threads": torch.get_num_threads(), "bf16": cfg.bf16,
        "world_size": s.dist.world_size, "batch_size": min(cfg.batch_size, int(s.images.shape[0])),
        "train_time_s": round(train_time, 3),
        "images_per_s": float(np.median(rates)) if rates else None,
        "torch": torch.__version__,
    })
    if dev.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    return out


def write_predictions_csv(path: Path, s: Setup, ev: dict[str, Any]) -> None:
    """One row per image: ``index`` (row of ``predictions.npy``), ``cluster``, the class the
    ACC mapping gives that cluster (``matched_class``), the true ``label`` (names where the
    dataset has them; empty when unlabelled) and, for folder datasets, the image ``file``."""
    pred = np.asarray(ev["pred"])
    labels = s.labels.numpy()
    to_class = ev.get("cluster_class")
    names = s.class_names

    def cls(k: int) -> str:
        if k < 0:
            return ""
        return names[k] if names and k < len(names) else str(k)

    header = ["index", "cluster", "matched_class", "label"] + (["file"] if s.files else [])
    with atomic.replacing(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, k in enumerate(pred.tolist()):
            row = [i, k, cls(to_class[k]) if to_class else "", cls(int(labels[i]))]
            w.writerow(row + ([s.files[i]] if s.files else []))


def write_outputs(run_dir: Path, final: dict[str, Any], s: Setup, ev: dict[str, Any],
                  name: str = FINAL_METRICS) -> None:
    """Final metrics JSON, the predictions (``.npy`` and ``.csv``), and the plots; each
    file is written atomically.

    Raises:
        mimac.atomic.RunFileError: the metrics or the predictions could not be written
            (names the file and the cause; the previous file is kept). A plot that fails
            is reported and skipped: the results are already written.
    """
    atomic.write_text(run_dir / name, json.dumps(final, indent=2))
    with atomic.replacing(run_dir / PREDICTIONS) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(ev["pred"]))
    write_predictions_csv(run_dir / PREDICTIONS_CSV, s, ev)
    try:
        from mimac.plots import plot_run

        plot_run(run_dir, final)
    except Exception as exc:  # noqa: BLE001 -- matplotlib missing, disk full, bad metrics.csv
        print(f"plots skipped: {atomic.os_error_message(exc) if isinstance(exc, OSError) else exc}")


def format_metrics(m: dict[str, Any]) -> str:
    """One block of text with ACC/NMI/ARI of the chosen head and the mean over heads."""
    head = f"sub-head {m['head']} of {m['num_heads']}, chosen without labels"
    if "acc" not in m:
        return (f"{m['dataset']}/{m['split']}: unlabelled, metrics skipped ({head}); "
                f"cluster sizes {m['cluster_sizes']}")
    text = (f"{m['method']} on {m['dataset']} (split {m['split']}, {m.get('n_labelled')} "
            f"labelled):\n  ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}   [{head}]")
    if m.get("mapping") == "majority":
        text += "\n  ACC by majority mapping (more clusters than classes), not one-to-one"
    if m["num_heads"] > 1:
        text += (f"\n  mean over {m['num_heads']} heads: ACC {m['mean_acc']:.4f} +- "
                 f"{m['std_acc']:.4f}  NMI {m['mean_nmi']:.4f}  ARI {m['mean_ari']:.4f}")
    if m.get("train_time_s") is not None:
        text += f"\n  training time {m['train_time_s']:.1f} s on {m['device']}"
        if m.get("wall_time_s") is not None:
            text += f" (wall time with data loading and evaluation {m['wall_time_s']:.1f} s)"
    return text
