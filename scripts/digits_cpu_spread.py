"""Spread of the default digits run (``mimac train``) across seeds and CPU code paths.

Runs ``mimac train seed=S`` once per seed and per variant, one process at a time, and
writes one JSON with every run's metrics and a summary (min/max/mean ACC of the chosen
sub-head and over all sub-heads) to ``--out``. A variant is a set of environment
variables that limit the instruction sets torch's CPU code uses, as on an older CPU:

* ``native``: nothing forced.
* ``aten_avx2`` / ``aten_default``: ``ATEN_CPU_CAPABILITY`` only (torch's own vectorised
  kernels: AVX2, or baseline x86-64 without AVX).
* ``avx2_cpu`` / ``baseline_cpu``: the same plus ``MKL_ENABLE_INSTRUCTIONS`` (matrix
  products) and ``ONEDNN_MAX_CPU_ISA`` (convolutions), closest to a CPU without AVX-512
  (or without AVX).

The default run uses the ``torch`` loss backend, so no ``mimac_kernels`` extension is
involved (its ``cpu`` backend picks its ISA itself, ``cpu_backend.set_isa``); ``--extra``
adds overrides to every run (e.g. ``kernel_backend=cpu``).

    python scripts/digits_cpu_spread.py --seeds 0 1 2 --out results/digits_cpu_spread.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, dict[str, str]] = {
    "native": {},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2_cpu": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                 "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline_cpu": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                     "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def _capability(env: dict[str, str]) -> str:
    """The capability torch actually uses under ``env`` (it falls back silently)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, check=True).stdout.strip()


def run_one(seed: int, variant: str, extra: list[str], root: Path) -> dict:
    """One ``mimac train`` in a subprocess; returns its final metrics plus the setting."""
    run_dir = root / f"seed{seed}-{variant}"
    env = {**os.environ, **VARIANTS[variant]}
    cmd = [sys.executable, "-m", "mimac", "train", f"seed={seed}", "progress=false",
           f"run_dir={run_dir}", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {"seed": seed, "variant": variant, "env": VARIANTS[variant],
            "aten_capability_used": _capability(VARIANTS[variant]),
            "wall_s": round(time.perf_counter() - t0, 1),
            **{k: final[k] for k in ("acc", "nmi", "ari", "mean_acc", "std_acc", "head",
                                     "train_time_s")},
            "per_head_acc": [round(a, 4) for a in final["per_head"]["acc"]]}


def summarize(runs: list[dict]) -> dict:
    """ACC range of the chosen sub-head, and of every sub-head, over the runs."""
    accs = [r["acc"] for r in runs]
    heads = [a for r in runs for a in r["per_head_acc"]]
    return {"runs": len(runs), "acc_min": min(accs), "acc_max": max(accs),
            "acc_mean": sum(accs) / len(accs), "subhead_acc_min": min(heads),
            "subhead_acc_max": max(heads), "subhead_acc_mean": sum(heads) / len(heads)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--extra", nargs="*", default=[], metavar="key=value")
    p.add_argument("--out", default="results/digits_cpu_spread.json")
    args = p.parse_args()
    import torch

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            for seed in args.seeds:
                runs.append(run_one(seed, variant, args.extra, Path(tmp)))
                print(json.dumps(runs[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip() or None
    out = {
        "what": "mimac train seed=S (the default CRLC digits run) under each variant's "
                "environment (instruction sets limited as on an older CPU)",
        "machine": platform.processor() or platform.machine(),
        "cpu_capability_native": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d"),
        "overrides": args.extra, "variants": {v: VARIANTS[v] for v in args.variants},
        "seeds": args.seeds, "summary": summarize(runs), "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
