"""jobs/inspect_bundle.py on a built bundle: the report, y_N lookups, verification, speed without Ray.

Also runs jobs/apply_dedup.py --bundle on the same bundle: the build is the costly part of both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_bundle import MIN_COUNT, VERBATIM_COPIES, bundle_config, copy_bundle
from test_image_dedup import VERBATIM_CAPTION, planted_images

from pipeline.bundle.build import build_bundle
from pipeline.bundle.layout import CAPTION_DUPLICATES, IMAGE_DUPLICATES, MANIFEST
from pipeline.bundle.reader import open_bundle
from pipeline.dedup.apply import KEEP_LIST, SHARDS_DIR
from pipeline.dedup.text_normalize import normalize_caption
from pipeline.io.shards import list_shards, read_shard

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "jobs" / "inspect_bundle.py"


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """A bundle of planted duplicates, built as tests/test_bundle.py builds its own."""
    root = tmp_path_factory.mktemp("inspect_bundle")
    truth = planted_images(root / "shards", verbatim_copies=VERBATIM_COPIES)
    cfg = bundle_config(root)
    return root, cfg, build_bundle(cfg), truth


def _job(name: str):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "jobs"))


def run_job(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The job as a user runs it; RAY_ADDRESS points nowhere, so any attempt to reach Ray would fail."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120, env=env
    )
    return proc, time.monotonic() - started


def inspect_json(capsys, *args: str) -> tuple[dict, int]:
    code = _job("inspect_bundle").main([*args, "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1]), code


@pytest.mark.slow
def test_report_shows_identity_thresholds_counts_and_largest_groups(built, record_property):
    root, _, summary, _ = built
    path = root / "bundle"
    manifest = json.loads((path / MANIFEST).read_text())
    proc, seconds = run_job(str(path))
    record_property("inspect_bundle_seconds", round(seconds, 2))
    print(f"inspect_bundle answered in {seconds:.2f} s (a fresh interpreter, imports included)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seconds < 30  # the bound is loose on purpose: a busy 2-core machine; measured ~1.5 s
    text = proc.stdout
    assert f"root hash {summary['root_hash']}" in text and "format       2" in text
    assert "tiny-random-seed0" in text and "verify       OK" in text
    assert f"duplicate_caption_min_count {MIN_COUNT}" in text and "phash_max_distance 12" in text
    assert "jaccard_threshold 0.7" in text
    counts = manifest["counts"]
    assert f"image_duplicate_groups {counts['image_duplicate_groups']}" in text
    assert f"rows {counts['rows']}" in text
    groups = pq.read_table(path / IMAGE_DUPLICATES).to_pylist()
    largest = max(r["group_size"] for r in groups)
    biggest = min(r["group_id"] for r in groups if r["group_size"] == largest)
    representative = next(r["representative_key"] for r in groups if r["group_id"] == biggest)
    assert f"{largest:>5} rows  keep {representative}" in text
    assert repr(normalize_caption(VERBATIM_CAPTION)) in text  # the one caption group
    # --json: the same facts, as the last stdout line.
    proc, _ = run_job(str(path), "--json")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["root_hash"] == summary["root_hash"] and info["thresholds"] == manifest["thresholds"]
    assert info["counts"] == counts and info["model"] == manifest["model"]
    assert info["verify"] == {"mode": "cheap", "ok": True, "error": None}
    assert info["image_groups"]["groups"] == counts["image_duplicate_groups"]
    assert info["image_groups"]["rows"] == counts["rows_in_image_groups"]
    sizes = [g["size"] for g in info["image_groups"]["largest"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == largest and len(sizes) == 5
    assert info["caption_groups"]["largest"] == [
        {
            "group_id": info["caption_groups"]["largest"][0]["group_id"],
            "size": VERBATIM_COPIES,
            "normalized_caption": normalize_caption(VERBATIM_CAPTION),
        }
    ]


@pytest.mark.slow
def test_key_and_caption_lookups_give_the_bundle_apis_y_n(built, capsys, tmp_path):
    root, _, _, truth = built
    path = root / "bundle"
    bundle = open_bundle(path)
    verbatim = sorted(k for k, group in truth.items() if group == "dup:verbatim")
    other = next(  # a row whose cell has no caption repeated MIN_COUNT times
        k
        for k, group in sorted(truth.items())
        if group.startswith("unique:") and bundle.duplicate_caption(bundle.row_of_key(k)).caption is None
    )
    for key in (verbatim[0], other):
        info, code = inspect_json(capsys, str(path), "--key", key)
        expected = bundle.duplicate_caption(bundle.row_of_key(key))
        entry = info["lookup"]["key"]
        assert code == 0 and entry["found"] and entry["row_id"] == bundle.row_of_key(key)
        assert (entry["y_N"], entry["count"]) == (expected.caption, expected.count)
    assert entry["y_N"] is None and entry["cell_rows"] < len(bundle)
    # A caption spelt differently finds the verbatim rows by its normalised form.
    info, code = inspect_json(capsys, str(path), "--caption", VERBATIM_CAPTION.upper() + "!!")
    entry = info["lookup"]["caption"]
    assert code == 0 and entry["rows"] == VERBATIM_COPIES == len(verbatim)
    assert sorted(m["key"] for m in entry["matches"]) == verbatim
    for match in entry["matches"]:
        expected = bundle.duplicate_caption(match["row_id"])
        assert (match["y_N"], match["count"]) == (expected.caption, expected.count)
        assert match["y_N"] == VERBATIM_CAPTION
    # The readable form says the same; an unknown key exits 2.
    proc, _ = run_job(str(path), "--key", verbatim[0])
    assert proc.returncode == 0 and f"y_N {VERBATIM_CAPTION!r}" in proc.stdout
    info, code = inspect_json(capsys, str(path), "--key", "no-such-key")
    assert code == 2 and info["lookup"]["key"] == {"key": "no-such-key", "found": False}
    # --config names the bundle through bundle.out.
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"bundle": {"out": str(path)}}))
    info, code = inspect_json(capsys, "--config", str(config))
    assert code == 0 and info["bundle"] == str(path)


@pytest.mark.slow
def test_tampered_bundle_fails_verification(built, capsys, tmp_path):
    root, _, _, _ = built
    path = copy_bundle(root / "bundle", tmp_path / "copy")
    target = path / "index" / "image.index"  # not read unless a lookup asks
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    target.write_bytes(bytes(data))
    info, code = inspect_json(capsys, str(path))
    assert code == 0 and info["verify"] == {"mode": "cheap", "ok": True, "error": None}
    proc, _ = run_job(str(path), "--verify")
    assert (
        proc.returncode == 1 and "verify       FAILED" in proc.stdout and "index/image.index" in proc.stdout
    )
    info, code = inspect_json(capsys, str(path), "--verify", "--key", "000000000")
    assert code == 1 and info["verify"]["mode"] == "full" and not info["verify"]["ok"]
    assert "sha256" in info["verify"]["error"] and info["lookup"] == {
        "skipped": "the bundle failed its checks"
    }
    # A table of the right size that does not read fails even the cheap run.
    table = path / CAPTION_DUPLICATES
    table.write_bytes(bytes(table.stat().st_size))
    info, code = inspect_json(capsys, str(path))
    assert code == 1 and "cannot be read" in info["verify"]["error"] and "--verify" in info["verify"]["error"]
    # A changed size fails the cheap checks too; what is not a bundle is bad input.
    with open(path / IMAGE_DUPLICATES, "ab") as fh:
        fh.write(b"\0")
    info, code = inspect_json(capsys, str(path))
    assert code == 1 and "BundleChecksumError" in info["verify"]["error"] and "image_groups" not in info
    proc, _ = run_job(str(tmp_path))
    assert proc.returncode == 2 and "not a bundle" in proc.stderr


@pytest.mark.slow
def test_apply_dedup_on_the_built_bundle_keeps_exactly_the_representatives(built, tmp_path):
    root, _, _, truth = built
    path = root / "bundle"
    manifest = json.loads((path / MANIFEST).read_text())
    out = tmp_path / "apply"
    summary = _job("apply_dedup").main(["--bundle", str(path), "--out", str(out), "--filter-shards"])
    counts = manifest["counts"]
    assert summary["rows_seen"] == counts["samples_seen"] == len(truth)
    assert summary["rows_seen"] == summary["kept"] + summary["dropped"]
    assert summary["dropped"] == counts["removable_image_rows"] == summary["reasons"]["image_duplicate_of"]
    assert summary["duplicate_groups"] == counts["image_duplicate_groups"]
    groups = pq.read_table(path / IMAGE_DUPLICATES).to_pylist()
    kept = set(pq.read_table(out / KEEP_LIST).column("key").to_pylist())
    assert kept == {r["representative_key"] for r in groups} | (set(truth) - {r["key"] for r in groups})
    filtered = sorted(r["key"] for s in list_shards(out / SHARDS_DIR) for r in read_shard(s))
    assert filtered == sorted(kept)
    again = _job("apply_dedup").main(["--bundle", str(path), "--out", str(out), "--filter-shards"])
    assert again["skipped"] is True
