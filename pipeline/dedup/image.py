"""Image duplicates across all shards: exact, pixel-level and semantic passes, then connected components.

Input is any embedding folder in clip-retrieval's (LAION's) layout (:mod:`pipeline.io.embeddings`);
rows are numbered 0..N-1 in partition order (the *row id*, the same numbering the bundle's index
uses). Three passes each produce verified pairs of rows:

* **exact**: identical ``sha256`` of the image bytes (rows without a hash never match);
* **phash**: 64-bit pHashes (:mod:`pipeline.embed.phash`) at Hamming distance <= ``phash_max_distance``,
  found by a FAISS binary range search: brute force (``IndexBinaryFlat``) up to
  ``phash_exhaustive_max_n`` rows, above that multi-index hashing (``IndexBinaryMultiHash``: 4 tables
  of 16 bits, probing every code within ``phash_max_distance // 4`` flipped bits), which by the
  pigeonhole principle finds exactly the same pairs. On CPU, multi-index hashing at radius 12 measured
  12-14x *slower* than brute force at 25k-100k hashes (BENCHMARKS.md), so the default keeps brute
  force up to 10M rows. A hash of 0 (every DCT coefficient tied: a flat image) carries no structure
  and is left out of this pass;
* **semantic**: cosine of L2-normalised image embeddings >= ``semantic_threshold`` among each row's
  ``semantic_k`` nearest neighbours, searched exactly (flat) up to ``exact_max_n`` rows and with an
  IVF (or HNSW) index above; on GPU when FAISS sees one. With ``semantic='auto'`` the pass runs only
  on embeddings of a semantic model: the embed stage labels random-weight embeddings
  ``semantic=false``, and their cosines say nothing about image content (see BENCHMARKS.md).

All pairs go through :func:`pipeline.dedup.union_find.connected_components`, so groups span shards and
passes (a re-encode joined by pHash and a crop joined semantically end up in one group).

Representative of a group: the row with the most pixels (width * height), ties broken by the
smallest key. ``group_id`` is the representative's row id, so it is stable for a given input and
also names singletons (their own row id) in :mod:`pipeline.bundle.tables`.

``image_duplicates.parquet`` has one row per image in a group of two or more, ordered by group and
with the representative first:

======================  =======  =========================================================================
column                  type     meaning
======================  =======  =========================================================================
key                     string   the sample's key
row_id                  int64    position in the embedding folder's row order
group_id                int64    row id of the group's representative
group_size              int64    images in the group (>= 2)
representative_key      string   key of the representative
is_representative       bool     this row is the representative (keep it; the others are removable)
similarity              float32  cosine of the image embeddings of this row and the representative
hamming_distance        int16    pHash Hamming distance to the representative (null without pHashes)
method                  string   strongest direct link to the representative: representative, exact,
                                 phash, semantic, or transitive (linked only through other members)
linked_by               string   passes whose pairs include this row, '|'-separated (exact|phash|semantic)
======================  =======  =========================================================================
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import ImageDedupConfig, result_options
from pipeline.core.ray_runtime import gpu_count, on_gpu_worker
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import atomic_write_json, atomic_write_table
from pipeline.dedup.names import (
    METHOD_EXACT,
    METHOD_PHASH,
    METHOD_REPRESENTATIVE,
    METHOD_SEMANTIC,
    METHOD_TRANSITIVE,
    OUTPUT_NAME,
    PASSES,
    SUMMARY_NAME,
)
from pipeline.dedup.report import REPORT_NAME, write_dedup_report
from pipeline.dedup.union_find import component_sizes, connected_components
from pipeline.embed.phash import HASH_BITS
from pipeline.index.faiss_index import KnnSearch, knn_batches
from pipeline.io.embeddings import folder_signature, is_semantic, load_metadata, load_unit_embeddings

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("row_id", pa.int64()),
        ("group_id", pa.int64()),
        ("group_size", pa.int64()),
        ("representative_key", pa.string()),
        ("is_representative", pa.bool_()),
        ("similarity", pa.float32()),
        ("hamming_distance", pa.int16()),
        ("method", pa.string()),
        ("linked_by", pa.string()),
    ]
)
#: Metadata columns the passes read.
META_COLUMNS = ("key", "caption", "sha256", "width", "height", "phash")
#: pHash multi-index hashing: 4 tables of 16-bit slices (pigeonhole: exact for radius < 4 * (nflip + 1)).
MULTIHASH_TABLES = 4
MULTIHASH_BITS = 16


# ----------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The passes: each returns canonical pairs (i < j, unique) of row ids.
# ----------------------------------------------------------------------------------------------


def _canonical(pairs: np.ndarray, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pairs as (min, max), self-pairs dropped, duplicates removed (first score kept), sorted."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    pairs = np.sort(pairs, axis=1)
    keep = pairs[:, 0] != pairs[:, 1]
    pairs = pairs[keep]
    if scores is not None:
        scores = np.asarray(scores)[keep]
    if len(pairs) == 0:
        return pairs, scores
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs, (scores[first] if scores is not None else None)


def exact_pairs(sha256: pa.Array | pa.ChunkedArray | list[str | None]) -> np.ndarray:
    """Rows with identical non-empty ``sha256``: each linked to the first row of its hash (a star)."""
    if isinstance(sha256, pa.ChunkedArray):
        hashes = sha256.combine_chunks() if sha256.num_chunks else pa.array([], pa.string())
    elif isinstance(sha256, pa.Array):
        hashes = sha256
    else:
        hashes = pa.array(list(sha256), pa.string())
    hashes = hashes.cast(pa.string())
    valid = pc.fill_null(pc.greater(pc.utf8_length(hashes), 0), False).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(valid)
    if len(rows) < 2:
        return np.zeros((0, 2), np.int64)
    codes = pc.dictionary_encode(hashes.take(pa.array(rows))).indices.to_numpy().astype(np.int64)
    first = np.full(codes.max() + 1, len(hashes), dtype=np.int64)
    np.minimum.at(first, codes, rows)
    pairs = np.stack([first[codes], rows], axis=1)
    return _canonical(pairs)[0]


def _hash_bytes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes as the (N, 8) big-endian bytes FAISS binary indexes take (first bit = MSB)."""
    return np.ascontiguousarray(
        np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    )


