"""The sigmoid loss (SigLIP) on the ``triton`` backend: tiles, grids and launches.

Contract: ``mimac_kernels.siglip_torch``. Kernels: ``siglip_kernels``. Three launches
per column panel in the backward (weights, row gradient, column gradient) after the
forward's one (row blocks). Nothing is read
back to the host: scale and bias are loaded by the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from mimac_kernels.contract import MAX_GRID_HEADS, kernel_dtype_refusal
from mimac_kernels.triton import configs
from mimac_kernels.triton.siglip_kernels import (
    siglip_fwd_kernel,
    siglip_gemm_kernel,
    siglip_weights_kernel,
)


@dataclass(frozen=True)
class SiglipTiles:
    """Tiles of the launches (powers of two; ``block_d``, ``gemm_*`` >= 16).

    block_m, block_n, block_d: rows, columns and feature step of the score tiles
    (forward and weights); panel: columns whose weights the backward stores at once;
    gemm_m, gemm_n, gemm_k: output rows, output features and reduction step of the
    gradient GEMMs; split: see ``column_splits``.
    """

    block_m: int = 128
    block_n: int = 256
    block_d: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 2
    panel: int = 2048
    gemm_m: int = 128
    gemm_n: int = 256
    gemm_k: int = 64
    gemm_warps: int = 8
    gemm_stages: int = 3
    #: Splits of the column gradient's reduction over rows (0: from the device's SMs).
    split: int = 0


def tiles(d: int) -> SiglipTiles:
    """The tiles for feature width ``d``: the score step and the GEMMs' feature tile no
    wider than D rounded up to a power of two (at least 16, ``tl.dot``'s smallest)."""
    width = max(16, triton.next_power_of_2(d))
    return SiglipTiles(block_d=min(64, width), gemm_n=min(256, width))


#: Most splits of the column gradient's reduction (each writes a ``p x D`` float32 slab).
MAX_SPLIT = 16


def column_splits(tiles_out: int, k: int, cfg: SiglipTiles, sms: int) -> int:
    """Splits of the column gradient's reduction (K = every row). A panel has few output
    tiles (``tiles_out``: 16 x 3 at a 2,048-column panel and D = 768), fewer than the
    ``sms`` SMs: the split with the shortest schedule, ``ceil(tiles x s / sms) / s`` waves
    of whole-K programs, up to ``MAX_SPLIT`` and no range shorter than 8 reduction steps
    (the smallest such s on a tie). ``cfg.split`` > 0 is taken as is."""
    if cfg.split > 0:
        return cfg.split
    most = max(1, min(MAX_SPLIT, k // (8 * cfg.gemm_k)))
    cost = [(-(-tiles_out * s // max(sms, 1)) / s, s) for s in range(1, most + 1)]
    return min(cost)[1]


def _sms(x: Tensor) -> int:
    """Streaming multiprocessors of ``x``'s GPU (1 on the CPU: the interpreter)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1


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
    """``(dx, dy, dscale, dbias)``, float32 (``siglip_torch.backward``).

    Column panels of ``cfg.panel`` columns, one after another: the panel's weights
    (``(H, R, panel)`` in the inputs' dtype, the only buffer beyond the gradients), then
    ``dx += t W y_panel`` and ``dy_panel = t W^T x``.
    """
    _require(x)
    x, y = x.contiguous(), y.contiguous()
    h, r, d = x.shape
    c = y.shape[1]
    cfg = tiles(d)
    g = g.float().contiguous()
    t, b = scale.float().contiguous(), bias.float().contiguous()
    dx = torch.zeros(h, r, d, dtype=torch.float32, device=x.device)
    dy = torch.empty(h, c, d, dtype=torch.float32, device=x.device)
    part = torch.zeros(2, h, r, dtype=torch.float32, device=x.device)
    width = min(cfg.panel, c)
    w = torch.empty(h, r, width, dtype=x.dtype, device=x.device)
    consts = _consts(x.dtype)
    gemm = dict(BLOCK_M=cfg.gemm_m, BLOCK_N=cfg.gemm_n, BLOCK_K=cfg.gemm_k,
                num_warps=cfg.gemm_warps, num_stages=cfg.gemm_stages, **consts)  # fmt: skip
    with _guard(x):
        for c0 in range(0, c, width):
            p = min(width, c - c0)
            siglip_weights_kernel[(triton.cdiv(r, cfg.block_m), h)](
                x, y, t, b, g, w, part, r, c, d, c0, width, offset,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages, **consts,
            )  # fmt: skip
            # dx (R x D) += t W (R x p) @ y[c0 : c0 + p] (p x D)
            siglip_gemm_kernel[(triton.cdiv(r, cfg.gemm_m), triton.cdiv(d, cfg.gemm_n), h)](
                w, y[:, c0:], dx, t, r, d, p, r * width, width, 1, c * d, d, 1, r * d,
                1, p, 0, ACC=True, **gemm,
            )  # fmt: skip
            # dy[c0 : c0 + p] (p x D) = t W^T (p x R) @ x (R x D), the reduction over R in
            # `split` ranges written apart and summed in order (deterministic).
            col_tiles = triton.cdiv(p, cfg.gemm_m) * triton.cdiv(d, cfg.gemm_n) * h
            # heads x splits share one grid axis (at most 65,535)
            split = min(column_splits(col_tiles, r, cfg, _sms(x)), max(1, MAX_GRID_HEADS // h))
            step = triton.cdiv(triton.cdiv(r, split), cfg.gemm_k) * cfg.gemm_k
            out = dy[:, c0:] if split == 1 else torch.empty(split, h, p, d, device=x.device)
            siglip_gemm_kernel[(triton.cdiv(p, cfg.gemm_m), triton.cdiv(d, cfg.gemm_n),
                                h * split)](
                w, x, out, t, p, d, r, r * width, 1, width, r * d, d, 1,
                c * d if split == 1 else p * d, split, step, h * p * d, ACC=False, **gemm,
            )  # fmt: skip
            if split > 1:
                dy[:, c0 : c0 + p] = out.sum(0)
    # The per-row partials summed in float64, in a fixed order: deterministic.
    sums = part.double().sum(dim=(1, 2)).float()
    return dx, dy, sums[0], sums[1]
