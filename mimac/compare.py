"""``mimac compare``: train several methods on one dataset with the same seeds, one table.

Each (method, seed) is an ordinary run of :func:`mimac.train.train` with the
method's config ``configs/<method>_<dataset>.yaml`` plus the command's
``key=value`` overrides, in its own run folder ``OUT/runs/<method>-seed<s>``.
A finished run folder is reused and an interrupted one resumed, so a killed
comparison continues where it stopped. The protocol is the same for every
method: same data (split, ``data.limit`` subset), same seeds, the cluster
head chosen without labels, metrics on the training data.

Outputs in ``OUT``: ``compare_<dataset>.md`` (mean ± std over seeds of ACC / NMI /
ARI, training time, images/s, and one row per run), ``compare_<dataset>.png``
(bar plot) and ``compare_<dataset>.json`` (every run's final metrics). A
``kmeans (pixels)`` row (torch k-means on the raw pixels, same seeds) is the
reference every method should beat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mimac.config import default_config_dir, flat_keys, tuned_config_path

DEFAULT_METHODS = ("crlc", "imc_swav", "dec_contrastive")
BASELINE = "kmeans (pixels)"
METRICS = ("acc", "nmi", "ari")
_KEEP = ("method", "seed", "acc", "nmi", "ari", "mean_acc", "head", "epochs", "train_time_s",
         "wall_time_s", "images_per_s", "device", "device_name", "threads", "num_images",
         "split", "dataset", "cluster_sizes", "mapping")


def method_config(method: str, dataset: str, config_dir: Path) -> Path:
    """``config_dir/<method>_<dataset>.yaml``; raises FileNotFoundError naming it."""
    path = tuned_config_path(method, dataset, config_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no config for method {method!r} on {dataset!r}: {path} is missing "
                                f"(write one, or pass --config-dir DIR)")
    return path


def torch_version() -> str:
    import torch

    return torch.__version__


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def kmeans_baseline(cfg: Any, seed: int) -> dict[str, Any]:
    """Torch k-means (k-means++, 10 restarts) on the raw pixels of the run's data."""
    from mimac.metrics import evaluate_clustering
    from mimac.models.kmeans import kmeans
    from mimac.run_setup import load_run_data

    ds = load_run_data(cfg)
    k = cfg.model.num_clusters or ds.num_classes
    x = ds.images.flatten(1).float().div_(255.0)
    t0 = time.perf_counter()
    res = kmeans(x, k, n_init=10, seed=seed)
    dt = time.perf_counter() - t0
    m = evaluate_clustering(ds.labels.numpy(), res.labels.numpy(), k, num_classes=ds.num_classes or None)
    return {"method": BASELINE, "seed": seed, "acc": m["acc"], "nmi": m["nmi"], "ari": m["ari"],
            "mapping": m["mapping"],
            "train_time_s": round(dt, 3), "images_per_s": None, "num_images": len(ds),
            "split": cfg.data.split, "dataset": cfg.data.name, "device": "cpu",
            "threads": None, "epochs": None}


