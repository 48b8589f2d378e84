"""Image duplicates across all shards: exact, pixel-level and semantic passes, then verified groups.

Input is any embedding folder in clip-retrieval's (LAION's) layout (:mod:`pipeline.io.embeddings`);
rows are numbered 0..N-1 in partition order (the *row id*, the same numbering the bundle's index
uses). The passes compare only rows that can be duplicates, so the work per row stays constant as N
grows (:mod:`pipeline.dedup.image_shuffle` runs them as Ray tasks over the shared k-means cells of
:mod:`pipeline.index.cells`):

* **exact**: identical ``sha256`` of the image bytes (rows without a hash never match), found by a
  shuffle on the hash;
* **phash**: 64-bit pHashes (:mod:`pipeline.embed.phash`) at Hamming distance <= ``phash_max_distance``
  among the rows of one cell (a FAISS binary range search). A hash of 0 (every DCT coefficient tied:
  a flat image) carries no structure and is left out. Random 64-bit hashes fall within 12 bits of
  each other once in 4 million pairs (:func:`chance_partners`), so with semantic embeddings a pHash
  pair must also reach ``phash_confirm_cosine``;
* **semantic**: cosine of L2-normalised image embeddings >= ``semantic_threshold`` between each row
  and the rows of its nearest cell (blocked matrix products), the ``semantic_k`` closest partners
  per row kept. With ``semantic='auto'`` the pass runs only on embeddings of a semantic model: the
  embed stage labels random-weight embeddings ``semantic=false``, and their cosines say nothing
  about image content (see BENCHMARKS.md).

Groups: the pairs of all passes are joined by connected components (:mod:`pipeline.dedup.union_find`),
over the rows that lie on a pair only. With ``linkage='verified'`` (default) every member must then
pass one of the passes' tests *directly against its group's representative*; members that fail leave
and form groups among themselves by the same rule, so a chain of weak links (A~B~C with A and C
unrelated) cannot pull unrelated images into one group. ``linkage='single'`` keeps plain components.

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
                                 phash, semantic, or transitive (linked only through other members;
                                 only with ``linkage='single'``)
linked_by               string   passes whose pairs include this row, '|'-separated (exact|phash|semantic)
======================  =======  =========================================================================
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from math import comb
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import ImageDedupConfig
from pipeline.core.lazy import faiss
from pipeline.core.stage import seconds_since
from pipeline.dedup.names import (
    METHOD_EXACT,
    METHOD_PHASH,
    METHOD_REPRESENTATIVE,
    METHOD_SEMANTIC,
    METHOD_TRANSITIVE,
    PASSES,
)
from pipeline.dedup.union_find import component_sizes, connected_components
from pipeline.embed.phash import HASH_BITS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
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
#: Metadata columns the passes and the groups read.
META_COLUMNS = ("key", "sha256", "width", "height", "phash")
LINKAGES = ("verified", "single")


# ----------------------------------------------------------------------------------------------
# The passes: each returns canonical pairs (i < j, unique) of positions in its input.
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
    hashes: np.ndarray, max_distance: int, *, valid: np.ndarray | None = None, batch: int = 16_384
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows whose pHashes differ in at most ``max_distance`` bits (brute force).

    Args:
        hashes (`np.ndarray`): ``uint64`` pHash per row.
        max_distance (`int`): largest Hamming distance of a duplicate pair (0..63).
        valid (`np.ndarray`, *optional*): rows that have a hash; others never pair. Hashes equal to 0
            (flat images) are always left out.
        batch (`int`): query rows per range search.

    Returns:
        ``(pairs, distances)``: canonical pairs and their Hamming distances.
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"phash_max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    ok = hashes != 0 if valid is None else (np.asarray(valid, bool) & (hashes != 0))
    rows = np.flatnonzero(ok)
    if len(rows) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int16)
    codes = _hash_bytes(hashes[rows])
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(codes)
    found, dists = [], []
    for lo in range(0, len(rows), batch):
        # FAISS binary range search returns distances strictly below the radius.
        lims, distances, ids = index.range_search(codes[lo : lo + batch], max_distance + 1)
        queries = lo + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        later = ids > queries  # each pair once, and no self-match
        found.append(np.stack([queries[later], ids[later]], axis=1))
        dists.append(distances[later])
    pairs, distances = _canonical(rows[np.concatenate(found)], np.concatenate(dists).astype(np.int16))
    return pairs, distances


def chance_partners(n: int, max_distance: int) -> float:
    """Expected images within ``max_distance`` bits of a given one among ``n``, for independent uniform bits.

    A floor on pHash false pairs (real hashes are more alike than random bits): at r=12 it is 0.23
    for 1M images compared all with all, and 0.0005 within a cell of 2,000 rows.
    """

    return (n - 1) * sum(comb(HASH_BITS, k) for k in range(max_distance + 1)) / 2.0**HASH_BITS


def semantic_pairs(
    vectors: np.ndarray,
    threshold: float,
    *,
    k: int = 32,
    owners: np.ndarray | None = None,
    block_rows: int = 2048,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs (owner, any row) whose embeddings have cosine >= ``threshold``: exact blocked products.

    ``vectors`` must be L2-normalised float32; all-zero rows never pair. ``owners`` (default: every
    row) are the rows whose partners are searched; each keeps its ``k`` closest partners. With a torch
    ``device`` (``"cuda"``) the products run there and only each block's similarities come back.

    Returns:
        ``(pairs, cosines, saturated)``: canonical pairs, their cosines, and how many owner rows had
        more than ``k`` partners (their group may have more members than k: they are still joined
        transitively, but pairs beyond the k-th are not listed).
    """
    n = len(vectors)
    owners = np.arange(n) if owners is None else np.asarray(owners, np.int64)
    if n < 2 or len(owners) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), 0
    nonzero = np.einsum("ij,ij->i", vectors, vectors) > 0.5
    found, scores, saturated = [], [], 0
    if device is not None:
        import torch

        on_device = torch.from_numpy(np.ascontiguousarray(vectors)).to(device)
    for lo in range(0, len(owners), block_rows):
        query = owners[lo : lo + block_rows]
        if device is None:
            sims = vectors[query] @ vectors.T
        else:
            sims = (on_device[torch.from_numpy(query).to(device)] @ on_device.T).cpu().numpy()
        sims[np.arange(len(query)), query] = -np.inf  # no self-pairs
        hit = (sims >= threshold) & nonzero[query][:, None] & nonzero[None, :]
        over = np.flatnonzero(hit.sum(axis=1) > k)
        saturated += len(over)
        if len(over):  # keep the k closest of a row with more partners
            cut = -np.partition(-sims[over], k - 1, axis=1)[:, k - 1]
            hit[over] &= sims[over] >= cut[:, None]
        r, c = np.nonzero(hit)
        found.append(np.stack([query[r], c], axis=1))
        scores.append(sims[r, c])
    pairs, cosines = _canonical(np.concatenate(found), np.concatenate(scores).astype(np.float32))
    return pairs, cosines, saturated


