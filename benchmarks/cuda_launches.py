"""The kernel launches the CUDA C++ backend makes for one problem, rebuilt offline.

:func:`launch_plan` mirrors the host code of ``csrc/cuda/contrastive_kernels.cu``
(``mimac_lse_forward`` / ``mimac_lse_backward`` and their ``forward_as``,
``backward_as``, ``grid_for``), which ``csrc/cuda/binding.cpp`` calls once per
forward and once per backward: which kernel template, in which order, with which
grid and dynamic shared memory. ``fast_path``: D a multiple of one 16-byte vector,
the resident X within its limit and the kernel's shared memory within the device's
opt-in per block (an H100's, ``sm90_rates.H100``); the inputs are taken as 16-byte
aligned, as torch allocates them. On the fast path 16-bit inputs run the fragment
kernels (``lse_forward_frag_kernel`` for fp16 and bf16, ``lse_backward_frag_kernel``
for bf16 only) where their shared memory fits; everything else the fast or general
variant of ``lse_forward_kernel`` / ``lse_backward_kernel``. The constants (``BM``,
``BN``, ``DO``, ``NT``, ``RNT``, shared bytes) come from the source through
``cuda_compile.kernel_constants``. When the launchers change, this function is what
to re-point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.sm90_rates import H100

#: Bytes per element of the launcher's input dtypes.
ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Critic ids of contrastive_kernels.h (cosine runs the dot kernel: unit rows).
CRITICS = {"dot": 0, "cosine": 1, "log_dot": 2}
KERNELS = {"fwd": "lse_forward_kernel", "bwd": "lse_backward_kernel"}
#: The fragment kernels by launch kind: ``cross`` is cross's one-pass forward (both
#: sides' shifted exp-sums), ``finish`` the row forward finishing one side's sums, which
#: re-sweeps only the row blocks with a sum outside the one-pass window.
FRAG_KERNELS = {"fwd": "lse_forward_frag_kernel", "bwd": "lse_backward_frag_kernel",
                "cross": "lse_cross_frag_kernel", "finish": "lse_forward_frag_kernel"}
#: The bf16 backward at a staged width of WS x DO (D = 512): one CTA of 2 x WS warps per
#: row block, the score tile once for all of D.
WIDE_KERNEL = "lse_backward_wide_kernel"
#: The backward's ``Pass::tau_mode`` by pass side (``mimac_lse_backward`` /
#: ``mimac_rect_backward``): each pass with statistics of its own rows takes their
#: temperature terms (1: NT-Xent's rows, CLIP's rows a and rows b, the rectangular x
#: rows); the rectangular dY pass none (0).
TAU_MODES = {"Z": 1, "a": 1, "b": 1, "x": 1, "y": 0}


@dataclass(frozen=True)
class CudaLaunch:
    """One kernel launch of the CUDA backend.

    ``kind``: ``fwd`` (row log-sum-exps), ``cross`` and ``finish`` (cross's one-pass
    forward and the finishing of one side's sums, fragment kernels only: see
    :data:`FRAG_KERNELS`) or ``bwd`` (gradient rows of one operand);
    ``dtype``/``critic``/``split``/``fast``: the template arguments (``split``: the
    backward's 3xTF32 flag, ``None`` for the forward; ``fast``: 16-byte vector staging
    with the CTA's X rows resident, else the general element-wise staging); ``rows``/``cols``: R and C of S for this
    pass; ``side``: which rows the pass produces (``Z``, ``a`` or ``b``). ``one_exp``
    (backward only): the data put every tile of the pass in the one-exponential form's
    window (see :func:`one_exp_eligible`; the plan leaves it False, the estimate sets it
    from the case's data). ``frag``: a fragment kernel (``RNT`` threads; ``fast`` and
    ``split`` do not apply to it); ``tau``: the backward's ``Pass::tau_mode``
    (:data:`TAU_MODES`, a template argument of the fragment backward only; ``None`` for
    the forward).
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
    frag: bool = False
    tau: int | None = None
    #: ``finish`` only: the row blocks it re-sweeps (the first ones, as Triton's model
    #: takes them; the data decide which), set by the estimate.
    resweep_blocks: int = 0
    #: ``bwd`` only: the wide backward (:data:`WIDE_KERNEL`; ``frag`` is set too).
    wide: bool = False

    @property
    def kernel(self) -> str:
        if self.wide:
            return WIDE_KERNEL
        return (FRAG_KERNELS if self.frag else KERNELS)[self.kind]

    @property
    def name(self) -> str:
        if self.frag:
            tau = "" if self.kind != "bwd" else f", {self.tau}"
            return f"{self.kernel}<{self.dtype}, {self.critic}{tau}>"
        split = "" if self.split is None else f", {str(self.split).lower()}"
        return f"{self.kernel}<{self.dtype}, {self.critic}{split}, {str(self.fast).lower()}>"

    @property
    def num_warps(self) -> int:
        return self.consts["WNT" if self.wide else "RNT" if self.frag else "NT"] // 32

    @property
    def d_slices(self) -> int:
        """Programs per row block: the backward's D slices of ``DO`` columns (grid.y)."""
        return self.grid[1]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def resident_ok(d: int, dtype: str, consts: dict) -> bool:
    """The fast path's shape conditions (``fast_path`` in the source, less the shared
    memory test): whole 16-byte vectors per row and the CTA's resident X rows
    (``BM x ceil(D / KC) * KC`` plus padding) within its limit."""
    fast = consts["fast"][dtype]
    return d % fast["vec"] == 0 and x_bytes(d, dtype, consts) <= consts["x_resident_max"]


def fast_path(d: int, dtype: str, consts: dict, smem: int,
              smem_optin: int = H100.shared_optin_per_block) -> bool:  # fmt: skip
    """Whether ``fast_path`` of the source holds for 16-byte aligned inputs of width
    ``d`` and a kernel of ``smem`` dynamic shared bytes: :func:`resident_ok` and ``smem``
    within the device's opt-in shared memory per block."""
    return resident_ok(d, dtype, consts) and smem <= smem_optin


def x_bytes(d: int, dtype: str, consts: dict) -> int:
    """Shared bytes of the fast path's resident X (``x_bytes`` in the source)."""
    return _cdiv(consts["BM"] * _x_ld(d, dtype, consts) * ELEMENT[dtype], 128) * 128


def _x_ld(d: int, dtype: str, consts: dict) -> int:
    return x_cols(d, consts) + consts["fast"][dtype]["x_pad"]


def x_cols(d: int, consts: dict) -> int:
    """D padded to whole ``KC`` chunks (``x_cols`` in the source): the columns the fast
    path stages and the score GEMM walks."""
    return _cdiv(d, consts["KC"]) * consts["KC"]


def frag_smem(kind: str, d: int, dtype: str, consts: dict) -> int:
    """Dynamic shared memory of a fragment kernel (``fwd_frag_smem`` / ``bwd_frag_smem``
    in the source): the resident X, two whole Y tiles (``BN`` rows at X's stride) and, in
    the backward, the statistics ahead of them (``frag_stats``)."""
    y_tile = _cdiv(consts["BN"] * _x_ld(d, dtype, consts) * ELEMENT[dtype], 128) * 128
    fwd = x_bytes(d, dtype, consts) + 2 * y_tile
    return fwd + (consts["frag_stats"] if kind == "bwd" else 0)


def smem(kind: str, d: int, dtype: str, consts: dict, fast: bool = True) -> int:
    """Dynamic shared memory of a ``fwd``/``bwd`` launch of ``lse_forward_kernel`` /
    ``lse_backward_kernel`` at width ``d`` (``fwd_smem`` / ``bwd_smem``): the fast
    variant's or the general one's."""
    if not fast:
        return consts[f"{kind}_smem"][dtype]
    return consts["fast"][dtype][f"{kind}_base"] + x_bytes(d, dtype, consts)


def frag_eligible(kind: str, dtype: str) -> bool:
    """Whether the launchers have a fragment kernel for this pass: the forward for 16-bit
    inputs, the backward for bf16 only (``forward_as`` / ``backward_as``)."""
    return dtype == "bf16" or (kind == "fwd" and ELEMENT[dtype] == 2)


def choose(kind: str, d: int, dtype: str, consts: dict,
           smem_optin: int = H100.shared_optin_per_block) -> dict:  # fmt: skip
    """The kernel ``forward_as`` / ``backward_as`` launch for a pass: ``frag``, ``wide``,
    ``fast`` and ``smem`` of the :class:`CudaLaunch` (the wide backward where D's staged
    width is its own and it fits, else the fragment kernel where it exists and fits, else
    the fast variant where it fits, else the general one)."""
    if kind == "bwd" and dtype == "bf16" and x_cols(d, consts) == consts["WS"] * consts["DO"]:
        need = consts["wide_smem"]
        if fast_path(d, dtype, consts, need, smem_optin):
            return {"frag": True, "wide": True, "fast": True, "smem": need}
    if frag_eligible(kind, dtype):
        need = frag_smem(kind, d, dtype, consts)
        if fast_path(d, dtype, consts, need, smem_optin):
            return {"frag": True, "fast": True, "smem": need}
    need = smem(kind, d, dtype, consts)
    if fast_path(d, dtype, consts, need, smem_optin):
        return {"frag": False, "fast": True, "smem": need}
    return {"frag": False, "fast": False, "smem": smem(kind, d, dtype, consts, fast=False)}


def launch_plan(pairing: str, n: int, d: int, consts: dict, dtype: str = "bf16",
                critic: str = "dot", heads: int = 1, cols: int = 0,
                columns_grad: bool = True,
                smem_optin: int = H100.shared_optin_per_block) -> list[CudaLaunch]:  # fmt: skip
    """The launches of one forward + backward, in order.

    ``pairing``: ``all`` (NT-Xent: rows and columns are ``Z = [a; b]``, ``2n`` of them,
    one pass each way), ``cross`` (CLIP: ``n`` x ``n``; the forward runs rows a,
    then rows b for the column log-sum-exp, or, on the fragment kernels, one pass for
    both and a finishing launch per side; the backward dA then dB) or ``rect``
    (``mimac_rect_forward`` / ``mimac_rect_backward``, without the dY pass where not
    ``columns_grad``: ``n`` rows x against ``cols``
    columns y; one forward, then dX and dY, y's rows against x).
    ``consts``: ``cuda_compile.kernel_constants()``; ``smem_optin``: the device's opt-in
    shared memory per block (an H100's by default).
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
    kernel_critic = CRITICS["log_dot"] if critic == "log_dot" else CRITICS["dot"]
    common = {"dtype": dtype, "critic": kernel_critic, "d": d, "all_pairs": all_pairs,
              "consts": consts}  # fmt: skip
    fwd = choose("fwd", d, dtype, consts, smem_optin)
    bwd = choose("bwd", d, dtype, consts, smem_optin)
    split = ELEMENT[dtype] == 4
    slices = _cdiv(d, consts["DO"])
    if pairing == "cross" and fwd["frag"]:
        # one pass for both sides' sums, each side finished (re-sweeping where needed)
        passes = [("cross", "ab", n, n), ("finish", "a", n, n), ("finish", "b", n, n),
                  ("bwd", "a", n, n), ("bwd", "b", n, n)]
    elif pairing == "rect":
        # rows x against the columns, then (dY) y's rows against x
        passes = [("fwd", "x", n, cols), ("bwd", "x", n, cols), ("bwd", "y", cols, n)]
        if not columns_grad:
            passes = passes[:2]  # no dY pass for a detached queue
    else:
        m = 2 * n if all_pairs else n
        sides = ("Z",) if all_pairs else ("a", "b")
        passes = [(k, s, m, m) for k in ("fwd", "bwd") for s in sides]
    plan = []
    for kind, side, rows, cols_ in passes:
        is_fwd = kind != "bwd"
        plan.append(CudaLaunch(
            kind, split=None if is_fwd else split,
            grid=(_cdiv(rows, consts["BM"]), 1 if is_fwd or bwd.get("wide") else slices, heads),
            rows=rows, cols=cols_, side=side, tau=None if is_fwd else TAU_MODES[side],
            **(fwd if is_fwd else bwd), **common))  # fmt: skip
    return plan


def one_exp_eligible(launch: CudaLaunch) -> bool:
    """Whether the backward kernel may take its one-exponential form in this launch
    (``kOneExp`` and both sides weighted in the source): 16-bit inputs and statistics on
    both the rows and the columns (``all`` and ``cross``; the rectangular passes weight
    one side only and take one exponential per element anyway)."""
    return launch.kind == "bwd" and ELEMENT[launch.dtype] == 2 and launch.side in ("Z", "a", "b")


def tiles_per_program(launch: CudaLaunch) -> list[int]:
    """Column tiles each program walks, in launch order: every program of these kernels
    sweeps all ``ceil(C / BN)`` column tiles (no triangle is skipped for ``all``), but a
    ``finish`` launch only in its ``resweep_blocks`` first row blocks (none elsewhere:
    those finish their sums and return)."""
    gx, gy, gz = launch.grid
    n_kb = _cdiv(launch.cols, launch.consts["BN"])
    if launch.kind == "finish":
        return [n_kb if i < launch.resweep_blocks else 0 for _ in range(gz * gy) for i in range(gx)]
    return [n_kb] * (gx * gy * gz)
