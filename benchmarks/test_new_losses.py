"""Time and peak memory of the labelled, queue and sigmoid losses against their peers.

Cases and providers: ``benchmarks/new_losses.py`` (SupCon and NTXent with labels
against pytorch-metric-learning, the queue against lightly, SigLIP against
open_clip). Per (case, provider), forward + backward: skip (recorded with the
reason) if the provider cannot run the case, if its predicted call time exceeds
``MAX_CALL_S`` (a peer: 60 s) or its predicted peak exceeds the memory left (a
peer's known allocations, or its measured time and peak at a smaller M scaled by M^2,
M^3 for pytorch-metric-learning's NTXent); else measure the peak above the inputs in a
child process (``benchmarks.memory``, capped: an allocation past the cap is an
``oom`` entry) and time ``benchmark.pedantic`` rounds. Nothing asserts on time.

``test_provider_matches_peer`` (fast, every run) checks that each of our providers
computes its peer's value on the smoke inputs, so that the benchmark times the same loss.

Run (~15 min on 2 cores; benchmarks/NOTES.md)::

    pytest benchmarks/test_new_losses.py --benchmark-only --bench-size=cpu \\
        --benchmark-json=new_losses.json
"""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path

import pytest
import torch

from benchmarks import new_losses
from benchmarks.conftest import BenchContext
from benchmarks.memory import MemResult, available_bytes, measure_cpu
from benchmarks.new_losses import LossCase
from benchmarks.providers import Provider, is_oom
from tests.kernels.accuracy import assert_within_bound

#: (seconds of timing per benchmark, min rounds, max rounds): calls here take seconds.
ROUNDS = (3.0, 1, 10)
#: Longest predicted forward + backward call worth timing, per provider kind: a peer
#: past a minute is recorded as skipped; ours runs every rung unless far slower.
MAX_CALL_S = {"peer": 60.0, "ours": 240.0}
#: Memory the machine keeps for everything else (the caller's process, the OS).
HEADROOM_BYTES = 2 << 30

#: Per (group, provider, rows): the measured call seconds and peak bytes.
_CALL_S: dict[tuple[str, str, int], float] = {}
_PEAK: dict[tuple[str, str, int], int] = {}
_INPUTS: dict[str, tuple[torch.Tensor, ...]] = {}


