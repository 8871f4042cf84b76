"""Build the C++/CUDA extensions in ``csrc/`` on first use and load them.

``torch.utils.cpp_extension.load`` compiles with ninja into a cache directory
keyed by Python, torch and CUDA versions, the target (CPU machine or GPU
architectures) and a hash of the sources and flags, so a build happens once per
machine image and is reused by every later process. ``MIMAC_KERNELS_CACHE``
moves the cache (default ``~/.cache/mimac_kernels``);
``MIMAC_KERNELS_NO_BUILD=1`` forbids compiling (a prebuilt extension from
``python -m mimac_kernels.build`` is still loaded).

Nothing here runs at import time. A missing compiler or a failed build is
reported once, as an ``ExtensionBuildWarning`` carrying the compiler's message,
and the backend's ``unavailable_reason`` returns the reason, so dispatch falls
back and no import ever fails because of it.

Example:
    >>> from mimac_kernels import extension
    >>> extension.spec_for("cpu").name
    'mimac_kernels_cpu'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
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
from types import ModuleType

import torch

logger = logging.getLogger("mimac_kernels")

#: Repository folder holding the C++/CUDA sources.
CSRC = Path(__file__).resolve().parent.parent / "csrc"
ENV_CACHE = "MIMAC_KERNELS_CACHE"
ENV_NO_BUILD = "MIMAC_KERNELS_NO_BUILD"
KINDS = ("cpu", "cuda")
#: Bumped when the way extensions are built changes (invalidates every cache entry).
BUILD_SCHEMA = "1"
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


def _openmp_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # GCC on Linux: -fopenmp links libgomp.so.1, the runtime torch already loaded
    # (same soname), so our threads and torch's share one pool.
    if sys.platform.startswith("linux"):
        return ("-fopenmp",), ("-fopenmp",)
    return (), ()


def cpu_spec(csrc: Path = CSRC) -> ExtensionSpec:
    """The fused CPU kernel. No ``-march=native``: the tile kernels are compiled
    for AVX-512, AVX2 and the baseline and picked at run time, so a cached build
    runs on any x86-64 machine."""
    omp_c, omp_l = _openmp_flags()
    src = csrc / "cpu"
    return ExtensionSpec(
        kind="cpu",
        name="mimac_kernels_cpu",
        source_dir=src,
        sources=(src / "contrastive.cpp",),
        cflags=("-O3", "-ffp-contract=fast", *omp_c),
        ldflags=omp_l,
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
    )


def spec_for(kind: str) -> ExtensionSpec:
    if kind == "cpu":
        return cpu_spec()
    if kind == "cuda":
        return cuda_spec()
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def cache_root() -> Path:
    """Where builds go: ``$MIMAC_KERNELS_CACHE`` or ``~/.cache/mimac_kernels``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimac_kernels"


def source_hash(spec: ExtensionSpec) -> str:
    """Hash of every source/header file in ``spec.source_dir`` and of the flags."""
    h = hashlib.sha256()
    h.update(f"{BUILD_SCHEMA}|{spec.name}|{spec.cflags}|{spec.cuda_cflags}|{spec.ldflags}".encode())
    files = sorted(p for p in spec.source_dir.rglob("*") if p.suffix in _SOURCE_SUFFIXES)
    for p in (*files, *(s for s in spec.sources if s not in files)):
        h.update(
            str(p.relative_to(spec.source_dir) if p.is_relative_to(spec.source_dir) else p).encode()
        )
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
    return h.hexdigest()[:16]


