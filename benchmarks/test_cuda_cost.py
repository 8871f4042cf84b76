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
from benchmarks.cuda_launches import frag_smem, launch_plan, resident_ok, tiles_per_program
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
CONSTS = {"BM": 64, "BN": 64, "KC": 64, "DO": 128, "NT": 128, "RNT": 64, "frag_stats": 2944,
          "WNT": 256, "WS": 4, "WQ": 16, "wide_smem": 165760,
          "fwd_smem": {"fp32": 52224, "fp16": 35840, "bf16": 35840},
          "bwd_smem": {"fp32": 53120, "fp16": 52096, "bf16": 52096},
          "x_resident_max": 69632,
          "fast": {"fp32": {"fwd_base": 52224, "bwd_base": 86912, "x_pad": 4, "vec": 4},
                   "fp16": {"fwd_base": 35840, "bwd_base": 70528, "x_pad": 8, "vec": 8},
                   "bf16": {"fwd_base": 35840, "bwd_base": 72576, "x_pad": 8, "vec": 8}}}  # fmt: skip
#: Opt-in shared memory per block of sm_80 (163 KiB) and sm_86 (99 KiB).
SM80_OPTIN, SM86_OPTIN = 163 * 1024, 99 * 1024


def test_launch_plan_mirrors_the_launchers() -> None:
    """NT-Xent: one forward and one backward over Z's 2N rows; CLIP: rows a then rows b,
    each way; the backward's grid.y walks D in DO-wide slices; every program sweeps all
    column tiles. 16-bit inputs on the fast path: the fragment forward (fp16 and bf16)
    and the fragment backward (bf16), where their shared memory fits the device; bf16 at
    a staged width of 512: the wide backward, one CTA per row block for all of D."""
    plan = launch_plan("all", 32768, 512, CONSTS)
    assert [(lc.kind, lc.side, lc.grid) for lc in plan] == [
        ("fwd", "Z", (1024, 1, 1)),
        ("bwd", "Z", (1024, 1, 1)),
    ]
    # bf16 D = 512: the fragment forward, X resident (64 rows x 520, 66,560 bytes) and
    # two whole Y tiles alike; the wide backward's statistics (6,016), two Y tiles (X
    # staged once into the second), the partial S (20,480) and V hi + lo (2 x 3,072)
    assert all(lc.frag and lc.fast for lc in plan) and H100.shared_optin_per_block == 232448
    assert [lc.smem for lc in plan] == [3 * 66560, 6016 + 2 * 66560 + 20480 + 2 * 3072]
    assert [lc.name for lc in plan] == ["lse_forward_frag_kernel<bf16, 0>",
                                        "lse_backward_wide_kernel<bf16, 0, 1>"]  # fmt: skip
    assert [lc.num_warps for lc in plan] == [2, 8] and [lc.tau for lc in plan] == [None, 1]
    assert plan[0].split is None and plan[1].split is False and plan[1].d_slices == 1
    assert plan[1].wide and not plan[0].wide
    assert tiles_per_program(plan[1]) == [1024] * 1024
    # D = 456 stages 512 columns too; D = 384 and D = 520 do not: the narrow backward
    assert launch_plan("all", 100, 456, CONSTS)[1].wide
    assert not any(launch_plan("all", 100, d, CONSTS)[1].wide for d in (384, 520))
    # Where the fragment forward does not fit (sm_80's 163 KiB), the fast variant, and
    # the wide backward still does; where neither does (sm_86's 99 KiB: 35,840 + 66,560
    # bytes), the general ones.
    sm80 = launch_plan("all", 32768, 512, CONSTS, smem_optin=SM80_OPTIN)
    assert [(lc.frag, lc.fast, lc.smem) for lc in sm80] == [
        (False, True, 35840 + 66560), (True, True, 165760)]  # fmt: skip
    assert [lc.num_warps for lc in sm80] == [4, 8] and sm80[0].name.endswith(", true>")
    sm86 = launch_plan("all", 32768, 512, CONSTS, smem_optin=SM86_OPTIN)
    assert [(lc.frag, lc.fast, lc.smem) for lc in sm86] == [
        (False, False, 35840), (False, False, 52096)]  # fmt: skip
    small = launch_plan("all", 8, 128, CONSTS, smem_optin=SM86_OPTIN)  # 55,168 bytes at most
    assert [lc.frag for lc in small] == [True, True]
    # fp16: the fragment forward, the old fast backward (TF32 gradient)
    # cross's forward in one pass and a finishing launch per side (fragment kernels)
    half = launch_plan("cross", 1000, 128, CONSTS, "fp16")
    assert [(lc.kind, lc.side, lc.frag, lc.fast) for lc in half] == [
        ("cross", "ab", True, True), ("finish", "a", True, True), ("finish", "b", True, True),
        ("bwd", "a", False, True), ("bwd", "b", False, True)]  # fmt: skip
    assert [lc.name for lc in half[:2]] == ["lse_cross_frag_kernel<fp16, 0>",
                                            "lse_forward_frag_kernel<fp16, 0>"]  # fmt: skip
    assert half[3].name == "lse_backward_kernel<fp16, 0, false, true>" and half[3].num_warps == 4
    # a finishing launch walks the column tiles only in the blocks it re-sweeps
    assert tiles_per_program(half[1]) == [0] * 16
    assert tiles_per_program(replace(half[1], resweep_blocks=3)) == [16] * 3 + [0] * 13
    cross = launch_plan("cross", 1000, 100, CONSTS, "fp32", "log_dot", heads=3)
    assert [(lc.kind, lc.side, lc.grid, lc.tau) for lc in cross] == [
        ("fwd", "a", (16, 1, 3), None),
        ("fwd", "b", (16, 1, 3), None),
        ("bwd", "a", (16, 1, 3), 1),
        ("bwd", "b", (16, 1, 3), 1),
    ]
    assert {lc.critic for lc in cross} == {2} and cross[-1].split is True
    assert not any(lc.frag for lc in cross)  # float32: no fragment kernels
    # The bf16 CLIP backward: rows a and rows b each with their own temperature terms;
    # the rectangular dX with the rows' and dY none.
    assert [lc.name for lc in launch_plan("cross", 1000, 128, CONSTS)[3:]] == [
        "lse_backward_frag_kernel<bf16, 0, 1>", "lse_backward_frag_kernel<bf16, 0, 1>"]  # fmt: skip
    rect = launch_plan("rect", 1000, 128, CONSTS, cols=3000)
    assert [(lc.side, lc.rows, lc.cols, lc.tau) for lc in rect] == [
        ("x", 1000, 3000, None), ("x", 1000, 3000, 1), ("y", 3000, 1000, 0)]  # fmt: skip
    assert [lc.grid[0] for lc in rect] == [16, 16, 47]
    assert len(launch_plan("rect", 1000, 128, CONSTS, cols=3000, columns_grad=False)) == 2
    # D = 100 is whole float32 vectors (X resident: 64 x 132 floats); D = 100 in bf16 is
    # not (12.5 vectors of 8), nor is float32 D = 320 within the resident X's limit, nor
    # bf16 D = 1,024: the general path, with its fixed shared memory.
    assert all(lc.fast for lc in cross) and cross[0].smem == 52224 + 64 * 132 * 4
    for d, dtype in ((100, "bf16"), (320, "fp32"), (1024, "bf16")):
        general = launch_plan("all", 8, d, CONSTS, dtype)
        assert not any(lc.fast or lc.frag for lc in general), (d, dtype)
        assert [lc.smem for lc in general] == [CONSTS["fwd_smem"][dtype], CONSTS["bwd_smem"][dtype]]
    assert launch_plan("all", 8, 512, CONSTS, "bf16")[0].frag  # the limit: 66,560 bytes
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
    assert c["NT"] % 32 == 0 and c["RNT"] % 32 == 0 and c["BM"] > 0 and c["BN"] > 0
    for dtype in ("fp32", "fp16", "bf16"):
        assert 0 < c["fwd_smem"][dtype] <= 227 * 1024 and 0 < c["bwd_smem"][dtype] <= 227 * 1024
        # the fast path's largest resident X still fits sm_80's 163 KiB per block
        most = c["x_resident_max"] + max(c["fast"][dtype]["fwd_base"], c["fast"][dtype]["bwd_base"])
        assert most <= 166912, dtype
    # The fragment kernels' shared memory: the plan's rule is the source's at both widths
    # it prints, and the largest resident X still fits an H100's opt-in per block.
    for dtype in ("fp16", "bf16"):
        for kind in ("fwd", "bwd"):
            for d, bytes_ in c["frag_smem"][dtype][kind].items():
                assert frag_smem(kind, int(d), dtype, c) == bytes_, (dtype, kind, d)
        assert resident_ok(512, dtype, c)
        assert frag_smem("bwd", 512, dtype, c) <= H100.shared_optin_per_block
    assert c == {**c, **{k: CONSTS[k] for k in CONSTS}}  # the plan tests' constants are today's
    # cross's one-pass window and shift rule: Triton's
    from mimac_kernels.triton import kernels as triton_kernels

    assert c["sum_window"] == [triton_kernels.UNDERFLOW.value, triton_kernels.OVERFLOW.value]
    assert c["sum_window"] == [2.0**-60, 2.0**24]
    assert c["shift_rule"] == [triton_kernels.SHIFT_HEADROOM, triton_kernels.SHIFT_LEVEL]
    assert cuda_cost.cross_shift(100.0, c) == 36.0 and cuda_cost.cross_shift(10.0, c) == 10.0
    # 2 kernels x 3 dtypes x 2 critics x fast and general; the fragment forward and
    # cross's one-pass forward for 2 dtypes x 2 critics, the fragment backward and the
    # wide backward for bf16 x 2 critics x 2 temperature modes
    for form in compiled.FORMS:
        assert len(compiled.sass[form]) == 24 + 8 + 8
    # MIMAC_COST_FORM touches the fragment and wide backwards only: every other kernel's
    # SASS is the same in both compiles, the backwards' passes are not.
    # (compared as parsed instructions: cuobjdump pads its columns to the widest line)
    one, two = compiled.sass[1], compiled.sass[2]
    assert one.keys() == two.keys()

    def code(text: str) -> list[tuple]:
        return [(i.addr, i.opcode, i.operands) for i in S.parse(text)]

    for name in one:
        same = code(one[name]) == code(two[name])
        assert same == ("lse_backward_frag_kernel" not in name and "wide" not in name), name
    with pytest.raises(ValueError, match="tau"):
        cuda_compile.kernel_symbol(list(one), "lse_backward_frag_kernel", "bf16", 0)


