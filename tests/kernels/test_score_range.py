"""Accuracy against the largest score ``|S| = |s| / tau``: a sweep over decades.

For every backend that runs on CPU tensors here (``cuda`` through its emulation) the
loss, the input gradients and the temperature gradient are compared with the float64
formula under the project's rule (``accuracy.error_bound``: twice plain float32
PyTorch's error plus a small slack), on float32 inputs (``H = 1``, ``N = 24``,
``D = 16``), for the ``dot`` critic (features scaled so that ``max|S| = 10^k`` at
``tau = 0.1``) and ``cosine`` (``tau = 10^-k``, so ``max|S|`` is near ``10^k``).

What holds (docs/losses.md, "Numerics"):

- the input gradients meet the rule at every decade swept (``|S|`` up to 1e7 for
  ``dot``, 1e8 for ``cosine``);
- the loss and the temperature gradient meet it up to ``RULE_LIMIT`` (the largest
  decade where every backend does); above, their error is the op's own and the
  same for every backend: the positive term ``S_ii`` reaches the loss from its own
  float32 dot product, while plain PyTorch subtracts the very ``S_ii`` of its score
  matrix, so that rounding cancels there and not here (up to half an ulp of
  ``|S|``). There the test checks that a backend adds nothing to the torch
  backend's error (twice it plus the rule's slack).

Not met: the cuda backend with ``dot`` above ``|S| ~ 1e3`` (``KNOWN_GAPS``): its input
gradients drift from the rule there (2e-4 at 1e4, 0.4 at 1e6, where plain float32
PyTorch's error is 1e-6 to 1e-5). Those cases xfail (non-strict: the drift is not
monotonic in |S|) until that backend is fixed; every other case must pass.
"""

from __future__ import annotations

import functools
import math
import os
import shutil

import numpy as np
import pytest
import torch
from torch import Tensor

from mimac_kernels import dispatch
from mimac_kernels.functional import fused_contrastive_loss
from mimac_kernels.reference import reference_contrastive_loss
from tests.kernels.accuracy import error_bound, loss_and_grads, max_abs_err
from tests.kernels.emulation import emulated_cuda_backend

BACKENDS = ("torch", "cpu", "triton", "cuda")
SHAPE = (1, 24, 16)
DOT_TAU = 0.1
#: Decades k of max|S| = 10^k swept per critic.
DECADES = {"dot": range(8), "cosine": range(1, 9)}
#: Largest decade at which the loss and the temperature gradient meet the rule on
#: every backend (above it, the op's shared positive term; see the module docstring).
RULE_LIMIT = {
    ("dot", "loss"): 3,
    ("dot", "grad_tau"): 6,
    ("cosine", "loss"): 2,
    ("cosine", "grad_tau"): 2,
}
NAMES = ("loss", "grad_a", "grad_b", "grad_tau")
#: (backend, critic): largest decade at which it is known to meet the rule.
KNOWN_GAPS = {("cuda", "dot"): 3}


