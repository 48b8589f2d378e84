"""Caption dedup as shuffles on Ray: no process ever holds all rows, texts or edges.

Same output as :func:`pipeline.dedup.caption.find_caption_duplicates` (the in-process oracle): one
row per input row in input order, ``key, group_id, group_size, normalized_caption``, the group id
being the group's first row. The input is a list of Parquet files in row order (an embedding
folder's metadata partitions, or a caption job's input files); row ``r`` is row ``r - offset`` of
its file. Rows are cut into *units* of ``cfg.batch_size`` consecutive rows, and every step is a set
of Ray tasks that read and write Arrow IPC *shuffle files* under ``work_dir``: a task writes one file
holding one record batch per destination, and destination ``d`` of the next step reads batch ``d``
of every file (strings as ``large_string``, so no step meets Arrow's 2 GiB limit). The driver only
holds file names and per-task counts.

Steps (P parts = units unless ``reducers`` says otherwise; a node is a distinct normalised caption,
named by its first row id):

1. **map** (per unit): normalise; (key, normalised caption) kept for step 9; each non-empty row
   ``(row, text)`` routed by a 64-bit hash of its text to one of P exact reducers.
2. **exact** (per hash part): equal texts (compared as strings: the hash only routes) make one node,
   its id the smallest row. Node texts are routed by node range (the unit holding the node's row),
   ``(row, node)`` by node owner (a hash of the node id).
3. **minhash** (per node range): datasketch-identical MinHash and LSH band keys
   (:func:`pipeline.dedup.caption_steps.sketch_chunk`); ``(band, key, node)`` routed by key.
4. **bands** (per key part): buckets of equal (band, key), members sorted by node id and paired
   with their next ``bucket_window`` members (:func:`pipeline.dedup.caption_steps.window_pairs`, the
   in-process rule: nodes are numbered there by first appearance, which is the node id order);
   pairs routed by the range of their smaller node.
5. **join lo** (per node range): pairs de-duplicated (all copies of a pair meet here) and joined with
   the text of their smaller node; routed by the range of the larger node.
6. **join hi + verify** (per node range): joined with the larger node's text; shingle sets computed
   for the texts of ``batch_size`` pairs at a time and the pairs verified by
   :func:`pipeline.dedup.caption_steps.verify_pairs` (Jaccard, word guard). The verified edges of the task
   become stars (:func:`pipeline.dedup.union_find.component_stars`) routed to both ends' owners.
7. **components**: rounds of large-star / small-star (:mod:`pipeline.dedup.union_find`) over
   edges partitioned by node owner, until every owner reports its nodes settled; then each node on
   an edge knows its component's smallest node, which is the group's first row.
8. **resolve** (per owner): rows of nodes on no edge get their group (the node) and size (its rows)
   directly; rows of nodes on edges are routed by group id to **compose**, which counts each
   group's rows. Both route ``(row, group_id, group_size)`` by unit.
9. **final** (per unit): the unit's output rows, as a Parquet part; one task then streams the parts
   into ``out_path`` with a ``ParquetWriter`` (one row group per unit), written atomically.

Memory per task is bounded by a unit's rows, a node range's texts and candidate pairs, a key part's
band records, or one owner's edges (a component's star centre has all its nodes at one owner).
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import CaptionDedupConfig
from pipeline.core.shuffle import concat_parts, read_part, write_routed, write_single
from pipeline.core.stage import seconds_since
from pipeline.dedup.caption_steps import (
    Verdicts,
    check_config,
    sketch_chunk,
    unique_pairs,
    verify_pairs,
    window_pairs,
)
from pipeline.dedup.minhash import MinHasher, char_shingles, lsh_params, shingle_hashes
from pipeline.dedup.text_normalize import normalize_captions
from pipeline.dedup.union_find import component_stars, large_star, small_star

log = logging.getLogger(__name__)

#: Large-star / small-star rounds after which the components step gives up (chains of n nodes
#: need O(log² n) rounds; 14 for a shuffled chain of 100,000).
MAX_ROUNDS = 100

OUTPUT_SCHEMA_TAIL = [
    pa.field("group_id", pa.int64()),
    pa.field("group_size", pa.int64()),
    pa.field("normalized_caption", pa.string()),
]


# ----------------------------------------------------------------------------------------------
# Layout: units, routing and file names (small; shipped to every task).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Rows ``[lo, hi)`` of one Parquet file."""

    path: str
    lo: int
    hi: int