@needs_nvcc
@pytest.mark.parametrize("d", [128, 384])
def test_real_kernels_count_one_tile_per_iteration(compiled: cuda_cost.Compiled, d: int) -> None:
    """NT-Xent, bf16 (the fragment kernels): the column loop is one tile; its MACs are
    the score GEMM over D (and the gradient GEMM of one DO slice for the backward, in
    bf16 twice: V as hi + lo); one exp2 per element in the forward (plus each row's
    rescale in the 4 lanes of its quad), two in the backward's exact form (form 2) and
    one in its one-exponential form (form 1), plus the column factor per tile (counted
    for every thread); the staging and D chunk loops run D / KC times, the backward's
    half loop twice; the 16-bit fragments come by ldmatrix; nothing spills."""
    c = compiled.consts
    elements, chunks = c["BM"] * c["BN"], d // c["KC"]
    fwd, bwd = launch_plan("all", 32768, d, c)
    assert fwd.frag and bwd.frag and fwd.num_warps == bwd.num_warps == c["RNT"] // 32
    pf, pb = compiled.profile(fwd), compiled.profile(bwd)
    one = compiled.profile(replace(bwd, one_exp=True))
    for prof in (pf, pb, one):
        assert prof.unroll == 1 and prof.tensor_redundancy == 1.0
        assert prof.resources["local"] == 0 and prof.ctas_per_sm >= 1
    # staging loop (global bytes) and score chunk loop, in address order
    assert list(pf.inner_trips.values()) == [chunks, chunks]
    # staging, the score chunk loop inside the half loop, the half loop
    assert list(pb.inner_trips.values()) == [chunks, chunks, cuda_cost.FRAG_HALVES]
    assert list(one.inner_trips.values()) == [chunks, chunks, cuda_cost.FRAG_HALVES]
    warps = fwd.num_warps
    assert pf.per_tile["tensor_macs_per_cta"] == elements * d
    assert pf.per_tile["tensor_tf32_macs_per_cta"] == 0
    assert pf.per_tile["mufu_ex2"] * warps * 32 == elements + 4 * c["BM"]
    assert pb.per_tile["tensor_macs_per_cta"] == elements * (d + 2 * c["DO"])
    assert pb.per_tile["tensor_tf32_macs_per_cta"] == 0
    assert pb.per_tile["mufu_ex2"] * warps * 32 == 2 * elements + c["RNT"]
    assert one.per_tile["mufu_ex2"] * warps * 32 == elements + c["RNT"]
    assert one.per_tile["tensor_macs_per_cta"] == pb.per_tile["tensor_macs_per_cta"]
    assert one.per_tile["issue"] < pb.per_tile["issue"]
    # Global loads per tile: the next BN x D Y tile (16-byte cp.async, LDGSTS; X is
    # resident, staged once per CTA outside the column loop), plus the backward's two
    # column statistics, lse and g (one thread per column).
    staged = c["BN"] * d * 2
    assert pf.per_tile["global_bytes"] * warps == staged
    assert pf.per_tile["opcodes"]["LDGSTS"] * warps * 32 * 16 == staged
    assert pb.per_tile["global_bytes"] * warps == staged + 2 * 4 * c["RNT"]
    # Fragments by ldmatrix (LDSM.x4: 512 bytes per warp; .trans for Y's B fragments of
    # dX, so no MOVM; no generic loads). A warp owns 32 rows against all 64 columns: per
    # tile the score GEMM reads X's BM x D rows once and Y's BN x D columns once per warp;
    # the backward reads X once per half, Y's columns once per warp, and the BN x DO slab
    # of Y once per warp for dX (V never goes through shared memory).
    ops_f, ops_b = pf.per_tile["opcodes"], pb.per_tile["opcodes"]
    assert ops_f.get("MOVM", 0) == 0 and ops_b.get("MOVM", 0) == 0
    assert pf.per_tile["generic_bytes"] == 0 and pb.per_tile["generic_bytes"] == 0
    assert ops_f["LDSM"] * warps * 512 == c["BM"] * d * 2 + warps * c["BN"] * d * 2
    assert ops_b["LDSM"] * warps * 512 == (cuda_cost.FRAG_HALVES * c["BM"] * d * 2
                                           + warps * c["BN"] * d * 2
                                           + warps * c["BN"] * c["DO"] * 2)  # fmt: skip
    # Shared stores: none in the forward (every staged slot, zeros too, comes by
    # cp.async, whose shared-memory write the model leaves uncharged, as for Triton's);
    # the backward's column statistics and temperature sum only, no V tile.
    assert ops_f.get("STS", 0) == 0
    assert 0 < ops_b["STS"] < 8


