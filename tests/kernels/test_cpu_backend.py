"""The fused C++ CPU backend against the float64 formula, and its dispatch (the build
layer's own tests are in ``test_extension.py``).

Tolerance rule (``mimac_kernels.testing.error_bound``): a backend's error
against float64 is at most twice plain PyTorch's error in the same dtype, plus
``ATOL``. The first test to need the extension builds it (cached afterwards).
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import mimac_kernels
from mimac_kernels import cpu_backend, dispatch, extension, reference
from mimac_kernels.testing import (
    assert_backend_matches_float64,
    kernel_case,
    kernel_level_errors,
    make_views,
    naive_contrastive_loss,
)

TAU = {"cosine": 0.1, "dot": 0.5, "log_dot": 0.5}  # log_dot at tau = 1 bypasses the backends
PAIRINGS = [("all", True), ("cross", True), ("cross", False)]
CRITICS = ("cosine", "dot", "log_dot")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dot rows scaled by 0.3 keep x.y / tau moderate; views on the backend's device.
make_views = functools.partial(make_views, device="cpu", dot_scale=0.3)
assert_close_to_float64 = functools.partial(assert_backend_matches_float64, "cpu")
CPU = torch.device("cpu")


def _no_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is None


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    """Build (or load the cached) extension once; a failure fails, never skips."""
    if _no_compiler():
        pytest.skip("no C++ compiler on this machine: the cpu backend cannot be built")
    why = extension.unavailable_reason("cpu")
    assert why is None, why
    return extension.load("cpu")




# --- values and gradients -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
@pytest.mark.parametrize("critic", CRITICS)
def test_matches_float64(critic, negatives, symmetric, dtype):
    a, b = make_views((67, 33), critic)
    assert_close_to_float64(
        a, b, dtype, tau=TAU[critic], critic=critic, negatives=negatives, symmetric=symmetric
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negatives,symmetric", PAIRINGS)
def test_reductions(negatives, symmetric, reduction):
    a, b = make_views((3, 40, 24), "cosine", seed=4)
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


@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", ["all", "cross"])
@pytest.mark.parametrize(
    "shape",
    [(1, 5), (2, 1, 7), (3, 5, 7), (64, 16), (96, 48), (200, 20)],  # 1 row .. 7 blocks, odd/even
)
def test_edge_shapes(shape, critic, negatives):
    a, b = make_views(shape, critic, seed=5)
    assert_close_to_float64(
        a, b, torch.float32, tau=TAU[critic], critic=critic, negatives=negatives
    )


def test_float_temperature_and_several_tiles():
    """A plain float temperature, D = 128, more rows than one round of tiles."""
    a, b = make_views((300, 128), "cosine", seed=6)
    assert_close_to_float64(a, b, torch.float32, tau=0.07, learnable=False, critic="cosine")


@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_wide_spread_takes_two_exponentials(negatives):
    """Rows of very different norms (dot critic): no common shift suits a tile, so
    each row and column keeps its own; values and gradients must stay exact."""
    gen = torch.Generator().manual_seed(7)
    scale = torch.logspace(-1, 1.3, 90)[torch.randperm(90, generator=gen)][:, None]
    a = torch.randn(90, 16, generator=gen) * scale
    b = torch.randn(90, 16, generator=gen) * scale.flip(0)
    kw = {"critic": "dot", "negatives": negatives, "temperature": 0.5, "reduction": "none"}
    out = mimac_kernels.fused_contrastive_loss(a, b, backend="cpu", **kw)
    ref = naive_contrastive_loss(a, b, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(
        mimac_kernels.fused_contrastive_loss(a_, b_, backend="cpu", **kw).sum(), (a_, b_)
    )
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ra, rb = torch.autograd.grad(naive_contrastive_loss(a64, b64, **kw).sum(), (a64, b64))
    torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_nan_propagates(critic, negatives):
    a, b = make_views((70, 9), critic)
    a[3, 2] = float("nan")
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = mimac_kernels.fused_contrastive_loss(
        a_, b_, temperature=TAU[critic], critic=critic, negatives=negatives, backend="cpu"
    )
    assert torch.isnan(out)
    out.backward()
    assert torch.isnan(a_.grad).any() and torch.isnan(b_.grad).any()


@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_inf_probability_is_not_hidden(negatives):
    """log(+inf) must stay inf: the vector log once turned it into log(2^128), a finite loss.
    Which non-finite value (inf or NaN) a row gets may differ from torch's logsumexp."""
    a, b = make_views((6, 8), "log_dot")
    a[2, 3] = float("inf")
    kw = {"temperature": 0.5, "critic": "log_dot", "negatives": negatives, "reduction": "none"}
    a_ = a.clone().requires_grad_()
    out = mimac_kernels.fused_contrastive_loss(a_, b, backend="cpu", **kw)
    ref = mimac_kernels.fused_contrastive_loss(a, b, backend="torch", **kw)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)) and not torch.isfinite(ref).any()
    out.sum().backward()
    assert not torch.isfinite(a_.grad).all()


