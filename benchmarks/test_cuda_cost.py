"""Tests of the static cost model of the CUDA C++ kernels (``cuda_cost``).

Counts exact on a probe kernel known by construction (``cuda_probe_kernels.cu``),
the launch plan of the CUDA launchers, and the real kernels' hot loops pinned at
one column tile per iteration with the source's work. Compiles with nvcc (a few
seconds per file, once per session: module fixtures); skips without nvcc. No Triton
compiler is imported, so this runs beside the interpreter tests.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import cuda_compile, cuda_cost
from benchmarks import sass_counts as S
from benchmarks.cuda_launches import launch_plan, tiles_per_program
from benchmarks.cuda_window import one_exp_share
from benchmarks.sm90_rates import H100, tile_bounds
from benchmarks.static_cases import CASES, StaticCase

PROBE = Path(__file__).with_name("cuda_probe_kernels.cu")
needs_nvcc = pytest.mark.skipif(
    cuda_compile.find_nvcc() is None,
    reason="nvcc not found (no CUDA toolkit): cannot compile the CUDA kernels",
)


def _cuobjdump_or_skip() -> None:
    try:
        cuda_compile.nvidia_tool("cuobjdump")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


#: Launch constants as the kernels had them when these tests were written (the plan's
#: arithmetic is checked on these; the real ones are read from the source below).
CONSTS = {"BM": 64, "BN": 64, "KC": 64, "DO": 128, "NT": 128,
          "fwd_smem": {"fp32": 52224, "fp16": 35840, "bf16": 35840},
          "bwd_smem": {"fp32": 53376, "fp16": 52352, "bf16": 52352},
          "x_resident_max": 69632,
          "fast": {"fp32": {"fwd_base": 52224, "bwd_base": 87168, "x_pad": 4, "vec": 4},
                   "fp16": {"fwd_base": 35840, "bwd_base": 70784, "x_pad": 8, "vec": 8},
                   "bf16": {"fwd_base": 35840, "bwd_base": 72832, "x_pad": 8, "vec": 8}}}  # fmt: skip


def test_launch_plan_mirrors_the_launchers() -> None:
    """NT-Xent: one forward and one backward over Z's 2N rows; CLIP: rows a then rows b,
    each way; the backward's grid.y walks D in DO-wide slices; every program sweeps all
    column tiles."""
    plan = launch_plan("all", 32768, 512, CONSTS)
    assert [(lc.kind, lc.side, lc.grid) for lc in plan] == [
        ("fwd", "Z", (1024, 1, 1)),
        ("bwd", "Z", (1024, 4, 1)),
    ]
    # bf16 D = 512: the fast path, X resident (64 rows x 520, 66,560 bytes) besides the rest
    assert [lc.smem for lc in plan] == [35840 + 66560, 72832 + 66560]
    assert all(lc.fast for lc in plan) and plan[0].name.endswith(", true>")
    assert plan[0].split is None and plan[1].split is False and plan[1].d_slices == 4
    assert tiles_per_program(plan[1]) == [1024] * 4096
    cross = launch_plan("cross", 1000, 100, CONSTS, "fp32", "log_dot", heads=3)
    assert [(lc.kind, lc.side, lc.grid) for lc in cross] == [
        ("fwd", "a", (16, 1, 3)),
        ("fwd", "b", (16, 1, 3)),
        ("bwd", "a", (16, 1, 3)),
        ("bwd", "b", (16, 1, 3)),
    ]
    assert {lc.critic for lc in cross} == {2} and cross[-1].split is True
    # D = 100 is whole float32 vectors (X resident: 64 x 132 floats); D = 100 in bf16 is
    # not (12.5 vectors of 8), nor is float32 D = 320 within the resident X's limit:
    # the general path, with its fixed shared memory.
    assert all(lc.fast for lc in cross) and cross[0].smem == 52224 + 64 * 132 * 4
    for d, dtype in ((100, "bf16"), (320, "fp32"), (1024, "bf16")):
        general = launch_plan("all", 8, d, CONSTS, dtype)
        assert not any(lc.fast for lc in general), (d, dtype)
        assert [lc.smem for lc in general] == [CONSTS["fwd_smem"][dtype], CONSTS["bwd_smem"][dtype]]
    assert launch_plan("all", 8, 512, CONSTS, "bf16")[0].fast  # the limit: 66,560 bytes
    assert not launch_plan("all", 8, 576, CONSTS, "bf16")[0].fast
    assert tiles_per_program(cross[0]) == [16] * 48
    assert launch_plan("cross", 8, 8, CONSTS, critic="cosine")[0].critic == 0  # dot kernel
    with pytest.raises(ValueError, match="pairing"):
        launch_plan("rows", 8, 8, CONSTS)
    with pytest.raises(ValueError, match="critic"):
        launch_plan("all", 8, 8, CONSTS, critic="l2")


def test_tf32_macs_cost_twice_the_bf16_rate() -> None:
    tile = {"issue": 0, "mufu_all": 0, "shared_bytes": 0, "global_bytes": 0, "atomic_bytes": 0,
            "tensor_macs_per_cta": 2 * 4096}  # fmt: skip
    bf16 = tile_bounds(tile, 4)["tensor"]
    half = tile_bounds({**tile, "tensor_tf32_macs_per_cta": 4096}, 4)["tensor"]
    assert half == pytest.approx(bf16 * 1.5)  # 4,096 of the 8,192 MACs at half the rate
    assert H100.tensor_tf32_flops * 2 == pytest.approx(H100.tensor_flops, rel=1e-3)


def test_generic_loads_and_nested_trips_of_hand_written_code() -> None:
    """Three deep: 0x10..0x90 holds 0x20..0x60, which holds 0x30..0x40; trips 2 and 5."""
    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LD.E.64 R2, desc[UR4][R2.64] ;
        /*0020*/                   MUFU.EX2 R4, R5 ;
        /*0030*/                   ST.E R2, desc[UR4][R8.64] ;
        /*0040*/               @P1 BRA 0x30 ;
        /*0050*/                   HMMA.1684.F32.TF32 R4, R8, R12, R4 ;
        /*0060*/               @P2 BRA 0x20 ;
        /*0070*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0090*/               @P0 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
    """
    instrs = S.parse(text)
    (outer,) = S.find_loops(instrs)
    trips = {0x20: 2, 0x30: 5}
    c = S.nested_counts(instrs, outer, lambda lp, body, parent: trips[lp.start])
    assert c.issue == 3 + 2 * (3 + 5 * 2)  # the MOV before the loop is not in it
    assert c.ex2 == 2 and dict(c.hmma) == {"16x8x4": 2, "16x8x16": 1}
    assert c.generic_bytes == 32 * 8 + 2 * 5 * 32 * 4  # LD.E.64 once, ST.E ten times
    assert c.shared_bytes == 0 and c.global_bytes == 0
    assert c.macs_per_cta(1) == 2 * 16 * 8 * 4 + 16 * 8 * 16
    assert c.tf32_macs_per_cta(1) == 2 * 16 * 8 * 4


