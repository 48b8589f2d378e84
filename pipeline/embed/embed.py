"""Embed: img2dataset shards -> image and caption embeddings in clip-retrieval's (LAION's) layout.

Stages, each testable alone (the shape of :mod:`pipeline.ingest.ingest`):

* reader and mapper (:mod:`pipeline.embed.prepare`): one Ray task per shard reads its rows, CPU tasks
  decode each image once into pHash, sha256 and the models' uint8 inputs;
* model (:class:`EmbedActor`): an actor pool (one actor per GPU, or CPU actors when the cluster has no
  GPU) embeds the decoded images and their captions; rejected rows pass through with no model work,
  so the writer still sees every row of a shard;
* writer (:class:`PartitionWriter` behind a :class:`~pipeline.io.partitions.PartitionAssembler`): on the
  driver, writes a shard's partition (``img_emb``, ``text_emb``, ``metadata``; see
  :mod:`pipeline.io.embeddings`) and then its done marker, as soon as all its rows arrived;
* stage (:class:`EmbedStage`, run by :func:`run_embed` through the stage contract): skips finished
  partitions, plans the actor pool, logs progress, sums up.

Decoding and inference are separate Ray operators, so they overlap. Rejected rows (download
failures, broken or non-image files) are not embedded but counted by reason: for every partition,
rows seen = embedded + skipped.

The shards embedded are those ingest takes (:func:`~pipeline.io.shards.complete_shards`), and a
partition gets its done marker only if its shard did not change while it was read and its rows
equal the shard's ``_stats.json`` count; otherwise it is deferred to a later run and reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch

from pipeline.core.config import EmbedConfig, result_options
from pipeline.core.ray_runtime import cluster_gpus, cpu_actor_pool_size
from pipeline.core.stage import Commit, PartitionedStage, PartitionRun, run_partitioned
from pipeline.core.storage import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    fingerprint,
    sha256_file,
    unique_tmp_path,
)
from pipeline.embed.clip_models import (
    ClipSpec,
    clip_spec,
    fetch_weights,
    load_clip,
    load_sscd,
    resolve_precision,
)
from pipeline.embed.prepare import (
    NO_ERROR,
    PIXELS,
    ROW_COLUMNS,
    SSCD_PIXELS,
    DecodePlan,
    prepare_batch,
    read_rows,
)
from pipeline.io.decode import reason_of
from pipeline.io.embeddings import (
    DONE,
    EMBEDDING_KINDS,
    IMG_EMB,
    METADATA_SCHEMA,
    SSCD_EMB,
    TEXT_EMB,
    embedding_path,
    metadata_path,
)
from pipeline.io.partitions import PartitionAssembler, shard_sizes
from pipeline.io.shards import Shard, ShardInputs

log = logging.getLogger(__name__)

EMBED_SCHEMA_VERSION = 1

#: Rejection reason of the rows of a batch that killed its model worker ``max_batch_attempts`` times.
POISON_BATCH = "poison_batch"
#: The attempt ledger's folder under the output folder; a dot-folder, which a bundle's file list skips.
ATTEMPTS_DIR = ".attempts"


class BatchAttempts:
    """How often each model batch was started: the ledger that keeps a batch from killing workers forever.

    Ray Data restarts a dead model actor and retries its task without limit, with the same input, so
    a batch that crashes its worker (a segfault in a kernel, an out-of-memory kill) would be retried
    forever. :meth:`start` counts an attempt in ``<folder>/<sha1 of the batch>.json`` before any model
    work, and :meth:`finish` removes the entry once the batch is done; an entry that already counts
    ``limit`` attempts means the batch killed its worker that many times, and it is given up.

    The entry is written to a unique temporary name and renamed, so a killed process never leaves half
    a count; it is not fsynced (it must only outlive the process, not a power loss), which keeps disk
    flushes off the model's hot path. A folder that cannot be written (an output folder the worker's
    node does not share) disables the ledger with a warning; the run itself goes on.

    Args:
        folder (`Path`): the ledger's folder (``OUT/.attempts``); the output folder must be shared by
            the workers' nodes for counts to add up across nodes.
        limit (`int`): attempts after which a batch is given up.
        salt (`str`): the result options' fingerprint: a batch under other options is another batch.
    """

    def __init__(self, folder: Path, limit: int, salt: str):
        self.folder = folder
        self.limit = limit
        self.salt = salt
        self.enabled = True

    def entry(self, batch: dict[str, np.ndarray]) -> Path:
        """The batch's ledger file: a hash of its rows' shard, row number, key and image sha256."""
        digest = hashlib.sha1(self.salt.encode(), usedforsecurity=False)
        for column in ("shard", "row", "key", "sha256"):
            digest.update(json.dumps([str(value) for value in batch[column]]).encode())
        return self.folder / f"{digest.hexdigest()}.json"

    def start(self, batch: dict[str, np.ndarray]) -> Path | None:
        """Count an attempt at ``batch``; its entry, or None when it has used up its attempts."""
        path = self.entry(batch)
        try:
            count = int(json.loads(path.read_text())["attempts"])
        except FileNotFoundError:
            count = 0
        except (OSError, ValueError, KeyError, TypeError):
            count = 0  # an unreadable entry counts as none: at worst a batch gets its attempts again
        if count >= self.limit:
            return None
        if self.enabled:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = unique_tmp_path(path)
                tmp.write_text(json.dumps({"attempts": count + 1}))
                os.replace(tmp, path)
            except OSError as exc:
                self.enabled = False
                log.warning("embed: no batch attempt ledger (%s): a crashing batch is not bounded", exc)
        return path

    def finish(self, path: Path) -> None:
        """The batch is done: forget its attempts."""
        if self.enabled:
            path.unlink(missing_ok=True)


class EmbedActor:
    """Model stage: image and caption embeddings (and SSCD descriptors) for the decoded rows of a batch.

    The device is chosen here, not on the driver: Ray hides GPUs from actors that did not ask for one.

    Args:
        cfg (`EmbedConfig`): model, batch size and SSCD options.
        precision (`str`): see :func:`~pipeline.embed.clip_models.resolve_precision` (fp32 on CPU regardless).
    """

    def __init__(self, cfg: EmbedConfig, precision: str):

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = load_clip(cfg, device, precision)
        self.sscd = (
            load_sscd(cfg.sscd_checkpoint, cfg.sscd_image_size, device) if cfg.sscd_checkpoint else None
        )
        self.batch_size = cfg.batch_size
        self.attempts = BatchAttempts(
            Path(cfg.out) / ATTEMPTS_DIR, cfg.max_batch_attempts, fingerprint(result_options(cfg))
        )
        log.info("embed actor: %s on %s (%s)", self.clip.name, device, self.clip.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed the ok rows of ``batch``; rejected rows pass through with zero vectors.

        A batch that already killed its worker ``max_batch_attempts`` times (see
        :class:`BatchAttempts`) gets no model work: its ok rows are rejected as ``poison_batch``.
        """
        ok = batch["error"] == NO_ERROR
        entry = None
        if ok.any():  # a batch of rejected rows only gets no model work: nothing to count
            entry = self.attempts.start(batch)
            if entry is None:
                return self._given_up(batch, ok)
        out = self.embed(batch)
        if entry is not None:
            self.attempts.finish(entry)
        return out

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model work: the row columns, and the embeddings of the ok rows (zeros for the others)."""
        ok = batch["error"] == NO_ERROR
        out = {name: batch[name] for name in ROW_COLUMNS}
        captions = [str(caption) for caption in batch["caption"][ok]]
        out[IMG_EMB] = _scatter(self.clip.encode_images(batch[PIXELS][ok], self.batch_size), ok)
        out[TEXT_EMB] = _scatter(self.clip.encode_texts(captions, self.batch_size), ok)
        if self.sscd is not None:
            out[SSCD_EMB] = _scatter(self.sscd.encode(batch[SSCD_PIXELS][ok], self.batch_size), ok)
        return out

    def _given_up(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`embed`'s output without the model: the ok rows rejected as ``poison_batch`` (rows
        rejected before keep their reason), every embedding zero."""
        reason = f"{POISON_BATCH}: its model worker died {self.attempts.limit} times on this batch"
        log.warning(
            "embed: giving up a batch of %d rows (shards %s, keys %s...): %s",
            len(ok),
            sorted({str(s) for s in batch["shard"]}),
            [str(k) for k in batch["key"][:3]],
            reason,
        )
        errors = [reason if good else str(e) for e, good in zip(batch["error"], ok, strict=True)]
        out = {name: batch[name] for name in ROW_COLUMNS} | {"error": np.array(errors, dtype=object)}
        dims = {IMG_EMB: self.clip.dim, TEXT_EMB: self.clip.dim}
        if self.sscd is not None:
            dims[SSCD_EMB] = self.sscd.dim
        return out | {kind: np.zeros((len(ok), dim), dtype=np.float16) for kind, dim in dims.items()}


