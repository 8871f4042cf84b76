"""H100 SXM rates and the arithmetic of the static cost model (no Triton needed).

Every rate carries its source. ``static_cost`` turns SASS counts into time with
these; they are kept apart so that tests can check them in any process (the
compiling modules drop ``TRITON_INTERPRET`` on import).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rates:
    """H100 SXM5 rates the estimate uses, each with its source."""

    #: NVIDIA H100 datasheet / whitepaper: 132 SMs on the SXM5 board.
    sms: int = 132
    #: Max boost clock 1,980 MHz: the datasheet's FP32 rate, 66.9 TFLOP/s
    #: = 132 SMs x 128 lanes x 2 FLOP x 1.98 GHz (H100 whitepaper, table of specs).
    clock_hz: float = 1.98e9
    #: Warp instructions issued per clock per SM: 4 sub-partitions, one warp
    #: scheduler each, one instruction per clock (H100 whitepaper, SM diagram).
    issue_per_clock: float = 4.0
    #: MUFU results per clock per SM for exp2/log2/rcp on compute capability 9.0
    #: (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table).
    mufu_per_clock: float = 16.0
    #: Dense bf16 tensor-core rate, 989.4 TFLOP/s (H100 SXM datasheet; it is
    #: 132 SMs x 4,096 FLOP/clock x 1.83 GHz, the clock the datasheet rates it at).
    tensor_flops: float = 989.4e12
    #: Shared-memory bandwidth per SM: 32 banks x 4 bytes per clock (CUDA C++
    #: Programming Guide, "Shared Memory" of compute capability 5.x and later).
    shared_bytes_per_clock: float = 128.0
    #: HBM3 bandwidth, 3.35 TB/s (H100 SXM datasheet).
    dram_bytes_per_s: float = 3.35e12
    #: Per-SM limits of compute capability 9.0 (CUDA C++ Programming Guide,
    #: "Technical Specifications"): registers, shared memory (228 KiB, of which
    #: 1 KiB is reserved per resident block), warps and blocks.
    registers_per_sm: int = 65536
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_block: int = 1024
    warps_per_sm: int = 64
    blocks_per_sm: int = 32

    @property
    def exp_per_s(self) -> float:
        return self.mufu_per_clock * self.sms * self.clock_hz


H100 = Rates()


def ctas_per_sm(registers: int, shared: int, num_warps: int, rates: Rates = H100) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared
    memory and warp/block limits; 0 if one CTA does not fit."""
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = rates.registers_per_sm // max(regs_per_warp * num_warps, 1)
    by_shared = rates.shared_per_sm // (shared + rates.shared_reserved_per_block)
    return int(min(by_regs, by_shared, rates.warps_per_sm // num_warps, rates.blocks_per_sm))


def makespan(program_seconds: list[float], slots: int, slowdown: float) -> float:
    """Finish time of programs dealt in order to ``slots`` slots, each as soon as one frees.

    ``slowdown``: how much slower a program runs for sharing its SM (CTAs per SM).
    """
    heap = [0.0] * max(slots, 1)
    for t in program_seconds:
        start = heapq.heappop(heap)
        heapq.heappush(heap, start + t * slowdown)
    return max(heap)


def floor(pairing: str, rows: int, d: int, rates: Rates = H100) -> dict:
    """Physical floor of forward + backward (design/performance.md), matrix and exp units
    overlapped: NT-Xent (``all``, M = ``rows``) 4 M^2 D FLOP and M^2 exp; CLIP
    (``cross``, N = ``rows``) 8 N^2 D FLOP and 4 N^2 exp."""
    if pairing not in ("all", "cross"):
        raise ValueError(f"pairing must be 'all' or 'cross', got {pairing!r}")
    m = float(rows)
    flops, exps = (4.0 * m * m * d, m * m) if pairing == "all" else (8.0 * m * m * d, 4.0 * m * m)
    t_mm, t_exp = flops / rates.tensor_flops, exps / rates.exp_per_s
    return {"flops": flops, "exps": exps, "seconds": max(t_mm, t_exp),
            "bound": "tensor" if t_mm >= t_exp else "sfu"}  # fmt: skip
