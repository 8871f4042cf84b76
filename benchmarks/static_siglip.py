"""Static cost model of the sigmoid loss's (SigLIP) Triton launches on an H100 SXM.

An *estimate*, never a measurement, by the method of ``benchmarks.static_cost``: each
launch the runtime makes (``mimac_kernels/triton/siglip_backend.py``: forward, row
gradient, column gradient) is compiled for sm_90 with the JIT's specialisation, its
hot loop (the loop over column tiles, holding the score GEMM's D loop) counted per
iteration from the SASS, each tile charged the largest of its issue, SFU, tensor, shared,
L2 and atomic bounds (``sm90_rates.tile_bounds``), and the programs dealt to the SMs
(``sm90_rates.makespan``); a launch lasts at least its compulsory DRAM traffic.
The floor: ``8 N^2 D`` tensor FLOP (forward scores; backward scores, dX and dY) and
``2 N^2`` exponentials (one per element and pass) at the H100 rates, overlapped.

    python -m benchmarks.static_siglip [--n 65536 --d 768 --dtype bf16] [--json]
"""

from __future__ import annotations

from benchmarks import sm90_compile  # noqa: F401  (drops TRITON_INTERPRET before triton loads)

# isort: split

import argparse
import json
from dataclasses import asdict, dataclass, field

from benchmarks import sass_counts
from benchmarks.sm90_compile import Ptr, compile_kernel, resource_usage, sass
from benchmarks.sm90_rates import H100, Rates, ctas_per_sm, makespan, tile_bounds
from benchmarks.triton_launches import ELEMENT
from mimac_kernels.triton.siglip_backend import SiglipTiles, column_splits, tiles
from mimac_kernels.triton.siglip_kernels import (
    siglip_fwd_kernel,
    siglip_gemm_kernel,
    siglip_weights_kernel,
)

#: The peer's figure the issue sets as the target: siglip-kernel at B = 65,536,
#: D = 768, bf16, forward + backward (a measurement on an H100, not ours).
PEER_MS = 48.8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SiglipLaunch:
    """One launch: the kernel, its JIT arguments, grid, warps, stages and the tiles."""

    kind: str  # fwd, weights, grad_x, grad_y
    fn: object = field(repr=False)
    args: dict = field(repr=False)
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    #: Hot-loop iterations per program (column tiles; K steps of the GEMMs).
    tiles_per_program: int
    #: Tensor-core MACs of one iteration (D padded to whole steps for the scores).
    tile_macs: int
    #: Compulsory DRAM bytes: inputs read once, outputs written once.
    dram_bytes: int
    #: Feature steps of the inner loop (the score GEMM's D loop; 1 for the GEMMs).
    inner_trips: int = 1
    #: Times the launch is made (once per column panel for the backward's launches).
    repeat: int = 1
    #: Iterations of each program in launch order where they differ (a split reduction's
    #: last range is shorter); empty: every program runs ``tiles_per_program``.
    program_tiles: tuple[int, ...] = ()

    def tiles(self) -> list[int]:
        """Hot-loop iterations of every program, in launch order (x fastest)."""
        if self.program_tiles:
            return list(self.program_tiles)
        return [self.tiles_per_program] * (self.grid[0] * self.grid[1] * self.grid[2])


