"""Static cost model of the Triton kernels on an H100 SXM, from their compiled sm_90 SASS.

An *estimate*, never a measurement. For each launch the runtime makes for a
case (``triton_launches.launch_plan``: its tiles, warps, stages, grid and the
JIT's divisibility specialisation), the kernel is compiled for sm_90, its hot
loop found in the SASS (``sass_counts``) and counted per column tile: issue
slots, ``MUFU`` (``EX2``), tensor-core multiply-adds by instruction shape,
shared-memory and global bytes, atomics. One tile then costs the largest of

- issue: warp instructions / 4 per clock (one scheduler per SM sub-partition);
- SFU: MUFU lanes / 16 per clock (``exp2`` and every other MUFU op);
- tensor: 2 x MACs / (dense bf16 rate / 132 SMs);
- shared memory: bytes / 128 per clock (32 banks x 4 bytes);
- L2: global loads, stores and reductions / (L2 bandwidth / 132 SMs);
- atomics: global float32 reductions / (atomic rate / 132 SMs);
- DRAM: the same bytes at the HBM rate / 132, only when the launch's streamed
  working set does not fit in L2 (:func:`working_set_bytes`);

(the L2 and atomic rates are derived figures, see ``sm90_rates``) and a program
costs its tiles plus its instructions outside the loop (issue only). Programs
are dealt to ``SMs x CTAs-per-SM`` slots in launch order, each slot running at
``1 / CTAs-per-SM`` of its SM; a launch lasts until its last slot is done, and
at least its DRAM traffic at the HBM rate: inputs read and outputs written once,
plus the column operand once more per wave of resident programs when it does
not stay in L2 (:func:`dram_bytes`). The case is the sum of its launches. The floor (``sm90_rates.floor``, the symmetric
design of design/performance.md) over the estimate is the share of the floor.

Tiles per hot-loop iteration come from the MACs (a whole number of tiles; the
rest is reported as redundant tensor work), so a loop whose every GEMM is
issued twice would read as unrolled twice: the tests pin the real kernels at
one tile per iteration.

The model sees no latency: dependency stalls, barriers, L2 latency and
contention, the far L2 partition, launch gaps and clocks under load all make
real kernels slower, so a kernel that only reaches a target here has not reached it.

    python -m benchmarks.static_cost --out benchmarks/results/<date>-static-sm90

writes the Triton estimate and, where ``nvcc`` is found, the CUDA C++ backend's
(``benchmarks.cuda_cost``: the same cases and model on ``nvcc``'s sm_90a SASS).
"""

from __future__ import annotations

from benchmarks import sm90_compile  # noqa: F401  (drops TRITON_INTERPRET before triton loads)

# isort: split

import argparse
import json
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

from benchmarks import cuda_cost, sass_counts, sm90_rates, static_cases
from benchmarks.sm90_compile import compile_kernel, resource_usage, sass, warps_per_cta
from benchmarks.sm90_rates import (
    H100,
    Profile,
    Rates,
    ctas_per_sm,
    launch_estimate,
    operand_rereads,
)
from benchmarks.static_cases import CASES, StaticCase
from benchmarks.triton_launches import ELEMENT, Launch, launch_plan, tiles_per_program
from mimac_kernels.triton import kernels as K
from mimac_kernels.triton.backend import shift_from_bound


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_macs(launch: Launch) -> int:
    """Tensor-core MACs one column tile of ``launch`` needs (D padded to whole BLOCK_D steps):
    one GEMM for the scores, a second for the gradient in ``bwd`` (one ``slice_d`` slice
    of it where the backward splits D over programs)."""
    cfg = launch.cfg
    padded = cfg.block_d * _cdiv(launch.d, cfg.block_d)
    grad = (cfg.grad_d if cfg.single_d else padded) if launch.kind == "bwd" else 0
    return cfg.block_m * cfg.block_n * (padded + grad)


