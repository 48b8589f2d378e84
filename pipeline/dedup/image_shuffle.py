"""The image dedup stage: its passes over the shared k-means cells as Ray map and reduce tasks.

The passes and the grouping rule are :mod:`pipeline.dedup.image`'s; this module moves the rows:

1. **map**, one task per embedding partition: every row goes, with its float16 vector, its pHash
   and whether the cell is its nearest one, to the reduce bucket of each of its ``top`` cells
   (buckets are runs of consecutive cells); its sha256 goes to the bucket of a CRC of the hash.
   Files: ``map/<partition>/cells_<b>.npz``, ``map/<partition>/sha_<b>.npz``.
2. **reduce**, one task per bucket: within each cell, every row it owns against every row of the
   cell (semantic: blocked products; pHash: binary range search, confirmed by cosine), and the
   exact pass over the bucket's hashes. File: ``pairs/<b>.npz``.
3. **group**, one task: the pairs of every bucket, connected components over the rows on a pair,
   verification against representatives, ``image_duplicates.parquet``.

The driver only lists partitions and collects per-task counts. Memory per process: a map task
holds one partition (float16 vectors plus metadata); a reduce task one bucket
(``cells.bucket_rows`` rows: about 110 MB at d=512) plus one cell's float32 similarity block;
the group task the rows that lie on a pair (a few percent of N) with their vectors. Time grows
as N x (rows per cell) x d for the semantic pass, N x (rows per cell) for pHash, and N for the
rest. Tasks whose output file exists under the same fingerprint are not run again, so a crashed
stage resumes; the work folder is removed when the stage finishes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import CellsConfig, ImageDedupConfig, result_options
from pipeline.core.ray_runtime import cluster_gpus
from pipeline.core.shuffle import write_arrays
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import atomic_write_json, atomic_write_table, fingerprint
from pipeline.core.tasks import run_tasks
from pipeline.dedup.image import (
    META_COLUMNS,
    SCHEMA_VERSION,
    Nodes,
    _canonical,
    cell_pairs,
    chance_partners,
    check_config,
    exact_pairs,
    group_nodes,
    pass_notes,
    runs_semantic,
)
from pipeline.dedup.names import (
    METHOD_EXACT,
    METHOD_PHASH,
    METHOD_SEMANTIC,
    OUTPUT_NAME,
    PASSES,
    SUMMARY_NAME,
)
from pipeline.dedup.report import REPORT_NAME, write_dedup_report
from pipeline.index.cells import CellsStage, assign_path, read_cells
from pipeline.io.embeddings import (
    EmbeddingRows,
    Partition,
    folder_signature,
    is_semantic,
    list_partitions,
    metadata_path,
    normalize,
    partition_starts,
)

log = logging.getLogger(__name__)

WORK = "_shuffle"


def _bucket_file(work: Path, partition: str, kind: str, bucket: int) -> Path:
    return work / "map" / partition / f"{kind}_{bucket:05d}.npz"


def _hash_columns(meta: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """pHashes (0 where missing) and which rows have one."""
    column = meta.column("phash")
    return (
        pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.uint64),
        ~column.is_null().to_numpy(zero_copy_only=False),
    )


def map_partition(
    folder: str, name: str, start: int, cells_dir: str, work: str, buckets: int, nlist: int
) -> dict[str, Any]:
    """Send one partition's rows to the reduce buckets of their cells, and their hashes to the exact pass."""
    work_dir = Path(work)
    done = work_dir / "map" / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    partition = Partition(Path(folder), name)
    vectors = np.asarray(partition.embeddings())
    cells = np.load(assign_path(cells_dir, name))
    meta = partition.metadata(["sha256", "phash"])
    hashes, has_hash = _hash_columns(meta)
    n, top = cells.shape
    local = np.tile(np.arange(n), top)
    cell = cells.T.ravel()
    owner = np.repeat(np.arange(top) == 0, n)
    joined = cell >= 0  # a row joins its further cells only near a boundary
    local, cell, owner = local[joined], cell[joined], owner[joined]
    bucket = cell.astype(np.int64) * buckets // nlist
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    for b in range(buckets):
        sel = order[bounds[b] : bounds[b + 1]]
        if len(sel):
            rows = local[sel]
            write_arrays(
                _bucket_file(work_dir, name, "cells", b),
                rows=start + rows,
                cell=cell[sel],
                owner=owner[sel],
                vectors=vectors[rows],
                phash=hashes[rows],
                has_hash=has_hash[rows],
            )
    sha = meta.column("sha256").to_pylist()
    hashed = np.array([i for i, s in enumerate(sha) if s], np.int64)
    if len(hashed):
        codes = np.array([sha[i].encode() for i in hashed.tolist()])
        sha_bucket = np.array([zlib.crc32(c) % buckets for c in codes.tolist()], np.int64)
        for b in np.unique(sha_bucket).tolist():
            sel = sha_bucket == b
            write_arrays(_bucket_file(work_dir, name, "sha", b), rows=start + hashed[sel], sha=codes[sel])
    info = {"rows": n, "hashed": len(hashed)}
    atomic_write_json(done, info)
    return info


