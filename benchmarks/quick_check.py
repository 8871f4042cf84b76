"""The headline cases in a few minutes: a large correctness check, then the timings,
each next to the static sm_90 estimate (the newest benchmarks/results/*-static-sm90).

    python -m benchmarks.quick_check --out $OUT --deadline 150      # on a GPU
    python -m benchmarks.quick_check --device cpu --tiny --out /tmp/q --backends torch

Phases, in order, all bounded by ``--deadline`` (seconds from the start; a phase
that would start past it is recorded as skipped, with the reason):

1. ``check``: NT-Xent M = 65,536 and CLIP N = 65,536 at D = 128, bf16 (the tensor
   core path of both pairings at full size): each GPU backend's loss and gradients
   against the torch backend in float64 (tiled, so it fits), within the project's
   rule (``tests.kernels.accuracy``: twice plain PyTorch's bf16 error plus slack).
2. ``time``: each headline case, forward + backward, our backends first (both
   ``triton`` and ``cuda``, so that a dispatch table can be made from them), then
   eager (the full-matrix PyTorch loss; an OOM is recorded), then torch.compile
   last, only with ``--compile-min-left`` seconds still left (its first call compiles).

Writes ``quick_check.json`` (rewritten after every measurement, so a run cut by a
timeout keeps what it measured) and ``quick_check.md`` (the table); on a GPU, also
``dispatch_table.json``: the entries of ``mimac_kernels.dispatch_table`` that the times
of both GPU backends make (merge them into the committed table with
``python -m mimac_kernels.dispatch_table OUT/dispatch_table.json``). Each timing row
carries ``estimate_ms`` from the static estimate, joined by case name (``mimac-cuda``:
the CUDA kernels' ``estimate-cuda-*.json``; every other row: the running Triton's
version, else 3.6's), and ``model_error`` = measured / estimate.
``--tiny`` runs the same code at a few hundred rows (CPU tests); the estimate is
still joined, but the ratio then means nothing and the JSON says ``"tiny": true``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mimac_kernels import (
    dispatch,
    dispatch_table,
    distributed,
    fused_contrastive_loss,
    reference_contrastive_loss,
)

RESULTS = Path(__file__).parent / "results"


def newest_estimates(results: Path = RESULTS) -> Path:
    """The newest ``<date>-static-sm90`` folder that holds an ``estimate-triton*.json``
    (folders are named by date, so the last in name order is the newest)."""
    folders = [f for f in sorted(results.glob("*-static-sm90")) if any(f.glob("estimate-*.json"))]
    return folders[-1] if folders else results / "none-static-sm90"


ESTIMATES = newest_estimates()
#: Triton version whose estimate is used when the running one has none (the GPU machines').
DEFAULT_ESTIMATE = "3.6.0"
GPU_BACKENDS = ("triton", "cuda")
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Headline:
    """One headline case; ``name`` is the static estimate's case name (the join key).

    ``rows``: rows of S per side (M for ``all``, whose views have M / 2 rows; N for
    ``cross``; for ``rect``, one rank of the losses across ranks: ``rows`` local rows of
    ``Z = [a; b]`` against ``cols`` gathered columns, its own at ``offset``). Inputs are
    unit rows whose positives sit near ``positive_cos``.
    """

    name: str
    pairing: str
    rows: int
    d: int
    tau: float
    critic: str
    positive_cos: float = 0.3
    cols: int = 0
    offset: int = 0

    @property
    def n(self) -> int:
        """Rows per view."""
        return self.rows // 2 if self.pairing == "all" else self.rows


HEADLINE: tuple[Headline, ...] = (
    Headline("NT-Xent M=65,536 D=128", "all", 65536, 128, 0.1, "cosine"),
    Headline("NT-Xent M=65,536 D=512", "all", 65536, 512, 0.1, "cosine"),
    Headline("CLIP N=65,536 D=128", "cross", 65536, 128, 0.1, "dot"),
    Headline("CLIP N=65,536 D=128, tau=0.01, positives ~0.3 cos", "cross", 65536, 128, 0.01,
             "dot"),
    # NT-Xent over 8 ranks of 4,096 pairs, the last rank (static_cases.CASES' rect case),
    # timed as that rank's rectangular problem on one GPU: no process group needed.
    Headline("8 ranks: 8,192 local rows x 65,536 gathered columns D=128", "rect", 8192, 128,
             0.1, "cosine", cols=65536, offset=7 * 8192),
)  # fmt: skip
#: The correctness check's cases: both pairings at D = 128, then D = 512 (the cuda
#: backend's wide backward: bf16 at a staged width of 512), which the deadline may skip.
CHECKED = (HEADLINE[0], HEADLINE[2], HEADLINE[1])
TINY_ROWS, TINY_D = 256, 32


def tiny(case: Headline) -> Headline:
    """The same case at ``TINY_ROWS`` rows and D <= ``TINY_D`` (same name: same join);
    ``rect``: against 4 x ``TINY_ROWS`` columns, its own the last."""
    small = dataclasses.replace(case, rows=TINY_ROWS, d=min(case.d, TINY_D))
    if case.pairing != "rect":
        return small
    return dataclasses.replace(small, cols=4 * TINY_ROWS, offset=3 * TINY_ROWS)


# --------------------------------------------------------------------------- inputs


def views(case: Headline, device: torch.device, dtype: torch.dtype, seed: int = 0
          ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Unit rows ``a``, ``b`` of shape ``(case.n, case.d)`` in ``dtype`` with
    ``a_i . b_i = positive_cos`` (before rounding) and unrelated pairs near 0."""
    if case.pairing == "rect":  # the gathered columns; the local rows are among them
        cols = F.normalize(
            torch.randn(
                case.cols,
                case.d,
                generator=torch.Generator(device=device).manual_seed(seed),
                device=device,
            ),
            dim=1,
        )
        rows = cols[case.offset : case.offset + case.rows]
        return rows.to(dtype).clone(), cols.to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.n, case.d)
    a = F.normalize(torch.randn(shape, generator=gen, device=device), dim=1)
    noise = torch.randn(shape, generator=gen, device=device)
    noise = F.normalize(noise - (noise * a).sum(1, keepdim=True) * a, dim=1)
    b = case.positive_cos * a + math.sqrt(1.0 - case.positive_cos**2) * noise
    return a.to(dtype), b.to(dtype)


