"""Shuffle files: how partitioned stages hand rows from map tasks to reduce tasks.

A map task writes one Arrow IPC file holding one record batch per destination
(:func:`write_routed`); reduce task ``d`` reads batch ``d`` of every map task's file
(:func:`read_part`). Only file paths pass through the driver, and a reducer reads only its own rows.
Final outputs are streamed into one Parquet file a part at a time (:func:`concat_parts`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import publish_tmp, unique_tmp_path


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    table = table.combine_chunks()
    batches = table.to_batches()
    if not batches:
        return pa.record_batch([pa.array([], f.type) for f in table.schema], schema=table.schema)
    return batches[0]


def write_routed(path: str, table: pa.Table, dest: np.ndarray, parts: int) -> None:
    """``table``'s rows into ``path`` as ``parts`` batches: batch ``d`` holds the rows with ``dest == d``
    (in their order in ``table``). Written under a temporary name, then renamed."""
    dest = np.asarray(dest, dtype=np.int64)
    order = np.argsort(dest, kind="stable")
    batch = _one_batch(table.take(pa.array(order)) if len(order) else table)
    ends = np.cumsum(np.bincount(dest, minlength=parts)) if len(dest) else np.zeros(parts, np.int64)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        start = 0
        for end in ends.tolist():
            writer.write_batch(batch.slice(start, end - start))
            start = end
    os.replace(tmp, path)


def write_single(path: str, table: pa.Table) -> None:
    """``table`` as a shuffle file with one batch."""
    write_routed(path, table, np.zeros(table.num_rows, np.int64), 1)


def read_part(paths: Sequence[str], index: int) -> pa.Table:
    """Batch ``index`` of every file in ``paths``, as one table (read, not mapped)."""
    batches = []
    for path in paths:
        with pa.OSFile(path, "rb") as source:
            batches.append(pa.ipc.open_file(source).get_batch(index))
    return pa.Table.from_batches(batches) if batches else pa.table({})


def concat_parts(parts: list[str], out_path: str, schema: pa.Schema) -> dict[str, Any]:
    """The units' Parquet parts streamed into one file, one part in memory at a time; atomic."""
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    tmp = unique_tmp_path(out_path)
    rows = 0
    try:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for part in parts:
                table = pq.read_table(part)
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                rows += table.num_rows
        publish_tmp(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"rows": rows}


def write_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    """Named arrays as one ``.npz`` shuffle file: written under a temporary name, then renamed.

    Not fsynced: a shuffle file only lives until its stage ends, and a crashed stage writes it again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
