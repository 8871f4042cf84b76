"""Checks of the benchmark tooling itself (no timing): FLOP model, bound, search, report.

These are plain tests: ``--benchmark-only`` skips them, the smoke run
(``--benchmark-disable``) runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.cases import SIZES, Case, bound_seconds, flop_model, symmetric_work
from benchmarks.max_batch import Try, search
from benchmarks.memory import measure_cpu


def test_flop_model_and_floor() -> None:
    m, d = 65536, 128
    assert flop_model("all", "cosine", 0.1, m, d, "fwd+bwd") == 6 * m * m * d
    assert flop_model("cross", "cosine", 0.1, m, d, "fwd+bwd") == 8 * m * m * d
    assert flop_model("all", "log_dot", 1.0, m, d, "fwd+bwd") == 18 * m * d  # linear
    # Symmetric floor at M = 65,536, d = 128, bf16: 4 M^2 d FLOP at 989 TFLOP/s = 2.2 ms
    # (its M^2 exps at 3.9e12/s take 1.1 ms, overlapped).
    floor = bound_seconds("all", "cosine", 0.1, m, d, "bfloat16", "fwd+bwd")
    assert floor == pytest.approx(2.2e-3, rel=0.02)
    assert bound_seconds("all", "cosine", 0.1, m, d, "bfloat16", "forward") is None
    assert symmetric_work("all", m, d) == (4 * m * m * d, m * m)
    assert symmetric_work("cross", m, d) == (8 * m * m * d, 2 * m * m)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_case_ids_unique(size: str) -> None:
    keys = [(c.id, mode) for c in SIZES[size]() for mode in c.modes]
    assert len(keys) == len(set(keys))
    assert all(c.rows % 2 == 0 for c in SIZES[size]())


def _fake_attempt(limit_rows: int, calls: list[int]):
    def attempt(rows: int) -> Try:
        calls.append(rows)
        ok = rows <= limit_rows
        return Try(rows, "ok" if ok else "oom", rows * 10, rows * 8, 1e-3)

    return attempt


def test_search_doubles_then_bisects() -> None:
    calls: list[int] = []
    tries, stopped = search(
        _fake_attempt(50_000, calls),
        start=4096,
        max_rows=1 << 24,
        step=256,
        time_cap=1e9,
        deadline=float("inf"),
    )
    best = max(t.rows for t in tries if t.status == "ok")
    assert stopped == "memory"
    assert calls[:5] == [4096, 8192, 16384, 32768, 65536]
    assert 50_000 - 50_000 // 16 - 256 <= best <= 50_000


def test_search_stops_on_predicted_time() -> None:
    def slow(rows: int) -> Try:
        return Try(rows, "ok", rows, rows, (rows / 4096) ** 2)  # 1 s at 4,096 rows

    tries, stopped = search(
        slow, start=4096, max_rows=1 << 24, step=256, time_cap=20.0, deadline=float("inf")
    )
    assert stopped == "time-cap"
    assert [t.rows for t in tries] == [4096, 8192, 16384]  # 32,768 would take 64 s


def _entry(provider: str, kind: str, rows: int, median: float | None, peak: int, status="ok"):
    info = {
        "provider": provider,
        "kind": kind,
        "mode": "fwd+bwd",
        **Case(rows=rows, dtype="bfloat16").to_dict(),
        "flop": flop_model("all", "cosine", 0.1, rows, 128, "fwd+bwd"),
        "status": status,
        "peak_mem_bytes": peak,
    }
    stats = {"median": median, "iqr": 0.1 * (median or 0), "rounds": 5}
    return {"name": f"{provider}-{rows}", "extra_info": info, "stats": stats}


def test_tf32_row_is_never_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [
        _entry("mimac-triton", "ours", 32768, 0.010, 100 << 20),
        _entry("mimac-triton-tf32", "ours", 32768, 0.004, 100 << 20),
    ]}))
    rows, _ = report.load([path])
    (best,) = report.fastest_ours(rows).values()
    assert best.provider == "mimac-triton"


def test_unknown_bench_provider_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_throughput.py", "--benchmark-disable",
         "--collect-only", "-q", "--bench-providers=eager,mimac_cpu"],
        check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode != 0
    assert "--bench-providers: mimac_cpu not among the providers" in proc.stdout + proc.stderr


def test_report_ratios_oom_and_plots(tmp_path: Path) -> None:
    data = {
        "benchmarks": [
            _entry("eager", "baseline", 32768, 0.040, 20 << 30),
            _entry("mimac-triton", "ours", 32768, 0.010, 100 << 20),
            _entry("mimac-torch", "ours", 32768, 0.080, 200 << 20),
            _entry("eager", "baseline", 65536, None, 0, status="oom"),
            _entry("mimac-triton", "ours", 65536, 0.0044, 200 << 20),
        ],
        "mimac": {
            "labels": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23T00:00:00Z"},
            "size": "gpu",
            "skipped": [{"provider": "cce", "reason": "not installed", "mode": "fwd+bwd"}],
        },
    }
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| 32,768 | 40 ms (4×) · 20 GiB (205×)" in md  # eager vs our fastest
    assert "OOM" in md and "not installed" in md
    # 4.4 ms at 65,536 rows is 2x the ~2.2 ms floor on an H100.
    assert "| 2× |" in md
    assert (tmp_path / "time.png").stat().st_size > 0
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_cpu_memory_child_measures_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager holds N x N matrices; the torch backend, at one-row blocks, holds none."""
    n = 4096
    matrix = n * n * 4  # one float32 N x N matrix, 64 MiB
    # One-row blocks: a backend that kept a per-block (N,) partial would store N x N.
    monkeypatch.setenv("MIMAC_KERNELS_TORCH_TILE", str(n))
    res = measure_cpu(Case(rows=n, d=64, pairing="cross"), ["eager", "mimac-torch", "inf_cl"])
    assert res["eager"].status == res["mimac-torch"].status == "ok"
    assert res["eager"].peak_bytes >= matrix
    assert res["mimac-torch"].peak_bytes < matrix / 2
    assert res["inf_cl"].status == "skip"


