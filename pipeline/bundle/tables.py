"""The G_dup table: per training row, what AMG's caption-deduplication guidance needs, offline.

AMG's G_dup pushes a generation away from y_N, the duplicated caption of its nearest training image.
The authors' code (chenchen-usyd/AMG-sd, ``scripts/txt2img.py``) asked the LAION kNN service for the
1,000 CLIP nearest neighbours of the prediction x̂0, counted their captions, and took the most frequent
one as y_N when it occurred more than 20 times (amg.md §4 in the project's research notes). With this
table the same answer comes from one nearest-neighbour lookup and one row read, with no network: the
bundle's index gives n0, and n0's row holds the dominant caption among *n0's own* k nearest training
images (``knn_caption``). That is the authors' count with the query moved from x̂0 to its nearest
training row: for a memorised generation (x̂0 nearly equal to n0) the two neighbour lists coincide.

Captions are counted by their normalised form (:func:`pipeline.dedup.text_normalize.normalize_captions`,
the caption-dedup stage's rules), so case, punctuation and stock-site suffixes do not split a count;
the caption reported for a normalised form is its most frequent raw spelling (ties: the first row's).
Empty captions are never counted.

``caption_dedup_table.parquet``, one row per training row in row-id order:

=====================  =======  ==============================================================================
column                 type     meaning
=====================  =======  ==============================================================================
row_id                 int64    position in the bundle (the index's row ids)
key                    string   the sample's key
caption                string   the row's own caption
image_group_id         int64    row id of its image-duplicate group's representative (its own id if unique)
image_group_size       int64    images in that group (1 if unique)
group_caption          string   most frequent caption in the image group (ties: the group's first row's)
group_caption_count    int64    rows of the image group with that caption
caption_group_id       int64    caption near-duplicate group (row id of its first row; caption dedup stage)
caption_group_size     int64    rows in that caption group
knn_caption            string   most frequent caption among the row's knn_k nearest training images (itself
                                included); null when every neighbour's caption is empty
knn_caption_count      int64    how many of those neighbours carry it
knn_k                  int32    neighbours counted: min(knn_k, N)
=====================  =======  ==============================================================================

y_N for a nearest neighbour n0 is ``knn_caption`` of n0 when ``knn_caption_count`` reaches the bundle's
``duplicate_caption_min_count`` (default 21, the authors' "more than 20"), else none.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.stage import seconds_since
from pipeline.dedup.text_normalize import normalize_captions

log = logging.getLogger(__name__)

OUTPUT_NAME = "caption_dedup_table.parquet"
SCHEMA_VERSION = 1
SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("image_group_id", pa.int64()),
        ("image_group_size", pa.int64()),
        ("group_caption", pa.string()),
        ("group_caption_count", pa.int64()),
        ("caption_group_id", pa.int64()),
        ("caption_group_size", pa.int64()),
        ("knn_caption", pa.string()),
        ("knn_caption_count", pa.int64()),
        ("knn_k", pa.int32()),
    ]
)


def caption_ids(captions: pa.Array | pa.ChunkedArray | list[str | None]) -> tuple[np.ndarray, list[str]]:
    """Id of each row's normalised caption (-1 for empty ones) and, per id, its most frequent raw spelling.

    Ids number the distinct normalised captions in order of first appearance.
    """
    if isinstance(captions, list):
        captions = pa.array(captions, pa.string())
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks() if captions.num_chunks else pa.array([], pa.string())
    n = len(captions)
    if n == 0:
        return np.zeros(0, np.int64), []
    normalized = normalize_captions(captions)
    empty = pc.fill_null(pc.equal(pc.utf8_length(normalized), 0), True).to_numpy(zero_copy_only=False)
    ids = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(~empty)
    if len(rows) == 0:
        return ids, []
    ids[rows] = pc.dictionary_encode(normalized.take(pa.array(rows))).indices.to_numpy().astype(np.int64)
    raw = pc.dictionary_encode(pc.fill_null(captions.cast(pa.string()), "").take(pa.array(rows)))
    raw_ids = raw.indices.to_numpy().astype(np.int64)
    # Most frequent raw spelling per normalised id; ties go to the spelling seen first.
    combo = ids[rows] * (int(raw_ids.max()) + 1) + raw_ids
    uniq, first, counts = np.unique(combo, return_index=True, return_counts=True)
    norm_of, raw_of = uniq // (int(raw_ids.max()) + 1), uniq % (int(raw_ids.max()) + 1)
    order = np.lexsort((first, -counts, norm_of))
    best = order[np.r_[True, norm_of[order][1:] != norm_of[order][:-1]]]
    spelling = raw.dictionary.to_pylist()
    texts = [""] * (int(ids.max()) + 1)
    for norm, raw_id in zip(norm_of[best].tolist(), raw_of[best].tolist(), strict=False):
        texts[norm] = spelling[raw_id]
    return ids, texts


def row_modes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a 2-D int array, the most frequent value >= 0 and its count (-1, 0 if none).

    Ties go to the value that appears first in the row (for neighbour lists: the nearest one).
    """
    values = np.asarray(values, dtype=np.int64)
    rows, width = values.shape
    if rows == 0 or width == 0:
        return np.full(rows, -1, np.int64), np.zeros(rows, np.int64)
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    starts = np.ones_like(ordered, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run_id = np.cumsum(starts, axis=1) - 1
    # Length of each run, scattered back to the run's positions.
    flat_run = (run_id + np.arange(rows)[:, None] * width).ravel()
    lengths = np.bincount(flat_run, minlength=rows * width)[flat_run].reshape(rows, width)
    lengths = np.where(ordered >= 0, lengths, 0)
    # First position (in the original row) of each run: earliest neighbour rank carrying the value.
    first_pos = np.full(rows * width, width, dtype=np.int64)
    np.minimum.at(first_pos, flat_run, order.ravel())
    first_pos = first_pos[flat_run].reshape(rows, width)
    score = lengths * (width + 1) + (width - first_pos)
    best = np.argmax(score, axis=1)
    mode = ordered[np.arange(rows), best]
    count = lengths[np.arange(rows), best]
    mode = np.where(count > 0, mode, -1)
    return mode, count


def group_modes(groups: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the most frequent caption id (>= 0) of its group and its count (-1, 0 if none).

    Ties go to the caption of the group's earliest row.
    """
    n = len(groups)
    mode_of_row = np.full(n, -1, np.int64)
    count_of_row = np.zeros(n, np.int64)
    rows = np.flatnonzero(ids >= 0)
    if len(rows) == 0:
        return mode_of_row, count_of_row
    width = int(ids.max()) + 1
    combo = groups[rows] * width + ids[rows]
    uniq, first, counts = np.unique(combo, return_index=True, return_counts=True)
    group_of, id_of = uniq // width, uniq % width
    order = np.lexsort((rows[first], -counts, group_of))
    best = order[np.r_[True, group_of[order][1:] != group_of[order][:-1]]]
    size = int(groups.max()) + 1
    best_id = np.full(size, -1, np.int64)
    best_count = np.zeros(size, np.int64)
    best_id[group_of[best]] = id_of[best]
    best_count[group_of[best]] = counts[best]
    return best_id[groups], best_count[groups]


def knn_dominant_captions(
    index: Any, vectors: np.ndarray, ids: np.ndarray, k: int, batch: int = 4_096
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row, the dominant caption id among its ``k`` nearest rows (``index.search``) and its count.

    Batched, so memory stays at ``batch * k`` neighbours whatever N is. Returns ``(mode, count, k)``
    with k capped at N.
    """
    n = len(vectors)
    k = int(min(k, n))
    mode = np.full(n, -1, np.int64)
    count = np.zeros(n, np.int64)
    if n == 0 or k == 0:
        return mode, count, k
    started = time.monotonic()
    for lo in range(0, n, batch):
        _, neighbours = index.search(np.ascontiguousarray(vectors[lo : lo + batch]), k)
        labels = np.where(neighbours >= 0, ids[np.maximum(neighbours, 0)], -1)
        mode[lo : lo + batch], count[lo : lo + batch] = row_modes(labels)
    log.info("G_dup table: %d-NN caption counts of %d rows in %.1fs", k, n, time.monotonic() - started)
    return mode, count, k


def build_dedup_table(
    keys: list[str] | pa.Array,
    captions: pa.Array | pa.ChunkedArray | list[str | None],
    image_group_id: np.ndarray,
    image_group_size: np.ndarray,
    *,
    index: Any,
    vectors: np.ndarray,
    knn_k: int = 1000,
    caption_group_id: np.ndarray | None = None,
    caption_group_size: np.ndarray | None = None,
    batch: int = 4_096,
) -> tuple[pa.Table, dict[str, Any]]:
    """The G_dup table (see the module docstring) and a few counts about it.

    Args:
        keys, captions: per row, in row-id order.
        image_group_id, image_group_size: per row, from :mod:`pipeline.dedup.image`.
        index: anything with FAISS's ``search(queries, k)`` over ``vectors`` (the bundle's index).
        vectors (`np.ndarray`): the indexed L2-normalised embeddings, row-aligned.
        knn_k (`int`): neighbours counted per row (capped at N).
        caption_group_id, caption_group_size: per row, from the caption dedup stage (optional).
    """
    started = time.monotonic()
    if isinstance(captions, list):
        captions = pa.array(captions, pa.string())
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks() if captions.num_chunks else pa.array([], pa.string())
    captions = captions.cast(pa.string())
    n = len(vectors)
    ids, texts = caption_ids(captions)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} captions for {n} embeddings")
    group_mode, group_count = group_modes(np.asarray(image_group_id, np.int64), ids)
    knn_mode, knn_count, k = knn_dominant_captions(index, vectors, ids, knn_k, batch)
    text_arr = np.asarray([*texts, None], dtype=object)  # id -1 -> None
    if caption_group_id is None:
        caption_group_id = np.arange(n, dtype=np.int64)
        caption_group_size = np.ones(n, dtype=np.int64)
    table = pa.table(
        {
            "row_id": pa.array(np.arange(n), pa.int64()),
            "key": pa.array(keys if not isinstance(keys, pa.ChunkedArray) else keys.to_pylist(), pa.string()),
            "caption": captions,
            "image_group_id": pa.array(image_group_id, pa.int64()),
            "image_group_size": pa.array(image_group_size, pa.int64()),
            "group_caption": pa.array(text_arr[group_mode].tolist(), pa.string()),
            "group_caption_count": pa.array(group_count, pa.int64()),
            "caption_group_id": pa.array(caption_group_id, pa.int64()),
            "caption_group_size": pa.array(caption_group_size, pa.int64()),
            "knn_caption": pa.array(text_arr[knn_mode].tolist(), pa.string()),
            "knn_caption_count": pa.array(knn_count, pa.int64()),
            "knn_k": pa.array(np.full(n, k), pa.int32()),
        },
        schema=SCHEMA,
    )
    stats = {
        "rows": n,
        "knn_k": k,
        "distinct_normalized_captions": len(texts),
        "empty_captions": int((ids < 0).sum()),
        "max_knn_caption_count": int(knn_count.max()) if n else 0,
        "max_group_caption_count": int(group_count.max()) if n else 0,
        "seconds": seconds_since(started),
    }
    return table, stats


def rows_with_duplicate_caption(table: pa.Table, min_count: int) -> int:
    """Rows whose y_N lookup returns a caption under ``min_count``."""
    return int(pc.sum(pc.greater_equal(table.column("knn_caption_count"), min_count)).as_py() or 0)
