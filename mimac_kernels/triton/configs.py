"""Block sizes for the Triton kernels: a heuristic table, autotune only on request.

Autotuning needs a GPU driver and costs seconds per new shape, so by default the
launchers take the table below (FlashAttention-like tile shapes, each checked
to compile for sm_90 without register spills; not yet timed on a GPU).
``MIMAC_KERNELS_AUTOTUNE=1`` makes ``backend`` wrap the kernels in
``triton.autotune`` over ``autotune_configs()`` instead.

Under ``TRITON_INTERPRET=1`` (CPU tests) every program is a Python loop over
numpy arrays: fewer, larger tiles are faster there, and the warps/stages
settings mean nothing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

#: Largest feature dimension kept as one register tile (no loop over D).
MAX_SINGLE_D = 128
#: Largest D of the backward's sliced path (half inputs; see ``backward_config``).
MAX_SLICED_D = 512
#: Column tile of the sliced backward.
SLICED_BLOCK_N = 32
#: Chunk of D per step when D is larger than one tile (interpreter).
D_CHUNK = 64
#: Programs per SM the column split aims for (enough to hide latency and to
#: balance the triangular "all" forward without a persistent scheduler).
PROGRAMS_PER_SM = 8
#: ``tl.dot`` needs every tile dimension to be at least 16.
MIN_BLOCK = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """True when ``MIMAC_KERNELS_AUTOTUNE=1`` asks for ``triton.autotune``."""
    return os.environ.get("MIMAC_KERNELS_AUTOTUNE", "0") == "1"


def float32_precision() -> str:
    """``tl.dot`` input precision for float32 inputs.

    ``"ieee"`` by default: TF32 rounds inputs to 10 mantissa bits, which breaks
    the "2x plain PyTorch float32 error" rule. ``MIMAC_KERNELS_TRITON_FP32=tf32``
    (or ``tf32x3``) trades that exactness for tensor-core speed.
    """
    value = os.environ.get("MIMAC_KERNELS_TRITON_FP32", "ieee")
    if value not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"MIMAC_KERNELS_TRITON_FP32 must be ieee, tf32 or tf32x3, got {value!r}")
    return value


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of one kernel call.

    ``block_m`` rows x ``block_n`` columns per similarity tile; ``block_d``
    features per ``tl.dot`` step (``single_d``: all of D in one step).
    ``slice_d`` (backward, ``single_d`` only; 0 = ``block_d``): features of the
    row gradient one program keeps in registers; below ``block_d``, a row block's
    gradient is split over ``block_d // slice_d`` programs.
    """

    block_m: int
    block_n: int
    block_d: int
    single_d: bool
    num_warps: int
    num_stages: int
    slice_d: int = 0

    @property
    def grad_d(self) -> int:
        """Width of the register tile of the row gradient (``slice_d`` or ``block_d``)."""
        return self.slice_d or self.block_d

    def d_slices(self, d: int) -> int:
        """Programs per row block of the backward for ``d`` features."""
        return -(-d // self.grad_d) if self.single_d else 1


def _d_tiling(d: int, max_single: int, chunk: int) -> tuple[int, bool]:
    block = max(MIN_BLOCK, _next_pow2(d))
    if block <= max_single:
        return block, True
    return chunk, False


# The GPU rows below were checked by compiling for sm_90 (triton 3.9) and reading
# the cubin's resource usage: none of them spills registers. float32 inputs go
# through tl.dot with input_precision="ieee" (FMA, no tensor cores), which
# needs far more registers, hence the smaller tiles and D chunks.


def forward_config(d: int, itemsize: int) -> TileConfig:
    """Tiles of the forward (exp-sum) kernel; block_m == block_n (symmetric pairing)."""
    if interpreting():
        block_d, single = _d_tiling(d, 256, D_CHUNK)
        return TileConfig(64, 64, block_d, single, 1, 1)
    if itemsize <= 2:
        block_d, single = _d_tiling(d, MAX_SINGLE_D, 32)
        if single:
            # One warpgroup per 128 x 128 tile, two CTAs per SM: each thread holds
            # four rows of the tile, so the column sums (shuffles across the lanes
            # that share a column) cost half as much per element as with 8 warps.
            return TileConfig(128, 128, block_d, single, 4, 2)
        return TileConfig(128, 128, block_d, single, 8, 3)
    block_d, single = _d_tiling(d, 32, 32)
    return TileConfig(64, 64, block_d, single, 8, 3)


def finalize_config(d: int, itemsize: int) -> TileConfig:
    """Tiles of the exact (running-max) log-sum-exp fallback."""
    if interpreting():
        block_d, single = _d_tiling(d, 256, D_CHUNK)
        return TileConfig(64, 64, block_d, single, 1, 1)
    if itemsize <= 2:
        block_d, single = _d_tiling(d, MAX_SINGLE_D, 32)
        return TileConfig(128, 64, block_d, single, 8, 3)
    block_d, single = _d_tiling(d, 32, 32)
    return TileConfig(64, 32, block_d, single, 8, 3)


def backward_config(d: int, itemsize: int, log_dot: bool = False) -> TileConfig:
    """Tiles of the gradient kernel (row gradient in registers: block_m x D float32).

    ``log_dot`` (a log and a division more per element) gets narrower tiles.
    """
    if interpreting():
        # Slices of 64 above D = 64, so the CPU tests run the sliced path too.
        block_d, single = _d_tiling(d, 256, D_CHUNK)
        return TileConfig(64, 64, block_d, single, 1, 1, min(block_d, 64) if single else 0)
    if itemsize <= 2 and not log_dot and MAX_SINGLE_D < d <= MAX_SLICED_D:
        # The row block whole in shared memory for the score GEMM (128 x 512 bf16:
        # 128 KiB), the gradient in slices of 256 features (128 x 256 float32 over
        # 8 warps: 128 registers a thread), 32-column tiles so that a tile of Y
        # and its slice, double-buffered, fit beside it.
        block_d = _next_pow2(d)
        return TileConfig(128, SLICED_BLOCK_N, block_d, True, 8, 2, min(block_d, 256))
    block_d, single = _d_tiling(d, MAX_SINGLE_D, 32)
    if itemsize > 2:
        return TileConfig(64, 32, block_d, single, 8, 2)
    # Half inputs, one register tile of D: the score tile feeds the gradient GEMM,
    # so Triton lays the warps along M (warpsPerCTA [warps, 1]). 64 rows need
    # 4 warps (one warpgroup), 8 warps need 128 rows: with 64 rows and 8 warps
    # both warpgroups would compute the whole score tile and its exponentials.
    if log_dot and single and block_d > 64:
        return TileConfig(64, 32, block_d, single, 4, 2)
    if single:
        return TileConfig(128, 64, block_d, single, 8, 2)
    if log_dot:  # float32 weights for float16 (GRAD_TF32): 4 warps would spill
        return TileConfig(64, 64, block_d, single, 8, 2)
    # D in chunks: one warpgroup per 64 x 64 tile (two CTAs per SM). With 8 warps
    # the chunks' gradient GEMMs and atomics were split over [4, 2] warps and cost
    # about twice the issue slots and shared-memory traffic per tile.
    return TileConfig(64, 64, block_d, single, 4, 2)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device) -> int:
    """How many programs a launch should have to fill the device (1 in the interpreter,
    where every program is a slow Python call). Asked of the device on first use only."""
    if interpreting() or device.type != "cuda":
        return 1
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)


def column_blocks_per_program(row_programs: int, n_col_blocks: int, tiles: int, target: int) -> int:
    """Column blocks each program walks (the grid's second axis splits the columns).

    ``row_programs`` programs (row blocks x heads) already exist; when that is
    fewer than ``target`` the column range is cut so that about ``target``
    programs share the ``tiles`` tiles. Large problems get one chunk: every
    extra chunk costs atomic adds of partial results. Grid axis 1 is capped
    at 65535.
    """
    if row_programs >= target:
        per = n_col_blocks
    else:
        per = max(1, tiles // max(target, 1))
    per = max(per, -(-n_col_blocks // 65535))
    return max(1, min(per, n_col_blocks))


def autotune_configs(symmetric_tiles: bool) -> list[dict]:
    """Candidate (meta-parameters, warps, stages) for ``triton.autotune``.

    ``symmetric_tiles``: the forward pairs tile (I, K) with row block K, so it
    needs square tiles.
    """
    out = []
    for bm in (64, 128):
        for bn in (64, 128):
            if symmetric_tiles and bm != bn:
                continue
            for warps in (4, 8):
                for stages in (2, 3):
                    out.append(
                        {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                    )
    return out
