"""The implementations compared, each as ``make(case) -> loss_fn(a, b)``.

Providers:

``eager``
    The plain full-matrix PyTorch loss (``mimac_kernels.reference_contrastive_loss``
    with ``dtype=None``: S = f(Z, Z) / tau, diagonal masked, log-sum-exp), what
    lightly and most papers run.
``compile``
    The same function under ``torch.compile`` (static shapes: its best case).
``mimac-<backend>``
    ``fused_contrastive_loss(..., backend=<backend>)`` for every backend of ours
    that ``available_backends`` reports on the device.
``inf_cl``
    Inf-CL's ``cal_inf_loss`` (Triton, float32/TF32), one direction per call:
    both directions for the symmetric CLIP loss.
``cce``
    Apple's Cut Cross-Entropy ``linear_cross_entropy(e, c, arange(N))``, the
    one-direction InfoNCE without logits in memory; both directions for CLIP.

The peers have no self-exclusion, so for NT-Xent (``pairing="all"``) they run
``Z`` against ``Z`` with the positives as labels: the same work (one M x M
matrix, M-way softmax), but the diagonal stays in the denominator. Their
entries say so in ``note``. Neither peer has a ``log_dot`` critic.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.cases import Case
from mimac_kernels import (
    available_backends,
    dispatch,
    fused_contrastive_loss,
    reference_contrastive_loss,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
#: Backends that run in an interpreter on the CPU: correct but not a speed.
INTERPRETED_ON_CPU = ("triton",)
#: The Triton backend's float32 dot precision switch (read at every launch).
TRITON_FP32 = "MIMAC_KERNELS_TRITON_FP32"


@dataclass(frozen=True)
class Provider:
    """One implementation. ``kind`` is "baseline", "ours" or "peer".

    ``full_matrix``: it materialises M x M (so its memory is predictable and a
    shape whose one matrix exceeds the device memory is recorded as OOM unrun).
    """

    name: str
    kind: str
    make: Callable[[Case], LossFn]
    reason: Callable[[Case, torch.device], str | None]
    full_matrix: bool = False
    note: str = ""


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two random views (leaf tensors requiring grad) in the case's dtype.

    Random, never zeros (zeros can run faster than real data). ``log_dot`` gets
    probability rows, as CRLC feeds it.
    """
    # Drawn on the device itself: a host copy of millions of rows would take seconds.
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.n, case.d)
    a = torch.randn(shape, generator=gen, device=device)
    b = a + 0.7 * torch.randn(shape, generator=gen, device=device)  # correlated views
    if case.critic == "log_dot":
        a, b = a.softmax(-1), b.softmax(-1)
    return tuple(t.to(case.torch_dtype).requires_grad_() for t in (a, b))  # type: ignore[return-value]


#: The memory child's name for building this suite's cases (``benchmarks.memory``).
case_from_dict = Case.from_dict


def tiny(case: Case) -> Case:
    """The same configuration at 64 rows: warms lazily initialised state cheaply."""
    return case.with_rows(64)


# --------------------------------------------------------------------------- baselines


def _eager_loss(a: Tensor, b: Tensor, tau: float, critic: str, pairing: str) -> Tensor:
    return reference_contrastive_loss(
        a, b, temperature=tau, critic=critic, negatives=pairing, symmetric=True, dtype=None
    )


def _make_eager(case: Case) -> LossFn:
    return lambda a, b: _eager_loss(a, b, case.tau, case.critic, case.pairing)


@functools.cache
def _compiled() -> Callable[..., Tensor]:
    # One compiled function recompiles per shape and configuration; the default
    # limit (8) would silently fall back to eager after a few cases.
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 1024))
    return torch.compile(_eager_loss, dynamic=False)


def _make_compile(case: Case) -> LossFn:
    fn = _compiled()
    return lambda a, b: fn(a, b, case.tau, case.critic, case.pairing)


def _always(case: Case, device: torch.device) -> str | None:
    return None


# --------------------------------------------------------------------------- ours


def _make_ours(backend: str, env: dict[str, str] | None = None) -> Callable[[Case], LossFn]:
    """``env``: variables set at every forward call and left set, so that the
    backward (launched later by autograd) sees the same settings."""

    def make(case: Case) -> LossFn:
        def loss(a: Tensor, b: Tensor) -> Tensor:
            os.environ.update(env or {})
            return fused_contrastive_loss(
                a,
                b,
                temperature=case.tau,
                critic=case.critic,
                negatives=case.pairing,
                backend=backend,
            )

        return loss

    return make


def _float32_only(case: Case, device: torch.device) -> str | None:
    if case.dtype != "float32":
        return "TF32 mode differs from mimac-triton only for float32 inputs"
    return _ours_reason("triton")(case, device)


def _ours_reason(backend: str) -> Callable[[Case, torch.device], str | None]:
    def reason(case: Case, device: torch.device) -> str | None:
        why = dispatch.unavailable_reason(backend, device, case.torch_dtype)
        return None if why is None else f"mimac backend {backend!r}: {why}"

    return reason