def _memory_cap(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return max(available_bytes() - HEADROOM_BYTES, 1 << 30)


def peer_floor_bytes(case: LossCase) -> int:
    """A lower bound of the peer's peak from allocations its code makes (float32 M x C
    matrices; pytorch-metric-learning's NTXent: its positive-pair x negative-pair
    matrix, a bool and a float copy, so M^3)."""
    m, c, item = case.rows, case.columns, torch.empty((), dtype=case.torch_dtype).element_size()
    if case.loss == "ntxent-labels":
        pos, neg = m * (case.views - 1), m * (m - case.views)
        return pos * neg * (1 + item)
    return 2 * m * c * item  # the scores and their gradient at least


def _scaled(table: dict, case: LossCase, name: str, power: int) -> float | None:
    known = [(r, v) for (g, p, r), v in table.items() if g == case.group and p == name]
    known = [(r, v) for r, v in known if r < case.rows]
    if not known:
        return None
    rows, value = max(known)
    return value * (case.rows / rows) ** power


def _power(case: LossCase, p: Provider) -> int:
    """How the peer's time and memory grow with M (pytorch-metric-learning's NTXent:
    pairs x pairs, M^3); ours: the time as the work, M^2 (the queue: M)."""
    if p.kind == "peer" and case.loss == "ntxent-labels":
        return 3
    return 2 if case.quadratic else 1


def predicted_call_s(case: LossCase, p: Provider) -> float | None:
    return _scaled(_CALL_S, case, p.name, _power(case, p))


def predicted_peak(case: LossCase, p: Provider) -> float:
    """The larger of the peer's floor and the scaled measurement (ours: scaled, linear)."""
    if p.kind != "peer":
        return _scaled(_PEAK, case, p.name, 1) or 0.0
    scaled = _scaled(_PEAK, case, p.name, _power(case, p)) or 0.0
    return max(float(peer_floor_bytes(case)), scaled)


def too_large(case: LossCase, p: Provider, cap: int) -> str | None:
    """Why ``p`` is not run on ``case`` (predicted time past ``MAX_CALL_S``, predicted
    peak past ``cap`` bytes; both where both hold), or None."""
    reasons = []
    call, limit = predicted_call_s(case, p), MAX_CALL_S[p.kind]
    if call is not None and call > limit:
        reasons.append(f"predicted {call:.0f} s per call (cap {limit:.0f} s)")
    peak = predicted_peak(case, p)
    if peak > cap:
        reasons.append(
            f"predicted peak {peak / 2**30:.3g} GiB exceeds the {cap / 2**30:.3g} GiB available"
        )
    return "; ".join(reasons) or None


def _skip(ctx: BenchContext, case: LossCase, name: str, reason: str) -> None:
    ctx.record_skip(case, name, "fwd+bwd", reason)  # type: ignore[arg-type]
    pytest.skip(reason)


def _inputs(case: LossCase, device: torch.device) -> tuple[torch.Tensor, ...]:
    if case.id not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        _INPUTS[case.id] = new_losses.make_inputs(case, device)
    return _INPUTS[case.id]


def _clear(inputs: tuple[torch.Tensor, ...]) -> None:
    for t in inputs:
        t.grad = None


def _memory(case: LossCase, name: str, fn, inputs, device: torch.device, cap: int) -> MemResult:
    """Peak above the inputs and call times: a capped child process on the CPU; on CUDA
    (or with ``memory=False``) one timed call here, its peak unmeasured."""
    if device.type == "cpu" and case.memory:
        got = measure_cpu(case, [name], limit_bytes=cap, suite="benchmarks.new_losses")  # type: ignore[arg-type]
        return got.get(name) or MemResult(name, "error", detail="no result")
    try:
        t0 = time.perf_counter()
        fn(*inputs).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        full = time.perf_counter() - t0
    except Exception as exc:
        if not is_oom(exc):
            raise
        return MemResult(name, "oom", detail=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        _clear(inputs)
    return MemResult(name, "unmeasured", fwd_s=full, bwd_s=0.0)


def test_new_loss(benchmark, bench_ctx: BenchContext, loss_item) -> None:
    case, name = loss_item
    ctx, device = bench_ctx, bench_ctx.device
    p = new_losses.providers(device)[name]
    why = p.reason(case, device)
    if why is not None:
        _skip(ctx, case, name, why)
    if ctx.past_deadline():
        _skip(ctx, case, name, f"deadline of {ctx.deadline:.0f} s passed")
    cap = _memory_cap(device)
    why = too_large(case, p, cap)
    if why is not None:
        _skip(ctx, case, name, why)

    info = {
        "provider": name,
        "kind": p.kind,
        "mode": "fwd+bwd",
        **case.to_dict(),
        "critic": case.critic,
        "tau": case.tau,
        "pairing": case.pairing,
        "columns": case.columns,
        "flop": new_losses.flop(case),
        "note": new_losses.PEERS[case.loss][2] if p.kind == "peer" else "",
        "status": "ok",
        **ctx.labels,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    inputs = _inputs(case, device)
    fn = p.make(case)
    fn(*new_losses.make_inputs(new_losses.tiny(case), device, seed=1)).backward()
    mem = _memory(case, name, fn, inputs, device, cap)
    if mem.status == "oom":
        info.update(status="oom", detail=mem.detail[:300])
        benchmark.extra_info.update(info)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    if mem.status not in ("ok", "unmeasured"):
        if p.kind == "peer":  # a peer's own limits are a finding, not our failure
            _skip(ctx, case, name, f"{name}: {mem.status}: {mem.detail}"[:300])
        pytest.fail(f"memory probe of {name} on {case.id}: {mem.status}: {mem.detail}")
    full_s = (mem.fwd_s or 0.0) + (mem.bwd_s or 0.0)
    key = (case.group, name, case.rows)
    _CALL_S[key] = full_s
    if mem.peak_bytes:
        _PEAK[key] = mem.peak_bytes
    budget, lo, hi = ROUNDS
    rounds = int(min(hi, max(lo, math.ceil(budget / max(full_s, 1e-6)))))
    info.update(
        peak_mem_bytes=mem.peak_bytes,
        total_mem_bytes=mem.total_bytes,
        mem_method=mem.method,
        child_fwd_s=mem.fwd_s,
        child_bwd_s=mem.bwd_s,
        rounds_planned=rounds,
    )
    benchmark.extra_info.update(info)

    def target() -> None:
        fn(*inputs).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(target, setup=lambda: _clear(inputs), rounds=rounds, iterations=1)
    _clear(inputs)


# --------------------------------------------------------------------------- same loss


def _peer_or_skip(case: LossCase, device: torch.device) -> Provider:
    name = new_losses.PEERS[case.loss][0]
    peer = new_losses.providers(device)[name]
    why = peer.reason(case, device)
    if why is not None:
        if os.environ.get("CI"):  # CI installs every peer (.ci/run)
            pytest.fail(why)
        pytest.skip(why)
    return peer


def _value_and_grads(p: Provider, case: LossCase, dtype: torch.dtype) -> list[torch.Tensor]:
    """The loss and its input gradients, the (seed 0) inputs cast to ``dtype``."""
    inputs = [t.detach() for t in new_losses.make_inputs(case, torch.device("cpu"))]
    inputs = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    fn = p.make(case)
    if isinstance(fn, torch.nn.Module):
        fn.to(dtype)  # lightly's bank is a buffer: in the inputs' dtype
    loss = fn(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("case", new_losses.smoke_cases(), ids=lambda c: c.loss)
def test_provider_matches_peer(case: LossCase) -> None:
    """Ours (float32) against the peer in float64, within the project's rule on the
    peer's own float32 error (tests/kernels/accuracy.py): the same loss is timed."""
    device = torch.device("cpu")
    peer = _peer_or_skip(case, device)
    pair = [p for n, p in new_losses.providers(device).items()
            if new_losses.applies(n, case, device)]  # fmt: skip
    assert [p.kind for p in pair] == ["ours", "peer"], [p.name for p in pair]
    ours = _value_and_grads(pair[0], case, torch.float32)
    plain = _value_and_grads(peer, case, torch.float32)
    ref = _value_and_grads(peer, case, torch.float64)
    names = ["loss"] + [f"grad{i}" for i in range(len(ours) - 1)]
    assert_within_bound(ours, plain, ref, torch.float32, names)


def test_a_peer_past_the_memory_or_time_is_not_run() -> None:
    """pytorch-metric-learning's NTXent (M^3 memory) is predicted out at M = 4,096 from
    its own allocations alone, and a measured peer is scaled to the next rung."""
    cpu = torch.device("cpu")
    pml = new_losses.providers(cpu)["pml"]
    why = too_large(LossCase("ntxent-labels", 4096), pml, cap=23 << 30)
    assert why is not None and "predicted peak" in why and "GiB" in why
    assert too_large(LossCase("ntxent-labels", 64), pml, cap=23 << 30) is None
    case = LossCase("supcon", 1 << 20)
    _CALL_S[(case.group, "pml", case.rows // 2)] = 30.0  # 30 s at half the rows: 120 s
    try:
        assert "predicted 120 s per call" in (too_large(case, pml, cap=1 << 62) or "")
    finally:
        del _CALL_S[(case.group, "pml", case.rows // 2)]


def test_case_ids_unique_and_report_note(tmp_path: Path) -> None:
    """Every case id is distinct per size; the report carries the note and peer versions."""
    from benchmarks import report

    for size, cases in new_losses.SIZES.items():
        ids = [c.id for c in cases()]
        assert len(ids) == len(set(ids)), size
    meta = {"labels": {"lightly": "1.6.0", "device": "cpu"}, "skipped": [], "sizes": ["cpu"]}
    md = report.markdown([], meta, note="## How this ran\n")
    assert "Peers installed: lightly 1.6.0." in md and "## How this ran" in md
