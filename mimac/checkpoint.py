"""Atomic, verified checkpoints with one fallback: ``ckpt_last.pt`` and ``ckpt_prev.pt``.

Saving serialises the state in memory, refuses one with non-finite tensors (a
diverged model never replaces a good checkpoint), writes it to a temporary
file, checks that the file reads back with every zip record's CRC intact,
then rotates ``last -> prev`` and renames the new file into ``last`` with
``os.replace`` (atomic on POSIX). A crash at any moment leaves at least one
complete checkpoint, and a full disk is reported as such.

Loading verifies every record's CRC (``torch.load`` alone does not: a flipped
byte in a weight is read silently), the format, the required keys and that
every floating-point tensor is finite; a caller's ``apply`` (loading the state
into the model and optimizer) is part of the check. A checkpoint that fails
is reported, moved aside as ``<name>.corrupt`` (so the next save does not
rotate it over the good one) and ``ckpt_prev.pt`` is tried instead.
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mimac import atomic
from mimac.config import flat_keys

LAST = "ckpt_last.pt"
PREV = "ckpt_prev.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "rng")


class CheckpointError(RuntimeError):
    """No usable checkpoint in a run folder, or one could not be written."""


class ResumeMismatch(ValueError):
    """A readable checkpoint that does not belong to the run being resumed (a usage error:
    no fallback, nothing moved aside)."""


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts/lists, with a dotted name."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def first_non_finite(state: dict[str, Any], keys: tuple[str, ...] = ("model", "optimizer")
                     ) -> str | None:
    """Name of the first floating-point tensor under ``keys`` with a NaN/inf, else None."""
    for key in keys:
        for name, t in _tensors(state.get(key), key):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def _verify_archive(path: Path) -> None:
    """Read every record of the zip and compare its CRC (``torch.load`` does not)."""
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"record {bad!r} failed its CRC check (the file is damaged)")


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically as ``run_dir/ckpt_last.pt``; the old one becomes ``ckpt_prev.pt``.

    Raises:
        CheckpointError: the state holds non-finite tensors, or the file could not be
            written or does not read back (disk full, ...); the message says which.
            The existing checkpoints are left untouched in every case.
    """
    run_dir = Path(run_dir)
    last, prev = run_dir / LAST, run_dir / PREV
    state = {"format": FORMAT_VERSION, **state}
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"not saving a checkpoint with non-finite values (in {bad}) in "
                              f"{run_dir}; the previous checkpoints are kept")
    tmp = atomic.tmp_path(last)
    try:
        buf = io.BytesIO()  # serialise first: a full disk then surfaces as OSError(ENOSPC)
        torch.save(state, buf)
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        _verify_archive(tmp)
    except Exception as exc:  # pickling, disk full, CRC: each leaves the old checkpoints
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write a checkpoint in {run_dir} ({atomic.describe(exc)}); "
                              "the previous checkpoints are kept") from exc
    try:
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
    except OSError as exc:
        raise CheckpointError(f"could not rename the new checkpoint into {last} "
                              f"({atomic.describe(exc)})") from exc
    atomic.fsync_dir(run_dir)
    return last


def _read(path: Path) -> dict[str, Any]:
    _verify_archive(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError("not a checkpoint dict")  # noqa: TRY004 -- bad content, like a bad zip
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if state["format"] != FORMAT_VERSION:
        raise ValueError(f"format {state['format']} (this mimac reads {FORMAT_VERSION})")
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"non-finite values in {bad}")
    return state