def _load(files: list[Path]) -> dict[str, np.ndarray]:
    """The arrays of several ``.npz`` files, concatenated name by name."""
    loaded = [np.load(f) for f in files]
    return {key: np.concatenate([d[key] for d in loaded]) for key in loaded[0].files} if loaded else {}


def reduce_bucket(
    bucket: int,
    partitions: list[str],
    work: str,
    cfg: ImageDedupConfig,
    semantic: bool,
    passes: list[str],
    device: str | None = None,
) -> dict[str, Any]:
    """Every pair of one bucket: within each of its cells (pHash, semantic) and among its hashes (exact)."""
    started = time.monotonic()
    work_dir = Path(work)
    out = work_dir / "pairs" / f"{bucket:05d}.npz"
    if out.is_file():
        return json.loads(str(np.load(out)["stats"]))
    found: dict[str, list[np.ndarray]] = {name: [] for name in PASSES}
    stats: dict[str, Any] = {"rows": 0, "cells": 0, "largest_cell": 0, "phash_unconfirmed": 0, "saturated": 0}
    entries = _load([f for p in partitions if (f := _bucket_file(work_dir, p, "cells", bucket)).is_file()])
    if entries and (METHOD_PHASH in passes or METHOD_SEMANTIC in passes):
        order = np.lexsort((entries["rows"], entries["cell"]))
        entries = {key: value[order] for key, value in entries.items()}
        cell = entries["cell"]
        bounds = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1], True])
        stats.update(rows=len(cell), cells=len(bounds) - 1, largest_cell=int(np.diff(bounds).max()))
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            rows = entries["rows"][lo:hi]
            vectors = normalize(entries["vectors"][lo:hi]) if semantic else None
            result = cell_pairs(
                vectors,
                entries["phash"][lo:hi] if METHOD_PHASH in passes else None,
                entries["has_hash"][lo:hi],
                cfg,
                semantic,
                owners=np.flatnonzero(entries["owner"][lo:hi]),
                device=device,
            )
            found[METHOD_PHASH].append(rows[result.phash])
            found[METHOD_SEMANTIC].append(rows[result.semantic])
            stats["phash_unconfirmed"] += result.phash_unconfirmed
            stats["saturated"] += result.saturated
    hashes = _load([f for p in partitions if (f := _bucket_file(work_dir, p, "sha", bucket)).is_file()])
    if hashes and METHOD_EXACT in passes:
        order = np.argsort(hashes["rows"], kind="stable")
        rows = hashes["rows"][order]
        sha = pa.array(hashes["sha"][order].tolist(), pa.binary())
        found[METHOD_EXACT].append(rows[exact_pairs(sha)])
    pairs = {
        name: _canonical(np.concatenate(p))[0] if p else np.zeros((0, 2), np.int64)
        for name, p in found.items()
    }
    stats.update({f"{name}_pairs": len(p) for name, p in pairs.items()}, seconds=seconds_since(started))
    write_arrays(out, stats=np.array(json.dumps(stats)), **pairs)
    return stats


