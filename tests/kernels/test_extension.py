"""The build layer (``mimac_kernels.extension``, ``python -m mimac_kernels.build``).

Real builds use a tiny C extension (a second to compile, no torch headers), so
these tests do not wait for the kernels' own minute-long builds. Each case here
is one the build layer exists for: concurrent processes share one build, a
killed build's lock file is cleared, nvcc behind a wrapper script is followed,
an unusable cache or library is a reason to fall back, two checkouts and a
rebuild within one process each get their own name, and a build says so once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import mimac_kernels
from mimac_kernels import build as build_cli
from mimac_kernels import dispatch, extension
from mimac_kernels.contract import Problem

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _problem() -> Problem:
    """A small float32 CPU problem for dispatch to resolve."""
    a, b = torch.randn(1, 9, 4), torch.randn(1, 9, 4)
    return Problem(a, b, torch.tensor(2.0), "cosine", "all", 1e-12)

BUILDING = "building the cpu kernel extension"
WAITING = "waiting for another process's build"
#: A Python extension module without torch headers; TORCH_EXTENSION_NAME is the
#: module name torch passes, so the init function matches whatever name the key gives.
TINY_SOURCE = """
#include <Python.h>
#define MIMAC_CAT2(a, b) a##b
#define MIMAC_CAT(a, b) MIMAC_CAT2(a, b)
static PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};
PyMODINIT_FUNC MIMAC_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&tiny);
  if (m != nullptr) PyModule_AddIntConstant(m, "VALUE", VALUE);
  return m;
}
"""
#: Builds (or, with MIMAC_KERNELS_NO_BUILD=1, loads) the tiny extension in argv[1].
CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mimac_kernels import extension
    src = Path(sys.argv[1])
    spec = extension.ExtensionSpec(kind="cpu", name="mimac_tiny", source_dir=src,
                                   sources=(src / "tiny.cpp",))
    print("LOADED", extension.build(spec).VALUE, flush=True)
""")

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler on this machine"
)


