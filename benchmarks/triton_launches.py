"""The kernel launches the Triton backend makes for one problem, rebuilt offline.

:func:`launch_plan` is the one place that mirrors the runtime's host code
(``mimac_kernels/triton``'s launcher): which kernels, in which order, with which
tiles (``configs.forward_config`` etc.), grid, column split
(``configs.column_blocks_per_program``) and arguments. Everything else in the
static model and in ``triton_resources`` takes launches from here, so when the
launcher changes, this function is what to re-point. It imports only
``mimac_kernels.triton.kernels`` and ``mimac_kernels.triton.configs``.
"""

from __future__ import annotations

from benchmarks import sm90_compile  # noqa: F401  (drops TRITON_INTERPRET before triton loads)

# isort: split

from dataclasses import dataclass, field

from benchmarks.sm90_compile import Ptr
from mimac_kernels.triton import configs
from mimac_kernels.triton import kernels as K
from mimac_kernels.triton.configs import TileConfig

#: Triton's element names of the input dtypes.
ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what to compile (``args`` as the JIT sees them) and its grid.

    ``kind``: ``fwd`` (exp sums), ``finalize`` (log-sum-exp, running-max re-sweep
    of underflowed row blocks) or ``bwd`` (gradient rows). ``rows``/``cols``:
    R and C of the launch; ``col_blocks``: column blocks per program.
    """

    kind: str
    fn: object = field(repr=False)
    cfg: TileConfig
    grid: tuple[int, int, int]
    args: dict = field(repr=False)
    rows: int
    cols: int
    d: int
    col_blocks: int
    all_pairs: bool

    @property
    def name(self) -> str:
        return self.fn.__name__


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _common(dtype: str, cfg: TileConfig, log_dot: bool, skip: bool, offset: int,
            labels: bool = False) -> dict:  # fmt: skip
    return {
        "SKIP": skip, "OFFSET": offset, "RL": Ptr("i64"), "CL": Ptr("i64"), "LABELS": labels,
        "LOG_DOT": log_dot, "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d, "SINGLE_D": cfg.single_d,
        "PREC": configs.float32_precision() if dtype == "fp32" else "ieee", "DOT_F32": False,
    }  # fmt: skip


PAIRINGS = ("all", "cross", "rect")


def launch_plan(
    pairing: str, n: int, d: int, dtype: str = "bf16", log_dot: bool = False, *, sms: int = 132,
    cols: int | None = None, offset: int | None = 0, columns_grad: bool = True,
    labels: bool = False,
) -> list[Launch]:
    """The launches of one forward + backward, in order, for ``H = 1`` head.

    ``pairing``: ``all`` (NT-Xent; ``Z = [a; b]`` has ``2n`` rows), ``cross``
    (CLIP; ``n`` x ``n``) or ``rect`` (one rank of the losses across ranks: ``n``
    local rows against ``cols`` gathered columns, row ``i`` skipping column
    ``i + offset``, ``None``: none; the Triton backend's ``rect_forward`` and
    ``rect_backward``; ``columns_grad=False``: a detached queue, no dY launch). ``sms``: streaming multiprocessors of the device (the column
    split aims at ``configs.PROGRAMS_PER_SM`` programs per SM).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if dtype not in ELEMENT:
        raise ValueError(f"dtype must be one of {sorted(ELEMENT)}, got {dtype!r}")
    if n < 1 or d < 1:
        raise ValueError(f"n and d must be positive, got n={n}, d={d}")
    if pairing == "rect":
        if cols is None or cols < 1:
            raise ValueError(f"rect needs cols >= 1 gathered columns, got cols={cols}")
        return _rect_plan(n, cols, d, dtype, log_dot, sms, offset, columns_grad, labels)
    size = ELEMENT[dtype]
    target = configs.PROGRAMS_PER_SM * sms
    all_pairs = pairing == "all"
    m = 2 * n if all_pairs else n  # rows and columns of S
    x, f32 = Ptr(dtype), Ptr("fp32")
    plan: list[Launch] = []

    cfg = configs.forward_config(d, size)
    tr, tc = _cdiv(m, cfg.block_m), _cdiv(m, cfg.block_n)
    tiles = tr * (tr + 1) // 2 if all_pairs else tr * tc
    cb = configs.column_blocks_per_program(tr, tc, tiles, target)
    args = {"X": x, "Y": x, "INV_TAU": f32, "SHIFT": f32, "ROW_SUM": f32, "COL_SUM": f32,
            "R": m, "C": m, "D": d, "eps": 1e-12, "COL_BLOCKS": cb, "ALL": all_pairs,
            "ROWS_ONLY": False, **_common(dtype, cfg, log_dot, all_pairs, 0)}  # fmt: skip
    grid = (tr, _cdiv(tc, cb), 1)
    plan.append(Launch("fwd", K.fwd_exp_sums_kernel, cfg, grid, args, m, m, d, cb, all_pairs))

    cfg = configs.finalize_config(d, size)
    args = {"X": x, "Y": x, "INV_TAU": f32, "SHIFT": f32, "SUM": f32, "LSE": f32,
            "R": m, "C": m, "D": d, "eps": 1e-12,
            **_common(dtype, cfg, log_dot, all_pairs, 0)}  # fmt: skip
    fin = Launch("finalize", K.lse_finalize_kernel, cfg, (_cdiv(m, cfg.block_m), 1, 1), args,
                 m, m, d, _cdiv(m, cfg.block_n), all_pairs)  # fmt: skip
    plan += [fin] if all_pairs else [fin, fin]  # cross: rows of S(a, b), then of S(b, a)

    bwd = _bwd_launch(m, m, d, dtype, log_dot, target, all_pairs, 0, all_pairs=all_pairs)
    plan += [bwd] if all_pairs else [bwd, bwd]  # cross: dA, then dB with a and b swapped
    return plan


