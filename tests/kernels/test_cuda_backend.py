"""The CUDA C++ backend against float64: on the GPU, and (everywhere a C++
compiler is) the same kernels' source on CPU tensors through the emulation of
``csrc/emulation`` (``mimac_kernels.testing.emulated_cuda_backend``).

Small shapes follow the tolerance rule of ``mimac_kernels.testing.error_bound``
(at most 2x plain PyTorch's error in the same dtype, plus ``ATOL``); large N
(marked slow, GPU only) compare the kernel-level contract with the tiled
float64 reference, since the plain loss would need an M x M matrix.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch

import mimac_kernels
from mimac_kernels import cuda_backend, extension, reference
from mimac_kernels.testing import (
    EMULATION_SCHEDULES,
    KERNEL_TAU,
    assert_backend_matches_float64,
    emulated_cuda_backend,
    emulation_schedule,
    kernel_case,
    kernel_level_errors,
    kernel_outputs,
    make_views,
    max_abs_err,
)

TAU = KERNEL_TAU
PAIRINGS = [("all", True), ("cross", True), ("cross", False)]
CRITICS = ("cosine", "dot", "log_dot")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
assert_close_to_float64 = functools.partial(assert_backend_matches_float64, "cuda")
NO_GPU = "no CUDA device: the cuda backend runs only on a GPU"


def _gpu() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    why = cuda_backend.unavailable_reason(torch.device("cuda"), torch.float32)
    assert why is None, why  # on a GPU machine a failed build fails
    return torch.device("cuda")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("gpu", marks=pytest.mark.gpu),
        pytest.param("emulated", marks=pytest.mark.emulated),
    ],
)
def dev(request):
    """Where the kernels run: the GPU, or the CPU emulation (CPU tensors)."""
    if request.param == "gpu":
        yield _gpu()
        return
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the emulation cannot be built")
    with emulated_cuda_backend():
        yield torch.device("cpu")


@pytest.fixture(scope="module")
def gpu():
    return _gpu()


def views(shape, critic, dev, seed=0):
    """Two correlated views on ``dev``; dot rows scaled by 0.3 keep x.y / tau moderate."""
    return make_views(shape, critic, seed=seed, device=dev, dot_scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
@pytest.mark.parametrize("critic", CRITICS)
def test_matches_float64(critic, negatives, symmetric, dtype, dev):
    a, b = views((67, 33), critic, dev)
    assert_close_to_float64(
        a, b, dtype, tau=TAU[critic], critic=critic, negatives=negatives, symmetric=symmetric
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_reductions(negatives, symmetric, reduction, dev):
    a, b = views((3, 40, 24), "cosine", dev, seed=4)
    assert_close_to_float64(
        a,
        b,
        torch.float32,
        tau=0.2,
        critic="cosine",
        negatives=negatives,
        symmetric=symmetric,
        reduction=reduction,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", ["all", "cross"])
@pytest.mark.parametrize(
    "shape",
    # 1 row; heads; exactly one tile; D over several staging chunks and output slices
    [(1, 5), (2, 1, 7), (3, 5, 7), (64, 16), (130, 200), (3, 150, 129)],
)
def test_edge_shapes(shape, critic, negatives, dtype, dev):
    a, b = views(shape, critic, dev, seed=5)
    assert_close_to_float64(a, b, dtype, tau=TAU[critic], critic=critic, negatives=negatives)


@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_nan_propagates(critic, negatives, dev):
    a, b = views((70, 9), critic, dev)
    a[3, 2] = float("nan")
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = mimac_kernels.fused_contrastive_loss(
        a_, b_, temperature=TAU[critic], critic=critic, negatives=negatives, backend="cuda"
    )
    assert torch.isnan(out)
    out.backward()
    assert torch.isnan(a_.grad).any()


def _kernel_check(dev, n, d, critic, negatives, dtype, h=1, seed=8, rtol=None):
    """Kernel-level contract vs the tiled float64 reference on the same rounded inputs."""
    case = kernel_case((h, n, d), critic, negatives, dtype, dev, seed=seed)
    errors = kernel_level_errors(cuda_backend, case, grad_rtol=rtol)
    assert not errors, (critic, negatives, dtype, n, errors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_kernel_level_matches_reference(critic, negatives, dtype, dev):
    _kernel_check(dev, 300, 64, critic, negatives, dtype, h=2)


@pytest.mark.emulated
@pytest.mark.parametrize(
    "critic,negatives,dtype",
    [("cosine", "all", torch.bfloat16), ("log_dot", "cross", torch.float32),
     ("dot", "cross", torch.float16)],
)  # fmt: skip
def test_no_race_between_barriers(critic, negatives, dtype, dev):
    """The kernels give the same bits whatever order the emulation runs their blocks
    and threads in (several CTAs, D chunks and output slices): a race between two
    barriers would make some order read a slot too early or too late."""
    if dev.type != "cpu":
        pytest.skip("thread order is the emulation's to choose; on a GPU see compute-sanitizer")
    outputs = {}
    for schedule in EMULATION_SCHEDULES:
        with emulation_schedule(schedule, seed=5):
            case = kernel_case((2, 150, 200), critic, negatives, dtype, dev)
            outputs[schedule] = kernel_outputs(cuda_backend, case)
    names = ("row_lse", "col_lse", "grad_a", "grad_b")
    for schedule in EMULATION_SCHEDULES[1:]:
        for name, x, y in zip(names, outputs["in_order"], outputs[schedule]):
            assert torch.equal(x, y), (schedule, name, max_abs_err(x, y))
        # One atomicAdd per CTA: the block order may change the temperature sum's rounding.
        torch.testing.assert_close(outputs[schedule][4], outputs["in_order"][4], rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_large_n(n, dtype, negatives, monkeypatch, gpu):
    monkeypatch.setattr(reference, "TILE_ELEMS", 1 << 26)  # fewer, larger float64 reference tiles
    _kernel_check(gpu, n, 128, "cosine", negatives, dtype)


def test_reasons(gpu):
    assert cuda_backend.unavailable_reason(gpu, torch.float32) is None
    assert (
        cuda_backend.unavailable_reason(gpu, torch.float64)
        == "dtype float64 not supported (use backend='torch')"
    )
    assert "CUDA tensors" in cuda_backend.unavailable_reason(torch.device("cpu"), torch.float32)
    assert "cuda" in mimac_kernels.available_backends("cuda")


def test_binding_refuses_bad_arguments(dev):
    """binding.cpp's own checks, below the Python layer, name what is wrong."""
    ext = extension.load("cuda")
    a = torch.randn(1, 8, 16, device=dev)
    it = torch.tensor(10.0, device=dev)
    bad = [
        ((a, a[:, :4], it, 0, True, 1e-12), "a and b must be \\(H, N, D\\) of one shape"),
        ((a[0], a[0], it, 0, True, 1e-12), "a and b must be \\(H, N, D\\) of one shape"),
        ((a, a.half(), it, 0, True, 1e-12), "a and b must have one dtype"),
        ((a.double(), a.double(), it, 0, True, 1e-12), "takes float32, float16 or bfloat16"),
        ((a, a, torch.ones(2, device=dev), 0, True, 1e-12), "inv_tau must be a 0-dim tensor"),
        ((a, a, it, 3, True, 1e-12), "unknown critic id 3"),
        ((a, a, it.to("meta"), 0, True, 1e-12), "the cuda backend takes .*inv_tau on meta"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            ext.forward(*args)
