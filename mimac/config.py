"""Run configuration: nested dataclasses, YAML files and ``key=value`` overrides.

Three layers, applied in order: the dataclass defaults (each method's section holds
its paper's hyper-parameters; the run-level keys a small CPU run), a YAML file, and
command-line overrides (``epochs=50``, ``optim.lr=0.1``, ``data.name=fashion_mnist``).
Each dataset's tuning lives in its file, ``configs/<method>_<dataset>.yaml``;
:func:`resolve_run_config` picks that file when none is given (``mimac train
method=imc_swav`` trains the tuned IMC-SwAV digits run) and says so, or says loudly
that there is none. Every key, value type and value is checked before any data is
read: an unknown key, a wrong type or a bad value raises ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

SPLITS = ("all", "train", "test", "unlabeled", "train+unlabeled")  # the last two: STL-10
#: The values of ``method`` and ``data.name`` (``mimac.models.METHODS`` and
#: ``mimac.data.DATASETS``, named here so that a config is checked without importing torch).
METHOD_NAMES = ("crlc", "imc_swav", "dec_contrastive")
DATASET_NAMES = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar20", "stl10", "folder")
#: Image side of each dataset with fixed-size images (``folder``: ``data.image_size``).
IMAGE_SIDES = {"digits": 8, "fashion_mnist": 28, "mnist": 28, "cifar10": 32, "cifar20": 32,
               "stl10": 96}
BACKBONE_NAMES = ("small_cnn", "resnet18", "resnet34", "auto")
KERNEL_BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
#: Environment variable naming the folder of the tuned ``<method>_<dataset>.yaml`` files
#: (default: ``configs/`` next to the package, as in a source checkout, else ``./configs``).
CONFIG_DIR_ENV = "MIMAC_CONFIGS"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class DataConfig:
    """Which data to cluster.

    ``split``: ``all`` (train+test merged, as CC/IIC), ``train`` or ``test``
    (train on ``train``, then ``mimac eval RUN data.split=test``, as SCAN);
    STL-10 also ``unlabeled`` and ``train+unlabeled``. ``image_size``: the
    ``folder`` dataset only (resize to this square side).
    """

    name: str = "digits"
    root: str | None = None
    split: str = "all"
    image_size: int | None = None
    # Use a fixed random subset of this many images (seed 0, the same for every run
    # seed and method, so runs stay comparable); None: all of them. For quick CPU runs.
    limit: int | None = None


@dataclass
class ModelConfig:
    """Backbone and cluster count shared by all methods."""

    backbone: str = "small_cnn"  # resnet18 | resnet34 | small_cnn | auto
    width: int = 16  # first-stage channels of small_cnn (ignored by the ResNets)
    num_clusters: int | None = None  # None: the dataset's number of classes


@dataclass
class CRLCConfig:
    """CRLC hyper-parameters; defaults are the paper's."""

    heads: int = 10
    alpha: float = 0.1  # smoothing p~ = (1 - alpha) p + alpha / C
    lambda_fc: float = 10.0
    lambda_ent: float = 1.0
    temperature: float = 0.1  # feature NT-Xent
    proj_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone's feature size (512 for ResNets)
    logit_bound: float = 25.0
    penalty_weight: float = 0.01
    head_batch_norm: bool = False


@dataclass
class IMCSwAVConfig:
    """IMC-SwAV hyper-parameters; defaults are the paper's.

    Multi-crop sizes are in pixels and must fit in the image (checked when the
    method is built); ``None`` sizes: large = the image size, small = 18/28 of it.
    """

    large_crops: int = 2
    small_crops: int = 4
    large_size: int | None = None
    small_size: int | None = None
    large_scale: tuple[float, float] | None = None  # None: the run's augment.crop_scale
    small_scale: tuple[float, float] = (0.08, 0.4)
    proj_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone's feature size (512 for ResNets)
    prototypes: int = 1000
    temperature: float = 0.1  # softmax(u / tau) of the swapped prediction and of the MI
    epsilon: float = 0.05  # Sinkhorn entropic regularisation
    sinkhorn_iters: int = 3
    classifier_hidden: int = 1024
    entropy_weight: float = 4.0  # L_MI = H(Y|U) - w * H(Y)
    logit_bound: float = 5.0
    penalty_weight: float = 0.01
    freeze_prototypes_epochs: int | None = None  # None: optim.warmup_epochs


