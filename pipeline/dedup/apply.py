"""Acting on duplicates: a keep-list, a drop-list and, optionally, a filtered copy of the shards.

Input: the img2dataset shards the duplicate tables describe, ``image_duplicates.parquet``
(:mod:`pipeline.dedup.image`) and/or ``caption_duplicates.parquet`` (:mod:`pipeline.dedup.caption`),
and optionally the embedding folder the tables were computed from (its metadata names the rows that
were embedded and gives their url, width and height). ``jobs/apply_dedup.py --bundle`` takes all of
them from a bundle.

**Rows.** Every row of every shard, as :func:`pipeline.io.shards.read_shard` (and so ingest) sees it:
the tar's samples, then the URLs the shard's parquet lists that the tar does not hold (failed
downloads), in shard-name order. A row is *embedded* when its key is in the embedding metadata (or,
without ``--embeddings``, when it was read without error and its image decodes as ingest decodes
it); only embedded rows are in the dedup tables. Keys must be unique over the shards, since the
tables name rows by key.

**Groups.** Image groups (``group_id`` of ``image_duplicates.parquet``) by default; with
``captions`` also caption groups (``group_size > 1`` in ``caption_duplicates.parquet``). Both kinds
are joined into connected components over keys: an image group and a caption group that share a
row become one group, which keeps one row. Table rows whose key is not an embedded row of the
shards (tables made from other data) are counted as ``unmatched_table_keys`` and ignored.

**Policy** (recomputed per group; it may pick another row than the table's ``representative_key``):

* ``largest`` (default): most pixels (width * height; from the metadata, else the image header);
* ``earliest``: the smallest key (img2dataset's keys are zero-padded, so the first downloaded);
* ``score``: the highest value of ``score_column`` (a numeric column of the shard parquet, else of
  the embedding metadata; a missing value ranks lowest).

Ties go to the smallest key. **Reasons**, one per row (``reason`` column):

=============================  =======  =============================================================
reason                         list     meaning
=============================  =======  =============================================================
``kept:representative``        keep     the row its duplicate group keeps
``kept:unique``                keep     an embedded row in no duplicate group
``image_duplicate_of:KEY``     drop     in KEY's image group; KEY is kept
``caption_duplicate_of:KEY``   drop     in KEY's caption group (not its image group); KEY is kept
``duplicate_of:KEY``           drop     joined to KEY only through other rows (image and caption links)
``dropped:rejected``           drop     never embedded: failed download, unreadable or undecodable
                                        image (ingest's rejected rows); no usable sample to keep
=============================  =======  =============================================================

So rows seen = kept + dropped, per shard and in total, and the summary counts each reason (the
part before ``:KEY``).

**Outputs** (``out``): ``keep_list.parquet`` and ``drop_list.parquet``, in input order, both with
:data:`SCHEMA`: ``key``, ``url``, ``reason``, ``group`` (input row number of the group's first
row; null outside duplicate groups), ``representative`` (key of the row the group keeps; the row's
own key for kept rows, null for rejected ones), ``group_size`` (1 for unique rows, null for
rejected), ``shard`` and ``policy_value`` (pixels or score the policy ranked by; null for
``earliest``). The keep-list's ``key`` column is what NeMo Curator or an img2dataset user filters
with. With ``filter_shards``, ``out/shards/`` holds one shard per input shard, same names: the tar
with only the kept samples (every file of the sample, written as ``KEY.EXT``), the parquet with only
their rows (all columns), and ``_stats.json`` (written last) with img2dataset's counts of the kept
rows and an ``apply_dedup`` entry (source count, kept, dropped, policy). And
``apply_dedup_summary.json``.

**Resuming.** One :class:`~pipeline.core.stage.Stage` (marker ``apply_dedup.done.json``) whose
fingerprint is the result options and the signatures (names, sizes, mtimes) of the shards, tables
and metadata: a re-run over unchanged inputs writes nothing; another policy recomputes. Every file
is written atomically; shard files of an earlier run that this run does not produce are removed.
Runs in one process without Ray: it reads each shard once (twice with ``filter_shards``).
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.core.config import ApplyDedupConfig, result_options
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import (
    atomic_write_json,
    atomic_write_table,
    files_signature,
    publish_tmp,
    unique_tmp_path,
)
from pipeline.dedup.union_find import component_sizes, connected_components
from pipeline.io.decode import decode_image
from pipeline.io.embeddings import folder_signature, list_partitions, load_metadata, metadata_path
from pipeline.io.shards import (
    STATS_SUFFIX,
    Shard,
    check_after_read,
    complete_shards,
    iter_tar_samples,
    list_shards,
    read_shard,
    read_stats,
)

log = logging.getLogger(__name__)

STAGE_NAME = "apply_dedup"
KEEP_LIST = "keep_list.parquet"
DROP_LIST = "drop_list.parquet"
SUMMARY_NAME = "apply_dedup_summary.json"
SHARDS_DIR = "shards"
SCHEMA_VERSION = 1
POLICIES = ("largest", "earliest", "score")

KEPT_REPRESENTATIVE = "kept:representative"
KEPT_UNIQUE = "kept:unique"
DROPPED_REJECTED = "dropped:rejected"
IMAGE_DUPLICATE_OF = "image_duplicate_of"
CAPTION_DUPLICATE_OF = "caption_duplicate_of"
DUPLICATE_OF = "duplicate_of"
#: Every reason kind, in the order the summary lists them (drop reasons carry ``:KEY`` in the lists).
REASONS = (
    KEPT_REPRESENTATIVE,
    KEPT_UNIQUE,
    IMAGE_DUPLICATE_OF,
    CAPTION_DUPLICATE_OF,
    DUPLICATE_OF,
    DROPPED_REJECTED,
)
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("reason", pa.string()),
        ("group", pa.int64()),
        ("representative", pa.string()),
        ("group_size", pa.int64()),
        ("shard", pa.string()),
        ("policy_value", pa.float64()),
    ]
)
#: How often (seconds) a long run logs its progress over the shards.
LOG_EVERY_S = 10.0


def reason_kind(reason: str) -> str:
    """``image_duplicate_of:KEY`` -> ``image_duplicate_of``; ``kept:...`` / ``dropped:...`` unchanged."""
    return reason if reason.startswith(("kept:", "dropped:")) else reason.split(":", 1)[0]


# ----------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------


def check_config(cfg: ApplyDedupConfig) -> None:
    """Clear errors for options and input combinations the stage cannot run with."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"apply_dedup.policy must be one of {', '.join(POLICIES)}; got {cfg.policy!r}")
    if cfg.policy == "score" and not cfg.score_column:
        raise ValueError("apply_dedup.policy 'score' needs --score-column (a numeric column, e.g. aesthetic)")
    if not (cfg.images or cfg.captions):
        raise ValueError("nothing to act on: --no-images without --captions")
    if cfg.images and not cfg.image_duplicates:
        raise ValueError(
            "--image-duplicates (or --bundle) is required to act on image groups; with only a caption "
            "table pass --no-images --captions"
        )
    if cfg.captions and not cfg.caption_duplicates:
        raise ValueError("--captions needs --caption-duplicates (or --bundle)")
    if not cfg.shards:
        raise ValueError("--shards (or --bundle) is required: every row of the shards is accounted for")
    if not cfg.out:
        raise ValueError("--out is required")
    used = {"image": cfg.image_duplicates if cfg.images else "", "caption": cfg.caption_duplicates}
    for label, path in used.items():
        if path and (label == "image" or cfg.captions) and not Path(path).is_file():
            raise FileNotFoundError(f"{label} duplicate table {path} does not exist")
    shards, out = Path(cfg.shards).resolve(), Path(cfg.out).resolve()
    if out == shards or out / SHARDS_DIR == shards:
        raise ValueError(
            f"--out {cfg.out} would write into the input shards {cfg.shards}: choose another output folder"
        )


