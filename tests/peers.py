"""The peers' loss files for the drop-in tests (``benchmarks.peer_losses``): skipped where
a peer is not installed, a failure under CI, which installs every peer (``.ci/run``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import pytest

from benchmarks import peer_losses

T = TypeVar("T")


def lightly_ntxent_class() -> type:
    """lightly's ``NTXentLoss`` from its own source files, without torchvision."""
    return _load(peer_losses.lightly_ntxent_class, "lightly==1.6.0")


def open_clip_loss_module() -> ModuleType:
    """open_clip's ``loss.py`` on its own (its package pulls in torchvision and timm)."""
    return _load(peer_losses.open_clip_loss_module, "open_clip_torch")


def _load(loader: Callable[[], T], package: str) -> T:
    try:
        return loader()
    except ModuleNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI installs {package} --no-deps)")
        pytest.skip(str(exc))
