"""Build the C++/CUDA extensions in ``csrc/`` on first use and load them.

``torch.utils.cpp_extension.load`` compiles (ninja), locks and loads; this module
adds what it lacks: a cache folder per Python, torch, CUDA, target, sources and
checkout (``MIMAC_KERNELS_CACHE``, default ``~/.cache/mimac_kernels``), so a
build happens once and ``MIMAC_KERNELS_NO_BUILD=1`` can load it without a
compiler; an OS lock that survives a killed build; the CUDA toolkit root of an
nvcc behind a wrapper script; and failures as reasons to fall back, never as
errors at import or at the call. A build prints one line to stderr saying so.

The kernels' libraries are torch operator libraries, not Python modules: their
``TORCH_LIBRARY`` blocks register the ops (``ExtensionSpec.ops`` names the
namespace: ``torch.ops.mimac_cpu``, ``torch.ops.mimac_cuda``, and
``torch.ops.mimac_cuda_emu`` for the CPU emulation of the CUDA kernels), and
``load`` returns that namespace once the library is loaded and the ops' fake
implementations (``mimac_kernels.extension_fakes``) are registered.

Example:
    >>> from mimac_kernels import extension
    >>> extension.spec_for("cpu").name
    'mimac_kernels_cpu'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file only
    fcntl = None  # type: ignore[assignment]

#: Repository folder holding the C++/CUDA sources.
CSRC = Path(__file__).resolve().parent.parent / "csrc"
ENV_CACHE = "MIMAC_KERNELS_CACHE"
ENV_NO_BUILD = "MIMAC_KERNELS_NO_BUILD"
KINDS = ("cpu", "cuda")
#: Bumped when the way extensions are built changes (invalidates every cache entry).
BUILD_SCHEMA = "3"
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be used here; the message says why."""


class ExtensionBuildWarning(RuntimeWarning):
    """Compiling an extension failed; its backend is unavailable."""


@dataclass(frozen=True)
class ExtensionSpec:
    """What to compile: sources, flags, and the folder whose files key the cache."""

    kind: str
    name: str
    source_dir: Path
    sources: tuple[Path, ...]
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    #: Header search path (default: ``source_dir``).
    include_dirs: tuple[Path, ...] = ()
    #: The ``torch.ops`` namespace the library registers (``TORCH_LIBRARY``); empty: the
    #: library is a Python extension module instead.
    ops: str = ""


#: What ``build``/``load`` return: the ops namespace (``torch.ops.<spec.ops>``) of an
#: operator library, or the module of a Python extension module.
Extension = Any


def cpu_spec(csrc: Path = CSRC) -> ExtensionSpec:
    """The fused CPU kernel. No ``-march=native``: the tile kernels are compiled
    for AVX-512, AVX2 and the baseline and picked at run time, so a cached build
    runs on any x86-64 machine."""
    # GCC on Linux: -fopenmp links libgomp.so.1, the runtime torch already loaded
    # (same soname), so our threads and torch's share one pool.
    omp = ("-fopenmp",) if sys.platform.startswith("linux") else ()
    src = csrc / "cpu"
    return ExtensionSpec(
        kind="cpu",
        name="mimac_kernels_cpu",
        source_dir=src,
        sources=(src / "contrastive.cpp", src / "siglip.cpp"),
        cflags=("-O3", "-ffp-contract=fast", *omp),
        ldflags=omp,
        ops="mimac_cpu",  # and mimac_siglip (siglip.cpp)
    )


def cuda_spec(csrc: Path = CSRC) -> ExtensionSpec:
    """The CUDA kernels (``contrastive_kernels.cu``) and their torch glue."""
    src = csrc / "cuda"
    return ExtensionSpec(
        kind="cuda",
        name="mimac_kernels_cuda",
        source_dir=src,
        sources=(src / "binding.cpp", src / "contrastive_kernels.cu"),
        cflags=("-O3",),
        cuda_cflags=("-O3", "-lineinfo"),
        ops="mimac_cuda",
    )


