"""The coarse partition of the embedding space that image dedup and the index share: k-means cells.

Every pass that compares rows with rows (semantic and pHash duplicates, the IVF index's lists)
only needs to compare rows that lie close together. So the embedding space is cut once into
``nlist = N / rows_per_cell`` cells by spherical k-means, trained on a seeded sample of
``train_per_cell`` rows per cell, and every row is assigned to its nearest cell and, when it lies
near a boundary, to up to ``top - 1`` further cells (those whose centroid's cosine to it is within
``margin`` of the nearest's). Image dedup compares each row with the rows of its nearest cell, where
the rows near its boundary are guests too, so duplicates on either side of a boundary are found; the
margin also keeps a centroid that is second-nearest to most rows (a hub, as the centroid nearest the
data's mean direction is) from collecting them all. The index uses the centroids as its coarse
quantizer and each row's nearest cell as its inverted list. The work per row then stays constant as
N grows (about ``rows_per_cell``), where an all-pairs pass grows with N.

The cells folder:

=======================  ===========================================================================
file                     content
=======================  ===========================================================================
centroids.npy            ``(nlist, d)`` float32 unit vectors
coarse.npy               the coarse level's centroids, when training was two-level (nlist >= 2048)
assign/<partition>.npy   ``(rows, top)`` int32: each row's cells, nearest first; -1 where it has fewer
cells.json               nlist, top, memberships (rows plus their further cells), training sample,
                         seconds, cell sizes (min/median/max)
=======================  ===========================================================================

Memory per process: the training task holds the sample (``nlist * train_per_cell * d * 4`` bytes,
about 130 MB at 1M rows of d=512); an assignment task holds one partition as float32 and the
centroids. Time: training ``O(sample * nlist * d * iterations)`` and assignment ``O(N * nlist * d)``
(flat search of the centroids) below 2,048 cells; from there, two-level, ``O(sample * sqrt(nlist) *
d * iterations)`` and ``O(N * probe * sqrt(nlist) * d)``, so the cost per row grows as sqrt(N), not N.
Both run as Ray tasks above ``ray_min_rows`` rows.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import CellsConfig, result_options
from pipeline.core.lazy import faiss
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import atomic_write_array, atomic_write_json
from pipeline.core.tasks import run_tasks
from pipeline.index.faiss_index import clamp_nlist
from pipeline.io.embeddings import IMG_EMB, Partition, folder_signature, list_partitions, normalize

log = logging.getLogger(__name__)

CENTROIDS = "centroids.npy"
COARSE = "coarse.npy"
ASSIGN = "assign"
INFO = "cells.json"
SCHEMA_VERSION = 2


def cell_count(n: int, rows_per_cell: int) -> int:
    """Cells for ``n`` rows: about ``rows_per_cell`` rows each, at least one, at most N/39 (k-means
    wants 39 training points per centroid)."""
    return clamp_nlist(max(1, round(n / max(1, rows_per_cell))), n)


def assign_path(cells_dir: str | Path, partition: str) -> Path:
    return Path(cells_dir) / ASSIGN / f"{partition}.npy"


def _sample(partitions: list[Partition], sizes: list[int], size: int, seed: int, kind: str) -> np.ndarray:
    """A seeded uniform sample of ``size`` rows, read partition by partition (memory-mapped)."""
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size=min(size, total), replace=False))
    starts = np.cumsum([0, *sizes])
    blocks = []
    for i, partition in enumerate(partitions):
        mine = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
        if len(mine):
            blocks.append(normalize(partition.embeddings(kind)[mine]))
    return np.concatenate(blocks)


#: From this many cells, k-means is two-level and rows find their cells through the coarse level:
#: flat k-means and flat assignment cost N x nlist x d, which grows as N^2 when nlist grows with N.
TWO_LEVEL_FROM = 2048
#: Coarse cells searched for a row's nearest fine cells (of about sqrt(nlist)). Measured on 2M
#: synthetic 128-d rows in 4,000 cells (63 coarse): 8 probes found the flat search's nearest cell for
#: 92% of rows (duplicate pairs sharing a cell: 0.979), 16 for 97.8% (0.995), 32 for 99.8% (0.9991;
#: flat: 0.9995); each probe costs sqrt(nlist) comparisons per row.
COARSE_PROBE = 16


def _kmeans(sample: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (unit float32); one centroid is the normalised mean."""
    if k >= len(sample) > 0:
        return normalize(sample[:k])
    if k <= 1:
        centre = sample.mean(axis=0, keepdims=True) if len(sample) else np.ones((1, sample.shape[1]))
        return normalize(centre if np.linalg.norm(centre) > 0 else np.ones_like(centre))
    kmeans = faiss.Kmeans(
        sample.shape[1], k, niter=iterations, seed=seed, spherical=True, max_points_per_centroid=1 << 20
    )
    kmeans.train(np.ascontiguousarray(sample))
    return normalize(kmeans.centroids)