@dataclass
class DECContrastiveConfig:
    """DEC + contrastive + anchor hyper-parameters; paper defaults."""

    proj_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone's feature size
    temperature: float = 0.5  # NT-Xent of the instance loss
    instance_weight: float = 1.0
    cluster_weight: float = 1.0
    anchor_weight: float = 1.0
    # Epochs of instance loss only before k-means initialises the centres on the
    # learned features (0: k-means on the initial network's features before epoch 1).
    pretrain_epochs: int = 0
    kmeans_restarts: int = 5
    kmeans_iters: int = 100


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (per-step, stateless: resumes exactly)."""

    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    weight_decay: float = 1e-4
    schedule: str = "constant"  # constant | cosine | step
    warmup_epochs: int = 0  # linear warm-up, any schedule
    milestones: list[int] = field(default_factory=list)  # step schedule: epochs
    gamma: float = 0.1  # step schedule factor
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class Config:
    """A complete training run.

    The defaults train CRLC with the paper's hyper-parameters on digits; ``mimac
    train`` with no arguments starts from ``configs/crlc_digits.yaml`` instead (the
    tuned run), see :func:`resolve_run_config`.
    """

    method: str = "crlc"
    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    epochs: int = 100
    # The global batch: under torchrun each of the K ranks takes batch_size / K rows of it
    # (so K must divide it) and the losses see all batch_size rows, as one process would.
    batch_size: int = 256
    # Under torchrun on CUDA: batch-norm statistics over the global batch (SyncBatchNorm);
    # without it each rank normalises with its own rows. Ignored by a single process.
    sync_batchnorm: bool = False
    bf16: bool = True  # bf16 autocast on CUDA; a run's config.yaml records false on a CPU
    # CPU threads for torch; 0: torch's default (all cores). 1 by default: the small
    # digits model is as fast on one core, and stays fast on a busy machine.
    threads: int = 1
    eval_every: int = 10  # epochs between evaluations (the last epoch is always evaluated)
    eval_batch_size: int = 1024
    # mimac_kernels backend. "torch" (the tiled pure-torch one) for the default digits run:
    # at 2x256 rows it is as fast as the C++ CPU kernel, which "auto" would first compile
    # (20-75 s on a fresh 2-core machine). Larger runs should use "auto".
    kernel_backend: str = "torch"
    progress: bool = True  # tqdm bar per epoch
    name: str | None = None  # run name; default "<method>-<dataset>"
    runs_root: str = "runs"
    run_dir: str | None = None  # explicit run folder (default runs_root/<name>-<timestamp>)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Overrides of the dataset's augmentation preset (fields of AugmentConfig); empty: the
    # preset of data.name as it is (the configs/*_digits.yaml runs add brightness jitter).
    augment: dict[str, Any] = field(default_factory=dict)
    crlc: CRLCConfig = field(default_factory=CRLCConfig)
    imc_swav: IMCSwAVConfig = field(default_factory=IMCSwAVConfig)
    dec_contrastive: DECContrastiveConfig = field(default_factory=DECContrastiveConfig)


# ---- conversion and type checks -------------------------------------------------------

def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue  # try the next member of the union
        raise ValueError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, key + ".")
    raise ValueError(
        f"config key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def _unknown_key(key: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r}{hint} (valid here: {', '.join(sorted(choices))})")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise _unknown_key(prefix + str(k), names)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a (possibly partial) nested dict."""
    if not isinstance(values, dict):
        raise ValueError(  # noqa: TRY004 -- every config error is a ValueError
            f"a config must be a mapping of keys to values, got {type(values).__name__}"
        )
    cfg = _build(Config, values)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def flat_keys(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``: configs compared key by key
    (``augment`` stays one value: its entries are compared as a whole)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict) and k != "augment":
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> ``(["optim", "lr"], 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. epochs=50, optim.lr=0.1)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparsable value stays a string; the type check decides
    return key.split("."), value


#: What a resumed run may change: the checkpoint restores the optimizer (learning
#: rate, momentum, weight decay) and the random streams, so any other key would be
#: written to the run's config.yaml without taking effect.
RESUME_KEYS = ("epochs", "eval_every", "eval_batch_size", "progress", "threads", "device",
               "kernel_backend", "data.root")