def cuda_arch_tag() -> str:
    """GPU architectures the CUDA build targets: ``TORCH_CUDA_ARCH_LIST`` or the visible GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return "arch" + "-".join(env.replace(";", " ").replace("+PTX", "ptx").split())
    if torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        return "sm" + "-".join(f"{a}{b}" for a, b in caps)
    return "nogpu"


def build_directory(spec: ExtensionSpec) -> Path:
    """Cache folder of this spec for this Python, torch, CUDA, target and source checkout.

    The checkout's location is part of the key because ninja's build file names the
    sources by absolute path: two checkouts sharing a folder would rebuild each other.
    """
    target = cuda_arch_tag() if spec.kind == "cuda" else platform.machine()
    where = hashlib.sha256(str(spec.source_dir.resolve()).encode()).hexdigest()[:8]
    key = "-".join(
        (
            spec.name,
            sys.implementation.cache_tag or "py",
            "torch" + torch.__version__,
            "cu" + (torch.version.cuda or "none"),
            target,
            source_hash(spec),
            "at" + where,
        )
    )
    return cache_root() / key.replace("+", "_").replace("/", "_")


def module_name(spec: ExtensionSpec) -> str:
    """The extension's module name, unique per cache folder: torch renames a module
    built again in one process from other sources (``name_v1``), which a later process
    would not find under the plain name."""
    digest = hashlib.sha256(build_directory(spec).name.encode()).hexdigest()[:12]
    return f"{spec.name}_{digest}"


def library_path(spec: ExtensionSpec) -> Path:
    """The shared library the build produces."""
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    return build_directory(spec) / f"{module_name(spec)}{suffix}"


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

    home = cpp_extension.CUDA_HOME
    if home and _has_runtime_headers(home):
        return home
    nvcc = _nvcc()
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "mimac_probe.cu"], capture_output=True, text=True, timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if top is None:
        return None
    root = Path(top.group(1).strip()).resolve()
    return str(root) if _has_runtime_headers(root) else None


def skip_reason(spec: ExtensionSpec) -> str | None:
    """Why this machine cannot build ``spec`` at all (before trying), or ``None``."""
    missing = [str(s) for s in spec.sources if not s.is_file()]
    if missing:
        return f"source files not found: {', '.join(missing)} (is the repository's csrc/ present?)"
    if spec.kind == "cuda":
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


def _ensure_ninja() -> None:
    # torch looks for a `ninja` executable on PATH; the pip package `ninja` puts
    # one next to the interpreter, which is not on PATH when python is run by path.
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]

        bin_dir = getattr(ninja, "BIN_DIR", None)
    except ImportError:
        bin_dir = None
    for cand in (bin_dir, str(Path(sys.executable).parent)):
        if cand and Path(cand, "ninja").exists():
            os.environ["PATH"] = cand + os.pathsep + os.environ.get("PATH", "")
            return


def _summarise(message: str, limit: int = 6) -> str:
    """The compiler's error lines (not the command lines), for a one-line reason."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]

    def is_noise(ln: str) -> bool:  # ninja progress, compiler command lines, torch's wrapper
        return (
            " -MMD " in ln
            or " -c " in ln
            or ln.startswith(("[", "FAILED", "ninja:", "Error building"))
        )

    keys = ("error", "not found", "no such file", "fatal", "cannot")
    errs = [ln for ln in lines if not is_noise(ln) and any(k in ln.lower() for k in keys)]
    picked = errs[:limit] or [ln for ln in lines if not is_noise(ln)][-limit:] or lines[-limit:]
    return " | ".join(picked)[:1500]


def _import_library(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    if spec is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build(spec: ExtensionSpec, *, verbose: bool = False) -> ModuleType:
    """Compile ``spec`` (or reuse the cached build) and import it.

    Raises:
        ExtensionUnavailable: the machine cannot build it, or compiling failed
            (the message holds the compiler's errors; ``__cause__`` the full log).
    """
    why = skip_reason(spec)
    if why is not None:
        raise ExtensionUnavailable(why)
    lib = library_path(spec)
    if os.environ.get(ENV_NO_BUILD, "") not in ("", "0"):
        return _load_prebuilt(spec, lib)
    from torch.utils import cpp_extension

    _ensure_ninja()
    if spec.kind == "cuda":
        # torch joins every CUDA path onto this module global; point it at a root with headers.
        cpp_extension.CUDA_HOME = cuda_home()
    with contextlib.ExitStack() as stack:
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_build_lock(lib.parent))
        except OSError as exc:  # a read-only or missing cache location
            raise ExtensionUnavailable(
                f"cannot use the build cache {lib.parent} ({exc}); set {ENV_CACHE} to a "
                "writable folder"
            ) from exc
        try:
            return cpp_extension.load(
                name=module_name(spec),
                sources=[str(s) for s in spec.sources],
                extra_cflags=list(spec.cflags),
                extra_cuda_cflags=list(spec.cuda_cflags) or None,
                extra_ldflags=list(spec.ldflags) or None,
                extra_include_paths=[str(d) for d in spec.include_dirs or (spec.source_dir,)],
                build_directory=str(lib.parent),
                verbose=verbose,
                with_cuda=spec.kind == "cuda",
            )
        except Exception as exc:  # compiler missing, compile error, ninja missing, ...
            raise ExtensionUnavailable(
                f"building the {spec.kind} extension failed: {_summarise(str(exc))} "
                "(run `python -m mimac_kernels.build --verbose` for the full compiler output)"
            ) from exc