def input_shards(cfg: ApplyDedupConfig) -> list[Shard]:
    """The shards to account for; all of them must be complete (a filtered copy holds every shard).

    Raises:
        FileNotFoundError: no shard folder, or no shards in it.
        ValueError: shards without a finished ``_stats.json`` (with ``require_stats``).
    """
    shards, incomplete = complete_shards(list_shards(cfg.shards), cfg.require_stats)
    if incomplete:
        raise ValueError(
            f"shards {incomplete[:10]} in {cfg.shards} are incomplete (no finished {STATS_SUFFIX}): finish "
            f"the download, remove them, or pass --no-require-stats for shards written by other tools"
        )
    return shards


@dataclass
class Rows:
    """Every row of the shards, in input order, with what the policy and the lists need."""

    keys: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    embedded: list[bool] = field(default_factory=list)
    pixels: list[int] = field(default_factory=list)
    per_shard: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (first row, rows)


def _header_pixels(data: bytes | None) -> int:
    """width * height from the image header alone (no pixel decoding); 0 when unreadable."""
    if not data:
        return 0
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return 0
    return int(width) * int(height)


@dataclass(frozen=True)
class Metadata:
    """The embedding folder's metadata, by key: which rows were embedded, their url and size."""

    row_of: dict[str, int]
    urls: list[str | None]
    pixels: np.ndarray  # int64; -1 where width or height is missing
    partitions: set[str]
    shard_names: set[str]


