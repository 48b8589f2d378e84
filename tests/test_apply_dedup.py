"""Acting on duplicates: keep-/drop-lists under each policy, filtered shards, accounting, resuming."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_image_dedup import planted_images

from fixtures.shard_factory import FakeSample, encode, random_photo, sample, write_shard
from pipeline.bundle.layout import BUNDLE_FORMAT_VERSION, MANIFEST, root_hash
from pipeline.core.config import ApplyDedupConfig, ImageDedupConfig
from pipeline.core.storage import sha256_file
from pipeline.dedup.apply import (
    DROP_LIST,
    KEEP_LIST,
    REASONS,
    SCHEMA,
    SHARDS_DIR,
    SUMMARY_NAME,
    reason_kind,
    run_apply_dedup,
)
from pipeline.dedup.image import SCHEMA as IMAGE_SCHEMA
from pipeline.dedup.image import find_image_duplicates
from pipeline.embed.phash import phash_images
from pipeline.io.decode import decode_image
from pipeline.io.embeddings import METADATA_SCHEMA
from pipeline.io.shards import check_after_read, list_shards, read_shard, stats_count

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------
# A small hand-made dataset whose right answer is known for every policy.
# ----------------------------------------------------------------------------------------------

K = {name: f"0000{i:05d}" for i, name in enumerate("abcdef")} | {
    name: f"0001{i:05d}" for i, name in enumerate("ghij")
}
# Image group A: a, b (a byte copy of a), c (a, smaller). Image group B: g (small), h (larger).
# Caption group: c and i ("tiny kite"); caption group: d and j (a harbour, spelt two ways).
# e failed to download; f is not an image. Scores (shard parquet column "aesthetic") favour b and g.
SCORES = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.4, "f": 0.0, "g": 0.3, "h": 0.2, "i": 0.6, "j": 0.7}


def _photo(seed: int, size: tuple[int, int]) -> bytes:
    return encode(random_photo(seed, size), "JPEG", quality=95)


def small_dataset(root: Path) -> Path:
    """Two shards (10 rows) plus image_duplicates.parquet and caption_duplicates.parquet, by hand."""
    shards = root / "shards"
    a = _photo(1, (64, 48))
    rows0 = [
        sample(K["a"], a, caption="red kite over the hill"),
        sample(K["b"], a, caption="a kite"),
        sample(K["c"], encode(random_photo(1, (32, 24)), "JPEG", quality=95), caption="tiny kite"),
        sample(K["d"], _photo(2, (48, 40)), caption="a quiet harbour at dawn"),
        FakeSample(
            K["e"], {}, status="failed_to_download", error_message="404", url="http://x/e.jpg", in_tar=False
        ),
        sample(K["f"], b"not an image at all", caption="broken"),
    ]
    rows1 = [
        sample(K["g"], _photo(3, (40, 30)), caption="green field"),
        sample(K["h"], _photo(3, (80, 60)), caption="green field, large"),
        sample(K["i"], _photo(4, (48, 40)), caption="Tiny kite!"),
        sample(K["j"], _photo(5, (48, 40)), caption="A quiet harbour at dawn."),
    ]
    for shard_id, rows in enumerate((rows0, rows1)):
        write_shard(shards, shard_id, rows)
        path = shards / f"{shard_id:05d}.parquet"
        table = pq.read_table(path)
        by_key = {K[n]: s for n, s in SCORES.items()}
        scores = [by_key.get(k) for k in table.column("key").to_pylist()]
        pq.write_table(table.append_column("aesthetic", pa.array(scores, pa.float64())), path)
    # The table's representative of group A is b, on purpose: the policy decides, not the table.
    image_rows = [("a", 0, "b"), ("b", 0, "b"), ("c", 0, "b"), ("g", 4, "g"), ("h", 4, "g")]
    write_image_table(root / "image_duplicates.parquet", [(K[n], gid, K[r]) for n, gid, r in image_rows])
    embedded = ["a", "b", "c", "d", "g", "h", "i", "j"]
    caption_group = {"c": (2, 2), "i": (2, 2), "d": (3, 2), "j": (3, 2)}
    pq.write_table(
        pa.table(
            {
                "key": [K[n] for n in embedded],
                "group_id": [caption_group.get(n, (row, 1))[0] for row, n in enumerate(embedded)],
                "group_size": [caption_group.get(n, (0, 1))[1] for n in embedded],
                "normalized_caption": ["x"] * len(embedded),
            }
        ),
        root / "caption_duplicates.parquet",
    )
    return root


def write_image_table(path: Path, rows: list[tuple[str, int, str]]) -> None:
    """image_duplicates.parquet (its real schema) from (key, group_id, representative_key)."""
    sizes = {gid: sum(1 for _, g, _ in rows if g == gid) for _, gid, _ in rows}
    pq.write_table(
        pa.table(
            {
                "key": [k for k, _, _ in rows],
                "row_id": list(range(len(rows))),
                "group_id": [g for _, g, _ in rows],
                "group_size": [sizes[g] for _, g, _ in rows],
                "representative_key": [r for _, _, r in rows],
                "is_representative": [k == r for k, _, r in rows],
                "similarity": [1.0] * len(rows),
                "hamming_distance": [0] * len(rows),
                "method": ["representative" if k == r else "phash" for k, _, r in rows],
                "linked_by": ["phash"] * len(rows),
            },
            schema=IMAGE_SCHEMA,
        ),
        path,
    )


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return small_dataset(tmp_path)


def config(root: Path, **options: object) -> ApplyDedupConfig:
    base = {
        "shards": str(root / "shards"),
        "image_duplicates": str(root / "image_duplicates.parquet"),
        "caption_duplicates": str(root / "caption_duplicates.parquet"),
        "out": str(root / "out"),
    }
    return ApplyDedupConfig(**{**base, **options})


def lists(out: Path) -> tuple[pa.Table, pa.Table]:
    return pq.read_table(out / KEEP_LIST), pq.read_table(out / DROP_LIST)


def reasons_by_name(out: Path) -> dict[str, str]:
    keep, drop = lists(out)
    name = {key: n for n, key in K.items()}
    return {name[r["key"]]: r["reason"] for r in keep.to_pylist() + drop.to_pylist()}


def assert_accounted(summary: dict, out: Path, rows_seen: int) -> None:
    """Every input row is in exactly one list, and the summary's totals and reasons add up."""
    keep, drop = lists(out)
    assert keep.schema == SCHEMA and drop.schema == SCHEMA
    keys = keep.column("key").to_pylist() + drop.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == rows_seen
    assert summary["rows_seen"] == rows_seen == summary["kept"] + summary["dropped"]
    assert summary["kept"] == keep.num_rows and summary["dropped"] == drop.num_rows
    assert sum(summary["reasons"].values()) == rows_seen and set(summary["reasons"]) == set(REASONS)
    for table, kept in ((keep, True), (drop, False)):
        for row in table.to_pylist():
            assert row["reason"].startswith("kept:") is kept
            assert (row["representative"] == row["key"]) is kept or row["representative"] is None
    counted = dict.fromkeys(REASONS, 0)
    for reason in keep.column("reason").to_pylist() + drop.column("reason").to_pylist():
        counted[reason_kind(reason)] += 1
    assert counted == summary["reasons"]
    per_shard = json.loads((out / SUMMARY_NAME).read_text())["per_shard"]
    assert sum(s["rows_seen"] for s in per_shard.values()) == rows_seen
    assert all(s["rows_seen"] == s["kept"] + s["dropped"] for s in per_shard.values())


