"""What a run (or an evaluation) builds from its config: device, data, views, method."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from mimac import distributed as mdist
from mimac.config import Config
from mimac.distributed import DistInfo
from mimac.models import build_method
from mimac.models.method import ClusteringMethod
from mimac.views import ViewMaker


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an unavailable CUDA request raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return dev


@dataclasses.dataclass
class Setup:
    """Everything a run (or an evaluation) builds from its config.

    ``cfg.bf16`` says what is applied: False on a device where bf16 autocast is not used.
    """

    cfg: Config
    device: torch.device
    images: torch.Tensor  # (N, C, H, W) uint8 on device
    labels: torch.Tensor  # (N,) int64 on CPU, -1 where unlabelled
    method: ClusteringMethod
    views: ViewMaker
    dist: DistInfo = mdist.SINGLE
    num_classes: int | None = None  # the dataset's, for the metrics (None: unlabelled)
    class_names: list[str] | None = None  # the dataset's, in label order (folder datasets)
    files: list[str] | None = None  # the image file of each row (folder datasets)

    def autocast(self) -> Any:
        """bf16 autocast on CUDA when ``cfg.bf16``, else a no-op context."""
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


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
    files = [ds.files[i] for i in keep.tolist()] if ds.files else ds.files
    return dataclasses.replace(ds, images=ds.images[keep], labels=ds.labels[keep], files=files)


def build(cfg: Config, info: DistInfo = mdist.SINGLE) -> Setup:
    """Load the data, build the augmentation and the method (seeded) on the device
    (this rank's GPU under torchrun; batch norms synchronised if ``sync_batchnorm``).

    Raises:
        ValueError: also when ``kernel_backend`` cannot run on the device (checked first:
            before the data are read and before a run folder is created).
    """
    from mimac import preflight
    from mimac.data.augment import preset

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = mdist.rank_device(resolve_device(cfg.device), info)
    preflight.check_kernel_backend(cfg.kernel_backend, device)
    cfg = dataclasses.replace(cfg, bf16=cfg.bf16 and device.type == "cuda")
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
    return Setup(cfg=cfg, device=device, images=ds.images.to(device), labels=ds.labels.cpu(),
                 method=method, views=ViewMaker(base, method.view_specs(), side), dist=info,
                 num_classes=ds.num_classes or None, class_names=ds.class_names or None,
                 files=ds.files or None)


def evaluate(s: Setup, batch_size: int) -> dict[str, Any]:
    """``mimac.evaluate.evaluate_method`` on the run's method and data."""
    from mimac.evaluate import evaluate_method

    return evaluate_method(s.method, s.images, s.labels, s.views, batch_size=batch_size,
                           eval_batch_size=s.cfg.eval_batch_size, seed=s.cfg.seed,
                           num_classes=s.num_classes, autocast=s.autocast)


