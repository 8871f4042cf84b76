"""Per-epoch run records: ``metrics.csv`` (rewritten whole each epoch) and TensorBoard events."""

from __future__ import annotations

import csv
import errno
import math
from pathlib import Path
from typing import Any

from mimac import atomic
from mimac.atomic import RunFileError, describe

METRICS_CSV = "metrics.csv"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.csv`` with numbers parsed (empty cells become NaN).

    Raises:
        ValueError: the file is not a metrics table (no ``epoch`` column, an epoch
            that is not a number, undecodable bytes); the message names the file.
        mimac.atomic.RunFileError: it cannot be read (permissions, I/O error).
    """
    path = Path(run_dir) / METRICS_CSV
    if not path.exists():
        return []
    try:
        return _parse(path)
    except OSError as exc:
        raise RunFileError(exc.errno or errno.EIO, f"cannot read {path}: {describe(exc)}") from exc
    except (ValueError, KeyError, TypeError, csv.Error) as exc:
        cause = "no 'epoch' column" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(
            f"{path} is not a metrics table written by mimac ({cause}); move it aside to "
            "continue the run (its per-epoch history is then lost)") from exc


def _parse(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k is None:  # csv puts cells beyond the header under the key None
                    raise ValueError(f"row {len(rows) + 1} has more cells than the header")
                try:
                    row[k] = float(v) if v not in ("", None) else math.nan
                except ValueError:
                    row[k] = v
            epoch = row["epoch"]
            if not (isinstance(epoch, float) and epoch.is_integer()):
                raise ValueError(f"row {len(rows) + 1} has epoch {epoch!r}")
            row["epoch"] = int(epoch)
            rows.append(row)
    return rows


class RunLog:
    """Collects one row per epoch; writes ``metrics.csv`` atomically and, if available, TensorBoard.

    Args:
        run_dir: the run folder.
        upto_epoch: keep rows of an existing ``metrics.csv`` up to this epoch
            (resume: rows after the checkpoint's epoch are dropped and redone).
        tensorboard: write TensorBoard events when ``torch.utils.tensorboard`` imports.
    """

    def __init__(self, run_dir: str | Path, upto_epoch: int = 0, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.rows = [r for r in read_metrics(self.run_dir) if r["epoch"] <= upto_epoch]
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # noqa: BLE001 -- tensorboard not installed: CSV and plots only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=upto_epoch + 1)

    def append(self, row: dict[str, Any]) -> None:
        """Add the row of one epoch (must contain ``epoch``) and rewrite the CSV."""
        self.rows.append(row)
        self._write_csv()
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k.replace("loss_", "loss/"), v, row["epoch"])
            self.writer.flush()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        with atomic.replacing(self.run_dir / METRICS_CSV) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: _fmt(v) for k, v in r.items()})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v
