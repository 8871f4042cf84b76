"""Checks that need the device but must pass before a run writes anything."""

from __future__ import annotations

import torch


def check_kernel_backend(name: str, device: torch.device) -> None:
    """Raise ValueError if ``kernel_backend=name`` cannot run float32 losses on ``device``.

    The losses resolve the backend at their first call; without this check an
    unavailable one (``cuda`` or ``triton`` without a GPU) surfaced as an uncaught
    ``BackendUnavailable`` after the run folder had been created.
    """
    from mimac_kernels.contract import Problem
    from mimac_kernels.dispatch import BackendUnavailable, resolve

    rows = torch.zeros(1, 2, 4, device=device)  # the smallest problem: availability only
    try:
        resolve(name, Problem(rows, rows, torch.ones((), device=device), "cosine", "all", 1e-12))
    except (BackendUnavailable, ValueError) as exc:
        raise ValueError(f"config key 'kernel_backend' is {name!r}, which cannot run here: {exc}. "
                         "Use kernel_backend=auto or torch") from None
