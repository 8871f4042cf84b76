"""The CUDA backend's kernels run on CPU tensors, through the emulation of ``csrc/emulation``.

For tests and debugging where no GPU is: a CTA at a time, so only small shapes are
practical. It checks the kernels' logic (indexing, masking, staging, barriers,
launch configuration), not the hardware; see ``csrc/emulation/cuda_emu.h``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from mimac_kernels import cuda_backend, dispatch, extension
from mimac_kernels.contract import kernel_dtype_refusal

#: Thread and block orders of the CUDA emulation (``csrc/emulation/cuda_emu.h``).
EMULATION_SCHEDULES = ("in_order", "reversed", "shuffled", "warps_in_order", "warps_reversed")


@functools.cache
def cuda_emulation() -> Any:
    """The CUDA emulation's ops, ``torch.ops.mimac_cuda_emu`` (``binding.cpp`` for the
    CPU dispatch key; ``extension.cuda_emulation_spec``), built or loaded once per
    process; it also registers ``torch.ops.mimac_emu`` and ``torch.ops.mimac_emu_selftest``."""
    return extension.build(extension.cuda_emulation_spec())


class EmulatedCuda:
    """The ``cuda`` backend's calls on CPU tensors (with the emulation in place of the
    extension, see ``emulated_cuda_backend``)."""

    @staticmethod
    def probe(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "the emulated cuda backend runs on CPU tensors"
        return kernel_dtype_refusal(dtype)

    refusal = staticmethod(cuda_backend.refusal)
    forward = staticmethod(cuda_backend.forward)
    backward = staticmethod(cuda_backend.backward)
    rect_forward = staticmethod(cuda_backend.rect_forward)
    rect_backward = staticmethod(cuda_backend.rect_backward)


@contextlib.contextmanager
def emulated_cuda_backend() -> Iterator[Any]:
    """Inside the block, ``backend="cuda"`` runs the CUDA kernels' own source (and
    ``binding.cpp``) on CPU tensors. Builds the emulation on first use (about a
    minute); raises ``extension.ExtensionUnavailable`` if that fails."""
    module = cuda_emulation()
    with extension.substitute("cuda", module), dispatch.override_backend("cuda", EmulatedCuda()):
        yield module


@contextlib.contextmanager
def emulation_schedule(schedule: str, seed: int = 0) -> Iterator[None]:
    """Inside the block, emulated CUDA launches run their blocks, and the threads of
    each block between two barriers, in ``schedule`` order: every thread to its next
    barrier per sweep ("in_order", "reversed", "shuffled" with ``seed``), or one warp
    at a time to its next block barrier ("warps_in_order", "warps_reversed"). A
    kernel without races between barriers gives the same bits under every order;
    comparing them is the emulation's race check.
    """
    if schedule not in EMULATION_SCHEDULES:
        raise ValueError(f"schedule must be one of {EMULATION_SCHEDULES}, got {schedule!r}")
    cuda_emulation()  # registers torch.ops.mimac_emu
    torch.ops.mimac_emu.set_schedule(EMULATION_SCHEDULES.index(schedule), seed)
    try:
        yield
    finally:
        torch.ops.mimac_emu.set_schedule(0, 0)

