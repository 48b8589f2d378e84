"""Caption duplicates: normalise -> exact hash -> MinHash LSH -> Jaccard verification -> union-find.

Works on any parquet with a caption column (LAION metadata with only ``URL``/``TEXT`` is enough; no
images are needed). Output ``caption_duplicates.parquet`` has one row per input row, in input
order (files sorted by name, rows in file order):

=====================  ========  ===========================================================
column                 type      meaning
=====================  ========  ===========================================================
key                    input's   the key column (default ``key``), else the row number
group_id               int64     row number (0-based, input order) of the group's first row
group_size             int64     rows in the group; 1 for a caption with no duplicate
normalized_caption     string    the caption after :mod:`pipeline.dedup.text_normalize`
=====================  ========  ===========================================================

So ``group_id == row number`` marks the row to keep, and ``group_size > 1`` the duplicated rows.
Every input row is in the output; a singleton is its own group of size 1.

Stages:

1. **Normalise** every caption (:func:`pipeline.dedup.text_normalize.normalize_captions`).
2. **Exact pass**: rows whose normalised captions are equal form one node (an Arrow hash table on
   the whole string, so there are no hash collisions). Null and empty captions are never grouped,
   not even with each other: each is a group of its own, counted as ``empty_captions``.
3. **MinHash** (:mod:`pipeline.dedup.minhash`, datasketch-identical signatures) over the character
   ``shingle_size``-grams of each *distinct* normalised caption only.
4. **LSH banding** with datasketch's (bands, rows) for ``threshold``/``num_perm``. Within each band,
   captions sharing a bucket become candidate pairs; a bucket is sorted by node id and each member
   is paired with its next ``bucket_window`` members (all pairs for buckets up to
   ``bucket_window + 1`` members; larger buckets are linked as a chain of overlapping windows so
   they cost linear, not quadratic, pairs).
5. **Verification** of each distinct candidate pair: the exact Jaccard similarity of the two shingle
   sets (sets of the 32-bit shingle hashes MinHash sees; rows of a sparse binary matrix, so the
   intersections are computed in C) must be >= ``threshold``; and, with ``word_guard``, the pair
   must not *replace a word by a different word*: words present on one side only must each be a
   typo (one insertion, deletion, substitution or swap of neighbours in a word of four letters or
   more, letters only) of a word on the other side, or be on one side only (an inserted or dropped
   word). Thus "a red car parked on the street" and "a blue car parked on the street" stay apart,
   while "a red car parked on the stret" joins "a red car parked on the street", and "tomb raider
   legend" joins "tomb raider legend psp". Spacing-only differences ("t shirt" / "tshirt") pass,
   and "words" over 20 characters (unsegmented scripts such as Chinese or Japanese) are left to the
   Jaccard test alone.
   The guard is the only per-pair Python step and runs only on pairs that passed the Jaccard test.
6. **Union-find** (:func:`pipeline.dedup.union_find.connected_components`) over verified pairs.

Why these defaults (character 3-grams, threshold 0.7, word guard on): measured on the planted data
of :mod:`fixtures.planted_captions` (see BENCHMARKS.md). Word shingles cannot tell a typo from a
changed word at all (both change one word of the set); longer character shingles make a one-letter
typo in a short caption cost as much as a changed word. Character 3-grams separate them best, but
no Jaccard threshold alone keeps one-word hard negatives apart while still joining typo variants
of short captions: the word guard does that.

Ray: with at least ``ray_min_rows`` input rows, :class:`CaptionDedupStage` runs the same stages as
shuffles of Ray tasks over files (:mod:`pipeline.dedup.caption_partitioned`): the exact pass by
text hash, band keys into buckets, verification as a join that brings only each pair's two texts
together, connected components by large-star / small-star rounds; no process holds all rows. Below
``ray_min_rows`` :func:`find_caption_duplicates` runs in-process, which is faster for small inputs
(no Ray start-up, no files) and is the oracle of the partitioned path: both give identical output.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import CaptionDedupConfig, RayConfig, result_options
from pipeline.core.ray_runtime import ray_session
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import atomic_write_json, atomic_write_table, files_signature
from pipeline.dedup.caption_partitioned import find_caption_duplicates_partitioned
from pipeline.dedup.caption_steps import bucket_pairs, check_config, gather_sets, sketch_chunk, verify_pairs

# Steps the tests and benchmarks know by this module's name (defined in caption_steps).
from pipeline.dedup.caption_steps import pair_jaccard as pair_jaccard
from pipeline.dedup.caption_steps import replaces_a_word as replaces_a_word
from pipeline.dedup.caption_steps import unique_pairs as unique_pairs
from pipeline.dedup.caption_steps import window_pairs as window_pairs
from pipeline.dedup.minhash import MinHasher, lsh_params
from pipeline.dedup.report import REPORT_NAME, write_dedup_report
from pipeline.dedup.text_normalize import normalize_captions
from pipeline.dedup.union_find import component_sizes, connected_components

log = logging.getLogger(__name__)

#: Version of caption_duplicates.parquet; part of the fingerprint, so a new version recomputes.
SCHEMA_VERSION = 1
OUTPUT_NAME = "caption_duplicates.parquet"
SUMMARY_NAME = "caption_dedup_summary.json"
#: Shuffle files of the partitioned path, inside the output folder while it runs.
WORK_NAME = ".caption_dedup_work"
CAPTION_COLUMNS = ("caption", "TEXT", "text")
KEY_COLUMN = "key"


# ----------------------------------------------------------------------------------------------
# Input.
# ----------------------------------------------------------------------------------------------


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet file itself, or every ``*.parquet`` under a folder (recursive, sorted, no hidden)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"caption input {path} does not exist")
    files = sorted(
        p
        for p in path.rglob("*.parquet")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return files


def detect_caption_column(names: list[str], requested: str | None = None, where: str = "input") -> str:
    """``requested`` if present, else the first of :data:`CAPTION_COLUMNS` present; clear error otherwise."""
    if requested:
        if requested not in names:
            raise ValueError(f"caption column {requested!r} not in {where}; columns are: {', '.join(names)}")
        return requested
    for name in CAPTION_COLUMNS:
        if name in names:
            return name
    raise ValueError(
        f"no caption column in {where}: looked for {', '.join(CAPTION_COLUMNS)}; "
        f"columns are: {', '.join(names)} (name one with --caption-col)"
    )


@dataclass(frozen=True)
class CaptionInput:
    """A parquet caption input, known from file footers only: its files, columns and row counts."""

    files: list[Path]
    rows: list[int]  # per file
    caption_col: str
    key_col: str | None  # None: keys are row numbers

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    def info(self) -> dict[str, Any]:
        return {
            "files": len(self.files),
            "caption_col": self.caption_col,
            "key_col": self.key_col or "(row number)",
        }


def caption_input(
    path: str | Path, caption_col: str | None = None, key_col: str | None = None
) -> CaptionInput:
    """Files, columns and row counts of a parquet file or folder (footers only; no rows are read).

    The key column is ``key_col`` if given (every file must have it), else ``key`` when every file
    has it, else the row number.
    """
    files = parquet_files(path)
    metas = [pq.ParquetFile(f) for f in files]
    schemas = [m.schema_arrow for m in metas]
    caption = detect_caption_column(list(schemas[0].names), caption_col, where=str(files[0]))
    for f, schema in zip(files, schemas, strict=True):
        detect_caption_column(list(schema.names), caption, where=str(f))
    if key_col:
        for f, schema in zip(files, schemas, strict=True):
            if key_col not in schema.names:
                raise ValueError(f"key column {key_col!r} not in {f}; columns are: {', '.join(schema.names)}")
        key = key_col
    else:
        key = KEY_COLUMN if all(KEY_COLUMN in s.names for s in schemas) else None
    rows = [m.metadata.num_rows for m in metas]
    return CaptionInput(files, rows, caption, key)


def read_captions(
    path: str | Path, caption_col: str | None = None, key_col: str | None = None
) -> tuple[pa.ChunkedArray, pa.ChunkedArray, dict[str, Any]]:
    """(keys, captions, info) from a parquet file or folder, reading only those two columns.

    Columns as :func:`caption_input` picks them.
    """
    source = caption_input(path, caption_col, key_col)
    caption, key = source.caption_col, source.key_col
    columns = [caption] + ([key] if key and key != caption else [])
    tables = [pq.read_table(f, columns=columns) for f in source.files]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    captions = table.column(caption)
    keys = (
        table.column(key) if key else pa.chunked_array([pa.array(np.arange(table.num_rows, dtype=np.int64))])
    )
    return keys, captions, source.info()


# ----------------------------------------------------------------------------------------------
# The whole stage.
# ----------------------------------------------------------------------------------------------


@dataclass
class CaptionDedupResult:
    table: pa.Table  # key, group_id, group_size, normalized_caption (input order)
    stats: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = None  # group_id per row, as numpy


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, size)
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def find_caption_duplicates(
    captions: pa.Array | pa.ChunkedArray | list[str | None],
    cfg: CaptionDedupConfig | None = None,
    keys: pa.Array | pa.ChunkedArray | None = None,
) -> CaptionDedupResult:
    """Group duplicate captions in this process (the whole column in memory).

    For inputs of ``cfg.ray_min_rows`` rows or more, :func:`pipeline.dedup.caption_partitioned.
    find_caption_duplicates_partitioned` gives the same output on Ray without holding the rows in
    any one process; this function is its oracle.
    """
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 3)
        return now

    cfg = cfg or CaptionDedupConfig()
    check_config(cfg)
    if isinstance(captions, list):
        captions = pa.array(captions, type=pa.string())
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks() if captions.num_chunks != 1 else captions.chunk(0)
    n = len(captions)
    if keys is None:
        keys = pa.array(np.arange(n, dtype=np.int64))
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} captions")

    bands, rows = lsh_params(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
    hasher = MinHasher(
        num_perm=cfg.num_perm, seed=cfg.seed, shingle_size=cfg.shingle_size, scheme=cfg.minhash_scheme
    )

    # 1. Normalise.
    t = time.monotonic()
    normalized = normalize_captions(captions) if n else pa.array([], pa.string())
    t = lap("normalize", t)

    # 2. Exact pass: distinct non-empty normalised captions are the nodes, numbered by first row.
    empty = pc.fill_null(pc.equal(pc.utf8_length(normalized), 0), True).to_numpy(zero_copy_only=False)
    nonempty_rows = np.flatnonzero(~empty)
    encoded = pc.dictionary_encode(normalized.take(pa.array(nonempty_rows))) if len(nonempty_rows) else None
    if encoded is not None:
        node_of_row = encoded.indices.to_numpy().astype(np.int64)
        texts = encoded.dictionary
    else:
        node_of_row = np.zeros(0, np.int64)
        texts = pa.array([], pa.string())
    n_nodes = len(texts)
    t = lap("exact", t)

    # 3-5. MinHash, LSH banding and verification over distinct captions, in chunks of batch_size so
    # memory stays bounded: a chunk's signatures are dropped once its band keys exist.
    if n_nodes:
        chunks = _chunks(n_nodes, cfg.batch_size)
        sketches = [sketch_chunk(texts.slice(lo, hi - lo), hasher, bands, rows) for lo, hi in chunks]
        keys_all = np.concatenate([sk.band_keys for sk in sketches])
        candidates = bucket_pairs(keys_all, cfg.bucket_window)
        del keys_all
        t = lap("minhash_lsh", t)
        if len(sketches) == 1:
            tokens, offsets = sketches[0].tokens, sketches[0].offsets
        else:
            starts = np.array([lo for lo, _ in chunks])
            tokens, offsets = gather_sets(
                tuple((sk.tokens, sk.offsets) for sk in sketches), starts, np.arange(n_nodes)
            )
        v = verify_pairs(candidates, tokens, offsets, texts, cfg.threshold, cfg.word_guard)
        keep, below, substitutions = v.keep, v.below_threshold, v.word_substitutions
    else:
        candidates, keep, below, substitutions = np.zeros((0, 2), np.int64), np.zeros(0, bool), 0, 0
        t = lap("minhash_lsh", t)
    verified = candidates[keep]
    t = lap("verify", t)

    # 6. Union-find over nodes, then back to rows; empty rows stay alone.
    node_label = connected_components(n_nodes, verified)
    row_label = np.arange(n, dtype=np.int64)  # empty rows: their own group
    if len(nonempty_rows):
        # Group id = first row (input order) of each node component.
        first_row_of_node = np.full(n_nodes, n, dtype=np.int64)
        np.minimum.at(first_row_of_node, node_of_row, nonempty_rows)
        first_row_of_comp = np.full(n_nodes, n, dtype=np.int64)
        np.minimum.at(first_row_of_comp, node_label, first_row_of_node)
        row_label[nonempty_rows] = first_row_of_comp[node_label[node_of_row]]
    sizes = component_sizes(row_label)
    t = lap("union_find", t)

    table = pa.table(
        {
            "key": keys,
            "group_id": pa.array(row_label, pa.int64()),
            "group_size": pa.array(sizes, pa.int64()),
            "normalized_caption": normalized.cast(pa.string()),
        }
    )
    n_groups = len(np.unique(row_label)) if n else 0
    dup_rows = int((sizes > 1).sum())
    stats = {
        "rows": n,
        "empty_captions": int(empty.sum()),
        "distinct_normalized": n_nodes,
        "exact_duplicate_rows": int(len(nonempty_rows) - n_nodes),
        "candidate_pairs": len(candidates),
        "verified_pairs": len(verified),
        "rejected_below_threshold": int(below),
        "rejected_word_substitution": int(substitutions),
        "groups": n_groups,
        "duplicate_groups": len(np.unique(row_label[sizes > 1])),
        "rows_in_duplicate_groups": dup_rows,
        "removable_rows": n - n_groups,
        "lsh_bands": bands,
        "lsh_rows": rows,
        "mode": "in-process",
        "seconds": seconds_since(t_start),
        "stage_seconds": timings,
    }
    return CaptionDedupResult(table=table, stats=stats, labels=row_label)


class CaptionDedupStage(Stage):
    """Parquet captions -> ``caption_duplicates.parquet``, ``caption_dedup_summary.json`` and (unless
    ``cfg.report`` is off) ``dedup_report.html`` (:mod:`pipeline.dedup.report`)."""

    name = "caption_dedup"

    def __init__(
        self, cfg: CaptionDedupConfig, ray_cfg: RayConfig | None = None, use_ray: bool | None = None
    ):
        self.cfg = cfg
        self.ray_cfg = ray_cfg
        self.use_ray = use_ray
        self.out = Path(cfg.out)

    def fingerprint(self) -> dict[str, Any]:
        """Result options and the input files' names, sizes and mtimes."""
        root = Path(self.cfg.input)
        files = parquet_files(root)
        return {
            "schema": SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "input": files_signature(files, root if root.is_dir() else root.parent),
        }

    def outputs(self) -> list[Path]:
        return [self.out / OUTPUT_NAME] + ([self.out / REPORT_NAME] if self.cfg.report else [])

    def compute(self) -> dict[str, Any]:
        started = time.monotonic()
        cfg = self.cfg
        source = caption_input(cfg.input, cfg.caption_col, cfg.key_col)
        info = source.info()
        log.info(
            "caption dedup: %d rows from %d file(s), caption column %s",
            source.num_rows,
            info["files"],
            info["caption_col"],
        )
        use_ray = source.num_rows >= cfg.ray_min_rows if self.use_ray is None else self.use_ray
        output = self.out / OUTPUT_NAME
        if use_ray:  # no process holds all rows; the table stays on disk
            work = self.out / WORK_NAME
            shutil.rmtree(work, ignore_errors=True)  # a killed run's shuffle files
            with ray_session(self.ray_cfg or RayConfig()):
                stats = find_caption_duplicates_partitioned(
                    list(zip(source.files, source.rows, strict=True)),
                    cfg,
                    work_dir=work,
                    out_path=output,
                    caption_col=source.caption_col,
                    key_col=source.key_col,
                )
            work.rmdir()
            table, captions = output, None
        else:
            keys, captions, _ = read_captions(cfg.input, cfg.caption_col, cfg.key_col)
            result = find_caption_duplicates(captions, cfg, keys=keys)
            atomic_write_table(output, result.table)
            stats, table = result.stats, result.table
        summary = {
            "job": "dedup_captions",
            "output": str(output),
            **info,
            **stats,
            "threshold": cfg.threshold,
            "num_perm": cfg.num_perm,
            "shingle_size": cfg.shingle_size,
            "seconds": seconds_since(started),
        }
        if cfg.report:
            write_dedup_report(
                self.out / REPORT_NAME,
                caption_duplicates=table,
                caption_summary=stats,
                caption_cfg=cfg,
                captions=captions,
                title="Caption duplicates",
            )
            summary["report"] = str(self.out / REPORT_NAME)
        atomic_write_json(self.out / SUMMARY_NAME, summary)
        return summary


def run_caption_dedup(
    cfg: CaptionDedupConfig, ray_cfg: RayConfig | None = None, use_ray: bool | None = None
) -> dict[str, Any]:
    """Read ``cfg.input``, find duplicate captions, write ``caption_duplicates.parquet`` + summary.

    With ``use_ray=None`` the input size decides: at least ``cfg.ray_min_rows`` rows run partitioned
    on Ray (:mod:`pipeline.dedup.caption_partitioned`, joining or starting Ray through
    :func:`pipeline.core.ray_runtime.ray_session` with ``ray_cfg``), fewer run in-process without
    starting Ray at all. A re-run with the same options over unchanged
    input files returns the saved summary (``skipped: true``).
    """
    return run_stage(CaptionDedupStage(cfg, ray_cfg, use_ray), cfg.out)
