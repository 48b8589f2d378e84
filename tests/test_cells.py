"""The shared k-means cells: how many, how trained, how rows are assigned (pipeline/index/cells.py)."""

from __future__ import annotations

import numpy as np

from pipeline.index.cells import TWO_LEVEL_FROM, _split, cell_count, nearest_cells, train_centroids
from pipeline.io.embeddings import normalize


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return normalize(
        (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d)) * 0.4).astype(np.float32)
    )


def test_cell_count_follows_rows_per_cell_and_leaves_k_means_39_points_per_cell():
    assert cell_count(1_000_000, 1000) == 1000 and cell_count(500, 1000) == 1
    assert cell_count(1_000, 10) == 25  # at most N / 39
    assert _split(10, np.array([5, 1, 100])).tolist() == [1, 0, 9]  # proportional, sums to 10
    assert _split(7, np.array([1, 3, 30])).tolist()[0] <= 1


def test_two_level_training_gives_exactly_nlist_cells_and_assignment_through_the_coarse_level():
    x = clustered(150_000, 16, 400, seed=0)
    centroids, coarse = train_centroids(x, TWO_LEVEL_FROM, iterations=5, seed=0)
    assert centroids.shape == (TWO_LEVEL_FROM, 16) and coarse is not None and len(coarse) == 45
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    through_coarse = nearest_cells(x[:20_000], centroids, 1, 0.0, coarse)[:, 0]
    flat = nearest_cells(x[:20_000], centroids, 1, 0.0)[:, 0]
    agree = float((through_coarse == flat).mean())
    print(f"\ntwo-level assignment: {agree:.3f} of rows get the flat search's nearest cell")
    assert agree >= 0.9
    small, none = train_centroids(x[:5_000], 50, iterations=5, seed=0)
    assert small.shape == (50, 16) and none is None  # below TWO_LEVEL_FROM: one level


def test_a_row_joins_a_further_cell_only_near_a_boundary():
    centroids = normalize(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32))
    rows = normalize(np.array([[1.0, 0.02], [1.0, 0.95], [1.0, 0.5]], np.float32))
    cells = nearest_cells(rows, centroids, 2, margin=0.05)
    assert cells[:, 0].tolist() == [0, 0, 0]
    # Within 0.05 of the nearest centroid's cosine: the next cell too; further: its nearest cell only.
    assert cells[:, 1].tolist() == [-1, 1, -1]
