"""Fixtures of the kernel tests."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.kernels.backends import RUNNERS, running
from tests.kernels.emulation import emulated_cuda_backend


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request):
    """Each backend that runs here in turn (``tests.kernels.backends``); module-scoped, so
    the tests of one backend run together inside its set-up (e.g. the emulation)."""
    with running(request.param) as r:
        yield r


@pytest.fixture(scope="module")
def emu():
    """``torch.ops.mimac_emu`` (tallies, shared memory per block) with ``backend="cuda"``
    running the CUDA emulation on CPU tensors; skips where no C++ compiler is."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the emulation cannot be built")
    with emulated_cuda_backend():
        yield torch.ops.mimac_emu
