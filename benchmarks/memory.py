"""Peak memory above the inputs of one forward + backward, on CUDA and on the CPU.

CUDA (in process): ``max_memory_allocated`` after ``reset_peak_memory_stats``,
minus what was allocated before the call (the inputs).

CPU (in a child process, ``python -m benchmarks.memory``): the caller's heap
would hide or inflate a measurement, so a fresh process builds the inputs and
runs each provider in turn. Per provider it warms lazily built state (thread
pools, kernel caches, a compiled graph), frees and trims the heap, resets the
kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), runs one
forward + backward and reads ``VmHWM - VmRSS(before)``: the peak resident
memory the call added. One child serves all providers of a case, which saves
a ~3 s torch import per measurement.

Where the high-water mark cannot be reset, it falls back to one child per
provider and subtracts a baseline child that only allocates the inputs. It
reads ``VmHWM``, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across
``exec``, so a child of a large parent would report the parent's peak.

A child killed by a signal (the kernel's OOM killer) records the provider it
was running as ``oom``; the remaining providers get a fresh child.

The child builds cases, inputs and providers from a *suite* module (``suite=``, by
name): ``benchmarks.providers`` (the contrastive loss, the default) or
``benchmarks.new_losses``. A suite defines ``case_from_dict(d)``,
``make_inputs(case, device, seed=0)`` (a tuple of tensors, the loss's arguments),
``tiny(case)`` and ``providers(device, interpreted=...)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.cases import Case

REPO = Path(__file__).resolve().parents[1]
MARK = "MIMAC_MEM "
CLEAR_REFS = Path("/proc/self/clear_refs")
INPUTS = "inputs"  # pseudo-provider of the baseline child
DEFAULT_SUITE = "benchmarks.providers"


@dataclass
class MemResult:
    """Outcome of one measurement. ``status``: ok, oom, skip, error or timeout."""

    provider: str
    status: str
    peak_bytes: int | None = None  # above the inputs (and state held before the call)
    total_bytes: int | None = None  # peak of everything (CUDA: allocated; CPU: VmHWM)
    fwd_s: float | None = None
    bwd_s: float | None = None
    method: str = ""
    detail: str = ""


# --------------------------------------------------------------------------- CUDA


def cuda_peak(fn: Callable, a: torch.Tensor, b: torch.Tensor, name: str = "") -> MemResult:
    """One forward + backward of ``fn(a, b)`` on CUDA, with its peak above the inputs."""
    a.grad = b.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = fn(a, b)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    loss.backward()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    total = torch.cuda.max_memory_allocated()
    del loss
    a.grad = b.grad = None
    return MemResult(name, "ok", total - base, total, t1 - t0, t2 - t1, "cuda-max-allocated")


# --------------------------------------------------------------------------- CPU, parent side


def available_bytes() -> int:
    """What a new CPU allocation can get without swapping (``MemAvailable``; unbounded
    where /proc/meminfo cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def hwm_resettable() -> bool:
    """Whether this kernel lets a process reset its own peak-RSS mark."""
    return CLEAR_REFS.exists() and os.access(CLEAR_REFS, os.W_OK)


def _spawn(
    case: Case, names: list[str], limit: int, timeout: float, suite: str = DEFAULT_SUITE
) -> tuple[dict, int, str]:
    cmd = [sys.executable, "-m", "benchmarks.memory", json.dumps(case.to_dict()), ",".join(names)]
    cmd += [str(limit), suite]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
        out, rc, err = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, err = None, f"timed out after {timeout:.0f} s"
    results = {}
    for line in out.splitlines():
        if line.startswith(MARK):
            rec = json.loads(line[len(MARK) :])
            if "status" in rec:
                results[rec["provider"]] = MemResult(**rec)
    return results, rc, err


def measure_cpu(
    case: Case,
    names: list[str],
    *,
    timeout: float = 900.0,
    limit_bytes: int = 0,
    suite: str = DEFAULT_SUITE,
) -> dict[str, MemResult]:
    """Peak memory above the inputs of each provider in ``names`` on ``case`` (CPU).

    ``limit_bytes`` > 0 caps the child's address space at that much above its
    state before the call, so an allocation past it fails as ``oom`` (max-batch).
    ``suite``: the module that defines ``case``'s kind (see the module docstring).
    """
    if not hwm_resettable():
        return _measure_cpu_baseline(case, names, timeout, limit_bytes, suite)
    results: dict[str, MemResult] = {}
    pending = list(names)
    while pending:
        got, rc, err = _spawn(case, pending, limit_bytes, timeout, suite)
        results.update(got)
        pending = [n for n in pending if n not in results]
        if not pending:
            break
        # The child died inside pending[0]: a signal kill is the OOM killer's doing.
        killed = rc is not None and rc < 0
        status = "timeout" if rc is None else ("oom" if killed else "error")
        results[pending[0]] = MemResult(pending[0], status, detail=f"child rc={rc}: {err[-800:]}")
        pending = pending[1:]
    return results


def _measure_cpu_baseline(
    case: Case, names: list[str], timeout: float, limit: int, suite: str
) -> dict[str, MemResult]:
    base, _, err = _spawn(case, [INPUTS], 0, timeout, suite)
    if INPUTS not in base:
        raise RuntimeError(f"baseline memory child failed: {err[-2000:]}")
    results = {}
    for name in names:
        got, rc, err = _spawn(case, [name], limit, timeout, suite)
        res = got.get(name) or MemResult(
            name, "timeout" if rc is None else "oom" if rc < 0 else "error", detail=err[-800:]
        )
        if res.status == "ok":
            res.peak_bytes = res.total_bytes - base[INPUTS].total_bytes
        results[name] = res
    return results


# --------------------------------------------------------------------------- CPU, child side


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_total_bytes() -> int:
    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, KeyError):  # no /proc: ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def _trim_heap() -> None:
    """Give freed memory back to the OS, so the next peak starts from a clean floor."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _clear_grads(inputs: tuple) -> None:
    for t in inputs:
        t.grad = None


def _measure_one(
    provider, case, inputs: tuple, resettable: bool, limit: int, suite: ModuleType
) -> MemResult:
    from benchmarks.providers import is_oom

    device = inputs[0].device
    why = provider.reason(case, device)
    if why is not None:
        return MemResult(provider.name, "skip", detail=why)
    fn = provider.make(case)
    old = resource.getrlimit(resource.RLIMIT_AS)
    if limit:  # set before the warm-up: compile's full-shape warm-up must obey it too
        resource.setrlimit(resource.RLIMIT_AS, (_status_kb("VmSize") * 1024 + limit, old[1]))
    try:
        # compile specialises on shapes: only the full shape warms it.
        warm = (
            inputs if provider.name == "compile" else suite.make_inputs(suite.tiny(case), device, 1)
        )
        fn(*warm).backward()
        del warm
        _clear_grads(inputs)
        _trim_heap()
        before = _status_kb("VmRSS") * 1024 if resettable else 0
        if resettable:
            CLEAR_REFS.write_text("5")
        t0 = time.perf_counter()
        loss = fn(*inputs)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
    except Exception as exc:
        if is_oom(exc):
            return MemResult(provider.name, "oom", detail=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)
    total = _peak_total_bytes()
    del loss
    _clear_grads(inputs)
    _trim_heap()
    method = "vmhwm-reset" if resettable else "vmhwm-minus-baseline"
    peak = total - before if resettable else None
    return MemResult(provider.name, "ok", peak, total, t1 - t0, t2 - t1, method)


def _child(argv: list[str]) -> None:
    from benchmarks.providers import is_oom

    suite = importlib.import_module(argv[3] if len(argv) > 3 else DEFAULT_SUITE)
    case, names = suite.case_from_dict(json.loads(argv[0])), argv[1].split(",")
    limit = int(argv[2]) if len(argv) > 2 else 0
    cpu = torch.device("cpu")
    resettable = hwm_resettable()
    inputs = suite.make_inputs(case, cpu)
    found = suite.providers(cpu, interpreted=True)
    for name in names:
        if name == INPUTS:
            res = MemResult(INPUTS, "ok", total_bytes=_peak_total_bytes(), method="inputs")
        elif name not in found:
            res = MemResult(name, "skip", detail=f"no provider {name!r} on this machine")
        else:
            try:
                res = _measure_one(found[name], case, inputs, resettable, limit, suite)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
                status = "oom" if is_oom(exc) else "error"
                res = MemResult(name, status, detail=f"{type(exc).__name__}: {exc}"[:800])
        print(MARK + json.dumps(asdict(res)), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])