def profile(launch: Launch, one_pass: bool = True) -> Profile:
    """Compile ``launch`` for sm_90 and count its hot loop per column tile.

    The hot loop is the top-level loop holding the tensor-core work. The backward
    has two such loops over the interior tiles with the same tensor work: one
    exponential per element (taken when every statistic of the head lay in the
    forward's window, ``one_pass``) and two (otherwise); the one with fewer
    (``one_pass``) or more ``MUFU.EX2`` is taken. Inner loops
    (the D chunks when D is wider than one register tile) run ``ceil(D / BLOCK_D)``
    times, as in the source. The counts are divided by the iteration's share of
    tiles, the whole number of :func:`tile_macs` in its MACs (ptxas may unroll);
    MACs beyond that are redundant work and are reported, and fewer MACs than one
    tile is an error.
    """
    cfg = launch.cfg
    compiled = compile_kernel(launch.fn, launch.args, cfg.num_warps, cfg.num_stages)
    instrs = sass_counts.parse(sass(compiled))
    loops = sass_counts.find_loops(instrs)
    trips = _cdiv(launch.d, cfg.block_d)
    best, best_key, best_counts = None, (0, 0), None
    for lp in loops:
        counts = sass_counts.iteration_counts(instrs, lp, [trips] * len(lp.inner))
        key = (counts.macs_per_cta(cfg.num_warps), -counts.ex2 if one_pass else counts.ex2)
        if key[0] > 0 and key > best_key:
            best, best_key, best_counts = lp, key, counts
    best_macs = best_key[0]
    if best is None:
        raise RuntimeError(f"{launch.name}: no loop with tensor-core work in its SASS")
    # Tiles per iteration: ptxas may unroll a loop. A remainder is redundant tensor work
    # (the bwd at 64-row tiles and 8 warps has both warpgroups compute the score GEMM).
    unroll = best_macs // tile_macs(launch)
    if unroll < 1:
        raise RuntimeError(f"{launch.name}: hot loop does {best_macs} MACs per iteration, "
                           f"less than one {tile_macs(launch)}-MAC tile")  # fmt: skip
    redundancy = best_macs / (unroll * tile_macs(launch))
    per = best_counts.to_dict(cfg.num_warps)
    per_tile = {k: (v / unroll if isinstance(v, int) else {s: c / unroll for s, c in v.items()})
                for k, v in per.items()}  # fmt: skip
    res = resource_usage(compiled)
    # Once per program: everything outside the hot loop, other loops' bodies once each.
    outside = sass_counts.outside_counts(instrs, [best]).issue
    return Profile(launch.name, res, warps_per_cta(compiled.asm["ttgir"]),
                   ctas_per_sm(res["registers"], res["shared"], cfg.num_warps), unroll,
                   redundancy, per_tile, outside)  # fmt: skip


def compulsory_bytes(launch: Launch) -> int:
    """DRAM bytes a launch cannot avoid: its inputs read once, its outputs written once."""
    size = ELEMENT[launch.args["X"].dtype]
    r, c, d = launch.rows, launch.cols, launch.d
    inputs = (r + (0 if launch.all_pairs else c)) * d * size
    if launch.kind == "bwd":
        return inputs + r * d * 4 + 4 * 4 * r  # dX float32, statistics
    return inputs + 2 * 4 * (r + c)  # sums / log-sum-exps


def working_set_bytes(launch: Launch, slots: int) -> int:
    """Bytes the resident programs of ``launch`` keep touching while they run: each of
    the ``slots`` programs its row panel (``BLOCK_M x D`` inputs, plus ``BLOCK_M x D``
    float32 when the tile's gradient is added by atomics into its rows), and the column
    panel they all sweep in step (``BLOCK_N x D``).

    The assumption behind the L2 bound: programs that start together walk the column
    tiles in the same order, so a column panel is fetched from DRAM once and then hit
    by the others; the tiles' global traffic is served by L2 when this fits in L2 and
    goes to DRAM in full when it does not (LRU thrashes on a cyclic working set larger
    than the cache).
    """
    size = ELEMENT[launch.args["X"].dtype]
    cfg, d = launch.cfg, launch.d
    atomic_rows = 4 if launch.kind == "bwd" and launch.args.get("SINGLE_D") is False else 0
    return slots * cfg.block_m * d * (size + atomic_rows) + cfg.block_n * d * size


