"""The lookup contract between the artifact bundle and its consumers (AMG, audits).

AMG needs, for the model's current prediction x̂0, its nearest training image n0 (to score
memorization and to push away from it) and, when n0 carries a heavily duplicated caption, that
caption y_N (a negative prompt). The released AMG code asked a LAION web service for both; here any
object implementing :class:`NeighbourIndex` answers offline: the bundle built by
``jobs/build_artifacts.py`` (``pipeline.bundle.build.open_bundle``) or an in-memory index over a handful of
training images in tests.

Scores follow FAISS conventions: higher is more similar for inner-product spaces (CLIP, SSCD on
L2-normalised vectors); row ids index the training rows in the bundle's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class DuplicateCaption:
    """What G_dup needs about one training row: its dominant duplicated caption and how often it occurs.

    ``caption`` is None when the row has no caption that repeats at least the table's minimum count.
    """

    caption: str | None
    count: int


@runtime_checkable
class NeighbourIndex(Protocol):
    """Nearest-training-row search plus the per-row lookups AMG and the audits need."""

    @property
    def dim(self) -> int:
        """Dimension of the vectors :meth:`search_embeddings` takes."""

    def __len__(self) -> int:
        """Number of training rows."""

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, row_ids)``, each ``(len(queries), k)``, best first, like ``faiss.Index.search``."""

    def embeddings(self, row_ids: np.ndarray) -> np.ndarray:
        """Stored (L2-normalised) vectors of ``row_ids``, float32, for similarity and its gradient."""

    def duplicate_caption(self, row_id: int) -> DuplicateCaption:
        """y_N for G_dup when ``row_id`` is the nearest neighbour n0."""

    def row(self, row_id: int) -> dict:
        """Metadata of a training row: at least ``key`` and ``caption``."""