def test_backward_refuses_statistics_of_the_wrong_shape():
    a, b, inv_tau, g_row, g_col, c_row, c_col = _kernel_inputs("dot", "all", h=4)
    row_lse, col_lse = cpu_backend.forward(a, b, inv_tau, "dot", "all", 1e-12)
    args = (a, b, inv_tau, "dot", "all", 1e-12)
    with pytest.raises(RuntimeError, match="row statistics must be"):  # one head for four
        cpu_backend.backward(*args, row_lse[:1], col_lse, g_row[:1], g_col, c_row[:1], c_col)
    with pytest.raises(RuntimeError, match="column statistics must be"):
        cpu_backend.backward(*args, row_lse, col_lse, g_row, torch.zeros(4, 3), c_row, c_col)


# --- kernel level ---------------------------------------------------------------------


def _kernel_inputs(critic, negatives, h=2, n=70, d=19, seed=8):
    a, b = make_views((h, n, d), critic, seed=seed)
    if critic == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    inv_tau = torch.tensor(1.0 / TAU[critic])
    rows = 2 * n if negatives == "all" else n
    gen = torch.Generator().manual_seed(seed + 1)
    g_row = torch.randn(h, rows, generator=gen)
    g_col = torch.randn(h, n if negatives == "cross" else 0, generator=gen)
    # Temperature centres (the raw positive scores in real use): arbitrary here.
    c_row, c_col = torch.randn_like(g_row), torch.randn_like(g_col)
    return a, b, inv_tau, g_row, g_col, c_row, c_col


@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_kernel_level_matches_reference_every_isa(critic, negatives):
    """The backend contract of dispatch.py, against the torch backend in float64,
    for every instruction set this CPU runs (AVX-512, AVX2, baseline)."""
    a, b, inv_tau, g_row, g_col, c_row, c_col = _kernel_inputs(critic, negatives)
    d64 = [t.double() for t in (a, b, inv_tau)]
    r_row, r_col = reference.forward(*d64, critic, negatives, 1e-12)
    r_grads = reference.backward(
        *d64, critic, negatives, 1e-12, r_row, r_col, g_row.double(), g_col.double(),
        c_row.double(), c_col.double(),
    )
    before = cpu_backend.isa()
    try:
        for isa in cpu_backend.available_isas():
            cpu_backend.set_isa(isa)
            row, col = cpu_backend.forward(a, b, inv_tau, critic, negatives, 1e-12)
            assert row.dtype == col.dtype == torch.float32
            assert row.shape == r_row.shape and col.shape == r_col.shape
            torch.testing.assert_close(row.double(), r_row, rtol=1e-5, atol=1e-5, msg=isa)
            torch.testing.assert_close(col.double(), r_col, rtol=1e-5, atol=1e-5, msg=isa)
            grads = cpu_backend.backward(
                a, b, inv_tau, critic, negatives, 1e-12, r_row.float(), r_col.float(), g_row, g_col,
                c_row, c_col,
            )
            assert grads[2].shape == () and all(g.dtype == torch.float32 for g in grads)
            for g, r in zip(grads, r_grads):
                scale = float(r.abs().max())
                torch.testing.assert_close(
                    g.double(), r, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=isa
                )
    finally:
        cpu_backend.set_isa(before)


