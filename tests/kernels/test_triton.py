"""What only the Triton backend has: D walked in chunks, the running-max fallback of the
fixed shift, split columns and atomics, float16 log_dot weights, its reasons and
refusals, autotuning and the sm_90 compile.

Its values and gradients (matrix of critics, pairings, dtypes, shapes) are in
``test_backends.py``. On a machine without a GPU the kernels run in Triton's
interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is
imported), so shapes stay small. Tolerance rule: ``tests.kernels.accuracy``.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from mimac_kernels import dispatch, fused_contrastive_loss, reference_contrastive_loss
from mimac_kernels.contract import Problem, Upstream
from mimac_kernels.options import NEGATIVES
from tests.kernels.accuracy import (
    PAIRINGS,
    TAU,
    assert_backend_matches_float64,
    error_bound,
    loss_and_grads,
    make_views,
    max_abs_err,
    positives_only,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_WHY = dispatch.unavailable_reason("triton", DEVICE, torch.float32)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=str(_WHY))
if _WHY is None:
    from mimac_kernels.triton import backend as triton_backend
    from mimac_kernels.triton import configs, kernels

# Raw Gaussian rows for dot (no scaling: far below the Cauchy-Schwarz bound of S),
# on the device the kernels run on.
make_views = functools.partial(make_views, device=DEVICE, dot_scale=1.0)
assert_close_to_float64 = functools.partial(assert_backend_matches_float64, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_float_temperature_and_wide_features(negatives: str, dtype: torch.dtype) -> None:
    """D wider than one register tile walks D in chunks (and adds dX chunk by chunk)."""
    a, b = make_views((2, 9, 300), "cosine", seed=4)
    assert_close_to_float64(a, b, dtype, tau=0.3, learnable=False, negatives=negatives)


# The interpreter (numpy) warns when the masked-out self-pair's weight overflows.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("headroom", ["none", "default"])
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_underflowing_shift_falls_back_to_running_max(
    monkeypatch, negatives: str, symmetric: bool, headroom: str
) -> None:
    """cosine at tau = 0.01: exp(S - 1/tau) underflows float32's normal range.

    ``none``: the shift is the bound 1/tau itself (no ``SHIFT_HEADROOM``), so the
    rows below go through the running-max fallback; ``default``: the shift is 36
    (64 below the bound) and the same rows keep their one-pass sums. Unrelated random rows land between the fallback's trigger (2^-60) and float32's
    smallest normal; orthogonal rows (S = 0, e^-100 < ~e^-87) lose their digits
    without the fallback. The orthogonal case leaves the temperature fixed: its
    tau-gradient is ~2e-5, while each row whose positive takes P ~ 1 adds
    g * (s_pos of the tile - s_pos of the row dot) / tau^2: float32's rounding of
    one dot product computed two ways (~1e-7) times 1e4. Every backend shares it
    (measured 7.7e-5 off on torch, cpu and triton; eager float32: 8e-6)."""
    if headroom == "none":
        monkeypatch.setattr(kernels, "SHIFT_HEADROOM", 0.0)
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
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_split_columns_and_atomics(monkeypatch, critic: str, negatives: str) -> None:
    """16x16 tiles, one column block per program: many programs share a row block."""
    for name in ("forward_config", "finalize_config", "backward_config"):
        monkeypatch.setattr(configs, name, _small_tiles)
    monkeypatch.setattr(configs, "target_programs", lambda device: 10**6)
    a, b = make_views((37, 24 if critic == "dot" else 12), critic, seed=6)
    assert_close_to_float64(
        a, b, torch.bfloat16, tau=TAU[critic], critic=critic, negatives=negatives
    )


def _tall_tiles(d: int, itemsize: int, log_dot: bool = False) -> configs.TileConfig:
    return configs.TileConfig(32, 16, 16, d <= 16, 1, 1)


@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-columns"])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_interior_tiles_run_unmasked(monkeypatch, negatives: str, split: bool) -> None:
    """Rows and columns multiples of the tiles: every tile off the diagonal takes the
    kernels' unmasked path, the diagonal ones (two column blocks per 32-row backward
    tile, as the GPU's 128 x 64) the masked one, with whole rows per program or one
    column block each."""
    monkeypatch.setattr(configs, "forward_config", _small_tiles)
    monkeypatch.setattr(configs, "finalize_config", _small_tiles)
    monkeypatch.setattr(configs, "backward_config", _tall_tiles)
    monkeypatch.setattr(configs, "target_programs", lambda device: 10**6 if split else 1)
    a, b = make_views((32, 16), "cosine", seed=7)
    assert_close_to_float64(a, b, torch.bfloat16, tau=TAU["cosine"], negatives=negatives)


def _sliced_tiles(d: int, itemsize: int, log_dot: bool = False) -> configs.TileConfig:
    return configs.TileConfig(32, 16, 128, True, 4, 1, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("critic", ["cosine", "dot", "log_dot"])
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_row_gradient_in_feature_slices(
    monkeypatch, critic: str, negatives: str, symmetric: bool, dtype: torch.dtype
) -> None:
    """The backward's sliced path (the GPU's above D = 128): the whole row block for the
    scores, the row gradient in 32-wide slices, one program each; D = 100 gives four
    slices, the last one ragged (features 96-99)."""
    monkeypatch.setattr(configs, "backward_config", _sliced_tiles)
    assert _sliced_tiles(100, 2).d_slices(100) == 4
    a, b = make_views((2, 21, 100), critic, seed=8, dot_scale=0.1)  # |x| ~ 1 at D = 100
    assert_close_to_float64(
        a, b, dtype, tau=TAU[critic], critic=critic, negatives=negatives, symmetric=symmetric
    )


def _slow(one):
    """``one`` with every head's flag cleared: the backward's two-exponential loop."""
    return dataclasses.replace(one, fast=torch.zeros_like(one.fast))


@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_one_exponential_only_where_the_window_holds(
    monkeypatch, negatives: str, symmetric: bool
) -> None:
    """Half inputs: a head whose row and column sums all stayed in the forward's window
    around its shift takes one exponential per interior element in the backward; a head
    with rows far below its shift (one row of 30x the norm lifts the bound) takes two.
    Both heads against float64 and against the two-exponential loop; the launcher's
    flags are read back."""
    flags = []
    original = triton_backend._one_exp

    def spy(*args):
        out = original(*args)
        flags.append(out.fast.tolist())
        return out

    monkeypatch.setattr(triton_backend, "_one_exp", spy)
    # 16 x 16 tiles: most of them interior (the one-exponential loop), some masked.
    monkeypatch.setattr(configs, "backward_config", _small_tiles)
    a, b = make_views((2, 40, 16), "dot", seed=9, dot_scale=0.3)
    a[1, 0] *= 30
    b[1, 0] *= 30
    a, b = a.bfloat16(), b.bfloat16()
    kw = {"critic": "dot", "negatives": negatives, "symmetric": symmetric}

    def ours(x, y, **k):
        return fused_contrastive_loss(x, y, backend="triton", **k)

    def plain(x, y, **k):
        return reference_contrastive_loss(x, y, dtype=None, **k)

    tau = TAU["dot"]
    _, got = loss_and_grads(ours, a, b, tau, None, False, **kw)
    _, ref = loss_and_grads(reference_contrastive_loss, a.double(), b.double(), tau, None, False,
                            **kw)  # fmt: skip
    _, base = loss_and_grads(plain, a, b, tau, None, False, **kw)
    _, pos = loss_and_grads(positives_only, a, b, tau, None, False, **kw)
    assert flags == [[1, 0]]
    # Kernel level, against the two-exponential loop on the same inputs and statistics:
    # the weights agree to ~1e-5 before their rounding to bfloat16, so the gradients
    # agree to about that rounding (the loss-level check below also sees the positives'
    # gradient, which is computed outside the kernels and is larger).
    problem = Problem(a, b, torch.tensor(1 / tau), "dot", negatives, 1e-12)
    stats = triton_backend.forward(problem)
    gen = torch.Generator().manual_seed(2)
    upstream = Upstream(*(torch.rand(t.shape, generator=gen) / t.shape[-1] for t in
                          (stats.row_lse, stats.col_lse, stats.row_lse, stats.col_lse)))  # fmt: skip
    fast = triton_backend.backward(problem, stats, upstream)
    monkeypatch.setattr(triton_backend, "_one_exp", lambda *args: _slow(original(*args)))
    two = triton_backend.backward(problem, stats, upstream)
    for g, t in ((fast.a, two.a), (fast.b, two.b)):
        for h in range(2):
            bound = torch.finfo(torch.bfloat16).eps * float(t[h].abs().max())
            assert max_abs_err(g[h], t[h]) <= bound, (h, max_abs_err(g[h], t[h]), bound)
    assert max_abs_err(fast.inv_tau, two.inv_tau) <= 1e-5 * float(two.inv_tau.abs())
    for h in range(2):  # each head on its own: head 1's gradients are 10x larger
        for g, r, p, q in zip(got, ref, base, pos, strict=True):
            bound = error_bound(max_abs_err(p[h], r[h]), torch.bfloat16, r[h])
            bound += torch.finfo(torch.bfloat16).eps * float(q[h].abs().max())
            assert max_abs_err(g[h], r[h]) <= bound, (h, max_abs_err(g[h], r[h]), bound)


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
    reference_contrastive_loss(a64, b64, **kw).backward()
    for ref in (a64.grad, b64.grad):
        assert 1e3 < float(ref.abs().max()) < 6e4  # large, but within float16's 65504
    for g, ref in ((ga, a64.grad), (gb, b64.grad)):
        assert torch.isfinite(g).all()
        # The weights rounded to float16 (plain PyTorch's product in float16 does as much);
        # plain PyTorch itself is no yardstick here: its float16 dots underflow.
        assert max_abs_err(g, ref) <= 2 * torch.finfo(torch.float16).eps * float(ref.abs().max())


def test_unavailable_reasons(monkeypatch) -> None:
    probe = triton_backend.probe
    assert "float64" in str(probe(DEVICE, torch.float64))
    assert probe(torch.device("meta"), torch.float32) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in str(probe(torch.device("cpu"), torch.float32))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert probe(torch.device("cpu"), torch.float16) is None


def test_refuses_more_heads_than_a_grid_axis() -> None:
    """65,535 heads run; one more is a refusal (auto moves on), not a launch error."""
    x = torch.zeros(65536, 1, 1, device=DEVICE)
    it = torch.tensor(1.0, device=DEVICE)
    assert triton_backend.refusal(Problem(x[:-1], x[:-1], it, "dot", "all", 1e-12)) is None
    why = triton_backend.refusal(Problem(x, x, it, "dot", "all", 1e-12))
    assert why is not None and "65535 heads" in why and "H=65536" in why
    with pytest.raises(ValueError, match="65535 heads"):
        triton_backend.forward(Problem(x, x, it, "dot", "all", 1e-12))


def test_rejects_bad_inputs() -> None:
    a = torch.randn(1, 4, 3, device=DEVICE)
    it = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="critic"):
        Problem(a, a, it, "l2", "all", 1e-12)
    with pytest.raises(ValueError, match="float64"):
        triton_backend.forward(Problem(a.double(), a.double(), it, "dot", "all", 1e-12))
    t = torch.randn(1, 3, 4, device=DEVICE).transpose(1, 2)  # made contiguous by the Problem
    got = triton_backend.forward(Problem(t, t, it, "dot", "cross", 1e-12))
    want = triton_backend.forward(Problem(t.contiguous(), t.contiguous(), it, "dot", "cross", 1e-12))
    assert torch.equal(got.row_lse, want.row_lse) and torch.equal(got.col_lse, want.col_lse)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_larger_batch_several_tiles(dtype: torch.dtype) -> None:
    """M = 300 rows: several 64-row tiles, the symmetric pairing across them."""
    a, b = make_views((2, 150, 40), "cosine", seed=10)
    assert_close_to_float64(a, b, dtype, tau=0.07, negatives="all")
    assert_close_to_float64(a, b, dtype, tau=0.07, negatives="cross")


def test_autotune_wrappers_build() -> None:
    """MIMAC_KERNELS_AUTOTUNE=1 path: the autotuned kernels can be built (not run: no GPU)."""
    for name in ("fwd", "finalize", "bwd"):
        assert triton_backend._autotuned(name) is not None
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
    why = triton_backend.probe(torch.device("cuda"), torch.float32)
    assert why is not None and "CUDA" in why
