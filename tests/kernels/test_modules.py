"""Drop-in modules against the formulas of the libraries they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimac_kernels import ClipLoss, NTXentLoss, ProbabilityContrastLoss, reference_contrastive_loss
from tests.kernels.accuracy import assert_within_bound
from tests.peers import lightly_ntxent_class, open_clip_loss_module


def _lightly_ntxent(out0, out1, temperature):
    """lightly's NTXentLoss without memory bank, written out: CE over [out0; out1]."""
    n = out0.shape[0]
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, labels)


def _open_clip_loss(img, txt, logit_scale):
    logits_per_image = logit_scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def _value_and_grads(fn, *inputs: torch.Tensor, dtype=None) -> list[torch.Tensor]:
    """``fn``'s value and its gradients w.r.t. ``inputs`` (cast to ``dtype``), as a list."""
    xs = [x.detach().to(dtype or x.dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    return [out, *torch.autograd.grad(out, xs)]


def _assert_matches(ours, formula, *inputs: torch.Tensor) -> None:
    """``ours`` against the library's ``formula`` in float64, within the accuracy rule
    (``tests.kernels.accuracy``) of the same formula in the inputs' float32."""
    assert_within_bound(
        _value_and_grads(ours, *inputs), _value_and_grads(formula, *inputs),
        _value_and_grads(formula, *inputs, dtype=torch.float64), torch.float32,
    )


def test_ntxent_matches_lightly():
    g = torch.Generator().manual_seed(0)
    out0 = torch.randn(37, 19, generator=g)
    out1 = torch.randn(37, 19, generator=g)
    _assert_matches(NTXentLoss(temperature=0.5), lambda x, y: _lightly_ntxent(x, y, 0.5), out0, out1)


def test_ntxent_matches_lightly_itself():
    """Against lightly's own ``NTXentLoss`` (its source files, no memory bank): float64
    the reference, float32 the plain error."""
    peer = lightly_ntxent_class()(temperature=0.5)
    g = torch.Generator().manual_seed(2)
    out0, out1 = torch.randn(33, 17, generator=g), torch.randn(33, 17, generator=g)
    _assert_matches(NTXentLoss(temperature=0.5), peer, out0, out1)


def test_clip_loss_matches_open_clip_itself():
    """Against open_clip's own ``ClipLoss`` (its ``loss.py``), learnable log scale."""
    peer = open_clip_loss_module().ClipLoss()
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(27, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(27, 16, generator=g), dim=-1)
    _assert_matches(lambda x, y, s: ClipLoss()(x, y, s.exp()), lambda x, y, s: peer(x, y, s.exp()),
                    img, txt, torch.tensor(2.3))  # fmt: skip


def test_clip_loss_matches_open_clip_with_learnable_scale():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(29, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(29, 16, generator=g), dim=-1)
    log_scale = torch.tensor(2.3)
    _assert_matches(
        lambda x, y, s: ClipLoss()(x, y, s.exp()), lambda x, y, s: _open_clip_loss(x, y, s.exp()),
        img, txt, log_scale,
    )
    assert ClipLoss()(img, txt, 10.0, output_dict=True)["contrastive_loss"].dim() == 0


@pytest.mark.parametrize("shape", [(23, 10), (4, 23, 10)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_probability_contrast_matches_formula(shape, temperature):
    g = torch.Generator().manual_seed(2)
    p1 = torch.randn(*shape, generator=g).softmax(-1)
    p2 = torch.randn(*shape, generator=g).softmax(-1)
    _assert_matches(
        ProbabilityContrastLoss(temperature),
        lambda x, y: reference_contrastive_loss(x, y, temperature=temperature, critic="log_dot",
                                                dtype=None),
        p1, p2,
    )


@pytest.mark.parametrize("cls", [NTXentLoss, ProbabilityContrastLoss])
@pytest.mark.parametrize("bad", [0.0, -1.0, "0.5", float("nan"), True])
def test_modules_reject_bad_temperature(cls, bad):
    with pytest.raises((ValueError, TypeError), match="temperature"):
        cls(temperature=bad)


@pytest.mark.parametrize(
    "bad,exc",
    [(0.0, ValueError), (-2.0, ValueError), (float("inf"), ValueError), ("14", TypeError),
     (True, TypeError), (torch.tensor(0.0), ValueError), (torch.tensor(-2.0), ValueError),
     (torch.tensor([14.0]), ValueError), (torch.tensor(14), ValueError)],
)
def test_clip_loss_rejects_bad_logit_scale(bad, exc):
    x = F.normalize(torch.randn(5, 4), dim=-1)
    with pytest.raises(exc, match="logit_scale"):
        ClipLoss()(x, x, bad)

