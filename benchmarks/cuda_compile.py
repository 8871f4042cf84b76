"""Compile the CUDA C++ kernels offline for sm_90a and read their SASS (no GPU, no torch).

``nvcc -cubin -arch=sm_90a`` compiles ``csrc/cuda/contrastive_kernels.cu`` with
the flags torch's extension build passes (:data:`TORCH_DEFINES`); ``cuobjdump``
(Triton's copy, else one on PATH: the CUDA toolkit here ships none) prints the
SASS of every kernel and its registers. The launch constants (rows per CTA,
tile width, D chunk, shared memory per kernel) are read from the source itself:
a host program that includes the ``.cu`` prints them (:func:`kernel_constants`).
Nothing here imports Triton, so it is safe under ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNELS = CUDA_DIR / "contrastive_kernels.cu"
#: torch's extension builds pass these to nvcc: the kernels must not rely on
#: implicit half/bfloat16 conversions or operators.
TORCH_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)
#: What the static model compiles for: Hopper with its architecture-specific features.
ARCH = "sm_90a"
#: The element names of the launcher's dtypes and their C++ types (mangled spelling).
CXX_TYPES = {"fp32": "f", "fp16": "6__half", "bf16": "13__nv_bfloat16"}

_PROBE_MAIN = r"""
#include "contrastive_kernels.cu"
#include <cstdio>
// The fast path's shared memory: base bytes (all but the resident X), X row padding,
// elements per 16-byte vector.
template <typename T>
void print_fast(const char* name, const char* end) {
  std::printf("\"%s\": {\"fwd_base\": %zu, \"bwd_base\": %zu, \"x_pad\": %d, \"vec\": %d}%s",
              name, fwd_smem<T, true>(KC) - x_bytes<T>(KC), bwd_smem<T, true>(KC) - x_bytes<T>(KC),
              static_cast<int>(x_ld<T>(KC) - KC), vec_elems<T>(), end);
}
// The fragment kernels' shared memory at D = KC and D = 8 KC.
template <typename T>
void print_frag(const char* name, const char* end) {
  std::printf("\"%s\": {\"fwd\": {\"%d\": %zu, \"%d\": %zu}, "
              "\"bwd\": {\"%d\": %zu, \"%d\": %zu}}%s",
              name, KC, fwd_frag_smem<T>(KC), 8 * KC, fwd_frag_smem<T>(8 * KC), KC,
              bwd_frag_smem<T>(KC), 8 * KC, bwd_frag_smem<T>(8 * KC), end);
}
int main() {
  std::printf("{\"BM\": %d, \"BN\": %d, \"KC\": %d, \"DO\": %d, \"NT\": %d, ", BM, BN, KC, DO, NT);
  std::printf("\"fwd_smem\": {\"fp32\": %zu, \"fp16\": %zu, \"bf16\": %zu}, ",
              fwd_smem<float>(), fwd_smem<__half>(), fwd_smem<__nv_bfloat16>());
  std::printf("\"bwd_smem\": {\"fp32\": %zu, \"fp16\": %zu, \"bf16\": %zu}, ",
              bwd_smem<float>(), bwd_smem<__half>(), bwd_smem<__nv_bfloat16>());
  std::printf("\"exp_window\": %.9g, \"exp_factor_max\": %.9g, ", kExpWindow, kExpFactorMax);
  std::printf("\"sum_window\": [%.17g, %.17g], ", kSumLow, kSumHigh);
  std::printf("\"shift_rule\": [%.17g, %.17g], ", MIMAC_SHIFT_HEADROOM, MIMAC_SHIFT_LEVEL);
  std::printf("\"x_resident_max\": %zu, \"fast\": {", kXResidentMax);
  print_fast<float>("fp32", ", ");
  print_fast<__half>("fp16", ", ");
  print_fast<__nv_bfloat16>("bf16", "}, ");
  // The fragment kernels (16-bit inputs on the fast path): threads per CTA, the
  // backward's fixed statistics bytes ahead of the tiles, and their shared memory at
  // two widths (the Python rule is checked against these).
  std::printf("\"RNT\": %d, \"frag_stats\": %zu, \"frag_smem\": {", RNT, kFragStats);
  print_frag<__half>("fp16", ", ");
  print_frag<__nv_bfloat16>("bf16", "}, ");
  // The wide backward (bf16, staged width WS x DO): threads, D slices, quarter width and
  // its shared memory at that width.
  std::printf("\"WNT\": %d, \"WS\": %d, \"WQ\": %d, \"wide_smem\": %zu}\n", WNT, WS, WQ,
              bwd_wide_smem<__nv_bfloat16>(WS * DO));
  return 0;
}
"""


def find_nvcc() -> str | None:
    """``nvcc`` on PATH, else under ``CUDA_HOME``/``CUDA_PATH``/``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return None


