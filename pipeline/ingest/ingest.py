"""Ingest: img2dataset shards -> ``samples.parquet``, one row per sample seen, nothing lost.

Stages, each testable alone:

* reader (:func:`pipeline.io.shards.read_shard`): one Ray task per shard yields raw rows with bytes;
* mapper (:func:`decode_batch`): CPU tasks decode images and drop the bytes;
* writer (:class:`ShardAssembler`): on the driver, collects each shard's rows and writes
  ``parts/<shard>.parquet`` and its done marker as soon as the shard is complete;
* runner (:func:`run_ingest`): skips finished shards, runs the rest, merges the parts.

A re-run reads no shard that already has a valid done marker. Only complete shards are read (their
``_stats.json`` exists, unless ``require_stats`` is off), and a shard is marked done only if it did
not change while it was read and its rows equal its stats ``count``; otherwise it is reported in the
summary (``shards_incomplete``, ``shards_changed_during_read``, ``shards_stats_mismatch``), left out
of ``samples.parquet`` and read again by the next run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.config import IngestConfig, result_options
from pipeline.core.stage import Commit, PartitionedStage, PartitionRun, run_partitioned, seconds_since
from pipeline.core.storage import atomic_parquet_writer, atomic_write_json, atomic_write_table, fingerprint
from pipeline.io.decode import decode_image, reason_of
from pipeline.io.partitions import PartitionAssembler
from pipeline.io.shards import ShardInputs, read_shard, stats_count

log = logging.getLogger(__name__)

SAMPLES_SCHEMA_VERSION = 1
SAMPLES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("warning", pa.string()),
    ]
)
STATUS_OK = "ok"
STATUS_REJECTED = "rejected"


def decode_batch(batch: pa.Table, max_pixels: int) -> dict[str, list[Any]]:
    """Mapper: decode each row's image bytes into the columns of ``samples.parquet``."""
    out: dict[str, list[Any]] = {name: [] for name in (*SAMPLES_SCHEMA.names, "shard_rows")}
    for row in batch.to_pylist():
        read_error = row["read_error"]
        decoded = None if read_error else decode_image(row["image"], max_pixels)
        error = read_error or decoded.error
        out["key"].append(row["key"])
        out["shard"].append(row["shard"])
        out["caption"].append(row["caption"])
        out["url"].append(row["url"])
        out["sha256"].append(decoded.sha256 if decoded else "")
        out["width"].append(decoded.width if decoded else 0)
        out["height"].append(decoded.height if decoded else 0)
        out["format"].append(decoded.format if decoded else "")
        out["status"].append(STATUS_REJECTED if error else STATUS_OK)
        out["error"].append(error)
        out["warning"].append(row["warning"])
        out["shard_rows"].append(row["shard_rows"])
    return out


def shard_counts(table: pa.Table) -> dict[str, Any]:
    """Rows seen, ok and rejected (by reason) of one shard's part; the numbers a summary shows."""
    statuses = table.column("status").to_pylist()
    reasons = Counter(reason_of(e) for e in table.column("error").to_pylist() if e)
    ok = statuses.count(STATUS_OK)
    return {
        "rows_seen": table.num_rows,
        "ok": ok,
        "rejected": table.num_rows - ok,
        "rejected_by_reason": dict(sorted(reasons.items())),
    }


class ShardAssembler(PartitionAssembler):
    """Writer: buffers decoded rows per shard and writes each shard once all its rows arrived.

    The shard is committed through ``inputs`` (:meth:`~pipeline.io.shards.ShardInputs.commit_checked`):
    one that changed while it was read, or whose rows differ from its ``_stats.json`` count, is
    deferred (no done marker).
    """

    def __init__(self, parts_dir: Path, commit: Commit, inputs: ShardInputs):
        super().__init__(self.write)
        self.parts_dir = parts_dir
        self.commit = commit
        self.inputs = inputs

    def write(self, shard: str, rows: pa.Table | None) -> dict[str, Any]:
        table = _to_samples_table(rows)
        table = table.sort_by([("key", "ascending")])
        atomic_write_table(self.parts_dir / f"{shard}.parquet", table)
        info = {"shard": shard, **shard_counts(table), "stats_count": stats_count(self.inputs.shards[shard])}
        self.inputs.commit_checked(self.commit, shard, info, info["rows_seen"])
        return info