@dataclass(frozen=True)
class Layout:
    """Where each step's files are and how records are routed between steps.

    Attributes:
        work: the folder of the shuffle files.
        bounds: unit ``u`` holds global rows ``[bounds[u], bounds[u + 1])``; units are also the
            node ranges (a node is in the range of the unit holding its row).
        parts: exact reducers (by text hash), band reducers (by key) and node owners (by id hash).
        hash_bits: bits of the text hash used for routing (64; fewer only in tests, to force
            different texts onto one hash).
    """

    work: str
    bounds: tuple[int, ...]
    parts: int
    hash_bits: int = 64

    @property
    def units(self) -> int:
        return len(self.bounds) - 1

    def path(self, step: str, index: int, suffix: str = ".arrow") -> str:
        return os.path.join(self.work, step, f"{index:05d}{suffix}")

    def paths(self, step: str, count: int) -> list[str]:
        return [self.path(step, i) for i in range(count)]

    def unit_of(self, rows: np.ndarray) -> np.ndarray:
        """Unit (= node range) of each global row id."""
        return np.searchsorted(np.asarray(self.bounds[1:-1], np.int64), rows, side="right").astype(np.int64)

    def owner_of(self, nodes: np.ndarray) -> np.ndarray:
        """Owner part of each node id: a mixed hash, so neighbouring ids spread over the parts."""
        x = np.asarray(nodes, dtype=np.int64).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return (x % np.uint64(self.parts)).astype(np.int64)

    def text_part(self, texts: pa.Array) -> np.ndarray:
        """Exact reducer of each text: its 64-bit hash (keeping ``hash_bits``) modulo ``parts``."""
        import pandas as pd

        h = pd.util.hash_array(texts.to_numpy(zero_copy_only=False), categorize=False)
        if self.hash_bits < 64:
            h &= np.uint64((1 << self.hash_bits) - 1)
        return (h % np.uint64(self.parts)).astype(np.int64)


def plan_units(
    partitions: Sequence[tuple[str | Path, int]], unit_rows: int
) -> tuple[list[list[Slice]], list[int]]:
    """Cut files of ``(path, rows)`` into units of ``unit_rows`` consecutive rows (the last shorter):
    each unit as its file slices, and the units' row bounds."""
    units: list[list[Slice]] = []
    bounds = [0]
    current: list[Slice] = []
    filled = 0
    for path, rows in partitions:
        pos = 0
        while pos < rows:
            take = min(rows - pos, unit_rows - filled)
            current.append(Slice(str(path), pos, pos + take))
            pos += take
            filled += take
            if filled == unit_rows:
                units.append(current)
                bounds.append(bounds[-1] + filled)
                current, filled = [], 0
    if current:
        units.append(current)
        bounds.append(bounds[-1] + filled)
    return units, bounds


# ----------------------------------------------------------------------------------------------
# Shuffle files: one Arrow IPC file per task, one record batch per destination.
# ----------------------------------------------------------------------------------------------


def _np(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column)
    return col.to_numpy() if len(col) else np.zeros(0, col.type.to_pandas_dtype())


# ----------------------------------------------------------------------------------------------
# The steps: what one task does (plain functions, each returns a small dict of counts).
# ----------------------------------------------------------------------------------------------


