"""Compile ``@triton.jit`` kernels offline for sm_90 exactly as the JIT specialises them.

No GPU needed: Triton compiles with its own ``ptxas``, and the ``cuobjdump`` its
package carries reads the cubin (SASS, registers, spills). The JIT adds
``tt.divisibility=16`` to every pointer whose address is a multiple of 16 (all
fresh torch allocations) and to every integer argument that is a multiple of
16, and turns an integer argument equal to 1 into a constant. Compiling
without those hints gives another kernel (scalar loads, no ``cp.async``
pipelining, less shared memory), so every offline compile here goes through
:func:`specialise`.

Import this module before anything imports ``triton``: ``TRITON_INTERPRET`` is
removed here (the interpreter cannot compile).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

from benchmarks.cuda_compile import nvidia_tool

#: Shared memory per block on sm_90 (227 KiB opt-in).
SM90_SHARED = 227 * 1024
#: Alignment the JIT tests for a ``tt.divisibility=16`` hint.
DIVISOR = 16


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: element type in Triton's spelling (``bf16``, ``fp32``, ...).

    ``aligned``: the address is a multiple of 16 bytes (true of every fresh torch
    allocation, whose base is 256-byte aligned).
    """

    dtype: str
    aligned: bool = True


def specialise(fn, args: dict[str, object]) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource``, as the JIT would build them.

    ``args`` maps every parameter of ``fn`` to its launch value: a :class:`Ptr`,
    a Python int or float, or (for ``tl.constexpr`` parameters) the constant.
    Rules (Triton's ``specialize_impl``): constexpr parameters are constants;
    an int equal to 1 becomes the constant 1; an int that is a multiple of 16
    gets ``tt.divisibility=16``, as does an aligned pointer; ints outside int32
    are ``i64``; floats are ``fp32``. Raises ValueError for a missing or unknown
    argument.
    """
    names = list(fn.arg_names)
    missing = [n for n in names if n not in args]
    unknown = [n for n in args if n not in names]
    if missing or unknown:
        raise ValueError(f"args must name every parameter of {fn.__name__}: "
                         f"missing {missing}, unknown {unknown}")  # fmt: skip
    const_params = {p.name for p in fn.params if p.is_constexpr}
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(names):
        value = args[name]
        hinted = False
        if name in const_params:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, Ptr):
            signature[name], hinted = f"*{value.dtype}", value.aligned
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"argument {name} must be a Ptr, int or float, got {value!r}")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            hinted = value % DIVISOR == 0
        if hinted:
            attrs[(i,)] = [["tt.divisibility", DIVISOR]]
    return signature, constexprs, attrs


def compile_kernel(
    fn, args: dict[str, object], num_warps: int, num_stages: int, capability: int = 90
) -> triton.compiler.CompiledKernel:
    """Compile ``fn`` for ``sm_<capability>`` with the JIT's specialisation of ``args``.

    Raises ImportError on a Triton whose offline API differs (``ASTSource``
    without ``constexprs``/``attrs``: Triton older than 3.3).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params or "attrs" not in params:
        raise ImportError(
            f"triton {triton.__version__}: ASTSource has no constexprs/attrs (needs >= 3.3)"
        )
    signature, constexprs, attrs = specialise(fn, args)
    return triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def _cuobjdump(compiled: triton.compiler.CompiledKernel, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run(
            [str(nvidia_tool("cuobjdump")), *flags, f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip


def sass(compiled: triton.compiler.CompiledKernel) -> str:
    """The cubin's SASS as ``cuobjdump -sass`` prints it (one ``/*addr*/ instr ;`` a line)."""
    return _cuobjdump(compiled, "-sass")


def resource_usage(compiled: triton.compiler.CompiledKernel) -> dict[str, int]:
    """Registers, stack and local (spill) bytes from cuobjdump, shared bytes from Triton."""
    out = _cuobjdump(compiled, "--dump-resource-usage")
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", out, re.DOTALL)
    if found is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    reg, stack, local = (int(g) for g in found.groups())
    return {"registers": reg, "stack": stack, "local": local, "shared": compiled.metadata.shared}


def warps_per_cta(ttgir: str) -> list[list[int]]:
    """Every distinct ``warpsPerCTA`` of the TTGIR's layouts, in order of appearance."""
    seen: list[list[int]] = []
    for found in re.finditer(r"warpsPerCTA = \[([0-9, ]+)\]", ttgir):
        value = [int(x) for x in found.group(1).split(",")]
        if value not in seen:
            seen.append(value)
    return seen
