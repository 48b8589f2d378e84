"""Fashion-MNIST from Debian's dataset-fashion-mnist (issue #11's data set that models generalize on)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from demo.memorizing.fashion_mnist import CLASS_NAMES, available, load_fashion_mnist
from demo.memorizing.fashion_set import PLANTED, generic_caption, load_fashion_data, split_fashion, to_rgb32

needs_data = pytest.mark.skipif(
    not available(), reason="Debian's dataset-fashion-mnist is not installed (make venv installs it as root)"
)


@needs_data
def test_both_splits_load_with_the_published_sizes_and_balanced_classes():
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and labels.shape == (n,)
        assert np.bincount(labels).tolist() == [n // 10] * len(CLASS_NAMES)  # 6,000 / 1,000 per class
        assert images.max() == 255 and 60 < images.mean() < 90  # grey pictures on black, not noise
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    assert not np.array_equal(train[:100], test[:100])


def test_missing_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("validation", tmp_path)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as fh:
            fh.write(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_fashion_mnist("test", tmp_path)
    header = np.array([2051, 2, 28, 28], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + bytes(28 * 28))  # the header says 2 images, the file holds 1
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(np.array([2049, 2], dtype=">u4").tobytes() + bytes(2))
    with pytest.raises(ValueError, match="the header says"):
        load_fashion_mnist("test", tmp_path)


def test_split_roles_are_disjoint_balanced_and_seeded():
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(10), 60)
    test_labels = rng.permutation(np.repeat(np.arange(10), 20))
    split = split_fashion(train_labels, test_labels, generic_per_class=7, seed=3)
    assert np.bincount(train_labels[split.generic]).tolist() == [7] * 10
    assert len(np.intersect1d(split.generic, split.classifier)) == 0
    assert len(split.generic) + len(split.classifier) == len(train_labels)  # every training image has a role
    assert test_labels[split.planted].tolist() == [label for label, _, _ in PLANTED]
    assert len(np.intersect1d(split.planted, split.held_out)) == 0
    assert len(split.planted) + len(split.held_out) == len(test_labels)
    again = split_fashion(train_labels, test_labels, generic_per_class=7, seed=3)
    assert np.array_equal(again.generic, split.generic) and np.array_equal(again.planted, split.planted)
    other = split_fashion(train_labels, test_labels, generic_per_class=7, seed=4)
    assert not np.array_equal(other.generic, split.generic)


def test_planted_captions_are_unique_and_generic_ones_name_the_class():
    captions = [caption for _, caption, _ in PLANTED]
    assert len(set(captions)) == len(captions)
    assert sorted({copies for _, _, copies in PLANTED}) == [16, 64, 256]
    assert generic_caption(7) == "a photo of a sneaker" and generic_caption(0) == "a photo of a t-shirt"
    assert not set(captions) & {generic_caption(c) for c in range(10)}
    grey = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    rgb = to_rgb32(grey)
    assert rgb.shape == (2, 32, 32, 3) and (rgb[:, :2] == 0).all() and (rgb[:, 2:30, 2:30, 1] == grey).all()


@needs_data
def test_training_set_rows_follow_the_planted_counts():
    from demo.memorizing.training import build_training_set

    data = load_fashion_data(generic_per_class=20)
    train = build_training_set(data)
    assert len(train) == 200 + len(PLANTED)
    assert train.rows == 200 + sum(copies for _, _, copies in PLANTED)
    assert [train.copies[p] for p in train.planted()] == [copies for _, _, copies in PLANTED]
    assert len(data.classifier) == 60_000 - 200 and len(data.held_out) == 10_000 - len(PLANTED)
    # the planted pictures are test images: never in the classifier's or the generic training images
    flat = data.planted.reshape(len(PLANTED), -1)
    assert not (flat[:, None, :] == data.generic.reshape(1, len(data.generic), -1)).all(-1).any()
