"""Embedded benchmark data (MNIST, Fox/Tiger/Elephant, UCSB breast cancer, Musk1/Musk2) and MIL bag
generators. Every file is verified against a SHA-256 manifest on load; see datasets/README.md.

    >>> from datasets import load_mnist, make_mnist_bags
    >>> images, labels = load_mnist("train")            # float32 (60000, 28, 28) in [0, 1], int64
    >>> bags, y = make_mnist_bags(images, labels, n_bags=100, bag_size=10, seed=0)
"""
from .bags import (
    kmil_splits,
    make_kmil_bags,
    make_mnist_bags,
    mnist_bag_splits,
    pad_bags,
    sample_kmil_bag_indices,
    sample_mnist_bag_indices,
)
from .integrity import DEFAULT_DATA_DIR, MANIFEST, DataIntegrityError, verified_path, verify_all
from .mil_benchmarks import MIL_DATASETS, MIL_STATS, load_mil_dataset
from .mnist import load_mnist

__all__ = [
    "DEFAULT_DATA_DIR", "MANIFEST", "DataIntegrityError", "verified_path", "verify_all",
    "load_mnist", "load_mil_dataset", "MIL_DATASETS", "MIL_STATS",
    "make_mnist_bags", "make_kmil_bags", "sample_mnist_bag_indices", "sample_kmil_bag_indices",
    "pad_bags", "mnist_bag_splits", "kmil_splits",
]
