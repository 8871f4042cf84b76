"""One test matrix for every backend that runs here (``runner``: torch, cpu, triton,
cuda on the GPU and through the CPU emulation), against float64.

Tolerance rule (``tests.kernels.accuracy``): a backend's error against float64 is at
most twice plain PyTorch's error in the same dtype, plus a small absolute slack.
What only one backend has (ISA variants, group tiles, thread counts, atomics,
emulation schedules, builds) is tested in that backend's own file.
"""

from __future__ import annotations

import math

import pytest
import torch

from mimac_kernels import fused_contrastive_loss, reference_contrastive_loss
from mimac_kernels.options import CRITICS, KERNEL_DTYPES, NEGATIVES
from tests.kernels.accuracy import (
    PAIRINGS,
    TAU,
    assert_backend_matches_float64,
    kernel_case,
    kernel_level_errors,
    make_views,
    weight_eps,
)

#: 1 row, 1 feature; heads; a single tile; several row blocks (odd and even counts);
#: D over several staging chunks and output slices.
EDGE_SHAPES = [(1, 1), (1, 5), (2, 3), (2, 1, 7), (3, 5, 7), (3, 19, 10), (64, 16), (96, 48),
               (200, 20), (130, 200), (3, 150, 129)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
@pytest.mark.parametrize("critic", CRITICS)
def test_matches_float64(runner, critic, negatives, symmetric, dtype):
    a, b = make_views((67, 33), critic, device=runner.device)
    assert_backend_matches_float64(
        runner.name, a, b, dtype, tau=TAU[critic], critic=critic, negatives=negatives,
        symmetric=symmetric,
    )  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_reductions(runner, negatives, symmetric, reduction):
    a, b = make_views((3, 40, 24), "cosine", seed=4, device=runner.device)
    assert_backend_matches_float64(
        runner.name, a, b, torch.float32, tau=0.2, critic="cosine", negatives=negatives,
        symmetric=symmetric, reduction=reduction,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_edge_shapes(runner, shape, critic, negatives, dtype):
    if runner.interpreted and math.prod(shape) > 10_000:
        pytest.skip("about 20 s a case in Triton's interpreter; runs on a GPU")
    a, b = make_views(shape, critic, seed=5, device=runner.device)
    assert_backend_matches_float64(
        runner.name, a, b, dtype, tau=TAU[critic], critic=critic, negatives=negatives
    )


@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
@pytest.mark.parametrize("critic", CRITICS)
def test_nan_propagates(runner, critic, negatives, symmetric):
    """A NaN input gives NaN exactly where float64 PyTorch gives NaN, and in the gradients."""
    a, b = make_views((20, 8), critic, seed=9, device=runner.device)
    a[3, 2] = float("nan")
    kw = {"critic": critic, "negatives": negatives, "symmetric": symmetric, "reduction": "none"}
    a_ = a.clone().requires_grad_()
    b_ = b.clone().requires_grad_()
    out = fused_contrastive_loss(a_, b_, temperature=TAU[critic], backend=runner.name, **kw)
    ref = reference_contrastive_loss(a, b, temperature=TAU[critic], **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    out.nansum().backward()
    assert torch.isnan(a_.grad).any() and torch.isnan(b_.grad).any()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("critic", CRITICS)
def test_kernel_level_matches_reference(runner, critic, negatives, dtype):
    """The contract of ``mimac_kernels.contract`` against the torch backend in float64 on
    the same rounded inputs: several row blocks, two heads, arbitrary upstream
    gradients and temperature centres."""
    shape = (2, 150, 40) if runner.interpreted else (2, 300, 64)  # the interpreter is slow
    case = kernel_case(shape, critic, negatives, dtype, runner.device)
    assert kernel_level_errors(runner.impl, case, weight_eps(runner.name, dtype)) == []
