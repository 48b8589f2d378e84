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
memory-mapped embeddings in chunks). The page says what was sampled.

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
from collections.abc import Iterable, Mapping, Sequence
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
from pipeline.io.embeddings import EmbeddingRows, load_metadata
from pipeline.io.images import ShardImages

log = logging.getLogger(__name__)

REPORT_NAME = "dedup_report.html"
#: Version of the page's content; part of the bundle's report step fingerprint.
REPORT_VERSION = 1
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
        table: ``image_duplicates.parquet`` (:mod:`pipeline.dedup.image`), any size.
        rows: images examined (N).
        phash_max_distance / semantic_threshold: thresholds (None: that pass is off).
        semantic_ran: whether the semantic pass ran; ``semantic_note`` says why not.
        passes: the dedup summary's ``passes`` (pairs per pass, or why it was skipped).
        borderline: :class:`Pair` s near the thresholds (at most ``borderline_per_side`` per side shown).
        nearest: per pass, each sampled row's distance (pHash) or cosine (semantic) to its nearest other row.
        sampling: per pass, how the borderline search sampled (``queries``, ``reference``, ``seconds``).
        thumbnails: encoded thumbnail per row id (missing ones are drawn as grey boxes).
        thumbnails_note: why there are no thumbnails, if there are none.
    """

    table: pa.Table
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


@dataclass
class CaptionSection:
    """What the report shows about caption duplicates.

    Attributes:
        table: ``caption_duplicates.parquet`` (:mod:`pipeline.dedup.caption`): one row per input row.
        threshold: the Jaccard threshold.
        captions: the raw captions, row-aligned with ``table`` (for the variants; optional).
        summary: the caption dedup summary (verified pairs, ...).
    """

    table: pa.Table
    threshold: float = 0.7
    captions: pa.Array | pa.ChunkedArray | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Selections shared by the page and the writer (which thumbnails to read).
# ----------------------------------------------------------------------------------------------


def _np(column: pa.ChunkedArray | pa.Array, fill: Any = None) -> np.ndarray:
    if fill is not None:
        column = pc.fill_null(column, fill)
    return column.to_numpy(zero_copy_only=False) if len(column) else np.zeros(0)


def largest_groups(table: pa.Table, limits: ReportLimits) -> list[list[dict[str, Any]]]:
    """The ``limits.groups`` largest image groups (ties: smallest group id), each as its shown members:
    the representative, then the weakest links (transitive first, then the largest pHash distance,
    then the lowest cosine), at most ``limits.members``."""
    if table.num_rows == 0 or limits.groups < 1:
        return []
    is_rep = _np(table.column("is_representative"), False).astype(bool)
    rep_rows = np.flatnonzero(is_rep)
    sizes = _np(table.column("group_size"), 0)[rep_rows]
    gids = _np(table.column("group_id"), -1)[rep_rows]
    chosen = gids[np.lexsort((gids, -sizes))[: limits.groups]]
    sub = table.filter(pc.is_in(table.column("group_id"), value_set=pa.array(chosen, pa.int64())))
    g = _np(sub.column("group_id"), -1)
    order = np.lexsort(
        (
            _np(sub.column("row_id"), 0),
            _np(sub.column("similarity"), 2.0),
            -_np(sub.column("hamming_distance"), -1).astype(np.int64),
            _np(sub.column("method")) != METHOD_TRANSITIVE,
            ~_np(sub.column("is_representative"), False).astype(bool),
            g,
        )
    )
    g_sorted = g[order]
    groups = []
    for gid in chosen.tolist():
        lo = int(np.searchsorted(g_sorted, gid, side="left"))
        hi = int(np.searchsorted(g_sorted, gid, side="right"))
        take = order[lo : min(hi, lo + limits.members)]
        groups.append(sub.take(pa.array(take, pa.int64())).to_pylist())
    return groups


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


def _sample(candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` of ``candidates`` (all when fewer), seeded, in their order."""
    if len(candidates) <= k:
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, k, replace=False))