def check_resume_overrides(overrides: list[str]) -> None:
    """Raise ValueError for an override a resumed run could not honour."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in RESUME_KEYS:
            raise ValueError(
                f"a resumed run keeps its config; {key!r} cannot change on resume (the checkpoint "
                f"restores optimizer and random state). Keys that may: {', '.join(RESUME_KEYS)}")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a nested dict of config values."""
    out = values
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        out = _merge(out, nested)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The dataclass defaults, then the YAML file at ``path`` (if any), then ``overrides``.

    Sections merge key by key (``augment`` too). No file: the defaults as they are
    (use :func:`resolve_run_config` to get a method's tuned file).

    Raises:
        ValueError: unknown key, wrong type, invalid value, unreadable YAML.
        FileNotFoundError: ``path`` does not exist.
    """
    loaded: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of keys to values")
        _build(Config, loaded)  # report unknown keys/types against the file's own keys
    values = _merge(config_to_dict(Config()), loaded)
    return config_from_dict(apply_overrides(values, overrides or []))


def default_config_dir() -> Path:
    """``$MIMAC_CONFIGS``, else ``configs/`` next to the package, else ``./configs``."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV])
    here = Path(__file__).resolve().parent.parent / "configs"
    return here if here.is_dir() else Path("configs")


def tuned_config_path(method: str, dataset: str, config_dir: str | Path | None = None) -> Path:
    """``<config_dir>/<method>_<dataset>.yaml`` (it may not exist)."""
    return Path(config_dir or default_config_dir()) / f"{method}_{dataset}.yaml"


def _override_value(overrides: list[str], key: str, default: Any) -> Any:
    """The last command-line value of ``key`` (dotted), or ``default``."""
    value = default
    for text in overrides:
        path, v = parse_override(text)
        if ".".join(path) == key:
            value = v
    return value


def resolve_run_config(path: str | Path | None, overrides: list[str] | None = None,
                       config_dir: str | Path | None = None) -> tuple[Config, str]:
    """The config of a new run, and one line saying where it came from.

    With ``path``: :func:`load_config` of it. Without: the tuned file of the chosen
    method and dataset (``method=`` and ``data.name=`` from ``overrides``, by default
    CRLC on digits) when it exists, else the dataclass defaults (the papers'
    hyper-parameters, untuned) with a warning line starting ``WARNING``.
    """
    overrides = list(overrides or [])
    if path is not None:
        return load_config(path, overrides), f"config: {path}"
    method = _override_value(overrides, "method", Config.method)
    dataset = _override_value(overrides, "data.name", DataConfig.name)
    tuned = tuned_config_path(str(method), str(dataset), config_dir)
    if tuned.is_file():
        return (load_config(tuned, overrides),
                f"config: {tuned} (tuned for {method} on {dataset}; --config FILE to choose another)")
    cfg = load_config(None, overrides)
    return cfg, (f"WARNING: no tuned config for method {method!r} on {dataset!r} ({tuned} does not "
                 f"exist): training with the paper's hyper-parameters and generic run settings, "
                 f"untuned for this data; results can be far below the tuned ones. "
                 f"Pass --config FILE.yaml to choose one.")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a kill mid-write keeps the old file).

    Raises:
        mimac.atomic.RunFileError: the file could not be written (names it and the cause).
    """
    from mimac import atomic

    atomic.write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"config key {key!r} must be one of {list(choices)}, got {value!r}")


def validate(cfg: Config) -> None:
    """Value checks beyond types (ranges, choices) of the whole config, before any data
    is read; raises ValueError naming the key. Only what needs the images (multi-crop
    sizes against the image size) is checked when the method is built."""
    _check_choice("method", cfg.method, METHOD_NAMES)
    _check_choice("data.name", cfg.data.name, DATASET_NAMES)
    _check_choice("model.backbone", cfg.model.backbone, BACKBONE_NAMES)
    _check_choice("kernel_backend", cfg.kernel_backend, KERNEL_BACKENDS)
    _check_choice("data.split", cfg.data.split, SPLITS)
    _check_choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _check_choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    positive = {
        "epochs": cfg.epochs, "eval_every": cfg.eval_every, "eval_batch_size": cfg.eval_batch_size,
        "model.width": cfg.model.width, "crlc.heads": cfg.crlc.heads,
        "crlc.proj_dim": cfg.crlc.proj_dim, "optim.lr": cfg.optim.lr,
        "crlc.temperature": cfg.crlc.temperature, "crlc.logit_bound": cfg.crlc.logit_bound,
    }
    for key, v in positive.items():
        if not v > 0:
            raise ValueError(f"config key {key!r} must be > 0, got {v}")
    _validate_lr(cfg.optim)
    if cfg.batch_size < 2:
        raise ValueError(f"config key 'batch_size' must be >= 2 (contrastive losses need pairs), got {cfg.batch_size}")
    if cfg.threads < 0:
        raise ValueError(f"config key 'threads' must be >= 0 (0: all cores), got {cfg.threads}")
    if cfg.data.limit is not None and cfg.data.limit < 2:
        raise ValueError(f"config key 'data.limit' must be >= 2 or null (all images), got {cfg.data.limit}")
    if cfg.model.num_clusters is not None and cfg.model.num_clusters < 2:
        raise ValueError(f"config key 'model.num_clusters' must be >= 2, got {cfg.model.num_clusters}")
    if not 0.0 <= cfg.crlc.alpha <= 1.0:
        raise ValueError(f"config key 'crlc.alpha' must be in [0, 1], got {cfg.crlc.alpha}")
    if cfg.optim.weight_decay < 0 or cfg.optim.warmup_epochs < 0:
        raise ValueError("config keys 'optim.weight_decay' and 'optim.warmup_epochs' must be >= 0")
    if not cfg.optim.gamma > 0:
        raise ValueError(f"config key 'optim.gamma' must be > 0 (a negative factor reverses the steps), "
                         f"got {cfg.optim.gamma}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ValueError(f"config key 'optim.min_lr_ratio' must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    weights = {"crlc.lambda_fc": cfg.crlc.lambda_fc, "crlc.lambda_ent": cfg.crlc.lambda_ent,
               "crlc.penalty_weight": cfg.crlc.penalty_weight,
               "imc_swav.entropy_weight": cfg.imc_swav.entropy_weight,
               "imc_swav.penalty_weight": cfg.imc_swav.penalty_weight}
    for key, v in weights.items():
        if not v >= 0:
            raise ValueError(f"config key {key!r} is a loss weight and must be >= 0, got {v}")
    # None means "the default"; 0 would silently mean the same through a truthiness test.
    for key, v in {"crlc.hidden_dim": cfg.crlc.hidden_dim, "imc_swav.hidden_dim": cfg.imc_swav.hidden_dim,
                   "dec_contrastive.hidden_dim": cfg.dec_contrastive.hidden_dim,
                   "data.image_size": cfg.data.image_size}.items():
        if v is not None and v < 1:
            raise ValueError(f"config key {key!r} must be >= 1 or null (the default), got {v}")
    if cfg.data.image_size is not None and cfg.data.name != "folder":
        raise ValueError(f"config key 'data.image_size' applies to data.name=folder only, "
                         f"not {cfg.data.name!r} (set it to null)")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if cfg.method == "imc_swav":  # a section only the chosen method reads
        _validate_imc_swav(cfg.imc_swav, IMAGE_SIDES.get(cfg.data.name, cfg.data.image_size))
    if cfg.method == "dec_contrastive":
        _validate_dec_contrastive(cfg.dec_contrastive, cfg.epochs)
    _validate_augment(cfg.augment, cfg.data.name)


#: The largest float32 value: optimizers apply the learning rate to float32 tensors.
_FLOAT32_MAX = 3.4028234663852886e38


def _validate_lr(optim: OptimConfig) -> None:
    """The learning rate, and Adam's first step size lr / (1 - beta1), must fit in float32
    (``optim.lr=1e300`` otherwise passes, then the optimizer fails with an overflow)."""
    for i, b in enumerate(optim.betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"config key 'optim.betas[{i}]' must be in [0, 1), got {b}")
    largest = _FLOAT32_MAX * (1.0 - optim.betas[0] if optim.name in ("adam", "adamw") else 1.0)
    if not math.isfinite(optim.lr) or optim.lr > largest:
        step = " (Adam divides it by 1 - betas[0])" if optim.name != "sgd" else ""
        raise ValueError(f"config key 'optim.lr' must be a finite number of at most {largest:.3g}: "
                         f"the optimizer applies it in float32{step}; got {optim.lr}")


#: IMC-SwAV's smallest crop side (the backbones' smallest input).
MIN_CROP = 4


def _validate_imc_swav(c: IMCSwAVConfig, side: int | None) -> None:
    """``side``: the images' side when known before reading them (None: checked at build)."""
    for key in ("proj_dim", "prototypes", "temperature", "epsilon", "sinkhorn_iters",
                "classifier_hidden", "logit_bound"):
        if not getattr(c, key) > 0:
            raise ValueError(f"config key 'imc_swav.{key}' must be > 0, got {getattr(c, key)}")
    if c.large_crops < 1 or c.small_crops < 0 or c.large_crops + c.small_crops < 2:
        raise ValueError("config keys 'imc_swav.large_crops' >= 1 and 'imc_swav.small_crops' >= 0 "
                         f"must give at least 2 crops, got {c.large_crops} + {c.small_crops}")
    for key in ("large_scale", "small_scale"):
        rng = getattr(c, key)
        if rng is not None and not 0 < rng[0] <= rng[1] <= 1:
            raise ValueError(f"config key 'imc_swav.{key}' must be a range 0 < lo <= hi <= 1, "
                             f"got {rng}")
    for key in ("large_size", "small_size"):
        size = getattr(c, key)
        if size is not None and size < MIN_CROP:
            raise ValueError(f"config key 'imc_swav.{key}' must be at least {MIN_CROP} px or null, "
                             f"got {size}")
        if size is not None and side is not None and size > side:
            raise ValueError(f"config key 'imc_swav.{key}' is {size} px but the images are {side} "
                             f"px: multi-crop sizes must fit in the image (set it <= {side})")
    if c.large_size is not None and c.small_size is not None and c.small_size > c.large_size:
        raise ValueError(f"config key 'imc_swav.small_size' ({c.small_size}) must not exceed "
                         f"'imc_swav.large_size' ({c.large_size})")
    if c.freeze_prototypes_epochs is not None and c.freeze_prototypes_epochs < 0:
        raise ValueError(f"config key 'imc_swav.freeze_prototypes_epochs' must be >= 0 or null, "
                         f"got {c.freeze_prototypes_epochs}")


