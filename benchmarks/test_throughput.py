"""Throughput and peak memory of every provider, per case and mode.

Modes: ``forward`` (the loss, inputs requiring grad, as in training),
``backward`` (``loss.backward()``, its forward done untimed in the round's
setup) and ``fwd+bwd``. Axes and sizes: ``benchmarks/cases.py``.

Per benchmark: skip (recorded with the reason) if the provider cannot run the
case; record ``status="oom"`` without timing if it runs out of memory (or one
M x M matrix alone would not fit); otherwise measure peak memory above the
inputs once per case and provider, warm up, and time with ``benchmark.pedantic``
for a number of rounds chosen from the measured call time. CUDA timings
synchronise the device inside the timed region. Nothing asserts on time.
"""

from __future__ import annotations

import gc
import math
import os
import time

import pytest
import torch

from benchmarks.cases import Case, flop_model
from benchmarks.conftest import BenchContext
from benchmarks.memory import MemResult, available_bytes, cuda_peak, measure_cpu
from benchmarks.providers import Provider, is_oom, make_inputs, tiny

#: (seconds of timing per benchmark, min rounds, max rounds) per device type.
ROUNDS = {"cpu": (2.0, 3, 15), "cuda": (0.5, 5, 50)}
#: Longest predicted forward + backward call worth timing (e.g. the tiled torch
#: backend at 262,144 rows on a GPU): such points are skipped with the prediction.
MAX_CALL_S = {"cpu": 120.0, "cuda": 15.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return available_bytes()


def _inputs(ctx: BenchContext, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the current case; the previous case's are freed first."""
    if case.id not in ctx.inputs:
        ctx.inputs.clear()
        _free(ctx.device)
        ctx.inputs[case.id] = make_inputs(case, ctx.device)
    return ctx.inputs[case.id]


def _cpu_memory(ctx: BenchContext, case: Case) -> dict[str, MemResult]:
    """Child-process peaks of every provider that can run the case (one child per case)."""
    if case.id not in ctx.memory:
        names = [
            n
            for n, p in ctx.providers.items()
            if n not in case.exclude
            and p.reason(case, ctx.device) is None
            and not _predicted_oom(ctx, case, p)
        ]
        ctx.memory[case.id] = measure_cpu(case, names) if names else {}
    return ctx.memory[case.id]


def _predicted_oom(ctx: BenchContext, case: Case, p: Provider) -> bool:
    """One M x M matrix in the input dtype would already exceed the device memory."""
    itemsize = torch.empty((), dtype=case.torch_dtype).element_size()
    return p.full_matrix and case.rows * case.rows * itemsize > _device_bytes(ctx.device)


def _predicted_call_s(ctx: BenchContext, case: Case, name: str) -> float | None:
    """Forward + backward time at ``case.rows``, scaled from the largest smaller M
    measured for this provider and configuration (quadratic; linear for the closed form)."""
    known = [
        (rows, s)
        for (group, prov, rows), s in ctx.call_times.items()
        if group == case.group and prov == name and rows < case.rows
    ]
    if not known:
        return None
    rows, s = max(known)
    return s * (case.rows / rows) ** (1 if case.closed_form else 2)


def _rounds(device: torch.device, call_s: float) -> int:
    budget, lo, hi = ROUNDS[device.type]
    if device.type == "cuda" and call_s > 1.0:
        lo = 3
    return int(min(hi, max(lo, math.ceil(budget / max(call_s, 1e-6)))))


def _record_oom(benchmark, info: dict, detail: str) -> None:
    """An entry that says OOM: a single empty round, ``status="oom"``."""
    info.update(status="oom", detail=detail[:300])
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _skip(ctx: BenchContext, case: Case, name: str, mode: str, reason: str) -> None:
    ctx.record_skip(case, name, mode, reason)
    pytest.skip(reason)


def test_throughput(benchmark, bench_ctx: BenchContext, bench_item) -> None:
    case, name, mode = bench_item
    ctx, device = bench_ctx, bench_ctx.device
    p = ctx.providers[name]
    if name in case.exclude:
        _skip(ctx, case, name, mode, f"{name} left out of this case to fit the time budget")
    why = p.reason(case, device)
    if why is not None:
        _skip(ctx, case, name, mode, why)
    if ctx.past_deadline():
        _skip(ctx, case, name, mode, f"deadline of {ctx.deadline:.0f} s passed")
    predicted = _predicted_call_s(ctx, case, name)
    if predicted is not None and predicted > MAX_CALL_S[device.type]:
        _skip(
            ctx,
            case,
            name,
            mode,
            f"predicted {predicted:.0f} s per call (cap {MAX_CALL_S[device.type]:.0f} s)",
        )

    info = {
        "provider": name,
        "kind": p.kind,
        "mode": mode,
        **case.to_dict(),
        "n": case.n,
        "flop": flop_model(case.pairing, case.critic, case.tau, case.rows, case.d, mode),
        "note": p.note if p.kind != "peer" or case.pairing == "all" else "",
        "status": "ok",
        **ctx.labels,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if _predicted_oom(ctx, case, p):
        _record_oom(benchmark, info, "predicted: one M x M matrix exceeds the device memory")
        return

    a, b = _inputs(ctx, case)
    fn = p.make(case)
    try:
        mem = _warm_and_measure(ctx, case, p, fn, a, b)
    except Exception as exc:
        if not is_oom(exc):
            if p.kind == "peer":  # a peer's own limits are a finding, not our failure
                _skip(ctx, case, name, mode, f"{name} failed: {type(exc).__name__}: {exc}"[:300])
            raise
        mem = MemResult(name, "oom", detail=f"{type(exc).__name__}: {exc}")
    if mem.status == "oom":  # outside the except block: its traceback no longer pins memory
        a.grad = b.grad = None
        _free(device)
        _record_oom(benchmark, info, mem.detail)
        return
    if mem.status not in ("ok", "unmeasured"):
        if p.kind == "peer":
            _skip(ctx, case, name, mode, f"{name}: {mem.status}: {mem.detail}"[:300])
        pytest.fail(f"memory probe of {name} on {case.id}: {mem.status}: {mem.detail}")
    info.update(peak_mem_bytes=mem.peak_bytes, mem_method=mem.method)

    full_s = (mem.fwd_s or 0.0) + (mem.bwd_s or 0.0)
    ctx.call_times[(case.group, name, case.rows)] = full_s
    call_s = {"forward": mem.fwd_s, "backward": mem.bwd_s}.get(mode)
    call_s = call_s if call_s is not None else full_s
    rounds = _rounds(device, call_s)
    info["rounds_planned"] = rounds
    benchmark.extra_info.update(info)
    _time(benchmark, fn, a, b, mode, device, rounds)


def _warm_and_measure(ctx: BenchContext, case: Case, p: Provider, fn, a, b) -> MemResult:
    """Warm the provider up on this case and return its memory and call times.

    CUDA: a full call warms (compiles, autotunes), a second one is measured in
    process. CPU: the child process measured memory and call times; in this
    process a tiny call (or, for compile, a full one) warms lazily built state.
    """
    if ctx.device.type == "cuda":
        fn(a, b).backward()
        a.grad = b.grad = None
        _sync(ctx.device)
        return cuda_peak(fn, a, b, p.name)
    if p.name == "compile":
        fn(a, b).backward()
    else:
        fn(*make_inputs(tiny(case), ctx.device, seed=1)).backward()
    a.grad = b.grad = None
    if not case.memory:
        t0 = time.perf_counter()
        fn(a, b).backward()  # nothing measured: time one call to plan the rounds
        a.grad = b.grad = None
        return MemResult(p.name, "unmeasured", fwd_s=time.perf_counter() - t0, bwd_s=0.0)
    return _cpu_memory(ctx, case).get(p.name) or MemResult(p.name, "error", detail="no result")


def _time(benchmark, fn, a, b, mode: str, device: torch.device, rounds: int) -> None:
    """Time ``mode`` for ``rounds`` rounds; no round keeps the previous round's
    autograd graph alive, and no timed region frees one."""
    held: list[torch.Tensor] = []

    def clear() -> None:
        a.grad = b.grad = None
        held.clear()  # the forward's loss and graph, freed here, outside the timing

    if mode == "forward":

        def target() -> None:
            held.append(fn(a, b))
            _sync(device)

        benchmark.pedantic(target, setup=clear, rounds=rounds, iterations=1)
    elif mode == "backward":

        def setup():
            clear()
            loss = fn(a, b)
            _sync(device)
            return (loss,), {}

        def target(loss: torch.Tensor) -> None:
            loss.backward()
            _sync(device)

        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    else:

        def target() -> None:
            fn(a, b).backward()
            _sync(device)

        benchmark.pedantic(target, setup=clear, rounds=rounds, iterations=1)
    clear()