def tiny_spec(src: Path, value: int = 1) -> extension.ExtensionSpec:
    """The tiny extension in ``src`` (written there), whose module has ``VALUE == value``."""
    src.mkdir(exist_ok=True)
    (src / "tiny.cpp").write_text(f"#define VALUE {value}\n{TINY_SOURCE}")
    return extension.ExtensionSpec(
        kind="cpu", name="mimac_tiny", source_dir=src, sources=(src / "tiny.cpp",)
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty build cache, and building allowed."""
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(extension.ENV_NO_BUILD, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def fresh_caches():
    """Forget build results and dispatch's cached reasons, before and after."""
    extension.reset()
    dispatch.forget_probes()
    yield
    extension.reset()
    dispatch.forget_probes()


def start_child(src: Path, cache: Path, log: Path, *, no_build: bool = False) -> subprocess.Popen:
    """``CHILD`` in a new process on this checkout's code; stderr goes to ``log``."""
    env = {**os.environ, extension.ENV_CACHE: str(cache)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop(extension.ENV_NO_BUILD, None)
    if no_build:
        env[extension.ENV_NO_BUILD] = "1"
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", CHILD, str(src)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=err)


def wait_until_waiting(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Return once ``proc`` says it waits for another build; fail if it ends or never does."""
    deadline = time.monotonic() + timeout
    while WAITING not in log.read_text():
        if proc.poll() is not None:
            pytest.fail(f"finished without waiting for the held build lock:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no '{WAITING}' within {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, log: Path) -> str:
    """``proc``'s stdout once it has exited with status 0."""
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out + log.read_text()[-3000:]
    return out


# --- a build, once ----------------------------------------------------------------------


@needs_compiler
def test_a_build_says_so_once(tmp_path, cache, capfd):
    """The first build prints one line to stderr (what, why, that it happens once, where);
    loading the cached build prints nothing."""
    spec = tiny_spec(tmp_path / "src")
    assert extension.build(spec).VALUE == 1
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mimac_kernels:")]
    assert len(lines) == 1 and BUILDING in lines[0], err
    assert "once" in lines[0] and str(extension.build_directory(spec)) in lines[0]
    assert extension.build(spec).VALUE == 1
    assert "mimac_kernels:" not in capfd.readouterr().err


@needs_compiler
def test_concurrent_processes_share_one_build(tmp_path, cache):
    """Processes that start a build while one runs wait for it (an OS lock) and load its
    library: one build, one message. A load under MIMAC_KERNELS_NO_BUILD=1 waits too,
    rather than import a library still being written."""
    src = tmp_path / "src"
    lib = extension.library_path(tiny_spec(src))
    logs = [tmp_path / f"child{i}.err" for i in range(3)]
    with extension._build_lock(lib.parent):  # a build in progress
        builders = [start_child(src, cache, log) for log in logs[:2]]
        for proc, log in zip(builders, logs):
            wait_until_waiting(proc, log)
        assert not lib.exists()
    for proc, log in zip(builders, logs):
        assert "LOADED 1" in finish(proc, log)
    assert sum(log.read_text().count(BUILDING) for log in logs[:2]) == 1
    with extension._build_lock(lib.parent):
        loader = start_child(src, cache, logs[2], no_build=True)
        wait_until_waiting(loader, logs[2])
    assert "LOADED 1" in finish(loader, logs[2])


@needs_compiler
def test_lock_left_by_a_killed_build_is_cleared(tmp_path, cache):
    """A build killed mid-way leaves torch's ``lock`` file, on which every later build
    would wait forever; the next build removes it, with a warning. In a subprocess with
    a timeout, so a regression fails, not hangs."""
    src = tmp_path / "src"
    lock = extension.build_directory(tiny_spec(src)) / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # what a killed build leaves
    log = tmp_path / "child.err"
    proc = start_child(src, cache, log)
    try:
        assert "LOADED 1" in finish(proc, log)
    finally:
        proc.kill()
    assert not lock.exists()
    assert "left by a build that was killed" in log.read_text()


@needs_compiler
def test_rebuild_in_one_process_keeps_a_loadable_name(tmp_path, cache, monkeypatch):
    """Sources changed and built again in one process: a new folder and module name, so torch
    does not rename the library ``name_v1`` where MIMAC_KERNELS_NO_BUILD would not find it."""
    first = tiny_spec(tmp_path / "src", value=1)
    assert extension.build(first).VALUE == 1
    old_lib = extension.library_path(first)
    second = tiny_spec(tmp_path / "src", value=2)
    assert extension.build(second).VALUE == 2
    assert extension.library_path(second) != old_lib
    assert extension.library_path(second).is_file() and old_lib.is_file()
    monkeypatch.setenv(extension.ENV_NO_BUILD, "1")
    assert extension.build(second).VALUE == 2


@needs_compiler
def test_no_build_loads_a_prebuilt_extension_without_compiling(tmp_path, cache, monkeypatch):
    """MIMAC_KERNELS_NO_BUILD=1 imports the cached library and never compiles, also from
    a cache it cannot lock."""
    from torch.utils import cpp_extension

    spec = tiny_spec(tmp_path / "src")
    extension.build(spec)
    monkeypatch.setenv(extension.ENV_NO_BUILD, "1")

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled under MIMAC_KERNELS_NO_BUILD=1")

    monkeypatch.setattr(cpp_extension, "load", no_compiling)
    assert extension.build(spec).VALUE == 1
    # A shared cache this process cannot write, so cannot lock (a folder where the lock
    # file would be opened stands in, as root writes anywhere): no build runs there.
    lock_file = extension.build_directory(spec) / ".mimac-build-lock"
    lock_file.unlink()
    lock_file.mkdir()
    assert extension.build(spec).VALUE == 1


def test_missing_sources_and_no_build(tmp_path, cache, monkeypatch):
    spec = extension.cpu_spec(csrc=tmp_path)
    assert "not found" in extension.skip_reason(spec)
    monkeypatch.setenv(extension.ENV_NO_BUILD, "1")
    with pytest.raises(extension.ExtensionUnavailable, match="MIMAC_KERNELS_NO_BUILD=1"):
        extension.build(extension.cpu_spec())


# --- the cache key ----------------------------------------------------------------------


def test_cache_key(tmp_path, monkeypatch):
    """The cache folder follows MIMAC_KERNELS_CACHE, names the torch version, and changes
    with any source byte and with the checkout's location; the module is named as its folder."""
    spec = extension.cpu_spec()
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path))
    d1 = extension.build_directory(spec)
    assert d1.parent == tmp_path
    assert re.sub(r"\W", "_", torch.__version__) in d1.name
    assert extension.library_path(spec).name.startswith(extension.module_name(spec) + ".")
    copy = tmp_path / "csrc"
    shutil.copytree(spec.source_dir, copy / "cpu")
    spec2 = extension.cpu_spec(csrc=copy)
    assert extension.source_hash(spec2) == extension.source_hash(spec)
    # Same sources, another checkout: another folder (ninja's build file names sources by
    # absolute path, so a shared folder would rebuild at every switch) and module name.
    assert extension.build_directory(spec2) != d1
    assert extension.module_name(spec2) != extension.module_name(spec)
    (copy / "cpu" / "tile_impl.h").write_text(
        (copy / "cpu" / "tile_impl.h").read_text() + "\n// x\n"
    )
    assert extension.source_hash(spec2) != extension.source_hash(spec)


# --- failures are reasons ---------------------------------------------------------------


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
        why = extension.unavailable_reason("cpu")
    assert "building the cpu extension failed" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: no second warning
        assert extension.unavailable_reason("cpu") == why
        assert dispatch.unavailable_reason("cpu", CPU, torch.float32) == why
    assert calls == ["cpu"]  # built (tried) once
    a, b = torch.randn(9, 4), torch.randn(9, 4)
    with pytest.raises(mimac_kernels.BackendUnavailable, match="simulated"):
        mimac_kernels.fused_contrastive_loss(a, b, backend="cpu")
    assert dispatch.resolve("auto", _problem()) == "torch"
    assert torch.isfinite(mimac_kernels.fused_contrastive_loss(a, b))


def test_unexpected_build_error_is_a_reason(monkeypatch, fresh_caches):
    """Any exception from a build, not only the expected ones, becomes a reason to fall back."""

    def crashing_build(spec, *, verbose=False):
        raise RuntimeError("unexpected (simulated)")

    monkeypatch.setattr(extension, "build", crashing_build)
    with pytest.warns(extension.ExtensionBuildWarning, match="simulated"):
        why = extension.unavailable_reason("cpu")
    assert "loading the cpu extension failed" in why and "simulated" in why
    assert dispatch.resolve("auto", _problem()) == "torch"


@needs_compiler
def test_real_compile_error_is_captured(tmp_path, cache):
    """A source that does not compile: the reason quotes the compiler's error line, not
    the command lines; the full log is the cause."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.cpp").write_text("int f() { return undeclared_mimac_symbol; }\n")
    spec = extension.ExtensionSpec(
        kind="cpu", name="mimac_broken_test", source_dir=src, sources=(src / "bad.cpp",)
    )
    with pytest.raises(extension.ExtensionUnavailable, match="undeclared_mimac_symbol") as info:
        extension.build(spec)
    reason = str(info.value)
    assert "failed" in reason and " -MMD " not in reason and " -c " not in reason, reason
    assert " -c " in str(info.value.__cause__)


def test_unwritable_cache_is_a_reason(tmp_path, monkeypatch, fresh_caches):
    """A cache that cannot be created (read-only home, a file in the way): the backend's
    reason to fall back, never an exception at the call."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path / "file" / "cache"))
    monkeypatch.delenv(extension.ENV_NO_BUILD, raising=False)
    with pytest.raises(extension.ExtensionUnavailable, match="cannot use the build cache"):
        extension.build(extension.cpu_spec())
    with pytest.warns(extension.ExtensionBuildWarning, match="cannot use the build cache"):
        assert "MIMAC_KERNELS_CACHE" in extension.unavailable_reason("cpu")
    assert dispatch.resolve("auto", _problem()) == "torch"


def test_prebuilt_library_that_does_not_load_is_a_reason(tmp_path, cache, monkeypatch):
    monkeypatch.setenv(extension.ENV_NO_BUILD, "1")
    lib = extension.library_path(extension.cpu_spec())
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a shared library")
    with pytest.raises(extension.ExtensionUnavailable, match="does not load"):
        extension.build(extension.cpu_spec())


# --- the toolchain ----------------------------------------------------------------------


def test_cuda_home_from_nvcc_when_torch_guesses_wrong(tmp_path, monkeypatch):
    """nvcc behind a wrapper script: torch's CUDA_HOME guess lacks the headers, so the
    root nvcc reports is used, for the build only; with none, the reason names CUDA_HOME."""
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
    with extension._toolchain(extension.cuda_spec()):
        assert cpp_extension.CUDA_HOME == str(toolkit.resolve())
    assert cpp_extension.CUDA_HOME == str(wrapper_root)


def test_ninja_next_to_the_interpreter_is_found(monkeypatch):
    """python run by its path (a virtual environment not activated): pip's ninja is not on
    PATH, where torch looks for it; the build puts it there, for the build only."""
    here = Path(sys.executable).parent
    if not (here / "ninja").exists():
        pytest.skip("no ninja next to this interpreter")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not Path(p, "ninja").exists())
    monkeypatch.setenv("PATH", path)
    assert shutil.which("ninja") is None
    with extension._toolchain(extension.cpu_spec()):
        assert shutil.which("ninja") is not None
    assert os.environ["PATH"] == path


# --- python -m mimac_kernels.build --------------------------------------------------------


@needs_compiler
def test_build_command(tmp_path, cache, monkeypatch, capsys):
    """Built, then up to date; a skip is not a failure; a failed build is exit status 1."""
    specs = {"cpu": tiny_spec(tmp_path / "src"), "cuda": extension.cpu_spec(csrc=tmp_path)}
    monkeypatch.setattr(extension, "spec_for", specs.__getitem__)
    assert build_cli.main([]) == 0
    out = capsys.readouterr().out
    assert f"cache: {cache}" in out and "cpu : built:" in out, out
    assert "cuda: skipped: source files not found" in out, out
    assert build_cli.main(["--kind", "cpu"]) == 0
    assert "cpu : up to date:" in capsys.readouterr().out
    (tmp_path / "src" / "tiny.cpp").write_text("int f() { return undeclared_mimac_symbol; }\n")
    assert build_cli.main(["--kind", "cpu"]) == 1
    assert "cpu : FAILED: building the cpu extension failed" in capsys.readouterr().out
