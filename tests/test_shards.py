"""The shard reader on hostile and unfinished input: no Ray, each rule alone.

Completeness (a shard counts only with img2dataset's ``_stats.json``), the after-read checks (a
changed shard, a row count that disagrees with the stats), and tar safety (a size cap, sparse
members, repeated and unsafe keys): every member of a tar ends up as exactly one row, and reading
never raises and never holds more than one capped member in memory.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from fixtures.shard_factory import FakeSample, encode, random_photo, sample, write_shard
from pipeline.core.config import EmbedConfig, IngestConfig, result_options
from pipeline.io.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    READ_BAD_KEY,
    READ_DUPLICATE_KEY,
    READ_MEMBER_TOO_LARGE,
    READ_SPARSE_MEMBER,
    SHARD_CHANGED_DURING_READ,
    SHARD_STATS_MISMATCH,
    Shard,
    check_after_read,
    complete_shards,
    iter_tar_samples,
    list_shards,
    read_shard,
    stats_count,
)


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (repeated names included)."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def tar_shard(folder: Path, name: str, members: list[tuple[str, bytes]]) -> Shard:
    folder.mkdir(parents=True, exist_ok=True)
    return Shard(name, tar_of(folder / f"{name}.tar", members), None, None)


# --- completeness -------------------------------------------------------------------------------


def test_shard_factory_writes_img2dataset_stats(tmp_path: Path):
    samples = [sample("000000000", encode(random_photo(0)))]
    samples.append(FakeSample("000000001", {}, status="failed_to_download", error_message="HTTP Error 404"))
    write_shard(tmp_path, 0, samples)
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")} == {
        "count": 2,
        "successes": 1,
        "failed_to_download": 1,
        "failed_to_resize": 0,
    }
    assert stats["status_dict"] == {"success": 1, "HTTP Error 404": 1}
    write_shard(tmp_path, 1, samples, with_stats=False)
    assert not (tmp_path / "00001_stats.json").exists()


def test_a_shard_without_stats_is_incomplete_unless_stats_are_not_required(tmp_path: Path):
    write_shard(tmp_path, 0, [sample("000000000", encode(random_photo(0)))])
    write_shard(tmp_path, 1, [sample("000010000", encode(random_photo(1)))], with_stats=False)
    write_shard(tmp_path, 2, [sample("000020000", encode(random_photo(2)))])
    (tmp_path / "00002_stats.json").write_text('{"count": 1, "succ')  # img2dataset still writing it
    shards = list_shards(tmp_path)
    assert [s.name for s in shards] == ["00000", "00001", "00002"]  # the listing still shows every shard
    complete, incomplete = complete_shards(shards)
    assert [s.name for s in complete] == ["00000"]
    assert incomplete == ["00001", "00002"]
    complete, incomplete = complete_shards(shards, require_stats=False)  # a half-written one still waits
    assert [s.name for s in complete] == ["00000", "00001"] and incomplete == ["00002"]


def test_stats_count_reads_img2dataset_count(tmp_path: Path):
    write_shard(tmp_path, 0, [sample(f"00000000{i}", encode(random_photo(i))) for i in range(3)])
    write_shard(tmp_path, 1, [], with_stats=False)
    shards = {s.name: s for s in list_shards(tmp_path)}
    assert stats_count(shards["00000"]) == 3
    assert stats_count(shards["00001"]) is None
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 3}))  # no count: nothing to check
    assert stats_count(shards["00000"]) is None


def test_the_signature_covers_the_stats_file(tmp_path: Path):
    write_shard(tmp_path, 0, [sample("000000000", encode(random_photo(0)))], with_stats=False)
    before = list_shards(tmp_path)[0].signature()
    write_shard(tmp_path, 0, [sample("000000000", encode(random_photo(0)))])  # the download finished
    after = list_shards(tmp_path)[0].signature()
    assert "stats" not in before and "stats" in after and before != after


def test_after_read_a_changed_shard_or_a_count_mismatch_is_a_problem(tmp_path: Path):
    samples = [sample(f"00000000{i}", encode(random_photo(i))) for i in range(3)]
    write_shard(tmp_path, 0, samples)
    shard = list_shards(tmp_path)[0]
    before = shard.signature()
    assert check_after_read(shard, before, rows_seen=3) is None
    mismatch = check_after_read(shard, before, rows_seen=2)
    assert mismatch is not None and mismatch.reason == SHARD_STATS_MISMATCH
    assert (mismatch.rows_seen, mismatch.stats_count) == (2, 3)
    assert str(mismatch).startswith("stats_mismatch: 2 rows read, 3 in 00000_stats.json")

    with open(shard.tar, "ab") as fh:  # img2dataset appends while the reader reads
        fh.write(b"\0" * 512)
    changed = check_after_read(shard, before, rows_seen=3)
    assert changed is not None and changed.reason == SHARD_CHANGED_DURING_READ
    assert "tar" in str(changed)

    no_stats = Shard(shard.name, shard.tar, shard.parquet, None)
    assert check_after_read(no_stats, no_stats.signature(), rows_seen=7) is None  # nothing to compare


# --- tar safety ---------------------------------------------------------------------------------


def sparse_tar(folder: Path, fmt: str) -> Path:
    """A GNU tar's sparse member (300 MB logical, a few KB on disk) between two ordinary samples."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jpg").write_bytes(encode(random_photo(0)))
    (folder / "a.txt").write_text("first")
    with open(folder / "b.jpg", "wb") as fh:
        fh.write(b"\xff\xd8\xff")
        fh.truncate(300 * 1024 * 1024)
    (folder / "b.txt").write_text("sparse")
    (folder / "c.jpg").write_bytes(encode(random_photo(1)))
    tar = folder.parent / f"{fmt}.tar"
    names = ["a.jpg", "a.txt", "b.jpg", "b.txt", "c.jpg"]
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(tar), *names], cwd=folder, check=True)
    for name in names:
        os.remove(folder / name)
    return tar


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_sparse_member_is_a_rejected_row_and_is_never_expanded(tmp_path: Path, fmt: str):
    tar = sparse_tar(tmp_path / "files", fmt)
    assert tar.stat().st_size < 1024 * 1024
    tracemalloc.start()
    try:
        rows = read_shard(Shard("s", tar, None, None))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"{peak} bytes held while reading a {tar.stat().st_size}-byte tar"
    by_key = {r["key"]: r for r in rows}
    assert list(by_key) == ["a", "b", "c"]
    assert by_key["b"]["read_error"].startswith(READ_SPARSE_MEMBER)
    assert by_key["b"]["image"] is None and by_key["b"]["caption"] == "sparse"  # small files still read
    assert by_key["a"]["read_error"] is None and by_key["c"]["read_error"] is None


