"""The CUDA fragment kernels (16-bit inputs on the fast path), through the CPU emulation.

``lse_forward_frag_kernel`` (fp16, bf16) and ``lse_backward_frag_kernel`` (bf16) keep
the score tile in mma.sync accumulators (``csrc/cuda/contrastive_kernels.cu``). The
emulation counts their CTAs (``torch.ops.mimac_emu.tally``): these tests check which
inputs reach them, and their values and gradients against float64 where the other
tests of the matrix do not reach: D past one output slice with a ragged last one, and
D = 512 with sm_90's shared memory (the emulated device has sm_80's by default).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mimac_kernels import cuda_backend, torch_backend
from tests.kernels.accuracy import kernel_case, kernel_level_errors, kernel_outputs, weight_eps
from tests.kernels.emulation import EMULATION_SCHEDULES, emulation_schedule

pytestmark = pytest.mark.emulated

#: Opt-in shared memory per block of sm_86, sm_80 (the emulation's default) and sm_90.
SM86_SMEM, SM80_SMEM, SM90_SMEM = 101376, 166912, 232448


def _tallies(emu, case, *names: str) -> tuple[int, ...]:
    """The emulation's tallies ``names`` over one forward + backward of ``case``."""
    emu.clear_tallies()
    kernel_outputs(cuda_backend, case)
    return tuple(emu.tally(n) for n in names)


def _ctas(emu, case) -> tuple[int, int, int]:
    """Fragment-kernel CTAs of one forward + backward of ``case``: cross's one-pass
    forward, the row-sweeping forward (cross: only its re-swept blocks), the backward."""
    return _tallies(emu, case, "frag_cross_ctas", "frag_fwd_ctas", "frag_bwd_ctas")


@pytest.mark.parametrize(
    "dtype,negatives,aligned,expected",
    [
        # all: 140 rows of Z, 3 row blocks, in 2 heads; the backward's one D slice
        (torch.bfloat16, "all", True, (0, 6, 6)),
        (torch.float16, "all", True, (0, 6, 0)),  # fp16's gradient product stays TF32 (V's range)
        (torch.bfloat16, "all", False, (0, 0, 0)),  # not 16-byte aligned: the general path
        (torch.float32, "all", True, (0, 0, 0)),
        # cross: 2 row blocks of a per head, one pass for both sides, nothing re-swept
        (torch.bfloat16, "cross", True, (4, 0, 8)),
        (torch.float16, "cross", True, (4, 0, 0)),
        (torch.bfloat16, "cross", False, (0, 0, 0)),
        (torch.float32, "cross", True, (0, 0, 0)),
    ],
)
def test_which_inputs_take_the_fragment_kernels(emu, dtype, negatives, aligned, expected):
    case = kernel_case((2, 70, 64), "dot", negatives, dtype, "cpu")
    if not aligned:
        p = case.problem
        buf = torch.empty(2 * p.a.numel() + 1, dtype=dtype)
        a, b = buf[1 : 1 + p.a.numel()].view(p.a.shape), buf[1 + p.a.numel() :].view(p.b.shape)
        a.copy_(p.a)
        b.copy_(p.b)
        case = dataclasses.replace(case, problem=dataclasses.replace(p, a=a, b=b))
    assert _ctas(emu, case) == expected


@pytest.mark.parametrize("negatives", ["all", "cross"])
@pytest.mark.parametrize("critic", ["cosine", "log_dot"])
def test_two_slices_with_a_ragged_one(emu, critic, negatives):
    """D = 136: two DO = 128 output slices, the second 8 wide (its fragment loop stops
    at the staged width); every CTA of both backward launches of cross is a fragment
    CTA, and its forward takes one pass."""
    case = kernel_case((1, 130, 136), critic, negatives, torch.bfloat16, "cpu")
    if negatives == "all":
        assert _ctas(emu, case) == (0, 5, 10)  # 260 rows of Z
    else:
        assert _ctas(emu, case) == (3, 0, 12)  # 130 rows of a, then of b
    errors = kernel_level_errors(cuda_backend, case, weight_eps("cuda", torch.bfloat16))
    assert not errors, errors


def _wide(emu, case) -> int:
    """CTAs of the wide backward (bf16, staged width 512) in one forward + backward."""
    return _tallies(emu, case, "wide_bwd_ctas")[0]


def test_d512_with_sm90_shared_memory(emu):
    """bf16 D = 512: the wide backward (165,760 bytes per block) fits sm_80 and sm_90,
    one CTA of 8 warps per row block for all of D; the fragment forward (199,680 bytes)
    only sm_90; sm_86's 99 KiB takes the earlier fast kernels. All match float64."""
    case = kernel_case((1, 70, 512), "dot", "cross", torch.bfloat16, "cpu")
    assert _ctas(emu, case) == (0, 0, 0) and _wide(emu, case) == 4  # 2 passes x 2 blocks
    errors = []
    for smem in (SM86_SMEM, SM90_SMEM):
        emu.set_smem_optin(smem)
        try:
            if smem == SM90_SMEM:
                # random dot rows at D = 512 lie far below the Cauchy-Schwarz bound: re-swept
                assert _ctas(emu, case) == (2, _blocks_out_of_window(case), 0)
            assert _wide(emu, case) == (4 if smem == SM90_SMEM else 0)
            errors += kernel_level_errors(cuda_backend, case, weight_eps("cuda", torch.bfloat16))
        finally:
            emu.set_smem_optin(SM80_SMEM)
    assert not errors, errors


