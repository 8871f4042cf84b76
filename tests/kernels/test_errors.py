"""Bad input gets a clear error naming the argument; NaN is never hidden."""

from __future__ import annotations

import re

import pytest
import torch

from mimac_kernels import (
    BackendUnavailable,
    available_backends,
    dispatch,
    fused_contrastive_loss,
    reference_contrastive_loss,
)

A = torch.randn(4, 3)


@pytest.mark.parametrize(
    "a,b,kw,exc,words",
    [
        (A, torch.randn(5, 3), {}, ValueError, "same shape"),
        (A, A.double(), {}, TypeError, "same dtype"),
        (torch.randn(4), torch.randn(4), {}, ValueError, "(N, D) or (H, N, D)"),
        (torch.randn(1, 1, 4, 3), torch.randn(1, 1, 4, 3), {}, ValueError, "(N, D) or (H, N, D)"),
        (torch.empty(0, 3), torch.empty(0, 3), {}, ValueError, "non-empty"),
        (A.int(), A.int(), {}, TypeError, "float16, bfloat16, float32"),
        (A.numpy(), A, {}, TypeError, "a must be a torch.Tensor"),
        (A, A, {"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
        (A, A, {"temperature": -0.1}, ValueError, "temperature"),
        (A, A, {"temperature": float("inf")}, ValueError, "temperature"),
        (A, A, {"temperature": "0.1"}, TypeError, "temperature"),
        (A, A, {"temperature": torch.tensor([0.1])}, ValueError, "0-dim"),
        (A, A, {"temperature": torch.tensor(-1.0)}, ValueError, "temperature"),
        (A, A, {"temperature": torch.tensor(float("nan"))}, ValueError, "temperature"),
        (A, A, {"temperature": torch.tensor(1)}, TypeError, "floating point"),
        (A, A, {"critic": "cos"}, ValueError, "critic must be one of"),
        (A, A, {"negatives": "some"}, ValueError, "negatives must be one of"),
        (A, A, {"reduction": "avg"}, ValueError, "reduction must be one of"),
        (A, A, {"backend": "fast"}, ValueError, "backend must be one of"),
        (A, A, {"symmetric": 1}, TypeError, "symmetric must be a bool"),
        (A, A, {"eps": 0.0}, ValueError, "eps"),
    ],
)
def test_bad_input(a, b, kw, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fused_contrastive_loss(a, b, **kw)


def test_device_mismatch_message():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        fused_contrastive_loss(A, meta)


@pytest.mark.parametrize(
    "kw",
    [{}, {"critic": "log_dot", "temperature": 1.0}],  # the tiled op; the linear closed form
    ids=["tiled", "closed-form"],
)
def test_explicit_backend_that_cannot_run_says_why(kw):
    if torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    reason = dispatch.unavailable_reason("cuda", A.device, A.dtype)
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        fused_contrastive_loss(A.softmax(-1), A.softmax(-1), backend="cuda", **kw)


def test_available_backends_lists_torch():
    assert "torch" in available_backends("cpu")


def test_float64_refused_by_fast_backends_with_reason():
    for name in ("cpu", "cuda", "triton"):
        reason = dispatch.unavailable_reason(name, A.device, torch.float64)
        assert reason is not None, name
        message = f"backend {name!r} cannot run cpu/torch.float64 inputs of shape (1, 4, 3): {reason}"
        with pytest.raises(BackendUnavailable, match=re.escape(message)):
            fused_contrastive_loss(A.double(), A.double(), backend=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_cosine_normalises_in_float32(dtype):
    """In float16 eps = 1e-12 is 0 and a norm above 65504 is inf: normalising in the input
    dtype gave NaN for a zero row and a finite wrong loss (every score 0) for large rows."""
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(6, 64, generator=g) * 1e4).to(dtype)  # entries < 65504, norms ~ 80,000
    other = (torch.randn(6, 64, generator=g) * 1e4).to(dtype)
    big[2] = 0
    a, b = big.requires_grad_(), other.requires_grad_()
    out = fused_contrastive_loss(a, b, temperature=0.5)
    ref = reference_contrastive_loss(big.detach(), other.detach(), temperature=0.5)  # float64
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-2)
    ga, gb = torch.autograd.grad(out, (a, b))
    # The zero row's gradient is ~1/eps by definition (x / max(|x|, eps)); the rest is finite.
    assert torch.isfinite(ga[[0, 1, 3, 4, 5]]).all() and torch.isfinite(gb).all()
