"""Fashion-MNIST from Debian's dataset-fashion-mnist (issue #11's data set that models generalize on)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from demo.memorizing.fashion_mnist import CLASS_NAMES, available, load_fashion_mnist

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
