"""Ingest on a real local Ray: every row of every shard is accounted for, whatever the shards hold."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_script
from PIL import Image
from test_decode import bomb_png

from fixtures.shard_factory import FakeSample, encode, random_photo, sample, write_shard
from pipeline.core.config import IngestConfig
from pipeline.ingest.ingest import ShardAssembler, run_ingest
from pipeline.io.shards import iter_tar_samples, list_shards, read_shard

REPO = Path(__file__).resolve().parent.parent


def odd_but_valid_samples() -> list[FakeSample]:
    gray16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    cmyk = Image.new("RGB", (16, 16), (200, 40, 40)).convert("CMYK")
    palette = random_photo(5).convert("P")
    rgba = Image.fromarray(np.dstack([np.asarray(random_photo(6)), np.full((40, 48), 128, np.uint8)]), "RGBA")
    return [
        sample("000000000", encode(random_photo(0))),
        sample("000000001", encode(random_photo(1).convert("L"), "PNG"), ext="png"),
        sample("000000002", encode(cmyk, quality=95)),
        sample("000000003", encode(palette, "PNG"), ext="png"),
        sample("000000004", encode(rgba, "PNG"), ext="png"),
        sample("000000005", encode(gray16, "PNG"), ext="png"),
        sample("000000006", encode(random_photo(7), "PNG"), ext="jpg"),  # PNG bytes named .jpg
        sample("000000007", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), ext="png"),
    ]


def bad_samples() -> list[FakeSample]:
    jpeg = encode(random_photo(8, (64, 64)))
    bad_utf8 = sample("000000105", encode(random_photo(9)))
    bad_utf8.files["txt"] = b"caf\xe9 au lait \xff\xfe"
    return [
        sample("000000100", jpeg[: len(jpeg) // 2]),  # truncated image
        sample("000000101", b""),  # zero bytes
        sample("000000102", b"<html><head><title>404</title></head><body>Not Found</body></html>"),
        sample("000000103", bomb_png(20_000), ext="png"),
        sample("000000104", encode(random_photo(10)), caption=None),  # no .txt
        bad_utf8,
        sample("000000106", encode(random_photo(11)), json_bytes=b"{not json"),
        FakeSample(
            "000000107",
            {},
            status="failed_to_download",
            error_message="HTTP Error 404: Not Found",
            url="http://127.0.0.1/missing.jpg",
            caption="lost",
        ),
    ]


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    write_shard(folder, 0, odd_but_valid_samples())
    write_shard(folder, 1, bad_samples())
    # Shard 2: the tar is cut off inside the third sample's image data.
    samples = [sample(f"0000002{i:02d}", encode(random_photo(20 + i, (64, 64)))) for i in range(4)]
    tar_path = write_shard(folder, 2, samples)
    with tarfile.open(tar_path) as archive:
        cut = next(m for m in archive.getmembers() if m.name == "000000202.jpg")
    write_shard(folder, 2, samples, truncate_to=cut.offset_data + cut.size // 2)
    # Shard 3: an empty tar with an empty parquet; shard 4: a zero-byte tar and nothing else (a download
    # that has just started: no _stats.json, so it is incomplete).
    write_shard(folder, 3, [])
    (folder / "00004.tar").write_bytes(b"")
    return folder


def test_truncated_tar_yields_complete_samples_then_the_broken_one(shard_dir: Path):
    samples = list(iter_tar_samples(shard_dir / "00002.tar"))
    assert [s.key for s in samples] == ["000000200", "000000201", "000000202"]
    assert samples[0].error is None and samples[1].error is None
    assert samples[2].error.startswith("truncated_tar")
    rows = {r["key"]: r for r in read_shard(next(s for s in list_shards(shard_dir) if s.name == "00002"))}
    assert rows["000000203"]["read_error"].startswith(
        "missing_from_tar"
    )  # in the parquet, lost with the tail


@pytest.mark.slow
def test_every_row_is_accounted_for(ray_local, shard_dir: Path, tmp_path: Path):
    summary = run_ingest(IngestConfig(shards=str(shard_dir), out=str(tmp_path / "out")))
    samples = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    by_key = samples.set_index("key")

    assert summary["rows_seen"] == len(samples) == 8 + 8 + 4
    assert summary["ok"] + summary["rejected"] == summary["rows_seen"]
    assert samples["key"].is_unique
    for name, counts in summary["per_shard"].items():
        assert counts["ok"] + counts["rejected"] == counts["rows_seen"], name
        assert counts["rows_seen"] == int((samples["shard"] == name).sum())
    assert summary["per_shard"]["00003"]["rows_seen"] == 0
    assert summary["shards_incomplete"] == ["00004"] and "00004" not in summary["per_shard"]
    assert not (tmp_path / "out" / "parts" / "00004.done.json").exists()
    assert summary["shards"] == 4 and summary["shards_processed"] == 4
    assert summary["shards_changed_during_read"] == [] and summary["shards_stats_mismatch"] == {}

    valid = by_key.loc[[f"00000000{i}" for i in range(8)]]
    assert (valid["status"] == "ok").all(), valid["error"].tolist()
    assert by_key.loc["000000006", "format"] == "PNG"
    assert by_key.loc["000000007", ["width", "height"]].tolist() == [1, 1]

    expected_reasons = {
        "000000100": "truncated_image",
        "000000101": "empty_file",
        "000000102": "not_an_image",
        "000000103": "decompression_bomb",
        "000000107": "download_failed",
        "000000202": "truncated_tar",
        "000000203": "missing_from_tar",
    }
    for key, reason in expected_reasons.items():
        assert by_key.loc[key, "status"] == "rejected"
        assert by_key.loc[key, "error"].startswith(reason), by_key.loc[key, "error"]
    assert by_key.loc["000000107", "url"] == "http://127.0.0.1/missing.jpg"
    assert "404" in by_key.loc["000000107", "error"]

    # Tolerated caption and metadata problems keep the image, with a warning.
    assert by_key.loc["000000104", "status"] == "ok" and by_key.loc["000000104", "caption"] == ""
    assert by_key.loc["000000105", "caption"].startswith("caf\ufffd au lait")
    assert (
        by_key.loc["000000106", "status"] == "ok" and "malformed json" in by_key.loc["000000106", "warning"]
    )
    assert by_key.loc[["000000200", "000000201"], "status"].tolist() == ["ok", "ok"]

    written = json.loads((tmp_path / "out" / "ingest_summary.json").read_text())
    assert written["rows_seen"] == summary["rows_seen"]
    assert written["rejected_by_reason"]["decompression_bomb"] == 1


@pytest.mark.slow
def test_rerun_reads_nothing_and_a_changed_shard_is_read_again(ray_local, shard_dir: Path, tmp_path: Path):
    cfg = IngestConfig(shards=str(shard_dir), out=str(tmp_path / "out"))
    first = run_ingest(cfg)
    part = tmp_path / "out" / "parts" / "00000.parquet"
    mtime = part.stat().st_mtime_ns
    second = run_ingest(cfg)
    assert second["shards_processed"] == 0 and second["shards_skipped"] == first["shards"]
    assert part.stat().st_mtime_ns == mtime
    assert {k: second[k] for k in ("rows_seen", "ok", "rejected")} == {
        k: first[k] for k in ("rows_seen", "ok", "rejected")
    }

    write_shard(shard_dir, 0, odd_but_valid_samples()[:3])
    third = run_ingest(cfg)
    assert third["shards_processed"] == 1
    assert third["per_shard"]["00000"]["rows_seen"] == 3
    assert len(pd.read_parquet(tmp_path / "out" / "samples.parquet")) == third["rows_seen"]


@pytest.mark.slow
def test_shards_without_parquet_or_captions(ray_local, shared_data: Path, tmp_path: Path):
    """clip-retrieval's caption-less tars: read by their tar alone, exact duplicates keep their hash.

    They have no _stats.json, so by default they count as unfinished downloads; --no-require-stats
    is the explicit opt-in for shards written by other tools.
    """
    peer = str(shared_data / "peer_samples" / "clip-retrieval")
    waiting = run_ingest(IngestConfig(shards=peer, out=str(tmp_path / "default")))
    assert waiting["shards_incomplete"] == ["image1", "image2", "image3", "image4"]
    assert waiting["rows_seen"] == waiting["shards"] == 0
    summary = run_ingest(IngestConfig(shards=peer, out=str(tmp_path), require_stats=False))
    assert summary["shards_incomplete"] == []
    assert {counts["stats_count"] for counts in summary["per_shard"].values()} == {None}  # nothing to check
    samples = pd.read_parquet(tmp_path / "samples.parquet")
    assert summary["rows_seen"] == summary["ok"] == 4 + 3 + 2 + 2
    assert (samples["caption"] == "").all()
    first = set(samples.loc[samples["shard"] == "image1", "sha256"])
    repeats = samples.loc[samples["shard"].isin(["image3", "image4"]), "sha256"]
    assert len(repeats) == 4 and set(repeats) <= first  # image3 and image4 repeat image1's photos


def photos(shard: int, n: int, size: tuple[int, int] = (48, 40)) -> list[FakeSample]:
    return [sample(f"{shard:05d}{i:04d}", encode(random_photo(shard * 100 + i, size))) for i in range(n)]


@pytest.mark.slow
def test_only_complete_unchanged_fully_counted_shards_are_marked_done(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Issue 12, item 3: an unfinished download, a shard that grows while it is read and a shard whose
    rows disagree with its _stats.json are reported and not marked done; a later run takes them once
    they are whole. The same run rejects an oversized member and a repeated key row by row."""
    folder = tmp_path / "shards"
    write_shard(folder, 0, photos(0, 3))
    killed = photos(1, 5)
    for s in killed[2:]:
        s.in_tar = False  # img2dataset was killed after two samples: no _stats.json yet
    write_shard(folder, 1, killed, with_stats=False)
    write_shard(folder, 2, photos(2, 3))
    stats = json.loads((folder / "00002_stats.json").read_text())
    (folder / "00002_stats.json").write_text(json.dumps({**stats, "count": 4}))  # a URL lost on the way
    write_shard(folder, 3, photos(3, 2))
    big = photos(4, 1, (160, 160))[0]
    small = photos(4, 3)
    repeated = sample(small[1].key, encode(random_photo(999)))  # the same key written twice in one tar
    write_shard(folder, 4, [big, small[1], repeated, small[2]])
    cap = (len(big.files["jpg"]) + max(len(s.files["jpg"]) for s in [*small, repeated])) // 2

    original = ShardAssembler.write
    grown: list[str] = []

    def grows_while_read(self, shard, rows):
        if shard == "00003" and not grown:  # img2dataset rewrote the shard after the reader's pass
            grown.append(shard)
            write_shard(folder, 3, photos(3, 4))
        return original(self, shard, rows)

    monkeypatch.setattr(ShardAssembler, "write", grows_while_read)
    cfg = IngestConfig(shards=str(folder), out=str(tmp_path / "out"), max_member_bytes=cap)
    first = run_ingest(cfg)

    assert first["shards_incomplete"] == ["00001"]
    assert first["shards_changed_during_read"] == ["00003"]
    assert first["shards_stats_mismatch"] == {"00002": {"rows_seen": 3, "stats_count": 4}}
    assert set(first["per_shard"]) == {"00000", "00004"} and first["shards"] == 2
    assert [first["per_shard"][n]["stats_count"] for n in ("00000", "00004")] == [3, 4]
    assert first["shards_processed"] == 2 and first["shards_skipped"] == 0
    markers = {p.name for p in (tmp_path / "out" / "parts").glob("*.done.json")}
    assert markers == {"00000.done.json", "00004.done.json"}
    samples = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    assert set(samples["shard"]) == {"00000", "00004"} and len(samples) == first["rows_seen"] == 3 + 4
    by_key = samples.set_index("key")
    assert by_key.loc[big.key, "error"].startswith("member_too_large")
    assert by_key.loc[f"{small[1].key}:duplicate-1", "error"].startswith("duplicate_key")
    assert by_key.loc[small[1].key, "sha256"] == hashlib.sha256(small[1].files["jpg"]).hexdigest()
    assert first["rejected_by_reason"] == {"duplicate_key": 1, "member_too_large": 1}
    written = json.loads((tmp_path / "out" / "ingest_summary.json").read_text())
    assert written["shards_stats_mismatch"] == first["shards_stats_mismatch"]

    write_shard(folder, 1, photos(1, 5))  # the download finished
    second = run_ingest(cfg)
    assert second["shards_processed"] == 2 and second["shards_skipped"] == 2
    assert (second["per_shard"]["00001"]["rows_seen"], second["per_shard"]["00003"]["rows_seen"]) == (5, 4)
    assert second["shards_incomplete"] == [] and second["shards_changed_during_read"] == []
    assert second["shards_stats_mismatch"] == {"00002": {"rows_seen": 3, "stats_count": 4}}  # never accepted
    assert not (tmp_path / "out" / "parts" / "00002.done.json").exists()


def test_missing_shard_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_ingest(IngestConfig(shards=str(tmp_path / "nope"), out=str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        run_ingest(IngestConfig(shards=str(tmp_path / "empty"), out=str(tmp_path / "out")))


@pytest.mark.slow
def test_ingest_job_prints_its_summary_last(shard_dir: Path, tmp_path: Path):
    """The job as users run it: its own local Ray, the JSON summary as the last stdout line."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "jobs/ingest.py",
        "--shards",
        str(shard_dir),
        "--out",
        str(tmp_path / "job"),
        "--ray-num-cpus",
        "2",
        "--ray-object-store-mb",
        "256",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["job"] == "ingest" and summary["rows_seen"] == 20
    assert summary["ok"] + summary["rejected"] == 20

    missing = run_script("jobs/ingest.py", "--out", str(tmp_path), env=env, timeout=120)
    assert missing.returncode == 2 and "--shards is required" in missing.stderr
