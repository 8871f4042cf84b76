"""The accuracy rule of the kernel tests, and the inputs and checks built on it.

Rule: a backend's error against float64 (on the same rounded inputs) is at most
twice plain PyTorch's own error in the same dtype, plus a small absolute slack
(``ATOL``) and two float32 ulps of the result (``error_bound``). No fixed relative
tolerance: plain PyTorch's error moves with the BLAS kernels a CPU runs (AVX-512,
AVX2, baseline), and the bound moves with it.

End to end (``assert_backend_matches_float64``) "plain" is the full-matrix loss in
the inputs' dtype. At the kernel level (``kernel_level_errors``) it is the torch
backend in float32 on the same rounded inputs, and the slack is two float32 ulps of
the result's largest entry (no absolute ``ATOL``: the statistics and gradients of
the contract are small numbers). A backend's backward may round its products'
operands to fewer bits than float32 (``weight_eps``: tensor-core formats): the bound
of the gradients adds twice that rounding of their largest entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mimac_kernels import fused_contrastive_loss, reference_contrastive_loss, torch_backend
from mimac_kernels.contract import Backend, Problem, RectProblem, Stats, Upstream

#: Absolute slack added to the "2x plain PyTorch error" rule, per input dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
#: Temperatures per critic (log_dot at tau = 1 takes the closed form, not a backend).
TAU = {"cosine": 0.1, "dot": 0.5, "log_dot": 0.5}
#: (negatives, symmetric) pairings of the losses.
PAIRINGS = [("all", True), ("cross", True), ("cross", False)]
HALF_DTYPES = (torch.bfloat16, torch.float16)
#: Unit of the TF32 format (10 stored mantissa bits).
TF32_EPS = 2.0**-10


def weight_eps(backend: str, dtype: torch.dtype) -> float:
    """Relative rounding of the products in ``backend``'s backward for inputs of
    ``dtype``, beyond float32's own (0: none). cuda: half inputs multiply the weights
    rounded to TF32 on tensor cores, float32 inputs go through 3xTF32, which drops the
    product of the two low parts (up to about ``TF32_EPS**2`` of each product);
    triton: the weights in the inputs' dtype for ``tl.dot``; torch and cpu: float32."""
    if dtype not in HALF_DTYPES:
        return 2.0 * TF32_EPS**2 if backend == "cuda" else 0.0
    return {"cuda": TF32_EPS, "triton": torch.finfo(dtype).eps}.get(backend, 0.0)


def error_bound(plain_error: float, dtype: torch.dtype, ref: Tensor | None = None) -> float:
    """Allowed error of a backend: twice plain PyTorch's error in ``dtype`` plus ``ATOL``.

    With ``ref`` (the float64 result) two float32 ulps of its largest magnitude are
    added: losses and the temperature gradient come back as float32 scalars, whose
    own rounding the plain loss may happen to dodge on a given input.
    """
    ulps = 0.0
    if ref is not None and ref.numel():
        ulps = 2.0 * torch.finfo(torch.float32).eps * float(ref.detach().abs().max())
    return 2.0 * plain_error + ATOL[dtype] + ulps


def max_abs_err(x: Tensor, ref: Tensor) -> float:
    """Largest absolute difference, in float64; NaN anywhere gives ``inf``."""
    d = (x.detach().double() - ref.detach().double()).abs()
    return float("inf") if torch.isnan(d).any() else float(d.max()) if d.numel() else 0.0