@pytest.fixture
def restore_group():
    yield
    cpu_backend.set_group(0)


@pytest.mark.parametrize("critic", ["cosine", "log_dot"])
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_group_tiles_match_reference(critic, negatives, restore_group):
    """Groups of 1 to 9 blocks over 7 blocks of 64 rows (short last groups, one
    group larger than the problem) and two heads: every tile is visited once, the
    diagonal group of "all" included."""
    n = 200 if negatives == "all" else 400  # 400 rows either way: 7 blocks
    case = kernel_case((2, n, 24), critic, negatives, torch.float32, "cpu")
    for g in (1, 2, 3, 4, 7, 9):
        cpu_backend.set_group(g)
        assert kernel_level_errors(cpu_backend, case) == [], f"group {g}"


def test_group_choice(restore_group):
    """Automatic: up to 4 blocks while at least 64 groups remain and the group's
    working set stays within 4 MiB; never the thread count."""
    assert cpu_backend.group(4096, 128) == 1  # 64 blocks
    assert cpu_backend.group(8192, 128) == 2
    assert cpu_backend.group(16384, 128) == 4
    assert cpu_backend.group(1 << 20, 128) == 4
    assert cpu_backend.group(1 << 20, 1024) == 3  # 1.25 MiB per block of the group
    assert cpu_backend.group(1 << 20, 4096) == 1
    cpu_backend.set_group(3)
    assert cpu_backend.group(64, 8) == 3
    with pytest.raises(RuntimeError, match="group must be >= 0"):
        cpu_backend.set_group(-1)
    with pytest.raises(RuntimeError, match="expected n_rows >= 0 and d >= 1"):
        cpu_backend.group(64, 0)


@pytest.mark.parametrize("group", [0, 3])
def test_result_does_not_depend_on_thread_count(group, restore_group):
    """Tiles of one round touch disjoint rows: the sums are the same for any thread count."""
    a, b, inv_tau, g_row, g_col, c_row, c_col = _kernel_inputs("cosine", "all", h=1, n=400, d=64)
    threads = torch.get_num_threads()
    cpu_backend.set_group(group)
    outs = []
    try:
        for t in (1, max(2, threads), 3):
            torch.set_num_threads(t)
            row, col = cpu_backend.forward(a, b, inv_tau, "cosine", "all", 1e-12)
            outs.append(
                (
                    row,
                    *cpu_backend.backward(
                        a, b, inv_tau, "cosine", "all", 1e-12, row, col, g_row, g_col, c_row,
                        c_col,
                    ),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


def test_half_inputs_are_upcast():
    a, b, inv_tau, *_ = _kernel_inputs("dot", "cross")
    row32, col32 = cpu_backend.forward(
        a.bfloat16().float(), b.bfloat16().float(), inv_tau, "dot", "cross", 1e-12
    )
    row16, col16 = cpu_backend.forward(a.bfloat16(), b.bfloat16(), inv_tau, "dot", "cross", 1e-12)
    assert torch.equal(row32, row16) and torch.equal(col32, col16)


# --- dispatch and reasons -------------------------------------------------------------


def test_reasons_and_auto_choice():
    assert cpu_backend.unavailable_reason(CPU, torch.float32) is None
    assert (
        cpu_backend.unavailable_reason(CPU, torch.float64)
        == "dtype float64 not supported (use backend='torch')"
    )
    assert "CPU tensors" in cpu_backend.unavailable_reason(torch.device("cuda"), torch.float32)
    assert dispatch.resolve("auto", CPU, torch.float32) == "cpu"
    assert dispatch.resolve("auto", CPU, torch.float64) == "torch"
    a = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(mimac_kernels.BackendUnavailable, match="float64 not supported"):
        mimac_kernels.fused_contrastive_loss(a, a, backend="cpu")
    assert "cpu" in mimac_kernels.available_backends("cpu")