def phash_pairs(
    hashes: np.ndarray,
    max_distance: int,
    *,
    valid: np.ndarray | None = None,
    exhaustive_max_n: int = 500_000,
    batch: int = 16_384,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pairs of rows whose pHashes differ in at most ``max_distance`` bits.

    Args:
        hashes (`np.ndarray`): ``uint64`` pHash per row.
        max_distance (`int`): largest Hamming distance of a duplicate pair (0..63).
        valid (`np.ndarray`, *optional*): rows that have a hash; others never pair. Hashes equal to 0
            (flat images) are always left out.
        exhaustive_max_n (`int`): brute force up to this many hashes, multi-index hashing above.
        batch (`int`): query rows per range search.

    Returns:
        ``(pairs, distances, info)``: canonical pairs, their Hamming distances, and how they were found.
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"phash_max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    ok = hashes != 0 if valid is None else (np.asarray(valid, bool) & (hashes != 0))
    rows = np.flatnonzero(ok)
    with_hash = np.ones(len(hashes), bool) if valid is None else np.asarray(valid, bool)
    info: dict[str, Any] = {
        "hashed_rows": len(rows),
        "flat_hashes_skipped": int((with_hash & (hashes == 0)).sum()),
    }
    if len(rows) < 2:
        info["index"] = "none"
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int16), info
    codes = _hash_bytes(hashes[rows])
    if len(rows) <= exhaustive_max_n:
        index: faiss.IndexBinary = faiss.IndexBinaryFlat(HASH_BITS)
        info["index"] = "IndexBinaryFlat"
    else:
        index = faiss.IndexBinaryMultiHash(HASH_BITS, MULTIHASH_TABLES, MULTIHASH_BITS)
        index.nflip = max_distance // MULTIHASH_TABLES
        info["index"] = f"IndexBinaryMultiHash({MULTIHASH_TABLES}x{MULTIHASH_BITS} bits, nflip={index.nflip})"
    index.add(codes)
    found, dists = [], []
    for lo in range(0, len(rows), batch):
        # FAISS binary range search returns distances strictly below the radius.
        lims, distances, ids = index.range_search(codes[lo : lo + batch], max_distance + 1)
        queries = lo + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        later = ids > queries  # each pair once, and no self-match
        found.append(np.stack([queries[later], ids[later]], axis=1))
        dists.append(distances[later])
    pairs = rows[np.concatenate(found)] if found else np.zeros((0, 2), np.int64)
    pairs, distances = _canonical(
        pairs, np.concatenate(dists).astype(np.int16) if dists else np.zeros(0, np.int16)
    )
    return pairs, distances, info