def train_centroids(
    sample: np.ndarray, nlist: int, iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(centroids, coarse)``: ``nlist`` cells of ``sample``; from :data:`TWO_LEVEL_FROM` cells, trained
    in two levels (about sqrt(nlist) coarse cells, each split in proportion to its share of the sample,
    as ``faiss.contrib.clustering.two_level_clustering`` does), with the coarse centroids returned too."""
    if nlist < TWO_LEVEL_FROM:
        return _kmeans(sample, nlist, iterations, seed), None
    coarse = _kmeans(sample, round(np.sqrt(nlist)), iterations, seed)
    owner = nearest_cells(sample, coarse, 1, 0.0)[:, 0]
    points = np.bincount(owner, minlength=len(coarse))
    fine = []
    for c, k in enumerate(_split(nlist, points).tolist()):
        if k:
            fine.append(_kmeans(sample[owner == c], k, iterations, seed + 1 + c))
    return np.concatenate(fine), coarse


def _split(total: int, points: np.ndarray) -> np.ndarray:
    """``total`` cells shared among groups in proportion to their points (largest remainders), no
    group getting more cells than points; the shares sum to ``total`` (``total`` <= points)."""
    exact = total * points / points.sum()
    share = np.minimum(np.floor(exact).astype(np.int64), points)
    while share.sum() < total:
        room = np.flatnonzero(share < points)
        share[room[np.argmax((exact - share)[room])]] += 1
    return share


def nearest_cells(
    vectors: np.ndarray, centroids: np.ndarray, top: int, margin: float, coarse: np.ndarray | None = None
) -> np.ndarray:
    """Each row's nearest cell, then up to ``top - 1`` more whose centroid's cosine to the row is within
    ``margin`` of the nearest's (``(rows, top)`` int32, nearest first, -1 where a row has fewer).

    With ``coarse`` centroids, only the cells of the row's :data:`COARSE_PROBE` nearest coarse cells
    are searched (an IVF over the centroids): about ``probe x sqrt(nlist)`` comparisons, not nlist.
    """
    d = centroids.shape[1]
    if coarse is None:
        search: faiss.Index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(coarse)
        search = faiss.IndexIVFFlat(quantizer, d, len(coarse), faiss.METRIC_INNER_PRODUCT)
        search.is_trained = True
        search.nprobe = min(COARSE_PROBE, len(coarse))
    search.add(centroids)
    scores, ids = search.search(np.ascontiguousarray(vectors, dtype=np.float32), min(top, len(centroids)))
    ids[(scores < scores[:, :1] - margin) | (ids < 0)] = -1
    return ids.astype(np.int32)


def _train_task(folder: str, sizes: list[int], nlist: int, cfg: CellsConfig, kind: str, out: str) -> dict:
    started = time.monotonic()
    partitions = list_partitions(folder)
    sample = _sample(partitions, sizes, nlist * cfg.train_per_cell, cfg.seed, kind)
    centroids, coarse = train_centroids(sample, nlist, cfg.iterations, cfg.seed)
    atomic_write_array(Path(out) / CENTROIDS, centroids)
    if coarse is not None:
        atomic_write_array(Path(out) / COARSE, coarse)
    else:
        (Path(out) / COARSE).unlink(missing_ok=True)
    return {"sample": len(sample), "seconds": seconds_since(started)}


def _assign_task(folder: str, name: str, out: str, cfg: CellsConfig, kind: str) -> tuple[np.ndarray, int]:
    """Assign one partition's rows; returns how many rows each cell got as nearest, and how many
    further cells its rows joined (for cells.json)."""
    centroids = np.load(Path(out) / CENTROIDS)
    coarse = np.load(Path(out) / COARSE) if (Path(out) / COARSE).is_file() else None
    vectors = Partition(Path(folder), name).embeddings(kind)
    top = min(cfg.top, len(centroids))
    blocks = [
        nearest_cells(normalize(vectors[lo : lo + 65_536]), centroids, top, cfg.margin, coarse)
        for lo in range(0, len(vectors), 65_536)
    ]
    cells = np.concatenate(blocks) if blocks else np.zeros((0, top), np.int32)
    atomic_write_array(assign_path(out, name), cells)
    return np.bincount(cells[:, 0], minlength=len(centroids)), int((cells[:, 1:] >= 0).sum())


class CellsStage(Stage):
    """Embedding folder -> ``centroids.npy``, ``assign/<partition>.npy``, ``cells.json``."""

    name = "cells"

    def __init__(self, cfg: CellsConfig, embeddings: str | Path, out: str | Path, kind: str = IMG_EMB):
        if cfg.rows_per_cell < 1 or cfg.top < 1 or cfg.train_per_cell < 1 or cfg.iterations < 1:
            raise ValueError("cells.rows_per_cell, top, train_per_cell and iterations must be at least 1")
        self.cfg = cfg
        self.embeddings = str(embeddings)
        self.out = Path(out)
        self.kind = kind
        self.partitions = list_partitions(embeddings)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "kind": self.kind,
            "input": folder_signature(self.embeddings),
        }

    def outputs(self) -> list[Path]:
        return [self.out / CENTROIDS, self.out / INFO] + [
            assign_path(self.out, p.name) for p in self.partitions
        ]

    def compute(self) -> dict[str, Any]:
        started = time.monotonic()
        cfg = self.cfg
        sizes = [p.num_rows() for p in self.partitions]
        n = sum(sizes)
        if n == 0:
            raise ValueError(f"{self.embeddings} has no rows to partition into cells")
        nlist = cell_count(n, cfg.rows_per_cell)
        inline = n < cfg.ray_min_rows
        for stale in (self.out / ASSIGN).glob("*.npy") if (self.out / ASSIGN).is_dir() else []:
            if stale.stem not in {p.name for p in self.partitions}:
                stale.unlink()
        (train,) = run_tasks(
            _train_task,
            [(self.embeddings, sizes, nlist, cfg, self.kind, str(self.out))],
            inline=inline,
            fresh_worker=True,
        )
        counts = run_tasks(
            _assign_task,
            [(self.embeddings, p.name, str(self.out), cfg, self.kind) for p in self.partitions],
            inline=inline,
            label="cells: assign",
        )
        per_cell = np.sum([nearest for nearest, _ in counts], axis=0)
        info = {
            "schema": SCHEMA_VERSION,
            "rows": n,
            "nlist": nlist,
            "top": min(cfg.top, nlist),
            "memberships": n + sum(further for _, further in counts),
            "dim": int(self.partitions[0].embeddings(self.kind).shape[1]),
            "kind": self.kind,
            "train_sample": train["sample"],
            "train_seconds": train["seconds"],
            "cell_rows": {
                "min": int(per_cell.min()),
                "median": float(np.median(per_cell)),
                "max": int(per_cell.max()),
                "empty": int((per_cell == 0).sum()),
            },
            "partitions": [p.name for p in self.partitions],
            "mode": "in-process" if inline else "ray",
            "seconds": seconds_since(started),
        }
        atomic_write_json(self.out / INFO, info)
        log.info("cells: %d cells over %d rows in %.1f s", nlist, n, info["seconds"])
        return info


def run_cells(
    cfg: CellsConfig, embeddings: str | Path, out: str | Path, kind: str = IMG_EMB
) -> dict[str, Any]:
    """Partition ``embeddings`` into cells under ``out`` (resumable: a re-run with nothing new is a no-op)."""
    return run_stage(CellsStage(cfg, embeddings, out, kind), out)


def read_cells(cells_dir: str | Path) -> dict[str, Any]:
    """``cells.json`` of a finished cells folder."""
    return json.loads((Path(cells_dir) / INFO).read_text())
