"""The sigmoid loss on the ``cpu`` backend: ``csrc/cpu/siglip.cpp`` (OpenMP, float32).

Built into the cpu extension (``extension.cpu_spec``) and registered there as the torch
ops ``mimac_siglip::forward``/``backward``. Contract: ``mimac_kernels.siglip_torch``.
float16/bfloat16 inputs are upcast to float32 here (exactly); float64 stays with the
``torch`` backend (``dispatch`` refuses it for ``cpu``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimac_kernels import extension


def _ops():
    extension.load("cpu")  # registers mimac_siglip::* on load
    return torch.ops.mimac_siglip


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int) -> Tensor:
    """Per-row sums, ``(H, R)`` float32 (see ``siglip_torch.forward``)."""
    return _ops().forward(_f32(x), _f32(y), float(scale), float(bias), offset)


def backward(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, g: Tensor, offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dy, dscale, dbias)`` in float32 (see ``siglip_torch.backward``)."""
    dx, dy, gt, gb = _ops().backward(_f32(x), _f32(y), float(scale), float(bias), _f32(g), offset)
    return dx, dy, gt, gb