@pytest.mark.parametrize("negatives", ["all", "cross"])
@pytest.mark.parametrize("critic,d", [("cosine", 512), ("log_dot", 456), ("dot", 512)])
def test_wide_backward_matches_float64(emu, critic, d, negatives):
    """The wide backward (the score tile once per tile, four warps of D slices sharing it
    through shared memory): ragged rows (70 per side), D = 456 with its last 56 columns
    zero-padded, both pairings, against float64; unit rows take the one-exponential form
    on their interior tiles, the others the exact form."""
    case = kernel_case((1, 70, d), critic, negatives, torch.bfloat16, "cpu")
    blocks = 3 if negatives == "all" else 2 * 2
    wide, narrow, one_exp = _tallies(emu, case, "wide_bwd_ctas", "frag_bwd_ctas", "bwd_tiles_one_exp")
    assert wide == blocks and narrow == 0
    if critic == "cosine" and negatives == "all":
        assert one_exp > 0
    errors = kernel_level_errors(cuda_backend, case, weight_eps("cuda", torch.bfloat16))
    assert not errors, errors


def _blocks_out_of_window(case) -> int:
    """Row blocks of a plus row blocks of b (64 each) holding a sum outside the one-pass
    window, in float64 with the shift the binding derives: the blocks the CUDA forward
    must re-sweep."""
    p = case.problem
    a, b, it = p.a.double(), p.b.double(), float(p.inv_tau)
    bound = it * float(a.norm(dim=-1).amax(-1).max() * b.norm(dim=-1).amax(-1).max())
    shift = min(bound, max(bound - 64.0, 32.0))
    s = it * (a @ b.transpose(-1, -2))
    e = torch.exp(s - shift)
    blocks = 0
    for sums in (e.sum(-1), e.sum(-2)):  # (H, N): rows of a, rows of b
        out = (sums < 2.0**-60) | (sums > 2.0**24)
        blocks += int(torch.nn.functional.pad(out, (0, -out.shape[-1] % 64)).view(
            out.shape[0], -1, 64).any(-1).sum())
    return blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("defect", ["above", "both"])
def test_cross_one_pass_re_sweeps_the_blocks_out_of_its_window(emu, dtype, defect):
    """cross's one-pass sums are shifted by a fixed level below the bound of S (random
    unit rows, 200 of a and of b, D = 64). above: cosine at tau = 0.01 (shift 36), rows
    70-75 of b equal to those of a: their S = 100 sends their row and column sums past
    2^24 (one row block of each side). both: dot at tau = 1, row 0 of a = 200 b_5 (the
    bound, shift 136: row 0 and column 5 past 2^24), rows 64-127 of a = 150 times those
    of b (sums ~e^14, kept), the unit rows' sums below 2^-60. Exactly the blocks holding
    such a row are re-swept, and everything matches float64."""
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.nn.functional.normalize(torch.randn(1, 200, 64, generator=gen), dim=-1)
            for _ in range(2))
    if defect == "above":
        b[0, 70:76] = a[0, 70:76]
        critic, inv_tau, expected = "cosine", 100.0, 2
    else:
        a[0, 0] = 200 * b[0, 5]
        a[0, 64:128] = 150 * b[0, 64:128]
        critic, inv_tau, expected = "dot", 1.0, 6  # rows: blocks 0, 2, 3; columns: the same
    case = kernel_case((1, 200, 64), critic, "cross", dtype, "cpu")
    problem = dataclasses.replace(case.problem, a=a.to(dtype), b=b.to(dtype),
                                  inv_tau=torch.tensor(inv_tau))
    case = dataclasses.replace(case, problem=problem)
    assert _blocks_out_of_window(case) == expected  # the construction did its job
    assert _ctas(emu, case)[:2] == (4, expected)
    errors = kernel_level_errors(cuda_backend, case, weight_eps("cuda", dtype))
    assert not errors, errors


def test_cross_one_pass_keeps_nan_where_the_rows_have_it(emu):
    """A NaN in row 3 of a and in row 100 of b: their sums are NaN, which the window test
    fails; the re-sweep gives NaN to row 3's and column 100's log-sum-exps (through
    their own dots), finite values everywhere else."""
    case = kernel_case((1, 130, 64), "dot", "cross", torch.bfloat16, "cpu")
    p = case.problem
    a, b = p.a.clone(), p.b.clone()
    a[0, 3, 5] = float("nan")
    b[0, 100, 7] = float("nan")
    stats = cuda_backend.forward(dataclasses.replace(p, a=a, b=b))
    row_nan, col_nan = stats.row_lse[0].isnan(), stats.col_lse[0].isnan()
    # a row's dots with b's NaN row are NaN too: every row and column meets a NaN
    assert bool(row_nan.all()) and bool(col_nan.all())
    ref = torch_backend.forward(dataclasses.replace(p, a=a.double(), b=b.double()))
    assert bool((ref.row_lse.isnan() == stats.row_lse.isnan()).all())


def test_wide_backward_has_no_race(emu):
    """The wide backward's warps meet through shared memory three times per quarter tile
    (partial S, V, and the Y buffers): the same bits under every emulated schedule of
    blocks, threads and warps (the temperature sum's per-CTA atomic aside)."""
    outputs = {}
    for schedule in EMULATION_SCHEDULES:
        with emulation_schedule(schedule, seed=3):
            case = kernel_case((1, 70, 512), "cosine", "all", torch.bfloat16, "cpu")
            emu.clear_tallies()
            outputs[schedule] = kernel_outputs(cuda_backend, case)
            assert emu.tally("wide_bwd_ctas") == 3
    for schedule in EMULATION_SCHEDULES[1:]:
        for x, y in zip(outputs["in_order"][:4], outputs[schedule][:4]):
            assert torch.equal(x, y), schedule
        torch.testing.assert_close(outputs[schedule][4], outputs["in_order"][4], rtol=1e-5, atol=0)