def _rect_positives(z: Tensor) -> Tensor:
    """The positives' raw scores of local rows ``z = [a; b]`` ``(2n, D)``: row i's partner
    is row ``(i + n) mod 2n`` (``(2n,)``, float32; float64 for float64 rows)."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return (z.to(acc) * z.roll(z.shape[0] // 2, dims=0).to(acc)).sum(-1)


def ours(case: Headline, backend: str) -> LossFn:
    """Our loss on ``backend`` for ``case`` (mean, symmetric); for ``rect`` one rank's
    per-row losses against the gathered columns (``distributed.rect_row_losses``, what
    ``group=`` runs), their mean."""
    if case.pairing == "rect":

        def rect(a: Tensor, b: Tensor) -> Tensor:
            dt = torch.float64 if a.dtype == torch.float64 else torch.float32  # compute dtype
            inv_tau = torch.tensor(1.0 / case.tau, dtype=dt, device=a.device)
            if case.critic == "cosine":  # the kernels take unit rows, as group= passes them
                a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            rows = distributed.rect_row_losses(a, b, inv_tau, _rect_positives(a), case.critic,
                                               offset=case.offset, backend=backend)  # fmt: skip
            return rows.mean()

        return rect
    return lambda a, b: fused_contrastive_loss(
        a, b, temperature=case.tau, critic=case.critic, negatives=case.pairing, backend=backend
    )


def eager(case: Headline) -> LossFn:
    """Plain full-matrix PyTorch in the inputs' dtype (the eager baseline)."""
    if case.pairing == "rect":

        def rect(a: Tensor, b: Tensor) -> Tensor:
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            s = a @ b.T / case.tau
            own = torch.arange(a.shape[0], device=a.device) + case.offset
            s = s.index_put(
                (torch.arange(a.shape[0], device=a.device), own),
                torch.tensor(float("-inf"), dtype=s.dtype, device=s.device),
            )
            return (torch.logsumexp(s, dim=1) - _rect_positives(a).to(s.dtype) / case.tau).mean()

        return rect
    return lambda a, b: reference_contrastive_loss(
        a, b, temperature=case.tau, critic=case.critic, negatives=case.pairing, dtype=None
    )


