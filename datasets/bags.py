"""Seeded MNIST bag generators for multiple instance learning.

* MNIST bags (Hu et al. 2023, following Ilse et al. 2018): fixed bag size; a positive bag (label 1)
  holds exactly ``pos_per_bag`` images of the target digit, a negative bag none.
* K-MIL (Santos et al. 2024): a bag is positive iff it holds at least ``k`` target digits. Negative bags
  may hold up to ``k - 1`` targets, so a model must count rather than detect.

Both are balanced (``n_bags // 2`` positives), shuffled, with the target images at random positions.
Images inside one bag are distinct (sampled without replacement); different bags may share images.
The same ``seed`` (an int or a sequence of ints, passed to ``np.random.default_rng``) gives identical
bags. Index-level samplers (``sample_*_indices``) are provided for memory-light pipelines.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .integrity import PathLike
from .mnist import load_mnist

Seed = Union[int, Sequence[int]]


def _target_pools(labels: np.ndarray, target: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of the target digit and of all other digits."""
    labels = np.asarray(labels)
    return np.flatnonzero(labels == target), np.flatnonzero(labels != target)


def _balanced_labels(n_bags: int, rng: np.random.Generator) -> np.ndarray:
    """``n_bags // 2`` ones and the rest zeros, in random order."""
    bag_labels = np.zeros(n_bags, dtype=np.int64)
    bag_labels[: n_bags // 2] = 1
    return rng.permutation(bag_labels)


def _draw_bag(rng: np.random.Generator, target_pool: np.ndarray, other_pool: np.ndarray,
              n_targets: int, bag_size: int) -> np.ndarray:
    """Indices of one bag: ``n_targets`` distinct targets + distinct non-targets, randomly ordered."""
    if n_targets > len(target_pool) or bag_size - n_targets > len(other_pool):
        raise ValueError(f"not enough images for a bag with {n_targets} targets out of {bag_size}")
    chosen = np.concatenate([rng.choice(target_pool, n_targets, replace=False),
                             rng.choice(other_pool, bag_size - n_targets, replace=False)])
    return rng.permutation(chosen)


def sample_mnist_bag_indices(labels: np.ndarray, n_bags: int, bag_size: int, target: int = 9,
                             pos_per_bag: int = 1, seed: Seed = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Index version of :func:`make_mnist_bags`: returns (indices int64 (n_bags, bag_size), labels int64)."""
    if not 1 <= pos_per_bag <= bag_size:
        raise ValueError(f"need 1 <= pos_per_bag <= bag_size, got {pos_per_bag}, {bag_size}")
    if n_bags < 1:
        raise ValueError(f"n_bags must be positive, got {n_bags}")
    rng = np.random.default_rng(seed)
    target_pool, other_pool = _target_pools(labels, target)
    bag_labels = _balanced_labels(n_bags, rng)
    indices = np.stack([_draw_bag(rng, target_pool, other_pool, pos_per_bag * int(y), bag_size)
                        for y in bag_labels])
    return indices.astype(np.int64), bag_labels


def make_mnist_bags(images: np.ndarray, labels: np.ndarray, n_bags: int, bag_size: int, target: int = 9,
                    pos_per_bag: int = 1, seed: Seed = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed-size MNIST bags (Hu et al. 2023): label 1 iff the bag contains the ``target`` digit.

    Positive bags contain exactly ``pos_per_bag`` target images and ``bag_size - pos_per_bag`` others;
    negative bags contain ``bag_size`` non-target images. ``n_bags // 2`` bags are positive.

    Returns:
        bags float32 (n_bags, bag_size, *image_shape), labels int64 (n_bags,).
        Memory: n_bags * bag_size * 3.1 kB for 28x28 images (use :func:`sample_mnist_bag_indices` for big runs).
    """
    indices, bag_labels = sample_mnist_bag_indices(labels, n_bags, bag_size, target, pos_per_bag, seed)
    return np.asarray(images, dtype=np.float32)[indices], bag_labels


_ROUNDINGS = {"nearest": np.rint, "floor": np.floor}


def _kmil_bag_sizes(rng: np.random.Generator, n: int, mean: float, std: float, low: int, high: int,
                    rounding: str = "nearest") -> np.ndarray:
    """Bag sizes round(Normal(mean, std)) (``rounding``: 'nearest' or 'floor') clipped to [low, high]."""
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding must be one of {sorted(_ROUNDINGS)}, got {rounding!r}")
    return np.clip(_ROUNDINGS[rounding](rng.normal(mean, std, size=n)), low, high).astype(np.int64)


def sample_kmil_bag_indices(labels: np.ndarray, n_bags: int, k: int, target: int = 9, seed: Seed = 0,
                            mean_bag_size: float = 10.0, std_bag_size: float = 2.0,
                            min_bag_size: Optional[int] = None,
                            max_bag_size: Optional[int] = None,
                            rounding: str = "nearest") -> Tuple[List[np.ndarray], np.ndarray]:
    """Index version of :func:`make_kmil_bags`: returns (list of int64 index arrays, labels int64)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    low = k if min_bag_size is None else int(min_bag_size)
    high = np.iinfo(np.int64).max if max_bag_size is None else int(max_bag_size)
    if low < k or high < low:
        raise ValueError(f"need k <= min_bag_size <= max_bag_size, got k={k}, {low}, {high}")
    if n_bags < 1:
        raise ValueError(f"n_bags must be positive, got {n_bags}")
    rng = np.random.default_rng(seed)
    target_pool, other_pool = _target_pools(labels, target)
    n_pos = n_bags // 2
    n_pairs = n_bags - n_pos  # the i-th positive bag has the size of the i-th negative bag
    sizes = _kmil_bag_sizes(rng, n_pairs, mean_bag_size, std_bag_size, low, high, rounding)
    bag_labels = np.r_[np.ones(n_pos, np.int64), np.zeros(n_pairs, np.int64)]
    bag_sizes = np.r_[sizes[:n_pos], sizes]
    n_targets = np.where(bag_labels == 1,
                         rng.integers(k, bag_sizes + 1),                      # positives: U{k..size}
                         rng.integers(0, np.minimum(k - 1, bag_sizes) + 1))   # negatives: U{0..k-1}
    order = rng.permutation(n_bags)
    bags = [_draw_bag(rng, target_pool, other_pool, int(n_targets[i]), int(bag_sizes[i])).astype(np.int64)
            for i in order]
    return bags, bag_labels[order]


def make_kmil_bags(images: np.ndarray, labels: np.ndarray, n_bags: int, k: int, target: int = 9, seed: Seed = 0,
                   mean_bag_size: float = 10.0, std_bag_size: float = 2.0, min_bag_size: Optional[int] = None,
                   max_bag_size: Optional[int] = None,
                   rounding: str = "nearest") -> Tuple[List[np.ndarray], np.ndarray]:
    """K-MIL bags (Santos et al. 2024): label 1 iff the bag holds at least ``k`` target digits.

    Bag sizes: n = clip(round(Normal(mean_bag_size, std_bag_size)), min_bag_size (default k), max_bag_size),
    rounded to the nearest integer or, with ``rounding='floor'``, down (Santos et al.'s generator,
    deep-spin/SSHN scripts/datasets/mnist_bags.py: ``max(k, int(normal(14, 5)))``, i.e.
    ``mean_bag_size=14, std_bag_size=5, rounding='floor'``; ``int`` truncation equals floor once clipped to >= k).
    Sizes are drawn once per (positive, negative) pair, so bag size carries no label information.
    Number of targets: positives U{k, ..., n}; negatives U{0, ..., min(k-1, n)} (k = 1: none).

    Returns:
        list of float32 (n_i, *image_shape) bags, labels int64 (n_bags,) with n_bags // 2 ones.
    """
    index_bags, bag_labels = sample_kmil_bag_indices(labels, n_bags, k, target, seed, mean_bag_size,
                                                     std_bag_size, min_bag_size, max_bag_size, rounding)
    images = np.asarray(images, dtype=np.float32)
    return [images[idx] for idx in index_bags], bag_labels


def pad_bags(bags: Sequence) -> Tuple[object, object]:
    """Stack variable-size bags ``(n_i, *feature_shape)`` into ``(B, max n_i, *feature_shape)`` with zeros.

    Returns (padded, mask) where mask is bool (B, max n_i) and **True marks padding** (the
    ``key_padding_mask`` convention of ``layers.HopfieldPooling``). Torch tensors in -> torch tensors out
    (same dtype/device); otherwise numpy arrays.
    """
    if len(bags) == 0:
        raise ValueError("pad_bags needs at least one bag")
    lengths = [len(bag) for bag in bags]
    max_len = max(lengths)
    if hasattr(bags[0], "new_zeros"):  # torch.Tensor, without importing torch here
        import torch
        padded = bags[0].new_zeros((len(bags), max_len, *bags[0].shape[1:]))
        mask = torch.ones((len(bags), max_len), dtype=torch.bool, device=bags[0].device)
    else:
        bags = [np.asarray(bag) for bag in bags]
        padded = np.zeros((len(bags), max_len, *bags[0].shape[1:]), dtype=bags[0].dtype)
        mask = np.ones((len(bags), max_len), dtype=bool)
    for i, (bag, length) in enumerate(zip(bags, lengths)):
        padded[i, :length] = bag
        mask[i, :length] = False
    return padded, mask


def mnist_bag_splits(bag_size: int, n_train: int = 4000, n_test: int = 1000, seed: int = 0, pos_per_bag: int = 1,
                     data_dir: Optional[PathLike] = None,
                     target: int = 9) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train bags from MNIST-train and test bags from MNIST-test (seeds (seed, 0) and (seed, 1)).

    Returns (train_bags, train_labels, test_bags, test_labels) as in :func:`make_mnist_bags`.
    """
    train_images, train_labels = load_mnist("train", data_dir)
    test_images, test_labels = load_mnist("test", data_dir)
    train = make_mnist_bags(train_images, train_labels, n_train, bag_size, target, pos_per_bag, seed=(seed, 0))
    test = make_mnist_bags(test_images, test_labels, n_test, bag_size, target, pos_per_bag, seed=(seed, 1))
    return train[0], train[1], test[0], test[1]


def kmil_splits(k: int, seed: int = 0, n_train: int = 2000, n_val: int = 500, n_test: int = 500,
                data_dir: Optional[PathLike] = None, target: int = 9, val_images: int = 10_000,
                return_indices: bool = False, **bag_kwargs) -> Dict[str, Tuple[List[np.ndarray], np.ndarray]]:
    """K-MIL train/val/test splits: {'train': (bags, labels), 'val': ..., 'test': ...}.

    The 60000 MNIST-train images are split at random (seeded) into two disjoint pools: ``val_images``
    images for validation bags, the rest for training bags, so no image appears in both. Test bags
    come from MNIST-test. ``bag_kwargs`` go to :func:`make_kmil_bags` (mean_bag_size, std_bag_size, rounding, ...).
    With ``return_indices=True`` each bag is an int64 index array into its MNIST split (train/val bags
    index MNIST-train, test bags MNIST-test) instead of float32 images.
    """
    images, labels = load_mnist("train", data_dir)
    test_images, test_labels = load_mnist("test", data_dir)
    perm = np.random.default_rng((seed, 2)).permutation(len(labels))
    pools = {"val": np.sort(perm[:val_images]), "train": np.sort(perm[val_images:]),
             "test": np.arange(len(test_labels))}
    sources = {"train": (images, labels), "val": (images, labels), "test": (test_images, test_labels)}
    splits = {}
    for name, n_bags, stream in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 3)):
        pool, (split_images, split_labels) = pools[name], sources[name]
        index_bags, bag_labels = sample_kmil_bag_indices(split_labels[pool], n_bags, k, target, (seed, stream),
                                                         **bag_kwargs)
        index_bags = [pool[idx] for idx in index_bags]
        splits[name] = (index_bags if return_indices else [split_images[idx] for idx in index_bags], bag_labels)
    return splits
