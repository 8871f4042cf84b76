"""The CUDA backward's one-exponential form, through the CPU emulation.

16-bit inputs with statistics on both sides (``all``, ``cross``) take
``W_ik = e^(S_ik - c) (u_i + v_k)`` on the interior tiles (no masked pair: not on the
diagonal of ``all``, no ragged edge) whose rows' and columns' log-sum-exps all lie
within ``EXP_WINDOW`` of the CTA's shift ``c`` (its largest row log-sum-exp) with
factors ``u = g e^(c - lse)`` below ``EXP_FACTOR_MAX`` and ``|g| max(1/tau, 1)`` below
``GRAD_MAX``; every other tile takes both exponentials (``csrc/cuda/contrastive_kernels.cu``). The emulation counts the tiles
of each form (``torch.ops.mimac_emu.tally``); these tests predict the counts from the
forward's statistics and check the gradients against float64 on both sides of the
window.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mimac_kernels import cuda_backend
from mimac_kernels.contract import Problem, Stats, Upstream
from tests.kernels.accuracy import KernelCase, kernel_case, kernel_level_errors, weight_eps

pytestmark = pytest.mark.emulated

#: Rows per CTA, columns per tile and gradient columns per CTA of the kernels.
BM, BN, DO = 64, 64, 128
#: kExpWindow and kExpFactorMax of the kernels.
EXP_WINDOW = 40.0
EXP_FACTOR_MAX = 2.0**126
GRAD_MAX = 2.0**100
LOG2E = 1.4426950408889634


def _side_ok(lse: torch.Tensor, g: torch.Tensor, shift: torch.Tensor, it: float) -> bool:
    """The kernel's window test of one block of statistics (float32, as on the device)."""
    factor = g * torch.exp2((shift - lse) * LOG2E)
    return bool(((lse - shift).abs() <= EXP_WINDOW).all()
                and (factor.abs() < EXP_FACTOR_MAX).all()
                and (g.abs() * max(it, 1.0) < GRAD_MAX).all())  # fmt: skip


def predicted_tiles(problem: Problem, stats: Stats, up: Upstream) -> tuple[int, int]:
    """(one-exponential, two-exponential) column tiles the backward's CTAs sweep, from
    the statistics it reads. Shapes: ``problem.a`` ``(H, N, D)``."""
    h, _, d = problem.a.shape
    if problem.negatives == "all":  # one launch: rows and columns are Z, both sides g_row
        passes = [(stats.row_lse, up.g_row, stats.row_lse, up.g_row)]
    else:  # rows a against columns b, then rows b against columns a
        passes = [(stats.row_lse, up.g_row, stats.col_lse, up.g_col),
                  (stats.col_lse, up.g_col, stats.row_lse, up.g_row)]  # fmt: skip
    one = two = 0
    slices = math.ceil(d / DO)
    it = float(problem.inv_tau)
    for lx, gx, ly, gy in passes:
        rows, cols = lx.shape[1], ly.shape[1]
        for head in range(h):
            for r0 in range(0, rows, BM):
                rl, rg = lx[head, r0 : r0 + BM].float(), gx[head, r0 : r0 + BM].float()
                shift = rl.max()
                rows_ok = problem.a.element_size() == 2 and _side_ok(rl, rg, shift, it)
                for c0 in range(0, cols, BN):
                    cl, cg = ly[head, c0 : c0 + BN].float(), gy[head, c0 : c0 + BN].float()
                    masked = (r0 + BM > rows or c0 + BN > cols
                              or (problem.negatives == "all" and r0 == c0))  # fmt: skip
                    fast = rows_ok and not masked and _side_ok(cl, cg, shift, it)
                    one, two = one + fast * slices, two + (not fast) * slices
    return one, two


def run_counted(emu, case: KernelCase) -> tuple[tuple[int, int], tuple[int, int], Stats]:
    """The backward's (one-exponential, two-exponential) tile counts, the prediction,
    and the forward's statistics."""
    stats = cuda_backend.forward(case.problem)
    emu.clear_tallies()
    cuda_backend.backward(case.problem, stats, case.upstream)
    got = emu.tally("bwd_tiles_one_exp"), emu.tally("bwd_tiles_two_exp")
    return got, predicted_tiles(case.problem, stats, case.upstream), stats


