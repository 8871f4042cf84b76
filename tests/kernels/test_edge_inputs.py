"""Edge inputs of the op on every backend that runs here: rows of huge norm (cosine),
eps at the bottom of the compute dtype, log_dot at tau = 1 on rows it was not made for,
a huge ``logit_scale``, and a seeded fuzz of bad inputs. Each case is refused with an
error naming the argument, or matches the float64 formula (``reference_contrastive_loss``)
within the tolerance rule of ``tests.kernels.accuracy.error_bound``, or is NaN where the
input has NaN.

Backends: ``torch``, ``cpu`` (built on first use), ``triton`` (interpreter on CPU
tensors) and ``cuda`` (its kernels' source on CPU tensors through the emulation).
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil

import pytest
import torch

from mimac_kernels import cpu_backend, dispatch
from mimac_kernels.contract import Problem
from mimac_kernels.functional import fused_contrastive_loss, min_eps
from mimac_kernels.modules import ClipLoss
from mimac_kernels.reference import reference_contrastive_loss
from tests.kernels.accuracy import error_bound, loss_and_grads, max_abs_err, positives_only
from tests.kernels.emulation import emulated_cuda_backend

BACKENDS = ("torch", "cpu", "triton", "cuda")
CPU = torch.device("cpu")


def _has_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """A backend name that runs on CPU tensors here (``cuda``: through the emulation)."""
    name = request.param
    if name in ("cpu", "cuda") and not _has_compiler():
        pytest.skip(f"no C++ compiler on this machine: the {name} backend cannot be built")
    if name == "cuda":
        with emulated_cuda_backend():
            yield name
        return
    why = dispatch.unavailable_reason(name, CPU, torch.float32)
    if name == "triton" and why is not None:
        pytest.skip(f"triton cannot run on CPU tensors here: {why}")
    assert why is None, why  # torch always; cpu wherever a compiler is
    yield name


def _views(shape, seed=0, critic="cosine"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = a + 0.7 * torch.randn(shape, generator=g)
    if critic == "log_dot":
        a, b = a.softmax(-1), b.softmax(-1)
    return a, b


def _ours(backend):
    def fn(x, y, **kw):
        return fused_contrastive_loss(x, y, backend=backend, **kw)

    return fn


def _plain(x, y, **kw):
    return reference_contrastive_loss(x, y, dtype=None, **kw)


def _grad_slack(dtype, part, condition: float = 1.0):
    """The positive pairs' part of an input gradient reaches it rounded to the input dtype
    on its own (``assert_backend_matches_float64``): an ulp of that part, times the
    dot product's condition number for log_dot (the part is divided by it)."""
    return torch.finfo(dtype).eps * float(part.abs().max()) * condition