@pytest.fixture(scope="module")
def probe() -> dict:
    """The probe kernel's loop counts (per warp, one iteration) and resources."""
    if cuda_compile.find_nvcc() is None:
        pytest.skip("nvcc not found (no CUDA toolkit): cannot compile the CUDA kernels")
    _cuobjdump_or_skip()
    cubin = cuda_compile.compile_cubin(PROBE)
    (name, sass), = cuda_compile.sass_functions(cubin).items()
    instrs = S.parse(sass)
    loops = S.find_loops(instrs)
    assert len(loops) == 1 and not loops[0].inner, loops
    counts = S.iteration_counts(instrs, loops[0], [])
    return {"name": name, "counts": counts, "res": cuda_compile.resource_usage(cubin)[name]}


@needs_nvcc
def test_probe_counts_are_exact(probe: dict) -> None:
    """Per iteration: K_EXP = 3 exp2 per thread (3 MUFU.EX2 per warp), one bf16 WMMA
    m16n16k16 (two HMMA.16816) and one TF32 WMMA m16n16k8; one LDG of x."""
    c = probe["counts"]
    assert probe["name"] == "probe_loop"
    assert (c.ex2, c.mufu) == (3, 3)
    assert c.hmma["16x8x16"] == 2
    assert c.macs_per_cta(1) == 16 * 16 * 16 + 16 * 16 * 8
    assert c.tf32_macs_per_cta(1) == 16 * 16 * 8
    assert c.global_bytes == 32 * 4
    # The fragments come through generic loads: 16 x 16 bf16 twice, 16 x 8 float twice.
    assert c.generic_bytes == 2 * 16 * 16 * 2 + 2 * 16 * 8 * 4
    assert probe["res"]["static_shared"] == 0 and probe["res"]["local"] == 0


@pytest.fixture(scope="module")
def compiled() -> cuda_cost.Compiled:
    if cuda_compile.find_nvcc() is None:
        pytest.skip("nvcc not found (no CUDA toolkit): cannot compile the CUDA kernels")
    _cuobjdump_or_skip()
    return cuda_cost.Compiled()