def _gather_nodes(folder: str, rows: np.ndarray) -> Nodes:
    """Metadata and unit embeddings of ``rows`` (sorted row ids), read partition by partition."""
    tables = []
    partitions = list_partitions(folder)
    starts = partition_starts(partitions)
    for i, partition in enumerate(partitions):
        mine = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
        if len(mine):
            tables.append(partition.metadata(META_COLUMNS).take(pa.array(mine)))
    meta = (
        pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in META_COLUMNS})
    )
    return Nodes.from_table(rows, meta, EmbeddingRows(folder)(rows))


def group_buckets(
    folder: str, work: str, buckets: int, cfg: ImageDedupConfig, semantic: bool, out: str
) -> dict:
    """Groups from every bucket's pairs; writes ``image_duplicates.parquet``."""
    started = time.monotonic()
    loaded = [np.load(Path(work) / "pairs" / f"{b:05d}.npz") for b in range(buckets)]
    pairs = {name: _canonical(np.concatenate([d[name] for d in loaded]))[0] for name in PASSES}
    nodes = np.unique(np.concatenate(list(pairs.values())))
    table, stats = group_nodes(_gather_nodes(folder, nodes), pairs, cfg, semantic)
    atomic_write_table(out, table)
    stats["pairs"] = {name: len(p) for name, p in pairs.items()}
    stats["gather_and_group_seconds"] = seconds_since(started)
    return stats


def _has_values(partitions: list[Partition], column: str) -> bool:
    """Whether any partition's metadata has a non-null ``column`` (read one column, first hit wins)."""
    return any(
        column in pq.read_schema(metadata_path(p.folder, p.name)).names
        and p.metadata([column]).column(column).null_count < p.num_rows()
        for p in partitions
    )


