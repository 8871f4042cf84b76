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

from mimac_kernels import cuda_backend
from tests.kernels.accuracy import kernel_case, kernel_level_errors, kernel_outputs, weight_eps

pytestmark = pytest.mark.emulated

#: Opt-in shared memory per block of sm_80 (the emulation's default) and sm_90.
SM80_SMEM, SM90_SMEM = 166912, 232448


def _ctas(emu, case) -> tuple[int, int]:
    """Fragment-kernel CTAs (forward, backward) of one forward + backward of ``case``."""
    emu.clear_tallies()
    kernel_outputs(cuda_backend, case)
    return emu.tally("frag_fwd_ctas"), emu.tally("frag_bwd_ctas")


@pytest.mark.parametrize(
    "dtype,aligned,expected",
    [
        # 140 rows of Z: 3 row blocks, in 2 heads; the backward's one D slice
        (torch.bfloat16, True, (6, 6)),
        (torch.float16, True, (6, 0)),  # fp16's gradient product stays TF32 (V's range)
        (torch.bfloat16, False, (0, 0)),  # not 16-byte aligned: the general path
        (torch.float32, True, (0, 0)),
    ],
)
def test_which_inputs_take_the_fragment_kernels(emu, dtype, aligned, expected):
    case = kernel_case((2, 70, 64), "dot", "all", dtype, "cpu")
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
    at the staged width); every CTA of both launches of cross is a fragment CTA."""
    case = kernel_case((1, 130, 136), critic, negatives, torch.bfloat16, "cpu")
    passes = 1 if negatives == "all" else 2
    rows = 260 if negatives == "all" else 130
    blocks = -(-rows // 64)
    assert _ctas(emu, case) == (passes * blocks, passes * blocks * 2)
    errors = kernel_level_errors(cuda_backend, case, weight_eps("cuda", torch.bfloat16))
    assert not errors, errors


def test_d512_with_sm90_shared_memory(emu):
    """bf16 D = 512 needs 201,856 bytes per block in the backward: sm_90 runs the
    fragment kernels (four output slices), sm_80 the earlier fast kernels; both match
    float64."""
    case = kernel_case((1, 70, 512), "dot", "cross", torch.bfloat16, "cpu")
    assert _ctas(emu, case) == (0, 0)
    emu.set_smem_optin(SM90_SMEM)
    try:
        assert _ctas(emu, case) == (4, 16)
        errors = kernel_level_errors(cuda_backend, case, weight_eps("cuda", torch.bfloat16))
    finally:
        emu.set_smem_optin(SM80_SMEM)
    assert not errors, errors
