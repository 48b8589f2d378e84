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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.shuffle import concat_parts, read_part, write_routed
from pipeline.core.stage import seconds_since
from pipeline.core.tasks import run_tasks
from pipeline.dedup.text_normalize import normalize_captions
from pipeline.index.cells import assign_path
from pipeline.io.embeddings import Partition, list_partitions, partition_starts

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
class TableInputs:
    """Where the table's inputs are: the embedding folder, its cells, the two duplicate tables."""

    embeddings: str
    cells: str
    image_duplicates: str
    caption_duplicates: str


def text_hashes(normalized: pa.Array) -> np.ndarray:
    """64-bit hashes of normalised captions (equal texts, equal hashes; the same in every process)."""
    if len(normalized) == 0:
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(normalized.to_numpy(zero_copy_only=False), categorize=False)


def dominant(keys: np.ndarray, values: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per distinct key: its most frequent value, that value's count and first row, and the key's total.

    Ties go to the value whose first row is smallest (the earliest row's caption).
    """
    order = np.lexsort((rows, values, keys))
    k, v, r = keys[order], values[order], rows[order]
    run = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (v[1:] != v[:-1])]) if len(k) else np.zeros(0, int)
    count = np.diff(np.r_[run, len(k)])
    run_key, run_value, run_first = k[run], v[run], r[run]
    best = np.lexsort((run_first, -count, run_key))
    best = best[np.r_[True, run_key[best][1:] != run_key[best][:-1]]] if len(best) else best
    totals = np.bincount(np.searchsorted(run_key[best], run_key), weights=count).astype(np.int64)
    return {
        "key": run_key[best],
        "value": run_value[best],
        "count": count[best],
        "first_row": run_first[best],
        "total": totals,
    }


def lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: int) -> np.ndarray:
    """``values`` of ``query`` in ascending unique ``keys`` (``default`` where a query is absent)."""
    out = np.full(len(query), default, dtype=np.int64)
    if len(keys) == 0 or len(query) == 0:
        return out
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    hit = keys[at] == query
    out[hit] = values[at[hit]]
    return out


def _spelling(keys: np.ndarray, modes: dict[str, np.ndarray], h: np.ndarray, rows: np.ndarray, raw: pa.Array):
    """Most frequent raw spelling (ties: first row) of each key's dominant normalised caption, as the
    row that carries it: ``(keys, positions in rows)``, keys ascending."""
    mode_of = lookup(modes["key"], modes["value"].view(np.int64), keys, 0)  # hashes as int64 bits
    idx = np.flatnonzero(mode_of == h.view(np.int64))
    codes = pc.dictionary_encode(raw.take(pa.array(idx))).indices.to_numpy().astype(np.int64)
    spell = dominant(keys[idx], codes, rows[idx])
    by_row = np.argsort(rows[idx])
    return spell["key"], idx[by_row[np.searchsorted(rows[idx][by_row], spell["first_row"])]]


def _paths(work: Path, kind: str, n: int) -> list[str]:
    return [str(work / kind / f"{i:05d}.arrow") for i in range(n)]


def map_rows(inputs: TableInputs, name: str, index: int, start: int, work: str, reducers: int) -> int:
    """One partition's rows into the three shuffles: by caption hash, by cell, by image group."""
    work_dir = Path(work)
    meta = Partition(Path(inputs.embeddings), name).metadata(["caption"])
    raw = pc.fill_null(meta.column("caption").cast(pa.large_string()), "").combine_chunks()
    normalized = normalize_captions(raw)
    nonempty = ~pc.fill_null(pc.equal(pc.utf8_length(normalized), 0), True).to_numpy(zero_copy_only=False)
    h = text_hashes(normalized)
    rows = np.arange(start, start + len(raw), dtype=np.int64)
    cells = np.load(assign_path(inputs.cells, name))[:, 0].astype(np.int64)
    groups = pq.read_table(inputs.image_duplicates, columns=["row_id", "group_id"])
    row_ids = groups.column("row_id").to_numpy()
    mine = (row_ids >= start) & (row_ids < start + len(raw))
    members, member_group = row_ids[mine] - start, groups.column("group_id").to_numpy()[mine]
    entries = pa.table({"h": h, "row": rows, "caption": raw, "nonempty": nonempty})
    keep = np.flatnonzero(nonempty)
    write_routed(
        str(work_dir / "hash" / f"{index:05d}.arrow"), entries.take(keep), h[keep] % reducers, reducers
    )
    write_routed(
        str(work_dir / "cell" / f"{index:05d}.arrow"),
        entries.append_column("key", pa.array(cells)),
        cells % reducers,
        reducers,
    )
    write_routed(
        str(work_dir / "group" / f"{index:05d}.arrow"),
        entries.take(pa.array(members)).append_column("key", pa.array(member_group)),
        member_group % reducers,
        reducers,
    )
    return len(raw)


def reduce_bucket(d: int, work: str, maps: int, starts: list[int]) -> int:
    """Counts of one bucket of caption hashes, cells and image groups, sent back to the rows' partitions."""
    work_dir = Path(work)
    bounds = np.asarray(starts, np.int64)
    parts = len(bounds) - 1

    def send(kind: str, table: pa.Table) -> None:
        dest = np.searchsorted(bounds, table.column("row").to_numpy(), side="right") - 1
        write_routed(str(work_dir / f"back_{kind}" / f"{d:05d}.arrow"), table, dest, parts)

    # Per normalised caption: how many rows carry it, and the row of its most frequent spelling.
    hashes = read_part(_paths(work_dir, "hash", maps), d)
    h, rows = hashes.column("h").to_numpy(), hashes.column("row").to_numpy()
    raw = hashes.column("caption").combine_chunks()
    modes = dominant(h, h, rows)
    spelled_key, spelled_at = _spelling(h, modes, h, rows, raw)
    send(
        "caption",
        pa.table(
            {
                "row": rows,
                "caption_id": lookup(spelled_key, rows[spelled_at], h, -1),
                "caption_count": lookup(modes["key"], modes["total"], h, 0),
            }
        ),
    )
    # Per cell and per image group: the dominant caption among its rows.
    for kind in ("cell", "group"):
        table = read_part(_paths(work_dir, kind, maps), d)
        keys, rows = table.column("key").to_numpy(), table.column("row").to_numpy()
        distinct, sizes = np.unique(keys, return_counts=True)
        said = np.flatnonzero(table.column("nonempty").to_numpy(zero_copy_only=False))
        h = table.column("h").to_numpy()[said]
        raw = table.column("caption").combine_chunks().take(pa.array(said))
        modes = dominant(keys[said], h, rows[said])
        spelled_key, spelled_at = _spelling(keys[said], modes, h, rows[said], raw)
        text_at = lookup(spelled_key, np.arange(len(spelled_key)), keys, -1)
        texts = raw.take(pa.array(spelled_at)).take(pa.array(text_at, mask=text_at < 0))
        send(
            kind,
            pa.table(
                {
                    "row": rows,
                    "caption": texts.cast(pa.large_string()),
                    "count": lookup(modes["key"], modes["count"], keys, 0),
                    "rows": lookup(distinct, sizes, keys, 0),
                }
            ),
        )
    return len(rows)


def _read_rows(path: str, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows ``start..stop`` of a Parquet file, reading only the row groups that hold them."""
    meta = pq.ParquetFile(path)
    ends = np.cumsum([meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)])
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, stop - 1, side="right")) if stop > start else first - 1
    if last < first:
        return meta.schema_arrow.empty_table().select(columns)
    offset = int(ends[first - 1]) if first else 0
    return meta.read_row_groups(list(range(first, last + 1)), columns=columns).slice(
        start - offset, stop - start
    )


def _by_row(table: pa.Table, start: int, n: int) -> tuple[np.ndarray, pa.Table]:
    """``table`` reordered by row, and which of the ``n`` rows from ``start`` it covers."""
    table = table.take(pc.sort_indices(table, [("row", "ascending")]))
    return table.column("row").to_numpy() - start, table


def final_part(
    inputs: TableInputs, name: str, index: int, start: int, work: str, reducers: int
) -> dict[str, Any]:
    """One partition's rows of the table, from its metadata and the counts sent back to it; returns
    the part's path and its counts."""
    work_dir = Path(work)
    meta = Partition(Path(inputs.embeddings), name).metadata(["key", "caption"])
    n = meta.num_rows
    rows = np.arange(start, start + n, dtype=np.int64)
    back = {
        kind: _by_row(read_part(_paths(work_dir, f"back_{kind}", reducers), index), start, n)
        for kind in ("caption", "cell", "group")
    }
    caption_id, caption_count = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    at, table = back["caption"]
    caption_id[at], caption_count[at] = (
        table.column("caption_id").to_numpy(),
        table.column("caption_count").to_numpy(),
    )
    at, cells = back["cell"]
    assert len(at) == n and (at == np.arange(n)).all(), "every row has a cell"
    groups = pq.read_table(inputs.image_duplicates, columns=["row_id", "group_id", "group_size"])
    row_ids = groups.column("row_id").to_numpy()
    mine = (row_ids >= start) & (row_ids < start + n)
    group_id, group_size = rows.copy(), np.ones(n, np.int64)
    group_id[row_ids[mine] - start] = groups.column("group_id").to_numpy()[mine]
    group_size[row_ids[mine] - start] = groups.column("group_size").to_numpy()[mine]
    own = meta.column("caption").cast(pa.large_string()).combine_chunks()
    group_caption = np.asarray(
        pc.if_else(pa.array(caption_id >= 0), own, pa.nulls(n, pa.large_string())).to_pylist(), object
    )
    group_count = (caption_id >= 0).astype(np.int64)
    at, table = back["group"]
    group_caption[at] = np.asarray(table.column("caption").to_pylist(), object)
    group_count[at] = table.column("count").to_numpy()
    captions = _read_rows(inputs.caption_duplicates, ["group_id", "group_size"], start, start + n)
    part = pa.table(
        {
            "row_id": rows,
            "key": meta.column("key").cast(pa.string()),
            "caption": meta.column("caption").cast(pa.string()),
            "caption_id": caption_id,
            "caption_count": caption_count,
            "image_group_id": group_id,
            "image_group_size": group_size,
            "group_caption": pa.array(group_caption.tolist(), pa.string()),
            "group_caption_count": group_count,
            "caption_group_id": captions.column("group_id"),
            "caption_group_size": captions.column("group_size"),
            "cell_caption": cells.column("caption").cast(pa.string()),
            "cell_caption_count": cells.column("count"),
            "cell_rows": cells.column("rows"),
        },
        schema=SCHEMA,
    )
    path = work_dir / "parts" / f"{index:05d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(part, path)
    return {
        "path": str(path),
        "empty_captions": int((caption_id < 0).sum()),
        "max_caption_count": int(caption_count.max(initial=0)),
        "max_cell_caption_count": int(pc.max(part.column("cell_caption_count")).as_py() or 0),
        "max_group_caption_count": int(group_count.max(initial=0)),
    }


def build_dedup_table(
    inputs: TableInputs, out: str | Path, work: str | Path, *, inline: bool
) -> dict[str, Any]:
    """Write the G_dup table for every row of ``inputs.embeddings`` to ``out``; returns counts.

    Map (one task per partition: captions normalised and hashed, each row sent to the bucket of its
    caption hash, of its cell and, if it has one, of its image group), reduce (one task per bucket:
    the counts, and each row's results sent back to its partition), final (one task per partition: its
    rows of the table), then the parts streamed into ``out``. No process holds more than a
    partition's or a bucket's rows; ``inline`` runs the same tasks here.
    """
    started = time.monotonic()
    partitions = list_partitions(inputs.embeddings)
    starts = partition_starts(partitions)
    work_dir = Path(work)
    shutil.rmtree(work_dir, ignore_errors=True)
    reducers = max(1, len(partitions))
    calls = [(inputs, p.name, i, starts[i], str(work_dir), reducers) for i, p in enumerate(partitions)]
    run_tasks(map_rows, calls, inline=inline, label="G_dup table: map")
    run_tasks(
        reduce_bucket,
        [(d, str(work_dir), len(partitions), starts) for d in range(reducers)],
        inline=inline,
        label="G_dup table: reduce",
    )
    parts = run_tasks(final_part, calls, inline=inline, label="G_dup table: rows")
    (written,) = run_tasks(concat_parts, [([p["path"] for p in parts], str(out), SCHEMA)], inline=inline)
    shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "rows": written["rows"],
        "empty_captions": sum(p["empty_captions"] for p in parts),
        **{key: max((p[key] for p in parts), default=0) for key in parts[0] if key.startswith("max_")},
        "seconds": seconds_since(started),
    }


def rows_with_duplicate_caption(table: pa.Table, min_count: int) -> int:
    """Rows whose y_N lookup returns a caption under ``min_count``."""
    return int(pc.sum(pc.greater_equal(table.column("cell_caption_count"), min_count)).as_py() or 0)
