"""The IVF index over the shared k-means cells, built and checked without the vectors in one process.

autofaiss's recipe, with the cells (:mod:`pipeline.index.cells`) as the trained coarse quantizer:

1. **empty index**: IVF-Flat (inner product) whose quantizer holds the cells' centroids, so nothing is
   trained twice and each row's inverted list is its nearest cell;
2. **add**, one Ray task per embedding partition: the partition's unit vectors, with their row ids,
   into a copy of the empty index, whose lists are saved as a part (sizes, codes, ids: list after list);
3. **merge on disk**: the parts' lists are written list range by list range into one
   ``<name>.ivfdata`` file in FAISS's on-disk list layout (``OnDiskInvertedLists``, as
   ``faiss.contrib.ondisk.merge_ondisk`` makes it, but with plain sequential writes instead of one map
   of the whole file), and ``<name>.index`` holds the quantizer and the lists' offsets. The reader
   opens it memory-mapped, finding the data file next to the index file wherever the folder is
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
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.lazy import faiss
from pipeline.core.stage import seconds_since
from pipeline.core.storage import atomic_write_array, publish_tmp, unique_tmp_path
from pipeline.core.tasks import run_tasks
from pipeline.index.cells import CENTROIDS, assign_path
from pipeline.index.faiss_index import (
    ONDISK_SUFFIX,
    IndexPlan,
    _sample_rows,
    index_description,
    load_index,
    save_index,
    streamed_ground_truth,
    tune_recall,
)
from pipeline.io.embeddings import (
    EmbeddingRows,
    Partition,
    list_partitions,
    normalize,
    partition_starts,
    unit_blocks,
)

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


def _part_files(parts_dir: str | Path, name: str) -> dict[str, Path]:
    return {what: Path(parts_dir) / f"{name}.{what}.npy" for what in ("sizes", "codes", "ids")}


def add_partition(folder: str, name: str, start: int, cells_dir: str, parts_dir: str, kind: str) -> str:
    """One partition's rows (ids ``start..``) sorted into their nearest cells' lists (the assignment the
    cells stage made, so image dedup and the index agree); returns the part's name.

    The part is three arrays: rows per list, then every list's codes and ids one list after another,
    which the merge reads list range by list range.
    """
    files = _part_files(parts_dir, name)
    if all(path.is_file() for path in files.values()):
        return name
    index = empty_index(np.load(Path(cells_dir) / CENTROIDS))
    vectors = Partition(Path(folder), name).embeddings(kind)
    cells = np.load(assign_path(cells_dir, name))[:, 0].astype(np.int64)  # each row's nearest cell
    for lo in range(0, len(vectors), 65_536):
        block = normalize(vectors[lo : lo + 65_536])
        ids = np.arange(start + lo, start + lo + len(block), dtype=np.int64)
        lists = np.ascontiguousarray(cells[lo : lo + len(block)])
        index.add_core(len(block), faiss.swig_ptr(block), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    lists = index.invlists
    sizes = np.array([lists.list_size(c) for c in range(lists.nlist)], np.int64)
    code_size = lists.code_size
    codes = [faiss.rev_swig_ptr(lists.get_codes(c), int(n) * code_size) for c, n in enumerate(sizes) if n]
    ids = [faiss.rev_swig_ptr(lists.get_ids(c), int(n)) for c, n in enumerate(sizes) if n]
    atomic_write_array(files["codes"], np.concatenate(codes) if codes else np.zeros(0, np.uint8))
    atomic_write_array(files["ids"], np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64))
    atomic_write_array(files["sizes"], sizes)  # last: its presence means the part is whole
    return name


def _list_ranges(sizes: np.ndarray, entry_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Consecutive list ranges holding about ``chunk_bytes`` each (at least one list)."""
    ranges, lo, held = [], 0, 0
    for c, n in enumerate(sizes.tolist()):
        held += n * entry_bytes
        if held >= chunk_bytes:
            ranges.append((lo, c + 1))
            lo, held = c + 1, 0
    if lo < len(sizes):
        ranges.append((lo, len(sizes)))
    return ranges


