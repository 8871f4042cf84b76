"""Read SASS: find the loops and count, per warp, what each loop iteration issues.

Input is ``cuobjdump -sass`` text (``/*addr*/  [@pred] OPCODE operands ;``).
A loop is a backward branch: ``BRA`` to an earlier address; its body runs from
the target to the branch. Loops nest by containment. Counts are *per warp*
(every warp of the CTA runs the same instruction stream) and *static*: every
instruction in the body counts once per iteration, also where a forward branch
would skip it or a predicate turns it off, so a body with conditional work
(the ``all`` forward skips its column atomics on the diagonal tile) is
counted as the general iteration.

What one instruction means per warp (``Counts`` fields):

- ``issue``: one issue slot (a warp instruction).
- ``ex2``: ``MUFU.EX2``, 32 lanes of 2^x; ``mufu``: every MUFU (EX2, RCP, LG2, ...).
- ``hgmma``/``hmma``: tensor-core instructions by shape, e.g. ``64x128x16`` for
  ``HGMMA.64x128x16`` (wgmma: one per *warpgroup* of 4 warps, ``m*n*k`` MACs)
  and ``16x8x16`` for ``HMMA.16816`` (mma.sync: per warp); ``tf32_macs``: the
  MACs of those whose inputs are TF32 (half the bf16 rate on sm_90).
- ``atomics``/``atomic_bytes``: global ``RED``/``ATOM`` instructions and their
  bytes if all 32 lanes are active (an upper bound: masked lanes are not seen).
- ``global_bytes``: global loads/stores/``cp.async`` (``LDG``/``STG``/``LDGSTS``)
  likewise per 32 lanes (TMA copies are not counted: none in these kernels);
  ``shared_bytes``: ``LDS``/``STS``/``LDSM``/``STSM`` plus the operands wgmma
  reads from shared memory (B always, A when given by descriptor);
  ``generic_bytes``: generic-address ``LD``/``ST`` (the space is known only at run
  time; in the CUDA kernels every one of them reads or writes shared memory).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"^HMMA\.(\d+)")
_VECTOR = re.compile(r"[A-Z]*?(\d+)x(\d+)")
#: Bytes per lane of a memory access by its size suffix (default: 32-bit).
_SIZES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "16": 2, "U8": 1, "S8": 1, "F64": 8}
LANES = 32
WARPGROUP = 4


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: address, opcode (``MUFU.EX2``) and operand text."""

    addr: int
    opcode: str
    operands: str
    #: Guarded by ``@!PT`` (never true): takes an issue slot, does nothing.
    never: bool = False


def parse(sass_text: str) -> list[Instr]:
    """Instructions of the first kernel in ``sass_text``, in address order.

    Raises ValueError when the text holds no instruction.
    """
    out: list[Instr] = []
    for line in sass_text.splitlines():
        found = _LINE.match(line)
        if found is None:
            continue
        addr = int(found.group(1), 16)
        if out and addr <= out[-1].addr:  # a second function starts: not ours
            break
        text = found.group(2)
        body = _PRED.sub("", text)
        opcode, _, operands = body.partition(" ")
        if opcode.startswith("BRA") and operands.strip() == f"0x{addr:x}":
            break  # the sled after the last EXIT: the end of the function
        out.append(Instr(addr, opcode, operands.strip(), text.startswith("@!PT")))
    if not out:
        raise ValueError("no SASS instruction found (expected cuobjdump -sass output)")
    return out


def _width(opcode: str) -> int:
    """Bytes per lane: ``.128`` -> 16, ``.F32x4`` -> 16, ``.F16x2`` -> 4, plain -> 4."""
    for part in opcode.split(".")[1:]:
        if part in _SIZES:
            return _SIZES[part]
        vec = _VECTOR.fullmatch(part)
        if vec is not None:
            return int(vec.group(1)) // 8 * int(vec.group(2))
    return 4


def _ldsm_bytes(opcode: str) -> int:
    """``LDSM.16.M88.4`` / ``STSM``: four 8x8 matrices of 16-bit values per warp."""
    parts = opcode.split(".")
    count = int(parts[-1]) if parts[-1].isdigit() and len(parts) > 3 else 1
    return 8 * 8 * 2 * count


