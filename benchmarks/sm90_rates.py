"""H100 SXM rates and the arithmetic of the static cost model (no Triton needed).

Every rate carries its source. ``static_cost`` turns SASS counts into time with
these; they are kept apart so that tests can check them in any process (the
compiling modules drop ``TRITON_INTERPRET`` on import).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field


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
    #: Dense TF32 tensor-core rate, 494.7 TFLOP/s (H100 SXM datasheet: "TF32 Tensor
    #: Core 989 TFLOPS" is with sparsity; dense is half): half the bf16 rate.
    tensor_tf32_flops: float = 494.7e12
    #: Shared-memory bandwidth per SM: 32 banks x 4 bytes per clock (CUDA C++
    #: Programming Guide, "Shared Memory" of compute capability 5.x and later).
    shared_bytes_per_clock: float = 128.0
    #: HBM3 bandwidth, 3.35 TB/s (H100 SXM datasheet).
    dram_bytes_per_s: float = 3.35e12
    #: L2 capacity, 50 MB on H100 SXM5 (H100 datasheet and whitepaper); the CUDA
    #: device property ``l2CacheSize`` reads it as 50 MiB.
    l2_bytes: int = 50 * 1024 * 1024
    #: L2 bandwidth, about 8.99 TB/s. *Derived, not measured*: NVIDIA publishes no L2
    #: bandwidth for H100 (datasheet and whitepaper are silent). The A100 whitepaper
    #: gives A100's L2 5,120 B/clk of read bandwidth (2.3x V100's 2,048 B/clk); a
    #: published hardware table (Ultrasonics Sonochemistry 99 (2023) 106546, Table 3,
    #: PMC10448217) lists H100's L2 at 8,986 GB/s, that same 5,120 B/clk at 1,755 MHz.
    #: The conservative end is taken: 1,755 MHz rather than the 1.98 GHz boost the
    #: issue bound uses (10.1 TB/s), and no per-clock gain over A100 credited.
    l2_bytes_per_s: float = 5120.0 * 1.755e9
    #: Bytes of global float32 reductions (RED/ATOM.ADD resolved in the L2) per second.
    #: *Derived*: a reduction reads and then writes its bytes in the L2 slice that owns
    #: the line, so it is charged the L2 data path twice: half of ``l2_bytes_per_s``.
    #: NVIDIA documents no atomic rate for H100; contention on one address (serialised
    #: in its slice) would only lower it.
    atomic_bytes_per_s: float = 5120.0 * 1.755e9 / 2
    #: Per-SM limits of compute capability 9.0 (CUDA C++ Programming Guide,
    #: "Technical Specifications"): registers, shared memory (228 KiB, of which
    #: 1 KiB is reserved per resident block), warps and blocks.
    registers_per_sm: int = 65536
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_block: int = 1024
    #: Dynamic shared memory one block may opt in to (``cudaFuncAttributeMaxDynamicShared
    #: MemorySize``): 227 KiB on compute capability 9.0 (same table; the device attribute
    #: ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` reads 232,448 on an H100).
    shared_optin_per_block: int = 227 * 1024
    warps_per_sm: int = 64
    blocks_per_sm: int = 32

    @property
    def exp_per_s(self) -> float:
        return self.mufu_per_clock * self.sms * self.clock_hz


H100 = Rates()


def memory_tile_seconds(global_bytes: float, atomic_bytes: float,
                        rates: Rates = H100) -> dict[str, float]:  # fmt: skip
    """L2 and atomic bounds of one tile on one SM (its 1/``sms`` share of the chip).

    ``global_bytes``: the tile's global loads and stores (all served by L2, hits or
    not); ``atomic_bytes``: its global reductions, which also cross the L2 and so
    count in both bounds.
    """
    return {
        "l2": (global_bytes + atomic_bytes) / (rates.l2_bytes_per_s / rates.sms),
        "atomics": atomic_bytes / (rates.atomic_bytes_per_s / rates.sms),
    }


def tile_bounds(per_tile: dict, num_warps: int, rates: Rates = H100,
                l2_resident: bool = True) -> dict[str, float]:  # fmt: skip
    """Every bound of one tile on one SM, in seconds, from its per-warp counts
    (``issue``, ``mufu_all``, ``shared_bytes``, ``global_bytes``, ``atomic_bytes``) and
    its CTA's ``tensor_macs_per_cta`` (of which ``tensor_tf32_macs_per_cta``, if given,
    run at the TF32 rate).

    ``l2_resident``: whether the launch's working set fits in L2; if not, the tile's
    global bytes and its reductions (read from DRAM and written back: twice) are also
    charged at its share of the HBM rate (``dram``; 0 when resident).
    """
    t, clock = per_tile, rates.clock_hz
    glob, atom = t["global_bytes"] * num_warps, t["atomic_bytes"] * num_warps
    missed = 0.0 if l2_resident else glob + 2 * atom
    tf32 = t.get("tensor_tf32_macs_per_cta", 0)
    return {
        "issue": t["issue"] * num_warps / rates.issue_per_clock / clock,
        "sfu": t["mufu_all"] * num_warps * 32 / rates.mufu_per_clock / clock,
        "tensor": 2 * (t["tensor_macs_per_cta"] - tf32) / (rates.tensor_flops / rates.sms)
        + 2 * tf32 / (rates.tensor_tf32_flops / rates.sms),
        "shared": t["shared_bytes"] * num_warps / rates.shared_bytes_per_clock / clock,
        **memory_tile_seconds(glob, atom, rates),
        "dram": missed / (rates.dram_bytes_per_s / rates.sms),
    }


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


def floor(pairing: str, rows: int, d: int, rates: Rates = H100, *, cols: int = 0,
          columns_grad: bool = True) -> dict:
    """Physical floor of forward + backward (design/performance.md), matrix and exp units
    overlapped: NT-Xent (``all``, M = ``rows``) 4 M^2 D FLOP and M^2 exp; CLIP
    (``cross``, N = ``rows``) 8 N^2 D FLOP and 4 N^2 exp; one rank's rows against the
    gathered columns (``rect``, R = ``rows``, C = ``cols``; no symmetry to share, the
    scores recomputed in the backward) 8 R C D FLOP (scores twice, dX, dY) and 2 R C exp;
    without the columns' gradient (``columns_grad=False``: a detached queue) 6 R C D."""
    if pairing not in ("all", "cross", "rect"):
        raise ValueError(f"pairing must be 'all', 'cross' or 'rect', got {pairing!r}")
    m = float(rows)
    if pairing == "rect":
        if cols < 1:
            raise ValueError(f"rect needs cols >= 1, got {cols}")
        flops, exps = (8.0 if columns_grad else 6.0) * m * cols * d, 2.0 * m * cols
    elif pairing == "all":
        flops, exps = 4.0 * m * m * d, m * m
    else:
        flops, exps = 8.0 * m * m * d, 4.0 * m * m
    t_mm, t_exp = flops / rates.tensor_flops, exps / rates.exp_per_s
    return {"flops": flops, "exps": exps, "seconds": max(t_mm, t_exp),
            "bound": "tensor" if t_mm >= t_exp else "sfu"}  # fmt: skip