def merge_parts(
    cells_dir: str, parts_dir: str, parts: list[str], out: str, chunk_bytes: int = 1 << 26
) -> int:
    """Write the parts' lists into ``<out>.ivfdata`` in FAISS's on-disk list layout, then ``out``.

    Each list's codes then ids, list after list, capacity = size: the file is written sequentially,
    a range of lists at a time, reading that range from every part through short-lived maps, so the
    process holds about ``chunk_bytes`` whatever the index size (FAISS's own ``merge_ondisk`` writes
    through one map of the whole file, which counts in full against the process's RSS).
    """
    out_path = Path(out)
    index = empty_index(np.load(Path(cells_dir) / CENTROIDS))
    code_size = index.code_size
    files = [_part_files(parts_dir, name) for name in parts]
    sizes = np.stack([np.load(f["sizes"]) for f in files]) if files else np.zeros((0, index.nlist), np.int64)
    starts = np.concatenate([np.zeros((len(files), 1), np.int64), np.cumsum(sizes, axis=1)], axis=1)
    per_list = sizes.sum(axis=0)
    offsets = np.concatenate([[0], np.cumsum(per_list * (code_size + 8))])
    data_path = data_file(out_path)
    tmp = unique_tmp_path(data_path)
    try:
        with open(tmp, "wb") as fh:
            for lo, hi in _list_ranges(per_list, code_size + 8, chunk_bytes):
                codes, ids = [], []
                for p, f in enumerate(files):  # this range of lists is contiguous in every part
                    a, b = starts[p, lo], starts[p, hi]
                    codes.append(np.array(np.load(f["codes"], mmap_mode="r")[a * code_size : b * code_size]))
                    ids.append(np.array(np.load(f["ids"], mmap_mode="r")[a:b]))
                for c in range(lo, hi):
                    for p in range(len(files)):
                        a, b = starts[p, c] - starts[p, lo], starts[p, c + 1] - starts[p, lo]
                        fh.write(codes[p][a * code_size : b * code_size].tobytes())
                    for p in range(len(files)):
                        a, b = starts[p, c] - starts[p, lo], starts[p, c + 1] - starts[p, lo]
                        fh.write(ids[p][a:b].tobytes())
        publish_tmp(tmp, data_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    lists = faiss.OnDiskInvertedLists(index.nlist, code_size, data_path.name)
    lists.lists.clear()
    for c, n in enumerate(per_list.tolist()):
        entry = faiss.OnDiskOneList()
        entry.size, entry.capacity, entry.offset = n, n, int(offsets[c])
        lists.lists.push_back(entry)
    lists.totsize = int(offsets[-1])
    index.replace_invlists(lists, False)  # ``lists`` stays Python's to free
    index.ntotal = int(per_list.sum())
    # The index records its data file's name; readers look for it beside the index file.
    save_index(index, out_path)
    return int(per_list.sum())


def self_check(
    folder: str, index_path: str, kind: str, k: int, sample: int, target_recall: float, seed: int
) -> dict[str, Any]:
    """Tune ``nprobe`` against exact search streamed over the partitions; returns the self-check and
    the index's description (with the ``nprobe`` chosen)."""
    fetch = EmbeddingRows(folder, kind=kind)
    rows = _sample_rows(fetch.n, min(sample, fetch.n), seed + 1)
    queries = fetch(rows)
    k = max(1, min(k, fetch.n - 1))
    truth = streamed_ground_truth(unit_blocks(folder, kind), rows, queries, k + 1)
    index = load_index(index_path)
    check = tune_recall(index, truth, fetch, k=k, target_recall=target_recall)
    return {"self_check": check, "index": index_description(index)}


def build_ivf_cells(
    folder: str, cells_dir: str, out: Path, plan: IndexPlan, *, kind: str, inline: bool, check: dict[str, Any]
) -> dict[str, Any]:
    """Add, merge and self-check the index at ``out``; returns the self-check and timings."""
    started = time.monotonic()
    partitions = list_partitions(folder)
    starts = partition_starts(partitions)
    parts_dir = out.parent / f".{out.name}.parts"
    parts = run_tasks(
        add_partition,
        [(folder, p.name, starts[i], cells_dir, str(parts_dir), kind) for i, p in enumerate(partitions)],
        inline=inline,
        label="index: add",
    )
    add_s = seconds_since(started)
    (ntotal,) = run_tasks(
        merge_parts, [(cells_dir, str(parts_dir), parts, str(out))], inline=inline, fresh_worker=True
    )
    shutil.rmtree(parts_dir)
    (result,) = run_tasks(
        self_check,
        [(folder, str(out), kind, check["k"], check["sample"], check["target_recall"], check["seed"])],
        inline=inline,
        fresh_worker=True,
    )
    log.info("index: %s over %d rows, on disk, in %.1f s", plan.factory, ntotal, seconds_since(started))
    return {**result, "ntotal": ntotal, "add_seconds": add_s, "seconds": seconds_since(started)}
