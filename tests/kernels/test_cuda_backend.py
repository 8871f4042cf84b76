"""What only the CUDA C++ backend has: race checks under the emulation's schedules,
large N on the GPU, its reasons and the binding's own argument checks.

Its values and gradients on small shapes, on the GPU and (everywhere a C++ compiler
is) through the CPU emulation of ``csrc/emulation``, are in ``test_backends.py``.
Large N (marked slow, GPU only) compares the kernel-level contract with the tiled
float64 torch backend, since the plain loss would need an M x M matrix.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

import mimac_kernels
from mimac_kernels import cuda_backend, extension, torch_backend
from mimac_kernels.options import NEGATIVES
from tests.kernels.accuracy import (
    kernel_case,
    kernel_level_errors,
    kernel_outputs,
    max_abs_err,
    weight_eps,
)
from tests.kernels.emulation import (
    EMULATION_SCHEDULES,
    emulated_cuda_backend,
    emulation_schedule,
)

NO_GPU = "no CUDA device: the cuda backend runs only on a GPU"


def _gpu() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    why = cuda_backend.probe(torch.device("cuda"), torch.float32)
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


def _kernel_check(dev, n, d, critic, negatives, dtype, h=1, seed=8):
    """Kernel-level contract vs the tiled float64 torch backend on the same rounded inputs."""
    case = kernel_case((h, n, d), critic, negatives, dtype, dev, seed=seed)
    errors = kernel_level_errors(cuda_backend, case, weight_eps("cuda", dtype))
    assert not errors, (critic, negatives, dtype, n, errors)


@pytest.mark.emulated
@pytest.mark.parametrize(
    "critic,negatives,dtype",
    [("cosine", "all", torch.bfloat16), ("log_dot", "cross", torch.float32),
     ("dot", "cross", torch.float16), ("cosine", "cross", torch.bfloat16)],
)  # fmt: skip
def test_no_race_between_barriers(critic, negatives, dtype, dev):
    """The kernels give the same bits whatever order the emulation runs their blocks
    and threads in (several CTAs, D chunks and output slices): a race between two
    barriers would make some order read a slot too early or too late. 16-bit cross
    adds its column sums by atomics (cosine: kept, not re-swept; dot's random rows lie
    far below the bound and are re-swept): the block order may round them, and the
    gradients taken from them, differently, by float32 ulps, never by a stale slot."""
    if dev.type != "cpu":
        pytest.skip("thread order is the emulation's to choose; on a GPU see compute-sanitizer")
    outputs = {}
    for schedule in EMULATION_SCHEDULES:
        with emulation_schedule(schedule, seed=5):
            case = kernel_case((2, 150, 200), critic, negatives, dtype, dev)
            outputs[schedule] = kernel_outputs(cuda_backend, case)
    names = ("row_lse", "col_lse", "grad_a", "grad_b")
    atomic_columns = negatives == "cross" and dtype != torch.float32
    for schedule in EMULATION_SCHEDULES[1:]:
        for name, x, y in zip(names, outputs["in_order"], outputs[schedule]):
            if atomic_columns and name != "row_lse":
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
                continue
            assert torch.equal(x, y), (schedule, name, max_abs_err(x, y))
        # One atomicAdd per CTA: the block order may change the temperature sum's rounding.
        torch.testing.assert_close(outputs[schedule][4], outputs["in_order"][4], rtol=1e-5, atol=0)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.emulated
@pytest.mark.parametrize(
    "dtype,d", [(torch.bfloat16, 72), (torch.bfloat16, 512), (torch.float32, 72), (torch.float32, 256)]
)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_fast_and_general_paths_agree(negatives, dtype, d, dev):
    """Whole 16-byte vectors and 16-byte aligned rows take the fast path: vector and
    cp.async staging, the CTA's X rows resident (D = 512 in bf16, 256 in float32: the
    largest resident X, 66,560 bytes); the same values one element past a 16-byte
    boundary take the general path, element-wise staging (the fast path's vector loads
    would fault there: the emulation fails a misaligned one). float32: the same score
    products and sums in the same order, the same bits. bf16 runs the fragment kernels
    on the fast path (the online sums per lane, a quad's partials added at the end):
    the same statistics up to float32 rounding, and gradients closer to float64 than
    the general path's (bf16 V as hi + lo against TF32)."""
    if dev.type != "cpu":
        pytest.skip("the emulation's check of vector alignment; on a GPU it would fault")
    case = kernel_case((1 if d > 128 else 2, 70, d), "dot", negatives, dtype, dev)
    p = case.problem
    odd = dataclasses.replace(p, a=_misaligned(p.a), b=_misaligned(p.b))
    assert p.a.data_ptr() % 16 == 0 and odd.a.data_ptr() % 16 != 0
    fast, general = cuda_backend.forward(p), cuda_backend.forward(odd)
    for name in ("row_lse", "col_lse"):
        if dtype == torch.float32:
            assert torch.equal(getattr(fast, name), getattr(general, name)), name
        else:
            torch.testing.assert_close(getattr(fast, name), getattr(general, name), msg=name)
    # the backward from one set of statistics (the float64 ones, rounded to float32)
    oracle = dataclasses.replace(p, a=p.a.double(), b=p.b.double(), inv_tau=p.inv_tau.double())
    ref_stats = torch_backend.forward(oracle)
    stats = type(ref_stats)(ref_stats.row_lse.float(), ref_stats.col_lse.float())
    up = case.upstream
    up64 = type(up)(*(getattr(up, f.name).double() for f in dataclasses.fields(up)))
    ref = torch_backend.backward(oracle, ref_stats, up64)
    fast_g = cuda_backend.backward(p, stats, case.upstream)
    general_g = cuda_backend.backward(odd, stats, case.upstream)
    if dtype == torch.float32:
        assert torch.equal(fast_g.inv_tau, general_g.inv_tau)
    else:
        torch.testing.assert_close(fast_g.inv_tau, ref.inv_tau.float(), rtol=1e-4, atol=0)
    for name in ("a", "b"):
        x, y, r = getattr(fast_g, name), getattr(general_g, name), getattr(ref, name)
        if dtype == torch.float32:
            assert torch.equal(x, y), (name, max_abs_err(x, y))
        else:
            assert max_abs_err(x, r) < 0.5 * max_abs_err(y, r), name


@pytest.mark.emulated
def test_fast_path_needs_the_devices_shared_memory(dev):
    """With 99 KiB of shared memory per block (sm_86, sm_89), bf16 D = 512, whose fast
    kernels need 102,400 (forward) and 139,136 bytes (backward), runs the general path:
    the general path's bits (from misaligned copies); the fast path's bf16 gradient
    product differs from them, and its launch would fail there."""
    if dev.type != "cpu":
        pytest.skip("the emulated device's shared memory is the emulation's to set")
    case = kernel_case((1, 70, 512), "dot", "all", torch.bfloat16, dev)
    p = case.problem
    odd = dataclasses.replace(case, problem=dataclasses.replace(p, a=_misaligned(p.a),
                                                                 b=_misaligned(p.b)))  # fmt: skip
    general = kernel_outputs(cuda_backend, odd)
    torch.ops.mimac_emu.set_smem_optin(101376)
    try:
        small = kernel_outputs(cuda_backend, case)
    finally:
        torch.ops.mimac_emu.set_smem_optin(166912)
    names = ("row_lse", "col_lse", "grad_a", "grad_b", "grad_inv_tau")
    for name, x, y in zip(names, small, general):
        assert torch.equal(x, y), (name, max_abs_err(x, y))
    fast = kernel_outputs(cuda_backend, case)
    assert not torch.equal(fast[2], general[2])


@pytest.mark.slow
@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_large_n(n, dtype, negatives, monkeypatch, gpu):
    monkeypatch.setattr(torch_backend, "TILE_ELEMS", 1 << 26)  # fewer, larger float64 reference tiles
    _kernel_check(gpu, n, 128, "cosine", negatives, dtype)


def test_reasons(gpu):
    assert cuda_backend.probe(gpu, torch.float32) is None
    assert cuda_backend.probe(gpu, torch.float64) == "dtype float64 not supported (use backend='torch')"
    assert "CUDA tensors" in cuda_backend.probe(torch.device("cpu"), torch.float32)
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
