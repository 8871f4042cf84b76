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
batch, with losses that span all ranks; rank 0 alone logs, evaluates, writes
the run folder and checkpoints, and hands what it loads to the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mimac import atomic, divergence, preflight
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
from mimac.evaluate import evaluate_method
from mimac.models import build_method
from mimac.models.method import ClusteringMethod
from mimac.runlog import RunLog
from mimac.views import ViewMaker

FINAL_METRICS = "final_metrics.json"
CONFIG_FILE = "config.yaml"
HEAD_SELECTION = "lowest unsupervised loss of each sub-head on the data (no labels)"


class NonFiniteLossError(DivergenceError):
    """The loss became NaN or infinite; raised before the optimizer step, nothing is saved."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an unavailable CUDA request raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return dev


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


def _autocast(cfg: Config, device: torch.device) -> Callable[[], Any]:
    if device.type == "cuda" and cfg.bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@dataclasses.dataclass
class Setup:
    """Everything a run (or an evaluation) builds from its config."""

    cfg: Config
    device: torch.device
    images: torch.Tensor  # (N, C, H, W) uint8 on device
    labels: torch.Tensor  # (N,) int64 on CPU
    method: ClusteringMethod
    views: ViewMaker
    autocast: Callable[[], Any]
    dist: DistInfo = mdist.SINGLE
    num_classes: int | None = None  # the dataset's, for the metrics (None: unlabelled)


def load_run_data(cfg: Config) -> Any:
    """The run's dataset (``data.*``). With ``data.limit``: a fixed random subset of that
    many images (seed 0, not the run seed, so every run and method sees the same images),
    in dataset order."""
    from mimac.data import load_dataset

    ds = load_dataset(cfg.data.name, cfg.data.root, cfg.data.split, **(
        {"image_size": cfg.data.image_size} if cfg.data.image_size is not None else {}))
    limit = cfg.data.limit
    if limit is None or limit >= len(ds):
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return dataclasses.replace(ds, images=ds.images[keep], labels=ds.labels[keep])


def build(cfg: Config, info: DistInfo = mdist.SINGLE) -> Setup:
    """Load the data, build the augmentation and the method (seeded) on the device
    (this rank's GPU under torchrun; batch norms synchronised if ``sync_batchnorm``)."""
    from mimac.data.augment import preset

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = mdist.rank_device(resolve_device(cfg.device), info)
    ds = load_run_data(cfg)
    if len(ds) < 2:
        raise ValueError(f"dataset {cfg.data.name!r} split {cfg.data.split!r} has {len(ds)} images")
    k = cfg.model.num_clusters or ds.num_classes
    if not k:
        raise ValueError(f"dataset {cfg.data.name!r} has no labels: set model.num_clusters=K")
    base = dataclasses.replace(preset(cfg.data.name), **cfg.augment)
    channels, side = ds.images.shape[1], ds.images.shape[-1]
    torch.manual_seed(cfg.seed)  # the model's initialisation
    method = build_method(cfg, channels, base.size or side, k).to(device)
    if cfg.sync_batchnorm and info.distributed:
        if device.type != "cuda":
            raise ValueError("sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm has "
                             "no CPU implementation); set sync_batchnorm=false for a CPU run")
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    views = ViewMaker(base, method.view_specs(), side)
    return Setup(cfg, device, ds.images.to(device), ds.labels.cpu(), method, views,
                 _autocast(cfg, device), info, ds.num_classes or None)


def _evaluate(s: Setup, batch_size: int) -> dict[str, Any]:
    """``evaluate_method`` on the run's method and data."""
    return evaluate_method(s.method, s.images, s.labels, s.views, batch_size=batch_size,
                           eval_batch_size=s.cfg.eval_batch_size, seed=s.cfg.seed,
                           num_classes=s.num_classes, autocast=s.autocast)


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


def _apply_checkpoint(cfg: Config, state: dict[str, Any], path: Path, method: ClusteringMethod,
                      optimizer: torch.optim.Optimizer) -> None:
    """Check that ``state`` belongs to this run (ResumeMismatch if not) and load it into the
    model and optimizer (a shape mismatch raises: the loader falls back to the previous one)."""
    check_resume(config_to_dict(cfg), state, path, may_change=RESUME_KEYS)
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


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


class _StepLosses(nn.Module):
    """The method's :meth:`losses` as a ``forward``, so that DDP's hooks see every step."""

    def __init__(self, method: ClusteringMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.method.losses(views)


def _quiet(_: str) -> None:
    pass


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
        ValueError, FileNotFoundError: bad config or data; a resume the checkpoint
            contradicts (``ResumeMismatch``: fewer epochs, a differing config).
        mimac.atomic.RunFileError: a run file could not be written (names it and why).

    On resume, a checkpoint whose weights make the very first step diverge is moved
    aside (``.corrupt``) and the run restarts from ``ckpt_prev.pt``.
    """
    info = mdist.join(cfg.device)
    try:
        while True:
            started_ns = time.time_ns()
            try:
                return _train(cfg, info, resume, stop_after_epoch, log if info.is_main else _quiet)
            except DivergenceError as exc:
                if resume is None or exc.step != 1:
                    raise
                _reject_resumed_checkpoint(Path(resume), exc, started_ns, info)
    finally:
        mdist.leave(info)


def _reject_resumed_checkpoint(run_dir: Path, exc: DivergenceError, started_ns: int,
                               info: DistInfo) -> None:
    """The first step after resuming failed: the checkpoint's weights are at fault, not the
    learning rate. Set ``ckpt_last.pt`` aside and return (the caller retries from
    ``ckpt_prev.pt``), or raise CheckpointError naming the file when none is left."""
    found = mdist.on_main(lambda: set_aside_resumed(run_dir, exc.epoch - 1, started_ns), info)
    if found is None:  # not the checkpoint resumed from: a divergence of this run
        raise exc
    name, retry = found
    why = f"its weights make the first step diverge (epoch {exc.epoch}, step 1: {exc.cause})"
    if not retry:
        raise CheckpointError(f"cannot resume {run_dir}: {name} (epoch {exc.epoch - 1}) is "
                              f"unusable, {why}, and no earlier checkpoint is left") from exc
    warnings.warn(f"checkpoint {run_dir / name} is unusable ({why}); moved aside as "
                  f"{name}.corrupt, trying the previous one", RuntimeWarning, stacklevel=3)


def _global_batch(cfg: Config, n: int, info: DistInfo) -> int:
    bs = min(cfg.batch_size, n)
    if bs % info.world_size:
        raise ValueError(f"batch_size {bs}{' (capped at the dataset size)' if bs < cfg.batch_size else ''} "
                         f"must be divisible by the number of ranks ({info.world_size}): it is the "
                         "global batch, split evenly over the ranks")
    return bs


def _train(cfg: Config, info: DistInfo, resume: str | Path | None, stop_after_epoch: int | None,
           log: Callable[[str], None]) -> dict[str, Any] | None:
    wall0 = time.perf_counter()
    s = build(cfg, info)
    method, device = s.method, s.device
    preflight.check_kernel_backend(cfg.kernel_backend, device)  # before anything is written
    n = s.images.shape[0]
    bs = _global_batch(cfg, n, info)
    steps = n // bs  # drop the ragged tail: every step sees a full batch
    optimizer = build_optimizer(method, cfg.optim)
    gens = {"data_gen": torch.Generator().manual_seed(cfg.seed),
            "aug_gen": torch.Generator().manual_seed(cfg.seed + 1)}
    start, train_time = 0, 0.0
    if resume is not None:
        run_dir = Path(resume)
        state, path = mdist.on_main(lambda: load_checkpoint(
            run_dir, apply=lambda st, p: _apply_checkpoint(cfg, st, p, method, optimizer)), info)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        monitor = LossMonitor(state.get("loss_history"))
        _set_rng_state(state["rng"], gens)
        start, train_time = int(state["epoch"]), float(state.get("train_time_s", 0.0))
        log(f"resuming {run_dir} from {path.name} (epoch {start})")
        if int(state.get("world_size", 1)) != info.world_size:
            log(f"note: the checkpoint was written by {state.get('world_size', 1)} rank(s), this "
                f"run has {info.world_size}: the augmentation streams differ from an unbroken run")
    else:
        run_dir = mdist.on_main(lambda: _new_run_dir(cfg), info)
        monitor = LossMonitor()
    if info.is_main:
        atomic.remove_leftovers(run_dir)  # temporary files of writes a kill interrupted
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    s = dataclasses.replace(s, cfg=cfg)
    runlog = RunLog(run_dir, upto_epoch=start) if info.is_main else None
    if info.is_main:
        save_config(cfg, run_dir / CONFIG_FILE)
    step_fn: nn.Module = _StepLosses(method)
    if info.distributed:
        step_fn = nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.may_skip_parameters())
    ranks = f", {info.world_size} ranks of {bs // info.world_size} rows" if info.distributed else ""
    log(f"run folder: {run_dir}  ({cfg.method} on {cfg.data.name}/{cfg.data.split}, {n} images, "
        f"{method.num_clusters} clusters, device {device}, {torch.get_num_threads()} threads, "
        f"batch {bs}{ranks})")
    evaluation: dict[str, Any] | None = None
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            if epoch == method.prepare_epoch() + 1:  # once; a resumed run past it has its result
                # On the whole data by rank 0, then handed to every rank. Synchronised batch
                # norms in train mode gather statistics from every rank on each forward, so
                # then all ranks run it (on identical batches: the same result).
                if info.is_main or (info.distributed and cfg.sync_batchnorm):
                    method.prepare(s.views.clean(s.images[sl].float().div_(255.0))
                                   for sl in (slice(i, i + bs) for i in range(0, n, bs)))
                mdist.broadcast_module(method, info)
            means = _train_epoch(s, step_fn, optimizer, gens, epoch, steps, bs, monitor=monitor)
            dt = time.perf_counter() - t0
            train_time += dt
            if info.is_main:
                row: dict[str, Any] = {"epoch": epoch, "time_s": dt, "images_per_s": steps * bs / dt,
                                       "lr": optimizer.param_groups[0]["lr"],
                                       **{f"loss_{k}": v for k, v in means.items()}}
                if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                    evaluation = _evaluate(s, bs)
                    row.update({k: evaluation[k] for k in
                                ("acc", "nmi", "ari", "mean_acc", "mean_nmi", "mean_ari", "head")
                                if k in evaluation})
            # Before anything of this epoch is saved; rank 0 decides, every rank stops with it.
            ev_now = evaluation if info.is_main and "head" in row else None
            mdist.on_main(functools.partial(divergence.check_epoch, method, ev_now, epoch), info)
            if info.is_main:
                runlog.append(row)
                save_checkpoint(run_dir, {
                    "epoch": epoch, "model": method.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": _rng_state(gens),
                    "train_time_s": train_time, "world_size": info.world_size,
                    "config": config_to_dict(cfg), "loss_history": monitor.state()})
                if "acc" in row or "head" in row or epoch == start + 1:  # eval epochs + the first
                    log(_summary(row, cfg.epochs))
            if stop_after_epoch is not None and stop_after_epoch <= epoch < cfg.epochs:
                return None
    finally:
        if runlog is not None:
            runlog.close()

    def finish() -> dict[str, Any]:
        ev = evaluation
        if ev is None:  # resumed a finished run: evaluate the checkpoint
            ev = _evaluate(s, bs)
        final = _final_metrics(cfg, s, ev, train_time, runlog.rows)
        final["wall_time_s"] = round(time.perf_counter() - wall0, 3)  # data, training, eval
        flags = divergence.flag_degenerate(final)
        write_outputs(run_dir, final, ev["pred"])
        log(format_metrics(final))
        for text in flags:
            log(f"WARNING: {text}")
        return final

    return mdist.on_main(finish, info)


def _train_epoch(s: Setup, step_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 gens: dict[str, torch.Generator], epoch: int, steps: int, bs: int, *,
                 monitor: LossMonitor | None = None) -> dict[str, float]:
    """One pass over a fresh permutation; returns the mean of each loss term (over ranks too).

    Every rank draws the same global permutation and takes its own slice of each
    global batch; under torchrun the augmentation generator is reseeded per epoch
    and rank, so any rank's views are reproducible without saving its state.
    """
    from tqdm.auto import tqdm

    cfg, method, info = s.cfg, s.method, s.dist
    method.train()
    method.on_epoch_start(epoch)
    perm = torch.randperm(s.images.shape[0], generator=gens["data_gen"]).to(s.device)
    if info.distributed:
        gens["aug_gen"].manual_seed(_rank_seed(cfg.seed, epoch, info.rank))
    local = bs // info.world_size
    offset = info.rank * local
    sums: dict[str, float] = {}
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}",
               disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    method.group = info.group  # the losses span every rank during training steps only
    try:
        for step in bar:
            factor = lr_factor(cfg.optim, cfg.epochs, epoch - 1 + step / steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            first = step * bs + offset
            x = s.images[perm[first:first + local]].float().div_(255.0)
            views = s.views(x, gens["aug_gen"])
            with s.autocast():
                terms = step_fn(views)
            names = list(terms)
            stacked = torch.stack([terms[k].detach().float() for k in names])
            values = (mdist.all_reduce_(stacked, info.group) / info.world_size).tolist()  # one sync
            total = values[names.index("total")]
            if not math.isfinite(total):  # the same rank mean on every rank: all stop together
                detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values))
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, step {step + 1}/{steps} ({detail}); "
                    f"stopped before the optimizer step, no checkpoint written for this epoch "
                    f"(the last good one is epoch {epoch - 1}). Try a lower optim.lr.",
                    epoch, step + 1, f"non-finite loss ({detail})")
            if monitor is not None:  # a finite loss exploding against the run's own history
                monitor.check(total, epoch, step + 1, steps)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            method.after_step()
            for k, v in zip(names, values):
                sums[k] = sums.get(k, 0.0) + v
            rate = (step + 1) * bs / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{total:.4f}", img_s=f"{rate:.0f}", refresh=False)
    finally:
        method.group = None
    bar.close()
    return {k: v / steps for k, v in sums.items()}


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation seed of one rank in one epoch (distinct streams, fixed by the run seed)."""
    return (seed + 1) * 1_000_003 + epoch * 1_009 + rank


def _summary(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  loss {row.get('loss_total', float('nan')):.4f}  "
            f"{row['images_per_s']:.0f} img/s")
    if "acc" in row:
        text += f"  ACC {row['acc']:.4f} NMI {row['nmi']:.4f} ARI {row['ari']:.4f} (head {row['head']})"
    elif "head" in row:
        text += f"  (head {row['head']})"
    return text


def _final_metrics(cfg: Config, s: Setup, ev: dict[str, Any], train_time: float,
                   rows: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), float)]
    dev = s.device
    out = {k: v for k, v in ev.items() if k != "pred"}
    out.update({
        "method": cfg.method, "dataset": cfg.data.name, "split": cfg.data.split,
        "num_images": int(s.images.shape[0]), "num_clusters": s.method.num_clusters,
        "num_heads": s.method.num_heads, "head_selection": HEAD_SELECTION,
        "epochs": cfg.epochs, "seed": cfg.seed, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "bf16": dev.type == "cuda" and cfg.bf16,
        "world_size": s.dist.world_size, "batch_size": min(cfg.batch_size, int(s.images.shape[0])),
        "train_time_s": round(train_time, 3),
        "images_per_s": float(np.median(rates)) if rates else None,
        "torch": torch.__version__,
    })
    if dev.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    return out