def size_buckets(series: Mapping[str, np.ndarray]) -> tuple[list[str], dict[str, list[int]]]:
    """Group sizes counted in buckets 2, 3, 4, 5-8, 9-16, ... (doubling above 4), per series."""
    largest = max([int(s.max()) for s in series.values() if len(s)] + [4])
    edges = [2, 3, 4, 5]
    while edges[-1] <= largest:
        edges.append((edges[-1] - 1) * 2 + 1)
    labels = [str(a) if b - a == 1 else f"{a}–{b - 1}" for a, b in itertools.pairwise(edges)]
    counts = {}
    for name, sizes in series.items():
        which = np.searchsorted(edges, sizes, side="right") - 1
        counts[name] = np.bincount(which, minlength=len(labels))[: len(labels)].tolist()
    return labels, counts


@dataclass
class _Page:
    """The sections and their whole-table statistics (computed once, vectorised)."""

    images: ImageSection | None
    captions: CaptionSection | None
    limits: ReportLimits
    image_stats: dict[str, Any] = field(default_factory=dict)
    caption_stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images is not None:
            table = self.images.table
            is_rep = _np(table.column("is_representative"), False).astype(bool)
            methods = pc.value_counts(table.column("method")).to_pylist() if table.num_rows else []
            linked_by = table.column("linked_by")
            self.image_stats = {
                "groups": int(is_rep.sum()),
                "rows_in_groups": table.num_rows,
                "removable": int(table.num_rows - is_rep.sum()),
                "is_rep": is_rep,
                "group_sizes": _np(table.column("group_size"), 0)[is_rep].astype(np.int64),
                "methods": {m["values"]: int(m["counts"]) for m in methods},
                "linked": {
                    name: int(pc.sum(pc.match_substring(linked_by, name)).as_py() or 0)
                    if table.num_rows
                    else 0
                    for name in PASSES
                },
            }
        if self.captions is not None:
            gid = _np(self.captions.table.column("group_id"), -1).astype(np.int64)
            size = _np(self.captions.table.column("group_size"), 1).astype(np.int64)
            dup = size > 1
            reps = dup & (gid == np.arange(len(gid)))
            self.caption_stats = {
                "rows": len(gid),
                "groups": int(reps.sum()),
                "rows_in_groups": int(dup.sum()),
                "removable": int(dup.sum() - reps.sum()),
                "group_sizes": size[reps],
                "reps": np.flatnonzero(reps),
                "removable_rows": np.flatnonzero(dup & ~reps),
                "gid": gid,
            }


def _card(css_id: str, title: str, removable: int, detail: str) -> str:
    return (
        f'<div class="card" id="{css_id}"><h3>{title}</h3>'
        f'<div class="big">{removable:,} removable</div><div>{detail}</div></div>'
    )


