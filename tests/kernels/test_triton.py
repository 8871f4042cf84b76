"""The Triton backend against float64 (public API) and against the torch backend (kernel level).

On a machine without a GPU the kernels run in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported),
so shapes stay small. The tolerance rule is ``mimac_kernels.testing.error_bound``:
error vs float64 <= 2 x (plain PyTorch's error in the same dtype) + ATOL.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mimac_kernels import fused_contrastive_loss, reference
from mimac_kernels.testing import (
    assert_backend_matches_float64,
    kernel_case,
    kernel_level_errors,
    loss_and_grads,
    make_views,
    max_abs_err,
    naive_contrastive_loss,
)
from mimac_kernels.triton import backend as triton_backend
from mimac_kernels.triton import configs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    triton_backend.unavailable_reason(DEVICE, torch.float32) is not None,
    reason=str(triton_backend.unavailable_reason(DEVICE, torch.float32)),
)

#: Temperatures per critic: cosine at 0.1 takes the fixed-shift fast path; dot on
#: raw Gaussian rows at 0.5 is far below its shift bound, so it exercises the
#: exact (running-max) fallback; log_dot needs tau != 1 to reach the backend.
TAU = {"cosine": 0.1, "dot": 0.5, "log_dot": 0.5}
PAIRINGS = [("all", True), ("cross", True), ("cross", False)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Raw Gaussian rows for dot (no scaling), on the device the kernels run on.
make_views = functools.partial(make_views, device=DEVICE)
assert_close_to_float64 = functools.partial(assert_backend_matches_float64, "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
@pytest.mark.parametrize("critic", ["cosine", "dot", "log_dot"])
def test_matches_float64(critic: str, negatives: str, symmetric: bool, dtype: torch.dtype) -> None:
    a, b = make_views((67, 33), critic)
    assert_close_to_float64(
        a, b, dtype, tau=TAU[critic], critic=critic, negatives=negatives, symmetric=symmetric
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_reductions(negatives: str, symmetric: bool, reduction: str) -> None:
    a, b = make_views((2, 21, 10), "cosine", seed=2)
    assert_close_to_float64(
        a, b, torch.float32, tau=0.2, negatives=negatives, symmetric=symmetric,
        reduction=reduction,
    )  # fmt: skip


@pytest.mark.parametrize(
    "shape,critic,negatives",
    [
        ((1, 1), "dot", "all"),
        ((1, 1), "dot", "cross"),
        ((2, 3), "cosine", "all"),
        ((1, 5), "log_dot", "cross"),
        ((3, 19, 10), "cosine", "all"),  # heads
        ((3, 19, 10), "log_dot", "cross"),
    ],
    ids=str,
)
def test_edge_shapes(shape: tuple[int, ...], critic: str, negatives: str) -> None:
    a, b = make_views(shape, critic, seed=3)
    assert_close_to_float64(
        a, b, torch.float32, tau=TAU[critic], critic=critic, negatives=negatives,
        reduction="none",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_float_temperature_and_wide_features(negatives: str, dtype: torch.dtype) -> None:
    """D wider than one register tile walks D in chunks (and adds dX chunk by chunk)."""
    a, b = make_views((2, 9, 300), "cosine", seed=4)
    assert_close_to_float64(a, b, dtype, tau=0.3, learnable=False, negatives=negatives)


# The interpreter (numpy) warns when the masked-out self-pair's weight overflows.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_underflowing_shift_falls_back_to_running_max(negatives: str, symmetric: bool) -> None:
    """cosine at tau = 0.01: exp(S - 1/tau) underflows float32's normal range.

    Unrelated random rows land between the fallback's trigger (2^-60) and float32's
    smallest normal; orthogonal rows (S = 0, e^-100 < ~e^-87) lose their digits
    without the fallback. The orthogonal case leaves the temperature fixed: its
    tau-gradient is ~2e-5, while each row whose positive takes P ~ 1 adds
    g * (s_pos of the tile - s_pos of the row dot) / tau^2: float32's rounding of
    one dot product computed two ways (~1e-7) times 1e4. Every backend shares it
    (measured 7.7e-5 off on torch, cpu and triton; eager float32: 8e-6)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(40, 16, generator=gen)
    b = torch.randn(40, 16, generator=gen)
    b[:5] = a[:5]  # a few rows near the bound, the rest far below it
    assert_close_to_float64(
        a.to(DEVICE), b.to(DEVICE), torch.float32, tau=0.01, negatives=negatives,
        symmetric=symmetric,
    )  # fmt: skip
    q = torch.linalg.qr(torch.randn(128, 128, generator=gen))[0]
    a, b = q[:40].clone(), q[40:80].clone()  # every pair orthogonal
    b[:5] = a[:5]
    assert_close_to_float64(
        a.to(DEVICE), b.to(DEVICE), torch.float32, tau=0.01, learnable=False,
        negatives=negatives, symmetric=symmetric,
    )  # fmt: skip