def compute_image_dedup(cfg: ImageDedupConfig, cells: CellsStage, run_id: str) -> dict[str, Any]:
    """The stage's work: cells (if not yet made), map, reduce, group, summary (and report)."""
    started = time.monotonic()
    out = Path(cfg.out)
    run_stage(cells, cells.out)
    info = read_cells(cells.out)
    partitions = list_partitions(cfg.embeddings)
    starts = partition_starts(partitions)
    n = starts[-1]
    inline = n < cells.cfg.ray_min_rows
    semantic_model = is_semantic(cfg.embeddings)
    semantic = runs_semantic(cfg, semantic_model)
    notes = pass_notes(
        cfg,
        has_sha=_has_values(partitions, "sha256"),
        has_phash=_has_values(partitions, "phash"),
        semantic_model=semantic_model,
        have_vectors=True,
    )
    passes = [name for name in PASSES if name not in notes]
    nlist = int(info["nlist"])
    buckets = max(1, min(nlist, -(-int(info["memberships"]) // cells.cfg.bucket_rows)))
    work = out / WORK / run_id
    log.info("image dedup: %d rows, %d cells, %d buckets, passes %s", n, nlist, buckets, ",".join(passes))

    t = time.monotonic()
    calls = [
        (cfg.embeddings, p.name, starts[i], str(cells.out), str(work), buckets, nlist)
        for i, p in enumerate(partitions)
    ]
    run_tasks(map_partition, calls, inline=inline, label="image dedup: map")
    map_s = seconds_since(t)
    t = time.monotonic()
    names = [p.name for p in partitions]
    # On a cluster with GPUs the products run there, several reduce tasks sharing one GPU.
    gpus = 0 if inline or not (cfg.use_gpu and semantic) else cluster_gpus()
    device = "cuda" if gpus else None
    reduced = run_tasks(
        reduce_bucket,
        [(b, names, str(work), cfg, semantic, passes, device) for b in range(buckets)],
        inline=inline,
        num_gpus=0.25 if gpus else 0.0,
        label="image dedup: reduce",
    )
    reduce_s = seconds_since(t)
    (grouped,) = run_tasks(
        group_buckets,
        [(cfg.embeddings, str(work), buckets, cfg, semantic, str(out / OUTPUT_NAME))],
        inline=inline,
        fresh_worker=True,
    )
    pair_counts = grouped.pop("pairs")
    largest_cell = max(r["largest_cell"] for r in reduced)
    for name in passes:
        notes[name] = {"pairs": pair_counts[name]}
    if METHOD_PHASH in passes:
        notes[METHOD_PHASH].update(
            unconfirmed_by_cosine=sum(r["phash_unconfirmed"] for r in reduced),
            chance_partners_per_image=round(chance_partners(2 * largest_cell, cfg.phash_max_distance), 6),
        )
    if METHOD_SEMANTIC in passes:
        notes[METHOD_SEMANTIC].update(saturated_rows=sum(r["saturated"] for r in reduced), k=cfg.semantic_k)
    summary = {
        "job": "dedup_images",
        "out": str(out / OUTPUT_NAME),
        "embeddings": str(cfg.embeddings),
        "rows": n,
        "semantic_model": semantic_model,
        "passes": notes,
        **grouped,
        "cells": {
            "nlist": nlist,
            "top": info["top"],
            "largest_cell_in_bucket": largest_cell,
            "buckets": buckets,
        },
        "mode": "in-process" if inline else "ray",
        "step_seconds": {"map": map_s, "reduce": reduce_s, "group": grouped["gather_and_group_seconds"]},
        "seconds": seconds_since(started),
        "skipped": False,
    }
    if cfg.report:
        run_tasks(_report, [(cfg, summary)], inline=inline, fresh_worker=True)
        summary["report"] = str(out / REPORT_NAME)
    atomic_write_json(out / SUMMARY_NAME, summary)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return summary


def _report(cfg: ImageDedupConfig, summary: dict[str, Any]) -> None:
    out = Path(cfg.out)
    write_dedup_report(
        out / REPORT_NAME,
        image_duplicates=out / OUTPUT_NAME,
        image_summary=summary,
        image_cfg=cfg,
        embeddings=cfg.embeddings,
        shards=cfg.shards,
        title="Image duplicates",
    )


class ImageDedupStage(Stage):
    """Embedding folder (+ its cells) -> ``image_duplicates.parquet``, ``image_dedup_summary.json`` and
    (unless ``cfg.report`` is off) ``dedup_report.html`` (:mod:`pipeline.dedup.report`; thumbnails from
    ``cfg.shards`` when given)."""

    name = "image_dedup"

    def __init__(self, cfg: ImageDedupConfig, cells: CellsConfig, cells_dir: str | Path):
        check_config(cfg)
        self.cfg = cfg
        self.cells = CellsStage(cells, cfg.embeddings, cells_dir)
        self.out = Path(cfg.out)

    def fingerprint(self) -> dict[str, Any]:
        """Every result option, the cells' fingerprint and the input folder's signature."""
        return {
            "schema": SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "cells": self.cells.fingerprint(),
            "input": folder_signature(self.cfg.embeddings),
        }

    def outputs(self) -> list[Path]:
        return [self.out / OUTPUT_NAME] + ([self.out / REPORT_NAME] if self.cfg.report else [])

    def compute(self) -> dict[str, Any]:
        return compute_image_dedup(self.cfg, self.cells, fingerprint(self.fingerprint()))


def run_image_dedup(
    cfg: ImageDedupConfig, cells: CellsConfig | None = None, cells_dir: str | Path | None = None
) -> dict[str, Any]:
    """Find image duplicates in ``cfg.embeddings``; write ``image_duplicates.parquet`` and the summary.

    The cells (:mod:`pipeline.index.cells`) are computed first into ``cells_dir`` (default:
    ``cfg.out/cells``) unless they are up to date there. A re-run with the same options over the same
    input files returns the saved summary without recomputing (``skipped: true``).
    """
    cells_dir = Path(cells_dir) if cells_dir else Path(cfg.out) / "cells"
    return run_stage(ImageDedupStage(cfg, cells or CellsConfig(), cells_dir), cfg.out)
