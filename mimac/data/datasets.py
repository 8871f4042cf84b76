"""Datasets as whole uint8 tensors: embedded digits, MNIST family (IDX), CIFAR-10/20, STL-10,
and image folders.

Everything is loaded into memory once, channels-first uint8; augmentation then works on whole
batches on the device (:mod:`mimac.data.augment`).

Where the files are looked for (``root``):

* ``root`` given: the dataset's folder itself or its parent (e.g. either
  ``.../cifar-10-batches-py`` or the folder holding it).
* ``root=None``: Fashion-MNIST defaults to the Debian package's
  ``/usr/share/datasets/fashion-mnist``; the others look under ``$MIMAC_DATA``
  (default ``./data``).

Splits: ``"all"`` is train+test merged (the CC/IIC protocol), ``"train"``/``"test"`` the
official halves (SCAN protocol). The digits have no official split: ``"train"`` is the first
1,347 images and ``"test"`` the last 450 (a fixed, unshuffled 75/25 cut, as in
scikit-learn's digits examples, so the test writers are disjoint from most train writers).
STL-10 also has ``"unlabeled"`` (100,000 images, labels -1) and ``"train+unlabeled"``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .formats import read_cifar_pickle, read_idx, read_stl10_images, read_stl10_labels

__all__ = ["DATASETS", "SPLITS", "ImageDataset", "load_dataset"]

DATASETS: tuple[str, ...] = (
    "digits", "fashion_mnist", "mnist", "cifar10", "cifar20", "stl10", "folder",
)
SPLITS: tuple[str, ...] = ("all", "train", "test")
STL10_SPLITS: tuple[str, ...] = SPLITS + ("unlabeled", "train+unlabeled")
DATA_ENV = "MIMAC_DATA"
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DIGITS_TRAIN_SIZE = 1347  # first 1,347 train, last 450 test
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class ImageDataset:
    """A whole dataset in memory.

    Attributes:
        images: ``(N, C, H, W)`` uint8, channels-first.
        labels: ``(N,)`` int64; -1 where unlabelled.
        num_classes: number of ground-truth classes (0 if no labels).
        name: dataset name, e.g. ``"digits"``.
        split: ``"all"``, ``"train"``, ``"test"`` (STL-10 also ``"unlabeled"``,
            ``"train+unlabeled"``).
        class_names: the name of each label (None: the labels are the names).
        files: the image file of each row, for datasets read from image files.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    split: str
    class_names: list[str] | None = None  # label k's name (folder datasets: the folder names)
    files: list[str] | None = None  # the file of each image (folder datasets)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got "
                             f"{tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.labels.shape[0]} labels for {self.images.shape[0]} images")
        if self.files is not None and len(self.files) != self.images.shape[0]:
            raise ValueError(f"{len(self.files)} file names for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def _make(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str, split: str
          ) -> ImageDataset:
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
                        num_classes, name, split)


def _check_split(name: str, split: str, allowed: tuple[str, ...] = SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split {split!r} is not valid for {name!r}; use one of {allowed}")


def _default_root() -> Path:
    return Path(os.environ.get(DATA_ENV, "data"))


def _root_hint(given: Path | None) -> str:
    """Where the root came from and how to point it elsewhere (for missing-file errors)."""
    if given is not None:
        source = "data.root"
    elif os.environ.get(DATA_ENV):
        source = f"${DATA_ENV}"
    else:
        source = f"the default ./data (neither data.root nor ${DATA_ENV} is set)"
    return (f" (root from {source}; set data.root=DIR, the root argument of load_dataset, or "
            f"${DATA_ENV}=DIR to the folder that holds the files)")


def _find_dir(root: Path, subdirs: tuple[str, ...], marker: Callable[[Path], bool]
              ) -> Path | None:
    """Return the first of ``root``, ``root/subdir``... for which ``marker`` holds."""
    for d in (root, *(root / s for s in subdirs)):
        if d.is_dir() and marker(d):
            return d
    return None


# ------------------------------------------------------------------------------ digits

def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits  # embedded in the package: no download

    _check_split("digits", split)
    bunch = load_digits()
    # Pixel values are 0..16 counts; scale to the full uint8 range.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    sl = {"all": slice(None), "train": slice(0, DIGITS_TRAIN_SIZE),
          "test": slice(DIGITS_TRAIN_SIZE, None)}[split]
    return _make(images[sl], labels[sl], 10, "digits", split)