def our_backends(device: torch.device, *, interpreted: bool = False) -> list[str]:
    """Our backends usable on ``device``; interpreted ones (Triton on a CPU) only if asked."""
    names = available_backends(device)
    if device.type == "cpu" and not interpreted:
        names = [n for n in names if n not in INTERPRETED_ON_CPU]
    return names


# --------------------------------------------------------------------------- peers


def _import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - absent or broken: either way it cannot run
        return f"{module} not importable ({type(exc).__name__}: {exc})"
    return None


def _peer_reason(module: str, label: str) -> Callable[[Case, torch.device], str | None]:
    def reason(case: Case, device: torch.device) -> str | None:
        if case.critic == "log_dot":
            return f"{label} has dot-product logits only (no log_dot critic)"
        if device.type != "cuda":
            return f"{label} runs Triton GPU kernels only (device is {device.type})"
        if case.d % 16:
            return f"{label} needs D divisible by 16 (D = {case.d})"
        return _import_reason(module)

    return reason


def _scaled_views(a: Tensor, b: Tensor, case: Case) -> tuple[Tensor, Tensor]:
    if case.critic == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a, b


def _positives(n: int, device: torch.device) -> Tensor:
    """Row i of Z = [a; b] has its positive at i + N (i < N) or i - N."""
    idx = torch.arange(n, device=device)
    return torch.cat([idx + n, idx])


def _inf_cl_head_dim(d: int) -> int:
    # Inf-CL splits D into heads of 16..256 and sums them: any divisor is exact.
    return next(h for h in (256, 128, 64, 32, 16) if d % h == 0)


def _make_inf_cl(case: Case) -> LossFn:
    from inf_cl import cal_inf_loss

    hd, s = _inf_cl_head_dim(case.d), 1.0 / case.tau

    def loss(a: Tensor, b: Tensor) -> Tensor:
        a, b = _scaled_views(a, b, case)
        if case.pairing == "cross":
            # scale= goes through a gradient all-reduce; pre-scaling q is the same loss.
            return 0.5 * (cal_inf_loss(a * s, b, head_dim=hd) + cal_inf_loss(b * s, a, head_dim=hd))
        z = torch.cat([a, b])
        return cal_inf_loss(z * s, z, labels=_positives(case.n, z.device), head_dim=hd)

    return loss


def _make_cce(case: Case) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    s = 1.0 / case.tau

    def loss(a: Tensor, b: Tensor) -> Tensor:
        a, b = _scaled_views(a, b, case)
        if case.pairing == "cross":
            t = torch.arange(case.n, device=a.device)
            return 0.5 * (linear_cross_entropy(a * s, b, t) + linear_cross_entropy(b * s, a, t))
        z = torch.cat([a, b])
        return linear_cross_entropy(z * s, z, _positives(case.n, z.device))

    return loss


_CUDA_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_PEER_NOTE = "all: Z vs Z with positives as labels, diagonal not masked (same work)"


def providers(device: torch.device, *, interpreted: bool = False) -> dict[str, Provider]:
    """Every provider for ``device``, in display order (peers listed even when absent,
    so their skip reasons are recorded)."""
    out = {
        "eager": Provider("eager", "baseline", _make_eager, _always, full_matrix=True),
        "compile": Provider("compile", "baseline", _make_compile, _always, full_matrix=True),
    }
    for name in our_backends(device, interpreted=interpreted):
        # Pin the Triton float32 precision per provider (the user's choice, else exact).
        env = {TRITON_FP32: os.environ.get(TRITON_FP32, "ieee")} if name == "triton" else None
        out[f"mimac-{name}"] = Provider(
            f"mimac-{name}", "ours", _make_ours(name, env), _ours_reason(name)
        )
    if device.type == "cuda" and "mimac-triton" in out:
        # Opt-in TF32 dots: the precision Inf-CL and cuBLAS-with-TF32 run at.
        out["mimac-triton-tf32"] = Provider(
            "mimac-triton-tf32",
            "ours",
            _make_ours("triton", {TRITON_FP32: "tf32"}),
            _float32_only,
            note=f"{TRITON_FP32}=tf32",
        )
    out["inf_cl"] = Provider(
        "inf_cl", "peer", _make_inf_cl, _peer_reason("inf_cl", "Inf-CL"), note=_PEER_NOTE
    )
    out["cce"] = Provider(
        "cce",
        "peer",
        _make_cce,
        _peer_reason("cut_cross_entropy", "Cut Cross-Entropy"),
        note=_PEER_NOTE,
    )
    return out


def is_oom(exc: BaseException) -> bool:
    """An allocation failure on either device (CUDA OOM, CPU allocator, MemoryError)."""
    if isinstance(exc, (MemoryError, _CUDA_OOM)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )
