"""What only the fused C++ CPU backend has: ISA variants, group tiles, thread counts,
its own argument checks, and its build and dispatch.

Values and gradients of every backend, this one included, are checked in
``test_backends.py``; tolerance rule: ``tests.kernels.accuracy``. The first test to
need the extension builds it (cached afterwards).
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

import mimac_kernels
from mimac_kernels import cpu_backend, dispatch, extension
from mimac_kernels.contract import Problem, Stats, Upstream
from mimac_kernels.options import CRITICS, NEGATIVES
from tests.kernels.accuracy import (
    assert_backend_matches_float64,
    kernel_case,
    kernel_level_errors,
    kernel_outputs,
    make_views,
)

CPU = torch.device("cpu")


def _no_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is None


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    """Build (or load the cached) extension once; a failure fails, never skips."""
    if _no_compiler():
        pytest.skip("no C++ compiler on this machine: the cpu backend cannot be built")
    why = extension.unavailable_reason("cpu")
    assert why is None, why
    return extension.load("cpu")


# --- values and gradients -------------------------------------------------------------


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_wide_spread_takes_two_exponentials(negatives):
    """Rows of very different norms (dot critic): no common shift suits a tile, so
    each row and column keeps its own; values and gradients must stay accurate."""
    gen = torch.Generator().manual_seed(7)
    scale = torch.logspace(-1, 1.3, 90)[torch.randperm(90, generator=gen)][:, None]
    a = torch.randn(90, 16, generator=gen) * scale
    b = torch.randn(90, 16, generator=gen) * scale.flip(0)
    out = mimac_kernels.fused_contrastive_loss(
        a, b, temperature=0.5, critic="dot", negatives=negatives, reduction="none", backend="cpu"
    )
    assert torch.isfinite(out).all()
    assert_backend_matches_float64(
        "cpu", a, b, torch.float32, tau=0.5, learnable=False, critic="dot", negatives=negatives,
        reduction="none",
    )  # fmt: skip


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_inf_probability_is_not_hidden(negatives):
    """log(+inf) must stay inf: the vector log once turned it into log(2^128), a finite loss.
    Which non-finite value (inf or NaN) a row gets may differ from torch's logsumexp."""
    a, b = make_views((6, 8), "log_dot")
    a[2, 3] = float("inf")
    kw = {"temperature": 0.5, "critic": "log_dot", "negatives": negatives, "reduction": "none"}
    a_ = a.clone().requires_grad_()
    out = mimac_kernels.fused_contrastive_loss(a_, b, backend="cpu", **kw)
    ref = mimac_kernels.fused_contrastive_loss(a, b, backend="torch", **kw)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)) and not torch.isfinite(ref).any()
    out.sum().backward()
    assert not torch.isfinite(a_.grad).all()


def test_backward_refuses_statistics_of_the_wrong_shape():
    case = kernel_case((4, 70, 19), "dot", "all", torch.float32, CPU)
    p, up = case.problem, case.upstream
    stats = cpu_backend.forward(p)
    with pytest.raises(RuntimeError, match="row statistics must be"):  # one head for four
        cpu_backend.backward(
            p, Stats(stats.row_lse[:1], stats.col_lse),
            Upstream(up.g_row[:1], up.g_col, up.row_center[:1], up.col_center),
        )
    with pytest.raises(RuntimeError, match="column statistics must be"):
        cpu_backend.backward(
            p, stats, Upstream(up.g_row, torch.zeros(4, 3), up.row_center, up.col_center)
        )


# --- kernel level ---------------------------------------------------------------------


@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_kernel_level_matches_reference_every_isa(critic, negatives):
    """The backend contract against the torch backend in float64, for every
    instruction set this CPU runs (AVX-512, AVX2, baseline)."""
    case = kernel_case((2, 70, 19), critic, negatives, torch.float32, CPU)
    before = cpu_backend.isa()
    try:
        for isa in cpu_backend.available_isas():
            cpu_backend.set_isa(isa)
            assert kernel_level_errors(cpu_backend, case) == [], isa
    finally:
        cpu_backend.set_isa(before)


@pytest.fixture
def restore_group():
    yield
    cpu_backend.set_group(0)


@pytest.mark.parametrize("critic", ["cosine", "log_dot"])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_group_tiles_match_reference(critic, negatives, restore_group):
    """Groups of 1 to 9 blocks over 7 blocks of 64 rows (short last groups, one
    group larger than the problem) and two heads: every tile is visited once, the
    diagonal group of "all" included."""
    n = 200 if negatives == "all" else 400  # 400 rows either way: 7 blocks
    case = kernel_case((2, n, 24), critic, negatives, torch.float32, CPU)
    for g in (1, 2, 3, 4, 7, 9):
        cpu_backend.set_group(g)
        assert kernel_level_errors(cpu_backend, case) == [], f"group {g}"