def spread_case(negatives: str, dtype: torch.dtype, scale: float, g_scale: float) -> KernelCase:
    """Unit rows at 1/tau = 20 (log-sum-exps near 17), but row 3 of ``a`` is ``scale``
    times row 3 of ``b``: their score, 20 scale, lifts the log-sum-exps of that row and
    column (and of the blocks holding them) about 20 scale - 17 above the others.
    ``g_scale`` scales the upstream gradients."""
    base = kernel_case((1, 150, 72), "cosine", negatives, dtype, "cpu", seed=3)
    a, b = base.problem.a.float().clone(), base.problem.b.float()
    a[0, 3] = scale * b[0, 3]
    problem = Problem(a.to(dtype), b.to(dtype), torch.tensor(20.0), "dot", negatives, 1e-12)
    up = base.upstream
    upstream = dataclasses.replace(up, g_row=up.g_row * g_scale, g_col=up.g_col * g_scale)
    return KernelCase(problem, upstream)


@pytest.mark.parametrize(
    "critic,negatives,dtype,shape",
    [("cosine", "all", torch.bfloat16, (1, 150, 72)),
     ("dot", "cross", torch.float16, (2, 160, 136)),
     ("log_dot", "cross", torch.bfloat16, (1, 200, 40))],
)  # fmt: skip
def test_one_exponential_on_typical_rows(emu, critic, negatives, dtype, shape):
    """Seeded rows of every critic: all statistics within the window, so every interior
    tile of every launch takes one exponential (the masked ones two), and the gradients
    match float64."""
    case = kernel_case(shape, critic, negatives, dtype, "cpu")
    got, expected, stats = run_counted(emu, case)
    assert expected[0] > 0
    assert got == expected
    # every two-exponential tile is a masked one: the window held everywhere
    rows, cols = (
        stats.row_lse.shape[1],
        (stats.row_lse if negatives == "all" else stats.col_lse).shape[1],
    )
    blocks_r, blocks_c = math.ceil(rows / BM), math.ceil(cols / BN)
    interior = (blocks_r - (rows % BM > 0)) * (blocks_c - (cols % BN > 0))
    if negatives == "all":
        interior -= blocks_r - (rows % BM > 0)  # the diagonal tiles
    passes = 1 if negatives == "all" else 2
    assert got[0] == interior * passes * shape[0] * math.ceil(shape[2] / DO)
    assert kernel_level_errors(cuda_backend, case, weight_eps("cuda", dtype)) == []


@pytest.mark.parametrize("negatives,dtype", [("all", torch.bfloat16), ("cross", torch.float16)])
@pytest.mark.parametrize(
    "scale,g_scale",
    [
        (3.9, 1.0),  # a spread of about 60: the window alone turns the tiles away
        # about 78-87 with finite factors (small g): e^(S - c) would flush the weights of
        # the lower rows to zero (it does below e^-87.3), visibly in the gradients
        (5.1, 1e-15),
    ],
)
def test_two_exponentials_outside_the_window(emu, negatives, dtype, scale, g_scale):
    """Tiles whose rows or columns lie outside the window around the shift take both
    exponentials (and only those), and the gradients still match float64."""
    case = spread_case(negatives, dtype, scale, g_scale)
    got, expected, _ = run_counted(emu, case)
    assert expected[0] > 0 and expected[1] > 0
    assert got == expected
    assert kernel_level_errors(cuda_backend, case, weight_eps("cuda", dtype)) == []


@pytest.mark.parametrize(
    "scale,g_scale",
    [
        (2.2, 1e31),  # a spread of 20-29 (within the window): g e^(c - lse) passes 2^126
        (1.0, 1e32),
    ],  # spread under 10, g e^(c - lse) ~1e33, but |g| / tau passes 2^100
)
def test_large_factors_take_two_exponentials(emu, scale, g_scale):
    """Large upstream gradients: the factors g e^(c - lse) must keep u + v finite, and
    g / tau V; where they would not, the tiles keep two exponentials (at ordinary g more
    tiles would have taken one)."""
    case = spread_case("all", torch.bfloat16, scale, g_scale)
    got, expected, stats = run_counted(emu, case)
    assert expected[1] > 0
    assert got == expected
    up = case.upstream
    ordinary = dataclasses.replace(up, g_row=up.g_row / g_scale, g_col=up.g_col / g_scale)
    assert predicted_tiles(case.problem, stats, ordinary)[0] > got[0]
    assert kernel_level_errors(cuda_backend, case, weight_eps("cuda", torch.bfloat16)) == []


def test_float32_keeps_two_exponentials(emu):
    """float32 inputs always take the exact form (float32-level accuracy of the weights)."""
    case = kernel_case((1, 100, 40), "cosine", "all", torch.float32, "cpu")
    got, expected, _ = run_counted(emu, case)
    assert expected[0] == 0 and got == expected