def compiled(case: Headline) -> LossFn:
    """``eager`` under torch.compile (static shapes)."""
    fn = torch.compile(eager(case), dynamic=False)
    return lambda a, b: fn(a, b)


def is_oom(exc: BaseException) -> bool:
    """An allocation failure (CUDA OOM, CPU allocator, MemoryError)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, (MemoryError, oom)) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------- measuring


class Clock:
    """Seconds since the start and the time left before ``deadline`` (seconds)."""

    def __init__(self, deadline: float) -> None:
        self.start, self.deadline = time.monotonic(), deadline

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: LossFn, a: Tensor, b: Tensor) -> None:
    a.grad = b.grad = None
    fn(a, b).backward()


def time_fwd_bwd(fn: LossFn, a: Tensor, b: Tensor, repeats: int) -> dict:
    """Forward + backward of ``fn``: one warm-up call, then ``repeats`` timed calls.

    CUDA events on a GPU (perf_counter elsewhere). Returns ms median/min, the
    repeats, and on a GPU the peak memory above what was allocated before (MiB).
    """
    device = a.device
    _step(fn, a, b)  # warm-up: compiles, autotunes, allocates
    _sync(device)
    base = 0
    if device.type == "cuda":
        a.grad = b.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _step(fn, a, b)
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"ms_median": statistics.median(times), "ms_min": min(times),
           "ms_all": [round(t, 4) for t in times], "repeats": repeats}  # fmt: skip
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_mib"] = (peak - base) / 2**20  # above the inputs
        out["peak_total_mib"] = peak / 2**20
    return out


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_case(case: Headline, backends: list[str], device: torch.device,
               dtype: torch.dtype) -> list[dict]:  # fmt: skip
    """Each backend's loss and gradients against float64 (the torch backend, tiled),
    bounded as in the kernel tests: twice plain PyTorch's error in ``dtype`` plus
    slack, plus one rounding of the positives' gradient for half dtypes."""
    from tests.kernels.accuracy import (  # the project's accuracy rule, one definition
        HALF_DTYPES,
        error_bound,
        loss_and_grads,
        max_abs_err,
        positives_only,
    )

    a, b = views(case, device, dtype, seed=1)
    kw = {"critic": case.critic, "negatives": case.pairing}

    def backend_fn(name: str) -> Callable[..., Tensor]:
        return lambda x, y, **k: fused_contrastive_loss(x, y, backend=name, **k)

    ref = loss_and_grads(backend_fn("torch"), a.double(), b.double(), case.tau, None, False, **kw)
    ref = [ref[0], *ref[1]]
    _release(device)
    _, pos = loss_and_grads(positives_only, a, b, case.tau, None, False, **kw)
    try:  # plain PyTorch in dtype: the full matrix, whose error sets the bound
        plain = loss_and_grads(reference_contrastive_loss, a, b, case.tau, None, False,
                               dtype=None, **kw)  # fmt: skip
        plain_err = [max_abs_err(p, r) for p, r in zip([plain[0], *plain[1]], ref)]
        del plain
    except Exception as exc:  # recorded; the errors are still reported
        if not is_oom(exc):
            raise
        plain_err = None
    _release(device)
    rows = []
    for name in backends:
        row: dict = {"case": case.name, "backend": name}
        try:
            out = loss_and_grads(backend_fn(name), a, b, case.tau, None, False, **kw)
        except Exception as exc:  # noqa: BLE001 - one backend's failure is a result
            rows.append({**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        row["ok"] = True
        for i, q in enumerate(("loss", "grad_a", "grad_b")):
            err = max_abs_err([out[0], *out[1]][i], ref[i])
            row[f"{q}_err"] = err
            if plain_err is None:
                row["ok"] = None  # no bound without plain PyTorch's error
                continue
            bound = error_bound(plain_err[i], dtype, ref[i])
            if q != "loss" and dtype in HALF_DTYPES:
                bound += torch.finfo(dtype).eps * float(pos[i - 1].abs().max())
            row[f"{q}_bound"] = bound
            row["ok"] = bool(row["ok"] and err <= bound)
        rows.append(row)
        del out
        _release(device)
    return rows


# --------------------------------------------------------------------------- estimates


def load_estimates(triton_version: str | None, folder: Path = ESTIMATES) -> tuple[str, dict]:
    """(file name, {case name: estimate_ms}) for ``triton_version``, else ``DEFAULT_ESTIMATE``."""
    path = folder / f"estimate-triton{triton_version}.json"
    if not path.is_file():
        path = folder / f"estimate-triton{DEFAULT_ESTIMATE}.json"
    return _estimate_file(path)


def load_cuda_estimates(folder: Path = ESTIMATES) -> tuple[str, dict]:
    """(file name, {case name: estimate_ms}) of the CUDA backend's static estimate
    (``estimate-cuda-nvccX.json``, the last in name order), or ``("", {})``."""
    files = sorted(folder.glob("estimate-cuda-*.json"))
    return _estimate_file(files[-1]) if files else ("", {})


def _estimate_file(path: Path) -> tuple[str, dict]:
    if not path.is_file():
        return "", {}
    data = json.loads(path.read_text())
    return path.name, {r["case"]["name"]: r["estimate_ms"] for r in data["results"]}


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - absent or broken: no version
        return None
    return triton.__version__


# --------------------------------------------------------------------------- the run


def environment(device: torch.device) -> dict:
    """Device, driver and versions for the record."""
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("MIMAC_COMMIT", "unknown"), "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": _triton_version(),
           "python": platform.python_version(), "device": device.type}  # fmt: skip
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        try:
            q = "--query-gpu=driver_version"
            out = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=False)  # fmt: skip
            env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["driver"] = None
    return env