def test_a_member_over_the_cap_is_a_rejected_row_and_is_not_read(tmp_path: Path):
    small, big = encode(random_photo(0, (8, 8))), encode(random_photo(1, (200, 200)))
    cap = (len(small) + len(big)) // 2
    shard = tar_shard(
        tmp_path, "s", [("a.jpg", small), ("a.txt", b"small"), ("b.jpg", big), ("b.txt", b"big")]
    )
    rows = {r["key"]: r for r in read_shard(shard, max_member_bytes=cap)}
    assert rows["a"]["read_error"] is None and rows["a"]["image"] == small
    assert rows["b"]["read_error"].startswith(READ_MEMBER_TOO_LARGE)
    assert f"{len(big)} bytes" in rows["b"]["read_error"] and str(cap) in rows["b"]["read_error"]
    assert rows["b"]["image"] is None and rows["b"]["caption"] == "big"
    assert all(r["read_error"] is None for r in read_shard(shard))  # the default cap is far above
    assert DEFAULT_MAX_MEMBER_BYTES == 64 * 1024 * 1024


def test_a_size_the_tar_cannot_hold_is_rejected_without_a_read(tmp_path: Path):
    """A header claiming gigabytes in a tiny file: rejected for its size, nothing allocated for it."""
    path = tar_of(tmp_path / "s.tar", [("a.jpg", b"x" * 10), ("b.jpg", b"y" * 600)])
    with tarfile.open(path) as archive:
        member = archive.getmember("b.jpg")
    header = tarfile.TarInfo("b.jpg")
    header.size = 8 * 1024**3
    raw = bytearray(path.read_bytes())
    raw[member.offset : member.offset + 512] = header.tobuf(format=tarfile.GNU_FORMAT)
    path.write_bytes(bytes(raw))
    samples = list(iter_tar_samples(path))
    assert [s.key for s in samples] == ["a", "b"]
    assert samples[1].error.startswith(READ_MEMBER_TOO_LARGE) and not samples[1].files


