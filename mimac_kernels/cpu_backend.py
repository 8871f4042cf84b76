"""The ``cpu`` backend: the fused C++ kernel of ``csrc/cpu`` (OpenMP, built on first use).

Kernel-level contract: ``mimac_kernels.contract``. Computes in float32
(float16/bfloat16 inputs are upcast); float64 stays with the ``torch`` backend.
The tile kernels exist for AVX-512, AVX2 and baseline x86-64 and are chosen at
run time (``isa()``/``set_isa()`` inspect and override the choice). The kernels are the
torch operators ``torch.ops.mimac_cpu.*`` (CPU dispatch key; ``extension_backend``).
"""

from __future__ import annotations

import functools

import torch

from mimac_kernels import extension, extension_backend
from mimac_kernels.contract import Problem, RectProblem, kernel_dtype_refusal


def probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if the CPU kernel runs ``device``/``dtype`` (building it on first call)."""
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device.type}"
    return kernel_dtype_refusal(dtype) or extension.unavailable_reason("cpu")


def refusal(problem: Problem | RectProblem) -> str | None:
    """Never by shape: the kernel loops over any number of heads, rows and features (and
    its tiles take a labelled rectangular problem's label mask)."""
    return None


forward = functools.partial(extension_backend.forward, "cpu")
backward = functools.partial(extension_backend.backward, "cpu")
rect_forward = functools.partial(extension_backend.rect_forward, "cpu")
rect_backward = functools.partial(extension_backend.rect_backward, "cpu")


def _ext():
    return extension.load("cpu")


def isa() -> str:
    """Instruction set of the tile kernels in use ("avx512", "avx2" or "base")."""
    return _ext().isa()


def available_isas() -> list[str]:
    """Instruction sets this CPU can run, best first."""
    return list(_ext().available_isas())


def set_isa(name: str) -> None:
    """Use the tile kernels compiled for ``name`` (tests and benchmarks compare them)."""
    _ext().set_isa(name)


def group(n_rows: int, d: int) -> int:
    """Blocks per group tile the schedule uses for ``n_rows`` rows of width ``d``."""
    return int(_ext().group(n_rows, d))


def set_group(g: int) -> None:
    """Force ``g`` blocks per group tile (0: automatic); tests and benchmarks compare them."""
    _ext().set_group(g)
