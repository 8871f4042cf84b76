"""Every backend that runs on this machine, as a module-scoped pytest fixture parameter.

``torch`` and ``cpu`` on CPU tensors; ``triton`` on the GPU, else in Triton's
interpreter; ``cuda`` on the GPU and, everywhere a C++ compiler is, through the CPU
emulation of ``csrc/emulation`` (``tests.kernels.emulation``). A backend that should
run here and cannot (a failed build) fails; one that cannot run on this machine skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from mimac_kernels import dispatch
from mimac_kernels.contract import Backend
from tests.kernels.emulation import emulated_cuda_backend

GPU = torch.device("cuda")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Runner:
    """A backend by name, where its inputs live, and how the test ids call it."""

    name: str
    device: torch.device
    label: str

    @property
    def impl(self) -> Backend:
        return dispatch.get_backend(self.name)

    @property
    def interpreted(self) -> bool:
        """Triton on CPU tensors: its interpreter, slow at larger shapes."""
        return self.name == "triton" and self.device.type == "cpu"


#: GPU backends first: a time-boxed run on a GPU machine reaches them before a cut.
RUNNERS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda-gpu", id="cuda-gpu", marks=pytest.mark.gpu),
    pytest.param("cuda-emulated", id="cuda-emulated", marks=pytest.mark.emulated),
    pytest.param("cpu", id="cpu"),
    pytest.param("torch", id="torch"),
]


def _no_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is None


@contextlib.contextmanager
def running(label: str) -> Iterator[Runner]:
    """Set up the backend ``label`` (a ``RUNNERS`` id), skipping where it cannot run here."""
    if label == "torch":
        yield Runner("torch", CPU, label)
    elif label == "cpu":
        if _no_compiler():
            pytest.skip("no C++ compiler on this machine: the cpu backend cannot be built")
        why = dispatch.unavailable_reason("cpu", CPU, torch.float32)
        assert why is None, why  # a failed build fails, never skips
        yield Runner("cpu", CPU, label)
    elif label == "triton":
        device = GPU if torch.cuda.is_available() else CPU
        why = dispatch.unavailable_reason("triton", device, torch.float32)
        if why is not None:
            pytest.skip(why)
        yield Runner("triton", device, label)
    elif label == "cuda-gpu":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the cuda backend runs only on a GPU")
        why = dispatch.unavailable_reason("cuda", GPU, torch.float32)
        assert why is None, why  # on a GPU machine a failed build fails
        yield Runner("cuda", GPU, label)
    elif label == "cuda-emulated":
        if _no_compiler():
            pytest.skip("no C++ compiler on this machine: the emulation cannot be built")
        with emulated_cuda_backend():
            yield Runner("cuda", CPU, label)
    else:
        raise ValueError(f"unknown backend label {label!r}")