# ----------------------------------------------------------------------------------------------
# Policies and reasons.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "kept_a", "kept_b"),
    [("largest", "a", "h"), ("earliest", "a", "g"), ("score", "b", "g")],
)
def test_keep_list_is_exactly_the_representatives_of_each_policy(small, policy, kept_a, kept_b):
    cfg = config(small, policy=policy, score_column="aesthetic" if policy == "score" else None)
    summary = run_apply_dedup(cfg)
    assert_accounted(summary, small / "out", rows_seen=10)
    reasons = reasons_by_name(small / "out")
    group_a, group_b = {"a", "b", "c"}, {"g", "h"}
    expected = {kept_a: "kept:representative", kept_b: "kept:representative"}
    expected |= dict.fromkeys(group_a - {kept_a}, f"image_duplicate_of:{K[kept_a]}")
    expected |= dict.fromkeys(group_b - {kept_b}, f"image_duplicate_of:{K[kept_b]}")
    expected |= dict.fromkeys("dij", "kept:unique") | dict.fromkeys("ef", "dropped:rejected")
    assert reasons == expected
    keep, _ = lists(small / "out")
    assert keep.column("key").to_pylist() == sorted(K[n] for n in expected if expected[n].startswith("kept:"))
    rows = {r["key"]: r for r in keep.to_pylist()}
    assert rows[K[kept_a]]["group"] == 0 and rows[K[kept_a]]["group_size"] == 3  # input row of a
    assert rows[K[kept_b]]["group"] == 6 and rows[K[kept_b]]["group_size"] == 2
    assert rows[K["d"]]["group"] is None and rows[K["d"]]["group_size"] == 1
    assert rows[K["d"]]["url"] == f"http://127.0.0.1/{K['d']}.jpg" and rows[K["d"]]["shard"] == "00000"
    if policy == "largest":
        assert rows[K["h"]]["policy_value"] == 80 * 60
    assert summary["duplicate_groups"] == 2 and summary["rows_in_duplicate_groups"] == 5
    # The table kept b in group A and g in group B.
    assert summary["image_representatives_changed"] == (kept_a != "b") + (kept_b != "g")
    assert summary["reasons"]["dropped:rejected"] == 2 and summary["embedded_rows_from"] == "decoding"