def _scatter(rows: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Embeddings of the ``ok`` rows placed back among all rows; rejected rows get zeros."""
    full = np.zeros((len(ok), rows.shape[1]), dtype=rows.dtype)
    full[ok] = rows
    return full


def _matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """A Ray tensor column (one ``(dim,)`` float16 vector per row) as an ``(N, dim)`` array."""
    if len(column) == 0:
        return np.zeros((0, dim), dtype=np.float16)
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float16, copy=False)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def partition_counts(rows: pa.Table | None) -> dict[str, Any]:
    """Rows seen, embedded and skipped (by reason) of one partition's rows."""
    errors = [] if rows is None else rows.column("error").to_pylist()
    reasons = Counter(reason_of(e) for e in errors if e != NO_ERROR)
    skipped = sum(reasons.values())
    return {
        "rows_seen": len(errors),
        "embedded": len(errors) - skipped,
        "skipped": skipped,
        "skipped_by_reason": dict(sorted(reasons.items())),
    }


class PartitionWriter:
    """Writer: one partition's embeddings and metadata, each file atomically, then its done marker.

    The partition is committed through ``inputs`` (:meth:`~pipeline.io.shards.ShardInputs.commit_checked`):
    a shard that changed while it was read, or whose rows differ from its ``_stats.json`` count, is
    deferred instead (no marker).

    Args:
        out (`Path`): output folder.
        commit (`Commit`): records a finished partition (its done marker under ``out/done``).
        spec (`ClipSpec`): the model, for labels and the width of empty partitions.
        sscd_dim (`int`, *optional*): SSCD descriptor width; None when no SSCD model is used.
        inputs (`ShardInputs`): the input shards, signed before the read.
    """

    def __init__(
        self,
        out: Path,
        commit: Commit,
        spec: ClipSpec,
        sscd_dim: int | None,
        inputs: ShardInputs,
    ):
        self.out = out
        self.commit = commit
        self.spec = spec
        self.dims = {IMG_EMB: spec.dim, TEXT_EMB: spec.dim} | ({SSCD_EMB: sscd_dim} if sscd_dim else {})
        self.inputs = inputs

    def __call__(self, name: str, rows: pa.Table | None) -> dict[str, Any]:
        counts = partition_counts(rows)
        if rows is not None:
            rows = rows.sort_by("row")
            if rows.column("row").to_pylist() != list(range(rows.num_rows)):
                raise RuntimeError(f"partition {name}: rows arrived duplicated or missing; nothing written")
            rows = rows.filter(pc.equal(rows.column("error"), NO_ERROR))
        for kind, dim in self.dims.items():
            matrix = _matrix(rows.column(kind), dim) if rows is not None else np.zeros((0, dim), np.float16)
            _save_npy(embedding_path(self.out, kind, name), matrix)
        atomic_write_table(metadata_path(self.out, name), self._metadata(rows))
        info = {
            "partition": name,
            **counts,
            "model": self.spec.name,
            "semantic": self.spec.semantic,
        }
        self.inputs.commit_checked(self.commit, name, info, counts["rows_seen"])
        return info

    def _metadata(self, rows: pa.Table | None) -> pa.Table:
        labels = {"embed_model": self.spec.name, "semantic": str(self.spec.semantic).lower()}
        schema = METADATA_SCHEMA.with_metadata(labels)
        if rows is None:
            return schema.empty_table()
        return pa.table([rows.column(f.name).cast(f.type) for f in METADATA_SCHEMA], schema=schema)


@dataclass(frozen=True)
class ComputePlan:
    """Where the model runs, decided on the driver from cluster resources.

    Attributes:
        actors (`int`): size of the model actor pool.
        num_gpus (`int`, *optional*): GPUs per actor; None (left out, never 0) on a cluster without GPUs.
        precision (`str`): model precision the actors use.
    """

    actors: int
    num_gpus: int | None
    precision: str

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"

    def remote_args(self) -> dict[str, Any]:
        """``map_batches`` resource arguments; without GPUs, none (Ray's default of one CPU per actor)."""
        return {"num_gpus": self.num_gpus} if self.num_gpus else {}


def plan_compute(cfg: EmbedConfig, gpus: int, cpu_pool_size: int) -> ComputePlan:
    """One actor per GPU in half precision, or, with no GPU, CPU actors in fp32 that leave a core to decoding.

    Args:
        cfg (`EmbedConfig`): ``num_actors`` overrides the pool size (capped at the GPU count on GPUs).
        gpus (`int`): GPUs of the whole cluster (:func:`~pipeline.core.ray_runtime.cluster_gpus`).
        cpu_pool_size (`int`): CPU actors that still leave room for reads
            (:func:`~pipeline.core.ray_runtime.cpu_actor_pool_size`).
    """

    if gpus > 0:
        return ComputePlan(min(cfg.num_actors or gpus, gpus), 1, resolve_precision(cfg.precision, "cuda"))
    return ComputePlan(cfg.num_actors or cpu_pool_size, None, resolve_precision(cfg.precision, "cpu"))


def embed_fingerprint(cfg: EmbedConfig, spec: ClipSpec, precision: str) -> str:
    """What makes a finished partition reusable: model and its weights, precision, decode rules, SSCD file.

    Model files count by content (sha256), so weights replaced in place under the same path re-embed.
    """
    sscd = sha256_file(cfg.sscd_checkpoint) if cfg.sscd_checkpoint else None
    return fingerprint(
        {
            "schema": EMBED_SCHEMA_VERSION,
            **result_options(cfg),
            "model": spec.identity(),
            "precision": precision,
            "sscd": sscd,
        }
    )


class Progress:
    """The driver's periodic progress line: rows and partitions done, images/s and ETA.

    The total is estimated as shards start to stream: their sizes are known from their first rows,
    shards not started yet are assumed to be of the average size seen so far.

    Args:
        partitions (`int`): partitions this run processes.
        every_s (`float`): seconds between log lines.
        clock (`Callable[[], float]`): monotonic clock (injectable for tests).
    """

    def __init__(self, partitions: int, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.partitions = partitions
        self.every_s = every_s
        self.clock = clock
        self.started = self.last_log = clock()
        self.rows = 0
        self.embedded = 0
        self.partitions_done = 0
        self.sizes: dict[str, int] = {}
        self.first_batch_s: float | None = None

    def update(self, batch: pa.Table, completed: int) -> None:
        """Count one batch that reached the driver and the partitions it completed; log when due."""
        if self.first_batch_s is None:
            self.first_batch_s = self.clock() - self.started
        self.rows += batch.num_rows
        self.embedded += pc.sum(pc.equal(batch.column("error"), NO_ERROR)).as_py() or 0
        self.partitions_done += completed
        for shard, size in shard_sizes(batch).items():
            self.sizes.setdefault(shard, size)
        now = self.clock()
        if now - self.last_log >= self.every_s:
            self.last_log = now
            log.info("%s", self.line())

    def images_per_second(self) -> float:
        return self.embedded / max(self.clock() - self.started, 1e-9)

    def eta_s(self) -> float | None:
        """Seconds left at the current row rate; None before any row arrived."""
        elapsed = self.clock() - self.started
        if self.partitions_done >= self.partitions:
            return 0.0
        if not self.rows or not self.sizes:
            return None
        expected = sum(self.sizes.values()) * max(1.0, self.partitions / len(self.sizes))
        return max(0.0, expected - self.rows) * elapsed / self.rows

    def line(self) -> str:
        eta = self.eta_s()
        eta_text = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        return (
            f"embed: {self.rows} rows, {self.partitions_done}/{self.partitions} partitions, "
            f"{self.images_per_second():.1f} img/s, ETA {eta_text}"
        )


def build_dataset(
    cfg: EmbedConfig,
    shards: dict[str, Shard],
    todo: list[str],
    spec: ClipSpec,
    plan: ComputePlan,
    actor_cls: type[EmbedActor] = EmbedActor,
) -> ray.data.Dataset:
    """The Ray Data pipeline: one read task per shard -> CPU decode tasks -> model actor pool."""
    decode_plan = DecodePlan(
        max_pixels=cfg.max_image_pixels,
        clip_preprocess=spec.preprocess,
        sscd_image_size=cfg.sscd_image_size if cfg.sscd_checkpoint else None,
    )
    ds = ray.data.from_items([{"shard": name} for name in todo], override_num_blocks=len(todo))
    ds = ds.flat_map(
        read_rows,
        fn_kwargs={"shards": shards, "max_member_bytes": cfg.max_member_bytes},
        num_cpus=cfg.decode_num_cpus,
    )
    ds = ds.map_batches(
        prepare_batch,
        batch_size=cfg.decode_batch_size,
        batch_format="pyarrow",
        fn_kwargs={"plan": decode_plan},
        num_cpus=cfg.decode_num_cpus,
    )
    return ds.map_batches(
        actor_cls,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        fn_constructor_kwargs={"cfg": cfg, "precision": plan.precision},
        **plan.remote_args(),
    )


class EmbedStage(PartitionedStage):
    """One partition per shard: ``img_emb``/``text_emb``(/``sscd_emb``) arrays and metadata, row-aligned."""

    name = "embed"

    def __init__(self, cfg: EmbedConfig, actor_cls: type[EmbedActor] = EmbedActor):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.actor_cls = actor_cls
        self.spec = clip_spec(cfg)
        self.sscd_dim = (
            load_sscd(cfg.sscd_checkpoint, cfg.sscd_image_size, "cpu").dim if cfg.sscd_checkpoint else None
        )
        self.plan = plan_compute(cfg, cluster_gpus(), cpu_actor_pool_size())
        self.inputs = ShardInputs(cfg.shards, cfg.require_stats)
        self.progress: Progress | None = None

    def fingerprint(self) -> str:
        return embed_fingerprint(self.cfg, self.spec, self.plan.precision)

    def partitions(self) -> dict[str, Any]:
        """Each shard's signature, taken before any read; the writer compares it after the read."""
        return self.inputs.sign()

    def remove(self, name: str) -> None:
        """A shard that is no longer an input, or one embedded under other options: every file goes,
        so the folder holds exactly the current input's rows for every later stage."""
        for kind in EMBEDDING_KINDS:
            embedding_path(self.out, kind, name).unlink(missing_ok=True)
        metadata_path(self.out, name).unlink(missing_ok=True)

    def compute(self, todo: list[str], commit: Commit) -> None:
        label = "semantic" if self.spec.semantic else "NON-SEMANTIC: random weights"
        log.info(
            "embed: %d shards with %s (%s) on %d %s actor(s), %s",
            len(todo),
            self.spec.name,
            label,
            self.plan.actors,
            self.plan.device,
            self.plan.precision,
        )
        fetch_weights(self.spec)
        self.progress = Progress(len(todo), self.cfg.log_every_s)
        writer = PartitionWriter(self.out, commit, self.spec, self.sscd_dim, self.inputs)
        assembler = PartitionAssembler(writer)
        dataset = build_dataset(self.cfg, self.inputs.shards, todo, self.spec, self.plan, self.actor_cls)
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            self.progress.update(batch, len(assembler.add(batch)))
        self.progress.partitions_done += len(assembler.finish_empty(todo))
        log.info("%s", self.progress.line())

    def finish(self, run: PartitionRun) -> dict[str, Any]:
        done = sorted(name for name in self.inputs.shards if name not in run.deferred)
        summary = summarize(self.out, run.markers, done, self.spec, self.plan)
        progress = self.progress
        summary.update(self.inputs.summary())
        summary.update(
            partitions_processed=len(run.processed),
            partitions_skipped=len(done) - len(run.processed),
            embedded_this_run=progress.embedded if progress else 0,
            first_batch_s=None
            if progress is None or progress.first_batch_s is None
            else round(progress.first_batch_s, 3),
        )
        return summary


def run_embed(cfg: EmbedConfig, *, actor_cls: type[EmbedActor] = EmbedActor) -> dict[str, Any]:
    """Runner: embed every shard without a valid done marker; return (and save) the run's summary.

    Needs a Ray session (see :func:`pipeline.core.ray_runtime.ray_session`). Model options are checked and
    pretrained weights fetched on the driver before any Ray work, so a model that cannot be loaded
    fails at once, with :class:`~pipeline.embed.clip_models.ModelLoadError`.

    Args:
        cfg (`EmbedConfig`): the stage's options.
        actor_cls (`type`, *optional*): the model actor class (a subclass of :class:`EmbedActor`);
            tests pass one that kills its own process to prove resumption.
    """
    started = time.monotonic()
    stage = EmbedStage(cfg, actor_cls)
    summary = run_partitioned(stage, stage.out / DONE)
    seconds = time.monotonic() - started
    summary.update(
        seconds=round(seconds, 3),
        images_per_second=round(summary["embedded_this_run"] / seconds, 2),
    )
    atomic_write_json(stage.out / "embed_summary.json", summary)
    return summary


def summarize(
    out: Path, markers: dict[str, dict[str, Any]], names: list[str], spec: ClipSpec, plan: ComputePlan
) -> dict[str, Any]:
    """Totals over every partition's marker: rows seen = embedded + skipped, skips by reason."""
    per_partition = {}
    for name in names:
        marker = markers.get(name)
        if marker is None:
            raise RuntimeError(f"partition {name} has no done marker after embedding")
        per_partition[name] = {
            k: marker[k] for k in ("rows_seen", "embedded", "skipped", "skipped_by_reason")
        }
    reasons: Counter[str] = Counter()
    for counts in per_partition.values():
        reasons.update(counts["skipped_by_reason"])
    totals = {k: sum(c[k] for c in per_partition.values()) for k in ("rows_seen", "embedded", "skipped")}
    return {
        "job": "embed",
        "out": str(out),
        "model": spec.name,
        "semantic": spec.semantic,
        "dim": spec.dim,
        "device": plan.device,
        "precision": plan.precision,
        "actors": plan.actors,
        "partitions": len(names),
        **totals,
        "skipped_by_reason": dict(sorted(reasons.items())),
        "per_partition": per_partition,
    }