def _read_slice(piece: Slice, columns: Sequence[str]) -> pa.Table:
    """The slice's rows, only ``columns`` (those a file lacks: nulls), reading only the row groups needed."""
    pf = pq.ParquetFile(piece.path)
    present = [c for c in dict.fromkeys(columns) if c in pf.schema_arrow.names]
    meta = pf.metadata
    if piece.lo == 0 and piece.hi == meta.num_rows:
        table = pf.read(columns=present)
    else:
        ends = np.cumsum([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        first = int(np.searchsorted(ends, piece.lo, side="right"))
        last = int(np.searchsorted(ends, piece.hi - 1, side="right"))
        skipped = int(ends[first - 1]) if first else 0
        table = pf.read_row_groups(list(range(first, last + 1)), columns=present)
        table = table.slice(piece.lo - skipped, piece.hi - piece.lo)
    if table.num_rows != piece.hi - piece.lo:
        raise ValueError(f"{piece.path}: expected rows {piece.lo}..{piece.hi}, file has {meta.num_rows}")
    return table


def _nonempty(texts: pa.Array) -> np.ndarray:
    """Which texts are neither null nor empty (bool)."""
    return pc.fill_null(pc.greater(pc.binary_length(texts), 0), False).to_numpy(zero_copy_only=False)


def map_unit(
    layout: Layout, u: int, slices: list[Slice], caption_col: str, key_col: str | None, key_type: pa.DataType
) -> dict[str, Any]:
    """Step 1: normalise the unit's captions, keep (key, text), route non-empty texts by hash."""
    start, stop = layout.bounds[u], layout.bounds[u + 1]
    captions, keys = [], []
    for piece in slices:
        table = _read_slice(piece, [caption_col] + ([key_col] if key_col else []))
        n = table.num_rows
        captions.append(
            table.column(caption_col).cast(pa.large_string())
            if caption_col in table.column_names
            else pa.nulls(n, pa.large_string())
        )
        if key_col:
            keys.append(
                table.column(key_col).cast(key_type)
                if key_col in table.column_names
                else pa.nulls(n, key_type)
            )
    caption = pa.chunked_array(captions, pa.large_string()).combine_chunks()
    normalized = normalize_captions(caption) if len(caption) else caption
    key = (
        pa.chunked_array(keys, key_type).combine_chunks()
        if key_col
        else pa.array(np.arange(start, stop, dtype=np.int64))
    )
    write_single(layout.path("units", u), pa.table({"key": key, "text": normalized}))
    nonempty = np.flatnonzero(_nonempty(normalized))
    texts = normalized.take(pa.array(nonempty))
    rows = pa.array(nonempty + start)
    write_routed(
        layout.path("exact_in", u),
        pa.table({"row": rows, "text": texts}),
        layout.text_part(texts),
        layout.parts,
    )
    return {"rows": stop - start, "empty": int(len(caption) - len(nonempty))}


def exact_part(layout: Layout, p: int) -> dict[str, Any]:
    """Step 2: one node per distinct text (strings compared), named by its smallest row."""
    table = read_part(layout.paths("exact_in", layout.units), p)
    rows = _np(table, "row")
    encoded = pc.dictionary_encode(table.column("text").combine_chunks())
    codes = encoded.indices.to_numpy()
    first = np.full(len(encoded.dictionary), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, codes, rows)
    order = np.argsort(first)
    nodes = pa.table({"node": first[order], "text": encoded.dictionary.take(pa.array(order))})
    write_routed(layout.path("nodes", p), nodes, layout.unit_of(first[order]), layout.units)
    node_of_row = first[codes]
    rowmap = pa.table({"row": rows, "node": node_of_row})
    write_routed(layout.path("rowmap", p), rowmap, layout.owner_of(node_of_row), layout.parts)
    return {"rows": len(rows), "nodes": len(first)}


def _node_texts(layout: Layout, r: int) -> tuple[np.ndarray, pa.Array]:
    """(node ids, texts) of node range ``r``, sorted by node id."""
    table = read_part(layout.paths("nodes", layout.parts), r)
    nodes = _np(table, "node")
    order = np.argsort(nodes)
    return nodes[order], table.column("text").combine_chunks().take(pa.array(order))


def minhash_range(layout: Layout, r: int, hasher: MinHasher, bands: int, rows: int) -> dict[str, Any]:
    """Step 3: band keys of the node range's texts, routed by key."""
    nodes, texts = _node_texts(layout, r)
    if len(nodes):
        keys = sketch_chunk(texts, hasher, bands, rows).band_keys  # (n, bands)
    else:
        keys = np.zeros((0, bands), np.uint64)
    flat = np.ascontiguousarray(keys.T).ravel()
    table = pa.table(
        {
            "band": np.repeat(np.arange(bands, dtype=np.int16), len(nodes)),
            "key": flat,
            "node": np.tile(nodes, bands),
        }
    )
    write_routed(
        layout.path("bands", r), table, (flat % np.uint64(layout.parts)).astype(np.int64), layout.parts
    )
    return {"nodes": len(nodes)}


def band_part(layout: Layout, q: int, window: int) -> dict[str, Any]:
    """Step 4: candidate pairs of the (band, key) buckets routed here, by the smaller node's range."""
    table = read_part(layout.paths("bands", layout.units), q)
    pairs = window_pairs([_np(table, "band"), _np(table, "key")], _np(table, "node"), window)
    pairs = unique_pairs(pairs)
    write_routed(
        layout.path("pairs", q),
        pa.table({"lo": pairs[:, 0], "hi": pairs[:, 1]}),
        layout.unit_of(pairs[:, 0]),
        layout.units,
    )
    return {"pairs": len(pairs)}


def _lookup(nodes: np.ndarray, texts: pa.Array, wanted: np.ndarray) -> pa.Array:
    idx = np.searchsorted(nodes, wanted)
    if len(wanted) and (idx.max() >= len(nodes) or not np.array_equal(nodes[idx], wanted)):
        raise RuntimeError("candidate pair names a node whose text is not in its range")
    return texts.take(pa.array(idx))


def join_lo(layout: Layout, r: int) -> dict[str, Any]:
    """Step 5: distinct pairs whose smaller node is in range ``r``, with that node's text."""
    table = read_part(layout.paths("pairs", layout.parts), r)
    pairs = unique_pairs(np.stack([_np(table, "lo"), _np(table, "hi")], axis=1))
    nodes, texts = _node_texts(layout, r)
    joined = pa.table({"lo": pairs[:, 0], "hi": pairs[:, 1], "text_lo": _lookup(nodes, texts, pairs[:, 0])})
    write_routed(layout.path("joined", r), joined, layout.unit_of(pairs[:, 1]), layout.units)
    return {"candidates": len(pairs)}


def _verify_chunk(
    ids: np.ndarray, texts: pa.Array, threshold: float, word_guard: bool, shingle_size: int
) -> Verdicts:
    """Verdicts on pairs (ids[:m], ids[m:]) with texts (texts[:m], texts[m:]): each distinct text's
    shingle set computed once, into the chunk's own small CSR."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    local_texts = texts.take(pa.array(first))
    sh = char_shingles(local_texts, shingle_size)
    local_pairs = inverse.reshape(2, -1).T
    return verify_pairs(local_pairs, shingle_hashes(sh), sh.offsets, local_texts, threshold, word_guard)


def join_hi_verify(
    layout: Layout, r: int, threshold: float, word_guard: bool, shingle_size: int, chunk_pairs: int
) -> dict[str, Any]:
    """Step 6: pairs whose larger node is in range ``r`` get its text and are verified; the verified
    edges leave as stars, routed to both ends' owners.

    Pairs are verified ``chunk_pairs`` at a time, in order of their smaller node, so the shingle sets
    in memory are those of at most ``2 * chunk_pairs`` texts however many pairs the range has.
    """
    table = read_part(layout.paths("joined", layout.units), r)
    lo, hi = _np(table, "lo"), _np(table, "hi")
    nodes, texts = _node_texts(layout, r)
    text_lo = table.column("text_lo").combine_chunks()
    text_hi = _lookup(nodes, texts, hi)
    keep = np.zeros(len(lo), dtype=bool)
    below = substitutions = 0
    order = np.lexsort((hi, lo))
    for start in range(0, len(order), chunk_pairs):
        idx = order[start : start + chunk_pairs]
        take = pa.array(idx)
        verdicts = _verify_chunk(
            np.concatenate([lo[idx], hi[idx]]),
            pa.concat_arrays([text_lo.take(take), text_hi.take(take)]),
            threshold,
            word_guard,
            shingle_size,
        )
        keep[idx] = verdicts.keep
        below += verdicts.below_threshold
        substitutions += verdicts.word_substitutions
    edges = np.stack([lo, hi], axis=1)[keep]
    node, root = component_stars(edges)
    _write_adjacency(layout, layout.path("cc0", r), node, root)
    return {"verified": len(edges), "below": below, "substitutions": substitutions, "edges": len(node)}


def _write_adjacency(layout: Layout, path: str, a: np.ndarray, b: np.ndarray) -> None:
    """Undirected edges (a, b) as records (u, v) at the owners of both ends, for a large-star step."""
    u, v = np.concatenate([a, b]), np.concatenate([b, a])
    write_routed(path, pa.table({"u": u, "v": v}), layout.owner_of(u), layout.parts)


def large_star_part(layout: Layout, k: int, inputs: list[str], rnd: int) -> dict[str, Any]:
    """Step 7a: large-star at owner ``k``; labels of its nodes, new edges at their larger end's owner."""
    table = read_part(inputs, k)
    step = large_star(_np(table, "u"), _np(table, "v"))
    write_single(
        layout.path(f"cc{rnd}_labels", k), pa.table({"node": step.labels[0], "label": step.labels[1]})
    )
    v, m = step.edges
    write_routed(layout.path(f"cc{rnd}_ls", k), pa.table({"u": v, "v": m}), layout.owner_of(v), layout.parts)
    return {"unsettled": step.unsettled, "edges": len(v)}


def small_star_part(layout: Layout, k: int, rnd: int) -> dict[str, Any]:
    """Step 7b: small-star at owner ``k``; new edges to both ends' owners for the next large-star."""
    table = read_part(layout.paths(f"cc{rnd}_ls", layout.parts), k)
    x, m = small_star(_np(table, "u"), _np(table, "v"))
    _write_adjacency(layout, layout.path(f"cc{rnd + 1}", k), x, m)
    return {"edges": len(x)}


def resolve_part(layout: Layout, k: int, labels: str | None) -> dict[str, Any]:
    """Step 8a: the rows of the nodes owner ``k`` holds. A node on no edge is a group of its own rows;
    rows of nodes on edges go on to their group's owner, which counts them."""
    table = read_part(layout.paths("rowmap", layout.parts), k)
    rows, node = _np(table, "row"), _np(table, "node")
    group = node.copy()
    on_edge = np.zeros(len(rows), dtype=bool)
    if labels is not None:
        lab = read_part([labels], 0)
        lab_nodes, lab_labels = _np(lab, "node"), _np(lab, "label")
        order = np.argsort(lab_nodes)
        lab_nodes, lab_labels = lab_nodes[order], lab_labels[order]
        idx = np.minimum(np.searchsorted(lab_nodes, node), max(len(lab_nodes) - 1, 0))
        if len(lab_nodes):
            on_edge = lab_nodes[idx] == node
            group[on_edge] = lab_labels[idx[on_edge]]
    alone = ~on_edge
    uniq, inverse, counts = np.unique(node[alone], return_inverse=True, return_counts=True)
    resolved = pa.table({"row": rows[alone], "group_id": group[alone], "group_size": counts[inverse]})
    write_routed(layout.path("resolved", k), resolved, layout.unit_of(rows[alone]), layout.units)
    onward = pa.table({"row": rows[on_edge], "group_id": group[on_edge]})
    write_routed(layout.path("onward", k), onward, layout.owner_of(group[on_edge]), layout.parts)
    return {
        "groups": len(uniq),
        "duplicate_groups": int((counts > 1).sum()),
        "rows_in_duplicate_groups": int(counts[counts > 1].sum()),
    }


def compose_part(layout: Layout, k: int) -> dict[str, Any]:
    """Step 8b: sizes of the groups (components of nodes on edges) owner ``k`` holds."""
    table = read_part(layout.paths("onward", layout.parts), k)
    rows, group = _np(table, "row"), _np(table, "group_id")
    uniq, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    composed = pa.table({"row": rows, "group_id": group, "group_size": counts[inverse]})
    write_routed(layout.path("composed", k), composed, layout.unit_of(rows), layout.units)
    return {"groups": len(uniq), "rows": len(rows)}


def final_unit(layout: Layout, u: int, key_type: pa.DataType) -> dict[str, Any]:
    """Step 9: the unit's output rows (empty captions: a group of their own) as a Parquet part."""
    start, stop = layout.bounds[u], layout.bounds[u + 1]
    unit = read_part([layout.path("units", u)], 0)
    found = read_part(layout.paths("resolved", layout.parts) + layout.paths("composed", layout.parts), u)
    rows = _np(found, "row") - start
    group_id = np.arange(start, stop, dtype=np.int64)
    group_size = np.ones(stop - start, dtype=np.int64)
    group_id[rows] = _np(found, "group_id")
    group_size[rows] = _np(found, "group_size")
    text = unit.column("text").combine_chunks()
    nonempty = int(_nonempty(text).sum())
    if len(rows) != nonempty or len(np.unique(rows)) != len(rows):
        raise RuntimeError(f"unit {u}: {len(rows)} rows resolved for {nonempty} non-empty captions")
    table = pa.table(
        [unit.column("key").cast(key_type), group_id, group_size, text.cast(pa.string())],
        schema=pa.schema([pa.field("key", key_type), *OUTPUT_SCHEMA_TAIL]),
    )
    path = layout.path("out", u, ".parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, f"{path}.tmp-{os.getpid()}")
    os.replace(f"{path}.tmp-{os.getpid()}", path)
    return {"rows": stop - start}


# ----------------------------------------------------------------------------------------------
# The driver: steps as Ray tasks, file names and counts only.
# ----------------------------------------------------------------------------------------------


def _peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _run(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    out = fn(*args)
    out["peak_rss_mb"] = _peak_rss_mb()  # of this worker process, over its life so far
    return out


@functools.cache
def _remote_run():
    import ray

    return ray.remote(num_cpus=1)(_run)


class _Steps:
    """Runs each step's tasks on Ray and keeps what they report: counts and seconds per step."""

    def __init__(self) -> None:
        self.counts: dict[str, list[dict[str, Any]]] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., dict[str, Any]], calls: list[tuple]) -> list[dict[str, Any]]:
        import ray

        started = time.monotonic()
        remote = _remote_run()
        results = ray.get([remote.remote(fn, *args) for args in calls])
        self.counts.setdefault(name, []).extend(results)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started
        log.info("caption dedup: %s, %d tasks, %.1f s", name, len(calls), time.monotonic() - started)
        return results

    def total(self, name: str, key: str) -> int:
        return sum(int(r[key]) for r in self.counts.get(name, []))

    def time(self, *names: str) -> float:
        return round(sum(self.seconds.get(n, 0.0) for n in names), 3)


def _components(steps: _Steps, layout: Layout) -> tuple[list[str] | None, int]:
    """Step 7: large-star / small-star rounds until settled: the label files and the rounds run."""
    if not steps.total("verify", "edges"):
        return None, 0
    P = layout.parts
    inputs = layout.paths("cc0", layout.units)
    for rnd in range(MAX_ROUNDS):
        done = steps.run("large_star", large_star_part, [(layout, k, inputs, rnd) for k in range(P)])
        if sum(r["unsettled"] for r in done) == 0:
            return layout.paths(f"cc{rnd}_labels", P), rnd + 1
        steps.run("small_star", small_star_part, [(layout, k, rnd) for k in range(P)])
        inputs = layout.paths(f"cc{rnd + 1}", P)
    raise RuntimeError(f"connected components did not settle in {MAX_ROUNDS} rounds")


def _key_type(partitions: Sequence[tuple[str | Path, int]], key_col: str | None) -> pa.DataType:
    """The key column's type over all files (permissive promotion, as concatenating them would),
    after checking each file's row count against the one given (footers only)."""
    fields = []
    for path, rows in partitions:
        meta = pq.ParquetFile(path).metadata
        if meta.num_rows != rows:
            raise ValueError(f"{path} has {meta.num_rows} rows, not {rows}")
        schema = meta.schema.to_arrow_schema()
        if key_col and key_col in schema.names:
            fields.append(pa.schema([schema.field(key_col)]))
    if not key_col:
        return pa.int64()
    if not fields:
        return pa.string()
    return pa.unify_schemas(fields, promote_options="permissive").field(key_col).type


def find_caption_duplicates_partitioned(
    partitions: Sequence[tuple[str | Path, int]],
    cfg: CaptionDedupConfig,
    work_dir: str | Path,
    out_path: str | Path,
    caption_col: str = "caption",
    key_col: str | None = "key",
    reducers: int | None = None,
    hash_bits: int = 64,
) -> dict[str, Any]:
    """Caption duplicates of Parquet files in row order, written to ``out_path``; returns the stats.

    Needs Ray up (open :func:`pipeline.core.ray_runtime.ray_session` around the call). The output and
    the stats equal :func:`pipeline.dedup.caption.find_caption_duplicates` over the concatenated
    rows (``mode`` is ``"partitioned"``; ``parts``, ``units``, ``cc_rounds`` and
    ``peak_worker_rss_mb`` are extra).

    Args:
        partitions: ``(parquet file, rows)`` in row order; global row id = file offset + position.
        cfg: the caption dedup options; ``batch_size`` rows make a unit (a task's share of rows).
        work_dir: where this call makes its own folder of shuffle files (removed at the end, also
            on failure). Every worker must see it: one machine, or a volume shared by the nodes.
        out_path: ``caption_duplicates.parquet`` to write (atomically).
        caption_col: caption column; a file without it has null captions.
        key_col: key column (a file without it has null keys); None: the global row number.
        reducers: parts of the hash, key and owner shuffles (default: one per unit).
        hash_bits: bits of the text hash that route the exact pass (tests only).
    """
    started = time.monotonic()
    check_config(cfg)
    units, bounds = plan_units(partitions, cfg.batch_size)
    n = bounds[-1]
    key_type = _key_type(partitions, key_col)
    schema = pa.schema([pa.field("key", key_type), *OUTPUT_SCHEMA_TAIL])
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
    hasher = MinHasher(
        num_perm=cfg.num_perm, seed=cfg.seed, shingle_size=cfg.shingle_size, scheme=cfg.minhash_scheme
    )
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="caption-shuffle-", dir=work_dir)
    layout = Layout(work, tuple(bounds), max(1, reducers or len(units)), hash_bits)
    U, P = layout.units, layout.parts
    steps = _Steps()
    rounds = 0
    try:
        if n:
            steps.run(
                "map", map_unit, [(layout, u, units[u], caption_col, key_col, key_type) for u in range(U)]
            )
            steps.run("exact", exact_part, [(layout, p) for p in range(P)])
            steps.run("minhash", minhash_range, [(layout, r, hasher, bands, rows) for r in range(U)])
            steps.run("bands", band_part, [(layout, q, cfg.bucket_window) for q in range(P)])
            steps.run("join_lo", join_lo, [(layout, r) for r in range(U)])
            verify = (cfg.threshold, cfg.word_guard, cfg.shingle_size, cfg.batch_size)
            steps.run("verify", join_hi_verify, [(layout, r, *verify) for r in range(U)])
            labels, rounds = _components(steps, layout)
            steps.run("resolve", resolve_part, [(layout, k, labels[k] if labels else None) for k in range(P)])
            steps.run("compose", compose_part, [(layout, k) for k in range(P)])
            steps.run("final", final_unit, [(layout, u, key_type) for u in range(U)])
        out_parts = [layout.path("out", u, ".parquet") for u in range(U)]
        steps.run("write", concat_parts, [(out_parts, str(out_path), schema)])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    empty = steps.total("map", "empty")
    distinct = steps.total("exact", "nodes")
    groups = empty + steps.total("resolve", "groups") + steps.total("compose", "groups")
    return {
        "rows": n,
        "empty_captions": empty,
        "distinct_normalized": distinct,
        "exact_duplicate_rows": n - empty - distinct,
        "candidate_pairs": steps.total("join_lo", "candidates"),
        "verified_pairs": steps.total("verify", "verified"),
        "rejected_below_threshold": steps.total("verify", "below"),
        "rejected_word_substitution": steps.total("verify", "substitutions"),
        "groups": groups,
        "duplicate_groups": steps.total("resolve", "duplicate_groups") + steps.total("compose", "groups"),
        "rows_in_duplicate_groups": (
            steps.total("resolve", "rows_in_duplicate_groups") + steps.total("compose", "rows")
        ),
        "removable_rows": n - groups,
        "lsh_bands": bands,
        "lsh_rows": rows,
        "mode": "partitioned",
        "seconds": seconds_since(started),
        "stage_seconds": {
            "normalize": steps.time("map"),
            "exact": steps.time("exact"),
            "minhash_lsh": steps.time("minhash", "bands"),
            "verify": steps.time("join_lo", "verify"),
            "union_find": steps.time("large_star", "small_star", "resolve", "compose"),
            "write": steps.time("final", "write"),
        },
        "parts": P,
        "units": U,
        "cc_rounds": rounds,
        "peak_worker_rss_mb": max((r["peak_rss_mb"] for rs in steps.counts.values() for r in rs), default=0),
    }
