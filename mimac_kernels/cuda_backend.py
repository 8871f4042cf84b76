"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda`` (built on first use).

Kernel-level contract: ``mimac_kernels.contract``. Tensor-core tiles (WMMA):
bf16/fp16 inputs natively, float32 through 3xTF32 (float32-level accuracy); sums,
exp and the outputs in float32. Needs compute capability 8.0 or newer on the
inputs' GPU. The kernels are the torch operators ``torch.ops.mimac_cuda.*`` (CUDA
dispatch key; ``extension_backend``). Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import functools

import torch

from mimac_kernels import extension, extension_backend
from mimac_kernels.contract import (
    LABEL_MASK_REFUSAL,
    Problem,
    RectProblem,
    heads_refusal,
    kernel_dtype_refusal,
)

MIN_CAPABILITY = (8, 0)


def probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if the CUDA kernels run on ``device`` (the inputs' GPU, by index) and
    ``dtype``, building them on first call."""
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    why = kernel_dtype_refusal(dtype)
    if why is not None:
        return why
    if torch.version.cuda is None:
        return "this torch is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    cap = torch.cuda.get_device_capability(device if device.index is not None else None)
    if cap < MIN_CAPABILITY:
        return (
            f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"(bf16/TF32 tensor cores), {device} has {cap[0]}.{cap[1]}"
        )
    return extension.unavailable_reason("cuda")


def refusal(problem: Problem | RectProblem) -> str | None:
    """The heads lie on one grid axis (at most 65,535); a labelled rectangular problem,
    whose label mask its kernels lack."""
    if isinstance(problem, RectProblem) and problem.labelled:
        return LABEL_MASK_REFUSAL
    return heads_refusal(problem)


forward = functools.partial(extension_backend.forward, "cuda")
backward = functools.partial(extension_backend.backward, "cuda")
rect_forward = functools.partial(extension_backend.rect_forward, "cuda")
rect_backward = functools.partial(extension_backend.rect_backward, "cuda")
