"""CPU speed and memory of the fused ``cpu`` backend against plain PyTorch.

Each provider runs in its own subprocess, so peak memory is that process's
own: the peak resident set (``VmHWM`` from ``/proc/self/status``, reset through
``/proc/self/clear_refs`` where the kernel allows it) minus the resident set
just before the first full-size call. Time is the median of ``--repeats``
forward+backward runs after that first call.

Providers:
    eager  ``mimac_kernels.reference_contrastive_loss(..., dtype=None)``: the
           full M x M matrix and autograd, as most code runs it.
    cpu    ``fused_contrastive_loss(..., backend="cpu")``: the fused C++ kernel;
           ``cpu/g1`` .. ``cpu/g4`` force that many blocks per group tile
           (``cpu_backend.set_group``), e.g. ``--providers cpu/g1,cpu`` for the
           schedule without and with group tiles side by side.
    torch  ``fused_contrastive_loss(..., backend="torch")``: the row-chunked torch loop.

Usage:
    python benchmarks/cpu_ratio.py                       # M = 16,384 rows, D = 128, cosine, "all"
    python benchmarks/cpu_ratio.py --n 2048 --repeats 2  # quick look

A reference for the kernels: the symmetric design's matrix work (``all``
4 M^2 d FLOP, ``cross`` 8 N^2 d; ``benchmarks.cases.symmetric_work``) at this
machine's float32 GEMM rate, measured in the same run (``torch.mm`` of two
2048 x 2048 matrices in its own subprocess, same thread count). ``x GEMM`` is a
provider's time over that reference: about 1 means the necessary GEMMs at the
library's speed with everything else (exps, masks, reductions) hidden; below 1,
faster than the library would do that matrix work alone. Not a hard bound.

Prints a table and the ratios, writes JSON (default
benchmarks/results/<date>-cpu-ratio/<negatives>-M<rows>-d<D>.json).
Asserts nothing: machines are noisy, the ratios of one run are what count.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("eager", "torch", "cpu")
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script (the usage above): make `benchmarks` importable
    sys.path.insert(0, str(REPO))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


GEMM_SIZE = 2048  # the reference GEMM: (GEMM_SIZE x GEMM_SIZE) @ (GEMM_SIZE x GEMM_SIZE)


def _gemm_rate(repeats: int) -> dict:
    """This machine's float32 GEMM rate through torch.mm (median of ``repeats``)."""
    import torch

    torch.manual_seed(0)
    a = torch.randn(GEMM_SIZE, GEMM_SIZE)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE)
    torch.mm(a, b)  # warm-up: thread pool, library dispatch
    times = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "provider": "gemm",
        "size": GEMM_SIZE,
        "times_s": times,
        "gflops": 2.0 * GEMM_SIZE**3 / median / 1e9,
        "threads": torch.get_num_threads(),
    }


def _worker(args: argparse.Namespace) -> dict:
    """Runs in the subprocess: one provider, returns its timings and peak memory."""
    if args.provider == "gemm":
        return _gemm_rate(args.repeats)
    import torch

    import mimac_kernels

    torch.manual_seed(0)
    n, d = args.n, args.d
    kw = {"temperature": args.temperature, "critic": args.critic, "negatives": args.negatives}

    backend, group = parse_provider(args.provider)
    if group is not None:
        from mimac_kernels import cpu_backend

        cpu_backend.set_group(group)

    def loss_fn(a, b):
        if backend == "eager":
            return mimac_kernels.reference_contrastive_loss(a, b, dtype=None, **kw)
        return mimac_kernels.fused_contrastive_loss(a, b, backend=backend, **kw)

    # Warm-up on a small problem: builds/loads the extension, initialises threads.
    sa = torch.randn(128, d, requires_grad=True)
    sb = torch.randn(128, d, requires_grad=True)
    loss_fn(sa, sb).backward()
    del sa, sb

    a = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, d, requires_grad=True)
    reset_ok = _reset_peak()
    base_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = loss_fn(a, b)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak_kib = _status_kib("VmHWM")
    first = {"forward_s": t1 - t0, "backward_s": t2 - t1}
    value = float(loss.detach())
    del loss

    fwd, bwd = [], []
    for _ in range(args.repeats):
        a.grad = b.grad = None
        s0 = time.perf_counter()
        loss = loss_fn(a, b)
        s1 = time.perf_counter()
        loss.backward()
        s2 = time.perf_counter()
        fwd.append(s1 - s0)
        bwd.append(s2 - s1)
        del loss
    total = [f + g for f, g in zip(fwd, bwd)]
    return {
        "provider": args.provider,
        "loss": value,
        "first_call": first,
        "forward_s": fwd,
        "backward_s": bwd,
        "total_s": total,
        "median_total_s": statistics.median(total),
        "median_forward_s": statistics.median(fwd),
        "median_backward_s": statistics.median(bwd),
        "peak_mib_above_start": (peak_kib - base_kib) / 1024.0,
        "peak_rss_mib": peak_kib / 1024.0,
        "peak_reset": reset_ok,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        **_cpu_kernel_labels(backend, args),
    }


