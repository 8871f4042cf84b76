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

from mimac_kernels import cuda_backend
from mimac_kernels.options import CRITICS, KERNEL_DTYPES, NEGATIVES
from tests.kernels.accuracy import kernel_case, kernel_level_errors, weight_eps
from tests.kernels.emulation import emulated_cuda_backend

DTYPES = {str(dt).removeprefix("torch."): dt for dt in KERNEL_DTYPES}


def workout(device: torch.device, n: int, d: int, h: int, dtypes: list[str]) -> list[str]:
    """Run every case once; returns the cases whose results miss the float64 reference."""
    bad = []
    for critic, negatives, name in itertools.product(CRITICS, NEGATIVES, dtypes):
        case = kernel_case((h, n, d), critic, negatives, DTYPES[name], device, seed=3)
        errors = kernel_level_errors(cuda_backend, case, weight_eps("cuda", DTYPES[name]))
        print(f"{critic:8s} {negatives:5s} {name:8s} {'; '.join(errors) or 'ok'}", flush=True)
        if errors:
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
        why = cuda_backend.probe(torch.device("cuda"), torch.float32)
        if why is not None:
            print(f"the cuda backend cannot run here: {why}", file=sys.stderr)
            return 2
        scope, device = contextlib.nullcontext(), torch.device("cuda")
    with scope:
        bad = workout(device, args.n, args.d, args.heads, dtypes)
    print(f"{len(bad)} of {len(CRITICS) * len(NEGATIVES) * len(dtypes)} cases miss the float64 reference"
          + (f": {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