@dataclass
class CellPairs:
    """The pHash and semantic pairs found among a set of rows (positions in that set), with counts."""

    phash: np.ndarray
    semantic: np.ndarray
    phash_unconfirmed: int = 0
    saturated: int = 0


def cell_pairs(
    vectors: np.ndarray | None,
    hashes: np.ndarray | None,
    has_hash: np.ndarray,
    cfg: ImageDedupConfig,
    semantic: bool,
    owners: np.ndarray | None = None,
    device: str | None = None,
) -> CellPairs:
    """The pHash and semantic passes over the rows of one cell (or any set of rows compared all-to-all).

    Args:
        vectors: their unit float32 embeddings (None: no semantic pass, no pHash confirmation).
        hashes, has_hash: their pHashes and which rows have one (None: no pHash pass).
        cfg: thresholds.
        semantic: whether the embeddings carry meaning (the semantic pass and pHash confirmation run).
        owners: rows whose semantic partners are searched (default: all); pHash compares all rows.
        device: torch device of the semantic products (None: numpy here).
    """
    empty = np.zeros((0, 2), np.int64)
    result = CellPairs(empty, empty)
    if cfg.phash and hashes is not None and has_hash.any():
        pairs, _ = phash_pairs(hashes, cfg.phash_max_distance, valid=has_hash, batch=cfg.block_rows)
        if semantic and vectors is not None and cfg.phash_confirm_cosine > -1 and len(pairs):
            cosine = np.einsum("ij,ij->i", vectors[pairs[:, 0]], vectors[pairs[:, 1]])
            confirmed = cosine >= cfg.phash_confirm_cosine
            result.phash_unconfirmed = int((~confirmed).sum())
            pairs = pairs[confirmed]
        result.phash = pairs
    if semantic and vectors is not None:
        result.semantic, _, result.saturated = semantic_pairs(
            vectors,
            cfg.semantic_threshold,
            k=cfg.semantic_k,
            owners=owners,
            block_rows=cfg.block_rows,
            device=device,
        )
    return result