def cuda_emulation_spec(csrc: Path = CSRC) -> ExtensionSpec:
    """The CUDA kernels and their torch glue built for the CPU emulation of
    ``csrc/emulation`` (tests run them on host tensors where no GPU is; see
    ``csrc/emulation/cuda_emu.h`` for what it checks and what it cannot see)."""
    emu = csrc / "emulation"
    return ExtensionSpec(
        kind="cuda_emulation",
        name="mimac_kernels_cuda_emulation",
        source_dir=csrc,  # the kernels live in csrc/cuda: key the cache on both folders
        sources=(
            csrc / "cuda" / "binding.cpp",
            emu / "kernels.cpp",
            emu / "runtime.cpp",
            emu / "selftest.cpp",
        ),
        cflags=("-O2", "-DMIMAC_CUDA_EMULATION", "-Wno-unknown-pragmas"),
        include_dirs=(emu,),
        ops="mimac_cuda_emu",  # and mimac_emu, mimac_emu_selftest (selftest.cpp)
    )


def spec_for(kind: str) -> ExtensionSpec:
    """The spec of extension ``kind`` ("cpu" or "cuda")."""
    if kind == "cpu":
        return cpu_spec()
    if kind == "cuda":
        return cuda_spec()
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# --- where a build goes -----------------------------------------------------------------


def cache_root() -> Path:
    """Where builds go: ``$MIMAC_KERNELS_CACHE`` or ``~/.cache/mimac_kernels``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimac_kernels"


def source_hash(spec: ExtensionSpec) -> str:
    """Hash of every source/header file in ``spec.source_dir`` and of the flags."""
    h = hashlib.sha256(repr((spec.name, spec.cflags, spec.cuda_cflags, spec.ldflags)).encode())
    files = sorted(p for p in spec.source_dir.rglob("*") if p.suffix in _SOURCE_SUFFIXES)
    for p in (*files, *(s for s in spec.sources if s not in files)):
        h.update(str(p.relative_to(spec.source_dir) if p.is_relative_to(spec.source_dir) else p)
                 .encode())
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def module_name(spec: ExtensionSpec) -> str:
    """The extension's module name, which is also its cache folder's name.

    It hashes everything the library depends on: Python, torch, CUDA, the target
    (CPU machine or GPU architectures), sources and flags, and the checkout's
    location, because ninja's build file names sources by absolute path (two
    checkouts sharing one folder would rebuild each other). One name per content
    also keeps torch from renaming a rebuild within a process to ``name_v1``,
    which ``MIMAC_KERNELS_NO_BUILD`` would not find.
    """
    target = platform.machine()
    if spec.kind == "cuda":  # the GPU targets torch compiles for: the list, else the visible GPUs
        target = os.environ.get("TORCH_CUDA_ARCH_LIST") or str(
            sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        )
    key = (BUILD_SCHEMA, torch.version.cuda, target, str(spec.source_dir.resolve()),
           source_hash(spec))
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return re.sub(r"\W", "_", f"{spec.name}_{sys.implementation.cache_tag}_torch"
                              f"{torch.__version__}_{digest}")


def build_directory(spec: ExtensionSpec) -> Path:
    """Cache folder of ``spec`` (see ``module_name``)."""
    return cache_root() / module_name(spec)


def library_path(spec: ExtensionSpec) -> Path:
    """The shared library the build produces."""
    return build_directory(spec) / f"{module_name(spec)}{'.pyd' if os.name == 'nt' else '.so'}"


# --- what a machine can build -----------------------------------------------------------


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _has_runtime_headers(root: str | Path) -> bool:
    return (Path(root) / "include" / "cuda_runtime_api.h").is_file()


def cuda_home() -> str | None:
    """The CUDA toolkit root to build with, or ``None`` if no toolkit with headers is found.

    torch's guess (``CUDA_HOME``, else nvcc's folder's parent) when it holds the
    runtime headers; else the root nvcc itself reports (``nvcc --dryrun`` prints
    it as TOP), which finds a toolkit whose nvcc is a wrapper script elsewhere.
    """
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME and _has_runtime_headers(cpp_extension.CUDA_HOME):
        return cpp_extension.CUDA_HOME
    nvcc = _nvcc()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    root = Path(top.group(1).strip()).resolve() if top else None
    return str(root) if root and _has_runtime_headers(root) else None


def skip_reason(spec: ExtensionSpec) -> str | None:
    """Why this machine cannot build ``spec`` at all (before trying), or ``None``."""
    missing = [str(s) for s in spec.sources if not s.is_file()]
    if missing:
        return f"source files not found: {', '.join(missing)} (is the repository's csrc/ present?)"
    if spec.kind != "cuda":
        return None
    if torch.version.cuda is None:
        return "this torch is built without CUDA"
    if _nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return "no GPU visible and TORCH_CUDA_ARCH_LIST unset: nothing to build for"
    if cuda_home() is None:
        from torch.utils import cpp_extension

        return (
            f"no CUDA toolkit headers: CUDA_HOME={cpp_extension.CUDA_HOME} has no "
            "include/cuda_runtime_api.h and nvcc reports no root that has "
            "(set CUDA_HOME to the CUDA toolkit's root, e.g. /usr/local/cuda)"
        )
    return None


# --- building and loading ---------------------------------------------------------------


def _summarise(message: str, limit: int = 6) -> str:
    """The compiler's error lines (not the command lines), for a one-line reason."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    # ninja progress, compiler command lines and torch's wrapper are noise
    kept = [ln for ln in lines if not (" -MMD " in ln or " -c " in ln
            or ln.startswith(("[", "FAILED", "ninja:", "Error building")))]
    keys = ("error", "not found", "no such file", "fatal", "cannot")
    errs = [ln for ln in kept if any(k in ln.lower() for k in keys)]
    return " | ".join(errs[:limit] or kept[-limit:] or lines[-limit:])[:1500]


