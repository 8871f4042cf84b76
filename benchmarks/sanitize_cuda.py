"""A small, complete workout of the CUDA kernels, for compute-sanitizer on a GPU.

    compute-sanitizer --tool racecheck --error-exitcode 1 python -m benchmarks.sanitize_cuda
    (likewise --tool memcheck and --tool synccheck; gpu_check.sh's `sanitize` step)

Every critic x pairing x dtype runs forward and backward at N = 150, D = 200,
H = 2: several CTAs, several D staging chunks and two output slices, partial
tiles at every edge. The shapes are small because the sanitizer slows a kernel
10-100x. The results are checked against float64 too, so a run that the
sanitizer passes is also a correct one. ``--emulated`` runs the same on the
CPU emulation (CI's smoke test of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys

import torch
import torch.nn.functional as F

from mimac_kernels import cuda_backend, reference
from mimac_kernels.testing import emulated_cuda_backend, make_views

CRITICS = ("cosine", "dot", "log_dot")
TAU = {"cosine": 0.1, "dot": 0.5, "log_dot": 0.5}  # log_dot at tau = 1 bypasses the kernels
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def workout(device: torch.device, n: int, d: int, h: int, dtypes: list[str]) -> list[str]:
    """Run every case once; returns the cases whose results miss the float64 reference."""
    bad = []
    for critic, negatives, name in itertools.product(CRITICS, ("all", "cross"), dtypes):
        a, b = make_views((h, n, d), critic, seed=3, device=device, dot_scale=0.3)
        if critic == "cosine":
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        a, b = a.to(DTYPES[name]), b.to(DTYPES[name])
        inv_tau = torch.tensor(1.0 / TAU[critic], device=device)
        row, col = cuda_backend.forward(a, b, inv_tau, critic, negatives, 1e-12)
        g_row = torch.full_like(row, 1.0 / row.shape[1])
        g_col = torch.full_like(col, 1.0 / max(col.shape[1], 1))
        grads = cuda_backend.backward(
            a, b, inv_tau, critic, negatives, 1e-12, row, col, g_row, g_col,
            torch.zeros_like(row), torch.zeros_like(col),
        )  # fmt: skip
        d64 = [t.double() for t in (a, b, inv_tau)]
        r_row, r_col = reference.forward(*d64, critic, negatives, 1e-12)
        r_ga, r_gb, _ = reference.backward(
            *d64, critic, negatives, 1e-12, r_row, r_col, g_row.double(), g_col.double(),
            torch.zeros_like(r_row), torch.zeros_like(r_col),
        )  # fmt: skip
        tol = 1e-4 if name == "float32" else 3e-3
        misses = [
            (row.double() - r_row).abs().max() > tol * (1 + r_row.abs().max()),
            (col.double() - r_col).abs().max() > tol * (1 + r_col.abs().max()) if col.numel() else False,
            (grads[0].double() - r_ga).abs().max() > tol * (1e-12 + r_ga.abs().max()),
            (grads[1].double() - r_gb).abs().max() > tol * (1e-12 + r_gb.abs().max()),
        ]
        status = "MISMATCH" if any(bool(m) for m in misses) else "ok"
        print(f"{critic:8s} {negatives:5s} {name:8s} {status}", flush=True)
        if status != "ok":
            bad.append(f"{critic}/{negatives}/{name}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sanitize_cuda",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--emulated", action="store_true", help="CPU emulation instead of a GPU")
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--d", type=int, default=200)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        parser.error(f"--dtypes takes {', '.join(DTYPES)}; got {', '.join(unknown)}")
    if args.emulated:
        scope, device = emulated_cuda_backend(), torch.device("cpu")
    else:
        why = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float32)
        if why is not None:
            print(f"the cuda backend cannot run here: {why}", file=sys.stderr)
            return 2
        scope, device = contextlib.nullcontext(), torch.device("cuda")
    with scope:
        bad = workout(device, args.n, args.d, args.heads, dtypes)
    print(f"{len(bad)} of {len(CRITICS) * 2 * len(dtypes)} cases miss the float64 reference"
          + (f": {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
