"""Fashion-MNIST as Debian's ``dataset-fashion-mnist`` installs it: a data set a model can generalize on.

The memorizing demo models need real pictures beside the planted ones, so that plain sampling can be
shown to make new items for generic prompts while it copies the planted images (issue #11). The
package puts Zalando's four IDX files under ``/usr/share/datasets/fashion-mnist/`` (60,000 training
and 10,000 test images, 28x28 grey, 10 classes); ``make venv`` installs it where it can (root and
apt-get), and nothing is committed or downloaded. The format (Xiao, Rasul and Vollgraf 2017, the
MNIST layout): a big-endian header of magic number (2051 for images, 2049 for labels) and sizes,
then the bytes.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The data set's class names, by label.
CLASS_NAMES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
SPLITS = {"train": "train", "test": "t10k"}
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def available(root: str | Path = FASHION_MNIST_DIR) -> bool:
    """Whether the four files are there (the tests that need them skip with a reason otherwise)."""
    return all((Path(root) / name).is_file() for name in _files("train") + _files("test"))


def _files(split: str) -> tuple[str, str]:
    prefix = SPLITS[split]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An IDX array of unsigned bytes, its header checked against the magic number and the data size."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    header = np.frombuffer(data[: 4 * (1 + dims)], dtype=">u4") if len(data) >= 4 * (1 + dims) else None
    if header is None or int(header[0]) != magic:
        raise ValueError(
            f"{path} is not an IDX file of magic {magic} (a Fashion-MNIST file from Debian's package)"
        )
    shape = tuple(int(x) for x in header[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + dims))
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: the header says {shape}, the file holds {body.size} bytes")
    return body.reshape(shape)


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``split`` (``train`` or ``test``): uint8 ``(n, 28, 28)`` and ``(n,)``.

    Raises:
        FileNotFoundError: the files are missing (install Debian's ``dataset-fashion-mnist``).
        ValueError: a file is not the IDX layout, or images and labels disagree.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    images_name, labels_name = _files(split)
    root = Path(root)
    missing = [name for name in (images_name, labels_name) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no Fashion-MNIST {split} files {missing} in {root}: install Debian's dataset-fashion-mnist "
            f"(make venv does, as root with apt-get)"
        )
    images = _read_idx(root / images_name, IMAGES_MAGIC, 3)
    labels = _read_idx(root / labels_name, LABELS_MAGIC, 1)
    if len(images) != len(labels) or labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels (max {labels.max()})")
    return images, labels
