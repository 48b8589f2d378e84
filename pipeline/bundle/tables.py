"""The G_dup table: per training row, what AMG's caption-deduplication guidance needs, offline.

AMG's G_dup pushes a generation away from y_N, the duplicated caption of its nearest training images.
The authors' code (chenchen-usyd/AMG-sd, ``scripts/txt2img.py``) asked the LAION kNN service for the
1,000 CLIP nearest neighbours of the prediction x̂0, counted their captions, and took the most frequent
one as y_N when it occurred more than 20 times (amg.md §4 in the project's research notes). The bundle
answers that rule at query time, for any embedding, with one k = 1,000 search and the per-row
caption ids of this table (:meth:`pipeline.bundle.reader.Bundle.duplicate_caption_near`); no
neighbour list is stored per row, which at LAION's 2B rows would be 16 TB.

For a lookup by row (:meth:`~pipeline.bundle.reader.Bundle.duplicate_caption`, n0 already known),
each row also carries the dominant caption of its k-means cell (:mod:`pipeline.index.cells`: about
``rows_per_cell`` training images around it): counting the cell costs O(N) once, where counting
each row's own 1,000 neighbours costs a k = 1,000 search per row.

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
caption_id             int64    row id of the row whose caption is the most frequent spelling of this row's
                                normalised caption (the id captions are counted by); -1 for an empty caption
caption_count          int64    rows of the bundle with this normalised caption (0 for an empty caption)
image_group_id         int64    row id of its image-duplicate group's representative (its own id if unique)
image_group_size       int64    images in that group (1 if unique)
group_caption          string   most frequent caption in the image group (ties: the group's first row's)
group_caption_count    int64    rows of the image group with that caption
caption_group_id       int64    caption near-duplicate group (row id of its first row; caption dedup stage)
caption_group_size     int64    rows in that caption group
cell_caption           string   most frequent caption among the rows of the row's k-means cell; null when
                                every caption there is empty
cell_caption_count     int64    how many rows of the cell carry it
cell_rows              int64    rows in the cell
=====================  =======  ==============================================================================

y_N for a nearest neighbour n0 is ``cell_caption`` of n0 when ``cell_caption_count`` reaches the bundle's
``duplicate_caption_min_count`` (default 21, the authors' "more than 20"), else none.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.stage import seconds_since
from pipeline.dedup.text_normalize import normalize_captions

log = logging.getLogger(__name__)

OUTPUT_NAME = "caption_dedup_table.parquet"
SCHEMA_VERSION = 2
SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("caption_id", pa.int64()),
        ("caption_count", pa.int64()),
        ("image_group_id", pa.int64()),
        ("image_group_size", pa.int64()),
        ("group_caption", pa.string()),
        ("group_caption_count", pa.int64()),
        ("caption_group_id", pa.int64()),
        ("caption_group_size", pa.int64()),
        ("cell_caption", pa.string()),
        ("cell_caption_count", pa.int64()),
        ("cell_rows", pa.int64()),
    ]
)


@dataclass(frozen=True)
class CaptionIds:
    """Rows' normalised captions as integers.

    Attributes:
        ids: per row, an id of its normalised caption (0.. in order of first appearance; -1 if empty).
        spelling_row: per id, the row whose raw caption is its most frequent spelling (ties: first row).
        count: per id, the rows carrying it.
    """

    ids: np.ndarray
    spelling_row: np.ndarray
    count: np.ndarray


def caption_ids(captions: pa.Array | pa.ChunkedArray | list[str | None]) -> CaptionIds:
    """Ids of the rows' normalised captions, with each id's most frequent raw spelling and count."""
    if isinstance(captions, list):
        captions = pa.array(captions, pa.string())
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks() if captions.num_chunks else pa.array([], pa.string())
    n = len(captions)
    ids = np.full(n, -1, dtype=np.int64)
    none = CaptionIds(ids, np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n == 0:
        return none
    normalized = normalize_captions(captions)
    empty = pc.fill_null(pc.equal(pc.utf8_length(normalized), 0), True).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(~empty)
    if len(rows) == 0:
        return none
    ids[rows] = pc.dictionary_encode(normalized.take(pa.array(rows))).indices.to_numpy().astype(np.int64)
    raw = pc.dictionary_encode(pc.fill_null(captions.cast(pa.string()), "").take(pa.array(rows)))
    raw_ids = raw.indices.to_numpy().astype(np.int64)
    # Most frequent raw spelling per normalised id; ties go to the spelling seen first.
    width = int(raw_ids.max()) + 1
    combo = ids[rows] * width + raw_ids
    uniq, first, counts = np.unique(combo, return_index=True, return_counts=True)
    norm_of = uniq // width
    order = np.lexsort((first, -counts, norm_of))
    best = order[np.r_[True, norm_of[order][1:] != norm_of[order][:-1]]]
    spelling_row = np.zeros(int(ids.max()) + 1, np.int64)
    spelling_row[norm_of[best]] = rows[first[best]]
    return CaptionIds(ids, spelling_row, np.bincount(ids[rows], minlength=len(spelling_row)))


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


def build_dedup_table(
    keys: list[str] | pa.Array | pa.ChunkedArray,
    captions: pa.Array | pa.ChunkedArray | list[str | None],
    image_group_id: np.ndarray,
    image_group_size: np.ndarray,
    cells: np.ndarray,
    caption_group_id: np.ndarray | None = None,
    caption_group_size: np.ndarray | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """The G_dup table (see the module docstring) and a few counts about it.

    Args:
        keys, captions: per row, in row-id order.
        image_group_id, image_group_size: per row, from :mod:`pipeline.dedup.image`.
        cells: per row, its nearest k-means cell (:mod:`pipeline.index.cells`).
        caption_group_id, caption_group_size: per row, from the caption dedup stage (optional).
    """
    started = time.monotonic()
    if isinstance(captions, list):
        captions = pa.array(captions, pa.string())
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks() if captions.num_chunks else pa.array([], pa.string())
    captions = captions.cast(pa.string())
    n = len(captions)
    found = caption_ids(captions)
    ids = found.ids
    if len(cells) != n or len(image_group_id) != n:
        raise ValueError(f"{len(cells)} cells and {len(image_group_id)} image groups for {n} captions")
    group_mode, group_count = group_modes(np.asarray(image_group_id, np.int64), ids)
    cells = np.asarray(cells, np.int64)
    cell_mode, cell_count = group_modes(cells, ids)
    cell_rows = np.bincount(cells)[cells] if n else np.zeros(0, np.int64)
    spelling = np.r_[found.spelling_row, -1]  # id -1 -> -1
    text_arr = np.asarray([*captions.take(pa.array(found.spelling_row)).to_pylist(), None], dtype=object)
    if caption_group_id is None:
        caption_group_id = np.arange(n, dtype=np.int64)
        caption_group_size = np.ones(n, dtype=np.int64)
    table = pa.table(
        {
            "row_id": pa.array(np.arange(n), pa.int64()),
            "key": pa.array(keys.to_pylist() if isinstance(keys, pa.ChunkedArray) else keys, pa.string()),
            "caption": captions,
            "caption_id": pa.array(spelling[ids], pa.int64()),
            "caption_count": pa.array(np.r_[found.count, 0][ids], pa.int64()),
            "image_group_id": pa.array(image_group_id, pa.int64()),
            "image_group_size": pa.array(image_group_size, pa.int64()),
            "group_caption": pa.array(text_arr[group_mode].tolist(), pa.string()),
            "group_caption_count": pa.array(group_count, pa.int64()),
            "caption_group_id": pa.array(caption_group_id, pa.int64()),
            "caption_group_size": pa.array(caption_group_size, pa.int64()),
            "cell_caption": pa.array(text_arr[cell_mode].tolist(), pa.string()),
            "cell_caption_count": pa.array(cell_count, pa.int64()),
            "cell_rows": pa.array(cell_rows, pa.int64()),
        },
        schema=SCHEMA,
    )
    stats = {
        "rows": n,
        "distinct_normalized_captions": len(found.count),
        "empty_captions": int((ids < 0).sum()),
        "max_caption_count": int(found.count.max()) if len(found.count) else 0,
        "max_cell_caption_count": int(cell_count.max()) if n else 0,
        "max_group_caption_count": int(group_count.max()) if n else 0,
        "seconds": seconds_since(started),
    }
    return table, stats


def rows_with_duplicate_caption(table: pa.Table, min_count: int) -> int:
    """Rows whose y_N lookup returns a caption under ``min_count``."""
    return int(pc.sum(pc.greater_equal(table.column("cell_caption_count"), min_count)).as_py() or 0)
