"""Data-parallel training helpers: the process group under torchrun, and batch statistics
that span every rank.

Under ``torchrun`` (environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) the trainer joins the process group (NCCL on
CUDA, gloo on CPU), trains a ``DistributedDataParallel`` copy of the method per
rank on its shard of each global batch, and leaves the group when it ends.

Exactness convention (the same as ``mimac_kernels.distributed``): every term a
method computes is either a mean over the rank's own rows (per-sample terms) or
computed identically on every rank from statistics summed over all ranks with
:func:`batch_sum`, whose backward sums every rank's gradient. Either way the
mean of the ranks' losses is the single-process loss of the global batch, and
DDP's averaging of parameter gradients gives exactly the single-process
gradient (batch-norm layers excepted unless ``sync_batchnorm`` is on).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mimac_kernels.distributed import sum_with_grad

T = TypeVar("T")

#: torchrun's variables; WORLD_SIZE alone decides whether this is a distributed run.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: How long a rank waits for the others in one collective (rank 0 evaluates alone).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the run.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them (0, 1, 0 for one process).
        group: the process group of the run, or None for a single process.
        owns_group: this trainer created the group and destroys it at the end.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group is not None


SINGLE = DistInfo()


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from exc


def join(device: str) -> DistInfo:
    """Join the run's process group, if this is a distributed run.

    An initialised ``torch.distributed`` (a caller that set it up itself) is used
    as is and left alone at the end. Otherwise, when torchrun's ``WORLD_SIZE`` is
    set, the default group is initialised from the environment: NCCL when the run
    uses CUDA (``device`` ``auto`` with a GPU, or ``cuda``), else gloo. Without
    either, a single-process :data:`SINGLE`.

    Args:
        device: the config's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.group.WORLD)
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    if not dist.is_available():
        raise ValueError("WORLD_SIZE is set (a torchrun launch) but this torch has no "
                         "torch.distributed support")
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with "
                         "torchrun (or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    rank, world, local = (_env_int(v) for v in ENV_VARS)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return DistInfo(rank, world, local, dist.group.WORLD, owns_group=True)


def leave(info: DistInfo) -> None:
    """Destroy the process group if :func:`join` created it (on success and on error).

    Garbage is collected first: a DDP module left in a reference cycle would keep
    the group alive until interpreter exit, where gloo's threads then die with
    "terminate called without an active exception" (seen with torch 2.13).
    """
    if info.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """A CUDA run uses GPU ``LOCAL_RANK`` on every rank; CPU stays CPU."""
    if info.distributed and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def batch_sum(x: Tensor, group: Any) -> Tensor:
    """Sum of ``x`` over every rank, differentiable: its backward sums every rank's
    gradient, as a statistic that every rank uses identically needs. ``x`` unchanged
    without a group."""
    return x if group is None else sum_with_grad(x, group)


@torch.no_grad()
def all_reduce_(x: Tensor, group: Any, op: Any = None) -> Tensor:
    """In-place all-reduce (``op``: default SUM) of a statistic that takes no gradient;
    ``x`` unchanged without a group."""
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return x


def world_size(group: Any) -> int:
    """Number of ranks in ``group`` (1 without one)."""
    return 1 if group is None else dist.get_world_size(group)


@torch.no_grad()
def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (after rank 0 changed them alone)."""
    if not info.distributed:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0, group=info.group)


def on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` run by rank 0 alone (run folder, checkpoint, final evaluation), its result
    handed to every rank; if it raises, every rank raises the same error instead of
    waiting forever for rank 0."""
    if not info.distributed:
        return fn()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 -- re-raised on every rank below
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0, group=info.group)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