def runs_semantic(cfg: ImageDedupConfig, semantic_model: bool) -> bool:
    """Whether the semantic pass (and pHash confirmation by cosine) runs for these embeddings."""
    return cfg.semantic == "on" or (cfg.semantic == "auto" and semantic_model)


def semantic_skip_reason(cfg: ImageDedupConfig, semantic_model: bool) -> str | None:
    if cfg.semantic == "off":
        return "semantic pass off (--semantic off)"
    if not runs_semantic(cfg, semantic_model):
        return (
            "embeddings of a random-weight model (semantic=false): cosine carries no meaning; "
            "use --semantic on to force"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Groups.
# ----------------------------------------------------------------------------------------------


@dataclass
class Nodes:
    """What grouping needs of the rows that lie on at least one pair, sorted by row id.

    Attributes:
        rows: their row ids (ascending).
        keys, sha: keys and sha256 (object arrays; ``None``/empty: no hash).
        hashes, has_hash: pHashes and which rows have one.
        pixels: width * height (0 when unknown).
        vectors: unit float32 embeddings, or None.
    """

    rows: np.ndarray
    keys: np.ndarray
    sha: np.ndarray
    hashes: np.ndarray
    has_hash: np.ndarray
    pixels: np.ndarray
    vectors: np.ndarray | None

    @classmethod
    def from_table(cls, rows: np.ndarray, meta: pa.Table, vectors: np.ndarray | None) -> Nodes:
        """Nodes from metadata (key, sha256, width, height, phash) and embeddings of exactly ``rows``."""
        n = meta.num_rows

        def column(name: str, fill: Any) -> np.ndarray:
            if name not in meta.column_names or n == 0:
                return np.full(n, fill)
            return pc.fill_null(meta.column(name), fill).to_numpy(zero_copy_only=False)

        has_hash = (
            ~meta.column("phash").is_null().to_numpy(zero_copy_only=False)
            if "phash" in meta.column_names and n
            else np.zeros(n, bool)
        )
        pixels = column("width", 0).astype(np.int64) * column("height", 0).astype(np.int64)
        return cls(
            rows=np.asarray(rows, np.int64),
            keys=np.asarray(meta.column("key").to_pylist(), dtype=object),
            sha=np.asarray(
                meta.column("sha256").to_pylist() if "sha256" in meta.column_names else [None] * n, object
            ),
            hashes=column("phash", 0).astype(np.uint64),
            has_hash=has_hash,
            pixels=pixels,
            vectors=vectors,
        )


def representatives(labels: np.ndarray, pixels: np.ndarray, keys: Any) -> np.ndarray:
    """Per row, the index of its component's representative: most pixels, then smallest key."""
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


@dataclass
class Links:
    """Direct comparison of members with their representatives: the tests the passes apply."""

    method: np.ndarray  # object: exact, phash, semantic, transitive (or representative)
    similarity: np.ndarray | None  # cosine, or None without embeddings
    distance: np.ndarray  # pHash Hamming distance
    both_hashed: np.ndarray


def direct_links(nodes: Nodes, a: np.ndarray, b: np.ndarray, cfg: ImageDedupConfig, semantic: bool) -> Links:
    """The strongest pass whose test ``a`` and ``b`` (node positions) pass directly, pair by pair."""
    similarity = (
        np.einsum("ij,ij->i", nodes.vectors[a], nodes.vectors[b]).astype(np.float32)
        if nodes.vectors is not None
        else None
    )
    both = nodes.has_hash[a] & nodes.has_hash[b] & (nodes.hashes[a] != 0)
    distance = np.bitwise_count(np.bitwise_xor(nodes.hashes[a], nodes.hashes[b])).astype(np.int16)
    method = np.full(len(a), METHOD_TRANSITIVE, dtype=object)
    if semantic and similarity is not None:
        method[similarity >= cfg.semantic_threshold] = METHOD_SEMANTIC
    if cfg.phash:
        close = both & (distance <= cfg.phash_max_distance)
        if semantic and similarity is not None and cfg.phash_confirm_cosine > -1:
            close &= similarity >= cfg.phash_confirm_cosine
        method[close] = METHOD_PHASH
    if cfg.exact:
        sha_a, sha_b = nodes.sha[a], nodes.sha[b]
        same = np.fromiter((bool(x) and x == y for x, y in zip(sha_a, sha_b, strict=True)), bool, len(a))
        method[same] = METHOD_EXACT
    method[a == b] = METHOD_REPRESENTATIVE
    return Links(method, similarity, distance, both)


def verified_labels(
    labels: np.ndarray, nodes: Nodes, cfg: ImageDedupConfig, semantic: bool
) -> tuple[np.ndarray, int]:
    """Split each component into groups whose every member passes a test directly against its
    representative: a star around each representative, never a chain.

    Within a component, members are taken in representative order (most pixels, then smallest key):
    the first one left becomes a representative and takes every member left that passes one of the
    passes' tests against it; the rest repeat the same among themselves. Returns the new labels (the
    smallest node of each group, as :func:`connected_components` labels) and how many members ended
    outside their component's first group.
    """
    labels = labels.copy()
    moved = 0
    key_rank = np.empty(len(labels), np.int64)
    key_rank[np.argsort(nodes.keys, kind="stable")] = np.arange(len(labels))
    order = np.lexsort((key_rank, -nodes.pixels, labels))
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        left = order[lo:hi]  # one component, in representative order
        first = True
        while len(left) > 1:
            rep = left[0]
            joined = direct_links(nodes, left, np.full(len(left), rep), cfg, semantic).method
            star = left[joined != METHOD_TRANSITIVE]
            labels[star] = star.min()
            moved += 0 if first else len(star)
            first = False
            left = left[joined == METHOD_TRANSITIVE]
        if len(left):
            labels[left] = left
            moved += 0 if first else 1
    return labels, moved


def group_nodes(
    nodes: Nodes, pairs: dict[str, np.ndarray], cfg: ImageDedupConfig, semantic: bool
) -> tuple[pa.Table, dict[str, Any]]:
    """``image_duplicates.parquet`` from each pass's pairs (row ids) over ``nodes``, and its counts."""
    started = time.monotonic()
    local = {name: np.searchsorted(nodes.rows, p).reshape(-1, 2) for name, p in pairs.items()}
    edges = np.concatenate(list(local.values())) if local else np.zeros((0, 2), np.int64)
    labels = connected_components(len(nodes.rows), edges)
    moved = 0
    if cfg.linkage == "verified":
        labels, moved = verified_labels(labels, nodes, cfg, semantic)
    sizes = component_sizes(labels)
    reps = representatives(labels, nodes.pixels, nodes.keys)
    grouped = np.flatnonzero(sizes > 1)
    rep = reps[grouped]
    order = np.lexsort((nodes.rows[grouped], grouped != rep, nodes.rows[rep]))
    grouped, rep = grouped[order], rep[order]
    links = direct_links(nodes, grouped, rep, cfg, semantic)
    linked = [[] for _ in grouped]
    for name in PASSES:
        if name in local and len(local[name]):
            for i in np.flatnonzero(np.isin(grouped, local[name])).tolist():
                linked[i].append(name)
    table = pa.table(
        {
            "key": pa.array(nodes.keys[grouped].tolist(), pa.string()),
            "row_id": pa.array(nodes.rows[grouped], pa.int64()),
            "group_id": pa.array(nodes.rows[rep], pa.int64()),
            "group_size": pa.array(sizes[grouped], pa.int64()),
            "representative_key": pa.array(nodes.keys[rep].tolist(), pa.string()),
            "is_representative": pa.array(grouped == rep, pa.bool_()),
            "similarity": (
                pa.array(np.where(grouped == rep, 1.0, links.similarity).astype(np.float32), pa.float32())
                if links.similarity is not None
                else pa.nulls(len(grouped), pa.float32())
            ),
            "hamming_distance": pa.array(links.distance, pa.int16(), mask=~links.both_hashed),
            "method": pa.array(links.method.tolist(), pa.string()),
            "linked_by": pa.array(["|".join(x) for x in linked], pa.string()),
        },
        schema=SCHEMA,
    )
    methods, counts = np.unique(links.method.astype(str), return_counts=True) if len(grouped) else ([], [])
    groups = int((grouped == rep).sum())
    stats = {
        "groups": groups,
        "rows_in_groups": len(grouped),
        "removable_rows": len(grouped) - groups,
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "methods": {str(m): int(c) for m, c in zip(methods, counts, strict=True)},
        "linkage": cfg.linkage,
        "members_moved_by_verification": moved,
        "rows_on_pairs": len(nodes.rows),
        "grouping_seconds": seconds_since(started),
    }
    return table, stats


@dataclass
class ImageDedupResult:
    """Everything :func:`find_image_duplicates` found.

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


def find_image_duplicates(
    meta: pa.Table, vectors: np.ndarray | None, cfg: ImageDedupConfig, semantic_model: bool = True
) -> ImageDedupResult:
    """Every pass over all of ``meta`` (key, sha256, width, height, phash) and ``vectors`` at once.

    The in-memory form of the stage (one cell holding every row), for tables that fit in memory and
    as the oracle the partitioned stage is tested against.

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
    nodes = Nodes.from_table(np.arange(n), meta, vectors)
    semantic = runs_semantic(cfg, semantic_model) and vectors is not None
    notes = pass_notes(
        cfg,
        has_sha=_has_values(meta, "sha256"),
        has_phash=_has_values(meta, "phash"),
        semantic_model=semantic_model,
        have_vectors=vectors is not None,
    )
    stats: dict[str, Any] = {"rows": n, "passes": notes}
    pairs: dict[str, np.ndarray] = {}
    if METHOD_EXACT not in stats["passes"]:
        pairs[METHOD_EXACT] = exact_pairs(meta.column("sha256"))
    found = cell_pairs(vectors, nodes.hashes, nodes.has_hash, cfg, semantic)
    if METHOD_PHASH not in stats["passes"]:
        pairs[METHOD_PHASH] = found.phash
    if semantic:
        pairs[METHOD_SEMANTIC] = found.semantic
    for name, p in pairs.items():
        stats["passes"][name] = {"pairs": len(p)}
    table, group_stats = group_nodes(nodes, pairs, cfg, semantic)
    stats.update(group_stats)
    group_id = np.arange(n, dtype=np.int64)
    group_size = np.ones(n, dtype=np.int64)
    rows = table.column("row_id").to_numpy()
    group_id[rows] = table.column("group_id").to_numpy()
    group_size[rows] = table.column("group_size").to_numpy()
    return ImageDedupResult(table, group_id, group_size, pairs, stats)


def pass_notes(
    cfg: ImageDedupConfig, *, has_sha: bool, has_phash: bool, semantic_model: bool, have_vectors: bool
) -> dict[str, Any]:
    """Why a pass does not run, per pass (passes that run are absent)."""
    notes: dict[str, Any] = {}
    if not cfg.exact:
        notes[METHOD_EXACT] = {"skipped": "exact pass off (--exact false)"}
    elif not has_sha:
        # LAION's released metadata has no image hash: nothing to compare, said once.
        log.info("image dedup: exact pass off, the metadata has no sha256 of the image bytes")
        notes[METHOD_EXACT] = {"skipped": "no sha256 column in the metadata"}
    if not cfg.phash:
        notes[METHOD_PHASH] = {"skipped": "pHash pass off (--phash false)"}
    elif not has_phash:
        log.info("image dedup: pHash pass off, the metadata has no phash column")
        notes[METHOD_PHASH] = {"skipped": "no phash column in the metadata"}
    reason = semantic_skip_reason(cfg, semantic_model)
    if reason is None and not have_vectors:
        reason = "no embeddings"
    if reason is not None:
        notes[METHOD_SEMANTIC] = {"skipped": reason}
    return notes


def _has_values(meta: pa.Table, column: str) -> bool:
    return column in meta.column_names and meta.column(column).null_count < meta.num_rows


def check_config(cfg: ImageDedupConfig) -> None:
    """Clear errors for option values the stage cannot run with."""
    if cfg.semantic not in ("auto", "on", "off"):
        raise ValueError(f"image_dedup.semantic must be auto, on or off; got {cfg.semantic!r}")
    if not -1.0 <= cfg.semantic_threshold <= 1.0:
        raise ValueError(
            f"image_dedup.semantic_threshold is a cosine in [-1, 1]; got {cfg.semantic_threshold}"
        )
    if not -1.0 <= cfg.phash_confirm_cosine <= 1.0:
        raise ValueError(
            f"image_dedup.phash_confirm_cosine is a cosine in [-1, 1]; got {cfg.phash_confirm_cosine}"
        )
    if not 0 <= cfg.phash_max_distance < HASH_BITS:
        raise ValueError(f"image_dedup.phash_max_distance must be in 0..63; got {cfg.phash_max_distance}")
    if cfg.semantic_k < 1 or cfg.block_rows < 1:
        raise ValueError("image_dedup.semantic_k and block_rows must be at least 1")
    if cfg.linkage not in LINKAGES:
        raise ValueError(f"image_dedup.linkage must be verified or single; got {cfg.linkage!r}")