def test_group_choice(restore_group):
    """Automatic: up to 4 blocks while at least 64 groups remain and the group's
    working set stays within 4 MiB; never the thread count."""
    assert cpu_backend.group(4096, 128) == 1  # 64 blocks
    assert cpu_backend.group(8192, 128) == 2
    assert cpu_backend.group(16384, 128) == 4
    assert cpu_backend.group(1 << 20, 128) == 4
    assert cpu_backend.group(1 << 20, 1024) == 3  # 1.25 MiB per block of the group
    assert cpu_backend.group(1 << 20, 4096) == 1
    cpu_backend.set_group(3)
    assert cpu_backend.group(64, 8) == 3
    with pytest.raises(RuntimeError, match="group must be >= 0"):
        cpu_backend.set_group(-1)
    with pytest.raises(RuntimeError, match="expected n_rows >= 0 and d >= 1"):
        cpu_backend.group(64, 0)


@pytest.mark.parametrize("group", [0, 3])
def test_result_does_not_depend_on_thread_count(group, restore_group):
    """Tiles of one round touch disjoint rows: the sums are the same for any thread count."""
    case = kernel_case((1, 400, 64), "cosine", "all", torch.float32, CPU)
    threads = torch.get_num_threads()
    cpu_backend.set_group(group)
    outs = []
    try:
        for t in (1, max(2, threads), 3):
            torch.set_num_threads(t)
            outs.append(kernel_outputs(cpu_backend, case))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


def test_half_inputs_are_upcast():
    p = kernel_case((2, 70, 19), "dot", "cross", torch.bfloat16, CPU).problem
    upcast = Problem(p.a.float(), p.b.float(), p.inv_tau, p.critic, p.negatives, p.eps)
    half, full = cpu_backend.forward(p), cpu_backend.forward(upcast)
    assert torch.equal(half.row_lse, full.row_lse) and torch.equal(half.col_lse, full.col_lse)


# --- dispatch, reasons, build ---------------------------------------------------------


def test_reasons_and_auto_choice():
    assert cpu_backend.probe(CPU, torch.float32) is None
    assert cpu_backend.probe(CPU, torch.float64) == "dtype float64 not supported (use backend='torch')"
    assert "CPU tensors" in cpu_backend.probe(torch.device("cuda"), torch.float32)
    p32 = kernel_case((1, 4, 3), "dot", "all", torch.float32, CPU).problem
    p64 = Problem(p32.a.double(), p32.b.double(), p32.inv_tau, "dot", "all", 1e-12)
    assert dispatch.resolve("auto", p32) == "cpu"
    assert dispatch.resolve("auto", p64) == "torch"
    a = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(mimac_kernels.BackendUnavailable, match="float64 not supported"):
        mimac_kernels.fused_contrastive_loss(a, a, backend="cpu")
    assert "cpu" in mimac_kernels.available_backends("cpu")


@pytest.fixture
def fresh_caches():
    """Forget build results and dispatch's cached reasons, before and after."""
    extension.reset()
    dispatch.forget_probes()
    yield
    extension.reset()
    dispatch.forget_probes()


def test_failed_build_gives_reason_not_crash(monkeypatch, fresh_caches):
    """A missing compiler / broken source: one warning with the compiler's message,
    the reason in dispatch, auto falls back to torch, and nothing crashes."""
    calls = []

    def broken_build(spec, *, verbose=False):
        calls.append(spec.kind)
        try:
            raise RuntimeError(
                "c++: error: unrecognized command-line option '-fbroken' (simulated)"
            )
        except RuntimeError as exc:
            raise extension.ExtensionUnavailable(
                f"building the {spec.kind} extension failed: c++: error: simulated"
            ) from exc

    monkeypatch.setattr(extension, "build", broken_build)
    with pytest.warns(extension.ExtensionBuildWarning, match="simulated"):
        why = cpu_backend.probe(CPU, torch.float32)
    assert "building the cpu extension failed" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: no second warning
        assert extension.unavailable_reason("cpu") == why
        assert dispatch.unavailable_reason("cpu", CPU, torch.float32) == why
    assert calls == ["cpu"]  # built (tried) once
    a, b = make_views((9, 4), "cosine")
    with pytest.raises(mimac_kernels.BackendUnavailable, match="simulated"):
        mimac_kernels.fused_contrastive_loss(a, b, backend="cpu")
    assert dispatch.resolve("auto", Problem(a[None], b[None], torch.tensor(2.0), "cosine", "all",
                                            1e-12)) == "torch"
    assert torch.isfinite(mimac_kernels.fused_contrastive_loss(a, b))


def test_unexpected_build_error_is_a_reason(monkeypatch, fresh_caches):
    """Any exception from a build, not only the expected ones, becomes a reason to fall back."""

    def crashing_build(spec, *, verbose=False):
        raise RuntimeError("unexpected (simulated)")

    monkeypatch.setattr(extension, "build", crashing_build)
    with pytest.warns(extension.ExtensionBuildWarning, match="simulated"):
        why = extension.unavailable_reason("cpu")
    assert "loading the cpu extension failed" in why and "simulated" in why
    p = kernel_case((1, 4, 3), "dot", "all", torch.float32, CPU).problem
    assert dispatch.resolve("auto", p) == "torch"