# -- 7. cosine rows of huge (or tiny) norm ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("negatives", ["all", "cross"])
@pytest.mark.parametrize("power", [66, 100, -90])
def test_cosine_is_scale_invariant(backend, dtype, negatives, power):
    """Rows scaled by 2^power (exact in both dtypes): the loss is the unscaled one and
    the input gradients are 2^-power times the unscaled ones, within the tolerance rule
    of the unscaled inputs. Above |x| ~ 1.8e19 |x|^2 overflowed float32 and every row
    became 0 (the loss log(2N - 1)); below ~1e-19 it underflowed."""
    a, b = (t.to(dtype) for t in _views((2, 7, 5), seed=power % 7))
    eps = min_eps(dtype) if power < 0 else 1e-12  # tiny rows stay above eps
    kw = {"critic": "cosine", "negatives": negatives, "eps": eps}
    scale = 2.0**power
    out, grads = loss_and_grads(_ours(backend), a * scale, b * scale, 0.2, None, True, **kw)
    ref, ref_grads = loss_and_grads(reference_contrastive_loss, a.double(), b.double(), 0.2, None,
                                    True, **kw)
    plain, plain_grads = loss_and_grads(_plain, a, b, 0.2, None, True, **kw)
    rescaled = [grads[0].double() * scale, grads[1].double() * scale, grads[2]]
    for name, x, r, p in zip(("loss", "grad_a", "grad_b", "grad_tau"), [out, *rescaled],
                             [ref, *ref_grads], [plain, *plain_grads]):
        bound = error_bound(max_abs_err(p, r), dtype, r)
        if name in ("grad_a", "grad_b"):
            bound += _grad_slack(dtype, r)
        err = max_abs_err(x, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (2^{power}, {dtype})"


def test_cosine_rows_at_float32_max_and_below_eps(backend):
    """A row near float32's largest value (its norm overflows even when scaled sums do
    not) and a row below eps (``x / eps``, as the definition says) against float64."""
    a, b = _views((5, 4), seed=3)
    a[0] = torch.tensor([3.0e38, -3.0e38, 1.0e38, 0.0])
    b[1] = 1e-14  # norm 2e-14 < eps = 1e-12
    kw = {"critic": "cosine", "negatives": "all", "reduction": "none"}
    out = fused_contrastive_loss(a, b, temperature=0.3, backend=backend, **kw)
    ref = reference_contrastive_loss(a, b, temperature=0.3, **kw)
    assert max_abs_err(out, ref) <= 1e-5 * (1 + float(ref.abs().max()))


# -- 8. eps at the bottom of the compute dtype ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1e-300, 1e-40, 1e-45])
@pytest.mark.parametrize("critic", ["cosine", "log_dot"])
def test_eps_below_the_compute_dtype_is_refused(backend, dtype, eps, critic):
    """eps = 1e-300 became 0 in float32 (NaN/inf where float64 is finite); subnormal eps
    kept few digits and the cpu kernel read it wrongly. Refused, naming the smallest eps."""
    a, b = (t.to(dtype) for t in _views((4, 3), critic=critic))
    with pytest.raises(ValueError, match=r"eps must be >= 1\.17549"):
        fused_contrastive_loss(a, b, temperature=0.5, critic=critic, eps=eps, backend=backend)


def test_eps_for_float64_inputs():
    """float64 inputs compute in float64: 1e-300 is kept, below its smallest normal is not."""
    a, b = (t.double() for t in _views((4, 3), critic="log_dot"))
    kw = {"temperature": 0.5, "critic": "log_dot", "backend": "torch"}
    out = fused_contrastive_loss(a, b, eps=1e-300, **kw)
    ref = reference_contrastive_loss(a, b, temperature=0.5, critic="log_dot", eps=1e-300)
    assert max_abs_err(out, ref) <= 1e-10
    with pytest.raises(ValueError, match=r"eps must be >= 2\.2250738585072014e-308"):
        fused_contrastive_loss(a, b, eps=1e-310, **kw)


@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_smallest_accepted_eps_clamps_like_float64(backend, negatives):
    """Rows with disjoint supports: every cross term is clamped at the smallest eps the
    op takes (float32's smallest normal), so log(eps) / tau enters every sum."""
    eps = min_eps(torch.float32)
    n = 3
    eye = torch.eye(2 * n) * 0.9 + 0.1 / (2 * n) * torch.eye(2 * n).roll(1, dims=1)
    a, b = eye[:n], eye[n:]
    kw = {"critic": "log_dot", "negatives": negatives, "reduction": "none", "eps": eps}
    out = fused_contrastive_loss(a, b, temperature=0.5, backend=backend, **kw)
    ref = reference_contrastive_loss(a, b, temperature=0.5, **kw)
    plain = reference_contrastive_loss(a, b, temperature=0.5, dtype=None, **kw)
    assert max_abs_err(out, ref) <= error_bound(max_abs_err(plain, ref), torch.float32, ref)


@pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler: no cpu backend")
@pytest.mark.parametrize("eps", [1e-40, 1e-45])
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_cpu_kernel_reads_subnormal_eps(eps, negatives):
    """The kernel-level contract takes any float32 eps: the cpu kernel's vector log
    decoded subnormal inputs as normal ones (17.136 for 16.456 at 1e-40)."""
    # One-hot rows on distinct coordinates: every dot product is 0, every term clamped.
    z = torch.eye(8)[None] * 0.5
    a, b = z[:, :4], z[:, 4:]
    eps32 = float(torch.tensor(eps, dtype=torch.float32))  # what the kernel sees
    inv_tau = torch.tensor(2.0)
    stats = cpu_backend.forward(Problem(a, b, inv_tau, "log_dot", negatives, eps))
    row, col = stats.row_lse, stats.col_lse
    a64, b64 = a.double(), b.double()
    if negatives == "all":
        z = torch.cat([a64, b64], dim=1)
        s = 2.0 * (z @ z.transpose(-1, -2)).clamp_min(eps32).log()
        s = s.masked_fill(torch.eye(8, dtype=torch.bool), float("-inf"))
        want = [(row, s.logsumexp(-1))]
    else:
        s = 2.0 * (a64 @ b64.transpose(-1, -2)).clamp_min(eps32).log()
        want = [(row, s.logsumexp(-1)), (col, s.logsumexp(-2))]
    for got, ref in want:
        assert torch.allclose(got.double(), ref, rtol=2e-6, atol=2e-5), (got, ref)


# -- 9. log_dot at tau = 1 ---------------------------------------------------------------


def _log_dot_near_one(backend, a, b, negatives):
    """Losses at tau = 1 - 1e-6, 1 (float), 1 (learnable tensor), 1 + 1e-6, and float64's."""
    kw = {"critic": "log_dot", "negatives": negatives, "reduction": "none", "backend": backend}
    taus = [1 - 1e-6, 1.0, torch.tensor(1.0, requires_grad=True), 1 + 1e-6]
    outs = [fused_contrastive_loss(a, b, temperature=t, **kw).detach() for t in taus]
    kw.pop("backend")
    ref = reference_contrastive_loss(a, b, temperature=1.0, **kw)
    plain = reference_contrastive_loss(a, b, temperature=1.0, dtype=None, **kw)
    return outs, ref, plain


@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_log_dot_at_unit_temperature_on_signed_rows(backend, negatives):
    """Rows with negative entries: the closed form (exact only for non-negative rows)
    gave 4.5976 at tau = 1 and 11.7237 beside it. Now the same function everywhere."""
    a, b = _views((2, 6, 5), seed=1)
    outs, ref, plain = _log_dot_near_one(backend, a, b, negatives)
    bound = error_bound(max_abs_err(plain, ref), torch.float32, ref)
    for out in outs:
        assert max_abs_err(out, ref) <= bound + 1e-5 * float(ref.abs().max())  # tau +- 1e-6


@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_log_dot_at_unit_temperature_near_the_clamp(backend, negatives):
    """Non-negative rows whose dot products straddle eps (some 0, some 2.25e-12): the
    closed form's one clamp of the sum at n eps is not the per-term clamp there."""
    n, d = 4, 2 * 4 + 1
    z = torch.zeros(2 * n, d)
    z[torch.arange(2 * n), torch.arange(2 * n) % (d - 1)] = 1e-6  # own coordinate
    z[::2, -1] = 1.5e-6  # half the rows share one more
    a, b = z[:n], z[n:]
    outs, ref, plain = _log_dot_near_one(backend, a, b, negatives)
    bound = error_bound(max_abs_err(plain, ref), torch.float32, ref)
    for out in outs:
        assert max_abs_err(out, ref) <= bound + 1e-5 * float(ref.abs().max())


# -- 10. ClipLoss at a huge logit_scale -------------------------------------------------


@pytest.mark.parametrize("scale", [1e30, 1e20, 3e4])
def test_clip_logit_scale_gradient_at_huge_scale(backend, scale):
    """dL/dlogit_scale was NaN at 1e30 (dL/dtau * dtau/dscale overflowed float32)."""
    a, b = (torch.nn.functional.normalize(t, dim=-1) for t in _views((6, 5), seed=2))
    s = torch.tensor(scale, requires_grad=True)
    loss = ClipLoss(backend=backend)(a, b, s)
    (g,) = torch.autograd.grad(loss, s)
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ref = reference_contrastive_loss(a.double(), b.double(), temperature=1 / s64, critic="dot",
                                 negatives="cross")
    (g64,) = torch.autograd.grad(ref, s64)
    assert math.isfinite(float(g))
    assert abs(float(loss) - float(ref)) <= 1e-6 * abs(float(ref)) + 1e-5
    assert abs(float(g) - float(g64)) <= 1e-5 * (1 + abs(float(g64)))


def test_logit_scale_beyond_float32_is_refused():
    a, b = _views((4, 3))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        ClipLoss()(a, b, torch.tensor(1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        ClipLoss()(a, b, 1e300)
    with pytest.raises(ValueError, match="temperature must be finite"):
        fused_contrastive_loss(a, b, temperature=1e-300)  # 1 / tau overflows float32


# -- fuzz: bad and extreme inputs ----------------------------------------------------------

#: Seeded cases per backend (the interpreted and emulated ones are slower per call).
FUZZ_CASES = {"torch": 300, "cpu": 300, "triton": 100, "cuda": 100}
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)
LAYOUTS = ("contiguous", "transposed", "expanded", "strided")
#: Temperatures, valid and invalid: values, or names of the tensors each case builds.
GOOD_TAUS = (0.05, 0.3, 1.0, 2.5, "tensor", "tensor_grad", "tensor64", "tensor_one")
BAD_TAUS = (0.0, -0.5, math.inf, math.nan, 1e-300, True, "0.1", "shape", "int", "meta", "nan_t")
GOOD_EPS = (1e-12, 1e-12, 1e-6, 1e-30, 2e-38)
BAD_EPS = (0.0, -1e-3, 1.0, math.nan, 1e-300, True, "1e-12")


class Case:
    """One fuzz case: the call's arguments, the leaves to differentiate, and which
    arguments are bad (an error must name one of them; none: it must run)."""

    def __init__(self, rng, backend: str):
        self.rng, self.bad = rng, set()
        r = rng.random
        self.dtype = rng.choice(DTYPES)
        self.kw = {
            "critic": rng.choice(("cosine", "dot", "log_dot")),
            "negatives": rng.choice(("all", "cross")),
            "symmetric": rng.random() < 0.7,
            "reduction": rng.choice(("mean", "sum", "none")),
            "backend": backend,
        }
        heads = rng.choice((None, 1, 3))
        self.shape = (*(() if heads is None else (heads,)), rng.choice((1, 2, 3, 5, 8)),
                      rng.choice((1, 2, 5, 16)))
        self.values = rng.choice(("normal",) * 5 + ("nan", "inf", "huge", "tiny", "zero_row"))
        self.layout = rng.choice(LAYOUTS)
        self.learn_tau = False
        self.temperature = self._temperature(r() < 0.15)
        if r() < 0.15:
            self.kw["eps"] = rng.choice(BAD_EPS)
            self.bad.add("eps")
        elif r() < 0.3:
            self.kw["eps"] = rng.choice(GOOD_EPS)
        if self.dtype == torch.float64:  # float64 keeps these
            if self.kw.get("eps") == 1e-300:
                self.bad.discard("eps")
            if isinstance(self.temperature, float) and self.temperature == 1e-300:
                self.bad.discard("temperature")
        if r() < 0.08:
            name, value = rng.choice((("critic", "cos"), ("negatives", "some"),
                                      ("reduction", "avg"), ("symmetric", 1)))
            self.kw[name] = value
            self.bad.add(name)
        if self.dtype == torch.float64 and backend != "torch":
            self.bad.add("backend")  # the compiled and Triton kernels take no float64
        self.a, self.b, self.leaves, self.make = self._inputs(r() < 0.12)

    def _temperature(self, bad: bool):
        if bad:
            self.bad.add("temperature")
            choice = self.rng.choice(BAD_TAUS)
            tensors = {"shape": torch.tensor([0.1]), "int": torch.tensor(1),
                       "meta": torch.tensor(0.1, device="meta"), "nan_t": torch.tensor(math.nan)}
            return tensors.get(choice, choice) if isinstance(choice, str) and choice != "0.1" \
                else choice
        if self.kw["critic"] == "log_dot" and self.rng.random() < 0.4:
            return 1.0  # the closed form's temperature
        choice = self.rng.choice(GOOD_TAUS)
        if choice == "tensor_grad":
            self.learn_tau = True
            return torch.tensor(self.rng.choice((0.07, 0.5, 1.0)), requires_grad=True)
        if choice == "tensor64":
            return torch.tensor(0.4, dtype=torch.float64)
        if choice in ("tensor", "tensor_one"):
            return torch.tensor(1.0 if choice == "tensor_one" else 0.2)
        return choice

    def _inputs(self, bad: bool):
        """a, b (views of float leaves in the case's layout), the leaves, and the view."""
        gen = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        *lead, n, d = self.shape
        if self.layout == "transposed":
            base_shape = (*lead, d, n)
        elif self.layout == "expanded":
            base_shape = (*lead, 1, d)
        elif self.layout == "strided":
            base_shape = (*lead, n, 2 * d)
        else:
            base_shape = (*lead, n, d)

        def view(t):
            if self.layout == "transposed":
                return t.transpose(-1, -2)
            if self.layout == "expanded":
                return t.expand(*lead, n, d)
            return t[..., ::2] if self.layout == "strided" else t

        leaves = []
        for _ in range(2):
            x = torch.randn(base_shape, generator=gen, dtype=torch.float64)
            if self.kw["critic"] == "log_dot" and self.rng.random() < 0.8:
                x = torch.softmax(2 * x, dim=-1)  # probability rows, as the critic expects
            x = self._values(x, gen)
            leaves.append(x.to(self.dtype).requires_grad_())
        a, b = view(leaves[0]), view(leaves[1])
        if bad:
            kind = self.rng.choice(("1d", "4d", "rows", "empty", "int", "dtypes", "meta", "list"))
            a, b = self._bad_inputs(kind, a, b)
        return a, b, leaves, view

    def _values(self, x, gen):
        if self.values == "huge":
            x = x * (3e4 if self.dtype == torch.float16 else self.rng.choice((1e20, 1e30)))
        elif self.values == "tiny":
            x = x * self.rng.choice((1e-20, 1e-30))
        elif self.values == "zero_row":
            x[..., 0, :] = 0.0
        elif self.values in ("nan", "inf") and self.rng.random() < 0.7:
            flat = x.view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = (
                math.nan if self.values == "nan" else self.rng.choice((math.inf, -math.inf))
            )
        return x

    def _bad_inputs(self, kind, a, b):
        self.bad.update({"a", "b"})
        if kind == "1d":
            return a.reshape(-1), b.reshape(-1)
        if kind == "4d":
            return a[None, None], b[None, None]
        if kind == "rows":
            return a, torch.cat([b, b], dim=-2)
        if kind == "empty":
            return a[..., :0, :], b[..., :0, :]
        if kind == "int":
            return a.detach().int(), b.detach().int()
        if kind == "dtypes":
            other = torch.float32 if a.dtype != torch.float32 else torch.float64
            return a, b.detach().to(other)
        if kind == "meta":
            return a, torch.empty(b.shape, device="meta", dtype=b.dtype)
        return a.tolist(), b

    def has_nan(self) -> bool:
        return any(bool(torch.isnan(t).any()) for t in self.leaves)


def _named(message: str) -> set[str]:
    """The argument names an error message leads with ("a and b must ...")."""
    head = re.split(r" must| is | cannot", message, maxsplit=1)[0]
    return set(re.findall(r"[A-Za-z_]+", head))


def _bound(ref, plains, dtype, slack_of=None, condition: float = 1.0) -> float:
    """The tolerance rule against the first plain PyTorch result that is finite wherever
    ``ref`` is: in the inputs' dtype, else in float32 (the op's compute dtype, for half
    inputs whose plain loss overflows); if none is, a relative 1e-4 (half types: 3e-2)."""
    fin = torch.isfinite(ref)
    rel = 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    fallback = rel * (1.0 + float(ref[fin].abs().max())) if bool(fin.any()) else 0.0
    for k, plain in enumerate(plains):
        if plain is not None and bool(torch.isfinite(plain[fin]).all()):
            bound = error_bound(max_abs_err(plain[fin], ref[fin]), dtype, ref[fin])
            # float32's error lacks the half type's own rounding: the relative floor too.
            bound = bound if k == 0 else max(bound, fallback)
            break
    else:
        bound = fallback
    if slack_of is not None and bool(fin.any()):
        bound += _grad_slack(dtype, slack_of[fin], condition)
    return bound


def _scores_overflow(case) -> bool:
    """Whether a score or dot product of the float64 problem is beyond float32's range:
    the op then computes inf or NaN (never a finite value) and that is accepted."""
    if case.kw["critic"] == "cosine":
        return False
    big = float(torch.finfo(torch.float32).max)
    with torch.no_grad():
        z = torch.cat([case.a.double(), case.b.double()], dim=-2)
        dots = z @ z.transpose(-1, -2)
        tau = case.temperature
        tau = float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)
        return bool((dots.abs() > big).any()) or bool((dots.abs() / tau > big).any())


def _condition(case, a64, b64) -> float:
    """How much the rounding of a positive score is amplified: ``sum_d |a_d b_d|`` (the
    rounding of a dot product), divided by ``|a . b|`` for log_dot (the log), 1 for
    cosine (unit rows); the largest over rows."""
    with torch.no_grad():
        if case.kw["critic"] == "cosine":
            return 1.0
        size = (a64.abs() * b64.abs()).sum(-1)
        if case.kw["critic"] == "log_dot":
            size = size / (a64 * b64).sum(-1).abs().clamp_min(case.kw.get("eps", 1e-12))
        return max(1.0, float(size.max()))


def _positive_rounding(case, a64, b64, out) -> float:
    """The allowance of docs/losses.md (Numerics) times tau: the positive score enters
    from a row-wise dot product and from the backends' tiles, two roundings of s_pos
    (``_condition`` ulps), which reach the loss divided by tau and its tau-gradient
    divided by tau^2, per unit of row weight. Half-type cosine rows are rounded to the
    input dtype after normalisation: an ulp of that dtype."""
    weight = 1.0
    if case.kw["reduction"] != "mean":
        rows = a64.shape[-2] * (2 if case.kw["negatives"] == "all" else 1)
        weight = float(rows * (a64.shape[0] if a64.dim() == 3 else 1))
    dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    if case.kw["critic"] == "cosine" and case.dtype in (torch.float16, torch.bfloat16):
        dtype = case.dtype
    return 4 * torch.finfo(dtype).eps * _condition(case, a64, b64) * weight


def _parts_overflow(row_grad, pos_part, dtype) -> bool:
    """Whether a part of an input gradient, the positive pairs' (from autograd) or the
    backend's, is beyond ``dtype``'s range: each is rounded to the input dtype on its
    own (docs/losses.md, Numerics), so the sum is then inf even where it would fit."""
    big = torch.finfo(dtype).max
    return bool((pos_part.abs() > big).any() or ((row_grad - pos_part).abs() > big).any())


def _check_case(case) -> str | None:
    """None if the case is refused correctly or matches float64; else what went wrong."""
    call = {**case.kw, "temperature": case.temperature}
    try:
        out = fused_contrastive_loss(case.a, case.b, **call)
    except (ValueError, TypeError, dispatch.BackendUnavailable) as exc:
        named = _named(str(exc))
        if not case.bad:
            return f"refused valid input: {exc}"
        return None if named & case.bad else f"error names {named}, not {case.bad}: {exc}"
    if case.bad:
        return f"accepted bad {case.bad}: {out}"
    ref_kw = {k: v for k, v in call.items() if k != "backend"}
    inputs = [case.a, case.b]
    tau = case.temperature
    leaves64 = [t.detach().double().requires_grad_() for t in case.leaves]
    a64, b64 = case.make(leaves64[0]), case.make(leaves64[1])
    if isinstance(tau, torch.Tensor):
        tau64 = tau.detach().double().requires_grad_(case.learn_tau)
        ref_kw["temperature"] = tau64
    ref = reference_contrastive_loss(a64, b64, **ref_kw)
    plains = [reference_contrastive_loss(*inputs, **{**ref_kw, "temperature": tau}, dtype=dt)
              for dt in (None, torch.float32)
              if dt is None or case.dtype in (torch.float16, torch.bfloat16)]
    tau_f = float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)
    rounding = _positive_rounding(case, a64, b64, out)
    overflow = _scores_overflow(case)
    fin_out, fin_ref = torch.isfinite(out.detach()), torch.isfinite(ref.detach())
    if case.has_nan() and not bool(torch.isnan(out.detach()[torch.isnan(ref.detach())]).all()):
        return f"NaN input, NaN reference, but {out}"
    if not torch.equal(fin_out | fin_ref, fin_ref) or not (
        torch.equal(fin_out, fin_ref) or overflow
    ):
        return f"finite where float64 is not, or the reverse: {out} vs {ref}"
    both = fin_out & fin_ref
    err = max_abs_err(out.detach()[both], ref.detach()[both])
    bound = _bound(ref.detach(), [p.detach() for p in plains], case.dtype) + rounding / tau_f
    if err > bound:
        return f"loss error {err:.3g} > {bound:.3g}: {out} vs {ref}"
    if not bool(fin_ref.all()) or not bool(fin_out.all()):
        return None  # gradients of a non-finite loss are not compared
    wrt = case.leaves + ([tau] if case.learn_tau else [])
    wrt64 = leaves64 + ([ref_kw["temperature"]] if case.learn_tau else [])
    grads = torch.autograd.grad(out.sum(), wrt)
    ref_grads = torch.autograd.grad(ref.sum(), wrt64, retain_graph=True)
    row_grads = torch.autograd.grad(ref.sum(), [a64, b64])  # per row, before any expand
    plain_grads = [torch.autograd.grad(p.sum(), wrt, allow_unused=True) for p in plains]
    # The positive pairs' part reaches a and b rounded on its own (see
    # assert_backend_matches_float64): half types get an ulp of its size as slack.
    pos = positives_only(a64, b64, **ref_kw)
    pos_grads = torch.autograd.grad(pos.sum(), leaves64, retain_graph=True, allow_unused=True)
    pos_rows = torch.autograd.grad(pos.sum(), [a64, b64], allow_unused=True)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        ps = [pg[i] for pg in plain_grads]
        if ps[0] is None or not bool(torch.isfinite(r).all()):
            continue
        if not bool(torch.isfinite(g).all()) and overflow:
            continue
        dtype = case.dtype if i < 2 else g.dtype
        if i < 2 and pos_rows[i] is not None and (
            _parts_overflow(row_grads[i], pos_rows[i], dtype)  # per row
            or _parts_overflow(r, pos_grads[i], dtype)  # summed over expanded rows
        ):
            continue  # documented: each part is rounded to the input dtype on its own
        # Entries beyond the gradient dtype's range (1 / eps of a zero row in float16)
        # come back as inf, which says so.
        fits = r.abs() <= torch.finfo(dtype).max
        slack = None if i >= 2 or pos_grads[i] is None else pos_grads[i][fits]
        g, r, ps = g[fits], r[fits], [p.detach()[fits] for p in ps]
        bound = _bound(r, ps, dtype, slack, _condition(case, a64, b64))
        bound += rounding / tau_f**2 if i == 2 else 0.0
        if max_abs_err(g, r) > bound:
            return f"gradient {i} error {max_abs_err(g, r):.3g} > {bound:.3g}"
    return None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow notes (Triton interpreter)
def test_fuzz_bad_and_extreme_inputs(backend):
    """Seeded, a fixed number of cases per backend: every one is refused with an error
    naming a bad argument, or matches float64 (NaN where the input has NaN; inf or NaN
    where a dot-product score is beyond float32's range)."""
    rng = random.Random(20)
    failures = []
    for i in range(FUZZ_CASES[backend]):
        case = Case(rng, backend)
        why = _check_case(case)
        if why is not None:
            failures.append(f"case {i} ({case.dtype}, {case.shape}, {case.values}, "
                            f"{case.layout}, tau={case.temperature!r}, {case.kw}): {why}")
    assert not failures, "\n".join(failures[:8]) + f"\n({len(failures)} failing cases)"
