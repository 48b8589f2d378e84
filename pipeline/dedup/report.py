"""``dedup_report.html``: what the duplicate tables say, for a person to check by eye.

One self-contained page (inline CSS, SVG and JPEG thumbnails; :mod:`pipeline.core.html`), written by
``dedup_images``, ``dedup_captions`` and the bundle build. Sections:

* **counts per pass**: exact, pHash, semantic (pairs found, rows linked, rows whose strongest link to
  their representative is that pass) and caption (verified pairs, groups), with the thresholds;
* **histograms**: group sizes (images and captions), pHash Hamming distances and embedding cosines,
  each with its threshold drawn in; the distance histograms show the group members' distance to
  their representative and, for a seeded sample of rows, the distance to their nearest other row
  (duplicate or not), so the threshold can be seen against the whole distribution;
* **largest image groups** as thumbnail strips read from the shards: the representative first, then
  the members farthest from it (the likeliest mistakes), each labelled with method and distance;
* **borderline pairs** on both sides of each threshold (pHash: threshold ± 2 bits; semantic: cosine
  threshold ± 0.02), side by side: pairs that just made it and pairs that just missed;
* **caption groups**: normalised caption, group size, a few raw variants with their counts;
* **removable rows**: every non-representative row is one a dedup would drop; their count, and a
  seeded sample listed beside their representative.

Sampling keeps the page small and its making bounded whatever N is (:class:`ReportLimits`): at most
12 groups x 8 thumbnails, 24 borderline pairs, 20 caption groups, 40 removable rows per table, 80 px
JPEG thumbnails read from at most 64 tars. Pairs below a threshold are in no table, so they are
searched for: ``sample_rows`` seeded query rows against every row, or against a seeded sample of
rows when that would exceed ``phash_comparisons`` (pHash: XOR + popcount in chunks) or
``semantic_flops`` (semantic: flat FAISS inner-product search, reference rows read from the
memory-mapped embeddings in chunks). The group members' distance histograms take every member, or
a seeded sample of ``distances`` of them. The page says what was sampled.

Memory is bounded whatever N is, too: nothing holds a column of every row. The tables (in memory or
parquet files) are read a batch at a time, in two or three passes: counts, group-size tallies and the
ids of the largest groups first, then the rows the page lists (found by rank: the seeded removable
sample is drawn from the count of candidates, not from their list). Of the embedding folder, the
pHashes are streamed a block at a time (the reference sample drawn block by block), and keys, shard
names and raw captions are read for the shown rows only (their partitions' row groups). Measured on
a 300k-row bundle folder, the writer's peak RSS grows by 15-22 MB (105-160 MB when it loaded whole
columns), and by 18 MB at 1M rows (386 MB before); what remains is one chunk of each search (about
32 MB for pHash, 56 MB for the semantic one at any dimension), the distance sample and one batch per
file (``tests/test_dedup_report.py``).

:func:`render_dedup_report` is pure (tables, pairs and thumbnails in, HTML out);
:func:`write_dedup_report` reads the tables, samples, reads thumbnails and writes the page atomically.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import CaptionDedupConfig, ImageDedupConfig
from pipeline.core.html import (
    bar_chart_svg,
    histogram_svg,
    html_page,
    img_tag,
    key_value_table,
    table_html,
    td,
    thumbnail,
)
from pipeline.core.lazy import faiss
from pipeline.core.stage import seconds_since
from pipeline.core.storage import atomic_write_bytes
from pipeline.dedup.names import (
    METHOD_EXACT,
    METHOD_PHASH,
    METHOD_REPRESENTATIVE,
    METHOD_SEMANTIC,
    METHOD_TRANSITIVE,
    PASSES,
)
from pipeline.io.embeddings import METADATA_SCHEMA, EmbeddingRows, list_partitions, metadata_path
from pipeline.io.images import ShardImages

log = logging.getLogger(__name__)

REPORT_NAME = "dedup_report.html"
#: Version of the page's content; part of the bundle's report step fingerprint.
REPORT_VERSION = 2  # 2: read in batches (the pHash reference sampled block by block)
#: Shown captions and keys are cut to this many characters (LAION captions can be pages long).
TEXT_CHARS = 240
KEY_CHARS = 40

_CSS = """
.note{background:#f7f7f2;border:1px solid #e3e3d8;border-radius:6px;padding:8px 12px;font-size:13px}
.note li{margin:2px 0}
.group{margin:10px 0 16px} .group .head{font-size:13px;margin-bottom:4px}
.strip figure{width:96px} figure figcaption{overflow-wrap:anywhere;line-height:1.25}
figure img{image-rendering:auto;object-fit:contain;background:#f0f0f0}
figure.rep img{border-color:#2b7bb9} figure.exact img{border-color:#5cb85c}
figure.phash img{border-color:#f0ad4e} figure.semantic img{border-color:#8e6bbf}
figure.transitive img{border-color:#d9534f}
.sides{display:flex;gap:28px;flex-wrap:wrap} .side{flex:1;min-width:420px}
.side h4{margin:6px 0;font-size:14px} .dup h4{color:#3c763d} .nodup h4{color:#a94442}
.bpair{display:inline-flex;gap:2px;border:1px solid #ddd;border-radius:4px;padding:4px;margin:0 6px 8px 0}
.bpair .lab{font-size:11px;color:#333;max-width:90px;overflow-wrap:anywhere;padding-left:4px}
.legend{font-size:12px;margin:4px 0} .legend span{display:inline-block;margin-left:12px}
.charts{display:flex;flex-wrap:wrap;gap:8px 28px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
td.text{max-width:560px} td.status{max-width:360px}
"""

METHOD_COLOURS = {
    METHOD_REPRESENTATIVE: "#2b7bb9",
    METHOD_EXACT: "#5cb85c",
    METHOD_PHASH: "#f0ad4e",
    METHOD_SEMANTIC: "#8e6bbf",
    METHOD_TRANSITIVE: "#d9534f",
}
CAPTION = "caption"


@dataclass(frozen=True)
class ReportLimits:
    """How much the report shows and how much work its sampling may do (the page's size bound)."""

    groups: int = 12  # largest image groups shown as strips
    members: int = 8  # thumbnails per group strip
    borderline_per_side: int = 6  # pairs per pass and side of its threshold (2 passes x 2 sides)
    caption_groups: int = 20
    variants: int = 3  # raw captions shown per caption group
    removable: int = 40  # sampled removable rows listed per table
    thumbnail_size: int = 80  # pixels of the longer side (JPEG)
    sample_rows: int = 2_000  # query rows of the borderline search
    phash_window: int = 2  # borderline pHash pairs: threshold - 2 .. threshold + 2 bits
    semantic_window: float = 0.02  # borderline semantic pairs: threshold -/+ 0.02
    semantic_k: int = 32  # neighbours per query and reference chunk in the semantic search
    phash_comparisons: int = 2_000_000_000  # query x reference pHash pairs compared, at most
    semantic_flops: float = 2e11  # query x reference x dimension multiply-adds, at most
    distances: int = 1_000_000  # group members in the distance histograms, at most (a seeded sample)
    max_tars: int = 64  # tars read for thumbnails, at most
    seed: int = 0


@dataclass(frozen=True)
class Pair:
    """Two rows near a threshold.

    Attributes:
        method: ``phash`` (``value`` is the Hamming distance) or ``semantic`` (the cosine).
        duplicate: on the duplicate side of the threshold (distance <= threshold, cosine >= threshold).
        source: ``sample`` (the seeded borderline search) or ``groups`` (a member and its representative).
        same_group: both rows are in one image group (possibly linked through other members).
    """

    method: str
    a: int
    b: int
    a_key: str
    b_key: str
    value: float
    duplicate: bool
    source: str = "sample"
    same_group: bool = False


@dataclass
class ImageSection:
    """What the report shows about image duplicates.

    Attributes:
        table: ``image_duplicates.parquet`` (:mod:`pipeline.dedup.image`) in memory; None when ``digest``
            was gathered from the file a batch at a time (:func:`image_section`).
        rows: images examined (N).
        phash_max_distance / semantic_threshold: thresholds (None: that pass is off).
        semantic_ran: whether the semantic pass ran; ``semantic_note`` says why not.
        passes: the dedup summary's ``passes`` (pairs per pass, or why it was skipped).
        borderline: :class:`Pair` s near the thresholds (at most ``borderline_per_side`` per side shown).
        nearest: per pass, each sampled row's distance (pHash) or cosine (semantic) to its nearest other row.
        sampling: per pass, how the borderline search sampled (``queries``, ``reference``, ``seconds``).
        thumbnails: encoded thumbnail per row id (missing ones are drawn as grey boxes).
        thumbnails_note: why there are no thumbnails, if there are none.
        digest: what the page shows of the table (:func:`image_digest`; made from ``table`` if None).
    """

    table: pa.Table | None
    rows: int
    phash_max_distance: int | None = 12
    semantic_threshold: float | None = 0.95
    semantic_ran: bool = True
    semantic_note: str = ""
    passes: Mapping[str, Any] = field(default_factory=dict)
    borderline: Sequence[Pair] = ()
    nearest: Mapping[str, np.ndarray] = field(default_factory=dict)
    sampling: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    thumbnails: Mapping[int, bytes] = field(default_factory=dict)
    thumbnails_note: str | None = None
    digest: ImageDigest | None = None


@dataclass
class CaptionSection:
    """What the report shows about caption duplicates.

    Attributes:
        table: ``caption_duplicates.parquet`` (:mod:`pipeline.dedup.caption`): one row per input row; None
            when ``digest`` was gathered from the file a batch at a time (:func:`write_dedup_report`).
        threshold: the Jaccard threshold.
        captions: the raw captions, row-aligned with ``table`` (for the variants; optional).
        summary: the caption dedup summary (verified pairs, ...).
        digest: what the page shows of the table (:func:`caption_digest`; made from ``table`` if None).
    """

    table: pa.Table | None
    threshold: float = 0.7
    captions: pa.Array | pa.ChunkedArray | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    digest: CaptionDigest | None = None


# ----------------------------------------------------------------------------------------------
# Selections shared by the page and the writer: what the page shows of each table, gathered a batch
# at a time (a table in memory, or its parquet file read in batches: never a whole column of N rows).
# ----------------------------------------------------------------------------------------------

#: Rows per record batch when a table or a metadata file is read in pieces.
_BATCH = 16_384


def _parquet(path: str | Path) -> pq.ParquetFile:
    """A parquet file read as a stream: 1 MB at a time, not a column chunk (up to a row group of the
    column, tens of MB) at a time as with pre-buffering."""
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)


Source = pa.Table | str | Path


def _np(column: pa.ChunkedArray | pa.Array, fill: Any = None) -> np.ndarray:
    if fill is not None:
        column = pc.fill_null(column, fill)
    return column.to_numpy(zero_copy_only=False) if len(column) else np.zeros(0)


def _batches(source: Source, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """``columns`` of a table in memory, or of a parquet file read ``_BATCH`` rows at a time."""
    if isinstance(source, pa.Table):
        yield from source.select(list(columns)).to_batches(max_chunksize=_BATCH)
    else:
        yield from _parquet(source).iter_batches(batch_size=_BATCH, columns=list(columns), use_threads=False)


def _column_names(source: Source) -> list[str]:
    return source.column_names if isinstance(source, pa.Table) else pq.read_schema(source).names


def _take_rows(source: Source, rows: Iterable[int], columns: Sequence[str]) -> dict[int, dict[str, Any]]:
    """``columns`` of the rows at these positions, as dicts by position (read up to the last one)."""
    rows = np.unique(np.asarray(list(rows), np.int64))
    rows = rows[rows >= 0]
    out: dict[int, dict[str, Any]] = {}
    offset = 0
    for batch in _batches(source, columns) if len(rows) else ():
        lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
        if hi > lo:
            taken = batch.take(pa.array(rows[lo:hi] - offset, pa.int64())).to_pylist()
            out.update(zip(rows[lo:hi].tolist(), taken, strict=True))
        offset += batch.num_rows
        if offset > rows[-1]:
            break
    return out


def _top(sizes: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest ``sizes`` and their ids (ties: the smallest id first), in that order."""
    order = np.lexsort((ids, -sizes))[:k]
    return sizes[order], ids[order]


def _count_into(counts: dict[int, int], values: np.ndarray) -> None:
    for value, n in zip(*np.unique(values, return_counts=True), strict=True):
        counts[int(value)] = counts.get(int(value), 0) + int(n)


def _sample_ranks(n: int, k: int, seed: int) -> np.ndarray:
    """Ranks of ``k`` of ``n`` candidates (all when ``n <= k``), seeded, sorted: candidate positions
    found in a later pass, so the candidates are never held (the same rows as
    ``np.sort(rng.choice(candidates, k, replace=False))`` over the sorted candidates)."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False)).astype(np.int64)


@dataclass
class ImageDigest:
    """What the page shows of an image table (:func:`image_digest`): whole-table counts, the group
    members' distances (all of them, or a seeded sample of ``ReportLimits.distances``), the largest
    groups' shown members and a seeded sample of the removable rows.

    Attributes:
        sizes: group size -> groups of that size.
        members: group members but representatives (the rows a dedup removes).
        hamming, cosine: the sampled members' pHash distance (-1: none) and cosine (NaN: none) to their
            representative; ``len(cosine)`` members were sampled.
        largest: per shown group, its shown members (:func:`largest_groups`).
        removable_sample: seeded sample of removable rows (table rows as dicts, in table order).
    """

    groups: int = 0
    rows_in_groups: int = 0
    methods: dict[Any, int] = field(default_factory=dict)
    linked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))
    sizes: dict[int, int] = field(default_factory=dict)
    hamming: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    cosine: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    largest: list[list[dict[str, Any]]] = field(default_factory=list)
    removable_sample: list[dict[str, Any]] = field(default_factory=list)

    @property
    def members(self) -> int:
        return self.rows_in_groups - self.groups


#: Columns of an image table the first pass reads.
_IMAGE_STATS = (
    "row_id",
    "group_id",
    "group_size",
    "is_representative",
    "similarity",
    "hamming_distance",
    "method",
    "linked_by",
)


def _near_threshold(
    batch: pa.RecordBatch, method: str, threshold: float, window: float
) -> list[tuple[int, int, float]]:
    """(representative, member, value) of the batch's members linked to their representative by
    ``method`` within ``window`` of its threshold, in table order."""
    is_method = _np(pc.equal(batch.column("method"), method), False).astype(bool)
    if method == METHOD_PHASH:
        values = _np(batch.column("hamming_distance"), -1).astype(np.float64)
        near = (values >= threshold - window) & (values <= threshold)
    else:
        values = _np(batch.column("similarity"), np.nan).astype(np.float64)
        near = (values >= threshold) & (values <= threshold + window)
    hits = np.flatnonzero(near & is_method)
    reps = _np(batch.column("group_id"))[hits]
    rows = _np(batch.column("row_id"))[hits]
    return list(zip(reps.tolist(), rows.tolist(), values[hits].tolist(), strict=True))


def _member_order(rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Order of group rows as the strips show them (by group: the representative, then transitive
    members, then the largest pHash distance, the lowest cosine, the smallest row id), and the groups."""
    g = _np(rows.column("group_id"), -1)
    order = np.lexsort(
        (
            _np(rows.column("row_id"), 0),
            _np(rows.column("similarity"), 2.0),
            -_np(rows.column("hamming_distance"), -1).astype(np.int64),
            _np(pc.not_equal(rows.column("method"), METHOD_TRANSITIVE), True).astype(bool),
            ~_np(rows.column("is_representative"), False).astype(bool),
            g,
        )
    )
    return order, g


def _strips(rows: pa.Table, chosen: np.ndarray, members: int) -> list[pa.Table]:
    """Per chosen group, its first ``members`` rows in :func:`_member_order`."""
    order, g = _member_order(rows)
    g_sorted = g[order]
    out = []
    for gid in chosen.tolist():
        lo = int(np.searchsorted(g_sorted, gid, side="left"))
        hi = int(np.searchsorted(g_sorted, gid, side="right"))
        out.append(rows.take(pa.array(order[lo : min(hi, lo + members)], pa.int64())))
    return out


class _ImageScan:
    """Two passes over an image table, each a batch at a time.

    The first (on construction) counts what the page counts, keeps the ids of the ``limits.groups``
    largest groups, a seeded sample of the members' distances, and the first group pairs near each
    threshold of ``near`` (method -> (threshold, window)). The second (:meth:`select`) reads the rows
    the page lists: the shown members of those groups, the removable sample, and the groups of given
    rows (the borderline pairs', known only after the search).
    """

    def __init__(
        self, source: Source, limits: ReportLimits, near: Mapping[str, tuple[float, float]] | None = None
    ):
        self.source, self.limits = source, limits
        d = self.digest = ImageDigest()
        self.group_pairs: dict[str, list[tuple[int, int, float]]] = {m: [] for m in near or {}}
        top_sizes, top_ids = np.zeros(0, np.int64), np.zeros(0, np.int64)
        rng = np.random.default_rng(limits.seed + 3)
        sample: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # keys, distances, cosines
        kept = 0
        for batch in _batches(source, _IMAGE_STATS):
            is_rep = _np(batch.column("is_representative"), False).astype(bool)
            d.groups += int(is_rep.sum())
            d.rows_in_groups += batch.num_rows
            sizes = _np(batch.column("group_size"), 0).astype(np.int64)[is_rep]
            _count_into(d.sizes, sizes)
            for m in pc.value_counts(batch.column("method")).to_pylist():
                d.methods[m["values"]] = d.methods.get(m["values"], 0) + int(m["counts"])
            linked_by = batch.column("linked_by")
            for name in PASSES:
                d.linked[name] += int(pc.sum(pc.match_substring(linked_by, name)).as_py() or 0)
            gids = _np(batch.column("group_id"), -1).astype(np.int64)[is_rep]
            top_sizes, top_ids = _top(np.r_[top_sizes, sizes], np.r_[top_ids, gids], limits.groups)
            members = ~is_rep
            sample.append(
                (
                    rng.random(int(members.sum())),
                    _np(batch.column("hamming_distance"), -1).astype(np.int16)[members],
                    _np(batch.column("similarity"), np.nan).astype(np.float32)[members],
                )
            )
            kept += len(sample[-1][0])
            if kept > 2 * limits.distances:
                sample, kept = [self._bottom(sample)], limits.distances
            for method, (threshold, window) in (near or {}).items():
                room = _KEEP_PER_SIDE - len(self.group_pairs[method])
                if room > 0:
                    self.group_pairs[method] += _near_threshold(batch, method, threshold, window)[:room]
        if kept > limits.distances:
            sample = [self._bottom(sample)]
        if sample:
            d.hamming = np.concatenate([s[1] for s in sample])
            d.cosine = np.concatenate([s[2] for s in sample])
        self.chosen = top_ids

    def _bottom(self, sample: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
        """The ``limits.distances`` members with the smallest random keys (a seeded uniform sample), in
        table order."""
        keys, hamming, cosine = (np.concatenate([s[i] for s in sample]) for i in range(3))
        keep = np.sort(np.argpartition(keys, self.limits.distances - 1)[: self.limits.distances])
        return keys[keep], hamming[keep], cosine[keep]

    def select(self, rows: Iterable[int] = ()) -> dict[int, int]:
        """Fill the digest's ``largest`` and ``removable_sample``; return the group id of each of
        ``rows`` that is in a group."""
        d, limits = self.digest, self.limits
        ranks = _sample_ranks(d.members, limits.removable, limits.seed)
        chosen = pa.array(self.chosen, pa.int64())
        wanted = pa.array(sorted(set(rows)), pa.int64())
        strips: pa.Table | None = None
        group_of: dict[int, int] = {}
        seen = 0
        for batch in _batches(self.source, _column_names(self.source)):
            if len(chosen):
                sub = pa.Table.from_batches(
                    [batch.filter(pc.is_in(batch.column("group_id"), value_set=chosen))]
                )
                if sub.num_rows:
                    strips = sub if strips is None else pa.concat_tables([strips, sub])
                    strips = pa.concat_tables(_strips(strips, self.chosen, limits.members))
            nonrep = np.flatnonzero(~_np(batch.column("is_representative"), False).astype(bool))
            lo, hi = np.searchsorted(ranks, [seen, seen + len(nonrep)])
            if hi > lo:
                take = pa.array(nonrep[ranks[lo:hi] - seen], pa.int64())
                d.removable_sample += batch.take(take).to_pylist()
            seen += len(nonrep)
            if len(wanted):
                hit = batch.filter(pc.is_in(batch.column("row_id"), value_set=wanted))
                group_of.update(
                    zip(hit.column("row_id").to_pylist(), hit.column("group_id").to_pylist(), strict=True)
                )
        if strips is not None:
            d.largest = [t.to_pylist() for t in _strips(strips, self.chosen, limits.members)]
        return group_of


def image_digest(table: Source, limits: ReportLimits = ReportLimits()) -> ImageDigest:
    """What the page shows of an image table (in memory or a parquet file), read a batch at a time."""
    scan = _ImageScan(table, limits)
    scan.select()
    return scan.digest


def largest_groups(table: Source, limits: ReportLimits) -> list[list[dict[str, Any]]]:
    """The ``limits.groups`` largest image groups (ties: smallest group id), each as its shown members:
    the representative, then the weakest links (transitive first, then the largest pHash distance,
    then the lowest cosine), at most ``limits.members``."""
    return image_digest(table, limits).largest


@dataclass
class CaptionDigest:
    """What the page shows of a caption table (:func:`caption_digest`).

    Attributes:
        sizes: group size -> groups of that size.
        largest: the largest groups: ``group_id`` (first row), ``key``, ``size``, ``normalized`` and
            ``variants`` (most frequent raw captions with their counts; empty without raw captions).
        removable_sample: seeded sample of removable rows: ``key``, ``row``, ``rep_key``, ``size``,
            ``normalized``.
    """

    rows: int = 0
    groups: int = 0
    rows_in_groups: int = 0
    sizes: dict[int, int] = field(default_factory=dict)
    largest: list[dict[str, Any]] = field(default_factory=list)
    removable_sample: list[dict[str, Any]] = field(default_factory=list)

    @property
    def removable(self) -> int:
        return self.rows_in_groups - self.groups


#: Raw captions of chosen rows (sorted row numbers in, captions row-aligned out).
RawCaptions = Callable[[np.ndarray], pa.Array | pa.ChunkedArray | Sequence[Any]]


def _caption_blocks(source: Source) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch of a caption table: row numbers, group ids, group sizes, whether the row is its group's
    first (kept) row of a duplicate group."""
    offset = 0
    for batch in _batches(source, ["group_id", "group_size"]):
        rows = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
        gid = _np(batch.column("group_id"), -1).astype(np.int64)
        size = _np(batch.column("group_size"), 1).astype(np.int64)
        offset += batch.num_rows
        yield rows, gid, size, (size > 1) & (gid == rows)


def caption_digest(
    table: Source, limits: ReportLimits = ReportLimits(), raw: RawCaptions | None = None
) -> CaptionDigest:
    """What the page shows of a caption table (in memory or a parquet file): two passes over its group
    columns a batch at a time, then the keys and normalised captions of the shown rows, and the raw
    captions (``raw``) of the shown groups' rows only, counted a batch at a time."""
    d = CaptionDigest()
    top_sizes, top_rows = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for rows, _gid, size, first in _caption_blocks(table):
        dup = size > 1
        d.rows += len(rows)
        d.groups += int(first.sum())
        d.rows_in_groups += int(dup.sum())
        _count_into(d.sizes, size[first])
        top_sizes, top_rows = _top(
            np.r_[top_sizes, size[first]], np.r_[top_rows, rows[first]], limits.caption_groups
        )
    ranks = _sample_ranks(d.removable, limits.removable, limits.seed)
    members: list[tuple[np.ndarray, np.ndarray]] = []  # rows of the shown groups, and their group
    picked: list[tuple[np.ndarray, np.ndarray]] = []  # sampled removable rows, and their group
    seen = 0
    for rows, gid, size, first in _caption_blocks(table) if len(top_rows) else ():
        if raw is not None:
            inside = np.isin(gid, top_rows)
            members.append((rows[inside], gid[inside]))
        removable = np.flatnonzero((size > 1) & ~first)
        lo, hi = np.searchsorted(ranks, [seen, seen + len(removable)])
        at = removable[ranks[lo:hi] - seen]
        picked.append((rows[at], gid[at]))
        seen += len(removable)
    picked_rows = np.concatenate([p[0] for p in picked]) if picked else np.zeros(0, np.int64)
    picked_gid = np.concatenate([p[1] for p in picked]) if picked else np.zeros(0, np.int64)
    shown = _take_rows(
        table,
        itertools.chain(top_rows.tolist(), picked_rows.tolist(), picked_gid.tolist()),
        ["key", "group_size", "normalized_caption"],
    )
    variants = _variants(members, raw, limits) if raw is not None else {}
    d.largest = [
        {
            "group_id": g,
            "key": shown[g]["key"],
            "size": int(n),
            "normalized": shown[g]["normalized_caption"],
            "variants": variants.get(g, []),
        }
        for g, n in zip(top_rows.tolist(), top_sizes.tolist(), strict=True)
    ]
    d.removable_sample = [
        {
            "key": shown[r]["key"],
            "row": r,
            "rep_key": shown.get(g, {}).get("key"),
            "size": shown[r]["group_size"],
            "normalized": shown[r]["normalized_caption"],
        }
        for r, g in zip(picked_rows.tolist(), picked_gid.tolist(), strict=True)
    ]
    return d


def _variants(
    members: list[tuple[np.ndarray, np.ndarray]], raw: RawCaptions, limits: ReportLimits
) -> dict[int, list[tuple[Any, int]]]:
    """The ``limits.variants`` most frequent raw captions of each group (ties: in text order), counted
    ``_BATCH`` rows at a time."""
    rows = np.concatenate([m[0] for m in members]) if members else np.zeros(0, np.int64)
    groups = np.concatenate([m[1] for m in members]) if members else np.zeros(0, np.int64)
    counts: dict[tuple[int, Any], int] = {}
    for lo in range(0, len(rows), _BATCH):
        texts = raw(rows[lo : lo + _BATCH])
        texts = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.string())
        part = pa.table({"g": pa.array(groups[lo : lo + _BATCH]), "c": texts})
        for row in part.group_by(["g", "c"]).aggregate([([], "count_all")]).to_pylist():
            counts[(row["g"], row["c"])] = counts.get((row["g"], row["c"]), 0) + row["count_all"]
    out: dict[int, list[tuple[Any, int]]] = {}
    for (g, c), n in sorted(counts.items(), key=lambda item: (item[0][0], -item[1], str(item[0][1]))):
        shown = out.setdefault(g, [])
        if len(shown) < limits.variants:
            shown.append((c, n))
    return out


def pick_borderline(pairs: Iterable[Pair], per_side: int) -> list[Pair]:
    """At most ``per_side`` pairs per (method, side of the threshold), nearest the threshold first.

    Pairs are taken in turn from each value (each Hamming distance; cosines in steps of 0.01), the
    values nearest the threshold first, so every distance near it shows up; within a value, pairs of
    rows not shown yet come first, so one picture's many copies do not fill the side.
    """
    seen, by_side = set(), {}
    for p in pairs:
        ident = (p.method, min(p.a, p.b), max(p.a, p.b))
        if ident in seen or p.a == p.b:
            continue
        seen.add(ident)
        by_side.setdefault((p.method, p.duplicate), []).append(p)
    out = []
    for (method, duplicate), side in sorted(by_side.items()):
        # nearest the threshold: the largest duplicate distance, the smallest duplicate cosine
        sign = -1 if (method == METHOD_PHASH) == duplicate else 1
        side.sort(key=lambda p, sign=sign: (sign * p.value, min(p.a, p.b), max(p.a, p.b)))
        queues: dict[float, list[Pair]] = {}
        for p in side:
            queues.setdefault(p.value if method == METHOD_PHASH else round(p.value, 2), []).append(p)
        chosen: list[Pair] = []
        shown: set[int] = set()
        while len(chosen) < per_side and any(queues.values()):
            for queue in queues.values():
                if queue and len(chosen) < per_side:
                    fresh = next((i for i, p in enumerate(queue) if not {p.a, p.b} & shown), 0)
                    chosen.append(queue.pop(fresh))
                    shown |= {chosen[-1].a, chosen[-1].b}
        out.extend(sorted(chosen, key=lambda p, sign=sign: sign * p.value))
    return out


# ----------------------------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------------------------


def _short(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def size_buckets(
    series: Mapping[str, np.ndarray | Mapping[int, int]],
) -> tuple[list[str], dict[str, list[int]]]:
    """Group sizes counted in buckets 2, 3, 4, 5-8, 9-16, ... (doubling above 4), per series: an array
    of sizes, or the number of groups of each size."""
    counted = {
        name: dict(s) if isinstance(s, Mapping) else dict(zip(*np.unique(s, return_counts=True), strict=True))
        for name, s in series.items()
    }
    largest = max([int(max(c)) for c in counted.values() if c] + [4])
    edges = [2, 3, 4, 5]
    while edges[-1] <= largest:
        edges.append((edges[-1] - 1) * 2 + 1)
    labels = [str(a) if b - a == 1 else f"{a}–{b - 1}" for a, b in itertools.pairwise(edges)]
    counts = {}
    for name, by_size in counted.items():
        sizes = np.fromiter(by_size.keys(), np.int64, len(by_size))
        groups = np.fromiter(by_size.values(), np.int64, len(by_size))
        which = np.searchsorted(edges, sizes, side="right") - 1
        ok = which >= 0
        bucketed = np.bincount(which[ok], weights=groups[ok], minlength=len(labels))[: len(labels)]
        counts[name] = bucketed.astype(np.int64).tolist()
    return labels, counts


@dataclass
class _Page:
    """The sections and what the page shows of their tables (gathered once, a batch at a time)."""

    images: ImageSection | None
    captions: CaptionSection | None
    limits: ReportLimits
    image: ImageDigest | None = None
    caption: CaptionDigest | None = None

    def __post_init__(self) -> None:
        if self.images is not None:
            self.image = self.images.digest or image_digest(self.images.table, self.limits)
        if self.captions is not None:
            raw = self.captions.captions
            self.caption = self.captions.digest or caption_digest(
                self.captions.table,
                self.limits,
                None if raw is None else lambda rows: raw.take(pa.array(rows, pa.int64())),
            )


def _card(css_id: str, title: str, removable: int, detail: str) -> str:
    return (
        f'<div class="card" id="{css_id}"><h3>{title}</h3>'
        f'<div class="big">{removable:,} removable</div><div>{detail}</div></div>'
    )


def _cards(page: _Page) -> str:
    cards = []
    if page.images is not None and page.image is not None:
        s = page.image
        detail = f"{page.images.rows:,} images · {s.groups:,} groups · {s.rows_in_groups:,} in groups"
        cards.append(_card("card-images", "Images", s.members, detail))
    if page.caption is not None:
        c = page.caption
        detail = f"{c.rows:,} rows · {c.groups:,} groups · {c.rows_in_groups:,} in groups"
        cards.append(_card("card-captions", "Captions", c.removable, detail))
    return f'<div class="cards">{"".join(cards)}</div>'


def _pass_status(images: ImageSection, name: str) -> str:
    info = images.passes.get(name) or {}
    if "skipped" in info:
        return f"skipped: {info['skipped']}"
    off = {
        METHOD_PHASH: images.phash_max_distance is None,
        METHOD_SEMANTIC: images.semantic_threshold is None,
    }
    if off.get(name) or (images.passes and not info):
        return "off"
    if name == METHOD_SEMANTIC and not images.semantic_ran:
        return f"not run{': ' + images.semantic_note if images.semantic_note else ''}"
    return "ran"


def _counts(page: _Page) -> str:
    rows = []
    if page.images is not None and page.image is not None:
        images, s = page.images, page.image
        t_phash, t_semantic = images.phash_max_distance, images.semantic_threshold
        thresholds = {
            METHOD_EXACT: "same sha256",
            METHOD_PHASH: f"Hamming ≤ {t_phash}" if t_phash is not None else "–",
            METHOD_SEMANTIC: f"cosine ≥ {t_semantic:g}" if t_semantic is not None else "–",
        }
        for name in PASSES:
            pairs = (images.passes.get(name) or {}).get("pairs")
            rows.append(
                f'<tr id="pass-{name}">{td(name, css="text")}{td(thresholds[name])}'
                f"{td(_pass_status(images, name), css='status')}{td(pairs)}{td(s.linked[name])}"
                f"{td(s.methods.get(name, 0))}</tr>"
            )
        rows.append(
            f'<tr id="pass-transitive">{td(METHOD_TRANSITIVE, css="text")}'
            f"{td('through other members')}{td('–')}{td(None)}{td(None)}"
            f"{td(s.methods.get(METHOD_TRANSITIVE, 0))}</tr>"
        )
    if page.captions is not None and page.caption is not None:
        captions, c = page.captions, page.caption
        rows.append(
            f'<tr id="pass-caption">{td(CAPTION, css="text")}{td(f"Jaccard ≥ {captions.threshold:g}")}'
            f"{td('ran')}{td(captions.summary.get('verified_pairs'))}{td(c.rows_in_groups)}{td(None)}</tr>"
        )
    headers = ("pass", "threshold", "status", "pairs found", "rows in its pairs", "members it links")
    return table_html("pass-counts", headers, rows) + (
        '<p class="sub">Pairs found: verified pairs of the pass (for captions, near-duplicate pairs after '
        "the exact grouping). Rows in its pairs: images in at least one pair of the pass (captions: rows "
        "in a group). Members it links: group members whose direct link to their representative is that "
        "pass (exact before pHash before semantic); transitive members are linked only through others.</p>"
    )


#: Names and colours of the two series of the distance histograms.
_SERIES_NAMES = {
    "members": "group member vs its representative",
    "nearest": "sampled row vs its nearest other row",
}
CHART_WIDTH = 760


def _distance_histogram(images: ImageSection, method: str, members: np.ndarray) -> str:
    if method == METHOD_PHASH:
        t, title, label = images.phash_max_distance, "pHash Hamming distance", "bits that differ (of 64)"
        threshold_label = f"threshold: ≤ {t} is a duplicate"
    else:
        t, title, label = images.semantic_threshold, "Embedding cosine", "cosine of the image embeddings"
        threshold_label = f"threshold: ≥ {t:g} is a duplicate"
        if not images.semantic_ran:
            title += " (the semantic pass did not run: for reference only)"
    svg = histogram_svg(
        {"members": members, "nearest": np.asarray(images.nearest.get(method, np.zeros(0)))},
        t,
        label,
        integer=method == METHOD_PHASH,
        width=CHART_WIDTH,
        names=_SERIES_NAMES,
        colours={"members": METHOD_COLOURS[method], "nearest": "#777777"},
        threshold_label=threshold_label,
        share=True,
    )
    return f'<div class="chart" id="hist-{method}"><h3>{html.escape(title)}</h3>{svg}</div>'


def _histograms(page: _Page) -> str:
    out = []
    sizes = {
        name: digest.sizes
        for name, digest in (("image groups", page.image), ("caption groups", page.caption))
        if digest is not None
    }
    if sizes:
        labels, series = size_buckets(sizes)
        svg = bar_chart_svg(labels, series, "members per group", width=CHART_WIDTH)
        out.append(f'<div class="chart" id="hist-group-sizes"><h3>Group sizes</h3>{svg}</div>')
    if page.images is not None and page.image is not None:
        images, digest = page.images, page.image
        if images.phash_max_distance is not None:
            out.append(_distance_histogram(images, METHOD_PHASH, digest.hamming[digest.hamming >= 0]))
        if images.semantic_threshold is not None:
            out.append(_distance_histogram(images, METHOD_SEMANTIC, digest.cosine))
    note = (
        '<p class="sub">Distance histograms: each series as a share of its own count (the sample is far '
        "smaller than the groups). The nearest-row series covers duplicates and non-duplicates alike: a "
        "threshold in a valley between its modes separates them.</p>"
    )
    return note + '<div class="charts">' + "".join(out) + "</div>" if out else '<p class="sub">No tables.</p>'


def _member_label(row: Mapping[str, Any]) -> str:
    method = row.get("method") or ""
    parts = [method]
    if method != METHOD_REPRESENTATIVE:
        if row.get("hamming_distance") is not None:
            parts.append(f"d={row['hamming_distance']}")
        if row.get("similarity") is not None and not math.isnan(row["similarity"]):
            parts.append(f"cos {row['similarity']:.3f}")
    return " · ".join(parts)


def _figure(css: str, data: bytes | None, size: int, alt: str, caption: str) -> str:
    return (
        f'<figure class="{html.escape(css)}">{img_tag(data, size, alt, placeholder="")}'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _group_strips(images: ImageSection, groups: list[list[dict[str, Any]]], limits: ReportLimits) -> str:
    if not groups:
        return '<p class="sub">No image groups.</p>'
    legend = "".join(
        f'<span><i style="background:{c}"></i>{html.escape(m)}</span>' for m, c in METHOD_COLOURS.items()
    )
    out = [
        f'<div class="legend">Frame: strongest link to the representative. {legend}</div>'
        '<p class="sub">Representative first (kept), then the members farthest from it; d: pHash '
        "Hamming distance to the representative, cos: embedding cosine.</p>"
    ]
    for members in groups:
        rep = members[0]
        figures = "".join(
            _figure(
                m["method"],
                images.thumbnails.get(int(m["row_id"])),
                limits.thumbnail_size,
                str(m["key"]),
                f"{html.escape(_member_label(m))}<br>{html.escape(_short(m['key'], KEY_CHARS))}",
            )
            for m in members
        )
        more = f", {len(members)} shown" if rep["group_size"] > len(members) else ""
        out.append(
            f'<div class="group" id="group-{rep["group_id"]}"><div class="head"><b>group '
            f"{rep['group_id']}</b> · {rep['group_size']} images{more} · representative "
            f'{html.escape(_short(rep["key"], KEY_CHARS))}</div><div class="strip">{figures}</div></div>'
        )
    return "".join(out)


def _pair_box(images: ImageSection, p: Pair, size: int) -> str:
    value = f"d={int(p.value)}" if p.method == METHOD_PHASH else f"cos {p.value:.3f}"
    extra = " · same group" if (p.same_group and not p.duplicate) else ""
    return (
        f'<div class="bpair" data-method="{p.method}" data-duplicate="{str(p.duplicate).lower()}">'
        f"{img_tag(images.thumbnails.get(p.a), size, p.a_key, placeholder='')}"
        f"{img_tag(images.thumbnails.get(p.b), size, p.b_key, placeholder='')}"
        f'<div class="lab"><b>{value}</b><br>{html.escape(_short(p.a_key, KEY_CHARS))}<br>'
        f"{html.escape(_short(p.b_key, KEY_CHARS))}<br><i>{html.escape(p.source)}{extra}</i></div></div>"
    )


def _borderline(images: ImageSection, limits: ReportLimits) -> str:
    pairs = pick_borderline(images.borderline, limits.borderline_per_side)
    out = []
    for method in (METHOD_PHASH, METHOD_SEMANTIC):
        if method == METHOD_PHASH and images.phash_max_distance is not None:
            t, w = images.phash_max_distance, limits.phash_window
            title = f"pHash: Hamming distance {max(0, t - w)} to {t + w} (duplicates: ≤ {t})"
            sides = ((True, f"duplicates: distance ≤ {t}"), (False, f"not duplicates: distance > {t}"))
        elif method == METHOD_SEMANTIC and images.semantic_threshold is not None:
            t, w = images.semantic_threshold, limits.semantic_window
            title = f"semantic: cosine {t - w:.2f} to {t + w:.2f} (duplicates: ≥ {t:g})"
            if not images.semantic_ran:
                title += "; the pass did not run: what this threshold would do"
            sides = ((True, f"duplicates: cosine ≥ {t:g}"), (False, f"not duplicates: cosine < {t:g}"))
        else:
            continue
        cols = []
        for dup, head in sides:
            found = [p for p in pairs if p.method == method and p.duplicate == dup]
            boxes = "".join(_pair_box(images, p, limits.thumbnail_size) for p in found)
            cols.append(
                f'<div class="side {"dup" if dup else "nodup"}"><h4>{html.escape(head)} ({len(found)})</h4>'
                f"{boxes or '<p class=sub>none found</p>'}</div>"
            )
        info = images.sampling.get(method) or {}
        searched = (
            f'<p class="sub">Searched {info.get("queries", 0):,} sampled rows against '
            f"{info.get('reference', 0):,} of {images.rows:,} rows in {info.get('seconds', 0)} s.</p>"
            if info
            else ""
        )
        out.append(
            f'<div id="borderline-{method}"><h3>{html.escape(title)}</h3>{searched}'
            f'<div class="sides">{"".join(cols)}</div></div>'
        )
    return "".join(out) or '<p class="sub">No threshold to show.</p>'


def caption_groups(page: _Page) -> list[dict[str, Any]]:
    """The largest caption groups: first row, key, size, normalised caption, most frequent raw captions."""
    return page.caption.largest if page.caption is not None else []


def _caption_table(page: _Page) -> str:
    groups = caption_groups(page)
    if not groups or page.caption is None:
        return '<p class="sub">No caption groups.</p>'
    rows = []
    for g in groups:
        variants = "<br>".join(
            f'{html.escape(_short(text, TEXT_CHARS))} <span class="sub">×{n}</span>'
            for text, n in g["variants"]
        )
        rows.append(
            f"<tr>{td(_short(g['normalized'], TEXT_CHARS), css='text')}{td(g['size'])}"
            f'<td class="text" data-v="{len(g["variants"])}">'
            f"{variants or '<span class=sub>raw captions not available</span>'}</td>"
            f"{td(_short(g['key'], KEY_CHARS))}</tr>"
        )
    headers = ("normalised caption", "group size", "raw variants (count)", "first row's key")
    return (
        f'<p class="sub">The {len(groups)} largest of {page.caption.groups:,} groups, with up to '
        f"{page.limits.variants} of their most frequent raw captions.</p>"
        + table_html("caption-group-table", headers, rows)
    )


def _removable(page: _Page) -> str:
    out = []
    if page.image is not None:
        picked = page.image.removable_sample
        rows = [
            f"<tr>{td(_short(r['key'], KEY_CHARS))}{td(r['row_id'])}"
            f"{td(_short(r['representative_key'], KEY_CHARS))}{td(r['group_size'])}{td(r['method'])}"
            f"{td(r['hamming_distance'])}{td(r['similarity'], 3)}</tr>"
            for r in picked
        ]
        headers = ("key", "row id", "kept representative", "group size", "method", "pHash distance", "cosine")
        out.append(
            f"<h3>Images: {page.image.members:,} removable rows</h3>"
            '<p class="sub">Every group member but its representative (the largest image; ties: the '
            f"smallest key). A seeded sample of {len(picked)}:</p>"
            + table_html("removable-images", headers, rows)
        )
    if page.caption is not None:
        picked = page.caption.removable_sample
        rows = [
            f"<tr>{td(_short(r['key'], KEY_CHARS))}{td(r['row'])}{td(_short(r['rep_key'], KEY_CHARS))}"
            f"{td(r['size'])}{td(_short(r['normalized'], TEXT_CHARS), css='text')}</tr>"
            for r in picked
        ]
        headers = ("key", "row", "kept row's key", "group size", "normalised caption")
        out.append(
            f"<h3>Captions: {page.caption.removable:,} removable rows</h3>"
            f'<p class="sub">Every group member but its first row. A seeded sample of {len(picked)}:</p>'
            + table_html("removable-captions", headers, rows)
        )
    return "".join(out)


def _sampling_note(page: _Page) -> str:
    items, limits = [], page.limits
    if page.images is not None and page.image is not None:
        images, digest = page.images, page.image
        groups = digest.groups
        items.append(
            f"Image groups: the {min(limits.groups, groups)} largest of {groups:,}, at most "
            f"{limits.members} pictures each ({limits.thumbnail_size} px thumbnails)."
        )
        items.extend(
            f"Borderline {method} pairs and the nearest-row histogram: {info.get('queries', 0):,} seeded "
            f"sample rows searched against {info.get('reference', 0):,} of {images.rows:,} rows; at most "
            f"{limits.borderline_per_side} pairs shown per side of the threshold."
            for method, info in images.sampling.items()
        )
        if len(digest.cosine) < digest.members:
            items.append(
                f"Distance histograms: the group members' series is a seeded sample of "
                f"{len(digest.cosine):,} of {digest.members:,} members."
            )
        if images.thumbnails_note:
            items.append(images.thumbnails_note)
    if page.caption is not None:
        groups = page.caption.groups
        items.append(f"Caption groups: the {min(limits.caption_groups, groups)} largest of {groups:,}.")
    items.append(
        f"Removable rows: a seeded sample of at most {limits.removable} per table (seed {limits.seed})."
    )
    listed = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return f'<div class="note" id="sampling"><b>What this page samples</b><ul>{listed}</ul></div>'


def render_dedup_report(
    images: ImageSection | None = None,
    captions: CaptionSection | None = None,
    *,
    title: str = "Deduplication report",
    limits: ReportLimits = ReportLimits(),
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """The report's HTML (pure: nothing is read). Either section may be absent (a caption-only report)."""
    page = _Page(images, captions, limits)
    created = html.escape(str((provenance or {}).get("created", "")))
    body = [
        f'<h1>{html.escape(title)}</h1><div class="sub">{created}</div>{_cards(page)}{_sampling_note(page)}',
        f'<h2 id="counts">Counts per pass</h2>{_counts(page)}',
        f'<h2 id="histograms">Histograms</h2>{_histograms(page)}',
    ]
    if images is not None:
        strips = _group_strips(images, page.image.largest if page.image else [], limits)
        body.append(f'<h2 id="image-groups">Largest image groups</h2>{strips}')
        body.append(
            '<h2 id="borderline">Borderline pairs</h2><p class="sub">Pairs just inside and just outside '
            "each threshold, side by side: if the pairs on the right look like duplicates, the threshold is "
            "too strict; if those on the left do not, it is too loose. <i>sample</i>: found by the seeded "
            "search; <i>groups</i>: a group member and its representative.</p>"
            f"{_borderline(images, limits)}"
        )
    if captions is not None:
        body.append(f'<h2 id="caption-groups">Caption groups</h2>{_caption_table(page)}')
    body.append(f'<h2 id="removable">Rows a dedup would remove</h2>{_removable(page)}')
    if provenance:
        body.append(f'<h2 id="provenance">Provenance</h2>{key_value_table(provenance.items())}')
    return html_page(title, "".join(body), _CSS)


# ----------------------------------------------------------------------------------------------
# The borderline search: a seeded sample of rows against every row (or a seeded sample of them).
# ----------------------------------------------------------------------------------------------


def _sample_range(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct row ids of ``0..n-1`` (all of them when ``n <= k``), sorted; O(k) memory."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


#: Pairs kept per pHash distance value, and per side of the semantic threshold, while searching.
_KEEP_PER_VALUE = 64
_KEEP_PER_SIDE = 256


#: A pHash source: called for each pass, it yields (first row id, hashes, valid) per block of rows.
HashBlocks = Callable[[], Iterable[tuple[int, np.ndarray, np.ndarray]]]


def phash_neighbours(
    hashes: np.ndarray, valid: np.ndarray, queries: np.ndarray, threshold: int, limits: ReportLimits
) -> tuple[list[tuple[int, int, int]], np.ndarray, dict[str, Any]]:
    """Pairs at Hamming distance ``threshold ± limits.phash_window`` between sampled ``queries`` and
    the reference rows, and each query's distance to its nearest other row (:func:`phash_search` over
    hashes in memory)."""
    hashes, valid = np.asarray(hashes, np.uint64), np.asarray(valid, bool)
    return phash_search(lambda: [(0, hashes, valid)], queries, threshold, limits)


def phash_search(
    blocks: HashBlocks, queries: np.ndarray, threshold: int, limits: ReportLimits
) -> tuple[list[tuple[int, int, int]], np.ndarray, dict[str, Any]]:
    """:func:`phash_neighbours` over hashes read a block at a time (two passes over ``blocks()``).

    Rows without a hash, or with the flat hash 0, are left out (as in the pHash pass). The reference
    is every hashed row, or a seeded sample of ``phash_comparisons / len(queries)`` of them (drawn
    block by block: a hypergeometric share of the sample per block); it is compared in chunks of
    XOR + popcount, so memory stays at about 32 MB plus one block, whatever N is.
    """
    started = time.monotonic()
    queries = np.asarray(queries, np.int64)
    q = np.zeros(len(queries), np.uint64)
    q_usable = np.zeros(len(queries), bool)
    usable_rows = 0
    for first, hashes, valid in blocks():
        usable = valid & (hashes != 0)
        usable_rows += int(usable.sum())
        inside = (queries >= first) & (queries < first + len(hashes))
        q[inside] = hashes[queries[inside] - first]
        q_usable[inside] = usable[queries[inside] - first]
    queries, q = queries[q_usable], q[q_usable]
    info: dict[str, Any] = {"queries": len(queries), "reference": 0}
    if len(queries) == 0 or usable_rows < 2:
        return [], np.zeros(0, np.int64), {**info, "seconds": seconds_since(started)}
    budget = max(1, limits.phash_comparisons // len(queries))
    info["reference"] = wanted = min(budget, usable_rows)
    rng = np.random.default_rng(limits.seed + 1)
    lo_v, hi_v = max(0, threshold - limits.phash_window), threshold + limits.phash_window
    chunk = max(1, 8_000_000 // len(queries))
    nearest = np.full(len(queries), 255, np.uint8)
    found: dict[int, list[tuple[int, int, int]]] = {v: [] for v in range(lo_v, hi_v + 1)}

    def compare(ref: np.ndarray, ref_hashes: np.ndarray) -> None:
        d = np.empty((len(q), len(ref)), np.uint8)  # Hamming distances (S, chunk)
        for lo in range(0, len(q), 256):  # the XOR in pieces: 8 MB of uint64 at a time, not 64
            np.bitwise_count(q[lo : lo + 256, None] ^ ref_hashes[None, :], out=d[lo : lo + 256])
        pos = np.minimum(np.searchsorted(ref, queries), len(ref) - 1)
        itself = np.flatnonzero(ref[pos] == queries)
        d[itself, pos[itself]] = 255  # a row is not its own neighbour
        np.minimum(nearest, d.min(axis=1), out=nearest)
        window = (d - np.uint8(lo_v)) <= np.uint8(hi_v - lo_v)  # lo_v <= d <= hi_v (uint8 wraps below)
        if not window.any():  # the usual case: a scan of the mask is far cheaper than nonzero
            return
        qi, ri = np.divmod(np.flatnonzero(window), window.shape[1])
        values = d[qi, ri]
        for v in np.unique(values).tolist():
            room = _KEEP_PER_VALUE - len(found[v])
            if room > 0:
                sel = np.flatnonzero(values == v)[:room]
                found[v].extend(
                    zip(queries[qi[sel]].tolist(), ref[ri[sel]].tolist(), [v] * len(sel), strict=True)
                )

    # the reference rows in row order, compared in chunks of ``chunk`` rows whatever the blocks are
    pending_rows, pending_hashes = np.zeros(0, np.int64), np.zeros(0, np.uint64)
    rows_left, take_left = usable_rows, wanted
    for first, hashes, valid in blocks():
        usable = np.flatnonzero(valid & (hashes != 0))
        if wanted < usable_rows:  # this block's share of a uniform sample without replacement
            take = 0
            if take_left and len(usable):
                take = int(rng.hypergeometric(len(usable), rows_left - len(usable), take_left))
            rows_left, take_left = rows_left - len(usable), take_left - take
            usable = np.sort(usable[rng.choice(len(usable), take, replace=False)])
        pending_rows = np.concatenate([pending_rows, usable + first])
        pending_hashes = np.concatenate([pending_hashes, hashes[usable]])
        while len(pending_rows) >= chunk:
            compare(pending_rows[:chunk], pending_hashes[:chunk])
            pending_rows, pending_hashes = pending_rows[chunk:], pending_hashes[chunk:]
    if len(pending_rows):
        compare(pending_rows, pending_hashes)
    pairs = [p for v in sorted(found) for p in found[v]]
    info["seconds"] = seconds_since(started)
    return pairs, nearest[nearest < 255].astype(np.int64), info


def semantic_neighbours(
    fetch: EmbeddingRows, queries: np.ndarray, threshold: float, limits: ReportLimits
) -> tuple[list[tuple[int, int, float]], np.ndarray, dict[str, Any]]:
    """Pairs at cosine ``threshold ± limits.semantic_window`` among each sampled query's nearest
    ``semantic_k`` reference rows (flat FAISS inner-product search, reference rows in chunks), and each
    query's cosine to its nearest other row.

    The reference is every row, or a seeded sample of ``semantic_flops / (queries x dim)`` rows.
    All-zero embeddings never pair.
    """
    started = time.monotonic()
    q = fetch(queries)
    nonzero = np.einsum("ij,ij->i", q, q) > 0.5
    queries, q = queries[nonzero], q[nonzero]
    info: dict[str, Any] = {"queries": len(queries), "reference": 0}
    if len(queries) == 0 or fetch.n < 2:
        return [], np.zeros(0, np.float32), {**info, "seconds": seconds_since(started)}
    budget = max(1, int(limits.semantic_flops // (len(queries) * max(1, fetch.dim))))
    reference = _sample_range(fetch.n, budget, limits.seed + 2)
    info["reference"] = len(reference)
    chunk = max(1, 2**22 // max(1, fetch.dim))  # 16 MB of float32 per chunk (about 3 copies live)
    nearest = np.full(len(queries), -np.inf, np.float32)
    found: dict[bool, list[tuple[int, int, float]]] = {True: [], False: []}
    for start in range(0, len(reference), chunk):
        ref = reference[start : start + chunk]
        index = faiss.IndexFlatIP(fetch.dim)
        index.add(fetch(ref))
        scores, ids = index.search(q, min(limits.semantic_k + 1, len(ref)))
        rows = np.where(ids >= 0, ref[np.maximum(ids, 0)], -1)
        ok = (ids >= 0) & (rows != queries[:, None])
        best = np.where(ok, scores, -np.inf).max(axis=1)
        np.maximum(nearest, best, out=nearest)
        window = ok & (np.abs(scores - threshold) <= limits.semantic_window)
        for qi, ri in zip(*np.nonzero(window), strict=True):
            side = bool(scores[qi, ri] >= threshold)
            if len(found[side]) < _KEEP_PER_SIDE:
                found[side].append((int(queries[qi]), int(rows[qi, ri]), float(scores[qi, ri])))
    info["seconds"] = seconds_since(started)
    return found[True] + found[False], nearest[np.isfinite(nearest)], info


def group_pairs(table: Source, method: str, threshold: float, window: float) -> list[tuple[int, int, float]]:
    """Members linked directly to their representative by ``method`` within ``window`` of its threshold:
    (representative row, member row, distance or cosine); these are duplicates a sample rarely meets."""
    out: list[tuple[int, int, float]] = []
    for batch in _batches(table, _IMAGE_STATS):
        out += _near_threshold(batch, method, threshold, window)[: _KEEP_PER_SIDE - len(out)]
        if len(out) >= _KEEP_PER_SIDE:
            break
    return out


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


def _summary(source: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if source is None or isinstance(source, Mapping):
        return dict(source or {})
    try:
        return json.loads(Path(source).read_text())
    except (OSError, ValueError):
        return {}


def _typed(batch: pa.RecordBatch | pa.Table, columns: Sequence[str], rows: int) -> pa.Table:
    """``columns`` typed as ours (:data:`METADATA_SCHEMA`), those absent as nulls (as
    :meth:`pipeline.io.embeddings.Partition.metadata`)."""
    arrays = []
    for column in columns:
        ours = METADATA_SCHEMA.field(column).type if column in METADATA_SCHEMA.names else None
        if column in batch.schema.names:
            arrays.append(batch.column(column) if ours is None else batch.column(column).cast(ours))
        else:
            arrays.append(pa.nulls(rows, ours or pa.string()))
    return pa.table(arrays, names=list(columns))


class _Metadata:
    """Metadata of the embedding rows, read where needed: the caller's table in memory, or the embedding
    folder's partitions, a batch (:meth:`blocks`) or the chosen rows (:meth:`take`) at a time, so no
    column of every row is ever held."""

    def __init__(self, folder: str | Path | None = None, table: pa.Table | None = None):
        self.table = table
        if table is not None:
            self.n = table.num_rows
            return
        self.paths = [metadata_path(folder, p.name) for p in list_partitions(folder)]
        counts = [pq.ParquetFile(path).metadata.num_rows for path in self.paths]
        self.starts = np.cumsum([0, *counts])
        self.n = int(self.starts[-1])

    def has(self, column: str) -> bool:
        """Whether ``column`` can be read (a folder's missing columns read as nulls)."""
        return self.table is None or column in self.table.column_names

    def _file_batches(
        self, part: int, columns: Sequence[str], row_group: int | None = None
    ) -> Iterator[pa.Table]:
        pf = _parquet(self.paths[part])
        groups = range(pf.num_row_groups) if row_group is None else [row_group]
        present = [c for c in columns if c in pf.schema_arrow.names]
        for g in groups:
            if not present:  # nothing to read: nulls of the row group's length
                n = pf.metadata.row_group(g).num_rows
                for lo in range(0, n, _BATCH):
                    yield _typed(pa.table({}), columns, min(_BATCH, n - lo))
                continue
            for batch in pf.iter_batches(
                batch_size=_BATCH, row_groups=[g], columns=present, use_threads=False
            ):
                yield _typed(batch, columns, batch.num_rows)

    def blocks(self, columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
        """(first row id, ``columns`` of the next rows) for every row, ``_BATCH`` rows at a time."""
        first = 0
        if self.table is not None:
            for batch in self.table.select(list(columns)).to_batches(max_chunksize=_BATCH):
                yield first, pa.Table.from_batches([batch])
                first += batch.num_rows
            return
        for part in range(len(self.paths)):
            first = int(self.starts[part])
            for table in self._file_batches(part, columns):
                yield first, table
                first += table.num_rows

    def phash_blocks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for first, block in self.blocks(["phash"]):
            column = block.column("phash")
            valid = ~_np(column.is_null(), True).astype(bool)
            yield first, _np(column, 0).astype(np.uint64), valid

    def take(self, rows: Sequence[int], columns: Sequence[str]) -> dict[int, dict[str, Any]]:
        """``columns`` of these rows by row id (a folder's partitions: only their row groups are read)."""
        rows = np.unique(np.asarray(list(rows), np.int64))
        if not len(rows):
            return {}
        if self.table is not None:
            taken = self.table.select(list(columns)).take(pa.array(rows, pa.int64())).to_pylist()
            return dict(zip(rows.tolist(), taken, strict=True))
        out: dict[int, dict[str, Any]] = {}
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(which).tolist():
            local = rows[which == part] - self.starts[part]
            meta = pq.ParquetFile(self.paths[part]).metadata
            ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            in_group = np.searchsorted(ends, local, side="right")
            for g in np.unique(in_group).tolist():
                offset = int(ends[g - 1]) if g else 0
                wanted = local[in_group == g] - offset
                for table in self._file_batches(part, columns, g):
                    lo, hi = np.searchsorted(wanted, [0, table.num_rows])
                    if hi > lo:
                        taken = table.take(pa.array(wanted[lo:hi], pa.int64())).to_pylist()
                        ids = (wanted[lo:hi] + offset + self.starts[part]).tolist()
                        out.update(zip(ids, taken, strict=True))
                    wanted = wanted - table.num_rows
                    offset += table.num_rows
                    if not len(wanted) or wanted[-1] < 0:
                        break
        return out


def _thumbnails(
    rows: Sequence[int], keys: list[Any], shards: list[Any], folder: str | Path, limits: ReportLimits
) -> tuple[dict[int, bytes], int]:
    """Thumbnails of ``rows`` (their keys and shard names given), and how many tars were read."""
    wanted = {(str(s), str(k)): r for r, k, s in zip(rows, keys, shards, strict=True) if s and k is not None}
    reader = ShardImages(folder)
    images = reader.read(wanted, max_tars=limits.max_tars)
    out = {}
    for ident, data in images.items():
        try:
            out[wanted[ident]] = thumbnail(data, limits.thumbnail_size, "JPEG")
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for undecodable bytes
            log.warning("dedup report: no thumbnail for %s/%s: %s", ident[0], ident[1], exc)
    return out, reader.tars_read


def image_section(
    table: Source,
    summary: Mapping[str, Any],
    cfg: ImageDedupConfig,
    *,
    embeddings: str | Path | None = None,
    vectors: np.ndarray | None = None,
    meta: pa.Table | None = None,
    shards: str | Path | None = None,
    limits: ReportLimits = ReportLimits(),
) -> ImageSection:
    """The image part of the report: the borderline search and the thumbnails read from the shards.

    ``table`` is the image table in memory or its parquet file; either way it is read a batch at a
    time (:class:`_ImageScan`). ``meta`` (key, phash; row-aligned) and ``vectors`` (unit float32) spare
    reading them again when the caller has them; otherwise they are read from ``embeddings``: the
    pHashes a block at a time, keys and shard names of the shown rows only, the embeddings
    memory-mapped, only the rows searched.
    """
    passes = summary.get("passes") or {}
    semantic = passes.get(METHOD_SEMANTIC) or {}
    section = ImageSection(
        table=table if isinstance(table, pa.Table) else None,
        rows=int(summary.get("rows") or 0),
        phash_max_distance=cfg.phash_max_distance if cfg.phash else None,
        semantic_threshold=cfg.semantic_threshold if cfg.semantic != "off" else None,
        semantic_ran="pairs" in semantic,
        semantic_note=str(semantic.get("skipped", "")),
        passes=passes,
    )
    near = {}
    if section.phash_max_distance is not None:
        near[METHOD_PHASH] = (section.phash_max_distance, limits.phash_window)
    if section.semantic_threshold is not None:
        near[METHOD_SEMANTIC] = (section.semantic_threshold, limits.semantic_window)
    scan = _ImageScan(table, limits, near)
    section.digest = scan.digest
    source = _Metadata(embeddings, meta) if meta is not None or embeddings is not None else None
    if source is None:
        scan.select()
        section.thumbnails_note = "No embedding folder: no borderline search and no thumbnails."
        return section
    n = source.n
    section.rows = section.rows or n
    queries = _sample_range(n, limits.sample_rows, limits.seed)
    found: list[tuple[str, int, int, float, str]] = []  # method, row, row, value, source
    if section.phash_max_distance is not None and source.has("phash"):
        t = section.phash_max_distance
        pairs, section.nearest[METHOD_PHASH], section.sampling[METHOD_PHASH] = phash_search(
            source.phash_blocks, queries, t, limits
        )
        found += [(METHOD_PHASH, *p, "sample") for p in pairs]
        found += [(METHOD_PHASH, *p, "groups") for p in scan.group_pairs[METHOD_PHASH]]
    if section.semantic_threshold is not None and (vectors is not None or embeddings is not None):
        t = section.semantic_threshold
        pairs, section.nearest[METHOD_SEMANTIC], section.sampling[METHOD_SEMANTIC] = semantic_neighbours(
            EmbeddingRows(embeddings, vectors), queries, t, limits
        )
        found += [(METHOD_SEMANTIC, *p, "sample") for p in pairs]
        if section.semantic_ran:
            found += [(METHOD_SEMANTIC, *p, "groups") for p in scan.group_pairs[METHOD_SEMANTIC]]
    candidates = [
        Pair(
            method=m,
            a=int(a),
            b=int(b),
            a_key="",
            b_key="",
            value=float(v),
            duplicate=bool(
                v <= section.phash_max_distance if m == METHOD_PHASH else v >= section.semantic_threshold
            ),
            source=source_,
        )
        for m, a, b, v, source_ in found
    ]
    section.borderline = pick_borderline(candidates, limits.borderline_per_side)
    pair_rows = sorted({r for p in section.borderline for r in (p.a, p.b)})
    group_of = scan.select(pair_rows)
    _add_keys_and_thumbnails(section, source, embeddings, shards, limits, group_of)
    return section


def _add_keys_and_thumbnails(
    section: ImageSection,
    source: _Metadata,
    embeddings: str | Path | None,
    shards: str | Path | None,
    limits: ReportLimits,
    group_of: Mapping[int, int],
) -> None:
    """Keys of the borderline pairs' rows, and thumbnails of every row the page shows (the metadata of
    those rows only)."""
    pair_rows = sorted({r for p in section.borderline for r in (p.a, p.b)})
    largest = section.digest.largest if section.digest is not None else []
    rows = sorted({int(m["row_id"]) for g in largest for m in g} | set(pair_rows))
    with_shards = bool(shards) and source.has("shard")
    meta = source.take(rows if shards else pair_rows, ["key", "shard"] if with_shards else ["key"])
    section.borderline = [
        dataclasses.replace(
            p,
            a_key=str((meta.get(p.a) or {}).get("key", p.a)),
            b_key=str((meta.get(p.b) or {}).get("key", p.b)),
            same_group=group_of.get(p.a, -1) == group_of.get(p.b, -2),
        )
        for p in section.borderline
    ]
    if not shards:
        section.thumbnails_note = (
            "No shard folder was given (--shards): groups and pairs are shown without pictures."
        )
        return
    if with_shards:
        shard_of = {r: m["shard"] for r, m in meta.items()}
    elif embeddings is not None:
        shard_of = {r: m["shard"] for r, m in _Metadata(embeddings).take(rows, ["shard"]).items()}
    else:
        section.thumbnails_note = (
            "No shard names in the metadata: groups and pairs are shown without pictures."
        )
        return
    keys = [(meta.get(r) or {}).get("key") for r in rows]
    thumbs, tars = _thumbnails(rows, keys, [shard_of.get(r) for r in rows], shards, limits)
    section.thumbnails = thumbs
    if len(thumbs) < len(rows):
        section.thumbnails_note = (
            f"{len(rows) - len(thumbs)} of {len(rows)} pictures could not be read from {shards} "
            f"({tars} tars read, at most {limits.max_tars}): they are drawn as grey boxes."
        )


def _caption_source(
    caption_duplicates: Source,
    captions: pa.Array | pa.ChunkedArray | None,
    embeddings: str | Path | None,
) -> RawCaptions | None:
    """Raw captions row-aligned with the caption table: the given array, or the embedding folder's
    ``caption`` column when its row count matches (read for the chosen rows only)."""
    if captions is not None:
        return lambda rows: captions.take(pa.array(rows, pa.int64()))
    if embeddings is None:
        return None
    source = _Metadata(embeddings)
    rows = (
        caption_duplicates.num_rows
        if isinstance(caption_duplicates, pa.Table)
        else pq.ParquetFile(caption_duplicates).metadata.num_rows
    )
    if source.n != rows:
        return None

    def read(wanted: np.ndarray) -> list[Any]:
        taken = source.take(wanted, ["caption"])
        return [taken[r]["caption"] for r in wanted.tolist()]

    return read


def write_dedup_report(
    path: str | Path,
    *,
    image_duplicates: pa.Table | str | Path | None = None,
    image_summary: Mapping[str, Any] | str | Path | None = None,
    image_cfg: ImageDedupConfig | None = None,
    embeddings: str | Path | None = None,
    vectors: np.ndarray | None = None,
    meta: pa.Table | None = None,
    shards: str | Path | None = None,
    caption_duplicates: pa.Table | str | Path | None = None,
    caption_summary: Mapping[str, Any] | str | Path | None = None,
    caption_cfg: CaptionDedupConfig | None = None,
    captions: pa.Array | pa.ChunkedArray | None = None,
    title: str = "Deduplication report",
    limits: ReportLimits = ReportLimits(),
) -> dict[str, Any]:
    """Write ``dedup_report.html`` for image and/or caption duplicates; returns what it did.

    Memory is bounded whatever N is: tables given as files are read a batch at a time, and of the
    embedding folder only the pHashes (a block at a time), the searched embeddings and the metadata of
    the shown rows are read.

    Args:
        path: the page to write (atomically).
        image_duplicates, caption_duplicates: the tables, or their parquet files.
        image_summary, caption_summary: the dedup summaries (or their JSON files; pairs per pass).
        image_cfg, caption_cfg: the options the tables were made with (thresholds).
        embeddings: the embedding folder the image table was computed from (metadata, embeddings);
            also the raw captions of a bundle's caption table when ``captions`` is not given.
        vectors, meta: the unit embeddings and metadata (key, phash) when the caller has them in memory.
        shards: the img2dataset shards the rows came from (thumbnails); None: no pictures.
        captions: raw captions row-aligned with the caption table.

    Returns:
        ``path``, ``bytes``, ``thumbnails`` and ``seconds``.
    """
    started = time.monotonic()
    images = captions_section = None
    provenance: dict[str, Any] = {"created": datetime.now(UTC).isoformat(timespec="seconds")}
    if image_duplicates is not None:
        cfg = image_cfg or ImageDedupConfig()
        images = image_section(
            image_duplicates,
            _summary(image_summary),
            cfg,
            embeddings=embeddings,
            vectors=vectors,
            meta=meta,
            shards=shards,
            limits=limits,
        )
        provenance.update(
            embeddings=str(embeddings or ""),
            shards=str(shards or ""),
            image_thresholds={
                "phash_max_distance": images.phash_max_distance,
                "semantic_threshold": images.semantic_threshold,
            },
        )
    if caption_duplicates is not None:
        raw = _caption_source(caption_duplicates, captions, embeddings)
        threshold = caption_cfg.threshold if caption_cfg is not None else CaptionDedupConfig().threshold
        captions_section = CaptionSection(
            caption_duplicates if isinstance(caption_duplicates, pa.Table) else None,
            threshold,
            captions,
            _summary(caption_summary),
            digest=caption_digest(caption_duplicates, limits, raw),
        )
        provenance["caption_threshold"] = threshold
    provenance.update(report_version=REPORT_VERSION, sample_seed=limits.seed)
    page = render_dedup_report(images, captions_section, title=title, limits=limits, provenance=provenance)
    data = page.encode("utf-8")
    atomic_write_bytes(path, data)
    done = {
        "path": str(path),
        "bytes": len(data),
        "thumbnails": len(images.thumbnails) if images is not None else 0,
        "seconds": seconds_since(started),
    }
    log.info(
        "dedup report: %s (%d bytes, %d thumbnails, %.1f s)",
        path,
        len(data),
        done["thumbnails"],
        done["seconds"],
    )
    return done
