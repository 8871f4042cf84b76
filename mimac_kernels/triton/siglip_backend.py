"""The sigmoid loss (SigLIP) on the ``triton`` backend: tiles, grids and launches.

Contract: ``mimac_kernels.siglip_torch``. Kernels: ``siglip_kernels``. Three launches
per forward + backward pair: the forward (row blocks), the row gradient (row blocks x
slices of D) and the column gradient (column blocks x slices of D). Nothing is read
back to the host: scale and bias are loaded by the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from mimac_kernels.contract import kernel_dtype_refusal
from mimac_kernels.triton import configs
from mimac_kernels.triton.siglip_kernels import siglip_bwd_kernel, siglip_fwd_kernel


@dataclass(frozen=True)
class SiglipTiles:
    """Tile sizes of the three launches (powers of two; ``block_d``, ``block_g`` >= 16).

    block_m, block_n: rows of the program's block and of the swept tile; block_d: the
    feature step of the score GEMM; block_g: the slice of D one backward program holds.
    """

    block_m: int = 64
    block_n: int = 64
    block_d: int = 64
    block_g: int = 256
    fwd_warps: int = 4
    fwd_stages: int = 3
    bwd_warps: int = 8
    bwd_stages: int = 2


def tiles(d: int) -> SiglipTiles:
    """The tiles for feature width ``d``: the score step and the gradient slice no wider
    than D rounded up to a power of two (at least 16, ``tl.dot``'s smallest)."""
    width = max(16, triton.next_power_of_2(d))
    return SiglipTiles(block_d=min(64, width), block_g=min(256, width))


def _consts(dtype: torch.dtype) -> dict:
    return {
        "PREC": configs.float32_precision() if dtype == torch.float32 else "ieee",
        "DOT_F32": configs.interpreting() and dtype == torch.bfloat16,
    }


def _guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _Null()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _require(x: Tensor) -> None:
    why = kernel_dtype_refusal(x.dtype)
    if why is not None:
        raise ValueError(f"the triton backend cannot run the sigmoid loss: {why}")


def forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int) -> Tensor:
    """Per-row sums, ``(H, R)`` float32 (``siglip_torch.forward``)."""
    _require(x)
    x, y = x.contiguous(), y.contiguous()
    h, r, d = x.shape
    cfg = tiles(d)
    out = torch.empty(h, r, dtype=torch.float32, device=x.device)
    t, b = scale.float().contiguous(), bias.float().contiguous()
    with _guard(x):
        siglip_fwd_kernel[(triton.cdiv(r, cfg.block_m), h)](
            x, y, t, b, out, r, y.shape[1], d, offset,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages, **_consts(x.dtype),
        )  # fmt: skip
    return out


def backward(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, g: Tensor, offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dy, dscale, dbias)``, float32 (``siglip_torch.backward``)."""
    _require(x)
    x, y = x.contiguous(), y.contiguous()
    h, r, d = x.shape
    c = y.shape[1]
    cfg = tiles(d)
    g = g.float().contiguous()
    t, b = scale.float().contiguous(), bias.float().contiguous()
    dx = torch.empty(h, r, d, dtype=torch.float32, device=x.device)
    dy = torch.empty(h, c, d, dtype=torch.float32, device=x.device)
    part = torch.empty(2, h, r, dtype=torch.float32, device=x.device)
    slices = triton.cdiv(d, cfg.block_g)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                BLOCK_G=cfg.block_g, num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages,
                **_consts(x.dtype))  # fmt: skip
    with _guard(x):
        siglip_bwd_kernel[(triton.cdiv(r, cfg.block_m), slices, h)](
            x, y, t, b, g, dx, part, r, c, d, offset, G_ON_A=True, **meta
        )
        siglip_bwd_kernel[(triton.cdiv(c, cfg.block_m), slices, h)](
            y, x, t, b, g, dy, part, c, r, d, -offset, G_ON_A=False, **meta
        )
    # The per-row partials summed in float64, in a fixed order: deterministic.
    sums = part.double().sum(dim=(1, 2)).float()
    return dx, dy, sums[0], sums[1]
