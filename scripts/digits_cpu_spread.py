"""Spread of the default digits run (``mimac train``) across seeds and CPU code paths.

Runs ``mimac train seed=S`` once per seed and per ATen CPU capability (torch's
vectorised kernels: ``ATEN_CPU_CAPABILITY=avx512|avx2|default``, the last being
baseline x86-64 without AVX), one process at a time, and writes one JSON with every
run's metrics and the summary (min/max/mean ACC, mean over sub-heads) to ``--out``.
The default run uses the ``torch`` loss backend, so torch's capability is the code
path that changes; ``--extra`` adds overrides to every run (e.g. ``kernel_backend=cpu``).

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

CAPABILITIES = ("avx512", "avx2", "default")


def _supported(cap: str) -> bool:
    """torch falls back silently to a lower capability; ask it what it actually uses."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    return out.lower() == ("default" if cap == "default" else cap)


def run_one(seed: int, cap: str, extra: list[str], root: Path) -> dict:
    """One ``mimac train`` in a subprocess; returns its final metrics plus the setting."""
    run_dir = root / f"seed{seed}-{cap}"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    cmd = [sys.executable, "-m", "mimac", "train", f"seed={seed}", "progress=false",
           f"run_dir={run_dir}", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {"seed": seed, "aten_cpu_capability": cap, "wall_s": round(time.perf_counter() - t0, 1),
            **{k: final[k] for k in ("acc", "nmi", "ari", "mean_acc", "std_acc", "head",
                                     "train_time_s")},
            "per_head_acc": [round(a, 4) for a in final["per_head"]["acc"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES))
    p.add_argument("--extra", nargs="*", default=[], metavar="key=value")
    p.add_argument("--out", default="results/digits_cpu_spread.json")
    args = p.parse_args()
    import torch

    caps = [c for c in args.capabilities if _supported(c)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for cap in caps:
            for seed in args.seeds:
                runs.append(run_one(seed, cap, args.extra, Path(tmp)))
                print(json.dumps(runs[-1]), flush=True)
    accs = [r["acc"] for r in runs]
    heads = [a for r in runs for a in r["per_head_acc"]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    out = {
        "what": "mimac train seed=S (the default CRLC digits run) under ATEN_CPU_CAPABILITY=CAP",
        "machine": platform.processor() or platform.machine(), "cpu_capability_native":
            torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "overrides": args.extra,
        "capabilities": caps, "seeds": args.seeds,
        "summary": {"acc_min": min(accs), "acc_max": max(accs),
                    "acc_mean": sum(accs) / len(accs), "subhead_acc_min": min(heads),
                    "subhead_acc_max": max(heads), "subhead_acc_mean": sum(heads) / len(heads)},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