def write_outputs(run_dir: Path, final: dict[str, Any], pred: np.ndarray,
                  name: str = FINAL_METRICS) -> None:
    """Final metrics JSON, predictions, and the plots, each atomically.

    Raises:
        mimac.atomic.RunFileError: the metrics or the predictions could not be written
            (names the file and the cause; the previous file is kept). A plot that fails
            is reported and skipped: the results are already written.
    """
    atomic.write_text(run_dir / name, json.dumps(final, indent=2))
    with atomic.replacing(run_dir / "predictions.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, pred)
    try:
        from mimac.plots import plot_run

        plot_run(run_dir, final)
    except Exception as exc:  # noqa: BLE001 -- matplotlib missing, disk full, bad metrics.csv
        print(f"plots skipped: {atomic.os_error_message(exc) if isinstance(exc, OSError) else exc}")


def format_metrics(m: dict[str, Any]) -> str:
    """One block of text with ACC/NMI/ARI of the chosen head and the mean over heads."""
    head = f"sub-head {m['head']} of {m['num_heads']}, chosen without labels"
    if "acc" not in m:
        return f"{m['dataset']}/{m['split']}: unlabelled, metrics skipped ({head}); cluster sizes {m['cluster_sizes']}"
    text = (f"{m['method']} on {m['dataset']} (split {m['split']}, {m.get('n_labelled')} labelled):\n"
            f"  ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}   [{head}]")
    if m.get("mapping") == "majority":
        text += "\n  ACC by majority mapping (more clusters than classes), not one-to-one"
    if m["num_heads"] > 1:
        text += (f"\n  mean over {m['num_heads']} heads: ACC {m['mean_acc']:.4f} +- {m['std_acc']:.4f}"
                 f"  NMI {m['mean_nmi']:.4f}  ARI {m['mean_ari']:.4f}")
    if m.get("train_time_s") is not None:
        text += f"\n  training time {m['train_time_s']:.1f} s on {m['device']}"
        if m.get("wall_time_s") is not None:
            text += f" (wall time with data loading and evaluation {m['wall_time_s']:.1f} s)"
    return text


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Recompute the metrics of a run from its newest readable checkpoint.

    ``overrides`` change the run's config for the evaluation only, e.g.
    ``["data.split=test"]`` for the train -> test protocol. The result is also
    written to ``eval_metrics.json`` (``eval_metrics_<split>.json`` if the split differs).
    """
    from mimac.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE, overrides or [])
    s = build(cfg)
    state, path = load_checkpoint(run_dir, quarantine=False,
                                  apply=lambda st, _: s.method.load_state_dict(st["model"]))
    ev = _evaluate(s, min(cfg.batch_size, len(s.images)))
    final = _final_metrics(cfg, s, ev, float(state.get("train_time_s", 0.0)), [])
    final["checkpoint"], final["checkpoint_epoch"] = path.name, int(state["epoch"])
    flags = divergence.flag_degenerate(final)
    saved = json.loads((run_dir / FINAL_METRICS).read_text()) if (run_dir / FINAL_METRICS).exists() else {}
    name = "eval_metrics.json" if cfg.data.split == saved.get("split", cfg.data.split) else f"eval_metrics_{cfg.data.split}.json"
    atomic.write_text(run_dir / name, json.dumps(final, indent=2))
    log(f"{path.name} (epoch {state['epoch']}):")
    log(format_metrics(final))
    for text in flags:
        log(f"WARNING: {text}")
    return final