def operand_rereads(operand: int, resident: int, programs: int, slots: int,
                    rates: Rates = H100) -> int:  # fmt: skip
    """DRAM bytes of the column operand (``operand`` bytes) read again: once more per
    further wave of ``slots`` resident programs (each wave sweeps it from the start)
    when it does not fit in L2 beside the ``resident`` bytes of the row panels."""
    waves = -(-programs // max(slots, 1))
    return (waves - 1) * operand if operand + resident > rates.l2_bytes else 0


@dataclass
class Profile:
    """A compiled kernel's counts per column tile (whole CTA) and its resources."""

    kernel: str
    resources: dict
    warps_per_cta: list
    ctas_per_sm: int
    unroll: int
    #: Tensor MACs issued per useful MAC (1.0: none redundant).
    tensor_redundancy: float
    per_tile: dict  # per-warp counts of one tile (one source iteration of the hot loop)
    outside_issue: int  # per-warp instructions outside the hot loop
    #: Trip counts given to the hot loop's inner loops, by ``start-end`` address.
    inner_trips: dict = field(default_factory=dict)

    def tile_seconds(self, num_warps: int, rates: Rates = H100,
                     l2_resident: bool = True) -> dict[str, float]:  # fmt: skip
        """The bounds of one tile on a whole SM, in seconds (:func:`tile_bounds`).

        ``l2_resident``: whether the launch's working set fits in L2; if not, the
        tile's global and atomic bytes are also charged at the HBM rate (``dram``).
        """
        return tile_bounds(self.per_tile, num_warps, rates, l2_resident)


def launch_estimate(prof: Profile, num_warps: int, tiles: list[int], working_set: int,
                    dram_bytes: int, elements: int, rates: Rates = H100) -> dict:  # fmt: skip
    """Seconds of one launch and what bounds it.

    ``tiles``: column tiles of each program in launch order; ``working_set``: bytes the
    resident programs keep touching (the tiles' traffic goes to DRAM when it exceeds
    L2); ``dram_bytes``: the launch's DRAM traffic; ``elements``: useful score elements
    of one tile (the unit of ``per_element``). Programs are dealt to ``sms x CTAs per
    SM`` slots (:func:`makespan`); the launch lasts at least its DRAM bytes at the HBM rate.
    """
    k = max(prof.ctas_per_sm, 1)
    bounds = prof.tile_seconds(num_warps, rates, l2_resident=working_set <= rates.l2_bytes)
    tile = max(bounds.values())
    fixed = prof.outside_issue * num_warps / rates.issue_per_clock / rates.clock_hz
    progs = [fixed + n * tile for n in tiles]
    span = makespan(progs, rates.sms * k, k)
    dram = dram_bytes / rates.dram_bytes_per_s
    seconds = max(span, dram)
    binding = "dram" if dram > span else max(bounds, key=bounds.get)
    t = prof.per_tile
    l2 = (t["global_bytes"] + t["atomic_bytes"]) * num_warps
    busy = sum(tiles) * tile
    compute = max(bounds[b] for b in ("issue", "sfu", "tensor", "shared"))
    per_element = {
        "issue_slots": t["issue"] * num_warps / elements,
        "mufu_ex2": t["mufu_ex2"] * num_warps * 32 / elements,
        "mufu_all": t["mufu_all"] * num_warps * 32 / elements,
        "tensor_macs": t["tensor_macs_per_cta"] / elements,
        "atomic_bytes": t["atomic_bytes"] * num_warps / elements,
        "global_bytes": t["global_bytes"] * num_warps / elements,
        "shared_bytes": t["shared_bytes"] * num_warps / elements,
    }
    return {
        "programs": len(tiles), "tiles": sum(tiles),
        "tile_us": {name: v * 1e6 for name, v in bounds.items()},
        "per_element": per_element,
        "binding": binding, "seconds": seconds, "dram_seconds": dram,
        "balance": busy / (span * rates.sms) if span > 0 else 1.0,
        "l2_bytes_per_tile": l2, "working_set_bytes": working_set,
        "working_set_share_of_l2": working_set / rates.l2_bytes,
        # L2 bandwidth at which the per-tile global traffic would cost as much as the
        # tile's compute (issue, SFU, tensor, shared memory: the bounds the memory
        # bounds now sit beside):
        "l2_break_even_tb_s": l2 * rates.sms / compute / 1e12 if compute > 0 else 0.0,
    }  # fmt: skip
