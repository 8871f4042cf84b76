"""The CPU emulation of csrc/emulation catches the defects it claims to.

``test_cuda_backend.py`` runs the real CUDA kernels through it; here small
kernels with one known defect each (``csrc/emulation/selftest_kernels.cuh``)
must fail with the right message, and their correct twins must compute the
right numbers, so a green emulated run means something.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from tests.kernels.emulation import EMULATION_SCHEDULES, cuda_emulation, emulation_schedule

pytestmark = pytest.mark.emulated


@pytest.fixture(scope="module")
def selftest():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the emulation cannot be built")
    cuda_emulation()  # registers torch.ops.mimac_emu_selftest
    return torch.ops.mimac_emu_selftest


def run(ops, kernel, x, variant, threads=128, smem=512, attribute=0):
    out = torch.zeros_like(x)
    ops.run(kernel, x, out, variant, threads, smem, attribute)
    return out


def test_barrier_orders_shared_memory(selftest):
    x = torch.arange(128.0)
    torch.testing.assert_close(run(selftest, "neighbour", x, 0), x.roll(-1), rtol=0, atol=0)


def test_missing_barrier_reads_unwritten_shared_memory(selftest):
    # Shared memory starts as NaN bytes: thread 0 runs to its end before thread 1 writes.
    out = run(selftest, "neighbour", torch.arange(128.0), 1)
    assert torch.isnan(out[:-1]).all()


def test_schedules_expose_a_race_between_barriers(selftest):
    """A write-after-read race: right in order, wrong reversed or shuffled; the
    twin with the barrier is right under every schedule."""
    x = torch.arange(1.0, 129.0)
    expected = torch.cat([x[1:], torch.zeros(1)])
    racy = {}
    for schedule in EMULATION_SCHEDULES:
        with emulation_schedule(schedule, seed=3):
            racy[schedule] = run(selftest, "neighbour", x, 2)
            torch.testing.assert_close(run(selftest, "neighbour", x, 3), expected, rtol=0, atol=0)
    torch.testing.assert_close(racy["in_order"], expected, rtol=0, atol=0)  # the blind spot
    assert (racy["reversed"][:-1] == -1).all()  # every reader came after the overwrite
    assert not torch.equal(racy["shuffled"], expected)


def test_warp_schedules_expose_a_missing_block_barrier(selftest):
    """Reading another warp's value after only __syncwarp: lockstep sweeps keep the
    warps level, so it passes there; one warp at a time reads unwritten (NaN) slots."""
    x = torch.arange(1.0, 129.0)
    expected = x.roll(-32)
    for schedule in EMULATION_SCHEDULES:
        with emulation_schedule(schedule):
            racy = run(selftest, "neighbour", x, 4)
            torch.testing.assert_close(run(selftest, "neighbour", x, 5), expected, rtol=0, atol=0)
        if schedule.startswith("warps_"):
            assert torch.isnan(racy).any(), schedule
        else:
            torch.testing.assert_close(racy, expected, rtol=0, atol=0)  # the lockstep blind spot


def test_syncthreads_and_votes_per_barrier(selftest):
    """__syncthreads_and: 0 when any thread's predicate is 0, each barrier's vote its own
    (a false vote does not linger into the next), under every schedule."""
    x = torch.zeros(128)
    for schedule in EMULATION_SCHEDULES:
        with emulation_schedule(schedule, seed=1):
            out = run(selftest, "neighbour", x, 6)
        torch.testing.assert_close(out, torch.full((128,), 25.0), rtol=0, atol=0)


def test_schedule_is_checked(selftest):
    with pytest.raises(ValueError, match="schedule must be one of"), emulation_schedule("backwards"):
        pass
    with pytest.raises(RuntimeError, match="schedule must be 0 \\(in order\\), 1 \\(reversed\\), 2"):
        torch.ops.mimac_emu.set_schedule(7, 0)


def test_shuffle(selftest):
    x = torch.arange(128.0)
    torch.testing.assert_close(run(selftest, "defect", x, 0), x + (x.long() ^ 1).float())


@pytest.mark.parametrize(
    "variant,message",
    [
        (1, "deadlock (barrier divergence) in block (0,0,0): 64 threads wait at __syncthreads; 64 have exited"),
        (2, "write past the 512 bytes of dynamic shared memory"),
        (3, "__shfl_xor_sync: only the full mask is emulated"),
        (4, "__ldg: 16-byte vector load from an address not 16-byte aligned"),
    ],
)
def test_defects_fail_the_launch(selftest, variant, message):
    with pytest.raises(RuntimeError) as err:
        run(selftest, "defect", torch.arange(128.0), variant)
    assert message in str(err.value)


def test_vector_load(selftest):
    """The aligned twin of the misaligned 16-byte load: four floats per load, in order."""
    x = torch.arange(128.0)
    expected = x.view(32, 4).sum(1).repeat_interleave(4)
    torch.testing.assert_close(run(selftest, "defect", x, 5), expected, rtol=0, atol=0)


def test_async_copy_lands_at_the_wait(selftest):
    """cp.async: committed, waited for, then a barrier: every thread reads its neighbour's
    copy; the same read before the wait finds the destinations still in flight (NaN);
    __pipeline_wait_prior(1) completes the older of two groups only."""
    x = torch.arange(1.0, 129.0)
    for schedule in EMULATION_SCHEDULES:
        with emulation_schedule(schedule, seed=2):
            torch.testing.assert_close(run(selftest, "async", x, 0, threads=32), x.roll(-4), rtol=0, atol=0)
            assert torch.isnan(run(selftest, "async", x, 1, threads=32)).all(), schedule
            two = run(selftest, "async", x, 2, threads=32).view(32, 4)
            torch.testing.assert_close(two[:, :2], x.roll(-4).view(32, 4)[:, :2], rtol=0, atol=0)
            assert torch.isnan(two[:, 2:]).all(), schedule


@pytest.mark.parametrize(
    "variant,message",
    [
        (3, "__pipeline_memcpy_async: shared destination not 16-byte aligned"),
        (4, "cp.async copies still in flight when the thread exited"),
        (5, "shared memory written while a cp.async copy into it was in flight"),
    ],
)
def test_async_copy_defects_fail_the_launch(selftest, variant, message):
    with pytest.raises(RuntimeError, match=message):
        run(selftest, "async", torch.arange(128.0), variant, threads=32)


def test_dynamic_shared_memory_limits(selftest):
    x = torch.arange(128.0)
    with pytest.raises(RuntimeError, match="60000 bytes of dynamic shared memory requested, the kernel allows 49152"):
        run(selftest, "neighbour", x, 0, smem=60000)
    torch.testing.assert_close(run(selftest, "neighbour", x, 0, smem=60000, attribute=60000), x.roll(-1))
    with pytest.raises(RuntimeError, match="exceed sm_80's maximum of 166912"):
        run(selftest, "neighbour", x, 0, smem=200000, attribute=200000)


def _tf32_truncated(t: torch.Tensor) -> torch.Tensor:
    return (t.view(torch.int32) & -8192).view(torch.float32)  # low 13 mantissa bits cleared


@pytest.mark.parametrize("variant", [0, 1], ids=["half", "tf32"])
def test_wmma_matrix_semantics(selftest, variant):
    x = torch.randn(512, generator=torch.Generator().manual_seed(0))
    c = run(selftest, "wmma", x, variant, threads=32, smem=4096)[:256].view(16, 16)
    a, b = x[:256].view(16, 16), x[256:].view(16, 16)
    # Tensor cores read TF32 operands truncated; half operands are converted exactly.
    a, b = (_tf32_truncated(a), _tf32_truncated(b)) if variant else (a.half().float(), b.half().float())
    expected = a.double() @ b.double()
    torch.testing.assert_close(c.double(), expected, rtol=0, atol=1e-5)
    if variant:  # and the truncation is real: rounded operands would differ visibly
        rounded = x.double()  # unrounded product, about 1e-3 away
        assert (c.double() - rounded[:256].view(16, 16) @ rounded[256:].view(16, 16)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "variant,message",
    [
        (2, "load_matrix_sync: pointer not 32-byte aligned"),
        (3, "load_matrix_sync: lanes of one warp passed different pointers or strides"),
        (4, "load_matrix_sync: ldm 12 is not a multiple of 16 bytes"),
    ],
)
def test_wmma_preconditions(selftest, variant, message):
    with pytest.raises(RuntimeError, match=message):
        run(selftest, "wmma", torch.randn(512), variant, threads=32, smem=4096)


def _ldmatrix_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B (16 x 16, [k][n]) as the kernel reads them: rounded to bf16, in float64."""
    a, b = x[:256].view(16, 16), x[256:].view(16, 16)
    return a.bfloat16().double(), b.bfloat16().double()