def _validate_dec_contrastive(c: DECContrastiveConfig, epochs: int) -> None:
    for key in ("proj_dim", "temperature", "kmeans_restarts", "kmeans_iters"):
        if not getattr(c, key) > 0:
            raise ValueError(f"config key 'dec_contrastive.{key}' must be > 0, got {getattr(c, key)}")
    for key in ("instance_weight", "cluster_weight", "anchor_weight", "pretrain_epochs"):
        if getattr(c, key) < 0:
            raise ValueError(f"config key 'dec_contrastive.{key}' must be >= 0, got {getattr(c, key)}")
    if c.pretrain_epochs >= epochs:
        raise ValueError(f"config key 'dec_contrastive.pretrain_epochs' ({c.pretrain_epochs}) "
                         f"must be below 'epochs' ({epochs}): the clusters are trained after it")


def _validate_augment(overrides: dict[str, Any], dataset: str) -> None:
    """Check ``augment`` overrides against the fields of ``mimac.data.augment.AugmentConfig``
    and the values they give with the dataset's preset."""
    if not overrides:
        return
    try:
        from mimac.data.augment import AugmentConfig, preset
    except ImportError:  # data layer absent: the trainer reports it when it needs it
        return
    hints = typing.get_type_hints(AugmentConfig)
    names = [f.name for f in dataclasses.fields(AugmentConfig)]
    for k, v in overrides.items():
        if k not in names:
            raise _unknown_key(f"augment.{k}", names)
        overrides[k] = _coerce(v, hints[k], f"augment.{k}")
    try:
        dataclasses.replace(preset(dataset), **overrides)
    except ValueError as exc:
        raise ValueError(f"config key 'augment': {exc}") from exc
