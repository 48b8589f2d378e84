"""The run folder: per-(prompt, mode) partitions, their images and done markers, written by the driver."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.audit.layout import IMAGES, PART_SCHEMA, PARTS, RUNS, WEN
from pipeline.core.stage import Commit
from pipeline.core.storage import DoneMarkers, atomic_write_bytes, atomic_write_table


def partition_name(prompt_id: str, mode: str) -> str:
    """A (prompt, AMG mode) partition's name; its marker is ``parts/<prompt_id>/<mode>.done.json``."""
    return f"{prompt_id}/{mode}"


def pixel_sha256(data: bytes) -> str:
    """SHA-256 of an encoded image's decoded pixels (its mode, size and pixel bytes), not of the file:
    two samples with equal hashes are bit-identical images, whatever their encoder wrote around them."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = np.ascontiguousarray(np.asarray(im))
        digest = hashlib.sha256(f"{im.mode}:{arr.shape}:{arr.dtype.str}:".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


class RunStore:
    """``OUT/runs/<run_id>/``: per-prompt partitions (``parts/<prompt_id>/<mode>.parquet``), their done
    markers, Wen scores and images (``images/<prompt_id>/<mode>_<k>.png``)."""

    def __init__(self, out: Path, run_id: str):
        self.out = out
        self.run_id = run_id
        self.root = out / RUNS / run_id

    @property
    def markers_dir(self) -> Path:
        """Where the (prompt, mode) done markers live: ``parts/<prompt_id>/<mode>.done.json``."""
        return self.root / PARTS

    def markers(self, prompt_id: str) -> DoneMarkers:
        return DoneMarkers(self.markers_dir / prompt_id, self.run_id)

    def part_path(self, prompt_id: str, mode: str) -> Path:
        return self.root / PARTS / prompt_id / f"{mode}.parquet"

    def image_rel(self, prompt_id: str, mode: str, k: int) -> str:
        return f"{RUNS}/{self.run_id}/{IMAGES}/{prompt_id}/{mode}_{k}.png"

    def wen(self, prompt_id: str) -> dict[str, Any] | None:
        return self.markers(prompt_id).read(WEN)

    def prescreen_skipped(self, prompt_id: str) -> bool:
        """Whether the Wen pre-screen left ``prompt_id`` out (its modes then need no generation)."""
        wen = self.wen(prompt_id)
        return bool(wen and wen.get("skipped"))

    def write(self, result: dict[str, Any], commit: Commit) -> None:
        """Images, then partition files, then ``commit`` (the done marker): a marker means complete files."""
        pid = result["prompt_id"]
        markers = self.markers(pid)
        if markers.read(WEN) is None:
            markers.write(WEN, result["wen"])
        for mode, part in result["modes"].items():
            rows = []
            for row, png in zip(part["rows"], part["images"], strict=False):
                rel = self.image_rel(pid, mode, row["sample_index"])
                atomic_write_bytes(self.out / rel, png)
                rows.append({**row, "run_id": self.run_id, "image": rel, "pixel_sha256": pixel_sha256(png)})
            atomic_write_table(self.part_path(pid, mode), pa.Table.from_pylist(rows, schema=PART_SCHEMA))
            commit(
                partition_name(pid, mode),
                {
                    "samples": len(rows),
                    "clique": part["clique"],
                    "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                },
            )

    def read_rows(self, prompt_id: str, mode: str) -> list[dict[str, Any]]:
        return pq.read_table(self.part_path(prompt_id, mode)).to_pylist()
