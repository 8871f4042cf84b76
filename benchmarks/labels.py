"""Labels attached to every result: device, versions, commit and date.

A number without the machine and the code that produced it cannot be compared
later, so each benchmark entry, the max-batch JSON and the report carry these.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    """Git commit of the working tree, ``+dirty`` if it has local changes.

    The device machine gets a copy of the tree without ``.git``: there the
    caller passes the commit in ``MIMAC_COMMIT``.
    """
    sha = _git("rev-parse", "--short=12", "HEAD")
    if sha is None:
        return os.environ.get("MIMAC_COMMIT", "unknown")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _version(dist: str) -> str | None:
    """Installed version of a distribution, without importing it (None if absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def run_labels(device_type: str) -> dict[str, object]:
    """Labels of this run on ``device_type`` ("cpu" or "cuda"); computed once."""
    device = torch.device(device_type)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings: keep the load next to them.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "inf_cl": _version("inf_cl"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        # The peers of the labelled, queue and sigmoid losses (benchmarks/new_losses.py).
        "pytorch_metric_learning": _version("pytorch-metric-learning"),
        "lightly": _version("lightly"),
        "open_clip": _version("open_clip_torch"),
    }