def launch_plan(n: int, d: int, dtype: str = "bf16", cfg: SiglipTiles | None = None,
                heads: int = 1, sms: int = H100.sms) -> list[SiglipLaunch]:  # fmt: skip
    """The launches of one forward + backward of an ``n x n`` problem, as
    ``siglip_backend`` makes them (offset 0; the backward's three once per panel, every
    panel counted as a full one)."""
    if dtype not in ELEMENT:
        raise ValueError(f"dtype must be one of {sorted(ELEMENT)}, got {dtype!r}")
    cfg = cfg or tiles(d)
    size = ELEMENT[dtype]
    x, f32 = Ptr(dtype), Ptr("fp32")
    prec = {"PREC": "ieee", "DOT_F32": False}
    trips = _cdiv(d, cfg.block_d)
    score_macs = cfg.block_m * cfg.block_n * cfg.block_d * trips
    p = min(cfg.panel, n)
    panels = _cdiv(n, p)
    score_args = {"X": x, "Y": x, "SCALE": f32, "BIAS": f32, "R": n, "C": n, "D": d,
                  "offset": 0, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_D": cfg.block_d, **prec}  # fmt: skip
    fwd = SiglipLaunch(
        "fwd", siglip_fwd_kernel, {**score_args, "OUT": f32}, (_cdiv(n, cfg.block_m), heads, 1),
        cfg.fwd_warps, cfg.fwd_stages, _cdiv(n, cfg.block_n), score_macs,
        2 * n * d * size + 4 * n, trips,
    )  # fmt: skip
    weights = SiglipLaunch(
        "weights", siglip_weights_kernel,
        {**score_args, "G": f32, "W": x, "PART": f32, "c0": 0, "P": p},
        (_cdiv(n, cfg.block_m), heads, 1), cfg.fwd_warps, cfg.fwd_stages, _cdiv(p, cfg.block_n),
        score_macs, (n + p) * d * size + n * p * size + 12 * n, trips, panels,
    )  # fmt: skip
    gemm = {"SCALE": f32, "ACC": True, "BLOCK_M": cfg.gemm_m, "BLOCK_N": cfg.gemm_n,
            "BLOCK_K": cfg.gemm_k, **prec}  # fmt: skip
    gemm_macs = cfg.gemm_m * cfg.gemm_n * cfg.gemm_k
    grad_x = SiglipLaunch(  # dx (n x d, float32, read and written) += W (n x p) @ y_panel
        "grad_x", siglip_gemm_kernel,
        {**gemm, "A": x, "B": x, "OUT": f32, "M": n, "N": d, "K": p, "s_ah": n * p, "s_am": p,
         "s_ak": 1, "s_bh": n * d, "s_bk": d, "s_bn": 1, "s_oh": n * d, "SPLIT": 1, "k_step": p,
         "s_os": 0},
        (_cdiv(n, cfg.gemm_m), _cdiv(d, cfg.gemm_n), heads), cfg.gemm_warps, cfg.gemm_stages,
        _cdiv(p, cfg.gemm_k), gemm_macs, n * p * size + p * d * size + 8 * n * d, 1, panels,
    )  # fmt: skip
    out_tiles = _cdiv(p, cfg.gemm_m) * _cdiv(d, cfg.gemm_n) * heads
    split = column_splits(out_tiles, n, cfg, sms)
    step = _cdiv(_cdiv(n, split), cfg.gemm_k) * cfg.gemm_k
    grad_y = SiglipLaunch(  # dy_panel (p x d, float32) = W^T (p x n) @ x, in `split` ranges
        "grad_y", siglip_gemm_kernel,
        {**gemm, "ACC": False, "A": x, "B": x, "OUT": f32, "M": p, "N": d, "K": n,
         "s_ah": n * p, "s_am": 1, "s_ak": p, "s_bh": n * d, "s_bk": d, "s_bn": 1,
         "s_oh": p * d, "SPLIT": split, "k_step": step, "s_os": heads * p * d},
        (_cdiv(p, cfg.gemm_m), _cdiv(d, cfg.gemm_n), heads * split), cfg.gemm_warps,
        cfg.gemm_stages, step // cfg.gemm_k, gemm_macs,
        # W and x read, the splits written, then read and the sum written (torch's sum)
        n * p * size + n * d * size + (2 * split + 1) * 4 * p * d, 1, panels,
        tuple(_cdiv(max(0, min(step, n - k * step)), cfg.gemm_k)
              for k in range(split) for _ in range(out_tiles)),
    )  # fmt: skip
    return [fwd, weights, grad_x, grad_y]


def floor(n: int, d: int, rates: Rates = H100) -> dict:
    """Physical floor of forward + backward: 8 N^2 D tensor FLOP, 2 N^2 exponentials."""
    flops, exps = 8.0 * n * n * d, 2.0 * n * n
    t_mm, t_exp = flops / rates.tensor_flops, exps / rates.exp_per_s
    return {"flops": flops, "exps": exps, "seconds": max(t_mm, t_exp),
            "bound": "tensor" if t_mm >= t_exp else "sfu"}  # fmt: skip


def profile(launch: SiglipLaunch) -> dict:
    """Compile ``launch`` for sm_90 and count its hot loop per column tile."""
    compiled = compile_kernel(launch.fn, launch.args, launch.num_warps, launch.num_stages)
    instrs = sass_counts.parse(sass(compiled))
    best, best_macs = None, 0
    for lp in sass_counts.find_loops(instrs):
        counts = sass_counts.iteration_counts(instrs, lp, [launch.inner_trips] * len(lp.inner))
        macs = counts.macs_per_cta(launch.num_warps)
        if macs > best_macs:
            best, best_macs = counts, macs
    if best is None:
        raise RuntimeError(f"{launch.kind}: no loop with tensor-core work in its SASS")
    unroll = best_macs // launch.tile_macs
    if unroll < 1:
        raise RuntimeError(f"{launch.kind}: hot loop does {best_macs} MACs, less than a tile "
                           f"({launch.tile_macs})")  # fmt: skip
    per = best.to_dict(launch.num_warps)
    per_tile = {k: (v / unroll if isinstance(v, int) else {s: c / unroll for s, c in v.items()})
                for k, v in per.items()}  # fmt: skip
    res = resource_usage(compiled)
    return {"resources": res, "unroll": unroll,
            "tensor_redundancy": best_macs / (unroll * launch.tile_macs),
            "ctas_per_sm": ctas_per_sm(res["registers"], res["shared"], launch.num_warps),
            "per_tile": per_tile}  # fmt: skip


def estimate_launch(launch: SiglipLaunch, prof: dict, rates: Rates = H100) -> dict:
    """Seconds of one launch (times ``repeat``) and what bounds it. Every tile's loads are
    charged at the L2 rate (programs that run together sweep the same operand in step,
    as ``static_cost`` assumes), and the launch lasts at least its compulsory DRAM bytes."""
    bounds = tile_bounds(prof["per_tile"], launch.num_warps, rates)
    tile = max(bounds.values())
    k = max(prof["ctas_per_sm"], 1)
    per_program = launch.tiles()
    programs = len(per_program)
    span = makespan([n * tile for n in per_program], rates.sms * k, k)
    dram = launch.dram_bytes / rates.dram_bytes_per_s
    return {"kind": launch.kind, "grid": list(launch.grid), "programs": programs,
            "repeat": launch.repeat, "tile_us": {b: v * 1e6 for b, v in bounds.items()},
            "binding": "dram" if dram > span else max(bounds, key=bounds.get),
            "seconds": max(span, dram) * launch.repeat, "registers": prof["resources"]["registers"],
            "spill_bytes": prof["resources"]["local"], "ctas_per_sm": prof["ctas_per_sm"],
            "unroll": prof["unroll"], "tensor_redundancy": prof["tensor_redundancy"]}  # fmt: skip


def estimate(n: int = 65536, d: int = 768, dtype: str = "bf16", rates: Rates = H100) -> dict:
    """Forward + backward estimate of the sigmoid loss, per launch and in total."""
    launches = [estimate_launch(lc, profile(lc), rates) for lc in launch_plan(n, d, dtype)]
    total = sum(e["seconds"] for e in launches)
    fl = floor(n, d, rates)
    return {"n": n, "d": d, "dtype": dtype, "estimate_ms": total * 1e3,
            "floor_ms": fl["seconds"] * 1e3, "floor": fl, "share_of_floor": fl["seconds"] / total,
            "peer_ms": PEER_MS, "launches": launches}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static_siglip",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--dtype", default="bf16", choices=sorted(ELEMENT))
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args(argv)
    r = estimate(args.n, args.d, args.dtype)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"SigLIP N={args.n} D={args.d} {args.dtype}: estimated {r['estimate_ms']:.1f} ms "
          f"(static, not measured), floor {r['floor_ms']:.1f} ms "
          f"({100 * r['share_of_floor']:.0f} %), siglip-kernel {PEER_MS} ms")  # fmt: skip
    for e in r["launches"]:
        t = ", ".join(f"{b} {v:.3f}" for b, v in e["tile_us"].items())
        print(f"  {e['kind']} x {e['repeat']}: grid {e['grid']}, {1e3 * e['seconds']:.2f} ms, binding "
              f"{e['binding']}; per tile (us): {t}; regs {e['registers']}, spill "
              f"{e['spill_bytes']} B, CTAs/SM {e['ctas_per_sm']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PEER_MS", "SiglipLaunch", "asdict", "estimate", "floor", "launch_plan"]
