"""The measured choice between the GPU backends: (capability, dtype, D range) -> backend.

``backend="auto"`` on CUDA tries ``dispatch``'s default order (triton, cuda, torch).
Where this table has an entry for the inputs' GPU (its compute capability), dtype and
feature width D, that entry's backend is tried first instead, and the others follow in
the default order, so a backend that refuses the inputs (heads, capability, a failed
build) still falls through to the next one. The table is measured, never guessed: the
GPU quick check (``benchmarks/quick_check.py``) times both GPU backends on each headline
case and writes ``dispatch_table.json`` beside its results with ``table_from_timings``;
its entries are then committed in ``mimac_kernels/dispatch_table.json``. Until a GPU
has timed both backends that file has no entries and the default order stands.

File format (JSON)::

    {"entries": [{"capability": [9, 0], "dtype": "bfloat16", "d_min": 1, "d_max": 128,
                  "backend": "cuda", "ms": {"triton": 4.1, "cuda": 3.2},
                  "source": "quick_check 2026-12-04 H100 commit abc1234"}]}

``d_min``/``d_max`` are inclusive; ``ms`` and ``source`` are the evidence (not read by
dispatch). Example:
    >>> lookup((9, 0), "bfloat16", 128, entries=(
    ...     Entry((9, 0), "bfloat16", 1, 128, "cuda"),))
    'cuda'
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: The committed table.
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
#: Backends an entry may name (those ``auto`` tries on CUDA before the torch fallback).
GPU_BACKENDS = ("triton", "cuda")
#: ``auto``'s first GPU backend keeps its place unless another is faster by more than
#: this fraction (a timing's noise must not flip the choice).
DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class Entry:
    """One row: on GPUs of ``capability``, ``dtype`` inputs of width D in
    ``[d_min, d_max]`` run fastest on ``backend``."""

    capability: tuple[int, int]
    dtype: str
    d_min: int
    d_max: int
    backend: str

    def matches(self, capability: tuple[int, int], dtype: str, d: int) -> bool:
        return self.capability == capability and self.dtype == dtype and self.d_min <= d <= self.d_max


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def parse(doc: dict, where: str = "the dispatch table") -> tuple[Entry, ...]:
    """The entries of a table document; a malformed one raises ``ValueError`` (``TypeError``
    if ``entries`` is no list) naming the entry and the field."""
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise TypeError(f"{where}: 'entries' must be a list, got {type(entries).__name__}")
    out = []
    for i, e in enumerate(entries):
        try:
            cap = tuple(int(c) for c in e["capability"])
            entry = Entry(cap, str(e["dtype"]), int(e["d_min"]), int(e["d_max"]), str(e["backend"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: entry {i} must have capability [major, minor], dtype, "
                             f"d_min, d_max and backend ({exc!r})") from exc  # fmt: skip
        if len(cap) != 2:
            raise ValueError(f"{where}: entry {i}: capability must be [major, minor], got {cap}")
        if entry.backend not in GPU_BACKENDS:
            raise ValueError(f"{where}: entry {i}: backend must be one of {GPU_BACKENDS}, "
                             f"got {entry.backend!r}")  # fmt: skip
        if not 1 <= entry.d_min <= entry.d_max:
            raise ValueError(f"{where}: entry {i}: need 1 <= d_min <= d_max, got "
                             f"{entry.d_min}..{entry.d_max}")  # fmt: skip
        out.append(entry)
    return tuple(out)


@functools.cache
def load(path: Path = TABLE_PATH) -> tuple[Entry, ...]:
    """The entries of the table file at ``path`` (read once per process); none if the file
    is absent (no measurements: the default order)."""
    if not path.is_file():
        return ()
    return parse(json.loads(path.read_text()), str(path))


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of ``device``'s GPU (by index; the current one without)."""
    return tuple(torch.cuda.get_device_capability(device if device.index is not None else None))


def lookup(
    capability: tuple[int, int],
    dtype: torch.dtype | str,
    d: int,
    entries: Iterable[Entry] | None = None,
) -> str | None:
    """The measured backend for inputs of ``dtype`` and width ``d`` on a GPU of
    ``capability``, or ``None`` (no entry: keep the default order)."""
    name = _dtype_name(dtype)
    for e in load() if entries is None else entries:
        if e.matches(tuple(capability), name, d):
            return e.backend
    return None


