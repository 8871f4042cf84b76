"""pytest-benchmark set-up: sizes, device, deadline, labels and the JSON additions.

Run (see benchmarks/NOTES.md for more)::

    pytest benchmarks --benchmark-disable --bench-size=smoke            # CI smoke, < 2 min
    pytest benchmarks --benchmark-only --bench-size=cpu --benchmark-json=cpu.json
    pytest benchmarks --benchmark-only --bench-size=gpu --bench-deadline=300 \
        --benchmark-json=gpu.json

``--bench-size`` defaults to ``smoke`` under ``--benchmark-disable`` and to the
device's size otherwise. Results that did not run (a peer not installed, a dtype
a backend refuses, the deadline) are kept as ``mimac.skipped`` in the JSON with
their reason; providers that ran out of memory are benchmark entries whose
``extra_info["status"]`` is ``"oom"``.
"""

from __future__ import annotations

import os
import shutil

if shutil.which("nvidia-smi") is None:  # a CPU-only machine; both must precede the imports
    # The Triton interpreter must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # OpenMP threads that spin while waiting collapse when other processes share
    # the cores: eager at M = 1,024 took 800 ms spinning and 32 ms passive on a
    # loaded 2-core machine. Passive waiting is fair to every provider.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time
from dataclasses import dataclass, field

import pytest
import torch

from benchmarks import labels, new_losses
from benchmarks.cases import SIZES, Case
from benchmarks.memory import MemResult
from benchmarks.providers import Provider, providers

#: Records of benchmarks that did not run, written into the JSON by the hook below.
SKIPPED: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mimac benchmarks")
    group.addoption(
        "--bench-size",
        choices=sorted(SIZES),
        default=None,
        help="case list: smoke (tiny, every benchmark once), cpu (to 16,384 rows), "
        "gpu (4,096 to 262,144 rows). Default: smoke with --benchmark-disable, "
        "else gpu on CUDA and cpu otherwise.",
    )
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption(
        "--bench-deadline",
        type=float,
        default=None,
        help="seconds after the session starts; benchmarks not started by then are "
        "skipped and recorded (cases run in priority order)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="CPU threads for torch (and the memory child processes); default: torch's",
    )
    group.addoption(
        "--bench-providers",
        default=None,
        help="comma-separated subset of providers (eager, compile, mimac-torch, ...)",
    )


def _device(config: pytest.Config) -> torch.device:
    name = config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _size(config: pytest.Config) -> str:
    size = config.getoption("--bench-size")
    if size is not None:
        return size
    disabled = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
    if disabled:
        return "smoke"
    return "gpu" if _device(config).type == "cuda" else "cpu"


@dataclass
class BenchContext:
    """State shared by all benchmarks of a session."""

    device: torch.device
    size: str
    providers: dict[str, Provider]
    start: float
    deadline: float | None
    memory: dict[str, dict[str, MemResult]] = field(default_factory=dict)  # case id -> results
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    call_times: dict[tuple[str, str, int], float] = field(default_factory=dict)  # fwd+bwd s

    @property
    def labels(self) -> dict[str, object]:
        return labels.run_labels(self.device.type)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() - self.start > self.deadline

    def record_skip(self, case: Case, provider: str, mode: str, reason: str) -> None:
        SKIPPED.append(
            {"case": case.to_dict(), "provider": provider, "mode": mode, "reason": reason}
        )


_CONTEXT: BenchContext | None = None


def _context(config: pytest.Config) -> BenchContext:
    global _CONTEXT
    if _CONTEXT is None:
        threads = config.getoption("--bench-threads")
        if threads:
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the memory children
        device, size = _device(config), _size(config)
        provs = providers(device, interpreted=size == "smoke")
        wanted = config.getoption("--bench-providers")
        if wanted:
            keep = {w.strip() for w in wanted.split(",") if w.strip()}
            unknown = sorted(keep - provs.keys())
            if unknown:  # a typo would otherwise select nothing and pass silently
                raise pytest.UsageError(
                    f"--bench-providers: {', '.join(unknown)} not among the providers of this "
                    f"device and size ({', '.join(provs)})")
            provs = {k: v for k, v in provs.items() if k in keep}
        _CONTEXT = BenchContext(
            device, size, provs, time.monotonic(), config.getoption("--bench-deadline")
        )
    return _CONTEXT


@pytest.fixture(scope="session")
def bench_ctx(request: pytest.FixtureRequest) -> BenchContext:
    return _context(request.config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per (case, mode, provider), in the case list's priority order; for
    ``loss_item`` (``test_new_losses.py``), per (case, provider) of that case's pair."""
    if "loss_item" in metafunc.fixturenames:
        _generate_loss_items(metafunc)
    if "bench_item" not in metafunc.fixturenames:
        return
    ctx = _context(metafunc.config)
    params = []
    for case in SIZES[ctx.size]():
        for mode in case.modes:
            for name in ctx.providers:
                params.append(pytest.param((case, name, mode), id=f"{case.id}-{mode}-{name}"))
    metafunc.parametrize("bench_item", params)


def _generate_loss_items(metafunc: pytest.Metafunc) -> None:
    ctx = _context(metafunc.config)
    params = []
    for case in new_losses.SIZES[ctx.size]():
        for name in new_losses.providers(ctx.device):
            if new_losses.applies(name, case, ctx.device):
                params.append(pytest.param((case, name), id=f"{case.id}-{name}"))
    metafunc.parametrize("loss_item", params)


def pytest_report_header(config: pytest.Config) -> list[str]:
    ctx = _context(config)
    lab = ctx.labels
    return [
        f"mimac benchmarks: size={ctx.size} device={lab['device']} providers={list(ctx.providers)}",
        f"  torch {lab['torch']} triton {lab['triton']} cuda {lab['cuda']} commit {lab['commit']}",
    ]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["mimac"] = dict(_context(config).labels)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    ctx = _context(config)
    output_json["mimac"] = {
        "labels": dict(ctx.labels),
        "size": ctx.size,
        "providers": {n: p.kind for n, p in ctx.providers.items()},
        "skipped": SKIPPED,
        "wall_s": round(time.monotonic() - ctx.start, 1),
    }
