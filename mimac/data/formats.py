"""Readers for the official on-disk formats: IDX (MNIST family), CIFAR pickles, STL-10 binaries.

Each reader returns numpy arrays and raises ``ValueError`` naming the file and what is wrong
with it when a file is malformed; finding the files (and the layout messages for missing
ones) is the job of :mod:`mimac.data.datasets`.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_cifar_pickle", "read_idx", "read_stl10_images", "read_stl10_labels"]

# IDX type byte -> numpy dtype (all multi-byte types are big-endian, per the format).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    """Read a file, transparently gunzipping it when it starts with the gzip magic bytes.

    The magic is checked rather than the suffix because mirrors rename files both ways.
    """
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from err
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzipped or raw) into a numpy array.

    Layout: two zero bytes, a type byte, a rank byte, ``rank`` big-endian uint32 sizes,
    then the data in C order.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        array of shape ``dims`` with the file's dtype (uint8 for the MNIST family).

    Raises:
        ValueError: bad magic number, unknown type byte, or a size that does not match the
            header (truncated or padded file).
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number must start with two zero bytes, "
            f"got {data[:4].hex() or 'an empty file'})"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type byte 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares rank 0")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {dims} ({expected} bytes) but the file has "
            f"{len(data)} bytes (truncated or not an IDX file)"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writable


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: the CIFAR files need nothing else.

    Plain ``pickle.load`` would run arbitrary code from a file a user points us at.
    """

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol-2 pickles written by Python 3 encode bytes objects with _codecs.encode.
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def read_cifar_pickle(path: str | os.PathLike, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python pickle (a ``data_batch_k``, ``test_batch``, ``train`` or ``test``).

    Args:
        path: the pickle file.
        label_key: ``b"labels"`` (CIFAR-10), ``b"coarse_labels"`` or ``b"fine_labels"``
            (CIFAR-100).

    Returns:
        images ``(N, 3, 32, 32)`` uint8 (the rows are stored R plane, G plane, B plane, each
        row-major, so a plain reshape gives channels-first) and labels ``(N,)`` int64.

    Raises:
        ValueError: not a pickle of the expected dict, missing keys, wrong shapes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were written by Python 2 (byte-string keys).
            obj = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except OSError:
        raise
    except Exception as err:
        # (MemoryError for a huge declared length, OverflowError, IndexError, LookupError...)
        raise ValueError(f"{path}: not a CIFAR python pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 -- a bad file, not a bad argument
            f"{path}: expected a pickled dict, got {type(obj).__name__}"
        )
    # Files re-saved by Python 3 may have str keys; accept both spellings.
    obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    if b"data" not in obj or label_key not in obj:
        raise ValueError(
            f"{path}: missing key {b'data' if b'data' not in obj else label_key!r} "
            f"(has {sorted(obj)})"
        )
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be a (N, 3072) uint8 array, got {data.shape} {data.dtype}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: {len(labels)} labels for {data.shape[0]} images under {label_key!r}"
        )
    return data.reshape(-1, 3, 32, 32).copy(), labels


_STL_SIDE = 96
_STL_IMAGE_BYTES = 3 * _STL_SIDE * _STL_SIDE


def read_stl10_images(path: str | os.PathLike) -> np.ndarray:
    """Read an STL-10 ``*_X.bin`` file.

    Each image is 3 x 96 x 96 bytes, one channel after the other, each channel stored
    column-major (the first 96 bytes are column x=0, rows y=0..95), as written by MATLAB.

    Returns:
        images ``(N, 3, 96, 96)`` uint8, indexed ``[n, c, y, x]``.
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _STL_IMAGE_BYTES:
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of 3x96x96 images "
            f"({_STL_IMAGE_BYTES} bytes each)"
        )
    # reshape gives [n, c, x, y] because of the column-major storage: swap the last two axes.
    return np.ascontiguousarray(raw.reshape(-1, 3, _STL_SIDE, _STL_SIDE).transpose(0, 1, 3, 2))


def read_stl10_labels(path: str | os.PathLike, n_images: int) -> np.ndarray:
    """Read an STL-10 ``*_y.bin`` file: one byte per image, classes 1..10.

    Returns:
        labels ``(N,)`` int64 in 0..9.
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if raw.size != n_images:
        raise ValueError(f"{path}: {raw.size} labels for {n_images} images")
    if raw.size and (raw.min() < 1 or raw.max() > 10):
        raise ValueError(f"{path}: STL-10 labels must be 1..10, found {raw.min()}..{raw.max()}")
    return raw - 1
