"""What only the fused C++ CPU backend has: ISA variants, group tiles, thread counts,
its own argument checks, and its dispatch (the build layer's own tests are in
``test_extension.py``).

Values and gradients of every backend, this one included, are checked in
``test_backends.py``; tolerance rule: ``tests.kernels.accuracy``. The first test to
need the extension builds it (cached afterwards).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import mimac_kernels
from mimac_kernels import cpu_backend, dispatch, extension
from mimac_kernels.contract import Problem, Stats, Upstream
from mimac_kernels.options import CRITICS, NEGATIVES
from tests.kernels.accuracy import (
    assert_backend_matches_float64,
    kernel_case,
    kernel_level_errors,
    kernel_outputs,
    make_views,
)

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


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_wide_spread_takes_two_exponentials(negatives):
    """Rows of very different norms (dot critic): no common shift suits a tile, so
    each row and column keeps its own; values and gradients must stay accurate."""
    gen = torch.Generator().manual_seed(7)
    scale = torch.logspace(-1, 1.3, 90)[torch.randperm(90, generator=gen)][:, None]
    a = torch.randn(90, 16, generator=gen) * scale
    b = torch.randn(90, 16, generator=gen) * scale.flip(0)
    out = mimac_kernels.fused_contrastive_loss(
        a, b, temperature=0.5, critic="dot", negatives=negatives, reduction="none", backend="cpu"
    )
    assert torch.isfinite(out).all()
    assert_backend_matches_float64(
        "cpu", a, b, torch.float32, tau=0.5, learnable=False, critic="dot", negatives=negatives,
        reduction="none",
    )  # fmt: skip


@pytest.mark.parametrize("negatives", NEGATIVES)
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
    case = kernel_case((4, 70, 19), "dot", "all", torch.float32, CPU)
    p, up = case.problem, case.upstream
    stats = cpu_backend.forward(p)
    with pytest.raises(RuntimeError, match="row statistics must be"):  # one head for four
        cpu_backend.backward(
            p, Stats(stats.row_lse[:1], stats.col_lse),
            Upstream(up.g_row[:1], up.g_col, up.row_center[:1], up.col_center),
        )
    with pytest.raises(RuntimeError, match="column statistics must be"):
        cpu_backend.backward(
            p, stats, Upstream(up.g_row, torch.zeros(4, 3), up.row_center, up.col_center)
        )


# --- kernel level ---------------------------------------------------------------------


@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_kernel_level_matches_reference_every_isa(critic, negatives):
    """The backend contract against the torch backend in float64, for every
    instruction set this CPU runs (AVX-512, AVX2, baseline)."""
    case = kernel_case((2, 70, 19), critic, negatives, torch.float32, CPU)
    before = cpu_backend.isa()
    try:
        for isa in cpu_backend.available_isas():
            cpu_backend.set_isa(isa)
            assert kernel_level_errors(cpu_backend, case) == [], isa
    finally:
        cpu_backend.set_isa(before)


@pytest.fixture
def restore_group():
    yield
    cpu_backend.set_group(0)


@pytest.mark.parametrize("critic", ["cosine", "log_dot"])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_group_tiles_match_reference(critic, negatives, restore_group):
    """Groups of 1 to 9 blocks over 7 blocks of 64 rows (short last groups, one
    group larger than the problem) and two heads: every tile is visited once, the
    diagonal group of "all" included."""
    n = 200 if negatives == "all" else 400  # 400 rows either way: 7 blocks
    case = kernel_case((2, n, 24), critic, negatives, torch.float32, CPU)
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
    case = kernel_case((1, 400, 64), "cosine", "all", torch.float32, CPU)
    threads = torch.get_num_threads()
    cpu_backend.set_group(group)
    outs = []
    try:
        for t in (1, max(2, threads), 3):
            torch.set_num_threads(t)
            outs.append(kernel_outputs(cpu_backend, case))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


def test_half_inputs_are_upcast():
    p = kernel_case((2, 70, 19), "dot", "cross", torch.bfloat16, CPU).problem
    upcast = Problem(p.a.float(), p.b.float(), p.inv_tau, p.critic, p.negatives, p.eps)
    half, full = cpu_backend.forward(p), cpu_backend.forward(upcast)
    assert torch.equal(half.row_lse, full.row_lse) and torch.equal(half.col_lse, full.col_lse)


# --- dispatch and reasons -------------------------------------------------------------


def test_reasons_and_auto_choice():
    assert cpu_backend.probe(CPU, torch.float32) is None
    assert cpu_backend.probe(CPU, torch.float64) == "dtype float64 not supported (use backend='torch')"
    assert "CPU tensors" in cpu_backend.probe(torch.device("cuda"), torch.float32)
    p32 = kernel_case((1, 4, 3), "dot", "all", torch.float32, CPU).problem
    p64 = Problem(p32.a.double(), p32.b.double(), p32.inv_tau, "dot", "all", 1e-12)
    assert dispatch.resolve("auto", p32) == "cpu"
    assert dispatch.resolve("auto", p64) == "torch"
    a = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(mimac_kernels.BackendUnavailable, match="float64 not supported"):
        mimac_kernels.fused_contrastive_loss(a, a, backend="cpu")
    assert "cpu" in mimac_kernels.available_backends("cpu")
