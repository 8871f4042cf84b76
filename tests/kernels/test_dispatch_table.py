"""The measured choice between the GPU backends (``mimac_kernels.dispatch_table``): the
writer on synthetic timings, the committed file, and ``backend="auto"`` on CUDA inputs
honouring an entry, passing over it on a refusal, and leaving explicit backends alone.

No GPU is needed: CUDA inputs are stood in for by a problem that reports a CUDA device
(dispatch reads only its device, dtype and shape), the GPU backends by recording fakes,
and the capability by a monkeypatched query.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import quick_check
from mimac_kernels import BackendUnavailable, dispatch, dispatch_table
from mimac_kernels.contract import Grads, Problem, Stats, Upstream
from mimac_kernels.dispatch_table import Entry

H100 = (9, 0)
GPU = torch.device("cuda:0")


def _timing(case: str, d: int, backend: str, ms: float, status: str = "ok") -> dict:
    """One row as ``quick_check.json`` records it."""
    return {"case": case, "d": d, "provider": f"mimac-{backend}", "status": status,
            "ms_median": ms}  # fmt: skip


SYNTHETIC = [
    # D = 128, two cases: cuda faster in sum (6 ms against 9 ms)
    _timing("NT-Xent D=128", 128, "triton", 5.0), _timing("NT-Xent D=128", 128, "cuda", 3.0),
    _timing("CLIP D=128", 128, "triton", 4.0), _timing("CLIP D=128", 128, "cuda", 3.0),
    # D = 256: cuda faster too (merges with D = 128 into one entry)
    _timing("NT-Xent D=256", 256, "triton", 8.0), _timing("NT-Xent D=256", 256, "cuda", 6.0),
    # D = 512: cuda 2 % faster, inside the margin: triton keeps its place
    _timing("NT-Xent D=512", 512, "triton", 10.0), _timing("NT-Xent D=512", 512, "cuda", 9.8),
    # D = 1024: only triton finished (cuda failed): no entry, nothing past 512
    _timing("NT-Xent D=1024", 1024, "triton", 30.0),
    _timing("NT-Xent D=1024", 1024, "cuda", 0.0, status="error"),
    # baselines are not backends
    {"case": "NT-Xent D=128", "d": 128, "provider": "eager", "status": "ok", "ms_median": 1.0},
]  # fmt: skip


# --- the writer ------------------------------------------------------------------------


def test_table_from_timings_picks_the_faster_backend_per_width():
    entries = dispatch_table.table_from_timings(SYNTHETIC, H100, torch.bfloat16, source="test")
    picked = [(e["d_min"], e["d_max"], e["backend"]) for e in entries]
    assert picked == [(1, 256, "cuda"), (257, 512, "triton")]
    assert entries[0]["ms"] == {"cuda": 12.0, "triton": 17.0}  # the evidence, summed
    assert all(e["capability"] == [9, 0] and e["dtype"] == "bfloat16" for e in entries)
    parsed = dispatch_table.parse({"entries": entries})
    assert dispatch_table.lookup(H100, torch.bfloat16, 64, parsed) == "cuda"
    assert dispatch_table.lookup(H100, torch.bfloat16, 300, parsed) == "triton"
    assert dispatch_table.lookup(H100, torch.bfloat16, 1024, parsed) is None  # not measured
    assert dispatch_table.lookup(H100, torch.float32, 64, parsed) is None
    assert dispatch_table.lookup((8, 0), torch.bfloat16, 64, parsed) is None


def test_table_from_timings_needs_both_backends_on_the_same_cases():
    """A width where one backend missed a case compares unlike work: left out (the next
    width's entry then reaches down, as if it had not been run)."""
    partial = [t for t in SYNTHETIC if not (t["case"] == "CLIP D=128" and "cuda" in t["provider"])]
    entries = dispatch_table.table_from_timings(partial, H100, "bfloat16")
    assert [(e["d_min"], e["d_max"], e["backend"]) for e in entries] == [
        (1, 256, "cuda"), (257, 512, "triton")]  # fmt: skip
    assert entries[0]["ms"] == {"cuda": 6.0, "triton": 8.0}
    assert dispatch_table.table_from_timings([], H100, "bfloat16") == []


def test_margin_decides_close_calls():
    entries = dispatch_table.table_from_timings(SYNTHETIC, H100, "bfloat16", margin=0.0)
    assert entries[-1]["backend"] == "cuda" and entries[-1]["d_max"] == 512


def test_quick_check_writes_the_table_and_the_merge_command_commits_it(tmp_path: Path):
    doc = {"meta": {"date": "2026-12-04", "device_name": "H100", "commit": "abc",
                    "dtype": "bfloat16"}, "timings": SYNTHETIC}  # fmt: skip
    entries = quick_check.write_dispatch_table(doc, tmp_path, H100)
    assert doc["dispatch_table"] == entries and len(entries) == 2
    written = tmp_path / "dispatch_table.json"
    assert "H100" in json.loads(written.read_text())["entries"][0]["source"]
    table = tmp_path / "committed.json"
    old = {"capability": [8, 0], "dtype": "bfloat16", "d_min": 1, "d_max": 64, "backend": "cuda"}
    stale = {**old, "capability": [9, 0], "backend": "triton"}  # replaced by the new run
    table.write_text(json.dumps({"entries": [old, stale]}))
    assert dispatch_table.main([str(written), "--into", str(table)]) == 0
    merged = dispatch_table.load.__wrapped__(table)
    assert merged[0] == Entry((8, 0), "bfloat16", 1, 64, "cuda")
    assert [e.backend for e in merged[1:]] == ["cuda", "triton"]


def test_malformed_entries_are_refused_by_name():
    good = {"capability": [9, 0], "dtype": "bfloat16", "d_min": 1, "d_max": 64,
            "backend": "cuda"}  # fmt: skip
    with pytest.raises(ValueError, match="entry 0: backend must be one of"):
        dispatch_table.parse({"entries": [{**good, "backend": "torch"}]})
    with pytest.raises(ValueError, match="entry 1: need 1 <= d_min <= d_max"):
        dispatch_table.parse({"entries": [good, {**good, "d_min": 65}]})
    with pytest.raises(ValueError, match="entry 0 must have capability"):
        dispatch_table.parse({"entries": [{k: v for k, v in good.items() if k != "dtype"}]})
    with pytest.raises(TypeError, match="'entries' must be a list"):
        dispatch_table.parse({})


def test_committed_table_is_valid():
    """The committed file parses; each entry carries its evidence (both times, a source)."""
    doc = json.loads(dispatch_table.TABLE_PATH.read_text())
    dispatch_table.parse(doc)
    for e in doc["entries"]:
        assert set(e["ms"]) == set(dispatch_table.GPU_BACKENDS) and e["source"], e


# --- dispatch ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _CudaProblem:
    """What dispatch reads of a problem on a GPU: device, dtype and the inputs' shape."""

    a: torch.Tensor  # on the meta device: a shape only
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = GPU


def _on_gpu(d: int, dtype: torch.dtype = torch.bfloat16) -> _CudaProblem:
    return _CudaProblem(torch.empty(1, 8, d, device="meta"), dtype)


class _Fake:
    """A GPU backend stand-in: available unless ``why_not``, refuses more than
    ``max_rows`` rows."""

    def __init__(self, why_not: str | None = None, max_rows: int = 1 << 30) -> None:
        self.why_not, self.max_rows = why_not, max_rows

    def probe(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return self.why_not

    def refusal(self, problem: Problem) -> str | None:
        n = problem.a.shape[1]
        return f"at most {self.max_rows} rows" if n > self.max_rows else None

    def forward(self, problem: Problem) -> Stats:
        raise AssertionError("not run here")

    def backward(self, problem: Problem, stats: Stats, upstream: Upstream) -> Grads:
        raise AssertionError("not run here")


@pytest.fixture
def table(monkeypatch):
    """Set the table's entries (none to start with) and an H100 as every GPU; the fake
    backends stand in for triton and cuda."""
    current: list[Entry] = []
    monkeypatch.setattr(dispatch_table, "load", lambda path=None: tuple(current))
    monkeypatch.setattr(dispatch_table, "capability", lambda device: H100)
    return current


def test_empty_table_keeps_the_default_order(table, monkeypatch):
    def no_gpu_query(device):
        raise AssertionError("the GPU is queried although the table is empty")

    monkeypatch.setattr(dispatch_table, "capability", no_gpu_query)
    with dispatch.override_backend("triton", _Fake()), dispatch.override_backend("cuda", _Fake()):
        assert dispatch.auto_order(_on_gpu(128)) == ("triton", "cuda", "torch")
        assert dispatch.resolve("auto", _on_gpu(128)) == "triton"


def test_auto_follows_a_table_entry(table):
    table.append(Entry(H100, "bfloat16", 1, 128, "cuda"))
    with dispatch.override_backend("triton", _Fake()), dispatch.override_backend("cuda", _Fake()):
        assert dispatch.auto_order(_on_gpu(128)) == ("cuda", "triton", "torch")
        assert dispatch.resolve("auto", _on_gpu(128)) == "cuda"
        assert dispatch.resolve("auto", _on_gpu(129)) == "triton"  # outside the D range
        assert dispatch.resolve("auto", _on_gpu(64, torch.float32)) == "triton"  # other dtype
        # Explicit choices are not the table's business.
        assert dispatch.resolve("triton", _on_gpu(128)) == "triton"
        assert dispatch.resolve("cuda", _on_gpu(512)) == "cuda"
    cpu = torch.randn(1, 8, 64)
    cpu_problem = Problem(cpu, cpu, torch.tensor(2.0), "dot", "all", 1e-12)
    assert dispatch.auto_order(cpu_problem) == ("cpu", "torch")  # CPU inputs: no table


def test_a_table_choice_that_refuses_falls_through_in_order(table):
    """The table's backend cannot run the inputs (too many rows; or not available here):
    auto moves on to the default order's next backend, as without the table."""
    table.append(Entry(H100, "bfloat16", 1, 128, "cuda"))
    with dispatch.override_backend("triton", _Fake()), \
            dispatch.override_backend("cuda", _Fake(max_rows=4)):  # fmt: skip
        assert dispatch.resolve("auto", _on_gpu(128)) == "triton"
        with pytest.raises(BackendUnavailable, match="at most 4 rows"):
            dispatch.resolve("cuda", _on_gpu(128))
    with dispatch.override_backend("triton", _Fake()), \
            dispatch.override_backend("cuda", _Fake(why_not="no nvcc")):  # fmt: skip
        assert dispatch.resolve("auto", _on_gpu(128)) == "triton"
    table[:] = [Entry(H100, "bfloat16", 1, 128, "triton")]
    with dispatch.override_backend("triton", _Fake(why_not="no triton")), \
            dispatch.override_backend("cuda", _Fake()):  # fmt: skip
        assert dispatch.resolve("auto", _on_gpu(128)) == "cuda"