def preferred(device: torch.device, dtype: torch.dtype, d: int) -> str | None:
    """``lookup`` for CUDA inputs on ``device``; ``None`` without entries (the GPU is then
    not queried) or for any other device."""
    entries = load()
    if device.type != "cuda" or not entries:
        return None
    return lookup(capability(device), dtype, d, entries)


# --- the writer: measured times -> entries --------------------------------------------------


def table_from_timings(
    timings: Sequence[dict],
    capability: tuple[int, int],
    dtype: torch.dtype | str,
    *,
    default_first: str = GPU_BACKENDS[0],
    margin: float = DEFAULT_MARGIN,
    source: str = "",
) -> list[dict]:
    """Table entries (the JSON rows) from measured forward + backward times.

    ``timings``: rows of ``quick_check.json`` (``"case"``, ``"d"``, ``"provider"`` such as
    ``"mimac-cuda"``, ``"status"``, ``"ms_median"``); those of other providers, or not
    ``"ok"``, are left out. Per width D whose cases every GPU backend ran, the times of
    those cases are summed per backend and the fastest wins, ``default_first`` (auto's
    first choice today) unless another is faster by more than ``margin``. A width's
    entry covers D from just above the next smaller measured width (1 for the smallest)
    up to itself: no entry reaches past the widest D measured. Neighbouring widths with
    the same winner merge into one entry.
    """
    # width -> backend -> {case: ms}
    per_d: dict[int, dict[str, dict[str, float]]] = {}
    for t in timings:
        provider = str(t.get("provider", ""))
        name = provider.removeprefix("mimac-")
        if t.get("status") != "ok" or not provider.startswith("mimac-") or name not in GPU_BACKENDS:
            continue
        per_d.setdefault(int(t["d"]), {}).setdefault(name, {})[str(t["case"])] = float(
            t["ms_median"]
        )
    # Only widths where every GPU backend ran the same cases: sums of unlike work do not compare.
    measured = sorted(
        d for d, by in per_d.items()
        if len(by) == len(GPU_BACKENDS) and len({frozenset(c) for c in by.values()}) == 1
    )  # fmt: skip
    cap = [int(c) for c in capability]
    entries: list[dict] = []
    lower = 1
    for d in measured:
        ms = {name: sum(cases.values()) for name, cases in per_d[d].items()}
        best = min(ms, key=ms.__getitem__)
        if best != default_first and ms[best] >= ms[default_first] * (1.0 - margin):
            best = default_first
        rounded = {n: round(v, 4) for n, v in sorted(ms.items())}
        if entries and entries[-1]["backend"] == best:
            entries[-1]["d_max"] = d
            for n, v in rounded.items():
                entries[-1]["ms"][n] = round(entries[-1]["ms"][n] + v, 4)
        else:
            entries.append({"capability": cap, "dtype": _dtype_name(dtype), "d_min": lower,
                            "d_max": d, "backend": best, "ms": rounded,
                            "source": source})  # fmt: skip
        lower = d + 1
    return entries


def merge(existing: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """``existing`` entries with those of the capabilities and dtypes in ``new`` replaced
    by ``new`` (a fresh measurement of a GPU and dtype supersedes the old one whole)."""
    replaced = {(tuple(e["capability"]), e["dtype"]) for e in new}
    kept = [e for e in existing if (tuple(e["capability"]), e["dtype"]) not in replaced]
    return [*kept, *new]


def write(path: Path, entries: Sequence[dict]) -> None:
    """Write a table file (validated first: a malformed entry raises, nothing is written)."""
    doc = {"entries": list(entries)}
    parse(doc, str(path))
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m mimac_kernels.dispatch_table MEASURED.json [--into TABLE]``: merge a GPU
    check's ``dispatch_table.json`` into the committed table (``merge``)."""
    p = argparse.ArgumentParser(prog="python -m mimac_kernels.dispatch_table",
                                description=main.__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("measured", type=Path, help="dispatch_table.json written by the GPU check")
    p.add_argument("--into", type=Path, default=TABLE_PATH, help="table to update")
    args = p.parse_args(argv)
    new = json.loads(args.measured.read_text())
    parse(new, str(args.measured))
    old = json.loads(args.into.read_text()) if args.into.is_file() else {"entries": []}
    merged = merge(old["entries"], new["entries"])
    write(args.into, merged)
    print(f"{args.into}: {len(merged)} entries ({len(new['entries'])} from {args.measured})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
