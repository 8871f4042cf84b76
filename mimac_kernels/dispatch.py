"""Backend selection: which implementation runs a call, and why the others cannot.

Every backend module exposes the same three functions on the *kernel-level*
problem (heads already explicit, cosine inputs already normalised):

``unavailable_reason(device, dtype) -> str | None``
    ``None`` if the backend can run on this device and dtype, else the reason.
``forward(a, b, inv_tau, critic, negatives, eps) -> (row_lse, col_lse)``
    ``a``, ``b``: ``(H, N, D)`` contiguous; ``inv_tau``: 0-dim float32 tensor.
    ``negatives="all"``: ``row_lse`` is ``(H, 2N)``, ``log sum_{k != i} exp(S_ik)``
    over the stacked rows ``Z = [a; b]``, ``col_lse`` is ``(H, 0)``.
    ``negatives="cross"``: ``row_lse[h, i] = log sum_j exp(S_ij)`` and
    ``col_lse[h, j] = log sum_i exp(S_ij)``, both ``(H, N)``. All float32.
``backward(a, b, inv_tau, critic, negatives, eps, row_lse, col_lse, g_row, g_col,
row_center, col_center)``
    Gradients of ``sum(g_row * row_lse) + sum(g_col * col_lse)`` w.r.t. a and b:
    float32 ``(H, N, D)``. With ``W_row_ik = g_row_i exp(S_ik - row_lse_i)`` (the
    self-pair excluded for ``all``) and ``W_col_ik = g_col_k exp(S_ik - col_lse_k)``,
    ``dL/dS = W_row + W_col``. The third output, a 0-dim float32 tensor, is the
    *centred* temperature sum ``sum_ik W_row_ik (s_ik - row_center_i) +
    sum_ik W_col_ik (s_ik - col_center_k)``: with the raw positive scores as
    centres (shapes of row_lse/col_lse) it is the temperature gradient of the
    losses, formed element by element so that nothing cancels in float32.

The kernel critics are ``"dot"`` (``s = x.y``), ``"cosine"`` (``x.y`` on
unit rows, so ``|s| <= 1`` and a fixed shift is safe) and ``"log_dot"``
(``s = log(max(x.y, eps))``); ``S = inv_tau * s``.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch

logger = logging.getLogger("mimac_kernels")

#: Backend name -> module implementing it, in order of preference per device.
BACKEND_MODULES: dict[str, str] = {
    "triton": "mimac_kernels.triton.backend",
    "cuda": "mimac_kernels.cuda_backend",
    "cpu": "mimac_kernels.cpu_backend",
    "torch": "mimac_kernels.reference",
}
BACKENDS: tuple[str, ...] = tuple(BACKEND_MODULES)
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@functools.cache
def _load(name: str) -> ModuleType | str:
    """Import a backend module once; on failure return the reason as a string."""
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except Exception as exc:  # noqa: BLE001 -- an optional backend must never break import
        return f"cannot import {BACKEND_MODULES[name]}: {type(exc).__name__}: {exc}"


def get_backend(name: str) -> ModuleType:
    """The module implementing ``name`` (raises ``BackendUnavailable``)."""
    mod = _load(name)
    if isinstance(mod, str):
        raise BackendUnavailable(f"backend {name!r} is unavailable: {mod}")
    return mod


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``name`` cannot run on ``device``/``dtype``, or ``None`` if it can."""
    mod = _load(name)
    if isinstance(mod, str):
        return mod
    return _cached_reason(name, device.type, dtype)


@functools.cache
def _cached_reason(name: str, device_type: str, dtype: torch.dtype) -> str | None:
    # Probes (compiler builds, driver queries) are expensive: ask once per key.
    return get_backend(name).unavailable_reason(torch.device(device_type), dtype)


def forget_probes() -> None:
    """Drop the cached answers of ``unavailable_reason`` (after a backend's
    extension was rebuilt or substituted; tests)."""
    _cached_reason.cache_clear()


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``backend`` (a name or ``"auto"``) into a backend that can run.

    Raises:
        ValueError: unknown name.
        BackendUnavailable: an explicit backend that cannot run here, with the reason.
    """
    if backend == "auto":
        reasons = []
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            why = unavailable_reason(name, device, dtype)
            if why is None:
                _log_choice(name, device.type, dtype)
                return name
            reasons.append(f"{name}: {why}")
        raise BackendUnavailable("no backend can run here: " + "; ".join(reasons))
    if backend not in BACKEND_MODULES:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    why = unavailable_reason(backend, device, dtype)
    if why is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device.type}/{dtype}: {why}")
    return backend


@functools.cache
def _log_choice(name: str, device_type: str, dtype: torch.dtype) -> None:
    logger.debug("backend='auto' chose %r for %s/%s", name, device_type, dtype)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run float32 inputs on ``device`` (default: CUDA if present, else CPU).

    Example:
        >>> "torch" in available_backends("cpu")
        True
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return [n for n in BACKENDS if unavailable_reason(n, dev, torch.float32) is None]
