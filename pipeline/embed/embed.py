"""Embed: img2dataset shards -> image and caption embeddings in clip-retrieval's (LAION's) layout.

Stages, each testable alone (the shape of :mod:`pipeline.ingest.ingest`):

* reader (:func:`read_rows`): one Ray task per shard yields its raw rows, numbered in shard order;
* mapper (:func:`prepare_batch`): CPU tasks decode each image once and derive everything pixel-based
  from it: sha256, size, the pHash, the model's resized/cropped uint8 input (and SSCD's);
* model (:class:`EmbedActor`): an actor pool (one actor per GPU, or CPU actors when the cluster has no
  GPU) embeds the decoded images and their captions; rejected rows pass through with no model work,
  so the writer still sees every row of a shard;
* writer (:class:`PartitionWriter` behind a :class:`~pipeline.io.partitions.PartitionAssembler`): on the
  driver, writes a shard's partition (``img_emb``, ``text_emb``, ``metadata``; see
  :mod:`pipeline.io.embeddings`) and then its done marker, as soon as all its rows arrived;
* runner (:func:`run_embed`): skips finished partitions, plans the actor pool, logs progress, sums up.

Decoding and inference are separate Ray operators, so they overlap. Rejected rows (download
failures, broken or non-image files) are not embedded but counted by reason: for every partition,
rows seen = embedded + skipped.

This module imports neither torch nor open_clip at the top: the decode tasks import it, and each of
their worker processes would otherwise pay seconds and hundreds of MB for libraries it never uses.
The model side (:mod:`pipeline.embed.clip_models`) is imported where the driver and the actors need it.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from PIL import Image

from pipeline.core.config import EmbedConfig
from pipeline.core.ray_runtime import cluster_gpus, cpu_actor_pool_size
from pipeline.core.storage import (
    DoneMarkers,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    fingerprint,
)
from pipeline.embed.phash import SIDE, grayscale_thumbnail, phash_thumbnails
from pipeline.io.decode import decode_image, reason_of
from pipeline.io.embeddings import (
    DONE,
    IMG_EMB,
    METADATA_SCHEMA,
    SSCD_EMB,
    TEXT_EMB,
    embedding_path,
    metadata_path,
)
from pipeline.io.partitions import PartitionAssembler, shard_sizes
from pipeline.io.shards import Shard, list_shards, read_shard

if TYPE_CHECKING:
    from pipeline.embed.clip_models import ClipSpec

log = logging.getLogger(__name__)

EMBED_SCHEMA_VERSION = 1
NO_ERROR = ""
PIXELS = "pixels"
SSCD_PIXELS = "sscd_pixels"
#: Columns every row carries from the mapper to the writer, besides the pixels and embeddings. ``error`` is
#: the rejection reason with its detail, or :data:`NO_ERROR` (not null: Ray turns an all-null block's
#: column into floats on its way through numpy batches).
ROW_COLUMNS = (
    "key",
    "shard",
    "shard_rows",
    "row",
    "caption",
    "url",
    "sha256",
    "width",
    "height",
    "phash",
    "error",
)


@dataclass(frozen=True)
class DecodePlan:
    """What the decode tasks need to know about the models, derived on the driver without loading them.

    Attributes:
        max_pixels (`int`): decompression-bomb limit for :func:`~pipeline.io.decode.decode_image`.
        clip_preprocess (`dict`): the model's open_clip ``PreprocessCfg`` (from
            :func:`~pipeline.embed.clip_models.clip_spec`).
        sscd_image_size (`int`, *optional*): side of the SSCD input; None when no SSCD model is used.
    """

    max_pixels: int
    clip_preprocess: dict[str, Any]
    sscd_image_size: int | None = None


def read_rows(item: dict[str, Any], shards: dict[str, Shard]) -> list[dict[str, Any]]:
    """Reader: the raw rows of the shard named in ``item``, each with its position ``row`` in the shard."""
    rows = read_shard(shards[item["shard"]])
    for index, row in enumerate(rows):
        row["row"] = index
    return rows


def fit_to_model(image: Image.Image, preprocess: dict[str, Any]) -> Image.Image:
    """open_clip's eval geometry (resize, center crop) done with PIL alone, for the decode tasks.

    It equals the geometric steps of open_clip's own transform (torchvision on PIL images) for the
    modes :func:`~pipeline.embed.clip_models.clip_spec` accepts: ``shortest`` (the short side to the square
    size, then a center crop) and ``squash``; the tests check it against open_clip's transform.
    """
    height, width = preprocess["size"]
    resample = (
        Image.Resampling.BILINEAR if preprocess["interpolation"] == "bilinear" else Image.Resampling.BICUBIC
    )
    if preprocess["resize_mode"] == "squash":
        return image.resize((width, height), resample) if image.size != (width, height) else image
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = height, int(height * long / short)  # torchvision's rounding
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left, top = int(round((new_w - width) / 2.0)), int(round((new_h - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


def prepare_batch(batch: pa.Table, plan: DecodePlan) -> dict[str, np.ndarray]:
    """Mapper: decode each image once; pHash it and resize it to the model inputs as uint8 pictures.

    Rejected rows keep their place with ``error`` set and all-zero pixels, so the model actor can pass
    them through and the writer can count them.
    """
    height, width = plan.clip_preprocess["size"]
    n = batch.num_rows
    pixels = np.zeros((n, height, width, 3), dtype=np.uint8)
    thumbnails = np.zeros((n, SIDE, SIDE), dtype=np.float32)
    sscd_side = plan.sscd_image_size
    sscd_pixels = np.zeros((n, sscd_side, sscd_side, 3), dtype=np.uint8) if sscd_side else None
    columns: dict[str, list[Any]] = {name: [] for name in ROW_COLUMNS if name != "phash"}
    for i, row in enumerate(batch.to_pylist()):
        decoded = None if row["read_error"] else decode_image(row["image"], plan.max_pixels)
        error = row["read_error"] or decoded.error
        for name in ("key", "shard", "shard_rows", "row", "caption", "url"):
            columns[name].append(row[name])
        columns["sha256"].append(decoded.sha256 if decoded else "")
        columns["width"].append(decoded.width if decoded else 0)
        columns["height"].append(decoded.height if decoded else 0)
        columns["error"].append(error or NO_ERROR)
        if error is None:
            pixels[i] = np.asarray(fit_to_model(decoded.image, plan.clip_preprocess))
            thumbnails[i] = grayscale_thumbnail(decoded.image)
            if sscd_pixels is not None:
                sscd_pixels[i] = np.asarray(
                    decoded.image.resize((sscd_side, sscd_side), Image.Resampling.BILINEAR)
                )
    ok = np.array([e == NO_ERROR for e in columns["error"]], dtype=bool)
    out: dict[str, np.ndarray] = {name: np.array(values, dtype=object) for name, values in columns.items()}
    for name in ("shard_rows", "row", "width", "height"):
        out[name] = np.asarray(columns[name], dtype=np.int64)
    out["phash"] = np.where(ok, phash_thumbnails(thumbnails), np.uint64(0))
    out[PIXELS] = pixels
    if sscd_pixels is not None:
        out[SSCD_PIXELS] = sscd_pixels
    return out


class EmbedActor:
    """Model stage: image and caption embeddings (and SSCD descriptors) for the decoded rows of a batch.

    The device is chosen here, not on the driver: Ray hides GPUs from actors that did not ask for one.

    Args:
        cfg (`EmbedConfig`): model, batch size and SSCD options.
        precision (`str`): see :func:`~pipeline.embed.clip_models.resolve_precision` (fp32 on CPU regardless).
    """

    def __init__(self, cfg: EmbedConfig, precision: str):
        import torch

        from pipeline.embed.clip_models import load_clip, load_sscd

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = load_clip(cfg, device, precision)
        self.sscd = (
            load_sscd(cfg.sscd_checkpoint, cfg.sscd_image_size, device) if cfg.sscd_checkpoint else None
        )
        self.batch_size = cfg.batch_size
        log.info("embed actor: %s on %s (%s)", self.clip.name, device, self.clip.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == NO_ERROR
        out = {name: batch[name] for name in ROW_COLUMNS}
        captions = [str(caption) for caption in batch["caption"][ok]]
        out[IMG_EMB] = _scatter(self.clip.encode_images(batch[PIXELS][ok], self.batch_size), ok)
        out[TEXT_EMB] = _scatter(self.clip.encode_texts(captions, self.batch_size), ok)
        if self.sscd is not None:
            out[SSCD_EMB] = _scatter(self.sscd.encode(batch[SSCD_PIXELS][ok], self.batch_size), ok)
        return out


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

    Args:
        out (`Path`): output folder.
        markers (`DoneMarkers`): markers under ``out/done``.
        shards (`dict[str, Shard]`): the input shards, for the source signature in each marker.
        spec (`ClipSpec`): the model, for labels and the width of empty partitions.
        sscd_dim (`int`, *optional*): SSCD descriptor width; None when no SSCD model is used.
    """

    def __init__(
        self, out: Path, markers: DoneMarkers, shards: dict[str, Shard], spec: ClipSpec, sscd_dim: int | None
    ):
        self.out = out
        self.markers = markers
        self.shards = shards
        self.spec = spec
        self.dims = {IMG_EMB: spec.dim, TEXT_EMB: spec.dim} | ({SSCD_EMB: sscd_dim} if sscd_dim else {})

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
            "source": self.shards[name].signature(),
            "model": self.spec.name,
            "semantic": self.spec.semantic,
        }
        self.markers.write(name, info)
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
    from pipeline.embed.clip_models import resolve_precision

    if gpus > 0:
        return ComputePlan(min(cfg.num_actors or gpus, gpus), 1, resolve_precision(cfg.precision, "cuda"))
    return ComputePlan(cfg.num_actors or cpu_pool_size, None, resolve_precision(cfg.precision, "cpu"))