def test_captions_join_groups_by_connected_components(small):
    summary = run_apply_dedup(config(small, captions=True))
    assert_accounted(summary, small / "out", rows_seen=10)
    reasons = reasons_by_name(small / "out")
    # {a, b, c} + i (caption of c): one group keeping a; i reaches a only through c: duplicate_of.
    assert reasons["a"] == "kept:representative" and reasons["i"] == f"duplicate_of:{K['a']}"
    assert reasons["b"] == reasons["c"] == f"image_duplicate_of:{K['a']}"
    # d and j share a caption only; equal sizes, so the smaller key is kept.
    assert reasons["d"] == "kept:representative" and reasons["j"] == f"caption_duplicate_of:{K['d']}"
    assert summary["groups_from"] == ["image", "caption"] and summary["duplicate_groups"] == 3
    assert summary["reasons"] == {
        "kept:representative": 3,
        "kept:unique": 0,
        "image_duplicate_of": 3,
        "caption_duplicate_of": 1,
        "duplicate_of": 1,
        "dropped:rejected": 2,
    }
    # Captions alone.
    summary = run_apply_dedup(config(small, images=False, captions=True, out=str(small / "c")))
    reasons = reasons_by_name(small / "c")
    assert reasons["i"] == "kept:representative" and reasons["c"] == f"caption_duplicate_of:{K['i']}"
    assert reasons["b"] == "kept:unique" and summary["groups_from"] == ["caption"]


# ----------------------------------------------------------------------------------------------
# Filtered shards.
# ----------------------------------------------------------------------------------------------


def test_filtered_shards_hold_exactly_the_kept_rows(small):
    summary = run_apply_dedup(config(small, filter_shards=True))
    keep, _ = lists(small / "out")
    kept = keep.column("key").to_pylist()
    source = {r["key"]: r for s in list_shards(small / "shards") for r in read_shard(s)}
    filtered = list_shards(small / "out" / SHARDS_DIR)
    assert [s.name for s in filtered] == ["00000", "00001"]
    seen = []
    for shard in filtered:
        rows = read_shard(shard)
        assert check_after_read(shard, shard.signature(), len(rows)) is None  # rows = its stats count
        for row in rows:
            assert row["read_error"] is None and row["warning"] is None
            original = source[row["key"]]
            assert (row["image"], row["caption"], row["url"]) == (
                original["image"],
                original["caption"],
                original["url"],
            )
        stats = json.loads(shard.stats.read_text())
        keys = [r["key"] for r in rows]
        assert stats["count"] == stats["successes"] == len(rows) == summary["per_shard"][shard.name]["kept"]
        assert stats["status_dict"] == {"success": len(rows)} and stats["failed_to_download"] == 0
        assert stats["apply_dedup"]["source_count"] == stats_count(
            list_shards(small / "shards")[int(shard.name)]
        )
        table = pq.read_table(shard.parquet)
        assert table.column("key").to_pylist() == keys  # every column kept, only the kept rows
        assert "aesthetic" in table.column_names and set(table.column("status").to_pylist()) == {"success"}
        seen += keys
    assert seen == kept


def test_shard_copies_of_an_earlier_run_are_removed(small):
    run_apply_dedup(config(small, filter_shards=True))
    assert (small / "out" / SHARDS_DIR / "00000.tar").is_file()
    summary = run_apply_dedup(config(small))  # no longer filtering: the old copies go
    assert not (small / "out" / SHARDS_DIR).exists() and summary["stale_shard_files_removed"] == 6


