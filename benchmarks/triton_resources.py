"""Compile the Triton kernels offline for sm_90 and read each cubin's resources.

No GPU needed: Triton compiles with its own ptxas and the ``cuobjdump`` its
package carries reads registers, local memory (spills) and shared memory.
Every kernel the runtime launches (``triton_launches.launch_plan``: its tiles,
warps, stages and column split) is compiled for the dtypes and feature sizes
asked for, with the JIT's specialisation (``sm90_compile.specialise``: the
``tt.divisibility=16`` hints on aligned pointers and on sizes that are
multiples of 16), so the table is the variant that runs, at ``--rows`` rows.

    python -m benchmarks.triton_resources [--dtypes bf16,fp16,fp32] [--dims 64,128,300]
        [--rows 65536] [--out resources.json]

Must run without ``TRITON_INTERPRET`` (``sm90_compile`` removes it before triton loads).
"""

from __future__ import annotations

from benchmarks import sm90_compile  # noqa: F401  (drops TRITON_INTERPRET before triton loads)

# isort: split


import argparse
import itertools
import json
import platform
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import triton

from benchmarks.sm90_compile import SM90_SHARED, compile_kernel, resource_usage
from benchmarks.triton_launches import launch_plan

__all__ = ["SM90_SHARED", "compile_variants", "resource_usage"]

#: Rows of S the launches are specialised for when no size is given.
DEFAULT_ROWS = 65536


def compile_variants(
    cases: Iterable[tuple[str, int, bool, bool]], rows: int = DEFAULT_ROWS
) -> Iterator[tuple[dict, triton.compiler.CompiledKernel]]:
    """Yield ``(description, compiled kernel)`` for each kernel of each case.

    ``cases``: ``(dtype, D, all, log_dot)`` with dtype a Triton element name
    (``bf16``, ``fp16``, ``fp32``); ``rows``: rows of S (``all``: 2N). Each kernel
    is compiled once per case (cross's second finalize and backward launches
    are the same kernel). Raises ImportError on a Triton without the offline
    compile API this needs (older than 3.3).
    """
    for dt, d, all_pairs, log_dot in cases:
        n = rows // 2 if all_pairs else rows
        seen = set()
        for lc in launch_plan("all" if all_pairs else "cross", n, d, dt, log_dot):
            if lc.kind in seen:
                continue
            seen.add(lc.kind)
            cfg = lc.cfg
            compiled = compile_kernel(lc.fn, lc.args, cfg.num_warps, cfg.num_stages)
            desc = {
                "kernel": lc.name.removesuffix("_kernel"), "dtype": dt, "D": d, "all": all_pairs,
                "log_dot": log_dot, "tile": [cfg.block_m, cfg.block_n, cfg.block_d],
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "rows": rows,
            }  # fmt: skip
            yield desc, compiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_resources",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--dims", default="64,128,300")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                        help="rows of S the launches are specialised for (all: 2N)")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    bad = sorted(set(dtypes) - {"bf16", "fp16", "fp32"})
    if bad:
        parser.error(f"--dtypes takes bf16, fp16, fp32; got {', '.join(bad)}")
    rows = []
    dims = [int(x) for x in args.dims.split(",")]
    cases = itertools.product(dtypes, dims, (True, False), (False, True))
    for desc, compiled in compile_variants(cases, args.rows):
        row = {**desc, **resource_usage(compiled)}
        rows.append(row)
        print(
            f"{row['kernel']:13s} {row['dtype']} D={row['D']:<4d} all={row['all']:d} "
            f"log_dot={row['log_dot']:d} tile={'x'.join(map(str, row['tile']))} "
            f"regs={row['registers']} local={row['local']} shared={row['shared']}",
            flush=True,
        )
    spilling = [r for r in rows if r["local"] > 0]
    too_big = [r for r in rows if r["shared"] > SM90_SHARED]
    print(f"{len(rows)} kernels, {len(spilling)} with register spills, "
          f"{len(too_big)} needing more than {SM90_SHARED} B of shared memory")
    if args.out:
        import torch

        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "triton": triton.__version__, "torch": torch.__version__,
                "python": platform.python_version(), "target": "sm_90 (offline, no GPU)"}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 1 if too_big else 0


if __name__ == "__main__":
    raise SystemExit(main())