def _cards(page: _Page) -> str:
    cards = []
    if page.images is not None:
        s = page.image_stats
        detail = f"{page.images.rows:,} images · {s['groups']:,} groups · {s['rows_in_groups']:,} in groups"
        cards.append(_card("card-images", "Images", s["removable"], detail))
    if page.captions is not None:
        s = page.caption_stats
        detail = f"{s['rows']:,} rows · {s['groups']:,} groups · {s['rows_in_groups']:,} in groups"
        cards.append(_card("card-captions", "Captions", s["removable"], detail))
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
    if page.images is not None:
        images, s = page.images, page.image_stats
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
                f"{td(_pass_status(images, name), css='status')}{td(pairs)}{td(s['linked'][name])}"
                f"{td(s['methods'].get(name, 0))}</tr>"
            )
        rows.append(
            f'<tr id="pass-transitive">{td(METHOD_TRANSITIVE, css="text")}'
            f"{td('through other members')}{td('–')}{td(None)}{td(None)}"
            f"{td(s['methods'].get(METHOD_TRANSITIVE, 0))}</tr>"
        )
    if page.captions is not None:
        captions, s = page.captions, page.caption_stats
        rows.append(
            f'<tr id="pass-caption">{td(CAPTION, css="text")}{td(f"Jaccard ≥ {captions.threshold:g}")}'
            f"{td('ran')}{td(captions.summary.get('verified_pairs'))}{td(s['rows_in_groups'])}{td(None)}</tr>"
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
        name: stats["group_sizes"]
        for name, stats in (("image groups", page.image_stats), ("caption groups", page.caption_stats))
        if stats
    }
    if sizes:
        labels, series = size_buckets(sizes)
        svg = bar_chart_svg(labels, series, "members per group", width=CHART_WIDTH)
        out.append(f'<div class="chart" id="hist-group-sizes"><h3>Group sizes</h3>{svg}</div>')
    if page.images is not None:
        images, table = page.images, page.images.table
        members = ~page.image_stats["is_rep"]
        if images.phash_max_distance is not None:
            distance = _np(table.column("hamming_distance"), -1)[members] if table.num_rows else np.zeros(0)
            out.append(_distance_histogram(images, METHOD_PHASH, distance[distance >= 0]))
        if images.semantic_threshold is not None:
            cosine = _np(table.column("similarity"), np.nan)[members] if table.num_rows else np.zeros(0)
            out.append(_distance_histogram(images, METHOD_SEMANTIC, cosine))
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


def _group_strips(images: ImageSection, limits: ReportLimits) -> str:
    groups = largest_groups(images.table, limits)
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
    captions, s, limits = page.captions, page.caption_stats, page.limits
    if captions is None or not len(s["reps"]):
        return []
    order = np.lexsort((s["reps"], -s["group_sizes"]))[: limits.caption_groups]
    chosen = s["reps"][order]
    normalized = _take(captions.table.column("normalized_caption"), chosen)
    keys = _take(captions.table.column("key"), chosen)
    variants: dict[int, list[tuple[str, int]]] = {int(g): [] for g in chosen}
    if captions.captions is not None:
        members = np.flatnonzero(np.isin(s["gid"], chosen))
        raw = pa.table({"g": pa.array(s["gid"][members]), "c": _take(captions.captions, members)})
        counted = raw.group_by(["g", "c"]).aggregate([([], "count_all")]).to_pylist()
        for row in sorted(counted, key=lambda r: (r["g"], -r["count_all"], str(r["c"]))):
            if len(variants[row["g"]]) < limits.variants:
                variants[row["g"]].append((row["c"], row["count_all"]))
    return [
        {
            "group_id": g,
            "key": keys[i],
            "size": int(s["group_sizes"][order[i]]),
            "normalized": normalized[i],
            "variants": variants[g],
        }
        for i, g in enumerate(chosen.tolist())
    ]


def _caption_table(page: _Page) -> str:
    groups = caption_groups(page)
    if not groups:
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
        f'<p class="sub">The {len(groups)} largest of {page.caption_stats["groups"]:,} groups, with up to '
        f"{page.limits.variants} of their most frequent raw captions.</p>"
        + table_html("caption-group-table", headers, rows)
    )