# ----------------------------------------------------------------------------------------------
# Resuming.
# ----------------------------------------------------------------------------------------------


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_rerun_does_nothing_and_another_policy_recomputes(small):
    cfg = config(small, filter_shards=True)
    first = run_apply_dedup(cfg)
    assert first["skipped"] is False
    before = mtimes(small / "out")
    again = run_apply_dedup(cfg)
    assert again["skipped"] is True and mtimes(small / "out") == before
    assert {k: again[k] for k in ("kept", "dropped", "reasons")} == {
        k: first[k] for k in ("kept", "dropped", "reasons")
    }
    # Options that change a result recompute; the keep-list follows the new policy.
    changed = run_apply_dedup(dataclasses.replace(cfg, policy="earliest"))
    assert changed["skipped"] is False and reasons_by_name(small / "out")["g"] == "kept:representative"
    assert mtimes(small / "out")[KEEP_LIST] != before[KEEP_LIST]
    # A changed input recomputes too.
    (small / "image_duplicates.parquet").touch()
    assert run_apply_dedup(dataclasses.replace(cfg, policy="earliest"))["skipped"] is False


# ----------------------------------------------------------------------------------------------
# Metadata, bundles, bad inputs.
# ----------------------------------------------------------------------------------------------


def write_embeddings(folder: Path, shards: Path, sizes: dict[str, tuple[int, int]], leave_out=()) -> None:
    """A LAION-layout embedding folder for the decodable rows (minus ``leave_out``), sizes as given."""
    for shard in list_shards(shards):
        rows = [r for r in read_shard(shard) if decode_image(r["image"], 10**8).ok]
        rows = [r for r in rows if r["key"] not in leave_out]
        (folder / "img_emb").mkdir(parents=True, exist_ok=True)
        np.save(folder / "img_emb" / f"img_emb_{shard.name}.npy", np.ones((len(rows), 4), np.float16))
        meta = {name: [] for name in METADATA_SCHEMA.names}
        for r in rows:
            w, h = sizes.get(r["key"], (10, 10))
            values = (r["key"], r["caption"], r["url"], None, w, h, shard.name, None)
            for name, value in zip(METADATA_SCHEMA.names, values, strict=True):
                meta[name].append(value)
        (folder / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(meta, schema=METADATA_SCHEMA), folder / "metadata" / f"metadata_{shard.name}.parquet"
        )


def test_embedding_metadata_names_the_embedded_rows_and_their_sizes(small):
    # The metadata says c is the largest of group A, and j was never embedded.
    write_embeddings(small / "emb", small / "shards", {K["c"]: (500, 500)}, leave_out={K["j"]})
    summary = run_apply_dedup(config(small, embeddings=str(small / "emb")))
    assert_accounted(summary, small / "out", rows_seen=10)
    reasons = reasons_by_name(small / "out")
    assert reasons["c"] == "kept:representative" and reasons["a"] == f"image_duplicate_of:{K['c']}"
    assert reasons["j"] == reasons["e"] == reasons["f"] == "dropped:rejected"
    assert summary["embedded_rows_from"] == "metadata"
    # A shard the embedding folder never saw is refused, not dropped as rejected.
    for path in (small / "emb").rglob("*_00001.*"):
        path.unlink()
    with pytest.raises(ValueError, match=r"not in the embedding folder"):
        run_apply_dedup(config(small, embeddings=str(small / "emb"), out=str(small / "o2")))