def test_real_compile_error_is_captured(tmp_path, monkeypatch):
    """A source that does not compile: ExtensionUnavailable with the compiler's line."""
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.cpp").write_text("int f() { return undeclared_mimac_symbol; }\n")
    spec = extension.ExtensionSpec(
        kind="cpu", name="mimac_broken_test", source_dir=src, sources=(src / "bad.cpp",)
    )
    with pytest.raises(extension.ExtensionUnavailable, match="undeclared_mimac_symbol") as info:
        extension.build(spec)
    assert "failed" in str(info.value)


def test_missing_sources_and_no_build(tmp_path, monkeypatch):
    spec = extension.cpu_spec(csrc=tmp_path)
    assert "not found" in extension.skip_reason(spec)
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path / "empty"))
    monkeypatch.setenv(extension.ENV_NO_BUILD, "1")
    with pytest.raises(extension.ExtensionUnavailable, match="MIMAC_KERNELS_NO_BUILD=1"):
        extension.build(extension.cpu_spec())


def test_no_build_still_loads_a_prebuilt_extension(monkeypatch):
    monkeypatch.setenv(extension.ENV_NO_BUILD, "1")
    assert extension.library_path(extension.cpu_spec()).is_file()  # built by the fixture
    module = extension.build(extension.cpu_spec())
    assert hasattr(module, "forward")


def test_cache_key(tmp_path, monkeypatch):
    """The cache folder follows MIMAC_KERNELS_CACHE and changes with any source byte."""
    spec = extension.cpu_spec()
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path))
    d1 = extension.build_directory(spec)
    assert d1.parent == tmp_path
    assert torch.__version__.replace("+", "_") in d1.name
    copy = tmp_path / "csrc"
    shutil.copytree(spec.source_dir, copy / "cpu")
    spec2 = extension.cpu_spec(csrc=copy)
    assert extension.source_hash(spec2) == extension.source_hash(spec)
    # Same sources, another checkout: another folder (ninja's build file names sources by
    # absolute path, so a shared folder would rebuild at every switch) and module name.
    assert extension.build_directory(spec2) != d1
    assert extension.module_name(spec2) != extension.module_name(spec)
    assert extension.library_path(spec).name.startswith(extension.module_name(spec) + ".")
    (copy / "cpu" / "tile_impl.h").write_text(
        (copy / "cpu" / "tile_impl.h").read_text() + "\n// x\n"
    )
    assert extension.source_hash(spec2) != extension.source_hash(spec)


def test_unusable_cache_is_a_reason(tmp_path, monkeypatch):
    """A cache that cannot be created (read-only home, a file in the way) or a prebuilt
    library that does not load: a reason to fall back, never an exception at the call."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path / "file" / "cache"))
    with pytest.raises(extension.ExtensionUnavailable, match="cannot use the build cache"):
        extension.build(extension.cpu_spec())
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv(extension.ENV_NO_BUILD, "1")
    lib = extension.library_path(extension.cpu_spec())
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a shared library")
    with pytest.raises(extension.ExtensionUnavailable, match="does not load"):
        extension.build(extension.cpu_spec())


def test_cuda_home_from_nvcc_when_torch_guesses_wrong(tmp_path, monkeypatch):
    """nvcc behind a wrapper script: torch's CUDA_HOME guess lacks the headers, so the
    root nvcc reports is used; with none, the reason names CUDA_HOME. Any machine."""
    from torch.utils import cpp_extension

    wrapper_root, toolkit = tmp_path / "wrapper-root", tmp_path / "toolkit"
    (wrapper_root / "bin").mkdir(parents=True)
    nvcc = wrapper_root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={toolkit}/bin/..'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper_root))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    why = extension.skip_reason(extension.cuda_spec())
    assert why is not None and f"CUDA_HOME={wrapper_root} has no include/cuda_runtime_api.h" in why
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    assert extension.cuda_home() == str(toolkit.resolve())
    assert extension.skip_reason(extension.cuda_spec()) is None


def test_lock_left_by_a_killed_build_is_cleared(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's ``lock`` file, on which every later
    build would wait forever; the next build removes it, with a warning. Real
    compiler, in a subprocess with a timeout, so a regression fails, not hangs."""
    import subprocess
    import sys
    import textwrap

    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.cpp").write_text("int mimac_lock_probe() { return 1; }\n")
    script = textwrap.dedent(f"""
        import warnings
        from pathlib import Path
        from mimac_kernels import extension
        src = Path({str(src)!r})
        spec = extension.ExtensionSpec(kind="cpu", name="mimac_lock_test", source_dir=src,
                                       sources=(src / "ok.cpp",))
        lock = extension.library_path(spec).parent / "lock"
        lock.parent.mkdir(parents=True)
        lock.touch()  # what a killed build leaves
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                extension.build(spec)
            except extension.ExtensionUnavailable:
                pass  # no PyInit in ok.cpp: importing it fails, after the build ran
        assert not lock.exists()
        assert any("left by a build that was killed" in str(w.message) for w in caught), caught
        print("CLEARED")
    """)
    env = {**os.environ, extension.ENV_CACHE: str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert "CLEARED" in proc.stdout, proc.stdout + proc.stderr[-3000:]
