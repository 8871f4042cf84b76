"""Dataset loaders, each on small files written in the official on-disk formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimac.data import DATASETS, ImageDataset, load_dataset
from mimac.data.formats import read_cifar_pickle, read_idx

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- writers (official formats)

def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    """IDX: 0x00 0x00, type byte 0x08 (ubyte), rank, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_idx_set(d: Path, n_train: int, n_test: int, gz: bool, dot_names: bool = False):
    d.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, n, dtype=np.uint8)
        img = f"{prefix}-images.idx3-ubyte" if dot_names else f"{prefix}-images-idx3-ubyte"
        lab = f"{prefix}-labels.idx1-ubyte" if dot_names else f"{prefix}-labels-idx1-ubyte"
        write_idx(d / (img + sfx), x, gz)
        write_idx(d / (lab + sfx), y, gz)
        out[prefix] = (x, y)
    return out


def write_cifar(d: Path, files: dict[str, int], label_keys: dict[bytes, int], protocol: int):
    """CIFAR python pickle: dict with b"data" (N, 3072) uint8 (R, G, B planes) + label lists."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in files.items():
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        obj = {b"batch_label": name.encode(), b"data": data,
               b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        for key, k in label_keys.items():
            obj[key] = RNG.integers(0, k, n).tolist()
        with open(d / name, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
        out[name] = obj
    return out


def write_stl(d: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
    """STL-10 binary: per image 3 channels, each 96x96 column-major; labels 1..10 bytes."""
    d.mkdir(parents=True, exist_ok=True)
    for part, x in images.items():  # x indexed [n, c, y, x]
        (d / f"{part}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
    for part, y in labels.items():
        (d / f"{part}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------- digits

def test_digits_all_and_splits():
    ds = load_dataset("digits")
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert torch.equal(ds.labels.unique(), torch.arange(10))
    assert (ds.name, ds.split, len(ds), ds.image_shape) == ("digits", "all", 1797, (1, 8, 8))
    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(tr), len(te)) == (1347, 450)
    assert torch.equal(torch.cat([tr.images, te.images]), ds.images)
    assert torch.equal(torch.cat([tr.labels, te.labels]), ds.labels)
    from sklearn.datasets import load_digits

    raw = load_digits().images  # 0..16
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), np.rint(raw * 255 / 16))


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_mnist(tmp_path, gz):
    ref = write_idx_set(tmp_path, 7, 5, gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.images.shape == (12, 1, 28, 28) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images[:7, 0].numpy(), ref["train"][0])
    np.testing.assert_array_equal(ds.images[7:, 0].numpy(), ref["t10k"][0])
    np.testing.assert_array_equal(ds.labels.numpy(), np.concatenate([ref["train"][1],
                                                                      ref["t10k"][1]]))
    te = load_dataset("mnist", tmp_path, "test")
    np.testing.assert_array_equal(te.images[:, 0].numpy(), ref["t10k"][0])
    assert len(load_dataset("mnist", tmp_path, "train")) == 7


def test_idx_subfolder_and_dot_names(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", 3, 2, gz=False, dot_names=True)
    assert len(load_dataset("mnist", tmp_path)) == 5
    write_idx_set(tmp_path / "fashion-mnist", 4, 2, gz=True)
    assert len(load_dataset("fashion_mnist", tmp_path, split="train")) == 4


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    write_idx_set(tmp_path, 3, 2, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match="truncated.*expected <root>/train-images-idx3"):
        load_dataset("mnist", tmp_path, "train")
    img.write_bytes(b"\x08\x03\x00\x00" + bytes(100))  # bad magic
    with pytest.raises(ValueError, match="magic"):
        read_idx(img)
    # A damaged deflate stream raises zlib.error, not OSError: still a ValueError naming the file.
    packed = bytearray(gzip.compress(bytes(range(256)) * 40))
    packed[40:48] = b"\xff" * 8
    img.write_bytes(bytes(packed))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: corrupt gzip"):
        read_idx(img)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path, "test")


def test_idx_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path, 3, 2, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), gz=True)
    with pytest.raises(ValueError, match="labels for 3 images"):
        load_dataset("mnist", tmp_path, "train")


DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    ds = load_dataset("fashion_mnist", split="test")  # default root is the package's folder
    assert ds.images.shape == (10000, 1, 28, 28) and ds.num_classes == 10
    assert torch.equal(ds.labels.bincount(), torch.full((10,), 1000))
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the official test set's first labels


# ---------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10(tmp_path, protocol):
    names = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    ref = write_cifar(tmp_path / "cifar-10-batches-py", names, {b"labels": 10}, protocol)
    ds = load_dataset("cifar10", tmp_path)  # parent folder
    assert ds.images.shape == (19, 3, 32, 32) and ds.num_classes == 10
    first = ref["data_batch_1"]
    # Row layout: 1024 R values, 1024 G, 1024 B, each plane row-major.
    assert ds.images[0, 1, 2, 5].item() == first[b"data"][0, 1024 + 2 * 32 + 5]
    assert ds.labels[:3].tolist() == first[b"labels"]
    te = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", split="test")  # folder itself
    assert te.labels.tolist() == ref["test_batch"][b"labels"] and len(te) == 4
    assert len(load_dataset("cifar10", tmp_path, "train")) == 15


def test_cifar20_coarse_labels(tmp_path):
    ref = write_cifar(tmp_path / "cifar-100-python", {"train": 6, "test": 3},
                      {b"fine_labels": 100, b"coarse_labels": 20}, protocol=2)
    ds = load_dataset("cifar20", tmp_path)
    assert ds.num_classes == 20 and ds.images.shape == (9, 3, 32, 32)
    assert ds.labels.tolist() == ref["train"][b"coarse_labels"] + ref["test"][b"coarse_labels"]
    assert load_dataset("cifar20", tmp_path, "test").labels.tolist() == \
        ref["test"][b"coarse_labels"]


def test_cifar_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/data_batch_1..5") as info:
        load_dataset("cifar10", tmp_path)
    assert "root from data.root" in str(info.value) and "$MIMAC_DATA=DIR" in str(info.value)
    monkeypatch.delenv("MIMAC_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"the default ./data .*set data.root=DIR"):
        load_dataset("cifar10")
    monkeypatch.setenv("MIMAC_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"elsewhere \(root from \$MIMAC_DATA"):
        load_dataset("stl10")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar20", tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(d, {f"data_batch_{i}": 2 for i in range(1, 6)}, {b"labels": 10}, 4)
    with pytest.raises(FileNotFoundError, match="test_batch"):  # one file missing
        load_dataset("cifar10", tmp_path)
    (d / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="official python pickles"):
        load_dataset("cifar10", tmp_path)
    with open(d / "test_batch", "wb") as f:  # wrong shape
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", tmp_path)
    # A corrupt length field makes the unpickler ask for 2^62 bytes: MemoryError, reported
    # as a bad file like every other corruption.
    (d / "test_batch").write_bytes(b"\x8e" + (2**62).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="test_batch: not a CIFAR python pickle"):
        read_cifar_pickle(d / "test_batch", b"labels")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_refuses_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing"):
        load_dataset("cifar10", tmp_path, "test")


# ---------------------------------------------------------------- STL-10

def test_stl10_layout_and_splits(tmp_path):
    d = tmp_path / "stl10_binary"
    train = RNG.integers(0, 200, (3, 3, 96, 96), dtype=np.uint8)
    test = RNG.integers(0, 200, (2, 3, 96, 96), dtype=np.uint8)
    unl = RNG.integers(0, 200, (4, 3, 96, 96), dtype=np.uint8)
    ytr, yte = np.array([0, 9, 4]), np.array([3, 3])
    write_stl(d, {"train": train, "test": test, "unlabeled": unl}, {"train": ytr, "test": yte})
    # A known pixel, placed by hand in the raw file: image 1, channel 2, row y=5, column x=70.
    raw = bytearray((d / "train_X.bin").read_bytes())
    raw[1 * 27648 + 2 * 9216 + 70 * 96 + 5] = 255  # column-major: offset x * 96 + y
    (d / "train_X.bin").write_bytes(bytes(raw))
    ds = load_dataset("stl10", tmp_path)
    assert ds.images.shape == (5, 3, 96, 96) and ds.num_classes == 10
    assert ds.images[1, 2, 5, 70] == 255 and ds.images[1, 2, 70, 5] != 255
    np.testing.assert_array_equal(ds.images[0].numpy(), train[0])
    np.testing.assert_array_equal(ds.images[3:].numpy(), test)
    assert ds.labels.tolist() == [0, 9, 4, 3, 3]  # 1..10 on disk -> 0..9
    un = load_dataset("stl10", d, "unlabeled")  # the folder itself
    assert len(un) == 4 and (un.labels == -1).all() and un.num_classes == 0
    tu = load_dataset("stl10", tmp_path, "train+unlabeled")
    assert tu.labels.tolist() == [0, 9, 4, -1, -1, -1, -1]
    assert len(load_dataset("stl10", tmp_path, "test")) == 2


def test_stl10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="stl10_binary/train_X.bin"):
        load_dataset("stl10", tmp_path)
    d = tmp_path / "stl10_binary"
    d.mkdir()
    (d / "train_X.bin").write_bytes(bytes(1000))
    with pytest.raises(ValueError, match="3x96x96"):
        load_dataset("stl10", tmp_path, "train")
    write_stl(d, {"train": np.zeros((2, 3, 96, 96), np.uint8)}, {"train": np.array([0, 1, 2])})
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        load_dataset("stl10", tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("cifar10", tmp_path, "unlabeled")


# ---------------------------------------------------------------- image folders

def test_folder_labelled_rgb(tmp_path):
    imgs = {c: [RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(2)]
            for c in ("zebra", "ant")}
    for c, arrs in imgs.items():
        for i, a in enumerate(arrs):
            write_png(tmp_path / c / f"{i}.png", a)
    ds = load_dataset("folder", tmp_path)
    assert ds.images.shape == (4, 3, 6, 5) and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 1, 1]  # sorted class folders: ant=0, zebra=1
    assert ds.class_names == ["ant", "zebra"]
    assert ds.files == [str(tmp_path / c / f"{i}.png") for c in ("ant", "zebra") for i in (0, 1)]
    np.testing.assert_array_equal(ds.images[2].numpy(), imgs["zebra"][0].transpose(2, 0, 1))


def test_folder_unlabelled_grey_and_resize(tmp_path):
    write_png(tmp_path / "a.png", RNG.integers(0, 256, (8, 8), dtype=np.uint8))
    write_png(tmp_path / "b.png", RNG.integers(0, 256, (10, 12), dtype=np.uint8))
    with pytest.raises(ValueError, match="set data.image_size=<side>"):  # the key the CLI takes
        load_dataset("folder", tmp_path)
    ds = load_dataset("folder", tmp_path, image_size=6)
    assert ds.images.shape == (2, 1, 6, 6) and ds.num_classes == 0
    assert ds.labels.tolist() == [-1, -1]


def test_folder_splits_and_errors(tmp_path):
    with pytest.raises(ValueError, match="set data.root=<your image folder>"):
        load_dataset("folder")
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dataset("folder", tmp_path)
    write_png(tmp_path / "train" / "c0" / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert len(load_dataset("folder", tmp_path, "train")) == 1
    with pytest.raises(FileNotFoundError, match="<root>/train and <root>/test"):
        load_dataset("folder", tmp_path, "test")
    write_png(tmp_path / "train" / "stray.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="both images and class folders"):
        load_dataset("folder", tmp_path, "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset("folder", tmp_path / "bad")
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "bad" / "x.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*x\.png"):  # header fine, pixels cut
        load_dataset("folder", tmp_path / "bad")


def test_folder_all_merges_train_and_test(tmp_path):
    for part, n in (("train", 2), ("test", 1)):
        for c in ("cat", "dog"):
            for i in range(n):
                write_png(tmp_path / "lab" / part / c / f"{i}.png", np.zeros((4, 4, 3), np.uint8))
            write_png(tmp_path / "flat" / part / f"{c}.png", np.zeros((4, 4, 3), np.uint8))
    ds = load_dataset("folder", tmp_path / "lab")
    assert len(ds) == 6 and ds.num_classes == 2 and ds.labels.tolist() == [0, 0, 1, 1, 0, 1]
    flat = load_dataset("folder", tmp_path / "flat")  # train/ and test/ are splits, not classes
    assert len(flat) == 4 and flat.num_classes == 0 and flat.labels.tolist() == [-1] * 4
    write_png(tmp_path / "lab" / "test" / "emu" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="different classes"):
        load_dataset("folder", tmp_path / "lab")


def test_folder_16_bit_grey_is_scaled_not_clipped(tmp_path):
    a16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)  # 0 .. 63,000
    Image.fromarray(a16).save(tmp_path / "g.png")
    ds = load_dataset("folder", tmp_path)
    assert ds.image_shape == (1, 8, 8)
    np.testing.assert_array_equal(ds.images[0, 0].numpy(), a16 >> 8)


# ---------------------------------------------------------------- names and splits

def test_unknown_name_and_bad_split():
    with pytest.raises(ValueError, match="digits.*fashion_mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=32)
    assert DATASETS == ("digits", "fashion_mnist", "mnist", "cifar10", "cifar20", "stl10",
                        "folder")