def _to_samples_table(rows: pa.Table | None) -> pa.Table:
    if rows is None or rows.num_rows == 0:
        return SAMPLES_SCHEMA.empty_table()
    columns = {name: rows.column(name).cast(SAMPLES_SCHEMA.field(name).type) for name in SAMPLES_SCHEMA.names}
    return pa.table(columns, schema=SAMPLES_SCHEMA)


def ingest_fingerprint(cfg: IngestConfig) -> str:
    """What makes a finished part reusable: the decode rules and the output schema."""
    return fingerprint({"schema": SAMPLES_SCHEMA_VERSION, **result_options(cfg)})


class IngestStage(PartitionedStage):
    """One partition per shard (``parts/<shard>.parquet``), merged into ``samples.parquet`` by ``finish``."""

    name = "ingest"

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.parts_dir = self.out / "parts"
        self.inputs = ShardInputs(cfg.shards, cfg.require_stats)

    def fingerprint(self) -> str:
        return ingest_fingerprint(self.cfg)

    def partitions(self) -> dict[str, Any]:
        """Each shard's signature, taken before any read; the writer compares it after the read."""
        return self.inputs.sign()

    def remove(self, name: str) -> None:
        """A shard that is no longer an input: its part goes, so ``samples.parquet`` never holds it."""
        (self.parts_dir / f"{name}.parquet").unlink(missing_ok=True)

    def compute(self, todo: list[str], commit: Commit) -> None:
        import ray.data  # here: Ray Data costs a job with nothing to ingest a quarter of a second

        cfg, shards = self.cfg, self.inputs.shards
        assembler = ShardAssembler(self.parts_dir, commit, self.inputs)
        items = [{"shard": name} for name in todo]
        max_member_bytes = cfg.max_member_bytes
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(
            lambda item: read_shard(shards[item["shard"]], max_member_bytes), num_cpus=cfg.read_num_cpus
        )
        ds = ds.map_batches(
            decode_batch,
            batch_size=cfg.decode_batch_size,
            fn_kwargs={"max_pixels": cfg.max_image_pixels},
            batch_format="pyarrow",
        )
        with tqdm(total=len(todo), desc="ingest shards", unit="shard", disable=None) as bar:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                bar.update(len(assembler.add(batch)))
            assembler.finish_empty(todo)
            bar.update(len(todo) - bar.n)

    def finish(self, run: PartitionRun) -> dict[str, Any]:
        done = sorted(name for name in self.inputs.shards if name not in run.deferred)
        summary = merge_parts(self.out, self.parts_dir, run.markers, done)
        summary["shards_skipped"] = len(done) - len(run.processed)
        summary["shards_processed"] = len(run.processed)
        summary.update(self.inputs.summary())
        return summary


def run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Runner: ingest every unfinished shard, merge all parts into ``samples.parquet``.

    Needs a Ray session (see :func:`pipeline.core.ray_runtime.ray_session`). Returns the summary that is
    also written to ``ingest_summary.json``.
    """
    started = time.monotonic()
    stage = IngestStage(cfg)
    summary = run_partitioned(stage, stage.parts_dir)
    summary["seconds"] = seconds_since(started)
    atomic_write_json(stage.out / "ingest_summary.json", summary)
    return summary


def merge_parts(
    out: Path, parts_dir: Path, markers: dict[str, dict[str, Any]], names: list[str]
) -> dict[str, Any]:
    """Concatenate the shard parts into ``samples.parquet`` (streamed) and total their counts."""
    per_shard = {}
    out.mkdir(parents=True, exist_ok=True)  # no part at all when every shard is still incomplete
    with atomic_parquet_writer(out / "samples.parquet", SAMPLES_SCHEMA) as writer:
        for name in names:
            marker = markers.get(name)
            if marker is None:
                raise RuntimeError(f"shard {name} has no done marker after ingest")
            writer.write_table(pq.read_table(parts_dir / f"{name}.parquet", schema=SAMPLES_SCHEMA))
            per_shard[name] = {k: marker[k] for k in ("rows_seen", "ok", "rejected", "rejected_by_reason")}
            per_shard[name]["stats_count"] = marker.get("stats_count")  # = rows_seen; None: no stats file
    reasons: Counter[str] = Counter()
    for counts in per_shard.values():
        reasons.update(counts["rejected_by_reason"])
    totals = {k: sum(c[k] for c in per_shard.values()) for k in ("rows_seen", "ok", "rejected")}
    return {
        "job": "ingest",
        "samples": str(out / "samples.parquet"),
        "shards": len(names),
        **totals,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "per_shard": per_shard,
    }