def read_metadata(folder: str) -> Metadata:
    meta = load_metadata(folder, ["key", "url", "width", "height", "shard"])
    keys = meta.column("key").cast(pa.string()).to_pylist()
    width = meta.column("width").cast(pa.int64()).fill_null(-1).to_numpy()
    height = meta.column("height").cast(pa.int64()).fill_null(-1).to_numpy()
    pixels = np.where((width >= 0) & (height >= 0), width * height, -1)
    shard_names = {s for s in meta.column("shard").cast(pa.string()).to_pylist() if s}
    return Metadata(
        row_of={key: i for i, key in enumerate(keys)},
        urls=meta.column("url").cast(pa.string()).to_pylist(),
        pixels=pixels,
        partitions={p.name for p in list_partitions(folder)},
        shard_names=shard_names,
    )


def check_metadata_covers(shards: list[Shard], meta: Metadata, folder: str) -> None:
    """Refuse shards the embedding folder never saw (their rows would all count as rejected).

    Only for folders that name their shards (ours: partitions are named after shards, metadata has
    a ``shard`` column); LAION's released metadata does not, and is taken as it is.
    """
    if not meta.shard_names:
        return
    known = meta.partitions | meta.shard_names
    missing = [s.name for s in shards if s.name not in known]
    if missing:
        raise ValueError(
            f"shards {missing[:10]} are not in the embedding folder {folder}: embed them first (or leave "
            f"out --embeddings, and every image is decoded to tell which rows are usable)"
        )


def read_rows(shards: list[Shard], cfg: ApplyDedupConfig, meta: Metadata | None) -> Rows:
    """Read every shard (as ingest does) and note each row's key, url, shard, embedded flag and size.

    Raises:
        ValueError: a shard changed while it was read, or its rows differ from its stats ``count``.
    """
    rows = Rows()
    last_log = time.monotonic()
    for number, shard in enumerate(shards):
        before = shard.signature()
        raw = read_shard(shard, cfg.max_member_bytes)
        problem = check_after_read(shard, before, len(raw))
        if problem is not None:
            raise ValueError(f"shard {shard.name}: {problem}; fix or re-download it, then run again")
        rows.per_shard[shard.name] = (len(rows.keys), len(raw))
        for row in raw:
            key, data = row["key"], row["image"]
            url = row["url"] or ""
            if meta is not None:
                i = meta.row_of.get(key)
                embedded = i is not None and row["read_error"] is None
                pixels = int(meta.pixels[i]) if i is not None else -1
                if pixels < 0:
                    pixels = _header_pixels(data) if embedded else 0
                url = url or (meta.urls[i] if i is not None else None) or ""
            elif row["read_error"] is None:
                decoded = decode_image(data, cfg.max_image_pixels)
                embedded, pixels = decoded.ok, decoded.width * decoded.height
            else:
                embedded, pixels = False, 0
            rows.keys.append(key)
            rows.urls.append(url)
            rows.shards.append(shard.name)
            rows.embedded.append(embedded)
            rows.pixels.append(pixels)
            row["image"] = None  # one shard's bytes at a time
        if time.monotonic() - last_log > LOG_EVERY_S:
            last_log = time.monotonic()
            log.info("apply_dedup: read %d of %d shards (%d rows)", number + 1, len(shards), len(rows.keys))
    return rows


