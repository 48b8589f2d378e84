"""Crash-safe writes: unique temporary names, fsync of file and folder, nothing published on failure."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import storage
from pipeline.core.storage import (
    atomic_parquet_writer,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    host_name,
    unique_tmp_path,
)

SCHEMA = pa.schema([("key", pa.int64()), ("caption", pa.string())])


def _table(keys: range, caption: str) -> pa.Table:
    return pa.table({"key": list(keys), "caption": [caption] * len(keys)}, schema=SCHEMA)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------
# Temporary names
# ------------------------------------------------------------------------------------------------


def test_temp_names_are_unique_and_name_host_and_pid(tmp_path: Path):
    target = tmp_path / "samples.parquet"
    a, b = unique_tmp_path(target), unique_tmp_path(target)
    assert a != b  # two writers in one process (threads) never share a temporary file
    for tmp in (a, b):
        assert tmp.parent == tmp_path and tmp.name.startswith(".samples.parquet.tmp-")
        assert f"-{host_name()}-{os.getpid()}-" in tmp.name
    assert host_name() and "/" not in host_name()
    assert unique_tmp_path(target, "link").name.startswith(".samples.parquet.link-")


def test_host_name_is_safe_in_a_file_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "node/7 :gpu")
    assert host_name() == "node_7__gpu"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert host_name() == "host"


# ------------------------------------------------------------------------------------------------
# Failure leaves the old file and no temporary
# ------------------------------------------------------------------------------------------------


def test_failed_bytes_write_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_failed_table_write_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch):
    target = tmp_path / "t.parquet"
    atomic_write_table(target, _table(range(3), "old"))
    real_write = pq.write_table

    def half_write(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk went away")

    monkeypatch.setattr(pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_table(target, _table(range(5), "new"))
    monkeypatch.setattr(pq, "write_table", real_write)
    assert pq.read_table(target).equals(_table(range(3), "old"))
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Streaming Parquet writer
# ------------------------------------------------------------------------------------------------


def test_parquet_writer_publishes_only_on_success(tmp_path: Path):
    target = tmp_path / "samples.parquet"
    with atomic_parquet_writer(target, SCHEMA) as writer:
        writer.write_table(_table(range(2), "a"))
        assert not target.exists()  # nothing visible until the writer is closed
        writer.write_table(_table(range(2, 4), "a"))
    assert pq.read_table(target).num_rows == 4
    assert _leftovers(tmp_path) == []

    with pytest.raises(RuntimeError, match="part missing"), atomic_parquet_writer(target, SCHEMA) as writer:
        writer.write_table(_table(range(10), "b"))
        raise RuntimeError("part missing")
    assert pq.read_table(target).equals(_table(range(4), "a"))  # the old file, untouched
    assert _leftovers(tmp_path) == []


def test_parquet_writer_into_a_new_folder(tmp_path: Path):
    target = tmp_path / "new" / "deeper" / "x.parquet"
    with atomic_parquet_writer(target, SCHEMA) as writer:
        writer.write_table(_table(range(1), "a"))
    assert pq.read_table(target).num_rows == 1


def test_interleaved_writers_each_leave_a_readable_file(tmp_path: Path):
    """Two merges into one target at once (H3): each publishes a whole file; the last to close wins."""
    target = tmp_path / "samples.parquet"
    first = atomic_parquet_writer(target, SCHEMA)
    second = atomic_parquet_writer(target, SCHEMA)
    w1 = first.__enter__()
    w2 = second.__enter__()
    for i in range(3):  # interleaved row groups
        w1.write_table(_table(range(i * 10, i * 10 + 10), "first"))
        w2.write_table(_table(range(i * 5, i * 5 + 5), "second"))
    second.__exit__(None, None, None)
    assert pq.read_table(target).column("caption").to_pylist() == ["second"] * 15
    w1.write_table(_table(range(30, 40), "first"))
    first.__exit__(None, None, None)
    table = pq.read_table(target)
    assert table.num_rows == 40 and set(table.column("caption").to_pylist()) == {"first"}
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Durability: file fsynced before the rename, folder fsynced after it
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def sync_log(monkeypatch):
    """Records fsync (as ('file'|'dir', inode)) and os.replace calls, in order."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _assert_synced(events: list[tuple], target: Path) -> None:
    file_ino, dir_ino = target.stat().st_ino, target.parent.stat().st_ino
    assert ("replace", target.name) in events, events
    at = events.index(("replace", target.name))
    assert ("file", file_ino) in events[:at], f"file not fsynced before the rename: {events}"
    assert ("dir", dir_ino) in events[at + 1 :], f"folder not fsynced after the rename: {events}"


@pytest.mark.parametrize("kind", ["bytes", "json", "table", "parquet_writer"])
def test_file_and_folder_are_fsynced(tmp_path: Path, sync_log: list[tuple], kind: str):
    target = tmp_path / f"out.{kind}"
    if kind == "bytes":
        atomic_write_bytes(target, b"x" * 100)
    elif kind == "json":
        atomic_write_json(target, {"rows": 3})
    elif kind == "table":
        atomic_write_table(target, _table(range(3), "a"))
    else:
        with atomic_parquet_writer(target, SCHEMA) as writer:
            writer.write_table(_table(range(3), "a"))
    _assert_synced(sync_log, target)


def test_folder_fsync_refused_is_ignored(tmp_path: Path, monkeypatch):
    """Some filesystems refuse fsync on a folder (EINVAL); the write still succeeds."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_bytes(tmp_path / "a.bin", b"1")
    assert (tmp_path / "a.bin").read_bytes() == b"1"
    storage.fsync_dir(tmp_path / "no-such-folder")  # nothing to open: ignored too


def test_marker_after_data_both_durable(tmp_path: Path, sync_log: list[tuple]):
    """A part and then its done marker: the part's bytes and its folder entry are synced before the
    marker is even renamed into place, so a marker never outlives its data."""
    part, marker = tmp_path / "00000.parquet", tmp_path / "done" / "00000.done.json"
    atomic_write_table(part, _table(range(3), "a"))
    storage.DoneMarkers(tmp_path / "done", "fp").write("00000", {"rows": 3})
    _assert_synced(sync_log, part)
    _assert_synced(sync_log, marker)
    assert sync_log.index(("replace", part.name)) < sync_log.index(("replace", marker.name))
    part_dir_sync = sync_log.index(("dir", tmp_path.stat().st_ino))
    assert part_dir_sync < sync_log.index(("replace", marker.name))
