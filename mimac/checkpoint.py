"""Atomic checkpoints with one fallback: ``ckpt_last.pt`` and ``ckpt_prev.pt`` in the run folder.

Saving writes a temporary file, checks that it reads back as a complete
archive, then rotates ``last -> prev`` and renames the new file into
``last`` with ``os.replace`` (atomic on POSIX). A crash at any moment leaves at
least one complete checkpoint. Loading falls back to ``prev`` when ``last`` is
corrupt, reports it, and moves the corrupt file aside so the next save does
not rotate it over the good one.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

LAST = "ckpt_last.pt"
PREV = "ckpt_prev.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "rng")


class CheckpointError(RuntimeError):
    """No usable checkpoint in a run folder."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically as ``run_dir/ckpt_last.pt``; the old one becomes ``ckpt_prev.pt``.

    Raises:
        CheckpointError: the written file does not read back (disk full, ...); the
            existing checkpoints are left untouched.
    """
    run_dir = Path(run_dir)
    last, prev = run_dir / LAST, run_dir / PREV
    tmp = run_dir / f".{LAST}.tmp-{os.getpid()}"
    state = {"format": FORMAT_VERSION, **state}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        with zipfile.ZipFile(tmp) as zf:  # torch.save writes a zip; verify every CRC
            bad = zf.testzip()
        if bad is not None:
            raise CheckpointError(f"member {bad!r} failed its CRC check")
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write a checkpoint in {run_dir} ({type(exc).__name__}: {exc}); "
            "the previous checkpoints are kept"
        ) from exc
    if last.exists():
        os.replace(last, prev)
    os.replace(tmp, last)
    _fsync_dir(run_dir)
    return last


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError("not a checkpoint dict")  # noqa: TRY004 -- bad content, like a bad zip
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if state["format"] != FORMAT_VERSION:
        raise ValueError(f"format {state['format']} (this mimac reads {FORMAT_VERSION})")
    return state


def load_checkpoint(run_dir: str | Path, quarantine: bool = True) -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint of ``run_dir`` and its path.

    A corrupt ``ckpt_last.pt`` is reported with a warning and, if ``quarantine``,
    renamed to ``ckpt_last.pt.corrupt``; ``ckpt_prev.pt`` is used instead.

    Raises:
        CheckpointError: neither file is readable (the message lists why).
    """
    run_dir = Path(run_dir)
    problems = []
    for name in (LAST, PREV):
        path = run_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        try:
            state = _read(path)
        except Exception as exc:  # noqa: BLE001 -- truncated zip, pickle error, wrong content ...
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            warnings.warn(f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc}); "
                          "trying the previous one", RuntimeWarning, stacklevel=2)
            if quarantine:
                os.replace(path, path.with_name(name + ".corrupt"))
            continue
        return state, path
    raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(problems))
