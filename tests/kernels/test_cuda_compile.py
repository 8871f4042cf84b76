"""nvcc compiles the CUDA kernels for sm_80 and sm_90a: no GPU, no CUDA torch needed.

``contrastive_kernels.cu`` includes no torch header precisely so that this
check runs everywhere nvcc does. The ptxas resource report (registers, spills
per kernel and target) is printed; run with ``-s`` to see it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from benchmarks.cuda_compile import CUDA_DIR, KERNELS, TORCH_DEFINES, find_nvcc

TARGETS = ("sm_80", "sm_90a")
NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (no CUDA toolkit): cannot compile the CUDA kernels"
)


def parse_ptxas(log: str) -> list[dict]:
    """One entry per (kernel, target): registers, spill stores/loads, stack bytes."""
    entries, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {
                "kernel": m.group(1),
                "target": m.group(2),
                "registers": None,
                "spill_stores": 0,
                "spill_loads": 0,
                "stack": 0,
            }
            entries.append(current)
            continue
        if current is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return entries


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt:
        return names
    out = subprocess.run(
        [filt], input="\n".join(names), capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return (
        [n.replace("(anonymous namespace)::", "") for n in out] if len(out) == len(names) else names
    )


def test_kernels_include_no_torch_header():
    for path in (KERNELS, CUDA_DIR / "contrastive_kernels.h"):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
        assert not bad, f"{path.name} includes {bad}: it must build without torch"


@needs_nvcc
def test_nvcc_compiles_for_sm80_and_sm90a(tmp_path):
    obj = tmp_path / "contrastive_kernels.o"
    cmd = [NVCC, "-c", str(KERNELS), "-std=c++17", "-O3", *TORCH_DEFINES, "-I", str(CUDA_DIR)]
    for t in TARGETS:
        cmd += ["-gencode", f"arch=compute_{t[3:]},code={t}"]
    cmd += ["-Xptxas", "-v", "-Werror", "all-warnings", "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{log[-6000:]}"
    assert obj.is_file() and obj.stat().st_size > 0

    entries = parse_ptxas(log)
    names = _demangle([e["kernel"] for e in entries])
    print("\nptxas resource report (registers, spills in bytes):")
    for e, name in zip(entries, names):
        print(
            f"  {e['target']:7s} {name:60s} regs {e['registers']:>3}  "
            f"spill st/ld {e['spill_stores']:>3}/{e['spill_loads']:<3} stack {e['stack']}"
        )
    by_target = {t: [e for e in entries if e["target"] == t] for t in TARGETS}
    for t, found in by_target.items():
        # forward and backward x 3 dtypes x 2 critic variants x fast and general path,
        # and the fragment kernels: forward and cross's one-pass forward x 2 16-bit dtypes
        # x 2 critics, backward (bf16) and the wide backward (bf16) x 2 critics x 2
        # temperature modes
        assert len(found) == 24 + 8 + 8, f"{t}: expected 40 kernels, ptxas reported {len(found)}"
        assert all(e["registers"] is not None and e["registers"] <= 255 for e in found)
    spilled = [(e["target"], name, e["spill_stores"], e["spill_loads"])
               for e, name in zip(entries, names) if e["spill_stores"] or e["spill_loads"]]  # fmt: skip
    assert not spilled, f"register spills: {spilled}"