def test_repeated_keys_never_replace_an_image_and_every_member_is_a_row(tmp_path: Path):
    first, second, other = (encode(random_photo(i)) for i in range(3))
    shard = tar_shard(
        tmp_path, "s", [("a.jpg", first), ("a.jpg", second), ("b.jpg", other), ("a.txt", b"late caption")]
    )
    rows = read_shard(shard)
    keys = [r["key"] for r in rows]
    assert keys == ["a", "a:duplicate-1", "b", "a:duplicate-2"]
    assert len(set(keys)) == len(keys) and all(r["shard_rows"] == 4 for r in rows)
    by_key = {r["key"]: r for r in rows}
    assert by_key["a"]["image"] == first and by_key["a"]["read_error"] is None  # the first one wins
    assert by_key["a"]["caption"] == ""  # the late a.txt is not merged into the finished sample
    for key in ("a:duplicate-1", "a:duplicate-2"):
        assert by_key[key]["read_error"].startswith(READ_DUPLICATE_KEY) and by_key[key]["image"] is None
    assert "a.jpg" in by_key["a:duplicate-1"]["read_error"]
    assert "a.txt" in by_key["a:duplicate-2"]["read_error"]


def test_unsafe_keys_are_rejected_and_directory_prefixes_kept(tmp_path: Path):
    image = encode(random_photo(0))
    shard = tar_shard(
        tmp_path,
        "s",
        [
            ("../../evil.jpg", image),
            ("/etc/abs.jpg", image),
            ("dir/../up.jpg", image),
            ("win\\path.jpg", image),
            (".jpg", image),
            ("dir/ok.jpg", image),
            ("./dot.jpg", image),
        ],
    )
    rows = {r["key"]: r for r in read_shard(shard)}
    for key in ("../../evil", "/etc/abs", "dir/../up", "win\\path", ".jpg"):
        assert rows[key]["read_error"].startswith(READ_BAD_KEY), key
        assert rows[key]["image"] is None, key
    assert rows["dir/ok"]["read_error"] is None and rows["dir/ok"]["image"] == image
    assert rows["./dot"]["read_error"] is None  # `tar -cf x.tar .` writes ./ prefixes; harmless


def test_parquet_rows_still_complete_a_shard_with_rejected_members(tmp_path: Path):
    """A rejected member keeps its parquet row's URL; failed downloads still become rows."""
    samples = [sample(f"00000000{i}", encode(random_photo(i, (120, 120)))) for i in range(2)]
    samples.append(FakeSample("000000002", {}, status="failed_to_download", error_message="timeout"))
    write_shard(tmp_path, 0, samples)
    shard = list_shards(tmp_path)[0]
    rows = {r["key"]: r for r in read_shard(shard, max_member_bytes=600)}
    assert len(rows) == stats_count(shard) == 3
    assert rows["000000000"]["read_error"].startswith(READ_MEMBER_TOO_LARGE)
    assert rows["000000000"]["url"] == samples[0].url
    assert rows["000000002"]["read_error"].startswith("download_failed")


def test_the_stages_default_cap_is_the_readers():
    for cfg in (IngestConfig(), EmbedConfig()):
        assert cfg.max_member_bytes == DEFAULT_MAX_MEMBER_BYTES and cfg.require_stats is True
        assert {"max_member_bytes", "require_stats"} <= set(result_options(cfg))  # both change results


def test_a_whole_sample_written_twice_is_one_duplicate_row(tmp_path: Path):
    """A retried write appended a sample again: two rows, as in the parquet and the stats count."""
    first, second = encode(random_photo(0)), encode(random_photo(1))
    members = [("a.jpg", first), ("a.txt", b"one"), ("a.jpg", second), ("a.txt", b"two")]
    rows = read_shard(tar_shard(tmp_path, "s", members))
    assert [r["key"] for r in rows] == ["a", "a:duplicate-1"]
    assert rows[0]["image"] == first and rows[0]["caption"] == "one" and rows[0]["read_error"] is None
    assert rows[1]["read_error"].startswith(READ_DUPLICATE_KEY) and rows[1]["caption"] == ""
