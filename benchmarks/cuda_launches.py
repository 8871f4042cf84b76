"""The kernel launches the CUDA C++ backend makes for one problem, rebuilt offline.

:func:`launch_plan` mirrors the host code of ``csrc/cuda/contrastive_kernels.cu``
(``mimac_lse_forward`` / ``mimac_lse_backward`` and their ``forward_pass``,
``backward_pass``, ``grid_for``), which ``csrc/cuda/binding.cpp`` calls once per
forward and once per backward: which kernel template (``fast_path``: the fast
variant for D a multiple of one 16-byte vector with the resident X within its
limit; the inputs are taken as 16-byte aligned, as torch allocates them), in which
order, with which grid and dynamic shared memory. The constants (``BM``, ``BN``, ``DO``, shared
bytes) come from the source through ``cuda_compile.kernel_constants``. When the
launchers change, this function is what to re-point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Bytes per element of the launcher's input dtypes.
ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Critic ids of contrastive_kernels.h (cosine runs the dot kernel: unit rows).
CRITICS = {"dot": 0, "cosine": 1, "log_dot": 2}
KERNELS = {"fwd": "lse_forward_kernel", "bwd": "lse_backward_kernel"}


@dataclass(frozen=True)
class CudaLaunch:
    """One kernel launch of the CUDA backend.

    ``kind``: ``fwd`` (row log-sum-exps) or ``bwd`` (gradient rows of one operand);
    ``dtype``/``critic``/``split``/``fast``: the template arguments (``split``: the
    backward's 3xTF32 flag, ``None`` for the forward; ``fast``: 16-byte vector staging
    with the CTA's X rows resident, else the general element-wise staging); ``rows``/``cols``: R and C of S for this
    pass; ``side``: which rows the pass produces (``Z``, ``a`` or ``b``). ``one_exp``
    (backward only): the data put every tile of the pass in the one-exponential form's
    window (see :func:`one_exp_eligible`; the plan leaves it False, the estimate sets it
    from the case's data).
    """

    kind: str
    dtype: str
    critic: int
    split: bool | None
    grid: tuple[int, int, int]
    smem: int
    rows: int
    cols: int
    d: int
    all_pairs: bool
    side: str
    consts: dict = field(repr=False, compare=False)
    fast: bool = True
    one_exp: bool = False

    @property
    def kernel(self) -> str:
        return KERNELS[self.kind]

    @property
    def name(self) -> str:
        split = "" if self.split is None else f", {str(self.split).lower()}"
        return f"{self.kernel}<{self.dtype}, {self.critic}{split}, {str(self.fast).lower()}>"

    @property
    def num_warps(self) -> int:
        return self.consts["NT"] // 32

    @property
    def d_slices(self) -> int:
        """Programs per row block: the backward's D slices of ``DO`` columns (grid.y)."""
        return self.grid[1]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fast_path(d: int, dtype: str, consts: dict) -> bool:
    """Whether the launchers pick the fast kernels (``fast_path`` in the source) for
    16-byte aligned inputs of width ``d``: whole 16-byte vectors per row and the
    CTA's resident X rows (``BM x ceil(D / KC) * KC`` plus padding) within its limit."""
    fast = consts["fast"][dtype]
    return d % fast["vec"] == 0 and x_bytes(d, dtype, consts) <= consts["x_resident_max"]


def x_bytes(d: int, dtype: str, consts: dict) -> int:
    """Shared bytes of the fast path's resident X (``x_bytes`` in the source)."""
    ld = _cdiv(d, consts["KC"]) * consts["KC"] + consts["fast"][dtype]["x_pad"]
    return _cdiv(consts["BM"] * ld * ELEMENT[dtype], 128) * 128


def smem(kind: str, d: int, dtype: str, consts: dict) -> int:
    """Dynamic shared memory of a ``fwd``/``bwd`` launch at width ``d`` (``fwd_smem`` /
    ``bwd_smem`` of the kernel variant the launchers pick)."""
    if not fast_path(d, dtype, consts):
        return consts[f"{kind}_smem"][dtype]
    return consts["fast"][dtype][f"{kind}_base"] + x_bytes(d, dtype, consts)


def launch_plan(pairing: str, n: int, d: int, consts: dict, dtype: str = "bf16",
                critic: str = "dot", heads: int = 1, cols: int = 0,
                columns_grad: bool = True) -> list[CudaLaunch]:  # fmt: skip
    """The launches of one forward + backward, in order.

    ``pairing``: ``all`` (NT-Xent: rows and columns are ``Z = [a; b]``, ``2n`` of them,
    one pass each way), ``cross`` (CLIP: ``n`` x ``n``; the forward runs rows a,
    then rows b for the column log-sum-exp, and the backward dA then dB) or ``rect``
    (``mimac_rect_forward`` / ``mimac_rect_backward``, without the dY pass where not
    ``columns_grad``: ``n`` rows x against ``cols``
    columns y; one forward, then dX and dY, y's rows against x).
    ``consts``: ``cuda_compile.kernel_constants()``.
    """
    if pairing not in ("all", "cross", "rect"):
        raise ValueError(f"pairing must be 'all', 'cross' or 'rect', got {pairing!r}")
    if pairing == "rect" and cols < 1:
        raise ValueError(f"rect needs cols >= 1 columns, got cols={cols}")
    if dtype not in ELEMENT:
        raise ValueError(f"dtype must be one of {sorted(ELEMENT)}, got {dtype!r}")
    if critic not in CRITICS:
        raise ValueError(f"critic must be one of {sorted(CRITICS)}, got {critic!r}")
    if n < 1 or d < 1 or not 1 <= heads <= 65535:
        raise ValueError(f"n, d and heads must be positive (heads <= 65535), got "
                         f"n={n}, d={d}, heads={heads}")  # fmt: skip
    all_pairs = pairing == "all"
    m = 2 * n if all_pairs else n
    kernel_critic = CRITICS["log_dot"] if critic == "log_dot" else CRITICS["dot"]
    if pairing == "rect":
        plan = _rect_plan(n, cols, d, consts, dtype, kernel_critic, heads)
        return plan if columns_grad else plan[:2]  # no dY pass for a detached queue
    rows = _cdiv(m, consts["BM"])
    common = {"dtype": dtype, "critic": kernel_critic, "rows": m, "cols": m, "d": d,
              "all_pairs": all_pairs, "consts": consts,
              "fast": fast_path(d, dtype, consts)}  # fmt: skip
    sides = ("Z",) if all_pairs else ("a", "b")
    fwd = [CudaLaunch("fwd", split=None, grid=(rows, 1, heads),
                      smem=smem("fwd", d, dtype, consts), side=s, **common)
           for s in sides]  # fmt: skip
    slices = _cdiv(d, consts["DO"])
    bwd = [CudaLaunch("bwd", split=ELEMENT[dtype] == 4, grid=(rows, slices, heads),
                      smem=smem("bwd", d, dtype, consts), side=s, **common)
           for s in sides]  # fmt: skip
    return fwd + bwd


def _rect_plan(r: int, c: int, d: int, consts: dict, dtype: str, critic: int,
               heads: int) -> list[CudaLaunch]:  # fmt: skip
    common = {"dtype": dtype, "critic": critic, "d": d, "all_pairs": False, "consts": consts,
              "fast": fast_path(d, dtype, consts)}  # fmt: skip
    slices = _cdiv(d, consts["DO"])
    split = ELEMENT[dtype] == 4
    fwd, bwd = smem("fwd", d, dtype, consts), smem("bwd", d, dtype, consts)
    return [
        CudaLaunch("fwd", split=None, grid=(_cdiv(r, consts["BM"]), 1, heads),
                   smem=fwd, rows=r, cols=c, side="x", **common),
        CudaLaunch("bwd", split=split, grid=(_cdiv(r, consts["BM"]), slices, heads),
                   smem=bwd, rows=r, cols=c, side="x", **common),
        CudaLaunch("bwd", split=split, grid=(_cdiv(c, consts["BM"]), slices, heads),
                   smem=bwd, rows=c, cols=r, side="y", **common),
    ]  # fmt: skip


def one_exp_eligible(launch: CudaLaunch) -> bool:
    """Whether the backward kernel may take its one-exponential form in this launch
    (``kOneExp`` and both sides weighted in the source): 16-bit inputs and statistics on
    both the rows and the columns (``all`` and ``cross``; the rectangular passes weight
    one side only and take one exponential per element anyway)."""
    return launch.kind == "bwd" and ELEMENT[launch.dtype] == 2 and launch.side in ("Z", "a", "b")


def tiles_per_program(launch: CudaLaunch) -> list[int]:
    """Column tiles each program walks, in launch order: every program of these kernels
    sweeps all ``ceil(C / BN)`` column tiles (no triangle is skipped for ``all``)."""
    gx, gy, gz = launch.grid
    return [_cdiv(launch.cols, launch.consts["BN"])] * (gx * gy * gz)