def _hmma_shape(digits: str) -> tuple[int, int, int]:
    """``16816`` -> (16, 8, 16); ``1688`` -> (16, 8, 8) (m16 n8 kK, Ampere/Hopper mma.sync)."""
    if not digits.startswith("168") or len(digits) < 4:
        raise ValueError(f"unknown HMMA shape {digits!r}")
    return 16, 8, int(digits[3:])


@dataclass
class Counts:
    """Per-warp counts of a stretch of SASS (see the module docstring)."""

    issue: int = 0
    ex2: int = 0
    mufu: int = 0
    hgmma: Counter = field(default_factory=Counter)
    hmma: Counter = field(default_factory=Counter)
    atomics: int = 0
    atomic_bytes: int = 0
    global_bytes: int = 0
    shared_bytes: int = 0
    generic_bytes: int = 0
    barriers: int = 0
    #: Issue slots by opcode family (``FADD``, ``SHFL``, ``MUFU``, ...).
    opcodes: Counter = field(default_factory=Counter)
    #: wgmma MACs counted per warp (a warpgroup's instruction shared by its 4 warps).
    _hgmma_macs_x4: int = 0
    _hmma_macs: int = 0
    _tf32_hgmma_macs_x4: int = 0
    _tf32_hmma_macs: int = 0

    def add(self, ins: Instr, times: int = 1) -> None:
        op = ins.opcode
        self.issue += times
        self.opcodes[op.split(".")[0]] += times
        if ins.never:
            return
        if op.startswith("MUFU"):
            self.mufu += times
            self.ex2 += times if op.startswith("MUFU.EX2") else 0
        elif (g := _HGMMA.match(op)) is not None:
            m, n, k = (int(x) for x in g.groups())
            self.hgmma[f"{m}x{n}x{k}"] += times
            self._hgmma_macs_x4 += m * n * k * times
            self._tf32_hgmma_macs_x4 += m * n * k * times if ".TF32" in op else 0
            a_from_shared = ins.operands.split(",")[1].strip().startswith("gdesc")
            dsize = 4 if ".TF32" in op else (1 if ".E4M3" in op or ".E5M2" in op else 2)
            shared = (n * k + (m * k if a_from_shared else 0)) * dsize
            self.shared_bytes += shared * times // WARPGROUP
        elif (h := _HMMA.match(op)) is not None:
            m, n, k = _hmma_shape(h.group(1))
            self.hmma[f"{m}x{n}x{k}"] += times
            self._hmma_macs += m * n * k * times
            self._tf32_hmma_macs += m * n * k * times if ".TF32" in op else 0
        elif op.startswith(("RED", "ATOM")) and not op.startswith(("ATOMS", "REDUX")):
            self.atomics += times  # REDUX is a warp reduction, ATOMS a shared-memory atomic
            self.atomic_bytes += LANES * _width(op) * times
        elif op.startswith(("LDG", "STG")) and not op.startswith("LDGDEPBAR"):
            self.global_bytes += LANES * _width(op) * times
        elif op.startswith(("LDSM", "STSM")):
            self.shared_bytes += _ldsm_bytes(op) * times
        elif op.startswith(("LDS", "STS", "ATOMS")):
            self.shared_bytes += LANES * _width(op) * times
        elif op.split(".")[0] in ("LD", "ST"):
            self.generic_bytes += LANES * _width(op) * times
        elif op.startswith("BAR"):
            self.barriers += times

    def merge(self, other: Counts, times: int = 1) -> None:
        """Add ``times`` x ``other`` into these counts."""
        for name in ("issue", "ex2", "mufu", "atomics", "atomic_bytes", "global_bytes",
                     "shared_bytes", "generic_bytes", "barriers", "_hgmma_macs_x4",
                     "_hmma_macs", "_tf32_hgmma_macs_x4", "_tf32_hmma_macs"):  # fmt: skip
            setattr(self, name, getattr(self, name) + times * getattr(other, name))
        for key, value in other.hgmma.items():
            self.hgmma[key] += times * value
        for key, value in other.hmma.items():
            self.hmma[key] += times * value
        for key, value in other.opcodes.items():
            self.opcodes[key] += times * value

    def macs_per_cta(self, num_warps: int) -> int:
        """Tensor-core multiply-adds of the whole CTA (wgmma per warpgroup, mma.sync per warp)."""
        return self._hgmma_macs_x4 * num_warps // WARPGROUP + self._hmma_macs * num_warps

    def tf32_macs_per_cta(self, num_warps: int) -> int:
        """The part of :meth:`macs_per_cta` with TF32 inputs."""
        return (self._tf32_hgmma_macs_x4 * num_warps // WARPGROUP
                + self._tf32_hmma_macs * num_warps)  # fmt: skip

    def to_dict(self, num_warps: int) -> dict:
        return {
            "issue": self.issue, "mufu_ex2": self.ex2, "mufu_all": self.mufu,
            "hgmma": dict(self.hgmma), "hmma": dict(self.hmma), "atomics": self.atomics,
            "atomic_bytes": self.atomic_bytes, "global_bytes": self.global_bytes,
            "shared_bytes": self.shared_bytes, "generic_bytes": self.generic_bytes,
            "barriers": self.barriers, "tensor_macs_per_cta": self.macs_per_cta(num_warps),
            "tensor_tf32_macs_per_cta": self.tf32_macs_per_cta(num_warps),
            "opcodes": dict(self.opcodes.most_common()),
        }  # fmt: skip