def embed_fingerprint(cfg: EmbedConfig, spec: ClipSpec, precision: str) -> str:
    """What makes a finished partition reusable: model and its weights, precision, decode rules, SSCD file."""
    sscd = None
    if cfg.sscd_checkpoint:
        st = os.stat(cfg.sscd_checkpoint)
        sscd = [str(Path(cfg.sscd_checkpoint).resolve()), st.st_size, st.st_mtime_ns, cfg.sscd_image_size]
    return fingerprint(
        {
            "schema": EMBED_SCHEMA_VERSION,
            "model": spec.identity(),
            "precision": precision,
            "max_image_pixels": cfg.max_image_pixels,
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
    ds = ds.flat_map(read_rows, fn_kwargs={"shards": shards}, num_cpus=cfg.decode_num_cpus)
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
    from pipeline.embed.clip_models import clip_spec, fetch_weights, load_sscd

    started = time.monotonic()
    out = Path(cfg.out)
    spec = clip_spec(cfg)
    sscd_dim = load_sscd(cfg.sscd_checkpoint, cfg.sscd_image_size, "cpu").dim if cfg.sscd_checkpoint else None
    plan = plan_compute(cfg, cluster_gpus(), cpu_actor_pool_size())
    markers = DoneMarkers(out / DONE, embed_fingerprint(cfg, spec, plan.precision))
    shards = {s.name: s for s in list_shards(cfg.shards)}
    todo = [
        name
        for name, shard in shards.items()
        if (marker := markers.read(name)) is None or marker.get("source") != shard.signature()
    ]
    label = "semantic" if spec.semantic else "NON-SEMANTIC: random weights"
    log.info(
        "embed: %d shards, %d already done, %d to embed with %s (%s) on %d %s actor(s), %s",
        len(shards),
        len(shards) - len(todo),
        len(todo),
        spec.name,
        label,
        plan.actors,
        plan.device,
        plan.precision,
    )
    progress = Progress(len(todo), cfg.log_every_s)
    if todo:
        fetch_weights(spec)
        assembler = PartitionAssembler(PartitionWriter(out, markers, shards, spec, sscd_dim))
        dataset = build_dataset(cfg, shards, todo, spec, plan, actor_cls)
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            progress.update(batch, len(assembler.add(batch)))
        progress.partitions_done += len(assembler.finish_empty(todo))
        log.info("%s", progress.line())
    summary = summarize(out, markers, sorted(shards), spec, plan)
    seconds = time.monotonic() - started
    summary.update(
        partitions_processed=len(todo),
        partitions_skipped=len(shards) - len(todo),
        embedded_this_run=progress.embedded,
        first_batch_s=None if progress.first_batch_s is None else round(progress.first_batch_s, 3),
        seconds=round(seconds, 3),
        images_per_second=round(progress.embedded / seconds, 2),
    )
    atomic_write_json(out / "embed_summary.json", summary)
    return summary


def summarize(
    out: Path, markers: DoneMarkers, names: list[str], spec: ClipSpec, plan: ComputePlan
) -> dict[str, Any]:
    """Totals over every partition's marker: rows seen = embedded + skipped, skips by reason."""
    per_partition = {}
    for name in names:
        marker = markers.read(name)
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
