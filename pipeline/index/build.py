"""The index stage (jobs/build_index.py): plan, build, tune and self-check an index, then write it.

Outputs in ``out/``: ``image.index`` (or ``sscd.index``; with ``image.ivfdata``, its inverted lists,
when the index is IVF-Flat over the shared cells), ``index_rows.parquet`` (row id -> key, caption,
partition, row), ``index_info.json`` (plan, self-check recall, model) and, with ``duplicates``,
``dup_image.index`` over the images in duplicate groups.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import CellsConfig, IndexConfig, result_options
from pipeline.core.lazy import faiss
from pipeline.core.ray_runtime import gpu_count, on_gpu_worker
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import atomic_parquet_writer, atomic_write_bytes, atomic_write_json
from pipeline.core.tasks import run_tasks
from pipeline.index.cells import CellsStage, cell_count
from pipeline.index.faiss_index import (
    IndexPlan,
    build_index,
    estimate_bytes,
    index_description,
    plan_index,
    save_index,
    tune_search,
)
from pipeline.index.ivf_cells import build_ivf_cells, data_file
from pipeline.io.embeddings import (
    IMG_EMB,
    EmbeddingRows,
    embedding_model,
    folder_signature,
    list_partitions,
    load_unit_embeddings,
)

log = logging.getLogger(__name__)


INDEX_NAME = "image.index"
SSCD_INDEX_NAME = "sscd.index"
DUP_INDEX_NAME = "dup_image.index"
ROWS_NAME = "index_rows.parquet"
INFO_NAME = "index_info.json"
SSCD_INFO_NAME = "sscd_index_info.json"


def index_files(embedding_kind: str = "img_emb") -> tuple[str, str]:
    """(index file, info file) of the index over ``embedding_kind`` (img_emb or sscd_emb)."""
    if embedding_kind == "img_emb":
        return INDEX_NAME, INFO_NAME
    if embedding_kind == "sscd_emb":
        return SSCD_INDEX_NAME, SSCD_INFO_NAME
    raise ValueError(f"no index for embedding kind {embedding_kind!r}; known: img_emb, sscd_emb")


INDEX_SCHEMA_VERSION = 1
ROWS_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("partition", pa.string()),
        ("partition_row", pa.int64()),
    ]
)


@dataclass
class BuiltIndex:
    """An in-process index build's result, computed wherever the GPU is and written by the driver."""

    index_bytes: np.ndarray
    info: dict[str, Any]


def write_row_mapping(folder: str | Path, path: Path) -> None:
    """``index_rows.parquet``: row id -> key, caption, partition and row within it, streamed partition
    by partition (memory: one partition's keys and captions)."""
    start = 0
    with atomic_parquet_writer(path, ROWS_SCHEMA) as writer:
        for part in list_partitions(folder):
            meta = part.metadata(["key", "caption"])
            n = meta.num_rows
            writer.write_table(
                pa.table(
                    {
                        "row_id": pa.array(np.arange(start, start + n), pa.int64()),
                        "key": meta.column("key").cast(pa.string()),
                        "caption": meta.column("caption").cast(pa.string()),
                        "partition": pa.array([part.name] * n, pa.string()),
                        "partition_row": pa.array(np.arange(n), pa.int64()),
                    },
                    schema=ROWS_SCHEMA,
                )
            )
            start += n


def write_duplicates_index(folder: str, duplicates: str, path: str, kind: str) -> dict[str, Any]:
    """``dup_image.index``: an exact IDMap over the rows of the image-duplicate table (ids = row ids)."""
    rows = np.unique(
        pq.read_table(duplicates, columns=["row_id"]).column("row_id").to_numpy().astype(np.int64)
    )
    fetch = EmbeddingRows(folder, kind=kind)
    sub = faiss.IndexIDMap2(faiss.IndexFlatIP(fetch.dim))
    if len(rows):
        sub.add_with_ids(fetch(rows), rows)
    save_index(sub, path)
    return {"file": DUP_INDEX_NAME, "rows": len(rows), "class": "IndexIDMap2(IndexFlatIP)"}


