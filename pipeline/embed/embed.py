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

import io
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import EmbedConfig, result_options
from pipeline.core.ray_runtime import cluster_gpus, cpu_actor_pool_size
from pipeline.core.stage import Commit, PartitionedStage, PartitionRun, run_partitioned
from pipeline.core.storage import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    fingerprint,
    sha256_file,
)
from pipeline.embed.identity import model_identity, resolve_precision
from pipeline.embed.prepare import (
    NO_ERROR,
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

if TYPE_CHECKING:  # imported for real only when there is work: torch and open_clip take seconds to load
    from ray.data import Dataset

    from pipeline.embed.actor import EmbedActor
    from pipeline.embed.clip_models import ClipSpec

log = logging.getLogger(__name__)

EMBED_SCHEMA_VERSION = 2


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
        precision (`str`): the precision the model runs in, recorded in each marker.
        inputs (`ShardInputs`): the input shards, signed before the read.
    """

    def __init__(
        self,
        out: Path,
        commit: Commit,
        spec: ClipSpec,
        sscd_dim: int | None,
        precision: str,
        inputs: ShardInputs,
    ):
        self.out = out
        self.commit = commit
        self.spec = spec
        self.precision = precision
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
            "dim": self.spec.dim,
            "precision": self.precision,
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


def embed_fingerprint(cfg: EmbedConfig) -> str:
    """What makes a finished partition reusable: result options, the model by content, the SSCD file.

    Cheap on purpose (no model is loaded, nothing but the model files is read: see
    :mod:`pipeline.embed.identity`), so an up-to-date folder is recognised in about a second. The
    precision counts as asked for: ``auto`` embeddings made on CPU (fp32) are kept when the cluster
    later has GPUs (fp16); each partition's marker records the precision it was made in.
    """
    sscd = sha256_file(cfg.sscd_checkpoint) if cfg.sscd_checkpoint else None
    return fingerprint(
        {"schema": EMBED_SCHEMA_VERSION, **result_options(cfg), "model": model_identity(cfg), "sscd": sscd}
    )


@dataclass(frozen=True)
class ModelWork:
    """What computing partitions needs beyond the fingerprint: found by :meth:`EmbedStage.prepare`."""

    spec: ClipSpec
    sscd_dim: int | None
    plan: ComputePlan
    actor_cls: type[EmbedActor]


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
    actor_cls: type[EmbedActor],
) -> Dataset:
    """The Ray Data pipeline: one read task per shard -> CPU decode tasks -> model actor pool."""
    import ray.data  # here: Ray Data costs a job with nothing to embed a quarter of a second

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
    """One partition per shard: ``img_emb``/``text_emb``(/``sscd_emb``) arrays and metadata, row-aligned.

    Up-to-date partitions are recognised from options, model files and shard signatures alone; the
    model's description, its weights and the actor pool are found (:meth:`prepare`) only when a
    partition is to be computed.
    """

    name = "embed"

    def __init__(self, cfg: EmbedConfig, actor_cls: type[EmbedActor] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.actor_cls = actor_cls
        self.inputs = ShardInputs(cfg.shards, cfg.require_stats)
        self.fingerprint_ = embed_fingerprint(cfg)
        self.work: ModelWork | None = None
        self.progress: Progress | None = None

    def fingerprint(self) -> str:
        return self.fingerprint_

    def partitions(self) -> dict[str, Any]:
        """Each shard's signature, taken before any read; the writer compares it after the read."""
        return self.inputs.sign()

    def prepare(self, todo: list[str]) -> None:
        """Check the model options, fetch pretrained weights and plan the actors, before any partition
        is touched: a model that cannot be loaded fails here, with
        :class:`~pipeline.embed.clip_models.ModelLoadError`, and costs no finished partition."""
        from pipeline.embed.actor import EmbedActor
        from pipeline.embed.clip_models import clip_spec, fetch_weights, load_sscd

        cfg = self.cfg
        spec = clip_spec(cfg)
        fetch_weights(spec)
        sscd = load_sscd(cfg.sscd_checkpoint, cfg.sscd_image_size, "cpu") if cfg.sscd_checkpoint else None
        plan = plan_compute(cfg, cluster_gpus(), cpu_actor_pool_size())
        self.work = ModelWork(spec, sscd.dim if sscd else None, plan, self.actor_cls or EmbedActor)

    def remove(self, name: str) -> None:
        """A shard that is no longer an input, or one embedded under other options: every file goes,
        so the folder holds exactly the current input's rows for every later stage."""
        for kind in EMBEDDING_KINDS:
            embedding_path(self.out, kind, name).unlink(missing_ok=True)
        metadata_path(self.out, name).unlink(missing_ok=True)

    def compute(self, todo: list[str], commit: Commit) -> None:
        work = self.work
        assert work is not None, "run_partitioned calls prepare() before compute()"
        spec, plan = work.spec, work.plan
        log.info(
            "embed: %d shards with %s (%s) on %d %s actor(s), %s",
            len(todo),
            spec.name,
            "semantic" if spec.semantic else "NON-SEMANTIC: random weights",
            plan.actors,
            plan.device,
            plan.precision,
        )
        self.progress = Progress(len(todo), self.cfg.log_every_s)
        writer = PartitionWriter(self.out, commit, spec, work.sscd_dim, plan.precision, self.inputs)
        assembler = PartitionAssembler(writer)
        dataset = build_dataset(self.cfg, self.inputs.shards, todo, spec, plan, work.actor_cls)
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            self.progress.update(batch, len(assembler.add(batch)))
        self.progress.partitions_done += len(assembler.finish_empty(todo))
        log.info("%s", self.progress.line())

    def finish(self, run: PartitionRun) -> dict[str, Any]:
        done = sorted(name for name in self.inputs.shards if name not in run.deferred)
        summary = summarize(self.out, run.markers, done, self.work.plan if self.work else None)
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


def run_embed(cfg: EmbedConfig, *, actor_cls: type[EmbedActor] | None = None) -> dict[str, Any]:
    """Runner: embed every shard without a valid done marker; return (and save) the run's summary.

    Needs a Ray session (see :func:`pipeline.core.ray_runtime.ray_session`), used only when a shard is
    to be embedded. Model options are checked and pretrained weights fetched on the driver before any
    Ray work, so a model that cannot be loaded fails at once, with
    :class:`~pipeline.embed.clip_models.ModelLoadError`.

    Args:
        cfg (`EmbedConfig`): the stage's options.
        actor_cls (`type`, *optional*): the model actor class (a subclass of
            :class:`~pipeline.embed.actor.EmbedActor`, the default); tests pass one that kills its own
            process to prove resumption.
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
    out: Path, markers: dict[str, dict[str, Any]], names: list[str], plan: ComputePlan | None
) -> dict[str, Any]:
    """Totals over every partition's marker: rows seen = embedded + skipped, skips by reason.

    The model's name, kind and width come from the markers (one fingerprint, one model); device and
    actors describe this run's compute (``plan``; none when nothing was computed).
    """
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
    first = markers[names[0]] if names else {}
    return {
        "job": "embed",
        "out": str(out),
        "model": first.get("model"),
        "semantic": first.get("semantic"),
        "dim": first.get("dim"),
        "device": plan.device if plan else None,
        "precision": ",".join(sorted({str(markers[name]["precision"]) for name in names})) or None,
        "actors": plan.actors if plan else 0,
        "partitions": len(names),
        **totals,
        "skipped_by_reason": dict(sorted(reasons.items())),
        "per_partition": per_partition,
    }
