"""Crash-safe output: write to a temporary name, rename into place, write the done marker last.

A reader never sees a half-written file, and a re-run trusts exactly the partitions whose marker
exists and whose recorded fingerprint matches the current configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_table(path: str | Path, table: pa.Table) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (a config, a model name) to tag outputs with."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_signature(paths: list[Path], root: Path | None = None) -> list[list[Any]]:
    """Name (relative to ``root``), size and mtime of each file: cheap, and changes when a file does."""
    sig = []
    for path in paths:
        st = path.stat()
        name = path.relative_to(root).as_posix() if root is not None else path.name
        sig.append([name, st.st_size, st.st_mtime_ns])
    return sig


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DoneMarkers:
    """Per-partition ``<name>.done.json`` files recording what was written and under which config."""

    def __init__(self, folder: str | Path, config_fingerprint: str):
        self.folder = Path(folder)
        self.config_fingerprint = config_fingerprint

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.done.json"

    def read(self, name: str) -> dict[str, Any] | None:
        """The marker's content if the partition is finished under the current config, else None."""
        try:
            marker = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        return marker if marker.get("config_fingerprint") == self.config_fingerprint else None

    def write(self, name: str, info: dict[str, Any]) -> None:
        atomic_write_json(self.path(name), {**info, "config_fingerprint": self.config_fingerprint})