def plan_for(cfg: IndexConfig, embeddings: str | Path, kind: str, cells: CellsConfig) -> IndexPlan:
    """The index for the folder's N and d (read from file headers), ``ivf_flat`` over the cells' lists."""
    partitions = list_partitions(embeddings)
    if not partitions:
        raise FileNotFoundError(f"{embeddings} has no partitions to index")
    n = sum(p.num_rows() for p in partitions)
    d = int(partitions[0].embeddings(kind).shape[1])
    plan = plan_index(
        n,
        d,
        kind=cfg.kind,
        memory_budget_mb=cfg.memory_budget_mb,
        flat_max_n=cfg.flat_max_n,
        hnsw_m=cfg.hnsw_m,
        nlist=cfg.nlist,
        pq_m=cfg.pq_m,
        opq=cfg.opq,
    )
    if plan.kind != "ivf_flat":
        return plan
    nlist = cell_count(n, cells.rows_per_cell)
    return dataclasses.replace(
        plan,
        factory=f"IVF{nlist},Flat",
        nlist=nlist,
        estimated_bytes=estimate_bytes("ivf_flat", n, d, nlist=nlist),
        reason=(
            f"N={n} > flat_max_n={cfg.flat_max_n} and the vectors fit {cfg.memory_budget_mb} MiB: "
            f"IVF-Flat over the {nlist} shared k-means cells, lists on disk"
        ),
    )


def compute_index(cfg: IndexConfig, plan: IndexPlan, embedding_kind: str = IMG_EMB) -> BuiltIndex:
    """Build, tune and self-check ``plan`` (flat, hnsw or ivf_pq) in this process, over every vector."""
    started = time.monotonic()
    vectors = load_unit_embeddings(cfg.embeddings, embedding_kind)
    index = build_index(
        vectors,
        plan,
        train_size=cfg.train_size,
        seed=cfg.seed,
        ef_construction=cfg.ef_construction,
        use_gpu=cfg.use_gpu,
    )
    build_s = time.monotonic() - started
    check = tune_search(
        index,
        vectors,
        k=cfg.recall_k,
        sample=cfg.recall_sample,
        target_recall=cfg.target_recall,
        seed=cfg.seed,
        use_gpu=cfg.use_gpu,
    )
    info = {"self_check": check, "index": index_description(index), "build_seconds": round(build_s, 3)}
    return BuiltIndex(faiss.serialize_index(index), info)