def read_scores(shards: list[Shard], column: str, embeddings: str | None) -> dict[str, float]:
    """key -> value of ``column``, from the shard parquets that have it, else from the metadata.

    Raises:
        ValueError: the column is in neither, or is not numeric.
    """
    tables = [
        pq.read_table(shard.parquet, columns=["key", column])
        for shard in shards
        if shard.parquet is not None and column in pq.read_schema(shard.parquet).names
    ]
    if not tables and embeddings:
        tables = [
            partition.metadata(["key", column])
            for partition in list_partitions(embeddings)
            if column in pq.read_schema(metadata_path(embeddings, partition.name)).names
        ]
    if not tables:
        where = "the shard parquets" + (f" or the metadata of {embeddings}" if embeddings else "")
        raise ValueError(f"score column {column!r} is in none of {where}")
    scores: dict[str, float] = {}
    for table in tables:
        try:
            values = table.column(column).cast(pa.float64()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"score column {column!r} is not numeric: {exc}") from exc
        keys = table.column("key").cast(pa.string()).to_pylist()
        scores.update((k, v) for k, v in zip(keys, values, strict=True) if k is not None and v is not None)
    return scores


# ----------------------------------------------------------------------------------------------
# Groups and the policy.
# ----------------------------------------------------------------------------------------------


def table_groups(
    keys: list[str | None], group_ids: np.ndarray, row_of: dict[str, int], embedded: np.ndarray
) -> tuple[np.ndarray, int]:
    """(per input row: the table's group id or -1, table rows whose key is no embedded input row)."""
    group = np.full(len(embedded), -1, dtype=np.int64)
    unmatched = 0
    for key, gid in zip(keys, group_ids.tolist(), strict=True):
        i = row_of.get(key) if key is not None else None
        if i is None or not embedded[i]:
            unmatched += 1
            continue
        group[i] = gid
    return group, unmatched


def group_pairs(group: np.ndarray) -> np.ndarray:
    """Edges joining every row of each group (ids >= 0) to the group's first row."""
    rows = np.flatnonzero(group >= 0)
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    order = rows[np.argsort(group[rows], kind="stable")]
    ids = group[order]
    starts = np.r_[True, ids[1:] != ids[:-1]]
    first = order[starts][np.cumsum(starts) - 1]
    return np.stack([first, order], axis=1)


def policy_values(policy: str, rows: Rows, scores: dict[str, float] | None) -> np.ndarray:
    """Per row, the value a policy keeps the highest of (float64; NaN where unknown)."""
    if policy == "largest":
        return np.asarray(rows.pixels, dtype=np.float64)
    if policy == "score":
        assert scores is not None
        return np.array([scores.get(key, np.nan) for key in rows.keys], dtype=np.float64)
    return np.full(len(rows.keys), np.nan)


