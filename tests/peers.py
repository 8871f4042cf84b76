"""The peers' loss files for the drop-in tests (``benchmarks.peer_losses``): skipped where
a peer is not installed, a failure under CI, which installs every peer (``.ci/run``)."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from benchmarks import peer_losses


def lightly_ntxent_class() -> type:
    """lightly's ``NTXentLoss`` from its own source files, without torchvision."""
    try:
        return peer_losses.lightly_ntxent_class()
    except ModuleNotFoundError as exc:
        _missing(exc, "lightly==1.6.0")
        raise


def open_clip_loss_module() -> ModuleType:
    """open_clip's ``loss.py`` on its own (its package pulls in torchvision and timm)."""
    try:
        return peer_losses.open_clip_loss_module()
    except ModuleNotFoundError as exc:
        _missing(exc, "open_clip_torch")
        raise


def _missing(exc: ModuleNotFoundError, package: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{exc} (CI installs {package} --no-deps)")
    pytest.skip(str(exc))