def make_views(
    shape: tuple[int, ...],
    critic: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dot_scale: float = 0.3,
) -> tuple[Tensor, Tensor]:
    """Two correlated float32 views; probability rows for ``log_dot``, rows scaled by
    ``dot_scale`` for ``dot`` (so that ``x.y / tau`` stays moderate)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen)
    b = a + 0.7 * torch.randn(shape, generator=gen)
    if critic == "log_dot":
        a, b = torch.softmax(2 * a, dim=-1), torch.softmax(2 * b, dim=-1)
    elif critic == "dot":
        a, b = dot_scale * a, dot_scale * b
    return a.to(device), b.to(device)


def loss_and_grads(
    fn: Callable[..., Tensor], a: Tensor, b: Tensor, tau: float, upstream: Tensor | None,
    learnable: bool, **kw,
) -> tuple[Tensor, list[Tensor]]:
    """``fn``'s loss and its gradients w.r.t. (a, b[, tau]) of ``sum(loss * upstream)``.

    ``learnable``: tau is passed as a 0-dim tensor that requires grad.
    """
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    inputs = [a, b]
    temperature: float | Tensor = tau
    if learnable:
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        temperature = torch.tensor(tau, dtype=dt, device=a.device, requires_grad=True)
        inputs.append(temperature)
    loss = fn(a, b, temperature=temperature, **kw)
    total = loss.sum() if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    return loss.detach(), list(torch.autograd.grad(total, inputs))


def positives_only(
    a: Tensor, b: Tensor, *, temperature: float | Tensor, critic: str = "cosine",
    negatives: str = "all", symmetric: bool = True, reduction: str = "mean",
    eps: float = 1e-12,
) -> Tensor:
    """Only the ``-S_pos`` terms of the loss, in float64: their gradient reaches the
    inputs outside the backends (see ``assert_backend_matches_float64``)."""
    a, b = a.double(), b.double()
    if critic == "cosine":
        a = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
        b = b / b.norm(dim=-1, keepdim=True).clamp_min(eps)
    dots = (a * b).sum(-1)
    pos = (dots.clamp_min(eps).log() if critic == "log_dot" else dots) / temperature
    per_row = -torch.cat([pos, pos], dim=-1) if negatives == "all" else -pos
    if reduction == "mean":
        return per_row.mean()
    return per_row.sum() if reduction == "sum" else per_row


def assert_backend_matches_float64(
    backend: str, a: Tensor, b: Tensor, dtype: torch.dtype, *, tau: float,
    learnable: bool = True, **kw,
) -> None:
    """``fused_contrastive_loss(backend=...)`` against the float64 formula: the loss and the
    gradients of a, b (and a learnable tau) within ``error_bound`` of plain PyTorch's own
    error in ``dtype``. ``kw``: critic, negatives, symmetric, reduction."""
    a, b = a.to(dtype), b.to(dtype)  # every computation sees the same rounded inputs
    upstream = None
    if kw.get("reduction") == "none":  # a non-uniform upstream gradient
        rows = a.shape[-2] * (2 if kw.get("negatives", "all") == "all" else 1)
        gen = torch.Generator().manual_seed(1)
        upstream = torch.rand((*a.shape[:-2], rows), generator=gen).to(a.device)

    def ours(x: Tensor, y: Tensor, **k) -> Tensor:
        return fused_contrastive_loss(x, y, backend=backend, **k)

    def plain(x: Tensor, y: Tensor, **k) -> Tensor:
        return reference_contrastive_loss(x, y, dtype=None, **k)

    out, grads = loss_and_grads(ours, a, b, tau, upstream, learnable, **kw)
    ref, ref_grads = loss_and_grads(
        reference_contrastive_loss, a.double(), b.double(), tau, upstream, learnable, **kw
    )
    p_out, p_grads = loss_and_grads(plain, a, b, tau, upstream, learnable, **kw)
    # The positive pairs' gradient reaches a and b through autograd, rounded to
    # the inputs' dtype on its own, and is added to the backend's (also rounded)
    # gradient: one rounding of each part, up to an ulp of the parts' size, which
    # plain PyTorch dodges where the parts cancel exactly (N = 1: the loss is 0).
    _, pos_grads = loss_and_grads(positives_only, a, b, tau, upstream, False, **kw)
    part = {"grad_a": pos_grads[0], "grad_b": pos_grads[1]}
    assert out.dtype == torch.float32 and out.shape == ref.shape
    names = ["loss", "grad_a", "grad_b", "grad_tau"]
    for name, x, r, p in zip(names, [out, *grads], [ref, *ref_grads], [p_out, *p_grads]):
        bound = error_bound(max_abs_err(p, r), dtype, r)
        if name in part:
            assert x.dtype == dtype and x.device == a.device, f"{name}: {x.dtype} on {x.device}"
            if dtype in HALF_DTYPES:
                bound += torch.finfo(dtype).eps * float(part[name].abs().max())
        err = max_abs_err(x, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({kw}, {dtype})"


def assert_within_bound(
    ours: list[Tensor], plain: list[Tensor], ref: list[Tensor], dtype: torch.dtype,
    names: list[str] | None = None,
) -> None:
    """Each of ``ours`` within ``error_bound`` of ``ref`` (float64), given ``plain`` (the
    same quantities from plain PyTorch in ``dtype``)."""
    names = names or [str(i) for i in range(len(ours))]
    for name, x, p, r in zip(names, ours, plain, ref, strict=True):
        err, bound = max_abs_err(x, r), error_bound(max_abs_err(p, r), dtype, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype})"


@dataclass(frozen=True)
class KernelCase:
    """One kernel-level call: the problem (cosine rows unit-normed, ``inv_tau`` = 1 /
    ``TAU[critic]``) and float32 upstream gradients and temperature centres, seeded."""

    problem: Problem
    upstream: Upstream


def kernel_case(
    shape: tuple[int, int, int], critic: str, negatives: str, dtype: torch.dtype,
    device: str | torch.device, seed: int = 8,
) -> KernelCase:
    """Seeded inputs for a backend's ``forward``/``backward``.

    Shape: ``shape`` is ``(H, N, D)``; g_row/row_center ``(H, 2N)`` for ``all``, ``(H, N)``
    for ``cross``; g_col/col_center ``(H, N)`` for ``cross``, ``(H, 0)`` for ``all``.
    """
    h, n, _ = shape
    a, b = make_views(shape, critic, seed=seed, device=device)
    if critic == "cosine":
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    rows = 2 * n if negatives == "all" else n
    gen = torch.Generator().manual_seed(seed + 1)
    g_row = torch.rand(h, rows, generator=gen) / rows
    g_col = torch.rand(h, n if negatives == "cross" else 0, generator=gen) / n
    c_row, c_col = torch.randn(g_row.shape, generator=gen), torch.randn(g_col.shape, generator=gen)
    inv_tau = torch.tensor(1.0 / TAU[critic], device=device)
    problem = Problem(a.to(dtype), b.to(dtype), inv_tau, critic, negatives, 1e-12)
    return KernelCase(problem, Upstream(*(t.to(device) for t in (g_row, g_col, c_row, c_col))))


def kernel_outputs(backend: Backend, case: KernelCase) -> tuple[Tensor, ...]:
    """``backend``'s forward, then its backward from its own log-sum-exps:
    (row_lse, col_lse, grad_a, grad_b, grad_inv_tau)."""
    stats = backend.forward(case.problem)
    grads = backend.backward(case.problem, stats, case.upstream)
    return stats.row_lse, stats.col_lse, grads.a, grads.b, grads.inv_tau


def _with_dtype(problem: Problem, dtype: torch.dtype) -> Problem:
    return Problem(problem.a.to(dtype), problem.b.to(dtype), problem.inv_tau.to(dtype),
                   problem.critic, problem.negatives, problem.eps)


def _upcast(upstream: Upstream, dtype: torch.dtype) -> Upstream:
    return Upstream(*(t.to(dtype) for t in (upstream.g_row, upstream.g_col,
                                            upstream.row_center, upstream.col_center)))


def _kernel_bound(plain: Tensor, ref: Tensor) -> float:
    """Twice plain float32's error plus two float32 ulps of the result's largest entry."""
    ulps = 2.0 * torch.finfo(torch.float32).eps * float(ref.abs().max()) if ref.numel() else 0.0
    return 2.0 * max_abs_err(plain, ref) + ulps


def kernel_level_errors(backend: Backend, case: KernelCase, weights: float = 0.0) -> list[str]:
    """Where ``backend`` misses the float64 torch backend on the same rounded inputs by
    more than the module's rule allows (empty: it matches). The backward runs from the
    float64 log-sum-exps, rounded to float32, so that it is judged on its own.
    ``weights``: the backend's ``weight_eps`` for the case's dtype."""
    p = case.problem
    oracle, plain_problem = _with_dtype(p, torch.float64), _with_dtype(p, torch.float32)
    ref = torch_backend.forward(oracle)
    plain = torch_backend.forward(plain_problem)
    got = backend.forward(p)
    errors = []
    for name in ("row_lse", "col_lse"):
        x, r, q = getattr(got, name), getattr(ref, name), getattr(plain, name)
        if x.shape != r.shape or x.dtype != torch.float32:
            errors.append(f"{name}: {x.dtype} {tuple(x.shape)}, expected float32 {tuple(r.shape)}")
            continue
        err, bound = max_abs_err(x, r), _kernel_bound(q, r)
        if not err <= bound:
            errors.append(f"{name}: {err:.3g} off, bound {bound:.3g}")
    stats32 = Stats(ref.row_lse.float(), ref.col_lse.float())
    r_grads = torch_backend.backward(oracle, ref, _upcast(case.upstream, torch.float64))
    p_grads = torch_backend.backward(plain_problem, stats32, case.upstream)
    grads = backend.backward(p, stats32, case.upstream)
    for name in ("a", "b", "inv_tau"):
        x, r, q = getattr(grads, name), getattr(r_grads, name), getattr(p_grads, name)
        if x.shape != r.shape or x.dtype != torch.float32:
            errors.append(f"grad {name}: {x.dtype} {tuple(x.shape)}, expected float32")
            continue
        bound = _kernel_bound(q, r) + 2.0 * weights * float(r.abs().max())
        err = max_abs_err(x, r)
        if not err <= bound:  # NaN fails too
            errors.append(f"grad {name}: {err:.3g} off, bound {bound:.3g}")
    return errors


def rect_formula(
    x: Tensor, y: Tensor, inv_tau: Tensor, critic: str, eps: float, offset: int | None,
    g: Tensor, center: Tensor, labels: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """The rectangular problem of ``contract.RectProblem`` as the plain dense formula, in
    the dtype of ``x`` (float64: the oracle; float32: "plain PyTorch"); ``labels`` (rows',
    columns'): pairs of one label left out as well.

    Returns ``(lse (H, R), grad x (H, R, D), grad y (H, C, D), centred temperature sum)``:
    the gradients of ``sum(g * lse)`` and of ``sum(g * (lse - inv_tau * center))``
    w.r.t. ``inv_tau``, by autograd.
    """
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    it = inv_tau.detach().to(x.dtype).clone().requires_grad_()
    dots = x @ y.transpose(-1, -2)
    s = dots.clamp_min(eps).log() if critic == "log_dot" else dots
    scores = it * s
    if offset is not None:
        rows = torch.arange(x.shape[1])
        cols = rows + offset
        keep = (cols >= 0) & (cols < y.shape[1])
        mask = torch.zeros(x.shape[1], y.shape[1], dtype=torch.bool)
        mask[rows[keep], cols[keep]] = True
        scores = scores.masked_fill(mask.to(x.device), float("-inf"))
    if labels is not None:
        scores = scores.masked_fill(labels[0][:, None] == labels[1][None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    g, center = g.to(x.dtype), center.to(x.dtype)
    gx, gy = torch.autograd.grad((g * lse).sum(), (x, y), retain_graph=True)
    (gt,) = torch.autograd.grad((g * (lse - it * center)).sum(), (it,))
    return lse.detach(), gx, gy, gt


def rect_level_errors(
    backend: Backend, problem: RectProblem, g: Tensor, center: Tensor, weights: float = 0.0
) -> list[str]:
    """Where ``backend``'s ``rect_forward``/``rect_backward`` miss the float64 formula
    (``rect_formula``) on the same rounded inputs by more than the kernel-level rule
    allows (``kernel_level_errors``: "plain" is the torch backend in float32, which
    centres the temperature sum element by element as the contract asks); empty: it
    matches. The backward runs from the float64 log-sum-exps rounded to float32."""
    args = (problem.inv_tau, problem.critic, problem.eps, problem.offset, g, center)
    labels = (problem.row_labels, problem.col_labels) if problem.labelled else None
    ref = rect_formula(problem.x.double(), problem.y.double(), *args, labels=labels)
    p32 = RectProblem(problem.x.float(), problem.y.float(), problem.inv_tau.float(),
                      problem.critic, problem.eps, problem.offset,
                      row_labels=problem.row_labels, col_labels=problem.col_labels)  # fmt: skip
    p_grads = torch_backend.rect_backward(p32, ref[0].float(), g, center)
    plain = (torch_backend.rect_forward(p32), p_grads.x, p_grads.y, p_grads.inv_tau)
    lse = backend.rect_forward(problem)
    grads = backend.rect_backward(problem, ref[0].float(), g, center)
    # The temperature sum's own scale: the sum of its terms' magnitudes (a sum of n
    # terms rounds relative to that, not to its value), in float64.
    x64, y64 = problem.x.double(), problem.y.double()
    dots = x64 @ y64.transpose(-1, -2)
    s = dots.clamp_min(problem.eps).log() if problem.critic == "log_dot" else dots
    w = torch.exp(problem.inv_tau.double() * s - ref[0][..., None]) * g.double()[..., None]
    if labels is not None:  # the left-out pairs are no terms of the sum
        w = w.masked_fill(labels[0][:, None] == labels[1][None, :], 0.0)
    terms = (w * (s - center.double()[..., None])).abs().nan_to_num(posinf=0.0).sum()
    errors = []
    for i, (name, x) in enumerate(zip(("lse", "grad x", "grad y", "grad inv_tau"),
                                      (lse, grads.x, grads.y, grads.inv_tau))):  # fmt: skip
        r, q = ref[i], plain[i]
        if x.shape != r.shape or x.dtype != torch.float32:
            errors.append(f"{name}: {x.dtype} {tuple(x.shape)}, expected float32 {tuple(r.shape)}")
            continue
        bound = _kernel_bound(q, r) + (2.0 * weights * float(r.abs().max()) if i else 0.0)
        if i == 3:
            bound += 2.0 * torch.finfo(torch.float32).eps * float(terms)
        err = max_abs_err(x, r)
        if not err <= bound:  # NaN fails too
            errors.append(f"{name}: {err:.3g} off, bound {bound:.3g}")
    return errors