def _removable(page: _Page) -> str:
    out, limits = [], page.limits
    if page.images is not None:
        table = page.images.table
        nonrep = np.flatnonzero(~page.image_stats["is_rep"])
        picked = table.take(pa.array(_sample(nonrep, limits.removable, limits.seed), pa.int64())).to_pylist()
        rows = [
            f"<tr>{td(_short(r['key'], KEY_CHARS))}{td(r['row_id'])}"
            f"{td(_short(r['representative_key'], KEY_CHARS))}{td(r['group_size'])}{td(r['method'])}"
            f"{td(r['hamming_distance'])}{td(r['similarity'], 3)}</tr>"
            for r in picked
        ]
        headers = ("key", "row id", "kept representative", "group size", "method", "pHash distance", "cosine")
        out.append(
            f"<h3>Images: {page.image_stats['removable']:,} removable rows</h3>"
            '<p class="sub">Every group member but its representative (the largest image; ties: the '
            f"smallest key). A seeded sample of {len(picked)}:</p>"
            + table_html("removable-images", headers, rows)
        )
    if page.captions is not None:
        table, gid = page.captions.table, page.caption_stats["gid"]
        picked = _sample(page.caption_stats["removable_rows"], limits.removable, limits.seed)
        columns = zip(
            _take(table.column("key"), picked),
            picked.tolist(),
            _take(table.column("key"), gid[picked]),
            _take(table.column("group_size"), picked),
            _take(table.column("normalized_caption"), picked),
            strict=True,
        )
        rows = [
            f"<tr>{td(_short(k, KEY_CHARS))}{td(i)}{td(_short(rk, KEY_CHARS))}{td(n)}"
            f"{td(_short(c, TEXT_CHARS), css='text')}</tr>"
            for k, i, rk, n, c in columns
        ]
        headers = ("key", "row", "kept row's key", "group size", "normalised caption")
        out.append(
            f"<h3>Captions: {page.caption_stats['removable']:,} removable rows</h3>"
            f'<p class="sub">Every group member but its first row. A seeded sample of {len(picked)}:</p>'
            + table_html("removable-captions", headers, rows)
        )
    return "".join(out)


def _sampling_note(page: _Page) -> str:
    items, limits = [], page.limits
    if page.images is not None:
        images, groups = page.images, page.image_stats["groups"]
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
        if images.thumbnails_note:
            items.append(images.thumbnails_note)
    if page.captions is not None:
        groups = page.caption_stats["groups"]
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
        body.append(f'<h2 id="image-groups">Largest image groups</h2>{_group_strips(images, limits)}')
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


