"""Crash-safe output: write to a temporary name, rename into place, write the done marker last.

A reader never sees a half-written file, and a re-run trusts exactly the partitions whose marker
exists and whose recorded fingerprint matches the current configuration.

Temporary names are unique per writer (host, PID and a random token), so concurrent writers on a
shared volume never write into one file. Every write fsyncs the file before the rename and the folder
after it; done markers are written with the same functions, last, so after a crash or power loss a
marker never outlives its data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def host_name() -> str:
    """This machine's host name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"


def unique_tmp_path(path: str | Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``path`` that no other writer uses: ``.{name}.{kind}-{host}-{pid}-{token}``.

    Host and PID tell where a leftover came from; the random token keeps two writers apart even where
    host and PID coincide (threads of one process, containers sharing a volume, PID reuse).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_file(path: str | Path) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename, a new or removed file) to disk.

    Best effort: platforms and filesystems that cannot open or fsync a folder are ignored.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_tmp(tmp: str | Path, path: str | Path) -> None:
    """Make a finished temporary file durable and rename it to ``path``: fsync it, rename, fsync the folder.

    After this returns, ``path`` survives a power loss with its full content, so a done marker written
    afterwards never outlives the data it describes.
    """
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_table(path: str | Path, table: pa.Table) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp_path(path)
    try:
        pq.write_table(table, tmp)
        publish_tmp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_array(path: str | Path, array: np.ndarray) -> None:
    """Write one array as ``.npy`` atomically (memory-mappable with ``np.load(mmap_mode='r')``)."""
    _atomic_write_with(path, lambda fh: np.save(fh, array))


def _atomic_write_with(path: str | Path, write: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        publish_tmp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_parquet_writer(path: str | Path, schema: pa.Schema, **kwargs: Any) -> Iterator[pq.ParquetWriter]:
    """A ``ParquetWriter`` streaming into a private temporary file that becomes ``path`` on success.

    On a clean exit the file is closed, fsynced and renamed into place (then its folder fsynced); on an
    exception it is removed and ``path`` keeps its old content. Two writers to one target each write
    their own temporary file, so both publish a whole file and the last to finish wins. ``kwargs`` go
    to ``ParquetWriter`` (compression, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp_path(path)
    try:
        with pq.ParquetWriter(tmp, schema, **kwargs) as writer:
            yield writer
        publish_tmp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