@functools.cache
def interpreter_dots_round_alike() -> bool:
    """Whether numpy's float32 matmul, which Triton's interpreter runs ``tl.dot`` on,
    gives each entry the same bits whatever the shape of the product it sits in.

    The backward recomputes the scores in tiles of another shape than the forward's and
    subtracts the forward's log-sum-exp: at large |S| that needs both passes to round a
    score alike, as the GPU's fixed-order MMA accumulation does. Some BLAS kernels (e.g.
    OpenBLAS with OPENBLAS_CORETYPE=Haswell) sum in a shape-dependent order, so the
    interpreter then cannot stand for the GPU above max|S| ~ 1e2.
    """
    rng = np.random.default_rng(0)
    for m, n, k in ((128, 128, 16), (128, 64, 16), (64, 64, 16), (32, 32, 16)):
        x = rng.standard_normal((m, k), dtype=np.float32)
        y = rng.standard_normal((k, n), dtype=np.float32)
        whole = x @ y
        if not (np.array_equal(whole[:, : n // 2], x @ y[:, : n // 2])
                and np.array_equal(whole[: m // 2], x[: m // 2] @ y)):
            return False
    return True


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """A backend name that runs on CPU tensors here (``cuda``: through the emulation)."""
    name = request.param
    if name in ("cpu", "cuda") and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip(f"no C++ compiler on this machine: the {name} backend cannot be built")
    if name == "cuda":
        with emulated_cuda_backend():
            yield name
        return
    why = dispatch.unavailable_reason(name, torch.device("cpu"), torch.float32)
    if name == "triton" and why is not None:
        pytest.skip(f"triton cannot run on CPU tensors here: {why}")
    assert why is None, why
    yield name


def sweep_inputs(critic: str, decade: int) -> tuple[Tensor, Tensor, float]:
    """Float32 views ``(1, 24, 16)`` and tau with ``max|S|`` about ``10**decade``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(SHAPE, generator=gen)
    b = a + 0.7 * torch.randn(SHAPE, generator=gen)
    if critic == "cosine":
        return a, b, 10.0**-decade
    z = torch.cat([a, b], dim=1)
    largest = float((z @ z.transpose(-1, -2)).abs().max())
    scale = math.sqrt(10.0**decade * DOT_TAU / largest)
    return a * scale, b * scale, DOT_TAU


def _quantities(fn, critic: str, negatives: str, decade: int, double: bool = False):
    a, b, tau = sweep_inputs(critic, decade)
    if double:
        a, b = a.double(), b.double()
    loss, grads = loss_and_grads(fn, a, b, tau, None, True, critic=critic, negatives=negatives)
    return [loss, *grads]


def _plain(x: Tensor, y: Tensor, **kw) -> Tensor:
    return reference_contrastive_loss(x, y, dtype=None, **kw)


@functools.cache
def reference_and_bounds(critic: str, negatives: str, decade: int):
    """The float64 quantities and the rule's bound of each (from plain float32 PyTorch)."""
    ref = _quantities(reference_contrastive_loss, critic, negatives, decade, double=True)
    plain = _quantities(_plain, critic, negatives, decade)
    bounds = [error_bound(max_abs_err(p, r), torch.float32, r) for p, r in zip(plain, ref)]
    return ref, bounds


def errors(backend: str, critic: str, negatives: str, decade: int) -> list[float]:
    """Error against float64 of (loss, grad_a, grad_b, grad_tau) of ``backend``."""

    def ours(x: Tensor, y: Tensor, **kw) -> Tensor:
        return fused_contrastive_loss(x, y, backend=backend, **kw)

    ref, _ = reference_and_bounds(critic, negatives, decade)
    return [max_abs_err(x, r) for x, r in zip(_quantities(ours, critic, negatives, decade), ref)]


@functools.cache
def torch_errors(critic: str, negatives: str, decade: int) -> list[float]:
    return errors("torch", critic, negatives, decade)


CASES = [
    pytest.param(critic, negatives, k, id=f"{critic}-{negatives}-1e{k}")
    for critic in DECADES
    for negatives in ("all", "cross")
    for k in DECADES[critic]
]


@pytest.mark.parametrize("critic, negatives, decade", CASES)
def test_accuracy_across_score_range(backend, critic, negatives, decade):
    if backend == "triton" and decade >= 3 and not interpreter_dots_round_alike():
        pytest.skip("this numpy's float32 matmul rounds an entry differently by the shape of "
                    "the product, so Triton's interpreter cannot reproduce the GPU's scores "
                    "across the forward's and backward's tiles at this |S|")
    _, bounds = reference_and_bounds(critic, negatives, decade)
    errs = errors(backend, critic, negatives, decade)
    base = torch_errors(critic, negatives, decade)
    for name, err, bound, torch_err in zip(NAMES, errs, bounds, base):
        limit = RULE_LIMIT.get((critic, name), max(DECADES[critic]))
        if decade > limit:  # the op's shared positive term: no worse than the torch backend
            bound = max(bound, 2.0 * torch_err + error_bound(0.0, torch.float32))
        if err > bound and decade > KNOWN_GAPS.get((backend, critic), decade):
            pytest.xfail(f"{backend} {critic} above max|S| ~ 1e3: {name} {err:.3g} > {bound:.3g}")
        assert err <= bound, (
            f"{backend} {name}: error {err:.3g} > bound {bound:.3g} at max|S| ~ 1e{decade} "
            f"({critic}, {negatives})"
        )