@needs_nvcc
def test_wide_backward_counts_one_tile_per_iteration(compiled: cuda_cost.Compiled) -> None:
    """NT-Xent, bf16, D = 512: the wide backward's column loop is one tile in BN / WQ
    quarters, each with its V pass over a lane's WQ / WS columns in pairs; its MACs are
    the score GEMM over D once and the gradient GEMM over all of D (hi + lo); its
    fragments by ldmatrix: per warp Y's quarter columns over its D slice for S, its
    rows' V (hi and lo) and Y's tile over its D slice for dX; X's fragments stay in
    registers (no X read per tile); nothing spills."""
    c = compiled.consts
    d, elements = 512, c["BM"] * c["BN"]
    bwd = launch_plan("all", 32768, d, c)[1]
    assert bwd.wide and bwd.num_warps == c["WNT"] // 32 == 2 * c["WS"]
    pb = compiled.profile(bwd)
    one = compiled.profile(replace(bwd, one_exp=True))
    for prof in (pb, one):
        assert prof.unroll == 1 and prof.tensor_redundancy == 1.0
        assert prof.resources["local"] == 0 and prof.ctas_per_sm == 1
        # staging (D / KC chunks), the V pass (2 pairs) inside the quarter loop (4)
        assert sorted(prof.inner_trips.values()) == [2, 4, d // c["KC"]]
        assert prof.per_tile["tensor_macs_per_cta"] == elements * 3 * d
    warps = bwd.num_warps
    assert pb.per_tile["mufu_ex2"] * warps * 32 == 2 * elements + c["WNT"]
    assert one.per_tile["mufu_ex2"] * warps * 32 == elements + c["WNT"]
    assert one.per_tile["issue"] < pb.per_tile["issue"]
    assert pb.per_tile["global_bytes"] * warps == c["BN"] * d * 2 + 2 * 4 * c["WNT"]
    ops = pb.per_tile["opcodes"]
    slice_ = c["BN"] * c["DO"] * 2  # a warp's D slice of the Y tile, bytes
    assert ops["LDSM"] * 512 == 2 * slice_ + c["BM"] // 2 * c["BN"] * 2 * 2
    assert ops.get("MOVM", 0) == 0 and pb.per_tile["generic_bytes"] == 0
    # shared stores per warp: its partial S (float2) and its V share (hi, lo) per quarter
    assert ops["STS"] >= 32 * c["BN"] // c["WQ"] // 4 + 4 * c["BN"] // c["WQ"]


@needs_nvcc
def test_old_kernels_keep_their_rules(compiled: cuda_cost.Compiled) -> None:
    """fp16's backward and float32 run lse_backward_kernel / lse_forward_kernel: their
    per-element passes (fp16's backward in two forms, one run), chunk and slab loops."""
    c = compiled.consts
    elements = c["BM"] * c["BN"]
    for dtype in ("fp16", "fp32"):
        plan = launch_plan("all", 32768, 128, c, dtype)
        bwd = plan[-1]
        assert not bwd.frag and bwd.fast and bwd.num_warps == c["NT"] // 32
        pb = compiled.profile(bwd)
        assert pb.unroll == 1 and pb.tensor_redundancy == 1.0 and pb.resources["local"] == 0
        # float32 has no one-exponential form: no column factor, no second pass
        sixteen = dtype == "fp16"
        assert pb.per_tile["mufu_ex2"] * bwd.num_warps * 32 == 2 * elements + sixteen * c["NT"]
        assert list(pb.inner_trips.values()).count(0) == sixteen  # the other form's pass
        split = 3 if dtype == "fp32" else 1
        assert pb.per_tile["tensor_macs_per_cta"] == split * elements * (128 + c["DO"])
        assert pb.per_tile["tensor_tf32_macs_per_cta"] == split * elements * (
            c["DO"] + (128 if dtype == "fp32" else 0))
        assert plan[0].frag == (dtype == "fp16")
    one = compiled.profile(replace(launch_plan("all", 32768, 128, c, "fp16")[-1], one_exp=True))
    assert one.per_tile["mufu_ex2"] * 4 * 32 == elements + c["NT"]


@needs_nvcc
def test_fragment_trip_counts_are_derived(compiled: cuda_cost.Compiled,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The trip counts come from the SASS's work: a source of another shape (a Y tile of
    other rows, a tile in other halves) fails loudly rather than being counted."""
    bwd = launch_plan("all", 32768, 128, compiled.consts)[-1]
    name = compiled.symbol(bwd)
    sass, res = compiled.sass[2][name], compiled.resources[2][name]
    assert cuda_cost.profile(bwd, sass, res).inner_trips  # as compiled: counted
    other = replace(bwd, consts={**compiled.consts, "BN": 48})
    with pytest.raises(ValueError, match="staged bytes"):
        cuda_cost.profile(other, sass, res)
    monkeypatch.setattr(cuda_cost, "FRAG_HALVES", 4)
    with pytest.raises(ValueError, match="halves of a tile"):
        cuda_cost.profile(bwd, sass, res)


@needs_nvcc
def test_headline_cuda_estimate_runs(compiled: cuda_cost.Compiled, tmp_path: Path) -> None:
    """The cases of the Triton estimate, for the CUDA backend: every launch estimated,
    CLIP twice the passes of NT-Xent at the same rows, one rank of eight (a forward and
    two backward passes over an eighth of the pairs): its dY pass an eighth of SupCon's,
    its x passes' 128 programs (8,192 rows) filling under a quarter of the slots."""
    # The label-masked case is the Triton backend's (cuda refuses labels): not run here.
    assert [c.labels for c in CASES] == [False] * 7 + [True]
    assert len(cuda_cost.run(CASES[-1:])) == 0
    results = [cuda_cost.estimate_case(case, compiled) for case in CASES[:-1]]
    nt, wide, clip, clip_cold, rank, supcon, queue = results
    assert [len(r["launches"]) for r in results] == [2, 2, 5, 5, 3, 3, 2]
    assert [e["side"] for e in rank["launches"]] == ["x", "x", "y"]
    assert nt["estimate_ms"] / 8 < rank["estimate_ms"] < nt["estimate_ms"]
    rank_y, supcon_y = rank["launches"][-1], supcon["launches"][-1]
    assert rank_y["kernel"] == supcon_y["kernel"] and rank_y["programs"] == 1024
    assert rank_y["seconds"] == pytest.approx(supcon_y["seconds"] / 8, rel=0.01)
    for e in rank["launches"][:2]:
        slots = H100.sms * rank["profiles"][e["kernel"]]["ctas_per_sm"]
        assert e["programs"] == 128 and e["balance"] == pytest.approx(128 / slots, rel=0.01)
    assert all(r["estimate_ms"] > r["floor_ms"] > 0 for r in results)
    # Same rows of S: CLIP's two backward passes are NT-Xent's (each with its own
    # rows' temperature terms), its forward one pass for both sides, whose finishing
    # launches re-sweep nothing on these unit rows (every sum in the window).
    back = sum(e["seconds"] for e in clip["launches"] if e["kind"] == "bwd")
    assert back == pytest.approx(2 * nt["launches"][1]["seconds"], rel=0.01)
    assert [e["kernel"] for e in clip["launches"]] == [
        "lse_cross_frag_kernel<bf16, 0>", "lse_forward_frag_kernel<bf16, 0>",
        "lse_forward_frag_kernel<bf16, 0>", "lse_backward_frag_kernel<bf16, 0, 1>",
        "lse_backward_frag_kernel<bf16, 0, 1>"]  # fmt: skip
    assert [e["tiles"] for e in clip["launches"][1:3]] == [0, 0]
    assert clip["launches"][0]["seconds"] < nt["launches"][0]["seconds"] * 1.1
    assert len(clip["profiles"]) == 3
    assert all(p["num_warps"] == 2 for p in clip["profiles"].values())
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
