"""What is measured: benchmark cases per size, the FLOP model and the physical bound.

Axis convention: ``rows`` (M) is the number of rows of the similarity matrix.
For ``pairing="all"`` (NT-Xent) the two views have ``N = M / 2`` rows each and
``S`` is ``M x M``; for ``pairing="cross"`` (CLIP) each view has ``N = M`` rows
and ``S`` is ``N x N``. So at equal ``rows`` both pairings touch a matrix of
the same size.

The case lists are not a full cartesian product (that would take hours on a
CPU): each size has a row ladder at a base configuration, then one-factor
variations (D, dtype, pairing, critic) at a few rows. On the GPU the list is in
priority order, so a deadline cuts the least important cases first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

MODES: tuple[str, ...] = ("fwd+bwd", "forward", "backward")
FWD_BWD: tuple[str, ...] = ("fwd+bwd",)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: H100 SXM rates (dense datasheet figures). float32 inputs
#: are bounded by the TF32 tensor-core rate, which is what fast kernels use.
PEAK_MATMUL_FLOPS: dict[str, float] = {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12}
PEAK_EXP_PER_S = 3.9e12  # 16 exp/clock/SM on the special-function units
#: Devices the bound applies to (the H200 has the H100's arithmetic rates).
BOUND_DEVICES = ("H100", "H200")


@dataclass(frozen=True)
class Case:
    """One problem: shape, dtype, critic, temperature and pairing.

    ``modes`` are the timed modes; ``exclude`` names providers left out of this
    case to fit the time budget (never to hide a result: it is listed as a skip).
    ``memory`` says whether peak memory is measured (smoke runs measure it once).
    """

    rows: int
    d: int = 128
    dtype: str = "float32"
    critic: str = "cosine"
    tau: float = 0.1
    pairing: str = "all"
    modes: tuple[str, ...] = FWD_BWD
    exclude: tuple[str, ...] = ()
    memory: bool = True

    @property
    def n(self) -> int:
        """Rows per view."""
        return self.rows // 2 if self.pairing == "all" else self.rows

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def closed_form(self) -> bool:
        """log_dot at tau = 1 takes the exact linear-time path in our op."""
        return self.critic == "log_dot" and self.tau == 1.0

    @property
    def group(self) -> str:
        """Everything but the rows: one line per provider in a plot."""
        return f"{self.pairing}-{self.critic}-tau{self.tau:g}-{self.dtype}-d{self.d}"

    @property
    def id(self) -> str:
        return f"{self.group}-M{self.rows}"

    def with_rows(self, rows: int) -> Case:
        return dataclasses.replace(self, rows=rows)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "d": self.d,
            "dtype": self.dtype,
            "critic": self.critic,
            "tau": self.tau,
            "pairing": self.pairing,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(**{k: d[k] for k in ("rows", "d", "dtype", "critic", "tau", "pairing")})


def flop_model(pairing: str, critic: str, tau: float, rows: int, d: int, mode: str) -> float:
    """Nominal FLOPs of one call, the same for every provider.

    Quadratic (recompute design): ``all`` 2 M^2 d forward + 4 M^2 d backward
    (6 M^2 d); ``cross`` 2 N^2 d + 6 N^2 d (8 N^2 d). log_dot at tau = 1 is the
    closed form, linear: ~6 M d forward + 12 M d backward.
    """
    fwd, bwd = (
        (6.0 * rows * d, 12.0 * rows * d)
        if critic == "log_dot" and tau == 1.0
        else (
            (2.0 * rows * rows * d, 4.0 * rows * rows * d)
            if pairing == "all"
            else (2.0 * rows * rows * d, 6.0 * rows * rows * d)
        )
    )
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def bound_seconds(
    pairing: str, critic: str, tau: float, rows: int, d: int, dtype: str, mode: str
) -> float | None:
    """The physical floor of forward + backward on an H100/H200, at datasheet rates.

    Uses the symmetric design: ``all`` 4 M^2 d FLOP and M^2 exp, ``cross``
    8 N^2 d FLOP and 2 N^2 exp; matrix and exp units overlapped (max, not sum).
    ``None`` where no bound is defined (single modes, the linear closed form).
    """
    if mode != "fwd+bwd" or (critic == "log_dot" and tau == 1.0):
        return None
    flops, exps = symmetric_work(pairing, rows, d)
    return max(flops / PEAK_MATMUL_FLOPS[dtype], exps / PEAK_EXP_PER_S)


def symmetric_work(pairing: str, rows: int, d: int) -> tuple[float, float]:
    """(FLOP, exp) of forward + backward in the symmetric recompute design.

    ``all``: 4 M^2 d FLOP and M^2 exp (each unordered pair once); ``cross``:
    8 N^2 d FLOP and 2 N^2 exp (docs/losses.md, "Symmetry saves work").
    """
    if pairing == "all":
        return 4.0 * rows * rows * d, 1.0 * rows * rows
    return 8.0 * rows * rows * d, 2.0 * rows * rows


def _ladder(base: Case, rows: list[int], **changes) -> list[Case]:
    return [dataclasses.replace(base, rows=m, **changes) for m in rows]


def smoke_cases() -> list[Case]:
    """Every provider, mode and variant once at a tiny size (CI; < 2 minutes)."""
    base = Case(rows=64, d=32, modes=MODES)
    no_compile = ("compile",)  # one compile (base case) is enough to exercise it
    return [
        base,
        Case(rows=64, d=32, pairing="cross", exclude=no_compile, memory=False),
        Case(rows=64, d=32, dtype="bfloat16", exclude=no_compile, memory=False),
        Case(rows=64, d=32, critic="log_dot", tau=1.0, exclude=no_compile, memory=False),
        Case(rows=64, d=32, critic="log_dot", tau=0.5, exclude=no_compile, memory=False),
    ]


def cpu_cases() -> list[Case]:
    """CPU: row ladder to 16,384 at float32 / d = 128 / cosine, then variations.

    Sized for ~15 minutes on a 2-core machine shared with other work (eager
    forward+backward at M = 16,384 alone takes 14-23 s per call there; the
    variations at 8,192 rows doubled the run, so they stop at 4,096).
    """
    base = Case(rows=1024)
    cases = _ladder(base, [1024, 2048])
    cases += _ladder(base, [4096], modes=MODES)
    cases += _ladder(base, [8192, 16384])
    for change in (
        {"d": 512},
        {"dtype": "bfloat16"},
        {"pairing": "cross"},
        {"critic": "log_dot", "tau": 1.0},
        {"critic": "log_dot", "tau": 0.5},
    ):
        cases += _ladder(base, [2048, 4096], **change)
    return cases


def gpu_cases() -> list[Case]:
    """GPU, in priority order: the headline bf16 / d = 128 NT-Xent points first.

    torch.compile recompiles per shape (tens of seconds each), so it runs on the
    headline ladder and one point per variation only.
    """
    base = Case(rows=32768, dtype="bfloat16")
    nc = ("compile",)
    cases = _ladder(base, [32768, 65536], modes=MODES)
    cases += _ladder(base, [8192, 16384, 131072])
    cases += _ladder(base, [4096, 262144], exclude=nc)
    cases += _ladder(base, [32768], pairing="cross")
    cases += _ladder(base, [8192, 65536, 131072], pairing="cross", exclude=nc)
    cases += _ladder(base, [32768], dtype="float32")
    cases += _ladder(base, [8192, 65536], dtype="float32", exclude=nc)
    cases += _ladder(base, [65536], d=512)
    cases += _ladder(base, [16384, 131072], d=512, exclude=nc)
    cases += _ladder(base, [32768, 262144], critic="log_dot", tau=1.0, exclude=nc)
    cases += _ladder(base, [32768], critic="log_dot", tau=0.5)
    cases += _ladder(base, [131072], critic="log_dot", tau=0.5, exclude=nc)
    cases += _ladder(base, [8192, 131072], modes=("forward", "backward"), exclude=nc)
    return cases


SIZES = {"smoke": smoke_cases, "cpu": cpu_cases, "gpu": gpu_cases}
