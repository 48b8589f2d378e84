"""The index stage (jobs/build_index.py): plan, build, tune and self-check an index, then write it.

Outputs in ``out/``: ``image.index`` (or ``sscd.index``), ``index_rows.parquet`` (row id -> key,
caption, partition, row), ``index_info.json`` (plan, self-check recall, model) and, with
``duplicates``, ``dup_image.index`` over the images in duplicate groups.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import IndexConfig, result_options
from pipeline.core.ray_runtime import gpu_count, on_gpu_worker
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
)
from pipeline.index.faiss_index import build_index, index_description, plan_index, tune_search
from pipeline.io.embeddings import (
    IMG_EMB,
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
    """An index stage's result, computed wherever the GPU is and written by the driver."""

    index_bytes: np.ndarray
    dup_index_bytes: np.ndarray | None
    info: dict[str, Any]


def row_mapping(folder: str | Path) -> pa.Table:
    """Row id -> key, caption, partition and row within it, for every row of an embedding folder."""
    tables = []
    start = 0
    for part in list_partitions(folder):
        meta = part.metadata(["key", "caption"])
        n = meta.num_rows
        tables.append(
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
    return pa.concat_tables(tables) if tables else ROWS_SCHEMA.empty_table()


def compute_index(
    cfg: IndexConfig,
    vectors: np.ndarray | None = None,
    duplicate_rows: np.ndarray | None = None,
    embedding_kind: str = "img_emb",
) -> BuiltIndex:
    """Plan, build, tune and self-check the index of ``cfg.embeddings`` (and the duplicates sub-index).

    Args:
        cfg (`IndexConfig`): the stage's options.
        vectors (`np.ndarray`, *optional*): the folder's L2-normalised embeddings, if already loaded.
        duplicate_rows (`np.ndarray`, *optional*): row ids for the sub-index; default: the rows of
            ``cfg.duplicates`` when set (image embeddings only).
        embedding_kind (`str`): ``img_emb`` (CLIP image embeddings) or ``sscd_emb`` (SSCD descriptors).
    """
    started = time.monotonic()
    if vectors is None:
        vectors = load_unit_embeddings(cfg.embeddings, embedding_kind)
    n, d = vectors.shape
    plan = plan_index(
        n,
        d,
        kind=cfg.kind,
        memory_budget_mb=cfg.memory_budget_mb,
        flat_max_n=cfg.flat_max_n,
        hnsw_max_n=cfg.hnsw_max_n,
        hnsw_m=cfg.hnsw_m,
        nlist=cfg.nlist,
        pq_m=cfg.pq_m,
        opq=cfg.opq,
    )
    log.info("index: %s over %d x %d (%s)", plan.factory, n, d, plan.reason)
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
    info: dict[str, Any] = {
        "schema": INDEX_SCHEMA_VERSION,
        "file": index_files(embedding_kind)[0],
        "embedding_kind": embedding_kind,
        "rows_file": ROWS_NAME,
        "plan": plan.to_dict(),
        "index": index_description(index),
        "self_check": check,
        "embedding_model": embedding_model(cfg.embeddings),
        "build_seconds": round(build_s, 3),
        "gpu": gpu_count(cfg.use_gpu) > 0,
    }
    dup_bytes = None
    if duplicate_rows is None and cfg.duplicates and embedding_kind == "img_emb":
        duplicate_rows = pq.read_table(cfg.duplicates, columns=["row_id"]).column("row_id").to_numpy()
    if duplicate_rows is not None:
        rows = np.unique(np.asarray(duplicate_rows, np.int64))
        sub = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if len(rows):
            sub.add_with_ids(np.ascontiguousarray(vectors[rows]), rows)
        dup_bytes = faiss.serialize_index(sub)
        info["duplicates_subindex"] = {
            "file": DUP_INDEX_NAME,
            "rows": len(rows),
            "class": "IndexIDMap2(IndexFlatIP)",
        }
    info["seconds"] = seconds_since(started)
    return BuiltIndex(faiss.serialize_index(index), dup_bytes, info)


class IndexStage(Stage):
    """Embedding folder -> index file, row mapping and info (and the duplicates sub-index)."""

    def __init__(self, cfg: IndexConfig, embedding_kind: str = IMG_EMB, model_label: Any = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.embedding_kind = embedding_kind
        self.model_label = model_label
        self.index_name, self.info_name = index_files(embedding_kind)
        self.with_dups = bool(cfg.duplicates) and embedding_kind == IMG_EMB
        self.name = "index" if embedding_kind == IMG_EMB else f"index_{embedding_kind}"

    def fingerprint(self) -> dict[str, Any]:
        """Result options, the input folder's signature and, with ``duplicates``, that file's."""
        dup = None
        if self.with_dups:
            st = os.stat(self.cfg.duplicates)
            dup = [st.st_size, st.st_mtime_ns]
        return {
            "schema": INDEX_SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "input": folder_signature(self.cfg.embeddings),
            "dup": dup,
            "model_label": self.model_label,
        }

    def outputs(self) -> list[Path]:
        names = [self.index_name, ROWS_NAME, self.info_name] + ([DUP_INDEX_NAME] if self.with_dups else [])
        return [self.out / name for name in names]

    def compute(self) -> dict[str, Any]:
        started = time.monotonic()
        out = self.out
        built = on_gpu_worker(compute_index, self.cfg, None, None, self.embedding_kind)
        if self.model_label is not None:
            built.info["embedding_model"] = self.model_label
        atomic_write_bytes(out / self.index_name, built.index_bytes.tobytes())
        if built.dup_index_bytes is not None:
            atomic_write_bytes(out / DUP_INDEX_NAME, built.dup_index_bytes.tobytes())
        atomic_write_table(out / ROWS_NAME, row_mapping(self.cfg.embeddings))
        atomic_write_json(out / self.info_name, built.info)
        check = built.info["self_check"]
        return {
            "job": "build_index",
            "out": str(out / self.index_name),
            "embedding_kind": self.embedding_kind,
            "rows": built.info["index"]["ntotal"],
            "kind": built.info["plan"]["kind"],
            "factory": built.info["plan"]["factory"],
            "recall_at_k": check["recall_at_k"],
            "k": check["k"],
            "search_param": {check["param"]: check["value"]} if check["param"] else {},
            "duplicates_subindex_rows": built.info.get("duplicates_subindex", {}).get("rows"),
            "seconds": seconds_since(started),
        }


def run_build_index(
    cfg: IndexConfig, embedding_kind: str = IMG_EMB, model_label: Any = None
) -> dict[str, Any]:
    """The index stage: build ``cfg.out/image.index`` (+ rows, info, optional sub-index); resumable.

    Heavy work runs on a GPU worker when the cluster has one (:func:`on_gpu_worker`); the files are
    written here, each atomically, then the done marker. ``model_label`` replaces the model name
    read from the folder's metadata in ``index_info.json`` (the bundle labels SSCD indexes with
    their checkpoint).
    """
    return run_stage(IndexStage(cfg, embedding_kind, model_label), cfg.out)