class Recorder:
    """The result document, rewritten to ``out/quick_check.json`` after every entry."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        self.doc: dict = {"meta": meta, "check": [], "timings": [], "skipped": []}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, entry: dict) -> None:
        self.doc[key].append(entry)
        self.save()

    def save(self) -> None:
        path = self.out / "quick_check.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(path)  # atomic: a timeout never leaves half a file
        (self.out / "quick_check.md").write_text(markdown(self.doc))


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def backend_choice(timings: list[dict]) -> list[str]:
    """Markdown lines: per case, the GPU backends' medians side by side and the faster
    one (the measurements a dispatch table is made from); none if fewer than two ran."""
    per_case: dict[str, dict[str, float]] = {}
    for t in timings:
        if t["status"] == "ok" and t["provider"].startswith("mimac-"):
            per_case.setdefault(t["case"], {})[t["provider"][6:]] = t["ms_median"]
    cases = {c: ms for c, ms in per_case.items() if len(ms) > 1}
    if not cases:
        return []
    names = sorted({n for ms in cases.values() for n in ms})
    lines = ["", "| case | " + " | ".join(f"{n} ms" for n in names) + " | faster |",
             "|---|" + "---:|" * len(names) + "---|"]  # fmt: skip
    for case, ms in cases.items():
        best = min(ms, key=ms.__getitem__)
        cells = " | ".join(_fmt(ms.get(n)) for n in names)
        lines.append(f"| {case} | {cells} | {best} |")
    return lines


def markdown(doc: dict) -> str:
    """The timing table (measured next to the estimate) and the check table."""
    m = doc["meta"]
    lines = [f"# Quick check, {m['device_name']}, commit {m['commit']}, {m['date']}", "",
             f"torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']}, driver "
             f"{m.get('driver')}; estimates: {m['estimate_file'] or 'none'} (mimac-cuda: "
             f"{m.get('estimate_file_cuda') or 'none'})"
             + (" (**tiny sizes: the ratios mean nothing**)" if m["tiny"] else ""), "",
             "| case | provider | median ms | min ms | peak MiB | estimate ms | measured / estimate |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for t in doc["timings"]:
        if t["status"] != "ok":
            lines.append(f"| {t['case']} | {t['provider']} | {t['status']} | | | | |")
            continue
        lines.append(f"| {t['case']} | {t['provider']} | {_fmt(t['ms_median'])} | "
                     f"{_fmt(t['ms_min'])} | {_fmt(t.get('peak_mib'), '.0f')} | "
                     f"{_fmt(t['estimate_ms'])} | {_fmt(t['model_error'])} |")  # fmt: skip
    lines += backend_choice(doc["timings"])
    if doc["check"]:
        lines += ["", "| check (float64 reference) | backend | ok | loss err | grad_a err / bound |",
                  "|---|---|---|---:|---|"]  # fmt: skip
        for c in doc["check"]:
            ga = f"{_fmt(c.get('grad_a_err'), '.3g')} / {_fmt(c.get('grad_a_bound'), '.3g')}"
            lines.append(f"| {c['case']} | {c['backend']} | {c['ok']} | "
                         f"{_fmt(c.get('loss_err'), '.3g')} | {ga} |")  # fmt: skip
    if doc["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in doc["skipped"])]
    return "\n".join(lines) + "\n"


def _usable(backends: list[str], device: torch.device, dtype: torch.dtype, rec: Recorder
            ) -> list[str]:  # fmt: skip
    keep = []
    for name in backends:
        why = dispatch.unavailable_reason(name, device, dtype)
        if why is None:
            keep.append(name)
        else:
            rec.add("skipped", {"what": f"mimac-{name}", "why": why})
    return keep


def time_one(rec: Recorder, case: Headline, provider: str,
             make: Callable[[Headline], LossFn],
             inputs: tuple[Tensor, Tensor], repeats: int) -> None:  # fmt: skip
    """Time one provider on one case and record it (an OOM or error is a result)."""
    a, b = (t.detach().requires_grad_() for t in inputs)
    entry: dict = {"case": case.name, "provider": provider, "rows": case.rows, "d": case.d,
                   "tau": case.tau, "pairing": case.pairing, "critic": case.critic}  # fmt: skip
    # Named in the file while it runs: a run killed by its timeout says what it was doing.
    rec.doc["meta"]["running"] = f"{case.name} {provider}"
    rec.save()
    try:
        entry.update(status="ok", **time_fwd_bwd(make(case), a, b, repeats))
    except Exception as exc:  # noqa: BLE001 - recorded, the next provider still runs
        traceback.print_exc()
        entry["status"] = "oom" if is_oom(exc) else "error"
        entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
    rec.doc["meta"].pop("running")
    # mimac-cuda beside the CUDA kernels' estimate; every other row beside Triton's.
    key = "estimates_cuda" if provider == "mimac-cuda" else "estimates"
    est = rec.doc["meta"][key].get(case.name)
    entry["estimate_ms"] = est
    entry["model_error"] = (entry["ms_median"] / est) if est and "ms_median" in entry else None
    rec.add("timings", entry)
    a.grad = b.grad = None
    _release(a.device)


def write_dispatch_table(doc: dict, out: Path, capability: tuple[int, int]) -> list[dict]:
    """``out/dispatch_table.json`` from the run's timings of both GPU backends on a GPU of
    ``capability`` (``dispatch_table.table_from_timings``); also kept in ``doc``."""
    m = doc["meta"]
    source = f"quick_check {m['date']} {m['device_name']} commit {m['commit']}"
    entries = dispatch_table.table_from_timings(doc["timings"], capability, m["dtype"],
                                                source=source)  # fmt: skip
    doc["dispatch_table"] = entries
    dispatch_table.write(out / "dispatch_table.json", entries)
    return entries


def run(args: argparse.Namespace) -> dict:
    """Both phases within ``args.deadline``; returns the result document."""
    clock = Clock(args.deadline)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    est_file, estimates = load_estimates(_triton_version(), Path(args.estimates))
    cuda_file, cuda_estimates = load_cuda_estimates(Path(args.estimates))
    meta = {**environment(device), "tiny": args.tiny, "dtype": "bfloat16",
            "estimate_file": f"{Path(args.estimates).name}/{est_file}" if est_file else "",
            "estimates": estimates,
            "estimate_file_cuda": f"{Path(args.estimates).name}/{cuda_file}" if cuda_file else "",
            "estimates_cuda": cuda_estimates,
            "deadline_s": args.deadline, "repeats": args.repeats}  # fmt: skip
    rec = Recorder(Path(args.out), meta)
    backends = _usable([b for b in args.backends.split(",") if b], device, dtype, rec)
    size = tiny if args.tiny else (lambda c: c)
    if args.check:
        for case in map(size, CHECKED):
            if clock.left() < args.check_min_left:
                rec.add("skipped", {"what": f"check {case.name}", "why": "deadline"})
                continue
            try:
                rows = check_case(case, backends, device, dtype)
            except Exception as exc:  # noqa: BLE001 - the reference failed: say so, time on
                traceback.print_exc()
                rows = [{"case": case.name, "backend": "reference", "ok": None,
                         "error": f"{type(exc).__name__}: {exc}"[:500]}]  # fmt: skip
                _release(device)
            for row in rows:
                rec.add("check", row)
    baselines = [b for b in args.baselines.split(",") if b]
    for case in map(size, HEADLINE):
        inputs = views(case, device, dtype)
        for name in backends:
            if clock.left() < args.min_left:
                rec.add("skipped", {"what": f"{case.name} mimac-{name}", "why": "deadline"})
                continue
            time_one(rec, case, f"mimac-{name}", lambda c, n=name: ours(c, n), inputs,
                     args.repeats)  # fmt: skip
        if "eager" in baselines:
            if clock.left() < args.min_left:
                rec.add("skipped", {"what": f"{case.name} eager", "why": "deadline"})
            else:
                time_one(rec, case, "eager", eager, inputs, args.repeats)
        del inputs
        _release(device)
    if "compile" in baselines:  # last: its first call per shape compiles (tens of seconds)
        for case in map(size, HEADLINE):
            if clock.left() < args.compile_min_left:
                rec.add("skipped", {"what": f"{case.name} compile", "why": "deadline"})
                continue
            time_one(rec, case, "compile", compiled, views(case, device, dtype),
                     args.repeats)  # fmt: skip
    if device.type == "cuda" and not args.tiny:  # tiny sizes say nothing about speed
        write_dispatch_table(rec.doc, Path(args.out), dispatch_table.capability(device))
    rec.doc["meta"]["wall_s"] = round(time.monotonic() - clock.start, 1)
    rec.save()
    return rec.doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quick_check",
                                description=__doc__.splitlines()[0])  # fmt: skip
    cuda = torch.cuda.is_available()
    p.add_argument("--out", required=True, help="folder for quick_check.json / .md")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--tiny", action="store_true", help=f"{TINY_ROWS} rows, D <= {TINY_D}")
    p.add_argument("--deadline", type=float, default=150.0, help="seconds for everything")
    p.add_argument(
        "--backends",
        default=",".join(GPU_BACKENDS) if cuda else "torch",
        help="our backends, comma-separated (timed in this order)",
    )
    p.add_argument("--baselines", default="eager,compile", help="eager and/or compile")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--estimates",
        default=str(ESTIMATES),
        help="folder of the static estimate-tritonX.json files",
    )
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the float64 check")
    p.add_argument(
        "--min-left",
        type=float,
        default=5.0,
        help="start a timing only with this many seconds left",
    )
    p.add_argument("--check-min-left", type=float, default=20.0)
    p.add_argument("--compile-min-left", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    doc = run(args)
    print((Path(args.out) / "quick_check.md").read_text())
    # A fault of ours fails the run (a check outside its bound, a timing of ours that
    # did not complete); a baseline's OOM or error is a result, not a fault.
    bad = [c for c in doc["check"] if c["ok"] is False]
    bad += [t for t in doc["timings"] if t["provider"].startswith("mimac-") and t["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