# ------------------------------------------------------------------------------ IDX

_IDX_SUBDIRS = {
    "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "fashion"),
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
}


def _idx_file(d: Path, prefix: str, kind: str) -> Path | None:
    """Find e.g. ``train-images-idx3-ubyte`` with its common spellings (``.gz``, ``.idx3``)."""
    for stem in (f"{prefix}-{kind}", f"{prefix}-{kind.replace('-idx', '.idx')}"):
        for suffix in ("", ".gz"):
            if (d / (stem + suffix)).is_file():
                return d / (stem + suffix)
    return None


def _load_idx_dataset(name: str, root: Path | None, split: str) -> ImageDataset:
    _check_split(name, split)
    given = root
    if root is None:
        root = Path(DEFAULT_FASHION_MNIST_ROOT) if name == "fashion_mnist" else _default_root()
    subdirs = _IDX_SUBDIRS[name]
    layout = (f"expected <root>/train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
              f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] (the official IDX "
              f"files; <root> may also hold them in {', '.join(subdirs)})")
    d = _find_dir(root, subdirs, lambda p: _idx_file(p, "train", "images-idx3-ubyte") is not None
                  or _idx_file(p, "t10k", "images-idx3-ubyte") is not None)
    if d is None:
        hint = " (install the Debian package dataset-fashion-mnist)" if name == "fashion_mnist" \
            and given is None else _root_hint(given)
        raise FileNotFoundError(f"{name}: no IDX files found under {root}{hint}; {layout}")
    parts = {"all": ("train", "t10k"), "train": ("train",), "test": ("t10k",)}[split]
    images, labels = [], []
    for prefix in parts:
        img_path = _idx_file(d, prefix, "images-idx3-ubyte")
        lab_path = _idx_file(d, prefix, "labels-idx1-ubyte")
        if img_path is None or lab_path is None:
            raise FileNotFoundError(f"{name}: {prefix} images or labels missing in {d}; {layout}")
        try:
            x, y = read_idx(img_path), read_idx(lab_path)
        except ValueError as err:
            raise ValueError(f"{name}: {err}; {layout}") from err
        if x.ndim != 3 or x.dtype != np.uint8:
            raise ValueError(f"{img_path}: expected (N, H, W) uint8 images, got {x.shape} "
                             f"{x.dtype}; {layout}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{lab_path}: {y.shape} labels for {x.shape[0]} images; {layout}")
        images.append(x[:, None])
        labels.append(y.astype(np.int64))
    y = np.concatenate(labels)
    if y.min() < 0 or y.max() > 9:
        raise ValueError(f"{name}: labels must be 0..9, found {y.min()}..{y.max()}")
    return _make(np.concatenate(images), y, 10, name, split)


# ------------------------------------------------------------------------------ CIFAR

def _load_cifar(name: str, root: Path | None, split: str) -> ImageDataset:
    _check_split(name, split)
    given, root = root, _default_root() if root is None else root
    if name == "cifar10":
        folder, key, classes = "cifar-10-batches-py", b"labels", 10
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files = ["test_batch"]
        layout = (f"expected <root>/{folder}/data_batch_1..5 and test_batch "
                  f"(the official python pickles; root may also be the folder itself)")
    else:
        folder, key, classes = "cifar-100-python", b"coarse_labels", 20
        train_files, test_files = ["train"], ["test"]
        layout = (f"expected <root>/{folder}/train and test (the official CIFAR-100 python "
                  f"pickles, read with their 20 coarse_labels; root may also be the folder "
                  f"itself)")
    files = {"all": train_files + test_files, "train": train_files, "test": test_files}[split]
    d = _find_dir(root, (folder,), lambda p: (p / files[0]).is_file())
    if d is None:
        raise FileNotFoundError(f"{name}: {files[0]} not found under {root}{_root_hint(given)}; "
                                f"{layout}")
    images, labels = [], []
    for f in files:
        if not (d / f).is_file():
            raise FileNotFoundError(f"{name}: {d / f} is missing; {layout}")
        try:
            x, y = read_cifar_pickle(d / f, key)
        except ValueError as err:
            raise ValueError(f"{name}: {err}; {layout}") from err
        images.append(x)
        labels.append(y)
    y = np.concatenate(labels)
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"{name}: labels must be 0..{classes - 1}, found {y.min()}..{y.max()}")
    return _make(np.concatenate(images), y, classes, name, split)