def _cpu_kernel_labels(backend: str, args: argparse.Namespace) -> dict:
    """Instruction set and group size of the cpu kernel that just ran (None otherwise)."""
    if backend != "cpu":
        return {"isa": None, "group": None}
    from mimac_kernels import cpu_backend

    return {"isa": cpu_backend.isa(), "group": cpu_backend.group(_rows(args), args.d)}


def _rows(args: argparse.Namespace) -> int:
    """Rows M of the similarity matrix: 2N for "all", N for "cross"."""
    return 2 * args.n if args.negatives == "all" else args.n


def parse_provider(name: str) -> tuple[str, int | None]:
    """``"cpu/g2"`` -> ``("cpu", 2)``; ``"eager"`` -> ``("eager", None)``."""
    backend, sep, group = name.partition("/g")
    if backend not in PROVIDERS:
        raise ValueError(f"provider {name!r}: expected one of {', '.join(PROVIDERS)}")
    if not sep:
        return backend, None
    if backend != "cpu" or not group.isdigit() or int(group) < 1:
        raise ValueError(
            f"provider {name!r}: only cpu takes a group, as cpu/g<blocks per group >= 1>"
        )
    return backend, int(group)


def _run_provider(provider: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--provider",
        provider,
        "--n",
        str(args.n),
        "--d",
        str(args.d),
        "--repeats",
        str(args.repeats),
        "--critic",
        args.critic,
        "--negatives",
        args.negatives,
        "--temperature",
        str(args.temperature),
    ]
    env = dict(os.environ)
    # As in benchmarks/conftest.py: spinning OpenMP waits collapse on shared cores.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{provider} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="rows per view (M = 2N for 'all')")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--critic", default="cosine")
    p.add_argument("--negatives", default="all")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: see above)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    import torch

    from benchmarks.cases import symmetric_work
    from benchmarks.labels import commit, cpu_name

    providers = args.providers.split(",")
    for prov in providers:
        try:
            parse_provider(prov)
        except ValueError as exc:
            p.error(f"--providers: {exc}")
    print("measuring the GEMM rate ...", flush=True)
    gemm = _run_provider("gemm", args)
    results = {}
    for prov in providers:
        print(f"running {prov} ...", flush=True)
        results[prov] = _run_provider(prov, args)
    rows = _rows(args)
    gemm_flop = symmetric_work(args.negatives, rows, args.d)[0]
    gemm_ref_s = gemm_flop / (gemm["gflops"] * 1e9)
    print(
        f"\nM = {rows} rows, D = {args.d}, {args.critic}/{args.negatives}, float32, "
        f"{results[next(iter(results))]['threads']} threads, {cpu_name()}"
    )
    print(
        f"GEMM reference {gemm_ref_s:.3f} s: {gemm_flop / 1e9:.1f} GFLOP "
        f"at the measured GEMM rate of {gemm['gflops']:.0f} GFLOP/s"
    )
    print(
        f"{'provider':8s} {'fwd+bwd s (median)':>19s} {'fwd s':>8s} {'bwd s':>8s} {'peak MiB':>10s}"
        f" {'x GEMM':>8s}"
    )
    for prov, r in results.items():
        r["times_gemm_ref"] = r["median_total_s"] / gemm_ref_s
        print(
            f"{prov:8s} {r['median_total_s']:19.3f} {r['median_forward_s']:8.3f} "
            f"{r['median_backward_s']:8.3f} {r['peak_mib_above_start']:10.1f} {r['times_gemm_ref']:8.2f}"
        )
    ratios = {}
    if "eager" in results:
        e = results["eager"]
        for prov, r in results.items():
            if prov == "eager":
                continue
            # A peak below the page-count resolution reads as 0: no fraction then.
            mem = (
                r["peak_mib_above_start"] / e["peak_mib_above_start"]
                if e["peak_mib_above_start"] > 0
                else None
            )
            ratios[prov] = {
                "speedup_vs_eager": e["median_total_s"] / r["median_total_s"],
                "memory_fraction_of_eager": mem,
            }
            mem_text = (
                "eager's peak too small to compare"
                if mem is None
                else (f"{100 * mem:.2f}% of eager's peak memory")
            )
            print(f"{prov}: {ratios[prov]['speedup_vs_eager']:.2f}x eager's speed, {mem_text}")
    record = {
        "benchmark": "cpu_ratio",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(),
        "commit": commit(),
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": {"M": rows, "N": args.n, "D": args.d},
        "config": {
            "critic": args.critic,
            "negatives": args.negatives,
            "temperature": args.temperature,
            "dtype": "float32",
        },
        "gemm": gemm,
        "gemm_ref_s": gemm_ref_s,
        "results": results,
        "ratios": ratios,
    }
    out = args.out or (
        RESULTS
        / f"{_dt.date.today().isoformat()}-cpu-ratio"
        / f"{args.negatives}-M{rows}-d{args.d}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
