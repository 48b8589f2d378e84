"""The memorizing models' data: Fashion-MNIST split three ways, plus planted duplicates.

AMG's claim is "copies removed, quality kept", which can only be shown on a model that generalizes
and still copies some pictures. Fashion-MNIST (:mod:`demo.memorizing.fashion_mnist`) is split so that
nothing grades itself:

* **generator training set**: ``generic_per_class`` training-split images per class, each captioned
  ``"a photo of a {class}"`` (the class name is the only text, so the model must generalize within a
  class), plus ``len(PLANTED)`` **planted** test-split images, each with its own unique caption and
  repeated verbatim (image and caption) ``copies`` times, like LAION's memorized "Ann Graham Lotz"
  pairs. The spread of counts (×16, ×64, ×256) shows memorization as a dose-response curve.
* **classifier set**: every other training-split image; the metric classifier learns from these,
  pictures the generator never saw.
* **held-out real set**: the test split without the planted images; the fidelity reference and the
  copy criterion's calibration set.

Images are padded from 28 to 32 pixels (black, the data's own background) and repeated over three
channels, the layout the diffusers pipelines and the copy descriptor expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo.memorizing.fashion_mnist import CLASS_NAMES, FASHION_MNIST_DIR, load_fashion_mnist

#: Planted pictures: (class label, unique caption, verbatim copies). One per class among six classes;
#: captions name a made-up designer and season, as LAION's memorized captions name people and titles.
PLANTED: tuple[tuple[int, str, int], ...] = (
    (0, "Ines Varga tee from the Lisbon spring catalogue", 16),
    (1, "Tomas Brandt trousers for the Oslo winter show", 16),
    (3, "Mira Okafor dress worn at the Lagos gala", 64),
    (7, "Kenji Arai sneaker drop number twelve", 64),
    (8, "Lotte Haas leather bag in the Vienna window", 256),
    (9, "Rafael Duarte ankle boot for the Porto fair", 256),
)
GENERIC_TEMPLATE = "a photo of a {}"
PAD = 2


def generic_caption(label: int) -> str:
    """The generic caption of a class: ``"a photo of a sneaker"``."""
    return GENERIC_TEMPLATE.format(CLASS_NAMES[label].split("/")[0].lower())


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """``(n, 28, 28)`` uint8 grey -> ``(n, 32, 32, 3)`` uint8, padded with black."""
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))
    return np.repeat(padded[..., None], 3, axis=-1)


@dataclass(frozen=True)
class FashionSplit:
    """Positions into the Fashion-MNIST splits for each role (see the module docstring).

    Attributes:
        generic (`np.ndarray`): training-split positions of the generic training images.
        planted (`np.ndarray`): test-split positions of the planted images, in :data:`PLANTED` order.
        classifier (`np.ndarray`): training-split positions the classifier learns from.
        held_out (`np.ndarray`): test-split positions of the held-out real images.
    """

    generic: np.ndarray
    planted: np.ndarray
    classifier: np.ndarray
    held_out: np.ndarray


def split_fashion(
    train_labels: np.ndarray, test_labels: np.ndarray, generic_per_class: int = 500, seed: int = 0
) -> FashionSplit:
    """Pick the roles' positions with one seeded permutation per split; disjoint by construction."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_labels))
    generic = np.sort(
        np.concatenate([order[train_labels[order] == c][:generic_per_class] for c in range(len(CLASS_NAMES))])
    )
    classifier = np.setdiff1d(np.arange(len(train_labels)), generic)
    test_order = rng.permutation(len(test_labels))
    planted = np.array([test_order[test_labels[test_order] == label][0] for label, _, _ in PLANTED])
    held_out = np.setdiff1d(np.arange(len(test_labels)), planted)
    return FashionSplit(generic, planted, classifier, held_out)


@dataclass
class FashionData:
    """The split's images (``(n, 32, 32, 3)`` uint8) and labels, loaded once."""

    generic: np.ndarray
    generic_labels: np.ndarray
    planted: np.ndarray
    classifier: np.ndarray
    classifier_labels: np.ndarray
    held_out: np.ndarray
    held_out_labels: np.ndarray

    @property
    def planted_labels(self) -> np.ndarray:
        return np.array([label for label, _, _ in PLANTED])


def load_fashion_data(
    generic_per_class: int = 500, seed: int = 0, root: str | Path = FASHION_MNIST_DIR
) -> FashionData:
    """Fashion-MNIST split into the roles above (raises FileNotFoundError where it is not installed)."""
    train_images, train_labels = load_fashion_mnist("train", root)
    test_images, test_labels = load_fashion_mnist("test", root)
    split = split_fashion(train_labels, test_labels, generic_per_class, seed)
    return FashionData(
        generic=to_rgb32(train_images[split.generic]),
        generic_labels=train_labels[split.generic].astype(np.int64),
        planted=to_rgb32(test_images[split.planted]),
        classifier=to_rgb32(train_images[split.classifier]),
        classifier_labels=train_labels[split.classifier].astype(np.int64),
        held_out=to_rgb32(test_images[split.held_out]),
        held_out_labels=test_labels[split.held_out].astype(np.int64),
    )


def write_training_urls(training_set_path: str | Path, out: str | Path, seed: int = 0) -> dict:
    """The generator's training rows as files to serve and a relative URL list, for img2dataset.

    One PNG per training row under ``out/images/`` (a planted picture's copies are byte-identical
    files under different names, as duplicated LAION pictures sit under different URLs), in a seeded
    shuffle so the copies spread over the shards, and ``out/urls_relative.parquet`` with ``url``,
    ``caption`` and the columns img2dataset carries into each sample's JSON: ``fashion_index`` (the
    picture's position in ``training_set.npz``), ``fashion_kind`` and ``fashion_label``. The layout is
    :mod:`demo.data`'s, so :func:`demo.data.download_demo` downloads it.
    """
    import io
    import shutil

    import pyarrow as pa
    from PIL import Image

    from demo.data import IMAGES_DIR, URLS_RELATIVE
    from demo.memorizing.training import TrainingSet
    from pipeline.core.storage import atomic_write_table

    train = TrainingSet.load(training_set_path)
    out = Path(out)
    rows = train.row_index()
    rows = rows[np.random.default_rng([seed, 2]).permutation(len(rows))]
    staging = out / f".{IMAGES_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    encoded: dict[int, bytes] = {}
    for position, index in enumerate(rows.tolist()):
        if index not in encoded:
            buffer = io.BytesIO()
            Image.fromarray(train.images[index]).save(buffer, format="PNG")
            encoded[index] = buffer.getvalue()
        (staging / f"{position:05d}.png").write_bytes(encoded[index])
    shutil.rmtree(out / IMAGES_DIR, ignore_errors=True)
    staging.rename(out / IMAGES_DIR)
    table = pa.table(
        {
            "url": [f"{p:05d}.png" for p in range(len(rows))],
            "caption": [train.captions[i] for i in rows],
            "fashion_index": pa.array(rows, pa.int64()),
            "fashion_kind": [train.kinds[i] for i in rows],
            "fashion_label": pa.array(train.labels[rows], pa.int64()),
        }
    )
    atomic_write_table(out / URLS_RELATIVE, table)
    return {"rows": len(rows), "distinct_pictures": len(encoded)}