# ------------------------------------------------------------------------------ STL-10

def _load_stl10(root: Path | None, split: str) -> ImageDataset:
    _check_split("stl10", split, STL10_SPLITS)
    given, root = root, _default_root() if root is None else root
    layout = ("expected <root>/stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin "
              "and (for the unlabeled splits) unlabeled_X.bin (the official binary files; "
              "root may also be the stl10_binary folder itself)")
    parts = {"all": ("train", "test"), "train": ("train",), "test": ("test",),
             "unlabeled": ("unlabeled",), "train+unlabeled": ("train", "unlabeled")}[split]
    first = f"{parts[0]}_X.bin"
    d = _find_dir(root, ("stl10_binary",), lambda p: (p / first).is_file())
    if d is None:
        raise FileNotFoundError(f"stl10: {first} not found under {root}{_root_hint(given)}; "
                                f"{layout}")
    images, labels = [], []
    for part in parts:
        x_path = d / f"{part}_X.bin"
        if not x_path.is_file():
            raise FileNotFoundError(f"stl10: {x_path} is missing; {layout}")
        try:
            x = read_stl10_images(x_path)
            if part == "unlabeled":
                y = np.full(x.shape[0], -1, dtype=np.int64)
            else:
                y_path = d / f"{part}_y.bin"
                if not y_path.is_file():
                    raise FileNotFoundError(f"stl10: {y_path} is missing; {layout}")
                y = read_stl10_labels(y_path, x.shape[0])
        except ValueError as err:
            raise ValueError(f"stl10: {err}; {layout}") from err
        images.append(x)
        labels.append(y)
    num_classes = 0 if split == "unlabeled" else 10
    return _make(np.concatenate(images), np.concatenate(labels), num_classes, "stl10", split)


# ------------------------------------------------------------------------------ folder

def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _is_high_bit(mode: str) -> bool:
    """32-bit integer or 16-bit greyscale (PIL modes ``I`` and ``I;16*``)."""
    return mode == "I" or mode.startswith("I;16")


def _is_grey(mode: str) -> bool:
    return mode in {"L", "1", "LA"} or _is_high_bit(mode)


def _to_uint8(im):
    """8-bit image of any PIL mode; 16-bit greyscale is scaled (>> 8), not clipped at 255.

    Mode ``"I"`` (32-bit) holds 16-bit PNGs in older Pillow versions: values above 255
    are read as 16-bit data, values up to 255 as 8-bit data.
    """
    from PIL import Image

    if _is_high_bit(im.mode):
        arr = np.asarray(im).astype(np.int64)
        if im.mode != "I" or arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return im


def _read_image(path: Path, mode: str, image_size: int | None):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = _to_uint8(im).convert(mode)
            if image_size is not None and im.size != (image_size, image_size):
                # Shorter side to image_size, then a centre crop: keeps the aspect ratio.
                w, h = im.size
                s = image_size / min(w, h)
                nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - image_size) // 2, (nh - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as err:  # e.g. a truncated file: its header read fine, its pixels do not
        raise ValueError(f"folder: cannot read image {path} ({err})") from err
    return arr[:, :, None] if arr.ndim == 2 else arr


_FOLDER_LAYOUT = (
    "expected <root>/<class_name>/*.png|jpg (labelled, classes in sorted folder order) or "
    "<root>/*.png|jpg (unlabelled); or the same under <root>/train and <root>/test, which "
    "split='train'/'test' pick and split='all' merges"
)


