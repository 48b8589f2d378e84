"""Reading embedding folders: only finished partitions of one run, never a mix of two."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.storage import atomic_write_table
from pipeline.io.embeddings import METADATA_SCHEMA, embedding_path, list_partitions, metadata_path


def write_partition(folder: Path, name: str, rows: int, fingerprint: str | None) -> None:
    path = embedding_path(folder, "img_emb", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ones((rows, 4), np.float16))
    meta = {f.name: pa.array([None] * rows, f.type) for f in METADATA_SCHEMA}
    meta["key"] = pa.array([f"{name}-{i}" for i in range(rows)])
    atomic_write_table(metadata_path(folder, name), pa.table(meta, schema=METADATA_SCHEMA))
    if fingerprint is not None:
        marker = folder / "done" / f"{name}.done.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"config_fingerprint": fingerprint}))


def test_only_partitions_with_a_marker_are_listed(tmp_path: Path):
    write_partition(tmp_path, "00000", 3, "run-a")
    write_partition(tmp_path, "00001", 2, None)  # half-written by a killed run: no marker yet
    assert [p.name for p in list_partitions(tmp_path)] == ["00000"]


def test_partitions_of_two_runs_are_refused_not_mixed(tmp_path: Path):
    """A killed re-embed with another checkpoint left markers of both runs."""
    write_partition(tmp_path, "00000", 3, "run-a")
    write_partition(tmp_path, "00001", 2, "run-b")
    with pytest.raises(ValueError, match=r"different options or models.*run-a.*run-b"):
        list_partitions(tmp_path)


def test_released_laion_folders_without_markers_list_every_partition(tmp_path: Path):
    for name in ("0", "1", "10", "2"):
        write_partition(tmp_path, name, 1, None)
    assert [p.name for p in list_partitions(tmp_path)] == ["0", "1", "2", "10"]