def _check_same_config(cfg: Any, run_dir: Path) -> None:
    """A run folder is reused or resumed only for the config it was started with."""
    from mimac.config import config_to_dict, load_config
    from mimac.outputs import CONFIG_FILE

    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        return
    ignore = {"run_dir", "progress", "bf16"}  # bf16 is recorded as applied (false on a CPU)
    saved = flat_keys(config_to_dict(load_config(saved_file)))
    wanted = flat_keys(config_to_dict(cfg))
    differ = sorted(k for k in saved.keys() | wanted.keys()
                    if k not in ignore and saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(
            f"{run_dir} holds a run with another config (differing keys: {', '.join(differ)}); "
            "pass another --out, or the overrides that run was made with")


def _run_one(cfg: Any, run_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from mimac.checkpoint import LAST, PREV
    from mimac.train import FINAL_METRICS, train

    _check_same_config(cfg, run_dir)
    final_file = run_dir / FINAL_METRICS
    if final_file.is_file():
        log(f"  reusing the finished run {run_dir}")
        return json.loads(final_file.read_text())
    resume = run_dir if ((run_dir / LAST).exists() or (run_dir / PREV).exists()) else None
    if resume:
        log(f"  resuming {run_dir}")
    final = train(cfg, resume=resume, log=lambda s: log("  " + s))
    assert final is not None
    return final


def run_compare(
    dataset: str, seeds: Sequence[int], methods: Sequence[str] = DEFAULT_METHODS,
    out: str | Path | None = None, overrides: Sequence[str] = (),
    config_dir: str | Path | None = None, baseline: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every method with every seed and write the table, plot and JSON to ``out``.

    Args:
        dataset: the ``data.name`` of every run, e.g. ``"digits"``.
        seeds: run seeds, the same list for every method.
        methods: method names (keys of ``mimac.models.METHODS``).
        out: output folder (default ``runs/compare-<dataset>-<timestamp>``).
        overrides: ``key=value`` applied to every method's config (``seed``/``run_dir``
            are set per run).
        config_dir: where ``<method>_<dataset>.yaml`` live (default: the repo's configs/).
        baseline: add the raw-pixel k-means row.

    Returns:
        ``{"runs": [...], "summary": {method: {...}}, "table": str, "paths": {...}}``.
    """
    from mimac.config import load_config
    from mimac.models import METHODS

    if not seeds:
        raise ValueError("compare needs at least one seed (--seeds 0 1 2)")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    cdir = Path(config_dir) if config_dir else default_config_dir()
    out = Path(out) if out else Path("runs") / f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    # Resolve every config first: a typo fails now, not after an hour of training.
    fixed = [f"data.name={dataset}", "progress=false"]
    configs = {m: method_config(m, dataset, cdir) for m in methods}
    for m, path in configs.items():
        load_config(path, [*fixed, *overrides])
    runs: list[dict[str, Any]] = []
    for m in methods:
        for s in seeds:
            run_dir = out / "runs" / f"{m}-seed{s}"
            cfg = load_config(configs[m], [*fixed, *overrides, f"seed={s}", f"run_dir={run_dir}"])
            log(f"[{m} seed {s}] {configs[m]} -> {run_dir}")
            final = _run_one(cfg, run_dir, log)
            runs.append({k: final.get(k) for k in _KEEP} | {"config": str(configs[m]),
                                                            "run_dir": str(run_dir)})
    if baseline:
        base_cfg = load_config(configs[methods[0]], [*fixed, *overrides])
        for s in seeds:
            runs.append(kmeans_baseline(base_cfg, s))
    summary = summarise(runs)
    table = format_table(dataset, runs, summary, overrides)
    paths = {"table": out / f"compare_{dataset}.md", "plot": out / f"compare_{dataset}.png",
             "json": out / f"compare_{dataset}.json"}
    paths["table"].write_text(table)
    paths["json"].write_text(json.dumps({"dataset": dataset, "seeds": list(seeds),
                                         "overrides": list(overrides), "summary": summary,
                                         "runs": runs}, indent=2))
    try:
        plot_compare(dataset, summary, paths["plot"])
    except ImportError as exc:  # matplotlib missing: the table and JSON are written
        log(f"plot skipped: {exc}")
        paths.pop("plot")
    log(table)
    return {"runs": runs, "summary": summary, "table": table,
            "paths": {k: str(v) for k, v in paths.items()}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: ``n``, ``<metric>_mean``/``_std`` (sample std over seeds), mean time and rate."""
    out: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        row: dict[str, Any] = {"n": len(rs)}
        for k in (*METRICS, "train_time_s"):
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([float(r[k]) for r in rs])
        rates = [float(r["images_per_s"]) for r in rs if r.get("images_per_s")]
        row["images_per_s"] = float(np.mean(rates)) if rates else None
        row["epochs"] = rs[0].get("epochs")
        out[m] = row
    return out


def format_table(dataset: str, runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]],
                 overrides: Sequence[str] = ()) -> str:
    """The markdown report: header (protocol, device), summary table, per-run table."""
    trained = [r for r in runs if r["method"] != BASELINE]
    first = trained[0] if trained else runs[0]
    seeds = sorted({r["seed"] for r in runs})
    devices = sorted({f"{r.get('device')} ({r.get('device_name')})" for r in trained})
    threads = sorted({str(r.get("threads")) for r in trained})
    majority = list(dict.fromkeys(r["method"] for r in runs if r.get("mapping") == "majority"))
    lines = [
        f"# {dataset}: method comparison",
        "",
        (f"- data: {dataset}, split `{first.get('split')}`, {first.get('num_images')} images; "
         f"seeds {seeds}; metrics on the clustered data, head chosen without labels"),
        (f"- device: {', '.join(devices) or 'n/a'}; torch threads {', '.join(threads) or 'n/a'}; "
         f"torch {torch_version()}; {time.strftime('%Y-%m-%d')}"),
        f"- overrides: {' '.join(overrides) if overrides else '(none: the configs as committed)'}",
        ("- time: training time per run (excludes data loading and evaluation); images/s: "
         "training images per second (all views of an image count once)"),
        *([f"- ACC by majority mapping (more clusters than classes), not one-to-one: {', '.join(majority)}"]
          if majority else []),
        "",
        "| method | runs | epochs | ACC | NMI | ARI | time (s) | images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        def cell(k: str, fmt: str, s: dict[str, Any] = s) -> str:
            # A single run has no spread: print its value alone, not "± 0".
            mean = format(s[f"{k}_mean"], fmt)
            return f"{mean} ± {format(s[f'{k}_std'], fmt)}" if s["n"] > 1 else mean

        rate = f"{s['images_per_s']:.0f}" if s["images_per_s"] else "—"
        epochs = s["epochs"] if s["epochs"] is not None else "—"
        lines.append(f"| {m} | {s['n']} | {epochs} | {' | '.join(cell(k, '.4f') for k in METRICS)} | "
                     f"{cell('train_time_s', '.1f')} | {rate} |")
    lines += ["", "Per run:", "", "| method | seed | ACC | NMI | ARI | time (s) | images/s |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        rate = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "—"
        lines.append(f"| {r['method']} | {r['seed']} | {r['acc']:.4f} | {r['nmi']:.4f} | "
                     f"{r['ari']:.4f} | {r['train_time_s']:.1f} | {rate} |")
    return "\n".join(lines) + "\n"


def plot_compare(dataset: str, summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars of ACC / NMI / ARI (mean, std as error bars) and the training time."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(summary)
    x = np.arange(len(names))
    width = 0.26
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 4),
                                   gridspec_kw={"width_ratios": [3, 1.3]})
    for i, k in enumerate(METRICS):
        means = [summary[n][f"{k}_mean"] for n in names]
        stds = [summary[n][f"{k}_std"] for n in names]
        bars = ax.bar(x + (i - 1) * width, means, width, yerr=stds, capsize=3, label=k.upper())
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_title(f"{dataset}: clustering quality")
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    times = [summary[n]["train_time_s_mean"] for n in names]
    ax_t.bar(x, times, 0.6, yerr=[summary[n]["train_time_s_std"] for n in names], capsize=3,
             color="tab:gray")
    ax_t.set_xticks(x, names, rotation=30, fontsize=8)
    ax_t.set_ylabel("training time per run (s)")
    ax_t.set_title("time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
