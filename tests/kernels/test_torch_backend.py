"""The torch backend (the kernel-level oracle) against the full-matrix float64 formula
(``reference_contrastive_loss``), gradcheck, and the log_dot closed form."""

from __future__ import annotations

import math

import pytest
import torch

from mimac_kernels import fused_contrastive_loss, reference_contrastive_loss, torch_backend
from mimac_kernels.options import CRITICS, NEGATIVES
from tests.kernels.accuracy import error_bound, max_abs_err

CASES = [
    (critic, neg, sym)
    for critic in CRITICS
    for neg in NEGATIVES
    for sym in ((True, False) if neg == "cross" else (True,))
]


def _inputs(shape, critic, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    if critic == "log_dot":  # probability rows, as the critic expects
        a, b = a.softmax(-1), b.softmax(-1)
    elif critic == "dot":
        a, b = a * 0.3, b * 0.3
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


@pytest.mark.parametrize("critic,negatives,symmetric", CASES)
@pytest.mark.parametrize("shape", [(67, 33), (3, 5, 7), (1, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_naive_float64(critic, negatives, symmetric, shape, reduction, monkeypatch):
    monkeypatch.setattr(torch_backend, "TILE_ELEMS", 300)  # force several row blocks
    a, b = _inputs(shape, critic)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    kw = {"critic": critic, "negatives": negatives, "symmetric": symmetric, "reduction": reduction}
    out = fused_contrastive_loss(a, b, temperature=tau, backend="torch", **kw)
    ref = reference_contrastive_loss(a, b, temperature=tau, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)  # a non-uniform upstream gradient
    got = torch.autograd.grad((out * w).sum(), (a, b, tau))
    want = torch.autograd.grad((ref * w).sum(), (a, b, tau))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("critic,negatives,symmetric", CASES)
def test_gradcheck(critic, negatives, symmetric, monkeypatch):
    monkeypatch.setattr(torch_backend, "TILE_ELEMS", 20)
    a, b = _inputs((2, 6, 5), critic, seed=1)
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def f(a, b, tau):
        return fused_contrastive_loss(
            a, b, temperature=tau, critic=critic, negatives=negatives, symmetric=symmetric,
            reduction="none", backend="torch",
        )

    assert torch.autograd.gradcheck(f, (a, b, tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("critic,negatives,symmetric", CASES)
def test_low_precision_within_bound(dtype, critic, negatives, symmetric):
    a64, b64 = _inputs((67, 33), critic, seed=2)
    a, b = a64.detach().to(dtype).requires_grad_(), b64.detach().to(dtype).requires_grad_()
    t = 0.5 if critic == "log_dot" else 0.1  # tau = 1 would take the closed form
    kw = {"temperature": t, "critic": critic, "negatives": negatives, "symmetric": symmetric}
    ref = reference_contrastive_loss(a.detach(), b.detach(), **kw)  # float64 of the same inputs
    a_r, b_r = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ga_ref, gb_ref = torch.autograd.grad(reference_contrastive_loss(a_r, b_r, **kw), (a_r, b_r))
    a_p, b_p = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    plain = reference_contrastive_loss(a_p, b_p, dtype=None, **kw)  # eager, same dtype
    ga_p, gb_p = torch.autograd.grad(plain, (a_p, b_p))
    out = fused_contrastive_loss(a, b, backend="torch", **kw)
    assert out.dtype == torch.float32
    ga, gb = torch.autograd.grad(out, (a, b))
    assert ga.dtype == dtype
    assert max_abs_err(out, ref) <= error_bound(max_abs_err(plain, ref), dtype, ref)
    assert max_abs_err(ga, ga_ref) <= error_bound(max_abs_err(ga_p, ga_ref), dtype, ga_ref)
    assert max_abs_err(gb, gb_ref) <= error_bound(max_abs_err(gb_p, gb_ref), dtype, gb_ref)


@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_log_dot_closed_form_exact(negatives, symmetric):
    """tau = 1 takes the linear closed form; it equals the full formula, values and grads."""
    a, b = _inputs((3, 41, 10), "log_dot", seed=3)
    kw = {"critic": "log_dot", "negatives": negatives, "symmetric": symmetric, "reduction": "none"}
    out = fused_contrastive_loss(a, b, temperature=1.0, **kw)
    ref = reference_contrastive_loss(a, b, temperature=1.0, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out.sum(), (a, b))
    want = torch.autograd.grad(ref.sum(), (a, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def _sharp_probabilities(n: int, c: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot rows mixed with the uniform at weight alpha; the two views disagree."""
    eye = torch.eye(c)
    a = (1 - alpha) * eye[:n] + alpha / c
    b = (1 - alpha) * eye[n : 2 * n] + alpha / c
    return a, b


@pytest.mark.parametrize("alpha", [1e-3, 1e-5])
def test_log_dot_closed_form_keeps_float32_digits_on_sharp_rows(alpha):
    """z_i . sum_k z_k - |z_i|^2 nearly cancels when z_i is orthogonal to the rest; the
    float32 closed form must still be as accurate as the float32 full-matrix loss."""
    a, b = _sharp_probabilities(32, 64, alpha)
    kw = {"critic": "log_dot", "negatives": "all", "reduction": "none"}
    ref = reference_contrastive_loss(a.double(), b.double(), temperature=1.0, **kw)
    plain = reference_contrastive_loss(a, b, temperature=1.0, dtype=None, **kw)
    out = fused_contrastive_loss(a, b, temperature=1.0, **kw)
    assert out.dtype == torch.float32
    assert max_abs_err(out, ref) <= error_bound(max_abs_err(plain, ref), torch.float32, ref)


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_log_dot_closed_form_clamps_like_the_tiled_loss(negatives):
    """Views with disjoint supports: every dot product is 0, each term is clamped at eps,
    and the loss is log(number of terms), at tau = 1 (closed form) as at any other tau."""
    n = 4
    eye = torch.eye(2 * n)
    a, b = eye[:n], eye[n:]
    kw = {"critic": "log_dot", "negatives": negatives, "reduction": "none"}
    closed = fused_contrastive_loss(a, b, temperature=1.0, **kw)
    tiled = fused_contrastive_loss(a, b, temperature=torch.tensor(1.0, requires_grad=True), **kw)
    terms = 2 * n - 1 if negatives == "all" else n
    torch.testing.assert_close(closed, torch.full_like(closed, math.log(terms)))
    torch.testing.assert_close(tiled.detach(), closed)


def test_log_dot_closed_form_is_taken(monkeypatch):
    """At tau = 1 no backend runs (so no N x N work); a learnable tau uses the tiled op."""
    from mimac_kernels import ops

    calls = []
    real = ops.lse_fwd
    monkeypatch.setattr(ops, "lse_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, b = _inputs((9, 4), "log_dot")
    fused_contrastive_loss(a, b, temperature=1.0, critic="log_dot")
    fused_contrastive_loss(a, b, temperature=torch.tensor(1.0, dtype=torch.float64), critic="log_dot")
    assert calls == []
    fused_contrastive_loss(
        a, b, temperature=torch.tensor(1.0, dtype=torch.float64, requires_grad=True), critic="log_dot"
    )
    assert calls == [1]


def test_closed_form_linear_at_large_m():
    """200k rows of a 10-way probability: the closed form needs no M x M anything."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100_000, 10, generator=g).softmax(-1).requires_grad_()
    b = torch.randn(100_000, 10, generator=g).softmax(-1)
    loss = fused_contrastive_loss(a, b, temperature=1.0, critic="log_dot")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_nan_propagates(critic, negatives):
    a, b = _inputs((8, 5), critic, dtype=torch.float32)
    a = a.detach().clone()
    a[3, 2] = float("nan")
    for t in (0.5, 1.0):
        out = fused_contrastive_loss(a, b, temperature=t, critic=critic, negatives=negatives)
        assert torch.isnan(out), (critic, negatives, t)


def test_heads_are_independent_losses():
    a, b = _inputs((3, 10, 6), "cosine")
    per_head = torch.stack(
        [fused_contrastive_loss(a[h], b[h], reduction="mean") for h in range(3)]
    )
    torch.testing.assert_close(fused_contrastive_loss(a, b), per_head.mean())
    torch.testing.assert_close(fused_contrastive_loss(a, b, reduction="sum"),
                               3 * 20 * per_head.mean())