def _small_tiles(d: int, itemsize: int, log_dot: bool = False) -> configs.TileConfig:
    return configs.TileConfig(16, 16, 16, d <= 16, 1, 1)


@pytest.mark.parametrize("critic", ["cosine", "dot"])
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_split_columns_and_atomics(monkeypatch, critic: str, negatives: str) -> None:
    """16x16 tiles, one column block per program: many programs share a row block."""
    for name in ("forward_config", "finalize_config", "backward_config"):
        monkeypatch.setattr(configs, name, _small_tiles)
    monkeypatch.setattr(configs, "target_programs", lambda device: 10**6)
    a, b = make_views((37, 24 if critic == "dot" else 12), critic, seed=6)
    assert_close_to_float64(
        a, b, torch.bfloat16, tau=TAU[critic], critic=critic, negatives=negatives
    )


@pytest.mark.parametrize("critic", ["cosine", "dot", "log_dot"])
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_kernel_level_matches_reference(critic: str, negatives: str) -> None:
    """forward/backward of the backend module against ``mimac_kernels.reference``."""
    a, b = make_views((2, 45, 20), critic, seed=7)
    if critic == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    inv_tau = torch.tensor(1.7, device=DEVICE)
    eps = 1e-12
    row, col = triton_backend.forward(a, b, inv_tau, critic, negatives, eps)
    ref_row, ref_col = reference.forward(a, b, inv_tau, critic, negatives, eps)
    assert row.shape == ref_row.shape and col.shape == ref_col.shape
    torch.testing.assert_close(row, ref_row, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col, ref_col, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(8)
    g_row = torch.randn(ref_row.shape, generator=gen).to(DEVICE)
    g_col = torch.randn(ref_col.shape, generator=gen).to(DEVICE)
    c_row = torch.randn(ref_row.shape, generator=gen).to(DEVICE)  # temperature centres
    c_col = torch.randn(ref_col.shape, generator=gen).to(DEVICE)
    args = (a, b, inv_tau, critic, negatives, eps, ref_row, ref_col, g_row, g_col, c_row, c_col)
    ga, gb, gt = triton_backend.backward(*args)
    ra, rb, rt = reference.backward(*args)
    assert ga.dtype == gb.dtype == gt.dtype == torch.float32 and gt.dim() == 0
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt, rt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("critic", ["cosine", "dot", "log_dot"])
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_kernel_level_half_inputs(dtype: torch.dtype, critic: str, negatives: str) -> None:
    """Half inputs against float64 on the same rounded values: far tighter than the
    end-to-end rule (2x plain PyTorch in that dtype), which bf16's own error makes loose.
    bf16 gradients get 1e-2 of their largest entry: the backward's second product takes
    the weights in bf16 (8 significant bits; measured 0.2-0.5 %). float16 keeps 2e-3."""
    case = kernel_case((2, 45, 20), critic, negatives, dtype, DEVICE)
    grad_rtol = 1e-2 if dtype == torch.bfloat16 else None
    assert kernel_level_errors(triton_backend, case, grad_rtol=grad_rtol) == []


@pytest.mark.parametrize("critic", ["cosine", "dot", "log_dot"])
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_nan_propagates(critic: str, negatives: str, symmetric: bool) -> None:
    """A NaN input gives NaN exactly where float64 PyTorch gives NaN (and in the grads)."""
    a, b = make_views((20, 8), critic, seed=9)
    a[3, 2] = float("nan")
    kw = {"critic": critic, "negatives": negatives, "symmetric": symmetric, "reduction": "none"}
    tau = TAU[critic]
    a_t = a.clone().requires_grad_()
    out = fused_contrastive_loss(a_t, b, temperature=tau, backend="triton", **kw)
    ref = naive_contrastive_loss(a, b, temperature=tau, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    (grad,) = torch.autograd.grad(out.nansum() + out[torch.isnan(out)].sum(), [a_t])
    assert torch.isnan(grad).any()


def test_float16_log_dot_gradient_beyond_float16_range_inside() -> None:
    """log_dot weights W / dot overflow float16 (dots ~ 1e-9) while the gradient fits."""
    gen = torch.Generator().manual_seed(0)
    a = F.softmax(6 * torch.randn(40, 6, generator=gen), dim=-1).half().to(DEVICE)
    b = F.softmax(6 * torch.randn(40, 6, generator=gen), dim=-1).half().to(DEVICE)
    kw = {"temperature": 4.0, "critic": "log_dot"}
    _, (ga, gb) = loss_and_grads(
        lambda x, y, **k: fused_contrastive_loss(x, y, backend="triton", **k),
        a, b, 4.0, None, False, critic="log_dot",
    )  # fmt: skip
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    naive_contrastive_loss(a64, b64, **kw).backward()
    for ref in (a64.grad, b64.grad):
        assert 1e3 < float(ref.abs().max()) < 6e4  # large, but within float16's 65504
    for g, ref in ((ga, a64.grad), (gb, b64.grad)):
        assert torch.isfinite(g).all()
        assert max_abs_err(g, ref) <= 2e-3 * float(ref.abs().max())


def test_unavailable_reasons(monkeypatch) -> None:
    reason = triton_backend.unavailable_reason
    assert "float64" in str(reason(DEVICE, torch.float64))
    assert reason(torch.device("meta"), torch.float32) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in str(reason(torch.device("cpu"), torch.float32))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert reason(torch.device("cpu"), torch.float16) is None


def test_rejects_bad_inputs() -> None:
    from mimac_kernels.triton import launch

    a = torch.randn(1, 4, 3, device=DEVICE)
    it = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="critic"):
        launch.forward(a, a, it, "l2", "all", 1e-12)
    with pytest.raises(TypeError, match="float32"):
        launch.forward(a.double(), a.double(), it, "dot", "all", 1e-12)
    with pytest.raises(ValueError, match="contiguous"):
        t = torch.randn(1, 3, 4, device=DEVICE).transpose(1, 2)
        launch.forward(t, t, it, "dot", "all", 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_larger_batch_several_tiles(dtype: torch.dtype) -> None:
    """M = 300 rows: several 64-row tiles, the symmetric pairing across them."""
    a, b = make_views((2, 150, 40), "cosine", seed=10)
    assert_close_to_float64(a, b, dtype, tau=0.07, negatives="all")
    assert_close_to_float64(a, b, dtype, tau=0.07, negatives="cross")


def test_autotune_wrappers_build() -> None:
    """MIMAC_KERNELS_AUTOTUNE=1 path: the autotuned kernels can be built (not run: no GPU)."""
    from mimac_kernels.triton import launch

    for name in ("fwd", "finalize", "bwd"):
        assert launch._autotuned(name) is not None
    assert all(c["BLOCK_M"] == c["BLOCK_N"] for c in configs.autotune_configs(True))


_COMPILE_SCRIPT = r"""
import sys
try:
    from benchmarks.triton_resources import SM90_SHARED, compile_variants, resource_usage
    cases = [("bf16", 128, True, False), ("bf16", 300, False, False), ("fp16", 64, True, True),
             ("fp32", 64, False, True)]
    compiled = list(compile_variants(cases))
except (ImportError, TypeError) as exc:  # triton < 3.2: no offline compile API
    print("NOAPI", exc)
    sys.exit(0)
for desc, ck in compiled:
    use = resource_usage(ck)
    assert use["shared"] <= SM90_SHARED, (desc, use)
    print(desc["kernel"], desc["dtype"], desc["D"], use)
print("COMPILED")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """The heuristic configs compile to sm_90 cubins that fit in shared memory, and
    cuobjdump reads their resources (no GPU needed: Triton's own ptxas and cuobjdump)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-c", _COMPILE_SCRIPT]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=root)
    if proc.stdout.startswith("NOAPI"):
        pytest.skip(f"this triton has no offline compile API: {proc.stdout.strip()}")
    assert "COMPILED" in proc.stdout, proc.stderr[-3000:]
    assert proc.stdout.count("'registers'") == 12, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_device_without_cuda_is_refused() -> None:
    why = triton_backend.unavailable_reason(torch.device("cuda"), torch.float32)
    assert why is not None and "CUDA" in why