@contextlib.contextmanager
def _build_lock(directory: Path, *, create: bool = True) -> Iterator[None]:
    """Hold an OS lock on ``directory``; clear torch's lock file if a killed build left it.

    torch marks a build with a plain file, ``lock``, that a process killed
    mid-build never removes; every later build of that folder then waits for it
    forever, silently. The OS releases ``flock`` locks when their process dies,
    so whoever holds ours knows that no live build of ours owns a ``lock`` it
    finds. ``create=False`` (loading only): a folder that cannot be locked, such
    as a read-only shared cache, has no build running and is read unlocked.
    """
    handle = None
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".mimac-build-lock", "a")  # noqa: SIM115 -- closed below
    except OSError as exc:
        if create:
            raise ExtensionUnavailable(f"cannot use the build cache {directory} ({exc}); set "
                                       f"{ENV_CACHE} to a writable folder") from exc
    if handle is None or fcntl is None:  # unlockable read-only cache, or not POSIX
        yield
        return
    with handle:  # closing it releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"mimac_kernels: waiting for another process's build in {directory}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            warnings.warn(f"mimac_kernels: removing {stale}, left by a build that was killed "
                          "(it would make this build wait forever)", ExtensionBuildWarning,
                          stacklevel=4)
            stale.unlink(missing_ok=True)
        yield


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _toolchain(spec: ExtensionSpec) -> Iterator[None]:
    """For the build only: ninja on ``PATH`` (pip's ``ninja`` sits next to the
    interpreter, which is not on ``PATH`` when python is run by its path) and
    torch's ``CUDA_HOME`` at a root with headers (torch joins every CUDA path onto it)."""
    from torch.utils import cpp_extension

    path, here = os.environ.get("PATH", ""), str(Path(sys.executable).parent)
    with contextlib.ExitStack() as undo:
        if shutil.which("ninja") is None and Path(here, "ninja").exists():
            os.environ["PATH"] = os.pathsep.join(p for p in (here, path) if p)
            undo.callback(os.environ.__setitem__, "PATH", path)
        if spec.kind == "cuda":
            undo.callback(setattr, cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
            cpp_extension.CUDA_HOME = cuda_home()
        yield


def build(spec: ExtensionSpec, *, verbose: bool = False) -> Extension:
    """Compile ``spec`` (or reuse the cached build) and import it; with
    ``MIMAC_KERNELS_NO_BUILD=1``, import the cached build or fail.

    Raises:
        ExtensionUnavailable: the machine cannot build it, the cache is unusable,
            or compiling or loading failed (the message says why, with the
            compiler's error lines; ``__cause__`` holds the full log).
    """
    why = skip_reason(spec)
    if why is not None:
        raise ExtensionUnavailable(why)
    lib = library_path(spec)
    no_build = os.environ.get(ENV_NO_BUILD, "") not in ("", "0")
    if no_build and not lib.is_file():
        raise ExtensionUnavailable(
            f"{ENV_NO_BUILD}=1 is set and no prebuilt {spec.kind} extension is in {lib.parent} "
            "(run `python -m mimac_kernels.build` where building is allowed)"
        )
    with _build_lock(lib.parent, create=not no_build):  # a load waits for a running build
        if no_build:
            return _import_library(spec, lib)
        if not lib.is_file():
            _say(f"mimac_kernels: building the {spec.kind} kernel extension, once for this "
                 "Python, torch and source (about a minute on 2 cores); later runs load it from "
                 f"{lib.parent}")
        from torch.utils import cpp_extension

        try:
            with _toolchain(spec):
                loaded = cpp_extension.load(
                    name=module_name(spec),
                    sources=[str(s) for s in spec.sources],
                    extra_cflags=list(spec.cflags),
                    extra_cuda_cflags=list(spec.cuda_cflags),
                    extra_ldflags=list(spec.ldflags),
                    extra_include_paths=[str(d) for d in spec.include_dirs or (spec.source_dir,)],
                    build_directory=str(lib.parent),
                    verbose=verbose,
                    with_cuda=spec.kind == "cuda",
                    is_python_module=not spec.ops,
                )
        except Exception as exc:  # compiler missing, compile error, ninja missing, ...
            raise ExtensionUnavailable(
                f"building the {spec.kind} extension failed: {_summarise(str(exc))} "
                "(run `python -m mimac_kernels.build --verbose` for the full compiler output)"
            ) from exc
        return _op_namespace(spec) if spec.ops else loaded


def _import_library(spec: ExtensionSpec, lib: Path) -> Extension:
    """Import a library built earlier; one that does not load is a reason, not a crash."""
    try:
        if spec.ops:
            torch.ops.load_library(str(lib))  # runs its TORCH_LIBRARY registrations
            return _op_namespace(spec)
        found = importlib.util.spec_from_file_location(module_name(spec), lib)
        module = importlib.util.module_from_spec(found)  # type: ignore[arg-type]
        found.loader.exec_module(module)  # type: ignore[union-attr]
    except (ImportError, OSError) as exc:
        raise ExtensionUnavailable(
            f"the prebuilt {spec.kind} extension {lib} does not load ({exc}); rebuild it "
            "with `python -m mimac_kernels.build`"
        ) from exc
    return module


def _op_namespace(spec: ExtensionSpec) -> Extension:
    """``torch.ops.<spec.ops>`` of a loaded operator library, its fake implementations
    registered (they let ``torch.compile`` and ``opcheck`` trace the ops)."""
    from mimac_kernels import extension_fakes

    extension_fakes.register(spec.ops)
    return getattr(torch.ops, spec.ops)


# --- one result per process -------------------------------------------------------------

_LOCK = threading.Lock()
_RESULTS: dict[str, Extension | str] = {}


def load(kind: str) -> Extension:
    """The built extension ``kind`` ("cpu" or "cuda"), built at most once per process: its
    ops namespace, ``torch.ops.mimac_cpu`` or ``torch.ops.mimac_cuda`` (or what
    ``substitute`` put in its place).

    Raises:
        ExtensionUnavailable: with the reason (a failed build is reported once, as an
            ``ExtensionBuildWarning`` with the compiler's output).
    """
    with _LOCK:
        if kind not in _RESULTS:
            _RESULTS[kind] = _try_build(kind)
        result = _RESULTS[kind]
    if isinstance(result, str):
        raise ExtensionUnavailable(result)
    return result


def _try_build(kind: str) -> Extension | str:
    try:
        return build(spec_for(kind))
    except Exception as exc:  # noqa: BLE001 -- a build problem is a reason, never a crash
        expected = isinstance(exc, ExtensionUnavailable)
        reason = str(exc) if expected else f"loading the {kind} extension failed: {exc!r}"
        cause = exc.__cause__ if expected else exc
        if cause is not None:  # a real failure, not "nothing to build for"
            warnings.warn(
                f"mimac_kernels: the {kind} backend is unavailable: {reason}\n"
                f"compiler output (tail):\n{str(cause)[-4000:]}",
                ExtensionBuildWarning,
                stacklevel=3,
            )
        return reason


def unavailable_reason(kind: str) -> str | None:
    """``None`` if extension ``kind`` loads (building it if needed), else why not."""
    try:
        load(kind)
    except ExtensionUnavailable as exc:
        return str(exc)
    return None


def reset() -> None:
    """Forget load results (tests; a later ``load`` tries again)."""
    with _LOCK:
        _RESULTS.clear()


@contextlib.contextmanager
def substitute(kind: str, module: Extension) -> Iterator[Extension]:
    """Inside the block, ``load(kind)`` returns ``module`` (a stand-in build, such as
    the CUDA emulation); the previous result, built or not, is restored after."""
    with _LOCK:
        previous = _RESULTS.get(kind)
        _RESULTS[kind] = module
    try:
        yield module
    finally:
        with _LOCK:
            if previous is None:
                _RESULTS.pop(kind, None)
            else:
                _RESULTS[kind] = previous