def dram_bytes(launch: Launch, programs: int, slots: int, rates: Rates = H100) -> int:
    """DRAM bytes of a launch: :func:`compulsory_bytes`, and the column operand read once
    more for every further wave of ``slots`` resident programs when it does not fit in
    L2 beside the resident row panels (each wave sweeps it from the start)."""
    size = ELEMENT[launch.args["X"].dtype]
    operand = launch.cols * launch.d * size
    resident = working_set_bytes(launch, slots) - launch.cfg.block_n * launch.d * size
    return compulsory_bytes(launch) + operand_rereads(operand, resident, programs, slots, rates)


def estimate_launch(launch: Launch, prof: Profile, resweep_blocks: int = 0,
                    rates: Rates = H100) -> dict:  # fmt: skip
    """Seconds of one launch and what bounds it (``sm90_rates.launch_estimate``)."""
    tiles = tiles_per_program(launch, resweep_blocks)
    slots = rates.sms * max(prof.ctas_per_sm, 1)
    ws = working_set_bytes(launch, slots)
    dram = dram_bytes(launch, sum(1 for n in tiles if n), slots, rates)
    est = launch_estimate(prof, launch.cfg.num_warps, tiles, ws, dram,
                          launch.cfg.block_m * launch.cfg.block_n, rates)  # fmt: skip
    return {"kernel": launch.name, "grid": list(launch.grid), **est}


#: Cases the current runtime cannot launch, and why (listed in the results).
NOT_MODELLED: dict[str, str] = {}


def floor(case: StaticCase, rates: Rates = H100) -> dict:
    """Physical floor of ``case``'s forward + backward (``sm90_rates.floor``)."""
    return sm90_rates.floor(case.pairing, case.rows, case.d, rates, cols=case.cols,
                            columns_grad=case.columns_grad)


def resweep_fraction(case: StaticCase, block_m: int) -> dict:
    """Estimated share of row blocks the finalize kernel re-sweeps
    (``static_cases.resweep_fraction`` with the Triton runtime's shift and window)."""
    window = (K.UNDERFLOW.value, K.OVERFLOW.value)
    return static_cases.resweep_fraction(case, block_m, shift_from_bound, window)


def estimate_case(case: StaticCase, rates: Rates = H100, cache: dict | None = None) -> dict:
    """Forward + backward estimate of ``case``: per launch and in total, with the floor."""
    cache = {} if cache is None else cache
    plan = launch_plan(case.pairing, case.n, case.d, case.dtype, sms=rates.sms,
                       cols=case.cols or None, offset=case.offset,
                       columns_grad=case.columns_grad, labels=case.labels)  # fmt: skip
    fin_cfg = next(lc.cfg for lc in plan if lc.kind == "finalize")
    frac = resweep_fraction(case, fin_cfg.block_m)
    sides = iter(["rows", "cols"])
    launches, profiles = [], {}
    for lc in plan:
        key = (lc.name, tuple(sorted((k, repr(v)) for k, v in lc.args.items())))
        # Every statistic in the forward's window (no re-sweep): the one-pass loop.
        one_pass = not any(side["rows"] for side in frac.values())
        key = (*key, one_pass)
        if key not in cache:
            cache[key] = profile(lc, one_pass)
        prof = cache[key]
        profiles[lc.kind] = prof
        resweep = 0
        if lc.kind == "finalize":
            resweep = round(frac[next(sides)]["blocks"] * lc.grid[0])
        est = estimate_launch(lc, prof, resweep, rates)
        est.update({"kind": lc.kind, "resweep_blocks": resweep,
                    "config": asdict(lc.cfg), "col_blocks": lc.col_blocks})  # fmt: skip
        launches.append(est)
    total = sum(e["seconds"] for e in launches)
    top = max(launches, key=lambda e: e["seconds"])
    fl = floor(case, rates)
    return {
        "case": asdict(case), "estimate_ms": total * 1e3, "floor_ms": fl["seconds"] * 1e3,
        "floor": fl, "share_of_floor": fl["seconds"] / total,
        "binding": f"{top['binding']} ({top['kind']})", "launches": launches,
        "resweep_fraction_estimated": frac,
        "profiles": {k: {**asdict(p), "num_warps": next(lc.cfg.num_warps for lc in plan
                                                         if lc.kind == k)}
                     for k, p in profiles.items()},
    }  # fmt: skip