@needs_nvcc
def test_constants_come_from_the_source(compiled: cuda_cost.Compiled) -> None:
    c = compiled.consts
    assert c["NT"] % 32 == 0 and c["BM"] > 0 and c["BN"] > 0
    for dtype in ("fp32", "fp16", "bf16"):
        assert 0 < c["fwd_smem"][dtype] <= 227 * 1024 and 0 < c["bwd_smem"][dtype] <= 227 * 1024
        # the fast path's largest resident X still fits sm_80's 163 KiB per block
        most = c["x_resident_max"] + max(c["fast"][dtype]["fwd_base"], c["fast"][dtype]["bwd_base"])
        assert most <= 166912, dtype
    assert c == {**c, **{k: CONSTS[k] for k in CONSTS}}  # the plan tests' constants are today's
    assert len(compiled.sass) == 24  # 2 kernels x 3 dtypes x 2 critics x fast and general


@needs_nvcc
@pytest.mark.parametrize("d", [128, 512])
def test_real_kernels_count_one_tile_per_iteration(compiled: cuda_cost.Compiled, d: int) -> None:
    """NT-Xent, bf16 (the fast path): the column loop is one tile; its MACs are the
    score GEMM over D (and the gradient GEMM of one DO slice for the backward, in bf16
    twice: V as hi + lo); one exp2 per element in the forward (plus one rescale per
    thread) and two in the backward, one in its one-exponential form (plus the column
    factor per tile, counted for every thread); the D chunk loop runs D / KC times; the
    16-bit fragments come by ldmatrix."""
    c = compiled.consts
    elements = c["BM"] * c["BN"]
    fwd, bwd = launch_plan("all", 32768, d, c)
    pf, pb = compiled.profile(fwd), compiled.profile(bwd)
    for prof in (pf, pb):
        assert prof.unroll == 1 and prof.tensor_redundancy == 1.0
        assert prof.resources["local"] == 0 and prof.ctas_per_sm >= 1
        assert d // c["KC"] in prof.inner_trips.values()
    warps = fwd.num_warps
    assert pf.per_tile["tensor_macs_per_cta"] == elements * d
    assert pf.per_tile["tensor_tf32_macs_per_cta"] == 0
    assert pf.per_tile["mufu_ex2"] * warps * 32 == elements + c["NT"]
    assert pb.per_tile["tensor_macs_per_cta"] == elements * (d + 2 * c["DO"])
    assert pb.per_tile["tensor_tf32_macs_per_cta"] == 0
    assert pb.per_tile["mufu_ex2"] * warps * 32 == 2 * elements + c["NT"]
    one = compiled.profile(replace(bwd, one_exp=True))
    assert one.per_tile["mufu_ex2"] * warps * 32 == elements + c["NT"]
    assert one.per_tile["tensor_macs_per_cta"] == pb.per_tile["tensor_macs_per_cta"]
    assert one.per_tile["issue"] < pb.per_tile["issue"]
    # the other form's pass is in the loop too, run no times
    assert sorted(one.inner_trips.values()).count(0) == 1
    # Global loads per tile: the BN x D column panel (16-byte cp.async, LDGSTS, one chunk
    # ahead; the row panel is resident, staged once per CTA outside the column loop;
    # backward: and the BN x DO slab of Y for the gradient, 16-byte loads) in counted
    # loops with no remainder, plus the backward's three column statistics
    # (loaded by BN threads, counted for every warp as the static count does).
    assert pf.per_tile["global_bytes"] * warps == c["BN"] * d * 2
    assert pf.per_tile["opcodes"]["LDGSTS"] * warps * 32 * 16 == c["BN"] * d * 2
    staged = c["BN"] * (d + c["DO"]) * 2
    assert pb.per_tile["global_bytes"] * warps == staged + 3 * 4 * c["NT"]
    assert fwd.fast and bwd.fast
    # 16-bit products take their fragments by ldmatrix (LDSM.x4: 512 bytes per warp; .trans
    # for the row-major Y slab, so no MOVM transposes; no generic loads), on a 2 x 2 warp
    # grid: per tile the score GEMM reads the BM x D rows of X once for each of the two
    # column warps and the BN x D columns once for each of the two row warps; the
    # backward's bf16 gradient product V (hi and lo) and the BN x DO Y slab alike.
    ops_f, ops_b = pf.per_tile["opcodes"], pb.per_tile["opcodes"]
    assert ops_f.get("MOVM", 0) == 0 and ops_b.get("MOVM", 0) == 0
    assert pf.per_tile["generic_bytes"] == 0 and pb.per_tile["generic_bytes"] == 0
    score = 2 * (c["BM"] * d * 2) + 2 * (c["BN"] * d * 2)
    assert ops_f["LDSM"] * warps * 512 == score
    assert ops_b["LDSM"] * warps * 512 == score + 2 * (2 * elements * 2) + 2 * (c["BN"] * c["DO"] * 2)