@dataclass
class Loop:
    """A loop: body addresses ``[start, end]`` (end = the backward branch), inner loops."""

    start: int
    end: int
    inner: list[Loop] = field(default_factory=list)

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and other is not self


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Top-level loops (inner ones nested in ``Loop.inner``), in address order.

    Backward branches to the same target are one loop ending at the last of
    them; a branch to itself (the trailing ``BRA`` sled) is not a loop.
    """
    ends: dict[int, int] = {}
    for ins in instrs:
        if not ins.opcode.startswith("BRA"):
            continue
        found = _TARGET.search(ins.operands)
        if found is None:
            continue
        target = int(found.group(1), 16)
        if target < ins.addr:
            ends[target] = max(ends.get(target, 0), ins.addr)
    loops = sorted((Loop(s, e) for s, e in ends.items()), key=lambda lp: (lp.start, -lp.end))
    top: list[Loop] = []
    for lp in loops:  # outer loops come first: same or earlier start, later end
        parent = None
        for cand in _walk(top):
            if cand.contains(lp):
                parent = cand  # the innermost container wins (walk goes outer to inner)
        (parent.inner if parent else top).append(lp)
    return top


def _walk(loops: list[Loop]):
    for lp in loops:
        yield lp
        yield from _walk(lp.inner)


def count_range(instrs: list[Instr], start: int, end: int, skip: list[Loop] = ()) -> Counts:
    """Counts of the instructions at addresses ``[start, end]`` outside the ``skip`` loops."""
    out = Counts()
    for ins in instrs:
        if start <= ins.addr <= end and not any(s.start <= ins.addr <= s.end for s in skip):
            out.add(ins)
    return out


def iteration_counts(instrs: list[Instr], loop: Loop, inner_trips: list[int]) -> Counts:
    """Counts of one iteration of ``loop``, its inner loops run ``inner_trips`` times each.

    ``inner_trips`` follows ``loop.inner``'s order (address order); an inner loop
    that has inner loops of its own is not supported (ValueError).
    """
    if len(inner_trips) != len(loop.inner):
        raise ValueError(f"{len(loop.inner)} inner loops but {len(inner_trips)} trip counts")
    out = count_range(instrs, loop.start, loop.end, loop.inner)
    for inner, trips in zip(loop.inner, inner_trips):
        if inner.inner:
            raise ValueError("loops nested three deep are not supported")
        out.merge(count_range(instrs, inner.start, inner.end), trips)
    return out


def nested_counts(instrs: list[Instr], loop: Loop, trips) -> Counts:
    """Counts of one iteration of ``loop``, at any depth of nesting: each inner loop's
    own iteration (:func:`nested_counts` of it) times ``trips(inner, counts, parent)``,
    a callable given the inner loop, its one-iteration counts and the loop holding it.
    """
    out = count_range(instrs, loop.start, loop.end, loop.inner)
    for inner in loop.inner:
        body = nested_counts(instrs, inner, trips)
        out.merge(body, trips(inner, body, loop))
    return out


def outside_counts(instrs: list[Instr], loops: list[Loop]) -> Counts:
    """Counts of everything outside ``loops`` (run once per program)."""
    return count_range(instrs, 0, instrs[-1].addr, loops)
