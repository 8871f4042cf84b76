"""Spawning ``torch.distributed`` ranks for the tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch.multiprocessing as mp


def run_ranks(worker: Callable, world: int, args: tuple, timeout: float = 180.0) -> None:
    """Spawn ``world`` processes running ``worker(rank, world, *args)``; fail after ``timeout`` s.

    The worker must be a module-level function (it is pickled); a rank that raises
    makes this raise with its traceback, and a hung rank is killed.
    """
    ctx = mp.spawn(worker, args=(world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")
