"""Noticing a diverging run: exploding losses, non-finite weights or head scores, collapse.

Three checks, each cheap next to a training step:

* :class:`LossMonitor` (every step's loss, in order; the trainer keeps them on the
  device and checks them at the end of the epoch, so that no step waits for a
  host read): a finite loss that exceeds :data:`EXPLODE_FACTOR` times the median
  magnitude of the run's recent losses (at least 1) stops the run. Adam at an
  absurd learning rate reaches losses of 1e24 without ever producing a NaN; this
  catches it in the epoch where it happens.
* :func:`check_epoch` (end of every epoch, before the checkpoint): every parameter
  and buffer finite, and the head scores of an evaluation finite. A NaN made by
  the last optimizer step of an epoch is caught here, so it is never saved.
* :func:`flag_degenerate` (final metrics): every image in one cluster is flagged
  in the printout and in ``final_metrics.json`` (``collapsed``, ``warnings``).

The first two raise :class:`DivergenceError` (the trainer stops, nothing of the
failed epoch is saved; the previous checkpoint stays the newest).
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: A loss this many times the median magnitude of the recent losses (at least 1) is
#: divergence. Healthy runs change their loss by a few x at most; diverging ones by
#: 1e10 and more within an epoch.
EXPLODE_FACTOR = 1e4
#: Step losses kept (and saved in the checkpoint) as the reference.
HISTORY = 512


class DivergenceError(RuntimeError):
    """Training diverged (exploding loss, non-finite weights or head scores).

    ``epoch`` and ``step`` (1-based; 0 when found at the end of the epoch) say where,
    ``cause`` says what in a few words (without the advice of the message).
    """

    def __init__(self, message: str, epoch: int, step: int, cause: str = "") -> None:
        super().__init__(message)
        self.epoch, self.step, self.cause = epoch, step, cause or message


class LossMonitor:
    """Watches the total loss of each step against the run's own recent history.

    Args:
        history: earlier step losses (from the checkpoint on resume), oldest first.
    """

    def __init__(self, history: Iterable[float] | None = None) -> None:
        self.history: collections.deque[float] = collections.deque(
            (abs(float(v)) for v in history or () if math.isfinite(float(v))), maxlen=HISTORY)

    def check(self, total: float, epoch: int, step: int, steps: int) -> None:
        """Record ``total`` (finite) of ``step`` (1-based) of ``epoch``; raise if it exploded.

        Raises:
            DivergenceError: ``|total|`` > EXPLODE_FACTOR x max(1, median of the history).
        """
        if self.history:
            ref = max(1.0, statistics.median(self.history))
            if abs(total) > EXPLODE_FACTOR * ref:
                raise DivergenceError(
                    f"training diverged at epoch {epoch}, step {step}/{steps}: loss {total:.4g} "
                    f"is {abs(total) / ref:.3g} times the recent losses (median {ref:.4g}); "
                    f"stopped at the end of the epoch, no checkpoint written for it "
                    f"({last_good(epoch)}). Try a lower optim.lr",
                    epoch, step, f"loss {total:.4g}, {abs(total) / ref:.3g} times the recent ones")
        self.history.append(abs(total))

    def state(self) -> list[float]:
        """The history, for the checkpoint."""
        return list(self.history)


def last_good(epoch: int) -> str:
    """Which checkpoint a run stopped in ``epoch`` keeps, for the messages."""
    return f"the last good one is epoch {epoch - 1}" if epoch > 1 else "none was written yet"


def first_non_finite_tensor(module: nn.Module) -> str | None:
    """Name of the first parameter or buffer of ``module`` with a NaN/inf, else None."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_epoch(method: nn.Module, evaluation: dict[str, Any] | None, epoch: int) -> None:
    """After the last step of ``epoch`` (and its evaluation, if any): weights and head scores
    must be finite.

    Raises:
        DivergenceError: naming the first non-finite tensor, or the head scores.
    """
    bad = first_non_finite_tensor(method)
    what = f"parameter/buffer {bad!r} is not finite" if bad else None
    if what is None and evaluation is not None:
        scores = evaluation.get("head_scores") or []
        if not all(math.isfinite(float(v)) for v in scores):
            what = f"the head scores are not finite ({scores})"
    if what is not None:
        raise DivergenceError(
            f"training diverged in epoch {epoch}: after its last optimizer step {what}; no "
            f"checkpoint written for this epoch ({last_good(epoch)}). Try a lower optim.lr",
            epoch, 0, what)


def flag_degenerate(final: dict[str, Any]) -> list[str]:
    """Add ``collapsed`` and ``warnings`` to the final metrics; returns the warnings.

    A clustering with every image in one cluster (of several) is degenerate: its
    ACC is the largest class's share and NMI is 0, whatever the method.
    """
    sizes = [int(v) for v in final.get("cluster_sizes") or []]
    warnings = list(final.get("warnings") or [])
    collapsed = len(sizes) > 1 and sum(1 for v in sizes if v > 0) == 1
    if collapsed:
        warnings.append(f"collapsed clustering: all {sum(sizes)} images are in one cluster of "
                        f"{len(sizes)}: the result is degenerate (its ACC is the largest "
                        "class's share, NMI 0). The run diverged (try a lower optim.lr) or is "
                        "too short to have learned anything")
    scores = final.get("head_scores") or []
    if not all(math.isfinite(float(v)) for v in scores):
        warnings.append(f"non-finite head scores {scores}: the model diverged")
    final["collapsed"], final["warnings"] = collapsed, warnings
    return warnings