def nvidia_tool(name: str) -> Path:
    """Path of ``cuobjdump``/``nvdisasm``: Triton's own copy, else the one on PATH.

    Finds Triton's package without importing it.
    """
    spec = importlib.util.find_spec("triton")
    for base in (spec.submodule_search_locations or []) if spec else []:
        own = Path(base) / "backends" / "nvidia" / "bin" / name
        if own.exists():
            return own
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither in triton's package nor on PATH")
    return Path(found)


def _nvcc_or_raise() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (no CUDA toolkit): cannot compile the CUDA kernels")
    return nvcc


def _cache_dir(source: Path) -> Path:
    """A temp folder keyed by the source, the headers beside it and the target."""
    h = hashlib.sha256(source.read_bytes() + ARCH.encode())
    for header in sorted(source.parent.glob("*.h")) + sorted(source.parent.glob("*.cuh")):
        h.update(header.read_bytes())
    digest = h.hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"mimac-cuda-static-{os.getuid()}" / digest
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def compile_cubin(source: Path = KERNELS, arch: str = ARCH, form: int | None = None) -> Path:
    """``nvcc -cubin -arch=<arch>`` of ``source`` (every kernel template the launchers
    instantiate), cached by the source's content for this machine's temp folder, one
    cubin per ``form``.

    ``form``: ``-DMIMAC_COST_FORM=<form>`` (the fragment kernels' per-tile branch fixed
    at compile time, see the source: 1 the interior tiles' pass with the backward in its
    one-exponential form, 2 the exact two-exponential pass everywhere); ``None``: the
    build that runs.
    """
    if form not in (None, 1, 2):
        raise ValueError(f"form must be None, 1 or 2, got {form!r}")
    tag = "" if form is None else f"-form{form}"
    out = _cache_dir(source) / f"{source.stem}-{arch}{tag}.cubin"
    if not out.exists():
        tmp = out.with_suffix(".tmp.cubin")
        defines = [] if form is None else [f"-DMIMAC_COST_FORM={form}"]
        _run([_nvcc_or_raise(), "-cubin", f"-arch={arch}", "-std=c++17", "-O3", *TORCH_DEFINES,
              *defines, "-I", str(source.parent), str(source), "-o", str(tmp)],
             "nvcc -cubin")  # fmt: skip
        tmp.replace(out)
    return out