@needs_nvcc
def test_headline_cuda_estimate_runs(compiled: cuda_cost.Compiled, tmp_path: Path) -> None:
    """The cases of the Triton estimate, for the CUDA backend: every launch estimated,
    CLIP twice the passes of NT-Xent at the same rows, one rank of eight (a forward and
    two backward passes over an eighth of the pairs) under the whole NT-Xent."""
    # The label-masked case is the Triton backend's (cuda refuses labels): not run here.
    assert [c.labels for c in CASES] == [False] * 7 + [True]
    assert len(cuda_cost.run(CASES[-1:])) == 0
    results = [cuda_cost.estimate_case(case, compiled) for case in CASES[:-1]]
    nt, wide, clip, clip_cold, rank, supcon, queue = results
    assert [len(r["launches"]) for r in results] == [2, 2, 4, 4, 3, 3, 2]
    assert [e["side"] for e in rank["launches"]] == ["x", "x", "y"]
    assert nt["estimate_ms"] / 8 < rank["estimate_ms"] < nt["estimate_ms"] / 2
    assert all(r["estimate_ms"] > r["floor_ms"] > 0 for r in results)
    assert clip["estimate_ms"] == pytest.approx(2 * nt["estimate_ms"])  # same rows of S
    # unit rows: every statistic in the one-exponential window, at tau 0.1 and 0.01; the
    # rectangular passes weight one side only and keep two exponentials
    assert [r["one_exp"] for r in results] == [True, True, True, True, False, False, False]
    assert clip_cold["estimate_ms"] == clip["estimate_ms"]
    assert wide["estimate_ms"] > nt["estimate_ms"]
    # SupCon's rows = columns shares no symmetry (dX and dY each recompute S): above
    # NT-Xent at the same M.
    assert supcon["estimate_ms"] > nt["estimate_ms"]
    assert [e["side"] for e in supcon["launches"]] == ["x", "x", "y"]
    # The queue is detached: no dY pass (SupCon's last launch), the rest alike.
    assert [e["side"] for e in queue["launches"]] == ["x", "x"]
    assert queue["estimate_ms"] == pytest.approx(
        supcon["estimate_ms"] - supcon["launches"][-1]["seconds"] * 1e3, rel=0.05)
    md = cuda_cost.markdown(results, {"nvcc": "x", "date": "today"})
    assert md.count("| NT-Xent M=65,536 D=128 |") >= 3


@needs_nvcc
def test_cuda_estimate_files(tmp_path: Path) -> None:
    _cuobjdump_or_skip()
    (r,) = cuda_cost.run(CASES[:1], tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and all(n.startswith("estimate-cuda-nvcc") for n in written)
    assert r["backend"] == "cuda"


#: What ``cuda_window`` reads of the kernel constants.
WINDOW_CONSTS = {"BM": 64, "exp_window": 40.0, "exp_factor_max": 2.0**126}


@pytest.mark.parametrize("pairing", ["all", "cross"])
def test_one_exp_share_follows_the_window(pairing: str) -> None:
    """Unit rows at tau = 0.1 keep every sampled tile in the window; at tau = 0.002 the
    log-sum-exps spread past it (random negatives at 500 x ~0.125 of a spread), and a
    wider window and factor bound let them back in. float32 inputs never take the form."""
    case = StaticCase("x", pairing, 4096, 64, 0.1)
    assert one_exp_share(case, WINDOW_CONSTS) == 1.0
    assert one_exp_share(replace(case, dtype="fp32"), WINDOW_CONSTS) == 0.0
    sharp = replace(case, tau=0.002)
    assert one_exp_share(sharp, WINDOW_CONSTS) < 1.0
    wide = {**WINDOW_CONSTS, "exp_window": 1000.0}
    assert one_exp_share(sharp, wide) < 1.0  # e^(c - lse) past 2^126 on some rows
    assert one_exp_share(sharp, {**wide, "exp_factor_max": math.inf}) == 1.0


def test_one_exp_share_of_the_rectangular_problem() -> None:
    """One side weighted: the two-exponential loop's code (one exponential each)."""
    case = StaticCase("x", "rect", 1024, 64, 0.1, cols=4096, offset=0)
    assert one_exp_share(case, WINDOW_CONSTS) == 0.0


@needs_nvcc
def test_cuda_estimate_outside_the_window_counts_two_exponentials(
    compiled: cuda_cost.Compiled,
) -> None:
    """The same launches with the data outside the window: the two-exponential pass."""
    base = StaticCase("x", "all", 8192, 128, 0.1)
    inside = cuda_cost.estimate_case(base, compiled)
    outside = cuda_cost.estimate_case(replace(base, tau=0.002), compiled)
    assert inside["one_exp"] and not outside["one_exp"]
    assert 0.0 < outside["one_exp_share"] < 1.0
    assert outside["estimate_ms"] > inside["estimate_ms"]