def test_ldmatrix_mma_fragment_layouts(selftest):
    """ldmatrix.x4 (A), ldmatrix.x4.trans (B) and mma.sync m16n8k16, written back from
    the documented accumulator layout, give C = A B, in bf16 and fp16; without .trans
    each 8 x 8 block of B arrives transposed in place (a layout mistake the emulation
    does not hide)."""
    x = torch.randn(512, generator=torch.Generator().manual_seed(1))
    a, b = _ldmatrix_reference(x)
    c = run(selftest, "ldmatrix", x, 0, threads=32, smem=4096)[:256].view(16, 16)
    torch.testing.assert_close(c.double(), a @ b, rtol=0, atol=1e-5)
    c16 = run(selftest, "ldmatrix", x, 6, threads=32, smem=4096)[:256].view(16, 16)
    h = x.half().double()
    torch.testing.assert_close(c16.double(), h[:256].view(16, 16) @ h[256:].view(16, 16), rtol=0, atol=1e-5)
    assert (c16.double() - c.double()).abs().max() > 1e-3  # the two formats really differ
    c_t = run(selftest, "ldmatrix", x, 4, threads=32, smem=4096)[:256].view(16, 16)
    blocks_t = b.view(2, 8, 2, 8).transpose(1, 3).reshape(16, 16)  # [kb, y, nb, x] -> [kb, x, nb, y]
    torch.testing.assert_close(c_t.double(), a @ blocks_t, rtol=0, atol=1e-5)
    assert (c_t.double() - a @ b).abs().max() > 0.1


