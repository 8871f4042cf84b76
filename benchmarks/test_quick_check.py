"""The quick GPU check's code path at tiny sizes on the CPU (torch backend, eager):
the JSON it writes, the join with the static estimate, and the float64 check's verdict."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import quick_check
from benchmarks.quick_check import (
    DEFAULT_ESTIMATE,
    ESTIMATES,
    HEADLINE,
    load_cuda_estimates,
    load_estimates,
)

TINY = ["--device", "cpu", "--tiny", "--backends", "torch", "--baselines", "eager",
        "--repeats", "2"]  # fmt: skip


def _run(out: Path, *extra: str) -> tuple[int, dict]:
    rc = quick_check.main([*TINY, "--out", str(out), *extra])
    return rc, json.loads((out / "quick_check.json").read_text())


def test_headline_names_are_the_estimates_cases() -> None:
    """The join key: every headline case is in every stored estimate (Triton's and the
    CUDA kernels'), and back."""
    files = sorted(ESTIMATES.glob("estimate-triton*.json"))
    assert files, f"no static estimate in {ESTIMATES}"
    files += sorted(ESTIMATES.glob("estimate-cuda-*.json"))
    assert files[-1].name.startswith("estimate-cuda-"), f"no CUDA estimate in {ESTIMATES}"
    for path in files:
        names = {r["case"]["name"] for r in json.loads(path.read_text())["results"]}
        assert names == {c.name for c in HEADLINE}, path.name


def test_estimate_falls_back_to_the_gpu_machines_triton() -> None:
    name, est = load_estimates("0.0.0-none")
    assert name == f"estimate-triton{DEFAULT_ESTIMATE}.json"
    assert set(est) == {c.name for c in HEADLINE} and all(v > 0 for v in est.values())
    assert load_estimates(None)[0] == name


def test_newest_estimate_folder_is_used(tmp_path: Path) -> None:
    for name in ("2026-12-03-static-sm90", "2026-12-09-static-sm90", "2026-12-10-static-sm90"):
        (tmp_path / name).mkdir()
    (tmp_path / "2026-12-03-static-sm90" / "estimate-triton3.6.0.json").write_text("{}")
    (tmp_path / "2026-12-09-static-sm90" / "estimate-triton3.6.0.json").write_text("{}")
    # The 12-10 folder has no estimate (only resources, say): not chosen.
    assert quick_check.newest_estimates(tmp_path).name == "2026-12-09-static-sm90"
    assert load_estimates("3.6.0", tmp_path / "none-static-sm90") == ("", {})


def test_tiny_run_records_timings_beside_the_estimate(tmp_path: Path) -> None:
    rc, doc = _run(tmp_path)
    assert rc == 0
    meta = doc["meta"]
    for key in ("date", "commit", "torch", "cuda", "triton", "device_name", "driver",
                "estimate_file", "tiny"):  # fmt: skip
        assert key in meta, key
    assert meta["tiny"] is True and "running" not in meta
    _, est = load_estimates(meta["triton"])
    assert meta["estimate_file"].startswith(ESTIMATES.name + "/estimate-triton")
    # Every case, ours first then eager, each joined to its own case's estimate.
    got = [(t["case"], t["provider"]) for t in doc["timings"]]
    assert got == [(c.name, p) for c in HEADLINE for p in ("mimac-torch", "eager")]
    for t in doc["timings"]:
        assert t["status"] == "ok", t
        assert 0 < t["ms_min"] <= t["ms_median"]
        assert t["estimate_ms"] == est[t["case"]]
        assert t["model_error"] == pytest.approx(t["ms_median"] / est[t["case"]])
    assert {c["case"] for c in doc["check"]} == {HEADLINE[i].name for i in (0, 1, 2)}
    assert all(c["ok"] is True and c["grad_a_err"] <= c["grad_a_bound"] for c in doc["check"])
    table = (tmp_path / "quick_check.md").read_text()
    assert "measured / estimate" in table and all(c.name in table for c in HEADLINE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick_check.json", "quick_check.md"]


def test_check_fails_a_backend_off_by_one_percent(tmp_path: Path, monkeypatch) -> None:
    """The float64 check can fail: a loss 1% off in bf16 is outside the bound."""
    real = quick_check.fused_contrastive_loss

    def off(a: torch.Tensor, b: torch.Tensor, **kw) -> torch.Tensor:
        out = real(a, b, **kw)
        return out if a.dtype == torch.float64 else out * 1.01  # the reference stays exact

    monkeypatch.setattr(quick_check, "fused_contrastive_loss", off)
    rc, doc = _run(tmp_path, "--baselines", "")
    assert rc == 1
    assert [c["ok"] for c in doc["check"]] == [False, False, False]
    assert all(c["loss_err"] > c["loss_bound"] for c in doc["check"])


def test_a_failing_backend_is_recorded_and_fails_the_run(tmp_path: Path, monkeypatch) -> None:
    def broken(case, backend):
        def loss(a, b):
            raise RuntimeError("kernel launch failed")

        return loss

    monkeypatch.setattr(quick_check, "ours", broken)
    rc, doc = _run(tmp_path, "--no-check")
    assert rc == 1
    ours = [t for t in doc["timings"] if t["provider"] == "mimac-torch"]
    assert len(ours) == len(HEADLINE) and all(t["status"] == "error" for t in ours)
    assert all("kernel launch failed" in t["error"] and t["model_error"] is None for t in ours)
    assert all(t["status"] == "ok" for t in doc["timings"] if t["provider"] == "eager")


def test_deadline_skips_and_says_so(tmp_path: Path) -> None:
    rc, doc = _run(tmp_path, "--deadline", "0", "--no-check")
    assert rc == 0 and doc["timings"] == [] and doc["check"] == []
    assert len(doc["skipped"]) == 2 * len(HEADLINE)
    assert all(s["why"] == "deadline" for s in doc["skipped"])


def test_backend_choice_sets_both_gpu_backends_side_by_side() -> None:
    def row(case: str, provider: str, ms: float, status: str = "ok") -> dict:
        return {"case": case, "provider": provider, "ms_median": ms, "status": status}

    timings = [row("A", "mimac-triton", 9.0), row("A", "mimac-cuda", 7.5), row("A", "eager", 1.0),
               row("B", "mimac-triton", 3.0), row("B", "mimac-cuda", 0.0, "oom")]  # fmt: skip
    lines = quick_check.backend_choice(timings)
    assert lines[1] == "| case | cuda ms | triton ms | faster |"
    assert lines[3:] == ["| A | 7.50 | 9.00 | cuda |"]  # B: one backend ran, no choice
    assert quick_check.backend_choice(timings[2:3]) == []


def test_gpu_check_quick_preset_dry_run_on_cpu(tmp_path: Path) -> None:
    """`STEPS=quick` end to end at tiny sizes: the preset's steps, in order, each
    bounded and logged, and the quick check's files in the output folder."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "STEPS": "quick", "GPU_CHECK_BUDGET": "200", "PYTHON": sys.executable,
           "QUICK_TESTS_K": "test_nan_propagates and cosine-all", "MIMAC_COMMIT": "dryrun",
           "QUICK_ARGS": "--tiny --device cpu --backends torch --baselines eager --repeats 1"}  # fmt: skip
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, log + proc.stderr
    assert "steps=env,build,quicktests,headline" in log and "budget=200s" in log
    started = [ln.split("]")[1].split(":")[0].strip() for ln in log.splitlines() if ": start" in ln]
    assert started == ["build", "quicktests-cuda-gpu", "quicktests-triton", "headline"]
    doc = json.loads((tmp_path / "quick_check.json").read_text())
    assert doc["meta"]["commit"] == "dryrun" and len(doc["timings"]) == 2 * len(HEADLINE)
    assert len(list(tmp_path.iterdir())) <= 7  # output folders keep 8


def test_cuda_rows_join_the_cuda_estimate(tmp_path: Path) -> None:
    """A ``mimac-cuda`` row carries the CUDA kernels' estimate, every other row Triton's."""
    _, triton_est = load_estimates(DEFAULT_ESTIMATE)
    _, cuda_est = load_cuda_estimates()
    case = quick_check.tiny(HEADLINE[0])
    assert cuda_est[case.name] != triton_est[case.name]
    meta = {"estimates": triton_est, "estimates_cuda": cuda_est, "device_name": "cpu",
            "commit": "x", "date": "d", "torch": "t", "cuda": None, "triton": None,
            "estimate_file": "", "tiny": True}  # fmt: skip
    rec = quick_check.Recorder(tmp_path, meta)
    inputs = quick_check.views(case, torch.device("cpu"), torch.float32)
    for provider in ("mimac-cuda", "mimac-triton", "eager"):
        quick_check.time_one(rec, case, provider, quick_check.eager, inputs, 1)
    got = {t["provider"]: t["estimate_ms"] for t in rec.doc["timings"]}
    assert got == {"mimac-cuda": cuda_est[case.name], "mimac-triton": triton_est[case.name],
                   "eager": triton_est[case.name]}  # fmt: skip


def test_rect_case_times_one_ranks_problem() -> None:
    """The multi-rank case: its rows are among the columns at ``offset``, and our fused
    rectangular loss (what ``group=`` runs) equals the full-matrix formula in float64,
    value and both gradients; a wrong offset does not."""
    case = quick_check.tiny(HEADLINE[-1])
    assert case.pairing == "rect" and case.cols == 4 * case.rows
    a, b = quick_check.views(case, torch.device("cpu"), torch.float64)
    assert torch.equal(a, b[case.offset : case.offset + case.rows])
    values = []
    for fn in (quick_check.ours(case, "torch"), quick_check.eager(case)):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = fn(x, y)
        values.append([out, *torch.autograd.grad(out, (x, y))])
    for got, want in zip(*values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    shifted = quick_check.ours(dataclasses.replace(case, offset=case.offset - 1), "torch")
    assert not torch.allclose(shifted(a, b), values[1][0])
