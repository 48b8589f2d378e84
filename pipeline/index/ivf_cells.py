"""The IVF index over the shared k-means cells, built and checked without the vectors in one process.

autofaiss's recipe, with the cells (:mod:`pipeline.index.cells`) as the trained coarse quantizer:

1. **empty index**: IVF-Flat (inner product) whose quantizer holds the cells' centroids, so nothing is
   trained twice and each row's inverted list is its nearest cell;
2. **add**, one Ray task per embedding partition: the partition's unit vectors, with their row ids,
   into a copy of the empty index, saved as ``parts/<partition>.index``;
3. **merge on disk** (``faiss.contrib.ondisk.merge_ondisk``): the parts' inverted lists are copied into
   one ``<name>.ivfdata`` file, and ``<name>.index`` holds the quantizer and the lists' offsets. The
   reader opens it memory-mapped, finding the data file next to the index file wherever the folder is
   copied (``IO_FLAG_ONDISK_SAME_DIR``), so searching needs page cache, not heap;
4. **recall self-check**: exact top-k of a seeded sample of rows computed by streaming the partitions
   (:func:`~pipeline.index.faiss_index.streamed_ground_truth`), then ``nprobe`` raised until the
   target recall is reached.

Memory per process: an add task holds one partition as float32 twice (vectors and its lists); the
merge holds nothing but buffers; the self-check holds the sampled queries and one partition. Time:
adding is O(N x nlist x d) (the quantizer search), merging O(N x d) bytes of I/O, the self-check
O(sample x N x d).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.core.stage import seconds_since
from pipeline.core.storage import publish_tmp, unique_tmp_path
from pipeline.core.tasks import run_tasks
from pipeline.index.cells import CENTROIDS
from pipeline.index.faiss_index import (
    ONDISK_SUFFIX,
    IndexPlan,
    _sample_rows,
    load_index,
    save_index,
    streamed_ground_truth,
    tune_recall,
)
from pipeline.io.embeddings import EmbeddingRows, Partition, list_partitions, normalize

log = logging.getLogger(__name__)


def data_file(index_path: str | Path) -> Path:
    """The inverted-list data file of an on-disk index: ``image.index`` -> ``image.ivfdata``."""
    return Path(index_path).with_suffix(ONDISK_SUFFIX)


def empty_index(centroids: np.ndarray) -> faiss.IndexIVFFlat:
    """A trained, empty IVF-Flat (inner product) index whose lists are the cells of ``centroids``."""
    d = centroids.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, d, len(centroids), faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.is_trained = True
    return index


def add_partition(folder: str, name: str, start: int, cells_dir: str, parts_dir: str, kind: str) -> str:
    """One partition's rows (ids ``start..``) in their own copy of the empty index; returns its path."""
    path = Path(parts_dir) / f"{name}.index"
    if not path.is_file():
        index = empty_index(np.load(Path(cells_dir) / CENTROIDS))
        vectors = Partition(Path(folder), name).embeddings(kind)
        for lo in range(0, len(vectors), 65_536):
            block = normalize(vectors[lo : lo + 65_536])
            index.add_with_ids(block, np.arange(start + lo, start + lo + len(block), dtype=np.int64))
        save_index(index, path)
    return str(path)


def merge_parts(cells_dir: str, parts: list[str], out: str) -> int:
    """Merge the parts' lists into ``out`` and its ``.ivfdata`` file (both written atomically)."""
    from faiss.contrib.ondisk import merge_ondisk

    out_path = Path(out)
    index = empty_index(np.load(Path(cells_dir) / CENTROIDS))
    data_tmp = unique_tmp_path(data_file(out_path))
    try:
        merge_ondisk(index, parts, str(data_tmp))
        publish_tmp(data_tmp, data_file(out_path))
    except BaseException:
        data_tmp.unlink(missing_ok=True)
        raise
    # The index records its data file's name; readers look for it beside the index file.
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = data_file(out_path).name
    save_index(index, out_path)
    return int(index.ntotal)


def self_check(
    folder: str, index_path: str, kind: str, k: int, sample: int, target_recall: float, seed: int
) -> dict[str, Any]:
    """Tune ``nprobe`` against exact search streamed over the partitions; returns the self-check."""
    partitions = list_partitions(folder)
    starts = np.cumsum([0] + [p.num_rows() for p in partitions])
    fetch = EmbeddingRows(folder, kind=kind)
    rows = _sample_rows(fetch.n, min(sample, fetch.n), seed + 1)
    queries = fetch(rows)
    k = max(1, min(k, fetch.n - 1))

    def blocks():
        for first, partition in zip(starts.tolist(), partitions, strict=False):
            vectors = partition.embeddings(kind)
            for lo in range(0, len(vectors), 65_536):
                yield first + lo, normalize(vectors[lo : lo + 65_536])

    truth = streamed_ground_truth(blocks(), rows, queries, k + 1)
    index = load_index(index_path)
    check = tune_recall(index, truth, fetch, k=k, target_recall=target_recall)
    check["nprobe"] = check["value"]
    return check


def build_ivf_cells(
    folder: str, cells_dir: str, out: Path, plan: IndexPlan, *, kind: str, inline: bool, check: dict[str, Any]
) -> dict[str, Any]:
    """Add, merge and self-check the index at ``out``; returns the self-check and timings."""
    started = time.monotonic()
    partitions = list_partitions(folder)
    starts = np.cumsum([0] + [p.num_rows() for p in partitions]).tolist()
    parts_dir = out.parent / f".{out.name}.parts"
    parts = run_tasks(
        add_partition,
        [(folder, p.name, starts[i], cells_dir, str(parts_dir), kind) for i, p in enumerate(partitions)],
        inline=inline,
        label="index: add",
    )
    add_s = seconds_since(started)
    (ntotal,) = run_tasks(merge_parts, [(cells_dir, parts, str(out))], inline=inline)
    for part in parts:
        Path(part).unlink(missing_ok=True)
    parts_dir.rmdir()
    (result,) = run_tasks(
        self_check,
        [(folder, str(out), kind, check["k"], check["sample"], check["target_recall"], check["seed"])],
        inline=inline,
    )
    log.info("index: %s over %d rows, on disk, in %.1f s", plan.factory, ntotal, seconds_since(started))
    return {"self_check": result, "ntotal": ntotal, "add_seconds": add_s, "seconds": seconds_since(started)}