def chance_partners(n: int, max_distance: int) -> float:
    """Expected images within ``max_distance`` bits of a given one among ``n``, for independent uniform bits.

    A floor on pHash false pairs (real hashes are more alike than random bits). Union-find chains
    unrelated images into large groups once this nears 1, so the radius must shrink as N grows:
    at r=12 it is 0.23 for 1M images and 23 for 100M; at r=8, 0.0003 and 0.03.
    """

    return (n - 1) * sum(comb(HASH_BITS, k) for k in range(max_distance + 1)) / 2.0**HASH_BITS


def semantic_pairs(
    vectors: np.ndarray,
    threshold: float,
    *,
    k: int = 32,
    search: KnnSearch = KnnSearch(),
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pairs whose embeddings have cosine >= ``threshold``, among each row's ``k`` nearest neighbours.

    ``vectors`` must be L2-normalised float32 (see :func:`load_unit_embeddings`); all-zero rows never
    pair. ``search`` says how: flat (exact), ivf or hnsw, and their parameters
    (:class:`~pipeline.index.faiss_index.KnnSearch`).

    Returns:
        ``(pairs, cosines, info)``; ``info['saturated_rows']`` counts rows whose k-th neighbour still
        passed the threshold (their group may have more members than k: they are still joined
        transitively, but pairs beyond the k-th are not listed).
    """
    n = len(vectors)
    info: dict[str, Any] = {"search": search.kind, "k": int(min(k + 1, n)), "threshold": threshold}
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), info
    nonzero = np.einsum("ij,ij->i", vectors, vectors) > 0.5
    found, scores_out = [], []
    saturated = 0
    started = time.monotonic()
    for lo, scores, ids in knn_batches(vectors, k + 1, search):  # k + 1: the row itself comes back too
        queries = np.arange(lo, lo + len(ids))[:, None].repeat(ids.shape[1], axis=1)
        keep = (ids >= 0) & (scores >= threshold) & (ids != queries)
        keep &= nonzero[queries] & nonzero[np.maximum(ids, 0)]
        saturated += int((scores[:, -1] >= threshold).sum()) if ids.shape[1] == k + 1 else 0
        found.append(np.stack([queries[keep], ids[keep]], axis=1))
        scores_out.append(scores[keep])
    info["seconds"] = seconds_since(started)
    info["saturated_rows"] = saturated
    pairs, cosines = _canonical(np.concatenate(found), np.concatenate(scores_out).astype(np.float32))
    return pairs, cosines, info


def choose_search(n: int, cfg: ImageDedupConfig) -> str:
    """The semantic pass's search: ``cfg.search``, or for ``auto`` flat up to ``exact_max_n``, else ivf."""
    if cfg.search == "auto":
        return "flat" if n <= cfg.exact_max_n else "ivf"
    if cfg.search not in ("flat", "ivf", "hnsw"):
        raise ValueError(f"image_dedup.search must be auto, flat, ivf or hnsw; got {cfg.search!r}")
    return cfg.search


# ----------------------------------------------------------------------------------------------
# Groups.
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageDedupResult:
    """Everything the stage found.

    Attributes:
        table (`pa.Table`): ``image_duplicates.parquet`` (see the module docstring).
        group_id (`np.ndarray`): per row, the row id of its group's representative (own id if alone).
        group_size (`np.ndarray`): per row, the size of its group (1 if alone).
        pairs (`dict[str, np.ndarray]`): the verified pairs of each pass that ran.
        stats (`dict`): counts and timings.
    """

    table: pa.Table
    group_id: np.ndarray
    group_size: np.ndarray
    pairs: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def representatives(labels: np.ndarray, pixels: np.ndarray, keys: list[str]) -> np.ndarray:
    """Per row, the row id of its component's representative: most pixels, then smallest key."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, np.int64)
    key_rank = np.empty(n, np.int64)
    key_rank[np.argsort(np.asarray(keys, dtype=object), kind="stable")] = np.arange(n)
    order = np.lexsort((key_rank, -np.asarray(pixels, np.int64), labels))
    sorted_labels = labels[order]
    starts = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    rep_of_label = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    rep_of_label[sorted_labels[starts]] = order[starts]
    return rep_of_label[labels]


def find_image_duplicates(
    meta: pa.Table, vectors: np.ndarray | None, cfg: ImageDedupConfig, semantic_model: bool = True
) -> ImageDedupResult:
    """Run the enabled passes over ``meta`` (key, sha256, width, height, phash) and ``vectors``.

    Args:
        meta (`pa.Table`): one row per image, in row-id order.
        vectors (`np.ndarray`, *optional*): L2-normalised float32 embeddings, row-aligned with ``meta``;
            None skips the semantic pass and leaves ``similarity`` null.
        cfg (`ImageDedupConfig`): passes and thresholds.
        semantic_model (`bool`): whether ``vectors`` come from a semantic model (``semantic='auto'``).
    """
    check_config(cfg)
    n = meta.num_rows
    if vectors is not None and len(vectors) != n:
        raise ValueError(f"{len(vectors)} embeddings for {n} metadata rows")
    keys = meta.column("key").to_pylist()
    stats: dict[str, Any] = {"rows": n, "passes": {}}
    pairs: dict[str, np.ndarray] = {}
    if cfg.exact and n and meta.column("sha256").null_count == n:
        # LAION's released metadata has no image hash: nothing to compare, said once.
        log.info("image dedup: exact pass off, the metadata has no sha256 of the image bytes")
        stats["passes"][METHOD_EXACT] = {"skipped": "no sha256 column in the metadata"}
    elif cfg.exact:
        started = time.monotonic()
        pairs[METHOD_EXACT] = exact_pairs(meta.column("sha256"))
        stats["passes"][METHOD_EXACT] = {"pairs": len(pairs[METHOD_EXACT]), "seconds": seconds_since(started)}
    hashes = None
    has_hash = np.zeros(n, bool)
    if "phash" in meta.column_names:
        column = meta.column("phash")
        has_hash = ~column.is_null().to_numpy(zero_copy_only=False) if n else has_hash
        hashes = (
            pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.uint64)
            if n
            else np.zeros(0, np.uint64)
        )
    if cfg.phash:
        started = time.monotonic()
        if hashes is None or not has_hash.any():
            log.info("image dedup: pHash pass off, the metadata has no phash column")
            stats["passes"][METHOD_PHASH] = {"skipped": "no phash column in the metadata"}
        else:
            p, _, info = phash_pairs(
                hashes,
                cfg.phash_max_distance,
                valid=has_hash,
                exhaustive_max_n=cfg.phash_exhaustive_max_n,
                batch=cfg.query_batch,
            )
            pairs[METHOD_PHASH] = p
            chance = chance_partners(int(has_hash.sum()), cfg.phash_max_distance)
            stats["passes"][METHOD_PHASH] = {
                "pairs": len(p),
                **info,
                "chance_partners_per_image": round(chance, 6),
                "seconds": seconds_since(started),
            }
            if chance > 0.1:
                log.warning(
                    "pHash radius %d over %d images: ~%.2f chance partners per image if bits were random; "
                    "connected components may chain unrelated images (lower --phash-max-distance)",
                    cfg.phash_max_distance,
                    int(has_hash.sum()),
                    chance,
                )
    run_semantic = cfg.semantic == "on" or (cfg.semantic == "auto" and semantic_model)
    if cfg.semantic != "off" and not run_semantic:
        stats["passes"][METHOD_SEMANTIC] = {
            "skipped": "embeddings of a random-weight model (semantic=false): cosine carries no meaning; "
            "use --semantic on to force"
        }
    elif run_semantic and vectors is None:
        stats["passes"][METHOD_SEMANTIC] = {"skipped": "no embeddings"}
    elif run_semantic:
        started = time.monotonic()
        search = KnnSearch(
            kind=choose_search(n, cfg),
            nlist=cfg.nlist,
            nprobe=cfg.nprobe,
            hnsw_m=cfg.hnsw_m,
            ef_search=cfg.ef_search,
            train_size=cfg.train_size,
            seed=cfg.seed,
            use_gpu=cfg.use_gpu,
            batch=cfg.query_batch,
        )
        p, _, info = semantic_pairs(vectors, cfg.semantic_threshold, k=cfg.semantic_k, search=search)
        pairs[METHOD_SEMANTIC] = p
        info["gpu"] = gpu_count(cfg.use_gpu) > 0
        stats["passes"][METHOD_SEMANTIC] = {"pairs": len(p), **info, "seconds": seconds_since(started)}

    started = time.monotonic()
    all_pairs = np.concatenate(list(pairs.values())) if pairs else np.zeros((0, 2), np.int64)
    labels = connected_components(n, all_pairs)
    sizes = component_sizes(labels)
    width = meta.column("width").to_numpy(zero_copy_only=False) if n else np.zeros(0)
    height = meta.column("height").to_numpy(zero_copy_only=False) if n else np.zeros(0)
    pixels = np.nan_to_num(width.astype(np.float64)) * np.nan_to_num(height.astype(np.float64))
    group_id = representatives(labels, pixels.astype(np.int64), keys)
    table = _duplicates_table(
        keys,
        group_id,
        sizes,
        meta,
        vectors,
        hashes,
        has_hash,
        pairs,
        cfg,
        run_semantic,
    )
    grouped = sizes > 1
    stats.update(
        groups=len(np.unique(group_id[grouped])),
        rows_in_groups=int(grouped.sum()),
        removable_rows=int(grouped.sum() - len(np.unique(group_id[grouped]))),
        largest_group=int(sizes.max()) if n else 0,
        methods={
            m: int(c)
            for m, c in zip(
                *np.unique(table.column("method").to_numpy(zero_copy_only=False), return_counts=True),
                strict=False,
            )
        }
        if table.num_rows
        else {},
        grouping_seconds=seconds_since(started),
    )
    return ImageDedupResult(table, group_id, sizes, pairs, stats)


def _duplicates_table(
    keys: list[str],
    group_id: np.ndarray,
    sizes: np.ndarray,
    meta: pa.Table,
    vectors: np.ndarray | None,
    hashes: np.ndarray | None,
    has_hash: np.ndarray,
    pairs: dict[str, np.ndarray],
    cfg: ImageDedupConfig,
    semantic_ran: bool,
) -> pa.Table:
    rows = np.flatnonzero(sizes > 1)
    if len(rows) == 0:
        return SCHEMA.empty_table()
    rep = group_id[rows]
    is_rep = rows == rep
    rows = rows[np.lexsort((rows, ~is_rep, rep))]
    rep = group_id[rows]
    is_rep = rows == rep
    if vectors is not None:
        similarity = np.einsum("ij,ij->i", vectors[rows], vectors[rep]).astype(np.float32)
        similarity[is_rep] = 1.0
        similarity_arr = pa.array(similarity, pa.float32())
    else:
        similarity = None
        similarity_arr = pa.nulls(len(rows), pa.float32())
    if hashes is not None:
        both = has_hash[rows] & has_hash[rep]
        distance = np.bitwise_count(np.bitwise_xor(hashes[rows], hashes[rep])).astype(np.int16)
        distance_arr = pa.array(distance, pa.int16(), mask=~both)
    else:
        both = np.zeros(len(rows), bool)
        distance = np.zeros(len(rows), np.int16)
        distance_arr = pa.nulls(len(rows), pa.int16())
    sha = np.asarray(meta.column("sha256").to_pylist(), dtype=object)
    method = np.full(len(rows), METHOD_TRANSITIVE, dtype=object)
    if semantic_ran and similarity is not None:
        method[similarity >= cfg.semantic_threshold] = METHOD_SEMANTIC
    if cfg.phash:
        method[both & (distance <= cfg.phash_max_distance) & (hashes[rows] != 0)] = METHOD_PHASH
    if cfg.exact:
        same = np.array([bool(a) and a == b for a, b in zip(sha[rows], sha[rep], strict=False)], dtype=bool)
        method[same] = METHOD_EXACT
    method[is_rep] = METHOD_REPRESENTATIVE
    linked = [[] for _ in rows]
    position = {int(r): i for i, r in enumerate(rows)}
    for name in PASSES:
        if name not in pairs or len(pairs[name]) == 0:
            continue
        touched = np.intersect1d(np.unique(pairs[name]), rows)
        for r in touched.tolist():
            linked[position[r]].append(name)
    key_arr = np.asarray(keys, dtype=object)
    return pa.table(
        {
            "key": pa.array(key_arr[rows].tolist(), pa.string()),
            "row_id": pa.array(rows, pa.int64()),
            "group_id": pa.array(rep, pa.int64()),
            "group_size": pa.array(sizes[rows], pa.int64()),
            "representative_key": pa.array(key_arr[rep].tolist(), pa.string()),
            "is_representative": pa.array(is_rep, pa.bool_()),
            "similarity": similarity_arr,
            "hamming_distance": distance_arr,
            "method": pa.array(method.tolist(), pa.string()),
            "linked_by": pa.array(["|".join(x) for x in linked], pa.string()),
        },
        schema=SCHEMA,
    )


def check_config(cfg: ImageDedupConfig) -> None:
    """Clear errors for option values the stage cannot run with."""
    if cfg.semantic not in ("auto", "on", "off"):
        raise ValueError(f"image_dedup.semantic must be auto, on or off; got {cfg.semantic!r}")
    if not -1.0 <= cfg.semantic_threshold <= 1.0:
        raise ValueError(
            f"image_dedup.semantic_threshold is a cosine in [-1, 1]; got {cfg.semantic_threshold}"
        )
    if not 0 <= cfg.phash_max_distance < HASH_BITS:
        raise ValueError(f"image_dedup.phash_max_distance must be in 0..63; got {cfg.phash_max_distance}")
    if cfg.semantic_k < 1 or cfg.query_batch < 1 or cfg.nprobe < 1:
        raise ValueError("image_dedup.semantic_k, nprobe and query_batch must be at least 1")
    if cfg.search not in ("auto", "flat", "ivf", "hnsw"):
        raise ValueError(f"image_dedup.search must be auto, flat, ivf or hnsw; got {cfg.search!r}")


class ImageDedupStage(Stage):
    """Embedding folder -> ``image_duplicates.parquet``, ``image_dedup_summary.json`` and (unless
    ``cfg.report`` is off) ``dedup_report.html`` (:mod:`pipeline.dedup.report`; thumbnails from
    ``cfg.shards`` when given)."""

    name = "image_dedup"

    def __init__(self, cfg: ImageDedupConfig):
        check_config(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)

    def fingerprint(self) -> dict[str, Any]:
        """Every result option and the input folder's signature (sizes and mtimes of its files)."""
        return {
            "schema": SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "input": folder_signature(self.cfg.embeddings),
        }

    def outputs(self) -> list[Path]:
        return [self.out / OUTPUT_NAME] + ([self.out / REPORT_NAME] if self.cfg.report else [])

    def compute(self) -> dict[str, Any]:
        # On a cluster with GPUs this machine lacks, the search runs in a Ray task holding one; a
        # run with nothing to do never gets here, so it neither joins the cluster nor waits for a GPU.
        return on_gpu_worker(compute_image_dedup, self.cfg)


def compute_image_dedup(cfg: ImageDedupConfig) -> dict[str, Any]:
    """The stage's work, where the GPU is: read the folder, find duplicates, write the outputs."""
    started = time.monotonic()
    out = Path(cfg.out)
    meta = load_metadata(cfg.embeddings, META_COLUMNS)
    semantic_model = is_semantic(cfg.embeddings)
    vectors = load_unit_embeddings(cfg.embeddings)
    log.info(
        "image dedup: %d images from %s (semantic model: %s)",
        meta.num_rows,
        cfg.embeddings,
        semantic_model,
    )
    result = find_image_duplicates(meta, vectors, cfg, semantic_model=semantic_model)
    atomic_write_table(out / OUTPUT_NAME, result.table)
    summary = {
        "job": "dedup_images",
        "out": str(out / OUTPUT_NAME),
        "embeddings": str(cfg.embeddings),
        "semantic_model": semantic_model,
        **result.stats,
        "seconds": seconds_since(started),
        "skipped": False,
    }
    if cfg.report:
        write_dedup_report(
            out / REPORT_NAME,
            image_duplicates=result.table,
            image_summary=result.stats,
            image_cfg=cfg,
            embeddings=cfg.embeddings,
            vectors=vectors,
            meta=meta,
            shards=cfg.shards,
            title="Image duplicates",
        )
        summary["report"] = str(out / REPORT_NAME)
    atomic_write_json(out / SUMMARY_NAME, summary)
    return summary


def run_image_dedup(cfg: ImageDedupConfig) -> dict[str, Any]:
    """Read ``cfg.embeddings``, find image duplicates, write ``image_duplicates.parquet`` and the summary.

    A re-run with the same options over the same input files returns the saved summary without
    recomputing (``skipped: true``).
    """
    return run_stage(ImageDedupStage(cfg), cfg.out)
