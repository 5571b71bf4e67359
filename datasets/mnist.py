"""MNIST from the four original gzipped IDX files (no torchvision needed).

IDX format (big-endian): magic = 0x0000 <dtype 0x08 = uint8> <ndim>, then ndim uint32 sizes, then data.
Images: magic 2051, (N, 28, 28) uint8; labels: magic 2049, (N,) uint8.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .integrity import DataIntegrityError, PathLike, verified_path

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_SIZES = {"train": 60_000, "test": 10_000}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def parse_idx(raw: bytes, expected_magic: int, path: Path) -> np.ndarray:
    """Decode an uncompressed IDX byte string into a uint8 array, checking magic number and length."""
    if len(raw) < 4:
        raise DataIntegrityError(f"{path}: IDX data too short ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataIntegrityError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header_len + int(np.prod(shape)):
        raise DataIntegrityError(f"{path}: IDX payload has {len(raw) - header_len} bytes, header shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


@functools.lru_cache(maxsize=4)
def _decode_split(image_path: str, label_path: str, split: str, _stamp: tuple) -> Tuple[np.ndarray, np.ndarray]:
    """Decode one split; cached per (paths, size/mtime stamp). Returned arrays are read-only."""
    with gzip.open(image_path, "rb") as handle:
        raw_images = parse_idx(handle.read(), IMAGE_MAGIC, Path(image_path))
    with gzip.open(label_path, "rb") as handle:
        raw_labels = parse_idx(handle.read(), LABEL_MAGIC, Path(label_path))
    n = MNIST_SIZES[split]
    if raw_images.shape != (n, 28, 28) or raw_labels.shape != (n,):
        raise DataIntegrityError(f"MNIST {split}: shapes {raw_images.shape}, {raw_labels.shape}; "
                                 f"expected ({n}, 28, 28), ({n},)")
    if raw_labels.max() > 9:
        raise DataIntegrityError(f"{label_path}: label {raw_labels.max()} outside 0..9")
    images = raw_images.astype(np.float32)
    images *= np.float32(1.0 / 255.0)
    labels = raw_labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist(split: str = "train", data_dir: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split.

    Returns:
        images: float32 (N, 28, 28), pixel / 255 in [0, 1]; labels: int64 (N,) in 0..9.
        N = 60000 ('train') or 10000 ('test'). Both arrays are cached in memory and **read-only**
        (``np.array(x)`` / ``torch.tensor(x)`` gives a writable copy).

    Raises:
        DataIntegrityError: a file is missing/corrupt (checked by SHA-256 on every call; cheap when cached).
        ValueError: unknown split.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name = MNIST_FILES[split]
    image_path = verified_path(image_name, data_dir).resolve()
    label_path = verified_path(label_name, data_dir).resolve()
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (image_path, label_path))
    return _decode_split(str(image_path), str(label_path), split, stamp)