def test_mma_reads_every_lanes_own_fragment(selftest):
    """Lane 5 (g = 1, t = 1) swaps its A registers a[0] (row 1, k = 2, 3) and a[1] (row 9,
    k = 2, 3): rows 1 and 9 of C, and only they, take each other's two terms."""
    x = torch.randn(512, generator=torch.Generator().manual_seed(2))
    a, b = _ldmatrix_reference(x)
    c = run(selftest, "ldmatrix", x, 3, threads=32, smem=4096)[:256].view(16, 16).double()
    swapped = a.clone()
    swapped[[1, 9], 2:4] = a[[9, 1], 2:4]
    torch.testing.assert_close(c, swapped @ b, rtol=0, atol=1e-5)
    wrong = ((c - a @ b).abs() > 1e-5).any(dim=1).nonzero().flatten().tolist()
    assert wrong == [1, 9]


@pytest.mark.parametrize(
    "variant,message",
    [
        (1, r"ldmatrix\.x4: row address of lane 3 not 16-byte aligned"),
        (2, r"ldmatrix\.x4\.trans: row address of lane 0 outside the dynamic shared memory"),
        (5, r"mma\.m16n8k16\.bf16: lane 16 is not at the same instruction"),
    ],
)
def test_ldmatrix_mma_preconditions(selftest, variant, message):
    with pytest.raises(RuntimeError, match=message):
        run(selftest, "ldmatrix", torch.randn(512), variant, threads=32, smem=4096)


def test_tf32_rounding_is_to_nearest_ties_away(selftest):
    assert selftest.tf32(1.0 + 2.0**-11) == 1.0 + 2.0**-10  # a tie rounds away from zero
    assert selftest.tf32(1.0 + 2.0**-12) == 1.0
    assert selftest.tf32(-(1.0 + 3 * 2.0**-12)) == -(1.0 + 2.0**-10)


def test_ex2_approx_ftz_flushes_subnormals(selftest):
    """The kernels' exp2 (ex2.approx.ftz.f32): results below 2^-126 are zero, a
    subnormal input counts as zero, the rest is 2^x; -inf gives 0, NaN stays NaN."""
    assert selftest.ex2_ftz(3.0) == 8.0 and selftest.ex2_ftz(-126.0) == 2.0**-126
    assert selftest.ex2_ftz(-126.5) == 0.0  # 2^-126.5 would be subnormal
    assert selftest.ex2_ftz(2.0**-140) == 1.0 and selftest.ex2_ftz(-math.inf) == 0.0
    assert math.isnan(selftest.ex2_ftz(math.nan)) and selftest.ex2_ftz(math.inf) == math.inf


def test_a_failed_launch_does_not_fail_the_next(selftest):
    """A failed launch's error is returned and cleared, as the CUDA launchers do: the
    next launch (here the real kernels', which check cudaGetLastError) succeeds."""
    import mimac_kernels
    from tests.kernels.emulation import emulated_cuda_backend

    with pytest.raises(RuntimeError, match="write past the 512 bytes"):
        run(selftest, "defect", torch.arange(128.0), 2)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    with emulated_cuda_backend():
        loss = mimac_kernels.fused_contrastive_loss(a, b, backend="cuda")
    assert torch.isfinite(loss)