def _load_prebuilt(spec: ExtensionSpec, lib: Path) -> ModuleType:
    """Import a library built earlier (``MIMAC_KERNELS_NO_BUILD=1``), waiting for a build
    of it that is still running; a missing or unloadable file is a reason, not a crash."""
    if not lib.is_file():
        raise ExtensionUnavailable(
            f"{ENV_NO_BUILD}=1 is set and no prebuilt {spec.kind} extension is in {lib.parent} "
            "(run `python -m mimac_kernels.build` where building is allowed)"
        )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_build_lock(lib.parent))
        except OSError:  # a read-only shared cache: no build can be writing to it
            pass
        try:
            return _import_library(module_name(spec), lib)
        except (ImportError, OSError) as exc:
            raise ExtensionUnavailable(
                f"the prebuilt {spec.kind} extension {lib} does not load ({exc}); rebuild it "
                "with `python -m mimac_kernels.build`"
            ) from exc


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold an OS lock on ``directory`` for a build, and clear torch's lock file if a
    killed build left it.

    torch marks a build with a plain file, ``lock``, that a process killed
    mid-build never removes; every later build of that folder then waits for it
    forever, silently. The OS releases ``flock`` locks when their process dies,
    so whoever holds ours knows that no live mimac build owns a ``lock`` it finds.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        yield
        return
    with open(directory / ".mimac-build-lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("mimac_kernels: waiting for another process's build in %s", directory)
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            warnings.warn(
                f"mimac_kernels: removing {stale}, left by a build that was killed "
                "(it would make this build wait forever)",
                ExtensionBuildWarning,
                stacklevel=4,
            )
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_LOCK = threading.Lock()
_RESULTS: dict[str, ModuleType | str] = {}


def load(kind: str) -> ModuleType:
    """The built extension ``kind`` ("cpu" or "cuda"), built at most once per process.

    Raises:
        ExtensionUnavailable: with the reason (reported once as a warning).
    """
    with _LOCK:
        if kind not in _RESULTS:
            _RESULTS[kind] = _try_build(kind)
        result = _RESULTS[kind]
    if isinstance(result, str):
        raise ExtensionUnavailable(result)
    return result


def _try_build(kind: str) -> ModuleType | str:
    spec = spec_for(kind)
    try:
        module = build(spec)
    except Exception as exc:  # noqa: BLE001 -- a build problem is a reason, never a crash
        expected = isinstance(exc, ExtensionUnavailable)
        reason = str(exc) if expected else f"loading the {kind} extension failed: {exc!r}"
        cause = exc.__cause__ if expected else exc
        if cause is not None:  # a real failure, not "nothing to build for"
            full = str(cause)
            warnings.warn(
                f"mimac_kernels: the {kind} backend is unavailable: {reason}\n"
                f"compiler output (tail):\n{full[-4000:]}",
                ExtensionBuildWarning,
                stacklevel=3,
            )
        else:
            logger.debug("mimac_kernels: %s extension not built: %s", kind, reason)
        return reason
    logger.debug("mimac_kernels: loaded %s extension from %s", kind, library_path(spec).parent)
    return module


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
def substitute(kind: str, module: ModuleType) -> Iterator[ModuleType]:
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
