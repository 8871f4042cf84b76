"""The trainer: one loop for every clustering method (no method-specific branches).

Data live on the device as one uint8 tensor; batches are index permutations
from a seeded generator; views are made on the device by ``BatchAugment``.
Each epoch ends with an atomic checkpoint holding everything needed to resume
bit-exactly (model, optimizer, epoch, RNG states), so a killed run resumed
from its folder ends with the same parameters and metrics as an unbroken one
(same seed, same device, same thread count).

Under torchrun the same loop runs data-parallel (see :mod:`mimac.distributed`):
every rank holds the data, draws the same global permutation, and trains a
``DistributedDataParallel`` copy of the method on its slice of each global
batch, with losses that span all ranks (the process group is passed to the
method's ``losses``); rank 0 alone logs, evaluates, writes the run folder and
checkpoints, and hands what it loads to the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mimac import atomic, divergence
from mimac import distributed as mdist
from mimac.checkpoint import (
    LAST,
    PREV,
    CheckpointError,
    check_resume,
    load_checkpoint,
    save_checkpoint,
    set_aside_resumed,
)
from mimac.config import RESUME_KEYS, Config, OptimConfig, config_to_dict, save_config
from mimac.distributed import DistInfo
from mimac.divergence import DivergenceError, LossMonitor
from mimac.models.method import ClusteringMethod
from mimac.outputs import CONFIG_FILE, FINAL_METRICS, final_metrics, format_metrics, write_outputs
from mimac.run_setup import Setup, build, evaluate, load_run_data, resolve_device
from mimac.runlog import RunLog

#: Columns of an evaluated epoch in metrics.csv (those the evaluation returns).
EVAL_COLUMNS = ("acc", "nmi", "ari", "mean_acc", "mean_nmi", "mean_ari", "head")
#: Seconds between progress-bar loss updates (each one reads the loss from the device).
BAR_REFRESH_S = 0.5

__all__ = ["CONFIG_FILE", "FINAL_METRICS", "NonFiniteLossError", "Setup", "build",
           "build_optimizer", "format_metrics", "load_run_data", "lr_factor", "resolve_device",
           "train"]


class NonFiniteLossError(DivergenceError):
    """The loss became NaN or infinite; raised at the end of its epoch (with the first such
    step), nothing of that epoch is saved."""


def lr_factor(cfg: OptimConfig, epochs: int, t: float) -> float:
    """Learning-rate multiplier at training time ``t`` in epochs (0 at the start).

    A pure function of ``t`` (no scheduler state), so a resumed run follows the
    same schedule.
    """
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        return (t + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(epochs - cfg.warmup_epochs, 1e-9)
        frac = min(max((t - cfg.warmup_epochs) / span, 0.0), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(t >= m for m in cfg.milestones)
    return 1.0


def build_optimizer(method: ClusteringMethod, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW over the method's parameter groups."""
    groups = method.param_groups(cfg)
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g["base_lr"] = g["lr"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    opt_cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return opt_cls(groups, lr=cfg.lr, betas=cfg.betas)


@dataclasses.dataclass
class Run:
    """The state of a run across its epochs (what a checkpoint holds, and the folder)."""

    folder: Path
    record: Config  # the config as written to config.yaml (run_dir filled in)
    optimizer: torch.optim.Optimizer
    gens: dict[str, torch.Generator]  # data_gen (permutations), aug_gen (augmentations)
    batch: int  # global batch
    steps: int  # per epoch (the ragged tail is dropped: every step sees a full batch)
    start: int = 0  # the last finished epoch when this process began
    train_time: float = 0.0
    metrics: RunLog | None = None  # rank 0 only
    evaluation: dict[str, Any] | None = None  # the latest one
    last_means: dict[str, float] = dataclasses.field(default_factory=dict)  # of the last epoch
    last_time: float = 0.0  # seconds of the last epoch
    monitor: LossMonitor = dataclasses.field(default_factory=LossMonitor)  # recent step losses
    resumed: bool = False  # this process began from a checkpoint
    opened_ns: int = 0  # time.time_ns() when opened: checkpoints older than this were loaded
    log: Callable[[str], None] = print  # rank 0's progress lines


class _StepLosses(nn.Module):
    """The method's :meth:`losses` as a ``forward`` (so that DDP's hooks see every step),
    spanning ``group``."""

    def __init__(self, method: ClusteringMethod, group: Any = None) -> None:
        super().__init__()
        self.method = method
        self.group = group

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.method.losses(views, self.group)


def train(cfg: Config, *, resume: str | Path | None = None, stop_after_epoch: int | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Train ``cfg`` in a new run folder, or continue the run in ``resume``.

    Under torchrun (or with ``torch.distributed`` already initialised) every rank
    calls this with the same arguments; the process group is joined here and, if
    joined here, destroyed on the way out, also on an error.

    Args:
        cfg: the resolved config (for a resume: the run's config plus overrides).
        resume: a run folder with a checkpoint.
        stop_after_epoch: stop (as if killed) after this epoch's checkpoint; for tests.
        log: where progress lines go (rank 0's only).

    Returns:
        The final metrics (also in ``final_metrics.json``; the same on every rank),
        or None if stopped early.

    Raises:
        NonFiniteLossError: NaN/inf loss (epoch and step in the message).
        DivergenceError: an exploding loss, or non-finite weights or head scores after an
            epoch (see :mod:`mimac.divergence`); nothing of that epoch is saved.
        CheckpointError: no usable checkpoint to resume, or one could not be written.
        ValueError, FileNotFoundError: bad config or data, an unavailable kernel backend;
            a resume the checkpoint contradicts (``ResumeMismatch``: fewer epochs, a
            differing config).
        mimac.atomic.RunFileError: a run file could not be written (names it and why).

    On resume, a checkpoint whose weights make the very first step diverge is moved
    aside (``.corrupt``) and the run continues from ``ckpt_prev.pt`` (see :func:`train_epoch`).
    """
    wall0 = time.perf_counter()
    info = mdist.join(cfg.device)
    try:
        log = log if info.is_main else _quiet
        s = build(cfg, info)
        run = open_run(s, resume, log)
        step = _StepLosses(s.method, info.group)
        step_fn = _data_parallel(step, s) if info.distributed else step
        log(_banner(s, run))
        with _closing(run.metrics):
            for epoch in range(run.start + 1, cfg.epochs + 1):
                train_epoch(s, run, step_fn, epoch)
                end_epoch(s, run, epoch, log)
                if stop_after_epoch is not None and stop_after_epoch <= epoch < cfg.epochs:
                    return None
        return mdist.on_main(lambda: finish(s, run, wall0, log), info)
    finally:
        mdist.leave(info)


# ---- the steps of train() -----------------------------------------------------------

def open_run(s: Setup, resume: str | Path | None, log: Callable[[str], None]) -> Run:
    """A new run folder (rank 0 creates it), or ``resume``'s with its checkpoint loaded;
    the optimizer and the random streams; ``config.yaml`` written, metrics.csv opened.
    Temporary files of interrupted writes are removed from the folder."""
    cfg, info = s.cfg, s.dist
    opened_ns = time.time_ns()
    n = int(s.images.shape[0])
    batch = _global_batch(cfg, n, info)
    optimizer = build_optimizer(s.method, cfg.optim)
    gens = {"data_gen": torch.Generator().manual_seed(cfg.seed),
            "aug_gen": torch.Generator().manual_seed(cfg.seed + 1)}
    folder = Path(resume) if resume is not None else mdist.on_main(lambda: _new_run_dir(cfg), info)
    run = Run(folder, dataclasses.replace(cfg, run_dir=str(folder)), optimizer, gens, batch,
              n // batch, resumed=resume is not None, opened_ns=opened_ns, log=log)
    if resume is not None:
        _restore(s, run)
    if info.is_main:
        atomic.remove_leftovers(folder)  # temporary files of writes a kill interrupted
        run.metrics = RunLog(folder, upto_epoch=run.start)
        save_config(run.record, folder / CONFIG_FILE)
    return run


def train_epoch(s: Setup, run: Run, step_fn: nn.Module, epoch: int) -> None:
    """One epoch: the method's preparation if due, then one pass over a fresh permutation.

    Every rank draws the same global permutation and takes its own slice of each
    global batch; under torchrun the augmentation generator is reseeded per epoch
    and rank, so any rank's views are reproducible without saving its state. The
    loss terms stay on the device: they are read once at the end of the epoch (and
    when the progress bar shows them), not at every step; the divergence checks of
    the step losses run on them then (see :meth:`_LossTally.means`).

    If the first step after a resume diverged, the checkpoint's weights are at fault,
    not the learning rate: that checkpoint is moved aside and the epochs from
    ``ckpt_prev.pt`` on are trained again (see :func:`_fall_back`).

    Raises:
        NonFiniteLossError: a step's total loss was NaN/inf (before the checkpoint).
        DivergenceError: a step's loss exploded against the run's recent losses.
        CheckpointError: the resumed checkpoint diverged at once and none is left.
    """
    try:
        _train_pass(s, run, step_fn, epoch)
    except DivergenceError as exc:
        if not _fall_back(s, run, exc):
            raise
        for redo in range(run.start + 1, epoch):  # from the previous checkpoint on
            train_epoch(s, run, step_fn, redo)
            end_epoch(s, run, redo, run.log)
        train_epoch(s, run, step_fn, epoch)


def _train_pass(s: Setup, run: Run, step_fn: nn.Module, epoch: int) -> None:
    """The pass of :func:`train_epoch` over one epoch's batches."""
    from tqdm.auto import tqdm

    cfg, method, info, bs = s.cfg, s.method, s.dist, run.batch
    t0 = time.perf_counter()
    _prepare_if_due(s, run, epoch)
    method.train()
    method.on_epoch_start(epoch)
    perm = torch.randperm(s.images.shape[0], generator=run.gens["data_gen"]).to(s.device)
    if info.distributed:
        run.gens["aug_gen"].manual_seed(_rank_seed(cfg.seed, epoch, info.rank))
    local = bs // info.world_size
    tally = _LossTally(run.steps, s.device)
    bar = tqdm(range(run.steps), desc=f"epoch {epoch}/{cfg.epochs}",
               disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
    shown = t0
    for step in bar:
        factor = lr_factor(cfg.optim, cfg.epochs, epoch - 1 + step / run.steps)
        for g in run.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        first = step * bs + info.rank * local
        x = s.images[perm[first:first + local]].float().div_(255.0)
        views = s.views(x, run.gens["aug_gen"])
        with s.autocast():
            terms = step_fn(views)
        tally.add(step, terms)
        run.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        run.optimizer.step()
        method.after_step()
        if not bar.disable and time.perf_counter() - shown > BAR_REFRESH_S:
            shown = time.perf_counter()
            rate = (step + 1) * bs / max(shown - t0, 1e-9)
            bar.set_postfix(loss=f"{float(terms['total']):.4f}", img_s=f"{rate:.0f}")
    bar.close()
    run.last_means = tally.means(epoch, info, run.monitor)  # one read per epoch (all ranks)
    run.last_time = time.perf_counter() - t0
    run.train_time += run.last_time


def end_epoch(s: Setup, run: Run, epoch: int, log: Callable[[str], None]) -> None:
    """Rank 0: evaluate if due; check that the weights (and head scores) are finite (every
    rank stops if not: nothing of a diverged epoch is saved); append the epoch's row to
    metrics.csv, write the checkpoint, print a line on evaluated epochs and the first one.

    Raises:
        DivergenceError: non-finite weights or head scores (on every rank).
    """
    cfg = s.cfg
    row = _epoch_row(s, run, epoch) if s.dist.is_main else None
    evaluated = run.evaluation if row is not None and "head" in row else None
    mdist.on_main(functools.partial(divergence.check_epoch, s.method, evaluated, epoch), s.dist)
    if row is None:
        return
    run.metrics.append(row)
    save_checkpoint(run.folder, {
        "epoch": epoch, "model": s.method.state_dict(), "optimizer": run.optimizer.state_dict(),
        "rng": _rng_state(run.gens), "train_time_s": run.train_time,
        "world_size": s.dist.world_size, "config": config_to_dict(run.record),
        "loss_history": run.monitor.state()})
    if "acc" in row or "head" in row or epoch == run.start + 1:
        log(_summary(row, cfg.epochs))


def finish(s: Setup, run: Run, wall0: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Rank 0: the final metrics (evaluating the checkpoint if a resumed run had nothing
    left to train), written with the predictions and plots, and printed."""
    ev = run.evaluation if run.evaluation is not None else evaluate(s, run.batch)
    final = final_metrics(s, ev, run.train_time, run.metrics.rows if run.metrics else [])
    final["wall_time_s"] = round(time.perf_counter() - wall0, 3)  # data, training, eval
    flags = divergence.flag_degenerate(final)  # a collapsed clustering, non-finite scores
    write_outputs(run.folder, final, s, ev)
    log(format_metrics(final))
    for text in flags:
        log(f"WARNING: {text}")
    return final


# ---- helpers ----------------------------------------------------------------------------

def _epoch_row(s: Setup, run: Run, epoch: int) -> dict[str, Any]:
    """Rank 0: the epoch's metrics.csv row, with the evaluation when one is due."""
    row: dict[str, Any] = {"epoch": epoch, "time_s": run.last_time,
                           "images_per_s": run.steps * run.batch / run.last_time,
                           "lr": run.optimizer.param_groups[0]["lr"],
                           **{f"loss_{k}": v for k, v in run.last_means.items()}}
    if epoch % s.cfg.eval_every == 0 or epoch == s.cfg.epochs:
        run.evaluation = evaluate(s, run.batch)
        row.update({k: run.evaluation[k] for k in EVAL_COLUMNS if k in run.evaluation})
    return row


class _LossTally:
    """Sums of the loss terms over an epoch's steps, each step's total, and the first
    step whose total was not finite, all kept on the device."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # (T,) float64
        self.totals = torch.zeros(steps, dtype=torch.float64, device=device)  # (steps,)
        self.bad_step = torch.full((), steps, dtype=torch.float64, device=device)
        self.bad_terms: torch.Tensor | None = None  # the terms at that step

    def add(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        stacked = torch.stack([t.detach().double() for t in terms.values()])
        if self.sums is None:
            self.names = list(terms)
            self.sums = torch.zeros_like(stacked)
            self.bad_terms = torch.zeros_like(stacked)
        self.sums += stacked
        self.totals[step] = stacked[self.names.index("total")]
        first = ~torch.isfinite(stacked[self.names.index("total")]) & (self.bad_step == self.steps)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_terms = torch.where(first, stacked, self.bad_terms)

    def means(self, epoch: int, info: DistInfo, monitor: LossMonitor) -> dict[str, float]:
        """The mean of each term over steps and ranks. The step totals (mean over ranks) go
        through ``monitor`` in order, up to the first non-finite one.

        Raises:
            DivergenceError: a step's loss exploded (``monitor``), or
            NonFiniteLossError: a step's total was NaN/inf; whichever came first. The
                values are the same on every rank: all stop together.
        """
        bad = int(mdist.all_reduce_(self.bad_step.clone(), info.group, op=dist.ReduceOp.MIN))
        packed = torch.cat([self.sums, self.totals])  # one reduction and one read for both
        values = (mdist.all_reduce_(packed, info.group) / info.world_size).tolist()
        sums, totals = values[:len(self.names)], values[len(self.names):]
        for step in range(bad):  # finite on every rank
            monitor.check(totals[step], epoch, step + 1, self.steps)
        if bad < self.steps:
            detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, self.bad_terms.tolist()))
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {bad + 1}/{self.steps} ({detail}); "
                f"stopped at the end of the epoch, no checkpoint written for it "
                f"({divergence.last_good(epoch)}). Try a lower optim.lr.",
                epoch, bad + 1, f"non-finite loss ({detail})")
        return {k: v / self.steps for k, v in zip(self.names, sums)}


def _prepare_if_due(s: Setup, run: Run, epoch: int) -> None:
    """The method's one-off preparation (e.g. k-means), before the epoch after
    ``prepare_epoch()``; a run resumed past it has its result in the checkpoint.

    On the whole data by rank 0, then handed to every rank. Synchronised batch norms in
    train mode gather statistics from every rank on each forward, so then all ranks run
    it (on identical batches: the same result)."""
    method, info, n, bs = s.method, s.dist, int(s.images.shape[0]), run.batch
    if epoch != method.prepare_epoch() + 1:
        return
    if info.is_main or (info.distributed and s.cfg.sync_batchnorm):
        method.prepare(s.views.clean(s.images[i:i + bs].float().div_(255.0))
                       for i in range(0, n, bs))
    mdist.broadcast_module(method, info)


def _restore(s: Setup, run: Run) -> None:
    """Load the newest usable checkpoint of ``run.folder`` (rank 0 reads and verifies it,
    loading it into the model and optimizer as part of the check; every rank gets it)."""
    def apply(state: dict[str, Any], path: Path) -> None:
        _apply_checkpoint(run.record, state, path, s.method, run.optimizer)

    state, path = mdist.on_main(lambda: load_checkpoint(run.folder, apply=apply), s.dist)
    s.method.load_state_dict(state["model"])  # rank 0 has it already; the others not
    run.optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], run.gens)
    run.start, run.train_time = int(state["epoch"]), float(state.get("train_time_s", 0.0))
    run.monitor = LossMonitor(state.get("loss_history"))
    run.log(f"resuming {run.folder} from {path.name} (epoch {run.start})")
    if int(state.get("world_size", 1)) != s.dist.world_size:
        run.log(f"note: the checkpoint was written by {state.get('world_size', 1)} rank(s), this "
            f"run has {s.dist.world_size}: the augmentation streams differ from an unbroken run")


def _apply_checkpoint(cfg: Config, state: dict[str, Any], path: Path, method: ClusteringMethod,
                      optimizer: torch.optim.Optimizer) -> None:
    """Check that ``state`` belongs to this run (ResumeMismatch if not) and load it into the
    model and optimizer (a shape mismatch raises: the loader falls back to the previous one)."""
    check_resume(config_to_dict(cfg), state, path, may_change=RESUME_KEYS)
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def _fall_back(s: Setup, run: Run, exc: DivergenceError) -> bool:
    """After ``exc``: was it the first step after resuming, so that the checkpoint's weights
    are at fault, not the learning rate? Then ``ckpt_last.pt`` is set aside, ``ckpt_prev.pt``
    loaded (the epochs after it are dropped from metrics.csv) and True returned.

    Raises:
        CheckpointError: the checkpoint resumed from is at fault and none is left.
    """
    if not (run.resumed and exc.step == 1 and exc.epoch == run.start + 1):
        return False
    found = mdist.on_main(lambda: set_aside_resumed(run.folder, run.start, run.opened_ns), s.dist)
    if found is None:  # not the checkpoint resumed from: a divergence of this run
        return False
    name, retry = found
    why = f"its weights make the first step diverge (epoch {exc.epoch}, step 1: {exc.cause})"
    if not retry:
        raise CheckpointError(f"cannot resume {run.folder}: {name} (epoch {run.start}) is "
                              f"unusable, {why}, and no earlier checkpoint is left") from exc
    warnings.warn(f"checkpoint {run.folder / name} is unusable ({why}); moved aside as "
                  f"{name}.corrupt, trying the previous one", RuntimeWarning, stacklevel=4)
    _restore(s, run)
    if run.metrics is not None:  # the epochs after the previous checkpoint are trained again
        run.metrics.rows = [r for r in run.metrics.rows if r["epoch"] <= run.start]
    return True


def _data_parallel(step: nn.Module, s: Setup) -> nn.Module:
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[s.device.index] if s.device.type == "cuda" else None,
        find_unused_parameters=s.method.may_skip_parameters())


def _banner(s: Setup, run: Run) -> str:
    cfg, info = s.cfg, s.dist
    ranks = f", {info.world_size} ranks of {run.batch // info.world_size} rows" \
        if info.distributed else ""
    return (f"run folder: {run.folder}  ({cfg.method} on {cfg.data.name}/{cfg.data.split}, "
            f"{s.images.shape[0]} images, {s.method.num_clusters} clusters, device {s.device}, "
            f"{torch.get_num_threads()} threads, batch {run.batch}{ranks})")


def _closing(metrics: RunLog | None) -> contextlib.AbstractContextManager[Any]:
    """Close the metrics log (if any) on the way out, also on an error."""
    return contextlib.closing(metrics) if metrics is not None else contextlib.nullcontext()


def _quiet(_: str) -> None:
    pass


def _global_batch(cfg: Config, n: int, info: DistInfo) -> int:
    bs = min(cfg.batch_size, n)
    if bs % info.world_size:
        capped = " (capped at the dataset size)" if bs < cfg.batch_size else ""
        raise ValueError(f"batch_size {bs}{capped} must be divisible by the number of ranks "
                         f"({info.world_size}): it is the global batch, split evenly over the ranks")
    return bs


def _new_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if (path / LAST).exists() or (path / PREV).exists():
            raise ValueError(f"run folder {str(path)!r} already holds a checkpoint: resume it with "
                             f"`mimac train resume={path}` or choose another run_dir")
    else:
        name = cfg.name or f"{cfg.method}-{cfg.data.name}"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.runs_root) / f"{name}-{stamp}"
        i = 1
        while path.exists():
            path, i = Path(cfg.runs_root) / f"{name}-{stamp}-{i}", i + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rng_state(gens: dict[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             **{k: g.get_state() for k, g in gens.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in gens.items():
        g.set_state(state[k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation seed of one rank in one epoch (distinct streams, fixed by the run seed)."""
    return (seed + 1) * 1_000_003 + epoch * 1_009 + rank


def _summary(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  loss {row.get('loss_total', float('nan')):.4f}  "
            f"{row['images_per_s']:.0f} img/s")
    if "acc" in row:
        text += (f"  ACC {row['acc']:.4f} NMI {row['nmi']:.4f} ARI {row['ari']:.4f} "
                 f"(head {row['head']})")
    elif "head" in row:
        text += f"  (head {row['head']})"
    return text