def choose_representatives(labels: np.ndarray, values: np.ndarray, keys: list[str]) -> np.ndarray:
    """Per row, the row its component keeps: the highest value (NaN lowest), then the smallest key."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    key_rank = np.empty(n, dtype=np.int64)
    key_rank[np.argsort(np.asarray(keys, dtype=object), kind="stable")] = np.arange(n)
    rank_value = np.where(np.isnan(values), -np.inf, values)
    order = np.lexsort((key_rank, -rank_value, labels))
    sorted_labels = labels[order]
    starts = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    keep_of_label = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    keep_of_label[sorted_labels[starts]] = order[starts]
    return keep_of_label[labels]


@dataclass(frozen=True)
class Decision:
    """The lists (one table, input order; ``kept`` splits it) and the counts behind the summary."""

    table: pa.Table
    kept: np.ndarray
    groups: int
    rows_in_groups: int
    representatives_changed: int | None


def decide(
    rows: Rows,
    image_group: np.ndarray | None,
    caption_group: np.ndarray | None,
    values: np.ndarray,
    table_representatives: dict[int, str] | None = None,
) -> Decision:
    """Join the groups, keep one row of each by ``values``, and give every row its reason."""
    n = len(rows.keys)
    embedded = np.asarray(rows.embedded, dtype=bool)
    no_group = np.full(n, -1, dtype=np.int64)
    image_group = no_group if image_group is None else image_group
    caption_group = no_group if caption_group is None else caption_group
    pairs = np.concatenate([group_pairs(image_group), group_pairs(caption_group)])
    labels = connected_components(n, pairs)
    sizes = component_sizes(labels)
    keep = choose_representatives(labels, values, rows.keys)

    reasons, groups, representatives, group_sizes = [], [], [], []
    for i in range(n):
        if not embedded[i]:
            reasons.append(DROPPED_REJECTED)
            groups.append(None)
            representatives.append(None)
            group_sizes.append(None)
            continue
        r = int(keep[i])
        size = int(sizes[i])
        group_sizes.append(size)
        groups.append(int(labels[i]) if size > 1 else None)
        representatives.append(rows.keys[r])
        if size == 1:
            reasons.append(KEPT_UNIQUE)
        elif r == i:
            reasons.append(KEPT_REPRESENTATIVE)
        elif image_group[i] >= 0 and image_group[i] == image_group[r]:
            reasons.append(f"{IMAGE_DUPLICATE_OF}:{rows.keys[r]}")
        elif caption_group[i] >= 0 and caption_group[i] == caption_group[r]:
            reasons.append(f"{CAPTION_DUPLICATE_OF}:{rows.keys[r]}")
        else:
            reasons.append(f"{DUPLICATE_OF}:{rows.keys[r]}")
    kept = np.array([reason.startswith("kept:") for reason in reasons], dtype=bool)
    table = pa.table(
        {
            "key": pa.array(rows.keys, pa.string()),
            "url": pa.array(rows.urls, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "group": pa.array(groups, pa.int64()),
            "representative": pa.array(representatives, pa.string()),
            "group_size": pa.array(group_sizes, pa.int64()),
            "shard": pa.array(rows.shards, pa.string()),
            "policy_value": pa.array(values, pa.float64(), mask=np.isnan(values) | ~embedded),
        },
        schema=SCHEMA,
    )
    in_groups = embedded & (sizes > 1)
    changed = None
    if table_representatives is not None:  # image groups whose kept row is not the table's choice
        kept_of_group = {int(image_group[i]): int(keep[i]) for i in np.flatnonzero(image_group >= 0)}
        changed = sum(1 for gid, r in kept_of_group.items() if rows.keys[r] != table_representatives.get(gid))
    return Decision(
        table=table,
        kept=kept,
        groups=len(np.unique(labels[in_groups])),
        rows_in_groups=int(in_groups.sum()),
        representatives_changed=changed,
    )


# ----------------------------------------------------------------------------------------------
# Filtered shards.
# ----------------------------------------------------------------------------------------------


def _write_tar(source: Path, dest: Path, keep: set[str], max_member_bytes: int) -> int:
    """Copy the samples of ``source`` whose key is in ``keep`` (and that read cleanly) to ``dest``."""
    mtime = int(source.stat().st_mtime)
    tmp = unique_tmp_path(dest)
    written = 0
    try:
        with tarfile.open(tmp, "w") as archive:
            for sample in iter_tar_samples(source, max_member_bytes):
                if sample.error is not None or sample.key not in keep:
                    continue
                for ext, data in sample.files.items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), mtime, 0o644
                    archive.addfile(info, io.BytesIO(data))
                written += 1
        publish_tmp(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _stats(source: dict[str, Any], statuses: list[str], rows_seen: int, policy: str) -> dict[str, Any]:
    """img2dataset's ``_stats.json`` for the kept rows: its counts redone, its other fields kept."""
    status_dict = Counter(statuses)
    return {
        **source,
        "count": len(statuses),
        "successes": status_dict.get("success", 0),
        "failed_to_download": sum(1 for s in statuses if s == "failed_to_download"),
        "failed_to_resize": sum(1 for s in statuses if s == "failed_to_resize"),
        "status_dict": dict(status_dict),
        "apply_dedup": {
            "source_count": source.get("count"),
            "rows_seen": rows_seen,
            "kept": len(statuses),
            "dropped": rows_seen - len(statuses),
            "policy": policy,
        },
    }


def filtered_shard_files(shard: Shard, out: Path) -> list[Path]:
    """The files of ``shard``'s filtered copy: the same kinds the source has, under the same names."""
    return [out / path.name for path in (shard.tar, shard.parquet, shard.stats) if path is not None]