def _bwd_launch(rows: int, cols: int, d: int, dtype: str, log_dot: bool, target: int,
                skip: bool, offset: int, all_pairs: bool = False,
                labels: bool = False) -> Launch:  # fmt: skip
    """One ``bwd_rows_kernel`` launch of ``rows`` against ``cols`` (``backend._bwd_rows``)."""
    x, f32 = Ptr(dtype), Ptr("fp32")
    cfg = configs.backward_config(d, ELEMENT[dtype], log_dot)
    tr, tc, slices = _cdiv(rows, cfg.block_m), _cdiv(cols, cfg.block_n), cfg.d_slices(d)
    cb = configs.column_blocks_per_program(tr * slices, tc, tr * tc * slices, target)
    chunks = _cdiv(tc, cb)
    ptrs = ("INV_TAU", "LSE_R", "LSE_C", "G_R", "G_C", "CENTER_R", "GSCALE", "SHIFT", "V_C",
            "DX", "TAU_PART")
    args = {"X": x, "Y": x, **{p: f32 for p in ptrs}, "R": rows, "C": cols, "D": d,
            "eps": 1e-12, "COL_BLOCKS": cb, "ATOMIC": chunks > 1 or not cfg.single_d,
            "FAST": Ptr("i32"), "GRAD_TF32": log_dot and dtype == "fp16",
            "ONE_EXP": ELEMENT[dtype] <= 2, "SLICE_D": cfg.grad_d,
            **_common(dtype, cfg, log_dot, skip, offset, labels)}  # fmt: skip
    grid = (tr * slices, chunks, 1)
    return Launch("bwd", K.bwd_rows_kernel, cfg, grid, args, rows, cols, d, cb, all_pairs)


def _rect_plan(r: int, c: int, d: int, dtype: str, log_dot: bool, sms: int,
               offset: int | None, columns_grad: bool = True,
               labels: bool = False) -> list[Launch]:  # fmt: skip
    """``triton.backend.rect_forward`` + ``rect_backward``: exp sums (rows only, every
    tile), finalize, then dX (x against y) and, with ``columns_grad``, dY (y against x,
    the offset negated)."""
    size = ELEMENT[dtype]
    target = configs.PROGRAMS_PER_SM * sms
    skip, off = offset is not None, offset or 0
    x, f32 = Ptr(dtype), Ptr("fp32")
    cfg = configs.forward_config(d, size)
    tr, tc = _cdiv(r, cfg.block_m), _cdiv(c, cfg.block_n)
    cb = configs.column_blocks_per_program(tr, tc, tr * tc, target)
    args = {"X": x, "Y": x, "INV_TAU": f32, "SHIFT": f32, "ROW_SUM": f32, "COL_SUM": f32,
            "R": r, "C": c, "D": d, "eps": 1e-12, "COL_BLOCKS": cb, "ALL": False,
            "ROWS_ONLY": True, **_common(dtype, cfg, log_dot, skip, off, labels)}  # fmt: skip
    plan = [Launch("fwd", K.fwd_exp_sums_kernel, cfg, (tr, _cdiv(tc, cb), 1), args, r, c, d, cb,
                   False)]  # fmt: skip
    cfg = configs.finalize_config(d, size)
    args = {"X": x, "Y": x, "INV_TAU": f32, "SHIFT": f32, "SUM": f32, "LSE": f32,
            "R": r, "C": c, "D": d, "eps": 1e-12,
            **_common(dtype, cfg, log_dot, skip, off, labels)}
    plan.append(Launch("finalize", K.lse_finalize_kernel, cfg, (_cdiv(r, cfg.block_m), 1, 1),
                       args, r, c, d, _cdiv(c, cfg.block_n), False))  # fmt: skip
    plan.append(_bwd_launch(r, c, d, dtype, log_dot, target, skip, off, labels=labels))
    if columns_grad:
        plan.append(_bwd_launch(c, r, d, dtype, log_dot, target, skip, -off, labels=labels))
    return plan


def tiles_per_program(launch: Launch, resweep_blocks: int = 0) -> list[int]:
    """Column tiles each program of ``launch`` walks, in launch order (x fastest).

    Mirrors the kernels' loop bounds: ``fwd`` with ``all`` visits tiles K >= I
    only; ``finalize`` walks every column block in the first ``resweep_blocks``
    row blocks (those whose shifted sum underflowed) and none elsewhere.
    """
    gx, gy, _ = launch.grid
    n_kb = _cdiv(launch.cols, launch.cfg.block_n)
    out = []
    for c in range(gy):
        for i in range(gx):
            if launch.kind == "finalize":
                out.append(n_kb if i < resweep_blocks else 0)
                continue
            lo, hi = c * launch.col_blocks, min(c * launch.col_blocks + launch.col_blocks, n_kb)
            if launch.kind == "fwd" and launch.all_pairs:
                lo = max(lo, i)
            out.append(max(0, hi - lo))
    return out