def phash_neighbours(
    hashes: np.ndarray, valid: np.ndarray, queries: np.ndarray, threshold: int, limits: ReportLimits
) -> tuple[list[tuple[int, int, int]], np.ndarray, dict[str, Any]]:
    """Pairs at Hamming distance ``threshold ± limits.phash_window`` between sampled ``queries`` and
    the reference rows, and each query's distance to its nearest other row.

    Rows without a hash, or with the flat hash 0, are left out (as in the pHash pass). The reference
    is every hashed row, or a seeded sample of ``phash_comparisons / len(queries)`` of them; it is
    compared in chunks of XOR + popcount, so memory stays at about 64 MB.
    """
    started = time.monotonic()
    hashes = np.asarray(hashes, np.uint64)
    usable = np.asarray(valid, bool) & (hashes != 0)
    queries = queries[usable[queries]]
    rows = np.flatnonzero(usable)
    info: dict[str, Any] = {"queries": len(queries), "reference": 0}
    if len(queries) == 0 or len(rows) < 2:
        return [], np.zeros(0, np.int64), {**info, "seconds": seconds_since(started)}
    budget = max(1, limits.phash_comparisons // len(queries))
    reference = rows if len(rows) <= budget else np.sort(_sample(rows, budget, limits.seed + 1))
    info["reference"] = len(reference)
    lo_v, hi_v = max(0, threshold - limits.phash_window), threshold + limits.phash_window
    chunk = max(1, 8_000_000 // len(queries))
    q = hashes[queries]
    nearest = np.full(len(queries), 255, np.uint8)
    found: dict[int, list[tuple[int, int, int]]] = {v: [] for v in range(lo_v, hi_v + 1)}
    for start in range(0, len(reference), chunk):
        ref = reference[start : start + chunk]
        d = np.bitwise_count(q[:, None] ^ hashes[ref][None, :])  # uint8 (S, chunk)
        pos = np.minimum(np.searchsorted(ref, queries), len(ref) - 1)
        itself = np.flatnonzero(ref[pos] == queries)
        d[itself, pos[itself]] = 255  # a row is not its own neighbour
        np.minimum(nearest, d.min(axis=1), out=nearest)
        window = (d - np.uint8(lo_v)) <= np.uint8(hi_v - lo_v)  # lo_v <= d <= hi_v (uint8 wraps below)
        if not window.any():  # the usual case: a scan of the mask is far cheaper than nonzero
            continue
        qi, ri = np.divmod(np.flatnonzero(window), window.shape[1])
        values = d[qi, ri]
        for v in np.unique(values).tolist():
            room = _KEEP_PER_VALUE - len(found[v])
            if room > 0:
                sel = np.flatnonzero(values == v)[:room]
                found[v].extend(
                    zip(queries[qi[sel]].tolist(), ref[ri[sel]].tolist(), [v] * len(sel), strict=True)
                )
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
    chunk = max(1, 2**25 // max(1, fetch.dim))  # 128 MB of float32 per chunk
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


def group_pairs(
    table: pa.Table, method: str, threshold: float, window: float
) -> list[tuple[int, int, float]]:
    """Members linked directly to their representative by ``method`` within ``window`` of its threshold:
    (representative row, member row, distance or cosine); these are duplicates a sample rarely meets."""
    if table.num_rows == 0:
        return []
    methods = _np(table.column("method"))
    if method == METHOD_PHASH:
        values = _np(table.column("hamming_distance"), -1).astype(np.float64)
        near = (values >= threshold - window) & (values <= threshold)
    else:
        values = _np(table.column("similarity"), np.nan).astype(np.float64)
        near = (values >= threshold) & (values <= threshold + window)
    hits = np.flatnonzero(near & (methods == method))[:_KEEP_PER_SIDE]
    reps = _np(table.column("group_id"))[hits]
    rows = _np(table.column("row_id"))[hits]
    return list(zip(reps.tolist(), rows.tolist(), values[hits].tolist(), strict=True))


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


def _table(source: pa.Table | str | Path) -> pa.Table:
    return source if isinstance(source, pa.Table) else pq.read_table(source)


def _summary(source: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if source is None or isinstance(source, Mapping):
        return dict(source or {})
    try:
        return json.loads(Path(source).read_text())
    except (OSError, ValueError):
        return {}


def _take(column: pa.ChunkedArray, rows: Sequence[int]) -> list[Any]:
    return column.take(pa.array(list(rows), pa.int64())).to_pylist() if len(rows) else []


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
    table: pa.Table,
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

    ``meta`` (key, phash; row-aligned) and ``vectors`` (unit float32) spare reading them again when the
    caller has them; otherwise they are read from ``embeddings`` (the embeddings memory-mapped, only
    the rows searched).
    """
    passes = summary.get("passes") or {}
    semantic = passes.get(METHOD_SEMANTIC) or {}
    section = ImageSection(
        table=table,
        rows=int(summary.get("rows") or 0),
        phash_max_distance=cfg.phash_max_distance if cfg.phash else None,
        semantic_threshold=cfg.semantic_threshold if cfg.semantic != "off" else None,
        semantic_ran="pairs" in semantic,
        semantic_note=str(semantic.get("skipped", "")),
        passes=passes,
    )
    if meta is None and embeddings is not None:
        meta = load_metadata(embeddings, ["key", "phash"])
    if meta is None:
        section.thumbnails_note = "No embedding folder: no borderline search and no thumbnails."
        return section
    n = meta.num_rows
    section.rows = section.rows or n
    queries = _sample_range(n, limits.sample_rows, limits.seed)
    found: list[tuple[str, int, int, float, str]] = []  # method, row, row, value, source
    if section.phash_max_distance is not None and "phash" in meta.column_names:
        column = meta.column("phash")
        valid = ~_np(column.is_null(), True).astype(bool) if n else np.zeros(0, bool)
        hashes = _np(column, 0).astype(np.uint64) if n else np.zeros(0, np.uint64)
        t = section.phash_max_distance
        pairs, section.nearest[METHOD_PHASH], section.sampling[METHOD_PHASH] = phash_neighbours(
            hashes, valid, queries, t, limits
        )
        found += [(METHOD_PHASH, *p, "sample") for p in pairs]
        found += [
            (METHOD_PHASH, *p, "groups") for p in group_pairs(table, METHOD_PHASH, t, limits.phash_window)
        ]
    if section.semantic_threshold is not None and (vectors is not None or embeddings is not None):
        t = section.semantic_threshold
        pairs, section.nearest[METHOD_SEMANTIC], section.sampling[METHOD_SEMANTIC] = semantic_neighbours(
            EmbeddingRows(embeddings, vectors), queries, t, limits
        )
        found += [(METHOD_SEMANTIC, *p, "sample") for p in pairs]
        if section.semantic_ran:
            found += [
                (METHOD_SEMANTIC, *p, "groups")
                for p in group_pairs(table, METHOD_SEMANTIC, t, limits.semantic_window)
            ]
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
            source=source,
        )
        for m, a, b, v, source in found
    ]
    section.borderline = pick_borderline(candidates, limits.borderline_per_side)
    _add_keys_and_thumbnails(section, meta, embeddings, shards, limits)
    return section


def _groups_of(table: pa.Table, rows: Sequence[int]) -> dict[int, int]:
    """Image group id of each of ``rows`` that is in a group."""
    if not rows or table.num_rows == 0:
        return {}
    hit = table.filter(pc.is_in(table.column("row_id"), value_set=pa.array(list(rows), pa.int64())))
    return dict(zip(hit.column("row_id").to_pylist(), hit.column("group_id").to_pylist(), strict=True))


def _add_keys_and_thumbnails(
    section: ImageSection,
    meta: pa.Table,
    embeddings: str | Path | None,
    shards: str | Path | None,
    limits: ReportLimits,
) -> None:
    """Keys of the borderline pairs' rows, and thumbnails of every row the page shows."""
    pair_rows = sorted({r for p in section.borderline for r in (p.a, p.b)})
    key_of = dict(zip(pair_rows, _take(meta.column("key"), pair_rows), strict=True))
    group_of = _groups_of(section.table, pair_rows)
    section.borderline = [
        dataclasses.replace(
            p,
            a_key=str(key_of.get(p.a, p.a)),
            b_key=str(key_of.get(p.b, p.b)),
            same_group=group_of.get(p.a, -1) == group_of.get(p.b, -2),
        )
        for p in section.borderline
    ]
    rows = sorted(
        {int(m["row_id"]) for g in largest_groups(section.table, limits) for m in g} | set(pair_rows)
    )
    if not shards:
        section.thumbnails_note = (
            "No shard folder was given (--shards): groups and pairs are shown without pictures."
        )
        return
    if "shard" in meta.column_names:
        shard_column = meta.column("shard")
    elif embeddings is not None:
        shard_column = load_metadata(embeddings, ["shard"]).column("shard")
    else:
        section.thumbnails_note = (
            "No shard names in the metadata: groups and pairs are shown without pictures."
        )
        return
    thumbs, tars = _thumbnails(
        rows, _take(meta.column("key"), rows), _take(shard_column, rows), shards, limits
    )
    section.thumbnails = thumbs
    if len(thumbs) < len(rows):
        section.thumbnails_note = (
            f"{len(rows) - len(thumbs)} of {len(rows)} pictures could not be read from {shards} "
            f"({tars} tars read, at most {limits.max_tars}): they are drawn as grey boxes."
        )


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
            _table(image_duplicates),
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
        table = _table(caption_duplicates)
        if captions is None and embeddings is not None:
            raw = load_metadata(embeddings, ["caption"]).column("caption")
            captions = raw if len(raw) == table.num_rows else None
        threshold = caption_cfg.threshold if caption_cfg is not None else CaptionDedupConfig().threshold
        captions_section = CaptionSection(table, threshold, captions, _summary(caption_summary))
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
