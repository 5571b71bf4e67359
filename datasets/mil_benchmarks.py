"""Classic multiple-instance-learning benchmarks: Fox, Tiger, Elephant (Andrews et al. 2002),
UCSB breast cancer, Musk1 and Musk2.

Each dataset is a list of bags ``(instances float32 (n_i, d), label int in {0, 1})`` in file order.
On every load the parsed data are checked against :data:`MIL_STATS` (bag counts, class balance,
instance count, dimension, bag-size range); any mismatch raises :class:`DataIntegrityError`.

Note: Fox/Tiger/Elephant list all positive bags first (bags 1-100), then the negatives; shuffle or
stratify before splitting.
"""
from __future__ import annotations

import functools
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .integrity import DataIntegrityError, PathLike, verified_path

Bag = Tuple[np.ndarray, int]


@dataclass(frozen=True)
class MILStats:
    """Expected statistics of one MIL dataset (from the data README; verified on every load)."""

    file: str
    n_bags: int
    n_pos: int
    n_neg: int
    n_instances: int
    dim: int
    min_bag: int
    max_bag: int


MIL_STATS = {
    "fox": MILStats("fox.data.gz", 200, 100, 100, 1320, 230, 2, 13),
    "tiger": MILStats("tiger.data.gz", 200, 100, 100, 1220, 230, 1, 13),
    "elephant": MILStats("elephant.data.gz", 200, 100, 100, 1391, 230, 2, 13),
    "ucsb": MILStats("ucsb_breast_cancer.csv.gz", 58, 26, 32, 2002, 708, 21, 40),
    "musk1": MILStats("musk1.csv.gz", 92, 47, 45, 476, 166, 2, 40),
    "musk2": MILStats("musk2.csv.gz", 102, 39, 63, 6598, 166, 1, 1044),
}
MIL_DATASETS: Tuple[str, ...] = ("fox", "tiger", "elephant", "ucsb", "musk1", "musk2")


def _read_gzip(path: Path) -> bytes:
    with gzip.open(path, "rb") as handle:
        return handle.read()


def parse_andrews_data(raw: bytes, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse ``<name>.data`` rows ``Bag_<b>+<i>,<name>_data_<b>,<label>,<230 features>``.

    Returns (bag_ids int64 (N,), instance labels int64 (N,), features float64 (N, 230)).
    """
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", usecols=range(2, 233), dtype=np.float64)
    prefix = f"{name}_data_"
    bag_fields = [line.split(b",", 2)[1].decode() for line in raw.splitlines() if line.strip()]
    if len(bag_fields) != len(table) or not all(field.startswith(prefix) for field in bag_fields):
        raise DataIntegrityError(f"{name}.data: second column must read '{prefix}<bag>' on every row")
    bag_ids = np.array([int(field[len(prefix):]) for field in bag_fields], dtype=np.int64)
    return bag_ids, table[:, 0].astype(np.int64), table[:, 1:]


def parse_label_bag_csv(raw: bytes) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse the ``mil`` package CSV rows ``label, bag_id, features...``.

    Returns (bag_ids int64 (N,), instance labels int64 (N,), features float64 (N, d)).
    """
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float64, ndmin=2)
    return table[:, 1].astype(np.int64), table[:, 0].astype(np.int64), table[:, 2:]


def group_contiguous_bags(bag_ids: np.ndarray, labels: np.ndarray, features: np.ndarray, source: str) -> List[Bag]:
    """Split instance rows into bags of contiguous equal ``bag_ids``; labels must be 0/1 and constant per bag."""
    starts = np.flatnonzero(np.r_[True, bag_ids[1:] != bag_ids[:-1]])
    ends = np.r_[starts[1:], len(bag_ids)]
    if len(np.unique(bag_ids[starts])) != len(starts):
        raise DataIntegrityError(f"{source}: a bag id appears in more than one block of rows")
    if not np.isin(labels, (0, 1)).all():
        raise DataIntegrityError(f"{source}: labels must be 0 or 1, found {np.unique(labels)}")
    bags = []
    for start, end in zip(starts, ends):
        bag_labels = labels[start:end]
        if (bag_labels != bag_labels[0]).any():
            raise DataIntegrityError(f"{source}: bag {bag_ids[start]} mixes labels")
        instances = np.ascontiguousarray(features[start:end], dtype=np.float32)
        instances.flags.writeable = False
        bags.append((instances, int(bag_labels[0])))
    return bags


def check_mil_stats(bags: List[Bag], stats: MILStats, source: str) -> None:
    """Raise DataIntegrityError unless ``bags`` match ``stats`` exactly (and hold only finite numbers)."""
    if not bags:
        raise DataIntegrityError(f"{source}: no bags found")
    sizes = np.array([len(x) for x, _ in bags])
    n_pos = sum(label for _, label in bags)
    found = MILStats(stats.file, len(bags), n_pos, len(bags) - n_pos, int(sizes.sum()),
                     int(bags[0][0].shape[1]), int(sizes.min()), int(sizes.max()))
    if found != stats or any(x.shape[1] != stats.dim for x, _ in bags):
        raise DataIntegrityError(f"{source}: dataset statistics {found} differ from the expected {stats}")
    if not all(np.isfinite(x).all() for x, _ in bags):
        raise DataIntegrityError(f"{source}: non-finite feature values")


@functools.lru_cache(maxsize=len(MIL_STATS))
def _load_cached(name: str, path: str, _stamp: tuple) -> Tuple[Bag, ...]:
    raw = _read_gzip(Path(path))
    if name in ("fox", "tiger", "elephant"):
        bag_ids, labels, features = parse_andrews_data(raw, name)
    else:
        bag_ids, labels, features = parse_label_bag_csv(raw)
    bags = group_contiguous_bags(bag_ids, labels, features, path)
    check_mil_stats(bags, MIL_STATS[name], path)
    return tuple(bags)


def load_mil_dataset(name: str, data_dir: Optional[PathLike] = None) -> List[Bag]:
    """Load a MIL benchmark as a list of ``(instances float32 (n_i, d), label int)`` in file order.

    ``name`` is one of :data:`MIL_DATASETS` (case-insensitive). The file's SHA-256 and the dataset
    statistics (:data:`MIL_STATS`) are checked. Parsing is cached; each call returns fresh writable copies.

    Raises:
        DataIntegrityError: missing/corrupt file or unexpected statistics. ValueError: unknown name.
    """
    key = name.lower()
    if key not in MIL_STATS:
        raise ValueError(f"unknown MIL dataset {name!r}; choose one of {MIL_DATASETS}")
    path = verified_path(MIL_STATS[key].file, data_dir).resolve()
    stat = path.stat()
    cached = _load_cached(key, str(path), (stat.st_size, stat.st_mtime_ns))
    return [(instances.copy(), label) for instances, label in cached]