def test_cpu_ratio_records_gemm_reference_and_ratios(tmp_path: Path) -> None:
    """The CPU ratio script end to end at a tiny size, run as its usage line says."""
    from benchmarks import cpu_ratio

    providers = ["eager", "torch"]
    if shutil.which(os.environ.get("CXX", "c++")) is not None:  # the cpu kernel can be built
        providers.append("cpu/g3")
    out = tmp_path / "ratio.json"
    args = ["--n", "64", "--d", "16", "--repeats", "1", "--providers", ",".join(providers)]
    proc = subprocess.run(
        [sys.executable, cpu_ratio.__file__, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,  # not the repository: the script finds its own package
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x GEMM" in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["gemm"]["gflops"] > 0 and rec["gemm"]["size"] == cpu_ratio.GEMM_SIZE
    assert rec["gemm_ref_s"] == pytest.approx(4 * 128 * 128 * 16 / (rec["gemm"]["gflops"] * 1e9))
    for prov in providers:
        r = rec["results"][prov]
        assert r["times_gemm_ref"] == pytest.approx(r["median_total_s"] / rec["gemm_ref_s"])
        assert r["loss"] == pytest.approx(rec["results"]["eager"]["loss"], rel=1e-5)
    assert set(rec["ratios"]) == set(providers[1:])
    assert rec["results"]["torch"]["group"] is None
    if "cpu/g3" in providers:
        assert rec["results"]["cpu/g3"]["group"] == 3  # the forced group reached the kernel


def test_cpu_ratio_rejects_unknown_providers_and_groups() -> None:
    from benchmarks import cpu_ratio

    assert cpu_ratio.parse_provider("cpu/g2") == ("cpu", 2)
    assert cpu_ratio.parse_provider("eager") == ("eager", None)
    for bad in ("cuda", "torch/g2", "cpu/g0", "cpu/gx", "cpu/g"):
        with pytest.raises(ValueError, match="provider"):
            cpu_ratio.parse_provider(bad)
    with pytest.raises(SystemExit):  # before any subprocess starts
        cpu_ratio.main(["--providers", "eager,cpu/g0"])


_SCRIPTS = sorted(
    p
    for d in ("benchmarks", "scripts", ".ci")
    for p in (Path(__file__).parents[1] / d).glob("*")
    if p.suffix == ".sh" or p.name == "run"
)


@pytest.mark.parametrize("script", _SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shell_scripts_parse(script: Path) -> None:
    """A syntax error in gpu_check.sh would cost a GPU call: bash -n them all here."""
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_shell_scripts_found() -> None:
    names = {p.name for p in _SCRIPTS}
    assert {"gpu_check.sh", "fetch_peer_wheels.sh", "gpu_stack_check.sh", "run"} <= names


@pytest.mark.emulated
def test_sanitize_workout_runs_and_catches_a_wrong_result(monkeypatch, capsys) -> None:
    """The compute-sanitizer workout, on the CPU emulation: passes as is, and
    reports a case whose forward result is off."""
    from benchmarks import sanitize_cuda
    from mimac_kernels.contract import Stats

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the emulation cannot be built")
    small = ["--emulated", "--dtypes", "bfloat16", "--n", "70", "--d", "72", "--heads", "1"]
    assert sanitize_cuda.main(small) == 0
    real_forward = sanitize_cuda.cuda_backend.forward

    def off(problem):
        stats = real_forward(problem)
        return Stats(stats.row_lse + 0.01, stats.col_lse)

    monkeypatch.setattr(sanitize_cuda.cuda_backend, "forward", off)
    assert sanitize_cuda.main(small) == 1
    assert "6 of 6 cases miss the float64 reference" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sanitize_cuda.main(["--dtypes", "float64"])


def test_exp2_scaling_two_steps_keep_the_dominant_weight() -> None:
    """The float32 effect behind the kernels' separate log2(e) step: the dominant
    term's backward weight stays 1 with two steps and drifts with |S| when folded."""
    from benchmarks.exp2_scaling import dominant_weight_error

    for scale in (1e3, 1e4, 6e4):
        r = dominant_weight_error(scale, rows=2000)
        assert r["two steps"] == 0.0
        assert r["folded"] >= 1e-6 * scale / 20
