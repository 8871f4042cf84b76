"""Atomic writes of run files, and removal of what an interrupted write left behind.

Every file of a run folder (config, checkpoints, metrics, predictions, plots) is
written to a temporary file next to it, flushed to disk, and renamed over the
target with ``os.replace`` (atomic on POSIX): a kill or a full disk at any
moment leaves either the old file or the new one, never a truncated one. A
failure raises :class:`RunFileError`, an ``OSError`` whose message names the
file and the cause (``No space left on device``, ``Read-only file system``);
the temporary file is removed and the previous file is kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

#: Temporary names: ``.NAME.tmp-PID`` plus NAME's suffix (so that writers choosing the
#: format by extension, matplotlib and numpy, keep it), and the older ``.NAME.tmp``.
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp(-(?P<pid>\d+)(\.[A-Za-z0-9]+)?)?$")


class RunFileError(OSError):
    """A run file could not be written or read; the message names the file and the cause."""

    def __str__(self) -> str:
        return str(self.strerror)


def os_error_message(exc: OSError) -> str:
    """One line naming the file and the cause, for the command line."""
    if isinstance(exc, RunFileError) or not exc.filename:
        return str(exc) if isinstance(exc, RunFileError) else describe(exc)
    return f"{exc.filename}: {describe(exc)}"


def tmp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def describe(exc: BaseException) -> str:
    """``strerror`` of an OSError (``No space left on device``), else ``Type: message``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return f"{type(exc).__name__}: {exc}"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system allows it)."""
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


@contextlib.contextmanager
def replacing(path: str | Path, what: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    Args:
        path: the file to (re)write.
        what: how the message names the file when it is not self-explanatory.

    Raises:
        RunFileError: writing, syncing or renaming failed (also a write inside the
            block that raised an OSError); ``path`` is unchanged, the temporary removed.
    """
    path = Path(path)
    tmp = tmp_path(path)
    label = what or str(path)
    try:
        yield tmp
        if not tmp.exists():  # the writer had nothing to write (an empty plot): keep path as is
            return
        with open(tmp, "rb+") as f:  # the writer may not have synced: do it here
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, RunFileError):
            raise
        raise RunFileError(exc.errno or errno.EIO,
                           f"could not write {label}: {describe(exc)} (the previous file is kept)"
                           ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes,
                verify: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` as ``path`` atomically; ``verify(tmp)`` may raise to reject the copy."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) as ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted writes in ``run_dir``; returns them.

    A temporary file whose writer process is still alive is left alone (it may be
    mid-write). Unreadable folders are skipped: this is housekeeping, not a check.
    """
    removed = []
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m is None or not p.is_file():
            continue
        if m.group("pid") is not None and _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
