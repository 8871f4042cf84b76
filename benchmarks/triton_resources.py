"""Compile the Triton kernels offline for sm_90 and read each cubin's resources.

No GPU needed: Triton compiles with its own ptxas and the ``cuobjdump`` its
package carries reads registers, local memory (spills) and shared memory.
Every launch configuration of ``mimac_kernels.triton.configs`` is covered for
the dtypes and feature sizes asked for, so a Triton version that spills where
another did not shows up before any GPU time is spent.

    python -m benchmarks.triton_resources [--dtypes bf16,fp16,fp32] [--dims 64,128,300]
        [--out resources.json]

Must run without ``TRITON_INTERPRET`` (it is removed here before triton loads).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import itertools
import json
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import triton

from mimac_kernels.triton import configs
from mimac_kernels.triton import kernels as K

#: Shared memory per block on sm_90 (227 KiB opt-in).
SM90_SHARED = 227 * 1024
_SCALARS = {"R": "i32", "C": "i32", "D": "i32", "eps": "fp32"}
# (kernel, config function, pointer arguments, extra scalar arguments)
_KERNELS = (
    ("fwd_exp_sums", configs.forward_config,
     ("X", "Y", "INV_TAU", "SHIFT", "ROW_SUM", "COL_SUM"), {"COL_BLOCKS": "i32"}),
    ("lse_finalize", configs.finalize_config,
     ("X", "Y", "INV_TAU", "SHIFT", "SUM", "LSE"), {}),
    ("bwd_rows", configs.backward_config,
     ("X", "Y", "INV_TAU", "LSE_R", "LSE_C", "G_R", "G_C", "CENTER_R", "GSCALE", "DX",
      "TAU_PART"), {"COL_BLOCKS": "i32"}),
)  # fmt: skip


def compile_variants(
    cases: Iterable[tuple[str, int, bool, bool]],
) -> Iterator[tuple[dict, triton.compiler.CompiledKernel]]:
    """Yield ``(description, compiled kernel)`` for each kernel of each case.

    ``cases``: ``(dtype, D, all, log_dot)`` with dtype a Triton element name
    (``bf16``, ``fp16``, ``fp32``). Raises ImportError on a Triton without the
    offline compile API (older than 3.2).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for dt, d, all_pairs, log_dot in cases:
        itemsize = 4 if dt == "fp32" else 2
        for name, cfg_of, pointers, extra in _KERNELS:
            fn = getattr(K, f"{name}_kernel")
            is_bwd = name == "bwd_rows"
            cfg = cfg_of(d, itemsize, log_dot) if is_bwd else cfg_of(d, itemsize)
            consts = {
                "ALL": all_pairs, "LOG_DOT": log_dot, "BLOCK_M": cfg.block_m,
                "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d, "SINGLE_D": cfg.single_d,
                "PREC": "ieee", "DOT_F32": False,
            }  # fmt: skip
            if is_bwd:
                consts["ATOMIC"] = not cfg.single_d
                consts["GRAD_TF32"] = log_dot and dt == "fp16"
            signature = {p: f"*{dt}" if p in ("X", "Y") else "*fp32" for p in pointers}
            signature.update(_SCALARS)
            signature.update(extra)
            signature.update({k: "constexpr" for k in consts})
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=consts),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
            desc = {
                "kernel": name, "dtype": dt, "D": d, "all": all_pairs, "log_dot": log_dot,
                "tile": [cfg.block_m, cfg.block_n, cfg.block_d], "num_warps": cfg.num_warps,
                "num_stages": cfg.num_stages,
            }  # fmt: skip
            yield desc, compiled


def resource_usage(compiled: triton.compiler.CompiledKernel) -> dict[str, int]:
    """Registers, stack and local (spill) bytes from cuobjdump, shared bytes from Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", out, re.DOTALL)
    if found is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    reg, stack, local = (int(g) for g in found.groups())
    return {"registers": reg, "stack": stack, "local": local, "shared": compiled.metadata.shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_resources",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--dims", default="64,128,300")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    bad = sorted(set(dtypes) - {"bf16", "fp16", "fp32"})
    if bad:
        parser.error(f"--dtypes takes bf16, fp16, fp32; got {', '.join(bad)}")
    rows = []
    dims = [int(x) for x in args.dims.split(",")]
    cases = itertools.product(dtypes, dims, (True, False), (False, True))
    for desc, compiled in compile_variants(cases):
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