def write_filtered_shard(
    shard: Shard, out: Path, keep: list[str], rows_seen: int, cfg: ApplyDedupConfig
) -> None:
    """Write ``shard``'s copy with only the ``keep`` rows: tar, then parquet, then ``_stats.json``.

    Raises:
        RuntimeError: the tar no longer holds every kept sample (it changed during the run).
    """
    keep_set = set(keep)
    if shard.tar is not None:
        written = _write_tar(shard.tar, out / shard.tar.name, keep_set, cfg.max_member_bytes)
        if written != len(keep_set):
            raise RuntimeError(
                f"shard {shard.name}: {written} kept samples copied, {len(keep_set)} expected; "
                f"it changed during the run: run again"
            )
    statuses = ["success"] * len(keep)
    if shard.parquet is not None:
        table = pq.read_table(shard.parquet)
        if "key" not in table.column_names:
            raise ValueError(f"shard {shard.name}: {shard.parquet.name} has no key column to filter by")
        mask = pc.is_in(table.column("key").cast(pa.string()), value_set=pa.array(keep, pa.string()))
        table = table.filter(mask)
        atomic_write_table(out / shard.parquet.name, table)
        if "status" in table.column_names and table.num_rows == len(keep):
            statuses = [s or "success" for s in table.column("status").cast(pa.string()).to_pylist()]
    if shard.stats is not None:
        stats = _stats(read_stats(shard) or {}, statuses, rows_seen, cfg.policy)
        atomic_write_json(out / shard.stats.name, stats)


