"""The artifact bundle: a versioned folder with everything AMG and the audits need, searchable offline.

Built by ``jobs/build_artifacts.py`` (:func:`build_bundle`) from img2dataset shards, in steps:

1. ``ingest``: every row seen (:func:`pipeline.ingest.ingest.run_ingest`) -> ``samples.parquet``;
2. ``embed``: open_clip image/caption embeddings, pHash (:func:`pipeline.embed.embed.run_embed`) ->
   ``embeddings/`` in clip-retrieval's layout (written there directly, not copied);
3. ``cells``: the k-means cells image dedup, the index and the table share (:mod:`pipeline.index.cells`),
   kept under ``_work/cells/``;
   ``image_dedup``: exact / pHash / semantic image groups (:mod:`pipeline.dedup.image`) ->
   ``image_duplicates.parquet``;
4. ``caption_dedup``: near-duplicate captions (:mod:`pipeline.dedup.caption`) ->
   ``caption_duplicates.parquet``;
5. ``index``: the FAISS index over image embeddings (:mod:`pipeline.index.build`) -> ``index/``;
   ``sscd_index``: when the embed stage wrote SSCD copy descriptors (``--embed-sscd-checkpoint``), an
   index over them too (``index/sscd.index``), so audits and AMG can search by copy similarity;
6. ``tables``: the G_dup table (:mod:`pipeline.bundle.tables`) -> ``caption_dedup_table.parquet``;
   ``report``: the dedup report (:mod:`pipeline.dedup.report`) -> ``dedup_report.html``;
7. ``manifest.json``, written last, after the row counts were checked to agree across files: format
   version, root hash, code and library versions, model, thresholds, counts, invariants, and every
   file's path, size and sha256 (plus schemas of the tables).

Layout::

    manifest.json
    samples.parquet                 ingest: one row per sample seen, rejected ones included
    embeddings/                     img_emb/, text_emb/, metadata/, done/, embed_summary.json
    image_duplicates.parquet        pipeline.dedup.image
    caption_duplicates.parquet      pipeline.dedup.caption (row order = the bundle's row ids)
    caption_dedup_table.parquet     pipeline.bundle.tables (G_dup)
    dedup_report.html               pipeline.dedup.report (groups, thresholds, borderline pairs)
    index/image.index               FAISS index over img_emb, row ids = bundle row ids
    index/image.ivfdata             its inverted lists, when it is IVF-Flat over the cells (lists on disk)
    index/dup_image.index           FAISS IDMap over the images that have duplicates (ids = row ids)
    index/index_rows.parquet        row_id -> key, caption, partition, partition_row
    index/index_info.json           index plan, search settings, recall self-check
    index/sscd.index                FAISS index over sscd_emb (only with --embed-sscd-checkpoint)
    index/sscd_index_info.json      its plan, search settings and recall self-check
    _work/                          resume state (stage outputs, step markers); not part of the bundle

Row ids number the embedded (ok) rows in partition order; the index, the tables and
:meth:`Bundle.embeddings` all use them. Stages publish their final files into the bundle as hard
links (a copy across filesystems).

Resuming: each step is a :class:`~pipeline.core.stage.FunctionStage` run through the stage contract
(:func:`~pipeline.core.stage.run_stage`): it writes its outputs, then ``_work/steps/<step>.done.json``
with a fingerprint of its result options and of its inputs (the shards' sizes and mtimes, the upstream
steps' fingerprints). A re-run skips every step whose marker matches and whose outputs exist, and
rewrites nothing when all match; the ingest and embed stages also resume per shard inside a step.
Deleting ``_work/`` only costs a rebuild.

Consumers open a bundle with :func:`pipeline.bundle.reader.open_bundle`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.bundle.layout import (
    BUNDLE_FORMAT_VERSION,
    CAPTION_DUPLICATES,
    EMBEDDINGS,
    INDEX_DIR,
    INDEXED_KINDS,
    MANIFEST,
    SAMPLES,
    SSCD_INDEX_NAME,
    SSCD_INFO_NAME,
    STEPS,
    TABLE_NAME,
    WORK,
    BundleError,
    bundle_files,
    root_hash,
)
from pipeline.bundle.reader import check_files
from pipeline.bundle.tables import SCHEMA_VERSION as TABLE_SCHEMA_VERSION
from pipeline.bundle.tables import TableInputs, build_dedup_table, rows_with_duplicate_caption
from pipeline.core.config import (
    CaptionDedupConfig,
    EmbedConfig,
    ImageDedupConfig,
    PipelineConfig,
    result_options,
    to_dict,
)
from pipeline.core.ray_runtime import ensure_ray
from pipeline.core.stage import FunctionStage, run_stage, seconds_since
from pipeline.core.storage import (
    atomic_write_json,
    atomic_write_table,
    fingerprint,
    publish_tmp,
    sha256_file,
    unique_tmp_path,
)
from pipeline.core.tasks import run_tasks
from pipeline.core.versions import installed_version
from pipeline.dedup.caption import find_caption_duplicates
from pipeline.dedup.caption_partitioned import find_caption_duplicates_partitioned
from pipeline.dedup.image_shuffle import run_image_dedup
from pipeline.dedup.names import OUTPUT_NAME as IMAGE_DUPLICATES
from pipeline.dedup.names import SUMMARY_NAME as IMAGE_DEDUP_SUMMARY
from pipeline.dedup.report import REPORT_NAME as DEDUP_REPORT
from pipeline.dedup.report import REPORT_VERSION, write_dedup_report
from pipeline.embed.embed import run_embed
from pipeline.embed.identity import model_identity
from pipeline.embed.prepare import POISON_BATCH
from pipeline.index.build import (
    DUP_INDEX_NAME,
    INDEX_NAME,
    INFO_NAME,
    ROWS_NAME,
    run_build_index,
)
from pipeline.index.cells import INFO as CELLS_INFO
from pipeline.index.cells import run_cells
from pipeline.index.ivf_cells import data_file
from pipeline.ingest.ingest import ingest_fingerprint, run_ingest
from pipeline.io.embeddings import (
    DONE,
    EMBEDDING_KINDS,
    IMG_EMB,
    SSCD_EMB,
    embedding_model,
    embedding_path,
    folder_signature,
    is_semantic,
    list_partitions,
    load_metadata,
    metadata_path,
)
from pipeline.io.shards import list_shards

log = logging.getLogger(__name__)

#: Rows per reduce task of caption dedup's shuffles (files per step = map tasks x reducers).
CAPTION_ROWS_PER_REDUCER = 250_000


def _publish(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` as a hard link (a copy where linking fails), replacing ``dst`` atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = unique_tmp_path(dst, "link")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        publish_tmp(tmp, dst)  # fsync (a no-op for a link to a synced file), rename, fsync the folder
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def code_version() -> dict[str, Any]:
    """The package version, in a git checkout the commit and whether the tree had changes, and the
    versions of the libraries that decide the numbers."""

    version: dict[str, Any] = {"package": installed_version("amg-dedup-pipeline")}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline", "jobs"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        version.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        version.update(git_commit=None, git_dirty=None)
    version["libraries"] = {name: installed_version(name) for name in KEY_LIBRARIES}
    return version


#: Libraries whose version can change a bundle's numbers (decoding, models, indexes, tables).
KEY_LIBRARIES = ("torch", "open_clip_torch", "faiss-gpu", "numpy", "pyarrow", "pillow", "ray", "datasketch")


def _sha256_or_none(path: str | None) -> str | None:
    return sha256_file(path) if path else None


def _schema_of(path: Path) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in pq.read_schema(path)]


def _shards_signature(shards: str) -> list[Any]:

    return [[s.name, s.signature()] for s in list_shards(shards)]


def bundle_steps(cfg: PipelineConfig) -> list[FunctionStage]:
    """The bundle's steps in order, each with the fingerprint of what its outputs depend on.

    Every stage's own options enter through :func:`~pipeline.core.config.result_options`; a step's
    inputs enter as the shards' signature or the fingerprints of the steps it reads from, so they are
    all known before anything runs. Each stage writes under ``_work/<step>/`` (and resumes there, per
    shard for ingest and embed); the step then publishes its final files into the bundle.
    """
    b = cfg.bundle
    root = Path(b.out)
    work = root / WORK
    emb_dir = root / EMBEDDINGS
    index_dir = root / INDEX_DIR
    shards_sig = _shards_signature(b.shards) if b.shards else None
    ingest_cfg = dataclasses.replace(cfg.ingest, shards=b.shards, out=str(work / "ingest"))
    embed_cfg = dataclasses.replace(cfg.embed, shards=b.shards, out=str(emb_dir))
    # The bundle's own report step covers images and captions, with thumbnails from the shards.
    dedup_cfg = dataclasses.replace(
        cfg.image_dedup, embeddings=str(emb_dir), out=str(work / "image_dedup"), report=False
    )
    index_cfg = dataclasses.replace(
        cfg.index,
        embeddings=str(emb_dir),
        out=str(work / "index"),
        duplicates=str(work / "image_dedup" / IMAGE_DUPLICATES),
    )
    sscd_cfg = dataclasses.replace(index_cfg, out=str(work / "sscd_index"), duplicates=None)
    cells_dir, sscd_cells_dir = work / "cells", work / "sscd_cells"
    # Models by content: weights replaced in place under the same path are a new model.
    models = {"clip": model_identity(embed_cfg), "sscd": _sha256_or_none(embed_cfg.sscd_checkpoint)}
    if b.embeddings:  # built from a given embedding folder: its files and the model named for it
        fp_embed = fingerprint({"embeddings": folder_signature(b.embeddings), "models": models})
    else:
        fp_embed = fingerprint({"embed": result_options(embed_cfg), "models": models, "shards": shards_sig})
    fp_cells = fingerprint({"cells": result_options(cfg.cells), "embed": fp_embed})
    fp_dedup = fingerprint({"image_dedup": result_options(dedup_cfg), "cells": fp_cells})
    fp_caption = fingerprint({"caption_dedup": result_options(cfg.caption_dedup), "embed": fp_embed})
    fp_index = fingerprint({"index": result_options(index_cfg), "cells": fp_cells, "image_dedup": fp_dedup})
    index_files = (INDEX_NAME, DUP_INDEX_NAME, ROWS_NAME, INFO_NAME)
    sscd_files = (SSCD_INDEX_NAME, SSCD_INFO_NAME)

    def ingest() -> dict[str, Any]:
        summary = _all_shards_read(run_ingest(ingest_cfg), "ingest")
        summary.pop("per_shard", None)
        _publish(work / "ingest" / SAMPLES, root / SAMPLES)
        return summary

    def embed() -> dict[str, Any]:
        if b.embeddings:
            summary = import_embeddings(Path(b.embeddings), emb_dir, embed_cfg)
        else:
            summary = _all_shards_read(run_embed(embed_cfg), "embed")
            summary.pop("per_partition", None)
        summary["models"] = models  # hashed before embedding: what the manifest vouches for
        return summary

    def cells() -> dict[str, Any]:
        return run_cells(cfg.cells, emb_dir, cells_dir)

    def image_dedup() -> dict[str, Any]:
        summary = run_image_dedup(dedup_cfg, cfg.cells, cells_dir)
        _publish(work / "image_dedup" / IMAGE_DUPLICATES, root / IMAGE_DUPLICATES)
        return summary

    def caption_dedup() -> dict[str, Any]:
        # In the bundle's row order (embedded rows, partition order), not a parquet folder's.
        out = work / "caption_dedup"
        if inline():
            meta = load_metadata(emb_dir, ["key", "caption"])
            result = find_caption_duplicates(
                meta.column("caption"), cfg.caption_dedup, keys=meta.column("key")
            )
            atomic_write_table(out / CAPTION_DUPLICATES, result.table)
            stats = result.stats
        else:  # shuffles between Ray tasks: no process holds every caption
            ensure_ray()
            parts = [(metadata_path(emb_dir, p.name), p.num_rows()) for p in list_partitions(emb_dir)]
            reducers = max(1, -(-sum(rows for _, rows in parts) // CAPTION_ROWS_PER_REDUCER))
            stats = find_caption_duplicates_partitioned(
                parts, cfg.caption_dedup, out, out / CAPTION_DUPLICATES, reducers=reducers
            )
        atomic_write_json(out / "caption_dedup_summary.json", stats)
        _publish(out / CAPTION_DUPLICATES, root / CAPTION_DUPLICATES)
        return {k: v for k, v in stats.items() if k != "stage_seconds"}

    def index() -> dict[str, Any]:
        summary = run_build_index(index_cfg, cells=cfg.cells, cells_dir=cells_dir)
        _publish_index(work / "index", index_dir, index_files)
        return summary

    def sscd_index() -> dict[str, Any]:
        label = {"sscd_checkpoint": cfg.embed.sscd_checkpoint, "sscd_image_size": cfg.embed.sscd_image_size}
        summary = run_build_index(sscd_cfg, SSCD_EMB, label, cfg.cells, sscd_cells_dir)
        _publish_index(work / "sscd_index", index_dir, sscd_files)
        return {k: summary[k] for k in ("rows", "factory", "recall_at_k", "seconds")}

    def tables() -> dict[str, Any]:
        inputs = TableInputs(
            str(emb_dir), str(cells_dir), str(root / IMAGE_DUPLICATES), str(root / CAPTION_DUPLICATES)
        )
        return build_dedup_table(inputs, root / TABLE_NAME, work / "tables", inline=inline())

    def report() -> dict[str, Any]:
        (stats,) = run_tasks(
            _report_task, [(root, dedup_cfg, cfg.caption_dedup, b.shards)], inline=inline(), fresh_worker=True
        )
        return stats

    def inline() -> bool:
        """Small bundles run their steps here; from ``cells.ray_min_rows`` rows, in Ray tasks."""
        rows = sum(p.num_rows() for p in list_partitions(emb_dir))
        return rows < cfg.cells.ray_min_rows

    steps = []
    if not b.embeddings:
        fp_ingest = fingerprint({"ingest": ingest_fingerprint(ingest_cfg), "shards": shards_sig})
        steps.append(FunctionStage("ingest", fp_ingest, [root / SAMPLES], ingest))
    steps += [
        FunctionStage("embed", fp_embed, [emb_dir / IMG_EMB], embed),
        FunctionStage("cells", fp_cells, [cells_dir / CELLS_INFO], cells),
        FunctionStage("image_dedup", fp_dedup, [root / IMAGE_DUPLICATES], image_dedup),
        FunctionStage("caption_dedup", fp_caption, [root / CAPTION_DUPLICATES], caption_dedup),
        FunctionStage("index", fp_index, [index_dir / name for name in index_files], index),
    ]
    if cfg.embed.sscd_checkpoint:  # the index over SSCD copy descriptors, when the embed stage made them
        fp_sscd = fingerprint(
            {"index": result_options(index_cfg), "embed": fp_embed, "cells": fp_cells, "kind": SSCD_EMB}
        )
        steps.append(
            FunctionStage("sscd_index", fp_sscd, [index_dir / name for name in sscd_files], sscd_index)
        )
    fp_tables = fingerprint(
        {"cells": fp_cells, "image_dedup": fp_dedup, "caption_dedup": fp_caption, "v": TABLE_SCHEMA_VERSION}
    )
    steps.append(FunctionStage("tables", fp_tables, [root / TABLE_NAME], tables))
    fp_report = fingerprint({"image_dedup": fp_dedup, "caption_dedup": fp_caption, "v": REPORT_VERSION})
    steps.append(FunctionStage("report", fp_report, [root / DEDUP_REPORT], report))
    return steps


def import_embeddings(source: Path, dest: Path, embed_cfg: EmbedConfig) -> dict[str, Any]:
    """Mirror a LAION-layout embedding folder into the bundle, as the embed step's output.

    Each partition's files (``img_emb``, ``text_emb``/``sscd_emb`` when present, ``metadata``, and our
    own embed stage's done marker) are hard-linked, or copied where the filesystems differ; a file of
    an earlier import that the source no longer has is removed. The model is the folder's
    ``embed_model`` label when our embed stage wrote one, else the one named by ``embed_cfg``
    (LAION's release carries no label).

    Raises:
        FileNotFoundError: ``source`` is not an embedding folder, or has no partition.
    """
    partitions = list_partitions(source)  # also refuses a folder holding two runs' partitions
    if not partitions:
        raise FileNotFoundError(f"{source} has no partitions ({IMG_EMB}/*.npy with their metadata/)")
    wanted: dict[Path, Path] = {}
    for partition in partitions:
        files = [embedding_path(source, kind, partition.name) for kind in EMBEDDING_KINDS]
        files += [metadata_path(source, partition.name), source / DONE / f"{partition.name}.done.json"]
        wanted |= {path.relative_to(source): path for path in files if path.is_file()}
    for rel, path in wanted.items():
        _publish(path, dest / rel)
    for path in [p for p in dest.rglob("*") if p.is_file()]:
        if path.relative_to(dest) not in wanted:
            path.unlink()
    named = embed_cfg.model + (f"/{embed_cfg.pretrained}" if embed_cfg.pretrained else "")
    log.info("bundle: embeddings of %d partitions taken from %s", len(partitions), source)
    return {
        "source": str(source),
        "partitions": len(partitions),
        "embedded": sum(p.num_rows() for p in list_partitions(dest)),
        "dim": int(partitions[0].embeddings(IMG_EMB, mmap=True).shape[1]),
        "model": embedding_model(dest) or named,
        "semantic": is_semantic(dest),
        "skipped_by_reason": {},
    }


def _all_shards_read(summary: dict[str, Any], stage: str) -> dict[str, Any]:
    """``summary``, after checking the stage left no shard out; a bundle is all of its input or nothing.

    Raises:
        BundleError: shards incomplete (no ``_stats.json`` yet), changed while read, or whose row count
            differs from their stats file; the message names them.
    """
    left_out = {
        "incomplete (no _stats.json yet)": summary.get("shards_incomplete") or [],
        "changed while being read": summary.get("shards_changed_during_read") or [],
        "row count differs from _stats.json": sorted(summary.get("shards_stats_mismatch") or {}),
    }
    problems = [f"{why}: {names[:10]}" for why, names in left_out.items() if names]
    if problems:
        raise BundleError(
            f"bundle: the {stage} stage left shards out ({'; '.join(problems)}); a bundle holds all of its "
            f"input: finish or fix the download (or remove those shards) and build again"
        )
    return summary


def _report_task(
    root: Path, image_cfg: ImageDedupConfig, caption_cfg: CaptionDedupConfig, shards: str
) -> dict[str, Any]:
    """The bundle's ``dedup_report.html``: image and caption groups, thumbnails from ``shards``."""
    return write_dedup_report(
        root / DEDUP_REPORT,
        image_duplicates=root / IMAGE_DUPLICATES,
        image_summary=root / WORK / "image_dedup" / IMAGE_DEDUP_SUMMARY,
        image_cfg=image_cfg,
        embeddings=root / EMBEDDINGS,
        shards=shards,
        caption_duplicates=root / CAPTION_DUPLICATES,
        caption_summary=root / WORK / "caption_dedup" / "caption_dedup_summary.json",
        caption_cfg=caption_cfg,
        title="Bundle duplicates",
    )


def _publish_index(work: Path, index_dir: Path, names: tuple[str, ...]) -> None:
    """Publish an index stage's files, and the index's on-disk lists when it has them."""
    for name in names:
        _publish(work / name, index_dir / name)
    data = data_file(work / names[0])
    if data.is_file():
        _publish(data, index_dir / data.name)
    else:
        data_file(index_dir / names[0]).unlink(missing_ok=True)


def build_bundle(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every step not yet done for ``cfg.bundle.shards`` into ``cfg.bundle.out``; write the manifest.

    Needs a Ray session (:func:`pipeline.core.ray_runtime.ray_session`). The other sections of ``cfg``
    (ingest, embed, image_dedup, caption_dedup, index) supply each stage's options; their input and
    output folders are set here. Returns the build summary (also in ``_work/build_summary.json``).
    """
    started = time.monotonic()
    b = cfg.bundle
    if b.duplicate_caption_k < 1 or b.duplicate_caption_min_count < 1:
        raise ValueError(
            "bundle.duplicate_caption_k and bundle.duplicate_caption_min_count must be at least 1"
        )
    if not (b.shards or b.embeddings):
        raise ValueError(
            "give --shards (img2dataset shards) or --embeddings (a LAION-layout embedding folder)"
        )
    root = Path(b.out)
    # 1-6. the steps, each skipped when its marker matches and its outputs exist
    steps = bundle_steps(cfg)
    summaries = {step.name: run_stage(step, root / WORK / "steps") for step in steps}
    ran = [name for name, summary in summaries.items() if not summary["skipped"]]
    skipped = [name for name, summary in summaries.items() if summary["skipped"]]

    # 7. the manifest, last
    fp_manifest = fingerprint(
        {
            "format": BUNDLE_FORMAT_VERSION,
            "steps": [step.fingerprint() for step in steps],
            "min_count": b.duplicate_caption_min_count,
            "k": b.duplicate_caption_k,
        }
    )
    manifest_path = root / MANIFEST
    current = _read_json(manifest_path)
    _remove_strays(root, [path for step in steps for path in step.outputs()])
    if ran or current is None or current.get("build_fingerprint") != fp_manifest:
        invariants = check_invariants(root, summaries.get("ingest"), summaries["embed"])
        manifest = _manifest(root, cfg, summaries, fp_manifest)
        manifest["invariants"] = invariants
        manifest["root_hash"] = root_hash(manifest)
        atomic_write_json(manifest_path, manifest)
        manifest_written = True
    else:
        manifest = current
        manifest_written = False
    bundle_root = check_files(root, manifest, full=b.verify_checksums and manifest_written)
    summary = {
        "job": "build_artifacts",
        "out": str(root),
        "format_version": BUNDLE_FORMAT_VERSION,
        "root_hash": bundle_root,
        "rows": manifest["counts"]["rows"],
        "image_duplicate_groups": manifest["counts"]["image_duplicate_groups"],
        "caption_duplicate_groups": manifest["counts"]["caption_duplicate_groups"],
        "index": manifest["index"]["factory"],
        "index_recall_at_k": manifest["index"]["recall_at_k"],
        "steps_run": ran,
        "steps_skipped": skipped,
        "manifest_written": manifest_written,
        "seconds": seconds_since(started),
    }
    atomic_write_json(root / WORK / "build_summary.json", summary)
    return summary


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove_strays(root: Path, outputs: list[Path]) -> None:
    """Delete bundle files no step of this build wrote (e.g. an SSCD index from an earlier build).

    Everything under ``embeddings/`` is the embed stage's, which keeps that folder equal to its
    current input itself; elsewhere only the steps' declared outputs may remain.
    """
    keep = {path.resolve() for path in outputs}
    keep |= {data_file(path) for path in keep if path.suffix == ".index"}  # their lists on disk
    for path in bundle_files(root):
        rel = path.relative_to(root)
        if rel.parts[0] == EMBEDDINGS or path.resolve() in keep:
            continue
        log.warning("bundle: removing %s, which this build does not produce", rel)
        path.unlink()


def check_invariants(
    root: Path, ingest: dict[str, Any] | None, embed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Row counts that must agree across the bundle's files, read from the files themselves.

    Ingest's ok rows (less those embed gave up as poison batches; when the bundle was built from
    ingested shards) = embedded rows = rows of the
    index (and of the SSCD index) = rows of the G_dup table = rows of the caption groups; and every
    image-group row id is one of those rows. (Each shard's rows equal its ``_stats.json`` count
    already: ingest and embed leave out any that differ, and the build refuses to go on without them.)

    Raises:
        BundleError: a count disagrees; the message names each one (no manifest is written).
    """
    rows = sum(partition.num_rows() for partition in list_partitions(root / EMBEDDINGS))
    poison = int((embed or {}).get("skipped_by_reason", {}).get(POISON_BATCH, 0))
    counts = {
        **(
            {}
            if ingest is None
            else {"samples_ok": None if ingest.get("ok") is None else ingest["ok"] - poison}
        ),
        "embedded_rows": rows,
        "index_ntotal": json.loads((root / INDEX_DIR / INFO_NAME).read_text())["index"]["ntotal"],
        "table_rows": pq.ParquetFile(root / TABLE_NAME).metadata.num_rows,
        "caption_group_rows": pq.ParquetFile(root / CAPTION_DUPLICATES).metadata.num_rows,
    }
    if (root / INDEX_DIR / SSCD_INFO_NAME).is_file():
        counts["sscd_index_ntotal"] = json.loads((root / INDEX_DIR / SSCD_INFO_NAME).read_text())["index"][
            "ntotal"
        ]
    image_rows = pq.read_table(root / IMAGE_DUPLICATES, columns=["row_id"]).column("row_id").to_numpy()
    problems = [f"{name} = {value}" for name, value in counts.items() if value != rows]
    if len(image_rows) and (image_rows.min() < 0 or image_rows.max() >= rows):
        problems.append(f"image_duplicates row ids span {image_rows.min()}..{image_rows.max()}")
    if problems:
        raise BundleError(
            f"bundle {root} is inconsistent (expected {rows} rows everywhere): {'; '.join(problems)}"
        )
    return {"rows": rows, **counts, "poison_batch_rows": poison}


def _manifest(root: Path, cfg: PipelineConfig, s: dict[str, dict[str, Any]], fp: str) -> dict[str, Any]:
    files = {}
    for path in bundle_files(root):
        files[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def artifact(rel: str, description: str, **extra: Any) -> dict[str, Any]:
        entry = {"path": rel, "description": description, **files[rel], **extra}
        if rel.endswith(".parquet"):
            entry.update(
                format="parquet",
                schema=_schema_of(root / rel),
                rows=pq.ParquetFile(root / rel).metadata.num_rows,
            )
        return entry

    index_info = json.loads((root / INDEX_DIR / INFO_NAME).read_text())
    partitions = list_partitions(root / EMBEDDINGS)
    emb_files = {k: v for k, v in files.items() if k.startswith(f"{EMBEDDINGS}/")}
    table = pq.read_table(root / TABLE_NAME, columns=["cell_caption_count"])
    embed = s.get("embed", {})
    dedup = s.get("image_dedup", {})
    caption = s.get("caption_dedup", {})
    ingest = s.get("ingest", {})
    semantic_pass = dedup.get("passes", {}).get("semantic", {})
    check = index_info["self_check"]
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "build_fingerprint": fp,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "model": {
            "name": embed.get("model"),
            "semantic": embed.get("semantic"),
            "dim": embed.get("dim"),
            "pretrained": cfg.embed.pretrained,
            "checkpoint": cfg.embed.checkpoint,
            "checkpoint_sha256": embed.get("models", {}).get("clip", {}).get("checkpoint_sha256"),
        },
        "thresholds": {
            "image_exact": cfg.image_dedup.exact,
            "image_phash_max_distance": cfg.image_dedup.phash_max_distance if cfg.image_dedup.phash else None,
            "image_semantic": cfg.image_dedup.semantic,
            "image_semantic_threshold": cfg.image_dedup.semantic_threshold,
            "image_semantic_ran": "skipped" not in semantic_pass and bool(semantic_pass),
            "image_semantic_k": cfg.image_dedup.semantic_k,
            "caption_jaccard_threshold": cfg.caption_dedup.threshold,
            "caption_shingle_size": cfg.caption_dedup.shingle_size,
            "caption_num_perm": cfg.caption_dedup.num_perm,
            "duplicate_caption_k": cfg.bundle.duplicate_caption_k,
            "duplicate_caption_min_count": cfg.bundle.duplicate_caption_min_count,
        },
        "counts": {
            "samples_seen": ingest.get("rows_seen"),
            "samples_ok": ingest.get("ok"),
            "samples_rejected": ingest.get("rejected"),
            "rows": embed.get("embedded"),
            "image_duplicate_groups": dedup.get("groups"),
            "rows_in_image_groups": dedup.get("rows_in_groups"),
            "removable_image_rows": dedup.get("removable_rows"),
            "caption_duplicate_groups": caption.get("duplicate_groups"),
            "rows_in_caption_groups": caption.get("rows_in_duplicate_groups"),
            "rows_with_duplicate_caption": rows_with_duplicate_caption(
                table, cfg.bundle.duplicate_caption_min_count
            ),
        },
        "index": {
            "kind": index_info["plan"]["kind"],
            "factory": index_info["plan"]["factory"],
            "reason": index_info["plan"]["reason"],
            "search": {k: v for k, v in index_info["index"].items() if k in ("nprobe", "nlist", "ef_search")},
            "recall_at_k": check["recall_at_k"],
            "recall_k": check["k"],
            "recall_queries": check["queries"],
            "target_recall": check["target_recall"],
            "duplicates_subindex_rows": index_info.get("duplicates_subindex", {}).get("rows"),
        },
        "indexes": _indexed_kinds(root, cfg, s.get("embed", {}).get("models", {})),
        "config": {
            name: to_dict(getattr(cfg, name))
            for name in ("ingest", "embed", "cells", "image_dedup", "caption_dedup", "index", "bundle")
        },
        "steps": {step: {"seconds": s.get(step, {}).get("seconds")} for step in STEPS},
        "artifacts": {
            **(
                {"samples": artifact(SAMPLES, "every sample seen by ingest, rejected ones included")}
                if SAMPLES in files
                else {}
            ),
            "embeddings": {
                "path": EMBEDDINGS,
                "format": (
                    "clip-retrieval (img_emb/img_emb_{i}.npy, text_emb/, metadata/metadata_{i}.parquet)"
                ),
                "partitions": [p.name for p in partitions],
                "files": len(emb_files),
                "bytes": sum(v["bytes"] for v in emb_files.values()),
                "img_emb": {"dtype": "float16", "shape": [embed.get("embedded"), embed.get("dim")]},
            },
            "image_duplicates": artifact(IMAGE_DUPLICATES, "image duplicate groups (pipeline.dedup.image)"),
            "caption_duplicates": artifact(
                CAPTION_DUPLICATES, "caption duplicate groups (pipeline.dedup.caption)"
            ),
            "caption_dedup_table": artifact(TABLE_NAME, "G_dup table (pipeline.bundle.tables)"),
            "index": artifact(f"{INDEX_DIR}/{INDEX_NAME}", "FAISS index over img_emb", format="faiss"),
            "duplicates_index": artifact(
                f"{INDEX_DIR}/{DUP_INDEX_NAME}", "FAISS IDMap over images with duplicates", format="faiss"
            ),
            "index_rows": artifact(f"{INDEX_DIR}/{ROWS_NAME}", "row id -> key, caption, partition"),
            "index_info": artifact(
                f"{INDEX_DIR}/{INFO_NAME}", "index plan and recall self-check", format="json"
            ),
        },
        "files": files,
    }


def _indexed_kinds(root: Path, cfg: PipelineConfig, models: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``indexes``: each embedding kind the bundle can be searched by, its index file and,
    for SSCD, the descriptor model (TorchScript file, its sha256, input size) queries must be made with."""
    out: dict[str, Any] = {}
    for kind, (index_name, info_name) in INDEXED_KINDS.items():
        if not (root / INDEX_DIR / index_name).is_file():
            continue
        entry: dict[str, Any] = {"index": f"{INDEX_DIR}/{index_name}", "info": f"{INDEX_DIR}/{info_name}"}
        if kind == SSCD_EMB:
            checkpoint = cfg.embed.sscd_checkpoint
            entry["model"] = {
                "checkpoint": checkpoint,
                "sha256": models.get("sscd"),  # of the file the descriptors were made with
                "image_size": cfg.embed.sscd_image_size,
            }
        out[kind] = entry
    return out