@lru_cache(maxsize=4)
def kernel_constants(source: Path = KERNELS) -> dict:
    """The launch constants of ``source`` as its own code computes them: ``BM`` (rows per
    CTA), ``BN`` (columns per tile), ``KC`` (D chunk of the score GEMM), ``DO`` (D slice
    of the backward's output), ``NT`` (threads per CTA), the general path's dynamic shared
    memory ``fwd_smem``/``bwd_smem`` per dtype, and the fast path's: ``fast[dtype]``
    (``fwd_base``/``bwd_base`` bytes besides the resident X, its row padding ``x_pad``,
    elements per 16-byte vector ``vec``) with the resident X's limit ``x_resident_max``;
    the backward's one-exponential window ``exp_window`` and factor bound
    ``exp_factor_max``; cross's one-pass window of its shifted sums ``sum_window`` and its
    shift's ``shift_rule`` (headroom below the bound, level); the
    fragment kernels' threads per CTA ``RNT``, the backward's statistics bytes ahead of
    its tiles ``frag_stats`` and their shared memory at two widths, ``frag_smem[dtype]["fwd"|"bwd"][str(d)]`` (``cuda_launches.frag_smem`` is
    checked against them); the wide backward's threads ``WNT``, D slices ``WS``, quarter
    tile ``WQ`` and shared memory ``wide_smem`` (bf16, its one width ``WS * DO``). A host
    program (PTX only, no ptxas) prints them.
    """
    cache = _cache_dir(source)
    probe = hashlib.sha256(_PROBE_MAIN.encode()).hexdigest()[:8]  # the probe's own edits too
    found = cache / f"constants-{probe}.json"
    if not found.exists():
        main = cache / "constants_probe.cu"
        main.write_text(_PROBE_MAIN.replace("contrastive_kernels.cu", source.name))
        exe = cache / "constants_probe"
        _run([_nvcc_or_raise(), "-std=c++17", *TORCH_DEFINES, "-I", str(source.parent),
              "-gencode", "arch=compute_90a,code=compute_90a", str(main), "-o", str(exe)],
             "nvcc (constants probe)")  # fmt: skip
        found.write_text(_run([str(exe)], "constants probe"))
    return json.loads(found.read_text())


def _cuobjdump(cubin: Path, *flags: str) -> str:
    return _run([str(nvidia_tool("cuobjdump")), *flags, str(cubin)], "cuobjdump")


def sass_functions(cubin: Path) -> dict[str, str]:
    """Each kernel's SASS (cuobjdump's text from its ``Function :`` line on), by mangled name."""
    text = _cuobjdump(cubin, "-sass")
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def resource_usage(cubin: Path) -> dict[str, dict[str, int]]:
    """Registers, stack, local (spill) and static shared bytes of each kernel, by mangled name."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    out = {}
    for found in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                             text):  # fmt: skip
        name, reg, stack, shared, local = found.groups()
        out[name] = {"registers": int(reg), "stack": int(stack), "static_shared": int(shared),
                     "local": int(local)}  # fmt: skip
    if not out:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text[-2000:]}")
    return out


def kernel_symbol(names: list[str], kernel: str, dtype: str, critic: int,
                  split: bool | None = None, fast: bool = True,
                  tau: int | None = None) -> str:  # fmt: skip
    """The one mangled name among ``names`` of ``kernel<T, critic[, split], fast>`` or of a
    fragment kernel, ``lse_forward_frag_kernel<T, critic>``,
    ``lse_cross_frag_kernel<T, critic>``, ``lse_backward_frag_kernel<T, critic, tau>`` or
    ``lse_backward_wide_kernel<T, critic, tau>``.

    ``kernel``: ``lse_forward_kernel``, ``lse_backward_kernel`` or either ``*_frag_kernel``;
    ``dtype``: a key of :data:`CXX_TYPES`; ``split``: the backward's 3xTF32 flag (``None``
    for the forward); ``fast``: the fast path (16-byte vector staging, resident X) or the
    general one; ``tau``: the fragment backward's ``Pass::tau_mode`` (its third template
    argument; ``split`` and ``fast`` do not apply to the fragment kernels).
    Raises LookupError unless exactly one name matches.
    """
    args = f"I{CXX_TYPES[dtype]}Li{critic}E"
    if kernel.endswith(("_frag_kernel", "_wide_kernel")):
        if (tau is None) == kernel.startswith("lse_backward"):
            raise ValueError(f"{kernel}: tau is the backward's template argument, got {tau!r}")
        args += "" if tau is None else f"Li{tau}E"
    else:
        args += ("" if split is None else f"Lb{int(split)}E") + f"Lb{int(fast)}E"
    want = f"{len(kernel)}{kernel}{args}E"
    hits = [n for n in names if want in n]
    if len(hits) != 1:
        raise LookupError(f"{kernel}<{dtype}, {critic}, {split}, {tau}>: {len(hits)} symbols "
                          f"match {want!r} among {len(names)}")  # fmt: skip
    return hits[0]