def remove_stale_shard_files(folder: Path, keep: set[Path]) -> list[str]:
    """Delete shard files in ``folder`` (ours, from an earlier run) that this run does not produce."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path in keep:
            continue
        if path.suffix in (".tar", ".parquet") or path.name.endswith(STATS_SUFFIX):
            path.unlink()
            removed.append(path.name)
    if removed:
        log.warning("apply_dedup: removed %d shard file(s) of an earlier run from %s", len(removed), folder)
    if not any(folder.iterdir()):
        folder.rmdir()
    return removed


# ----------------------------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------------------------


class ApplyDedupStage(Stage):
    """Shards + duplicate tables -> keep-list, drop-list (+ filtered shards) and the summary."""

    name = STAGE_NAME

    def __init__(self, cfg: ApplyDedupConfig):
        check_config(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.shards = input_shards(cfg)
        self.image_table = Path(cfg.image_duplicates) if cfg.images else None
        self.caption_table = Path(cfg.caption_duplicates) if cfg.captions else None
        self.embeddings = cfg.embeddings or None

    def _shard_signatures(self) -> list[Any]:
        return [[s.name, s.signature()] for s in self.shards]

    def fingerprint(self) -> dict[str, Any]:
        """Result options and the signatures of every input: shards, tables, embedding metadata."""
        return {
            "schema": SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "shards": self._shard_signatures(),
            "image_duplicates": files_signature([self.image_table]) if self.image_table else None,
            "caption_duplicates": files_signature([self.caption_table]) if self.caption_table else None,
            "embeddings": folder_signature(self.embeddings) if self.embeddings else None,
        }

    def shard_outputs(self) -> list[Path]:
        if not self.cfg.filter_shards:
            return []
        folder = self.out / SHARDS_DIR
        return [path for shard in self.shards for path in filtered_shard_files(shard, folder)]

    def outputs(self) -> list[Path]:
        return [self.out / KEEP_LIST, self.out / DROP_LIST, self.out / SUMMARY_NAME, *self.shard_outputs()]

    def compute(self) -> dict[str, Any]:
        started = time.monotonic()
        cfg = self.cfg
        signatures = self._shard_signatures()
        meta = read_metadata(self.embeddings) if self.embeddings else None
        if meta is not None:
            check_metadata_covers(self.shards, meta, str(self.embeddings))
        rows = read_rows(self.shards, cfg, meta)
        row_of = {key: i for i, key in enumerate(rows.keys)}
        if len(row_of) != len(rows.keys):
            repeated = [k for k, c in Counter(rows.keys).items() if c > 1]
            raise ValueError(
                f"keys {repeated[:5]} occur in more than one shard; the duplicate tables name rows by key, "
                f"so keys must be unique over the shards"
            )
        embedded = np.asarray(rows.embedded, dtype=bool)
        unmatched: dict[str, int] = {}
        image_group = caption_group = None
        table_reps = None
        if self.image_table is not None:
            table = pq.read_table(self.image_table)
            keys = table.column("key").cast(pa.string()).to_pylist()
            gids = table.column("group_id").to_numpy()
            image_group, unmatched["image"] = table_groups(keys, gids, row_of, embedded)
            if "representative_key" in table.column_names:
                reps = table.column("representative_key").to_pylist()
                table_reps = dict(zip(gids.tolist(), reps, strict=True))
        if self.caption_table is not None:
            table = pq.read_table(self.caption_table, columns=["key", "group_id", "group_size"])
            table = table.filter(pc.greater(table.column("group_size"), 1))
            keys = table.column("key").cast(pa.string()).to_pylist()
            gids = table.column("group_id").to_numpy()
            caption_group, unmatched["caption"] = table_groups(keys, gids, row_of, embedded)
        for kind, count in unmatched.items():
            if count:
                log.warning(
                    "apply_dedup: %d %s-table rows name no embedded row of the shards; ignored", count, kind
                )
        scores = (
            read_scores(self.shards, cfg.score_column, self.embeddings) if cfg.policy == "score" else None
        )
        values = policy_values(cfg.policy, rows, scores)
        decision = decide(rows, image_group, caption_group, values, table_reps)

        table, kept = decision.table, decision.kept
        atomic_write_table(self.out / KEEP_LIST, table.filter(pa.array(kept)))
        atomic_write_table(self.out / DROP_LIST, table.filter(pa.array(~kept)))

        per_shard = {}
        folder = self.out / SHARDS_DIR
        for shard in self.shards:
            first, count = rows.per_shard[shard.name]
            shard_kept = kept[first : first + count]
            per_shard[shard.name] = {
                "rows_seen": count,
                "kept": int(shard_kept.sum()),
                "dropped": int(count - shard_kept.sum()),
            }
            if cfg.filter_shards:
                folder.mkdir(parents=True, exist_ok=True)
                keep = [rows.keys[first + i] for i in np.flatnonzero(shard_kept)]
                write_filtered_shard(shard, folder, keep, count, cfg)
        removed = remove_stale_shard_files(folder, set(self.shard_outputs()))
        if [[s.name, s.signature()] for s in self.shards] != signatures:
            raise ValueError("the shards changed while apply_dedup ran: run it again")

        kinds = Counter(reason_kind(r) for r in table.column("reason").to_pylist())
        summary = {
            "job": "apply_dedup",
            "out": str(self.out),
            "policy": cfg.policy,
            "score_column": cfg.score_column if cfg.policy == "score" else None,
            "groups_from": [kind for kind, on in (("image", cfg.images), ("caption", cfg.captions)) if on],
            "embedded_rows_from": "metadata" if meta is not None else "decoding",
            "shards": len(self.shards),
            "rows_seen": len(rows.keys),
            "kept": int(kept.sum()),
            "dropped": int((~kept).sum()),
            "reasons": {kind: kinds.get(kind, 0) for kind in REASONS},
            "duplicate_groups": decision.groups,
            "rows_in_duplicate_groups": decision.rows_in_groups,
            "image_representatives_changed": decision.representatives_changed,
            "unmatched_table_keys": unmatched,
            "keep_list": str(self.out / KEEP_LIST),
            "drop_list": str(self.out / DROP_LIST),
            "filtered_shards": str(folder) if cfg.filter_shards else None,
            "stale_shard_files_removed": len(removed),
            "per_shard": per_shard,
            "seconds": seconds_since(started),
        }
        if summary["rows_seen"] != summary["kept"] + summary["dropped"]:  # by construction; a guard
            raise RuntimeError(f"apply_dedup: rows do not add up: {summary}")
        atomic_write_json(self.out / SUMMARY_NAME, summary)
        log.info(
            "apply_dedup: %d rows seen, %d kept, %d dropped (%s)",
            summary["rows_seen"],
            summary["kept"],
            summary["dropped"],
            ", ".join(f"{k} {v}" for k, v in summary["reasons"].items() if v),
        )
        return summary


def run_apply_dedup(cfg: ApplyDedupConfig) -> dict[str, Any]:
    """Write the keep-list, the drop-list and (with ``filter_shards``) the filtered shards to ``cfg.out``.

    Paths must be concrete (``--bundle`` is resolved by :func:`pipeline.bundle.inspect.apply_dedup_inputs`).
    A re-run over unchanged inputs with the same result options returns the saved summary
    (``skipped: true``) and writes nothing.
    """
    return run_stage(ApplyDedupStage(cfg), cfg.out)