def _folder_files(d: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Image files of one folder with their labels (-1: unlabelled), and the class names."""
    if not d.is_dir():
        raise FileNotFoundError(f"folder: {d} is not a directory; {_FOLDER_LAYOUT}")
    class_dirs = sorted(p for p in d.iterdir() if p.is_dir() and _image_files(p))
    flat = _image_files(d)
    if class_dirs and flat:
        raise ValueError(f"folder: {d} holds both images and class folders "
                         f"({flat[0].name}, {class_dirs[0].name}/); {_FOLDER_LAYOUT}")
    if class_dirs:
        files = [(f, k) for k, c in enumerate(class_dirs) for f in _image_files(c)]
    else:
        files = [(f, -1) for f in flat]
    if not files:
        raise FileNotFoundError(f"folder: no images under {d}; {_FOLDER_LAYOUT}")
    return files, [c.name for c in class_dirs]


def _load_folder(root: Path | None, split: str, image_size: int | None) -> ImageDataset:
    from PIL import Image

    _check_split("folder", split)
    if root is None:
        raise ValueError(f"folder: no image folder given: set data.root=<your image folder> "
                         f"(the root argument of load_dataset); {_FOLDER_LAYOUT}")
    parts = [root / p for p in ("train", "test") if (root / p).is_dir()]
    if split != "all":
        parts = [root / split]
    elif not parts:
        parts = [root]
    files: list[tuple[Path, int]] = []
    names: list[str] | None = None
    for d in parts:
        part_files, part_names = _folder_files(d)
        if names is not None and part_names != names:
            raise ValueError(f"folder: {parts[0]} and {d} hold different classes "
                             f"({names} vs {part_names}); split='all' merges them")
        names = part_names
        files += part_files
    d = parts[0] if len(parts) == 1 else root
    # First pass reads headers only (lazy open): pick one mode and check the sizes agree.
    modes, sizes = set(), set()
    for f, _ in files:
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
                sizes.add(im.size)
        except OSError as err:
            raise ValueError(f"folder: cannot read image {f} ({err})") from err
    mode = "L" if all(_is_grey(m) for m in modes) else "RGB"
    if image_size is None and len(sizes) > 1:
        raise ValueError(f"folder: images under {d} have different sizes "
                         f"({', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:3])}...); set "
                         f"data.image_size=<side> (the image_size argument of load_dataset) "
                         f"to resize them")
    images = np.stack([_read_image(f, mode, image_size) for f, _ in files]).transpose(0, 3, 1, 2)
    labels = np.array([k for _, k in files], dtype=np.int64)
    ds = _make(images, labels, len(names or []), "folder", split)
    return dataclasses.replace(ds, class_names=list(names) if names else None,
                               files=[str(f) for f, _ in files])


# ------------------------------------------------------------------------------ entry point

def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "all", *,
                 image_size: int | None = None) -> ImageDataset:
    """Load a whole dataset into memory.

    Args:
        name: one of :data:`DATASETS`.
        root: where the files are (the dataset folder or its parent); see the module
            docstring for defaults. Ignored for ``"digits"``; required for ``"folder"``.
        split: ``"all"`` (train+test), ``"train"`` or ``"test"``; STL-10 also
            ``"unlabeled"`` and ``"train+unlabeled"``.
        image_size: ``"folder"`` only: resize (shorter side, then centre crop) to this square
            side; required when the images differ in size.

    Returns:
        :class:`ImageDataset` with ``images`` ``(N, C, H, W)`` uint8 and ``labels`` ``(N,)``.

    Raises:
        ValueError: unknown name or split, malformed files (the message names the expected
            layout).
        FileNotFoundError: missing files (the message names the expected layout).

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.images.shape, ds.num_classes
        (torch.Size([1797, 1, 8, 8]), 10)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if image_size is not None and name != "folder":
        raise ValueError(f"image_size applies to the 'folder' dataset only, not {name!r}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    path = None if root is None else Path(root).expanduser()
    if name == "digits":
        return _load_digits(split)
    if name in ("fashion_mnist", "mnist"):
        return _load_idx_dataset(name, path, split)
    if name in ("cifar10", "cifar20"):
        return _load_cifar(name, path, split)
    if name == "stl10":
        return _load_stl10(path, split)
    return _load_folder(path, split, image_size)