def _shapes(*counters: dict) -> str:
    """``8 x 64x128x16 HGMMA`` etc. for the tensor-core shapes of the counters."""
    parts = [f"{v:g} x {k} {name}" for name, c in zip(("HGMMA", "HMMA"), counters)
             for k, v in c.items()]  # fmt: skip
    return ", ".join(parts) or "-"


def markdown(results: list[dict], meta: dict) -> str:
    """The results as Markdown tables, labelled as a static estimate."""
    lines = [
        f"# Static estimate (not a measurement): sm_90 SASS from triton {meta['triton']}",
        "",
        f"`python -m benchmarks.static_cost` ({meta['date']}). H100 SXM rates with their",
        "sources in `benchmarks/sm90_rates.py`. Forward + backward, bf16, one head. Every",
        "figure is an *estimate* from instruction counts and the L2/atomic/DRAM traffic they",
        "imply: the model sees no latency, stalls or atomic contention, so real kernels will",
        "be slower.",
        "",
        "| case | estimated ms | floor ms | share of floor | binding bound (launch) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(f"| {r['case']['name']} | {r['estimate_ms']:.2f} | {r['floor_ms']:.2f} | "
                     f"{100 * r['share_of_floor']:.0f} % | {r['binding']} |")  # fmt: skip
    lines += [
        "",
        (
            "Per launch: tile bounds in microseconds per column tile on one SM (L2 at "
            f"{meta['rates']['l2_bytes_per_s'] / 1e12:.2f} TB/s and atomics at "
            f"{meta['rates']['atomic_bytes_per_s'] / 1e12:.2f} TB/s, both derived; DRAM "
            "only when the working set exceeds L2), balance = share of SM time the "
            "schedule keeps busy, working set = resident row panels (and their atomic "
            "targets) plus the swept column panel."
        ),
        "",
        "| case | kernel | grid | tiles | issue | SFU | tensor | shared | L2 | atomics "
        + "| DRAM | binding | balance | L2 TB/s to keep up | working set / L2 | ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for e in r["launches"]:
            t = e["tile_us"]
            lines.append(
                f"| {r['case']['name']} | {e['kind']} | {'x'.join(map(str, e['grid']))} | "
                f"{e['tiles']} | {t['issue']:.3f} | {t['sfu']:.3f} | {t['tensor']:.3f} | "
                f"{t['shared']:.3f} | {t['l2']:.3f} | {t['atomics']:.3f} | {t['dram']:.3f} | "
                f"{e['binding']} | {100 * e['balance']:.0f} % | "
                f"{e['l2_break_even_tb_s']:.1f} | {100 * e['working_set_share_of_l2']:.0f} % | "
                f"{1e3 * e['seconds']:.3f} |"
            )
    lines += [
        "",
        (
            "Hot loop per useful score element (whole CTA; tensor-core instructions per "
            "tile and warp), and resources:"
        ),
        "",
        "| case | kernel | tile (M x N x D step), warps, stages | issue slots | EX2 | "
        + "MACs (issued / useful) | tensor instructions per warp | atomic B | regs | "
        + "spill B | shared B | warpsPerCTA | CTAs/SM |",
        "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        seen = set()
        for e in r["launches"]:
            if e["kind"] in seen:
                continue
            seen.add(e["kind"])
            p, pe, c = r["profiles"][e["kind"]], e["per_element"], e["config"]
            res = p["resources"]
            lines.append(
                f"| {r['case']['name']} | {e['kind']} | {c['block_m']} x {c['block_n']} x "
                f"{c['block_d']}, {c['num_warps']}, {c['num_stages']} | "
                f"{pe['issue_slots']:.3f} | {pe['mufu_ex2']:.2f} | {pe['tensor_macs']:.0f} "
                f"({p['tensor_redundancy']:.2f}x) | "
                f"{_shapes(p['per_tile']['hgmma'], p['per_tile']['hmma'])} | "
                f"{pe['atomic_bytes']:.3f} | {res['registers']} | {res['local']} | "
                f"{res['shared']} | {p['warps_per_cta']} | {p['ctas_per_sm']} |"
            )
    lines += [
        "",
        (
            "Where the issue slots of a tile go (whole CTA, per useful element, top 8 "
            "opcode families):"
        ),
        "",
    ]
    for r in results:
        for kind, p in r["profiles"].items():
            e = next(x for x in r["launches"] if x["kind"] == kind)
            elements = e["config"]["block_m"] * e["config"]["block_n"]
            top = list(p["per_tile"]["opcodes"].items())[:8]
            lines.append(f"- {r['case']['name']}, {kind}: " + ", ".join(
                f"{op} {v * p['num_warps'] / elements:.3f}" for op, v in top))  # fmt: skip
    lines += static_cases.resweep_lines(results, "finalize")
    if NOT_MODELLED:
        lines += ["", "Not modelled:", ""]
        lines += [f"- {k}: {v}." for k, v in NOT_MODELLED.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static_cost",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for estimate.json and estimate.md")
    parser.add_argument("--cases", help="comma-separated indices into CASES (default: all)")
    parser.add_argument("--backends", default="triton,cuda",
                        help="triton, cuda or both (default); cuda needs nvcc and writes "
                             "estimate-cuda-nvccX.json/.md beside Triton's")  # fmt: skip
    args = parser.parse_args(argv)
    picks = range(len(CASES)) if not args.cases else [int(x) for x in args.cases.split(",")]
    backends = set(args.backends.split(","))
    if not backends or backends - {"triton", "cuda"}:
        parser.error(f"--backends takes triton and/or cuda, got {args.backends!r}")
    if "cuda" in backends and cuda_cost.cuda_compile.find_nvcc() is None:
        print("cuda: skipped, nvcc not found (no CUDA toolkit)", flush=True)
    elif "cuda" in backends:
        # The CUDA C++ kernels (benchmarks.cuda_cost): same cases, model and rates.
        for r in cuda_cost.run([CASES[i] for i in picks], args.out):
            print(cuda_cost.summary_line(r), flush=True)
    if "triton" not in backends:
        return 0
    cache: dict = {}
    results = []
    for i in picks:
        r = estimate_case(CASES[i], cache=cache)
        results.append(r)
        print(f"{r['case']['name']}: estimated {r['estimate_ms']:.2f} ms, floor "
              f"{r['floor_ms']:.2f} ms ({100 * r['share_of_floor']:.0f} %), "
              f"binding {r['binding']}", flush=True)  # fmt: skip
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "target": "sm_90 (offline, no GPU)",
            "kind": "static estimate, not a measurement", "rates": asdict(H100)}  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = f"triton{triton.__version__}"
        doc = {"meta": meta, "results": results, "not_modelled": NOT_MODELLED}
        (args.out / f"estimate-{tag}.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / f"estimate-{tag}.md").write_text(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