def make_bundle(root: Path) -> Path:
    """A bundle folder holding what apply_dedup reads, with a valid manifest (files, root hash)."""
    bundle = root / "bundle"
    write_embeddings(bundle / "embeddings", root / "shards", {})
    for name in ("image_duplicates.parquet", "caption_duplicates.parquet"):
        (bundle / name).write_bytes((root / name).read_bytes())
    files = {
        p.relative_to(bundle).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(bundle.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "config": {"bundle": {"shards": str(root / "shards")}},
        "files": files,
    }
    manifest["root_hash"] = root_hash(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return bundle


def _job():
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import apply_dedup
    finally:
        sys.path.remove(str(REPO / "jobs"))
    return apply_dedup


def test_bundle_stands_for_its_tables_metadata_and_shards(small):
    bundle = make_bundle(small)
    summary = _job().main(["--bundle", str(bundle), "--out", str(small / "out"), "--captions"])
    assert "per_shard" not in summary and summary["embedded_rows_from"] == "metadata"
    assert summary["groups_from"] == ["image", "caption"] and summary["rows_seen"] == 10
    assert reasons_by_name(small / "out")["j"] == f"caption_duplicate_of:{K['d']}"
    # A bundle whose files are not its manifest's is refused.
    with open(bundle / "image_duplicates.parquet", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ValueError, match="checksums"):
        _job().main(["--bundle", str(bundle), "--out", str(small / "out2")])


def test_bad_inputs_are_clear_errors(small):
    with pytest.raises(ValueError, match="score-column"):
        run_apply_dedup(config(small, policy="score"))
    with pytest.raises(ValueError, match="'missing' is in none"):
        run_apply_dedup(config(small, policy="score", score_column="missing"))
    with pytest.raises(ValueError, match="policy must be one of"):
        run_apply_dedup(config(small, policy="biggest"))
    with pytest.raises(ValueError, match="nothing to act on"):
        run_apply_dedup(config(small, images=False))
    with pytest.raises(ValueError, match="would write into the input shards"):
        run_apply_dedup(config(small, out=str(small / "shards")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_apply_dedup(config(small, image_duplicates=str(small / "nope.parquet")))
    (small / "shards" / "00001_stats.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        run_apply_dedup(config(small))
    write_shard(small / "shards", 1, [sample(K["a"], _photo(9, (20, 20)))])  # a key already in 00000
    with pytest.raises(ValueError, match="more than one shard"):
        run_apply_dedup(config(small))


# ----------------------------------------------------------------------------------------------
# Real duplicates: planted photographs, grouped by the image dedup passes on decoded images.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Planted shards and their image_duplicates.parquet from find_image_duplicates (exact + pHash)."""
    root = tmp_path_factory.mktemp("planted_apply")
    truth = planted_images(root / "shards", verbatim_copies=3)
    meta: dict[str, list] = {"key": [], "sha256": [], "width": [], "height": [], "phash": []}
    images = []
    for shard in list_shards(root / "shards"):
        for row in read_shard(shard):
            decoded = decode_image(row["image"], 10**8)
            assert decoded.ok
            meta["key"].append(row["key"])
            meta["sha256"].append(hashlib.sha256(row["image"]).hexdigest())
            meta["width"].append(decoded.width)
            meta["height"].append(decoded.height)
            images.append(decoded.image)
    meta["phash"] = phash_images(images).tolist()
    table = pa.table(meta, schema=pa.schema([(n, METADATA_SCHEMA.field(n).type) for n in meta]))
    result = find_image_duplicates(table, None, ImageDedupConfig(semantic="off"))
    pq.write_table(result.table, root / "image_duplicates.parquet")
    return root, truth


def test_planted_duplicates_keep_one_row_per_group(planted, tmp_path):
    root, truth = planted
    out = tmp_path / "out"
    summary = run_apply_dedup(
        ApplyDedupConfig(
            shards=str(root / "shards"),
            image_duplicates=str(root / "image_duplicates.parquet"),
            out=str(out),
            filter_shards=True,
        )
    )
    assert_accounted(summary, out, rows_seen=len(truth))
    groups = pq.read_table(root / "image_duplicates.parquet").to_pylist()
    representatives = {r["representative_key"] for r in groups}
    in_groups = {r["key"] for r in groups}
    keep, drop = lists(out)
    kept = set(keep.column("key").to_pylist())
    # Largest-image policy = the dedup table's own rule: exactly its representatives, plus the rest.
    assert kept == representatives | (set(truth) - in_groups)
    assert summary["image_representatives_changed"] == 0
    assert {r["key"]: r["reason"] for r in drop.to_pylist()} == {
        r["key"]: f"image_duplicate_of:{r['representative_key']}"
        for r in groups
        if not r["is_representative"]
    }
    # The planted truth: every planted group keeps a row, and only copies are dropped.
    assert {truth[k] for k in kept} == set(truth.values())
    assert all(truth[k].startswith("dup:") for k in drop.column("key").to_pylist())
    filtered = [r["key"] for s in list_shards(out / SHARDS_DIR) for r in read_shard(s)]
    assert sorted(filtered) == sorted(kept)


@pytest.mark.slow
def test_job_script_prints_its_summary_and_reruns_as_a_no_op(planted, tmp_path):
    root, truth = planted
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "apply_dedup.py"),
        "--shards",
        str(root / "shards"),
        "--image-duplicates",
        str(root / "image_duplicates.parquet"),
        "--out",
        str(tmp_path / "out"),
        "--filter-shards",
        "--policy",
        "earliest",
    ]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads(proc.stdout.strip().splitlines()[-1]) for proc in runs)
    assert first["job"] == "apply_dedup" and first["skipped"] is False and second["skipped"] is True
    assert first["rows_seen"] == len(truth) == first["kept"] + first["dropped"]
    assert sum(first["reasons"].values()) == len(truth) and "per_shard" not in first
    assert first["filtered_shards"] == str(tmp_path / "out" / SHARDS_DIR)
    assert not (tmp_path / "out" / ".lock").exists()