def load_checkpoint(run_dir: str | Path, quarantine: bool = True,
                    apply: Callable[[dict[str, Any], Path], None] | None = None,
                    ) -> tuple[dict[str, Any], Path]:
    """The newest usable checkpoint of ``run_dir`` and its path.

    A checkpoint is usable when every zip record passes its CRC, it has the
    required keys and format, all its floating-point tensors are finite, and
    ``apply(state, path)`` (e.g. loading it into the model) does not raise. One that
    is not is reported with a warning and, if ``quarantine``, renamed to
    ``<name>.corrupt``; ``ckpt_prev.pt`` is used instead. ``apply`` raising
    :class:`ResumeMismatch` is not a damaged file: it propagates at once.

    Raises:
        CheckpointError: neither file is usable (the message lists why, per file).
        ResumeMismatch: from ``apply``.
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
            if apply is not None:
                apply(state, path)
        except ResumeMismatch:
            raise
        except Exception as exc:  # noqa: BLE001 -- CRC, truncation, pickle, shapes ...
            why = atomic.describe(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            why = " ".join(why.split())  # one line (load_state_dict lists one mismatch a line)
            problems.append(f"{name}: {why}")
            warnings.warn(f"checkpoint {path} is unusable ({why}); trying the previous one",
                          RuntimeWarning, stacklevel=2)
            if quarantine:
                try:
                    os.replace(path, path.with_name(name + ".corrupt"))
                except OSError as mv:
                    problems[-1] += f" (could not move it aside: {atomic.describe(mv)})"
            continue
        return state, path
    raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(problems))


#: Config keys a resumed run may change (see ``mimac.config.RESUME_KEYS``) plus those
#: that only say where the run lives.
_LOCATION_KEYS = ("run_dir", "progress")


def check_resume(config: dict[str, Any], state: dict[str, Any], path: Path,
                 may_change: tuple[str, ...] = ()) -> None:
    """Refuse to resume ``state`` (read from ``path``) with the run config ``config``.

    Args:
        config: the run's resolved config as a plain dict (``config_to_dict``).
        may_change: dotted keys allowed to differ from the checkpoint's config.

    Raises:
        ResumeMismatch: ``epochs`` is below the checkpoint's epoch, or a config key the
            checkpoint depends on differs from the config stored in it (keys listed).
    """
    epoch = int(state["epoch"])
    if config["epochs"] < epoch:
        raise ResumeMismatch(
            f"{path.name} is at epoch {epoch}; resuming with epochs={config['epochs']} would "
            f"label a {epoch}-epoch model as {config['epochs']} epochs. Pass epochs={epoch} "
            "(re-evaluate it) or more (continue training)")
    saved = state.get("config")
    if not isinstance(saved, dict):
        return  # written before checkpoints carried their config
    ignore = set(may_change) | set(_LOCATION_KEYS)
    a, b = flat_keys(config), flat_keys(saved)
    differ = sorted(k for k in a.keys() | b.keys() if k not in ignore and _differs(a.get(k), b.get(k)))
    if differ:
        shown = ", ".join(f"{k} (run {a.get(k)!r}, checkpoint {b.get(k)!r})" for k in differ[:8])
        more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise ResumeMismatch(
            f"the run's config disagrees with the one stored in {path.name}: {shown}{more}. "
            "Is config.yaml damaged or edited? Restore it (the checkpoint's config is the "
            "one the model was trained with)")


def _differs(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return False
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) != len(y) or any(_differs(u, v) for u, v in zip(x, y))
    return x != y


def _loaded_before(path: Path, epoch: int, before_ns: int) -> bool:
    """``path`` holds ``epoch`` and is older than ``before_ns`` (not written since)."""
    try:
        return path.stat().st_mtime_ns < before_ns and int(
            torch.load(path, map_location="cpu", weights_only=False)["epoch"]) == epoch
    except Exception:  # noqa: BLE001 -- missing or unreadable: not the one loaded
        return False


def set_aside_resumed(run_dir: str | Path, epoch: int, before_ns: int) -> tuple[str, bool] | None:
    """A run resumed from a checkpoint of ``epoch`` failed at its first step: which file did
    it come from? One that holds ``epoch`` and is older than ``before_ns`` (not written by
    the failed attempt). ``ckpt_last.pt`` is moved aside as ``ckpt_last.pt.corrupt``.

    Returns:
        The file's name and whether ``ckpt_prev.pt`` remains to fall back to, or None
        when neither file is the one resumed from.
    """
    run_dir = Path(run_dir)
    last, prev = run_dir / LAST, run_dir / PREV
    if _loaded_before(last, epoch, before_ns):
        os.replace(last, last.with_name(LAST + ".corrupt"))
        return LAST, prev.exists()
    if _loaded_before(prev, epoch, before_ns):
        return PREV, False
    return None
