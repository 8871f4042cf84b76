"""Markdown tables and PNG plots from pytest-benchmark JSON.

Usage::

    python -m benchmarks.report RESULT.json [MORE.json ...] [--max-batch MB.json] \
        [--note NOTE.md] --out DIR

writes ``DIR/report.md``, ``DIR/time.png`` and ``DIR/memory.png``.

Columns: median and IQR of the rounds, peak memory above the inputs, achieved
TFLOP/s under the nominal FLOP model of ``cases.flop_model`` (the same work for
every provider: 6 M^2 d for NT-Xent, 8 N^2 d for CLIP, linear for the log_dot
closed form), the time and memory ratio to our fastest backend at the same
point, and on an H100/H200 the ratio to the physical floor (``benchmarks/cases.py``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cases import BOUND_DEVICES, bound_seconds

MODE_ORDER = {"fwd+bwd": 0, "forward": 1, "backward": 2}


@dataclass
class Row:
    """One benchmark entry, flattened."""

    provider: str
    kind: str
    mode: str
    rows: int
    d: int
    dtype: str
    critic: str
    tau: float
    pairing: str
    status: str
    median: float | None
    iqr: float | None
    rounds: int
    peak: int | None
    flop: float
    note: str

    @property
    def group(self) -> str:
        return f"{self.pairing}-{self.critic}-tau{self.tau:g}-{self.dtype}-d{self.d}"

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median is not None


def load(paths: list[Path]) -> tuple[list[Row], dict]:
    """Rows of every entry in ``paths`` and the merged run metadata."""
    rows, meta = [], {"labels": {}, "skipped": [], "sizes": []}
    for path in paths:
        data = json.loads(Path(path).read_text())
        extra = data.get("mimac", {})
        meta["labels"] = meta["labels"] or extra.get("labels", {})
        meta["skipped"] += extra.get("skipped", [])
        meta["sizes"].append(extra.get("size"))
        for bench in data.get("benchmarks", []):
            info, stats = bench.get("extra_info", {}), bench.get("stats") or {}
            if "provider" not in info:
                continue
            ok = info.get("status") == "ok"
            rows.append(
                Row(
                    provider=info["provider"],
                    kind=info.get("kind", ""),
                    mode=info["mode"],
                    rows=int(info["rows"]),
                    d=int(info["d"]),
                    dtype=info["dtype"],
                    critic=info["critic"],
                    tau=float(info["tau"]),
                    pairing=info["pairing"],
                    status=info.get("status", "ok"),
                    median=stats.get("median") if ok else None,
                    iqr=stats.get("iqr") if ok else None,
                    rounds=int(stats.get("rounds", 0)) if ok else 0,
                    peak=info.get("peak_mem_bytes"),
                    flop=float(info.get("flop", 0.0)),
                    note=info.get("note", ""),
                )
            )
    return rows, meta


def fastest_ours(rows: list[Row]) -> dict[tuple, Row]:
    """Per (group, mode, rows): our backend with the smallest median, at full precision
    (an opt-in TF32 row must not be the reference that float32 baselines are set against)."""
    best: dict[tuple, Row] = {}
    for r in rows:
        if r.kind == "ours" and r.ok and not r.provider.endswith("-tf32"):
            key = (r.group, r.mode, r.rows)
            if key not in best or r.median < best[key].median:
                best[key] = r
    return best


def floor_ratio(r: Row, device: str) -> float | None:
    """Measured time over the physical floor (>= 1), on the devices it applies to."""
    if not r.ok or not any(tag in device for tag in BOUND_DEVICES):
        return None
    floor = bound_seconds(r.pairing, r.critic, r.tau, r.rows, r.d, r.dtype, r.mode)
    return None if floor is None else r.median / floor


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    return f"{s * 1e3:.4g} ms" if s < 10 else f"{s:.3g} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "—"
    mib = b / 2**20
    return f"{mib / 1024:.3g} GiB" if mib >= 1024 else f"{mib:.3g} MiB"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.3g}×"


def _status_cell(r: Row) -> str:
    return "OOM" if r.status == "oom" else r.status


def _groups(rows: list[Row]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in sorted(rows, key=lambda r: MODE_ORDER.get(r.mode, 9)):
        seen.setdefault((r.group, r.mode), None)
    return list(seen)


def summary_tables(rows: list[Row]) -> list[str]:
    """Per (group, mode): M down, providers across; time and memory with ratios."""
    best, out = fastest_ours(rows), []
    providers = list(dict.fromkeys(r.provider for r in rows))
    for group, mode in _groups(rows):
        sel = [r for r in rows if r.group == group and r.mode == mode]
        provs = [p for p in providers if any(r.provider == p for r in sel)]
        out.append(f"### {group} · {mode}\n")
        out.append("| M | " + " | ".join(provs) + " |")
        out.append("|---:|" + "---|" * len(provs))
        for m in sorted({r.rows for r in sel}):
            cells = []
            for p in provs:
                r = next((x for x in sel if x.provider == p and x.rows == m), None)
                if r is None:
                    cells.append("")
                elif not r.ok:
                    cells.append(_status_cell(r))
                else:
                    ref = best.get((group, mode, m))
                    t = fmt_ratio(r.median / ref.median) if ref else "—"
                    mem = fmt_bytes(r.peak)
                    if ref and r.peak and ref.peak:
                        mem += f" ({fmt_ratio(r.peak / ref.peak)})"
                    cells.append(f"{fmt_time(r.median)} ({t}) · {mem}")
            out.append(f"| {m:,} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def detail_table(rows: list[Row], device: str) -> list[str]:
    best = fastest_ours(rows)
    out = [
        (
            "| provider | case | mode | M | median | IQR | rounds | peak mem | TFLOP/s "
            "| × time vs ours | × mem vs ours | × floor |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, mode in _groups(rows):
        sel = sorted((r for r in rows if r.group == group and r.mode == mode), key=lambda r: r.rows)
        for r in sel:
            ref = best.get((group, mode, r.rows))
            if not r.ok:
                out.append(
                    f"| {r.provider} | {group} | {mode} | {r.rows:,} | {_status_cell(r)} "
                    "| | | | | | | |"
                )
                continue
            iqr = f"{fmt_time(r.iqr)} ({100 * r.iqr / r.median:.0f}%)" if r.iqr is not None else "—"
            tflops = r.flop / r.median / 1e12 if r.flop else None
            t_ratio = r.median / ref.median if ref else None
            m_ratio = r.peak / ref.peak if ref and r.peak and ref.peak else None
            out.append(
                f"| {r.provider} | {group} | {mode} | {r.rows:,} | {fmt_time(r.median)} | {iqr} "
                f"| {r.rounds} | {fmt_bytes(r.peak)} | {tflops:.3g} | {fmt_ratio(t_ratio)} "
                f"| {fmt_ratio(m_ratio)} | {fmt_ratio(floor_ratio(r, device))} |"
            )
    return out


def skipped_table(skipped: list[dict]) -> list[str]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for s in skipped:
        counts[(s["provider"], s["reason"])] += 1
    out = ["| provider | reason | benchmarks |", "|---|---|---:|"]
    out += [f"| {p} | {why} | {n} |" for (p, why), n in sorted(counts.items())]
    return out


def max_batch_table(data: dict) -> list[str]:
    cfg = data.get("config", {})
    out = [
        (
            f"Configuration: {', '.join(f'{k}={v}' for k, v in cfg.items())}. Peak: everything "
            "the process held (CUDA: allocated; CPU: resident, torch runtime included); above "
            "inputs: what the call added. Extrapolated: M at which the last run's memory, "
            "scaled ~M (~M² for full-matrix providers), fills the device (CPU: the cap).\n"
        ),
        (
            "| provider | largest M that ran | peak there | above inputs | s per call "
            "| first M that failed | stopped by | extrapolated M |"
        ),
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]

    def num(x: int | None) -> str:
        return f"{x:,}" if x else "—"

    for r in data.get("results", []):
        secs = r.get("seconds_at_max")
        out.append(
            f"| {r['provider']} | {num(r.get('max_rows'))} | {fmt_bytes(r.get('peak_bytes'))} "
            f"| {fmt_bytes(r.get('peak_above_inputs_bytes'))} "
            f"| {f'{secs:.3g}' if secs else '—'} | {num(r.get('first_fail_rows'))} "
            f"| {r.get('stopped_by', '')} | {num(r.get('extrapolated_rows'))} |"
        )
    for sk in data.get("skipped", []):
        out.append(f"| {sk['provider']} | not run: {sk['reason']} | | | | | | |")
    return out


#: Peers whose versions the run labels carry (``benchmarks.labels``).
PEER_LABELS = ("inf_cl", "cut_cross_entropy", "pytorch_metric_learning", "lightly", "open_clip")


def markdown(
    rows: list[Row], meta: dict, max_batch: dict | None = None, note: str = ""
) -> str:
    """The report; ``note``: Markdown set after the header (the run's command, its cases)."""
    lab = meta["labels"]
    device = str(lab.get("device", "unknown device"))
    peers = ", ".join(f"{k} {lab[k]}" for k in PEER_LABELS if lab.get(k))
    head = [
        f"# Benchmarks: {device}, {str(lab.get('date', ''))[:10]}\n",
        (
            f"torch {lab.get('torch')} · triton {lab.get('triton')} · CUDA {lab.get('cuda')} · "
            f"commit `{lab.get('commit')}` · threads {lab.get('threads')} · "
            f"load avg at start {lab.get('load_avg_1m')} · size {', '.join(map(str, meta['sizes']))}\n"
        ),
        *([f"Peers installed: {peers}.\n"] if peers else []),
        *([note.strip() + "\n"] if note.strip() else []),
        (
            "Cells: median time (× our fastest backend at that M) · peak memory above the "
            "inputs (× the same backend's). M = rows of the similarity matrix (NT-Xent: 2N; "
            "CLIP: N). `OOM`: ran out of memory (or one M×M matrix alone exceeds the device).\n"
        ),
        "## Summary\n",
    ]
    parts = head + summary_tables(rows)
    parts += [
        "## Details\n",
        (
            "TFLOP/s use the nominal FLOP model (NT-Xent fwd 2·M²·d, bwd 4·M²·d; CLIP fwd "
            "2·N²·d, bwd 6·N²·d; log_dot at τ = 1 linear, 6·M·d + 12·M·d), the same for every "
            "provider. × floor: time over the physical floor at datasheet rates "
            "(H100/H200 only; fwd+bwd, symmetric design).\n"
        ),
    ]
    parts += detail_table(rows, device) + [""]
    if meta["skipped"]:
        parts += ["## Not run\n"] + skipped_table(meta["skipped"]) + [""]
    if max_batch:
        parts += ["## Largest batch (forward + backward)\n"] + max_batch_table(max_batch) + [""]
    return "\n".join(parts) + "\n"


def plots(rows: list[Row], out_dir: Path) -> list[Path]:
    """``time.png`` and ``memory.png``: one panel per (case, mode), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in _groups(rows) if any(r.ok for r in rows if (r.group, r.mode) == g)]
    written = []
    for name, value, ylabel in (
        ("time.png", lambda r: r.median, "median time (s)"),
        ("memory.png", lambda r: r.peak, "peak memory above inputs (bytes)"),
    ):
        ncols = min(3, max(1, len(groups)))
        nrows = max(1, math.ceil(len(groups) / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
        for ax, (group, mode) in zip(axes.flat, groups):
            sel = [r for r in rows if r.group == group and r.mode == mode and r.ok and value(r)]
            for prov in dict.fromkeys(r.provider for r in sel):
                pts = sorted((r.rows, value(r)) for r in sel if r.provider == prov)
                style = "-" if any(r.kind == "ours" for r in sel if r.provider == prov) else "--"
                ax.plot(*zip(*pts), style, marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{group} · {mode}", fontsize=9)
            ax.set_xlabel("rows M")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(groups) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    ap.add_argument("--max-batch", type=Path, default=None, help="max_batch.py JSON")
    ap.add_argument("--out", type=Path, required=True, help="folder for report.md and plots")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--note", type=Path, default=None, help="Markdown set after the header")
    args = ap.parse_args(argv)
    rows, meta = load(args.json)
    mb = (
        json.loads(args.max_batch.read_text())
        if args.max_batch and args.max_batch.exists()
        else None
    )
    args.out.mkdir(parents=True, exist_ok=True)
    note = args.note.read_text() if args.note else ""
    (args.out / "report.md").write_text(markdown(rows, meta, mb, note))
    written = [] if args.no_plots else plots(rows, args.out)
    print(f"wrote {args.out / 'report.md'}" + "".join(f", {p}" for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
