"""Backend selection: which implementation runs a call, and why the others cannot.

Every backend implements ``contract.Backend``. Whether it can run a call is asked in
two steps: ``probe(device, dtype)``, the expensive part (a compiler build, a driver
query, the capability of the inputs' GPU), answered once per backend, device (with
its index) and dtype and cached here; then ``refusal(problem)``, a cheap look at the
whole problem (e.g. more heads than a grid axis holds) at every call. Under
``backend="auto"`` a refusal of either kind moves on to the next backend in order.

On CUDA the order is ``_AUTO_ORDER``'s unless ``dispatch_table`` holds a measured
choice for the inputs' GPU capability, dtype and width D: that backend is then tried
first, and a refusal still moves on, in the default order.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import cast

import torch

from mimac_kernels import dispatch_table
from mimac_kernels.contract import Backend, Problem, RectProblem

logger = logging.getLogger("mimac_kernels")

#: Backend name -> module implementing it.
BACKEND_MODULES: dict[str, str] = {
    "triton": "mimac_kernels.triton.backend",
    "cuda": "mimac_kernels.cuda_backend",
    "cpu": "mimac_kernels.cpu_backend",
    "torch": "mimac_kernels.torch_backend",
}
BACKENDS: tuple[str, ...] = tuple(BACKEND_MODULES)
#: Order of preference of ``backend="auto"`` per device type.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
#: Implementations put in place of a backend by ``override_backend``.
_OVERRIDES: dict[str, Backend] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@functools.cache
def _load(name: str) -> ModuleType | str:
    """Import a backend module once; on failure return the reason as a string."""
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except Exception as exc:  # noqa: BLE001 -- an optional backend must never break import
        return f"cannot import {BACKEND_MODULES[name]}: {type(exc).__name__}: {exc}"


def get_backend(name: str) -> Backend:
    """The implementation of ``name`` (raises ``BackendUnavailable`` if it cannot be imported)."""
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    mod = _load(name)
    if isinstance(mod, str):
        raise BackendUnavailable(f"backend {name!r} is unavailable: {mod}")
    return cast(Backend, mod)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``name`` cannot run on ``device``/``dtype`` whatever the shapes, or ``None``."""
    if name not in _OVERRIDES:
        mod = _load(name)
        if isinstance(mod, str):
            return mod
    return _cached_probe(name, torch.device(device), dtype)


@functools.cache
def _cached_probe(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    # Probes (compiler builds, driver queries) are expensive: ask once per key. The
    # device keeps its index: GPUs of one node may differ in capability.
    return get_backend(name).probe(device, dtype)


def forget_probes() -> None:
    """Drop the cached probe answers (after a backend's extension was rebuilt or
    substituted, or an override entered or left)."""
    _cached_probe.cache_clear()


def refusal(name: str, problem: Problem | RectProblem) -> str | None:
    """Why ``name`` cannot run ``problem``, or ``None`` if it can."""
    why = unavailable_reason(name, problem.device, problem.dtype)
    if why is not None:
        return why
    impl = get_backend(name)
    if isinstance(problem, RectProblem) and not (
        hasattr(impl, "rect_forward") and hasattr(impl, "rect_backward")
    ):
        return "this implementation has no rectangular (rows against columns) kernels"
    return impl.refusal(problem)


def resolve(backend: str, problem: Problem | RectProblem) -> str:
    """Turn ``backend`` (a name or ``"auto"``) into a backend that can run ``problem``
    (the fused loss's ``Problem``, or the ``RectProblem`` of the losses across ranks).

    Raises:
        ValueError: unknown name.
        BackendUnavailable: an explicit backend that cannot run ``problem``, or no
            backend under ``"auto"``, with the reasons.
    """
    if backend == "auto":
        reasons = []
        for name in auto_order(problem):
            why = refusal(name, problem)
            if why is None:
                _log_choice(name, _describe(problem), tuple(reasons))
                return name
            reasons.append(f"{name}: {why}")
        raise BackendUnavailable(
            f"no backend can run {_describe(problem)}: " + "; ".join(reasons)
        )
    if backend not in BACKEND_MODULES:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    why = refusal(backend, problem)
    if why is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run {_describe(problem)}: {why}")
    return backend


def auto_order(problem: Problem | RectProblem) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``problem``, in order: ``_AUTO_ORDER`` of its
    device type, with the measured choice of ``dispatch_table`` (if any) moved first."""
    order = _AUTO_ORDER.get(problem.device.type, ("torch",))
    d = (problem.x if isinstance(problem, RectProblem) else problem.a).shape[-1]
    first = dispatch_table.preferred(problem.device, problem.dtype, d)
    if first is None or first not in order:
        return order
    return (first, *(name for name in order if name != first))


def _describe(problem: Problem | RectProblem) -> str:
    """The inputs, as messages name them: ``cpu/torch.float32 inputs of shape (H, N, D)``
    (rectangular: ``... rows (H, R, D) against columns (H, C, D)``)."""
    if isinstance(problem, RectProblem):
        return (f"{problem.device}/{problem.dtype} rows {tuple(problem.x.shape)} against "
                f"columns {tuple(problem.y.shape)}")  # fmt: skip
    return f"{problem.device}/{problem.dtype} inputs of shape {tuple(problem.a.shape)}"


@functools.cache
def _log_choice(name: str, inputs: str, passed_over: tuple[str, ...]) -> None:
    # Cached: one line per distinct choice, not one per call.
    logger.debug("backend='auto' chose %r for %s%s", name, inputs,
                 "".join(f"; passed over {why}" for why in passed_over))


@contextlib.contextmanager
def override_backend(name: str, impl: Backend) -> Iterator[Backend]:
    """Inside the block, backend ``name`` is ``impl`` (any object with the four functions
    of ``contract.Backend``), for explicit requests and ``"auto"`` alike.

    For tests and emulation, e.g. the CUDA kernels' source run on CPU tensors; not
    thread-safe, and the probes are forgotten on entry and exit.
    """
    if name not in BACKEND_MODULES:
        raise ValueError(f"name must be one of {BACKENDS}, got {name!r}")
    previous = _OVERRIDES.get(name)
    _OVERRIDES[name] = impl
    forget_probes()
    try:
        yield impl
    finally:
        if previous is None:
            del _OVERRIDES[name]
        else:
            _OVERRIDES[name] = previous
        forget_probes()


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