class IndexStage(Stage):
    """Embedding folder -> index file (+ ``.ivfdata``), row mapping, info (and the duplicates sub-index)."""

    def __init__(
        self,
        cfg: IndexConfig,
        embedding_kind: str = IMG_EMB,
        model_label: Any = None,
        cells: CellsConfig | None = None,
        cells_dir: str | Path | None = None,
    ):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.embedding_kind = embedding_kind
        self.model_label = model_label
        self.index_name, self.info_name = index_files(embedding_kind)
        self.with_dups = bool(cfg.duplicates) and embedding_kind == IMG_EMB
        self.name = "index" if embedding_kind == IMG_EMB else f"index_{embedding_kind}"
        cells = cells or CellsConfig()
        self.plan = plan_for(cfg, cfg.embeddings, embedding_kind, cells)
        self.cells = CellsStage(cells, cfg.embeddings, cells_dir or self.out / "cells", embedding_kind)

    def fingerprint(self) -> dict[str, Any]:
        """Result options, the input folder's signature, the cells' and, with ``duplicates``, that file's."""
        dup = None
        if self.with_dups:
            st = os.stat(self.cfg.duplicates)
            dup = [st.st_size, st.st_mtime_ns]
        return {
            "schema": INDEX_SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "input": folder_signature(self.cfg.embeddings),
            "cells": self.cells.fingerprint() if self.on_cells else None,
            "dup": dup,
            "model_label": self.model_label,
        }

    @property
    def on_cells(self) -> bool:
        return self.plan.kind == "ivf_flat"

    def outputs(self) -> list[Path]:
        names = [self.index_name, ROWS_NAME, self.info_name] + ([DUP_INDEX_NAME] if self.with_dups else [])
        data = [data_file(self.out / self.index_name)] if self.on_cells else []
        return [self.out / name for name in names] + data

    def compute(self) -> dict[str, Any]:
        started = time.monotonic()
        cfg, out, plan = self.cfg, self.out, self.plan
        log.info("index: %s over %d x %d (%s)", plan.factory, plan.n, plan.d, plan.reason)
        inline = plan.n < self.cells.cfg.ray_min_rows
        data_file(out / self.index_name).unlink(missing_ok=True)  # an on-disk index of an earlier build
        if self.on_cells:
            run_stage(self.cells, self.cells.out)
            check = {"k": cfg.recall_k, "sample": cfg.recall_sample, "target_recall": cfg.target_recall}
            built = build_ivf_cells(
                cfg.embeddings,
                str(self.cells.out),
                out / self.index_name,
                plan,
                kind=self.embedding_kind,
                inline=inline,
                check={**check, "seed": cfg.seed},
            )
            info = {
                "self_check": built["self_check"],
                "index": built["index"],
                "build_seconds": built["add_seconds"],
                "data_file": data_file(out / self.index_name).name,
            }
        else:
            result = on_gpu_worker(compute_index, cfg, plan, self.embedding_kind)
            atomic_write_bytes(out / self.index_name, result.index_bytes.tobytes())
            info = result.info
        info.update(
            schema=INDEX_SCHEMA_VERSION,
            file=self.index_name,
            embedding_kind=self.embedding_kind,
            rows_file=ROWS_NAME,
            plan=plan.to_dict(),
            embedding_model=self.model_label
            if self.model_label is not None
            else embedding_model(cfg.embeddings),
            gpu=not self.on_cells and gpu_count(cfg.use_gpu) > 0,
        )
        if self.with_dups:
            (info["duplicates_subindex"],) = run_tasks(
                write_duplicates_index,
                [(cfg.embeddings, cfg.duplicates, str(out / DUP_INDEX_NAME), self.embedding_kind)],
                inline=inline,
                fresh_worker=True,
            )
        run_tasks(write_row_mapping, [(cfg.embeddings, out / ROWS_NAME)], inline=inline, fresh_worker=True)
        info["seconds"] = seconds_since(started)
        atomic_write_json(out / self.info_name, info)
        check = info["self_check"]
        return {
            "job": "build_index",
            "out": str(out / self.index_name),
            "embedding_kind": self.embedding_kind,
            "rows": info["index"]["ntotal"],
            "kind": plan.kind,
            "factory": plan.factory,
            "recall_at_k": check["recall_at_k"],
            "k": check["k"],
            "search_param": {check["param"]: check["value"]} if check["param"] else {},
            "duplicates_subindex_rows": info.get("duplicates_subindex", {}).get("rows"),
            "seconds": seconds_since(started),
        }


def run_build_index(
    cfg: IndexConfig,
    embedding_kind: str = IMG_EMB,
    model_label: Any = None,
    cells: CellsConfig | None = None,
    cells_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The index stage: build ``cfg.out/image.index`` (+ rows, info, optional sub-index); resumable.

    ``ivf_flat`` (auto above ``flat_max_n`` rows while it fits the budget) is built over the shared
    k-means cells in ``cells_dir`` (default ``cfg.out/cells``; computed there when missing) as Ray
    tasks, with its lists on disk (:mod:`pipeline.index.ivf_cells`). The other kinds are built in one
    process, on a GPU worker when the cluster has one (:func:`on_gpu_worker`). ``model_label`` replaces
    the model name read from the folder's metadata in ``index_info.json`` (the bundle labels SSCD
    indexes with their checkpoint).
    """
    return run_stage(IndexStage(cfg, embedding_kind, model_label, cells, cells_dir), cfg.out)
