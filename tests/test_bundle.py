"""The artifact bundle: build from shards on a real Ray, manifest checksums, open_bundle lookups, resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_image_dedup import VERBATIM_CAPTION, planted_images

from pipeline.bundle.build import build_bundle, check_invariants
from pipeline.bundle.layout import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST,
    TABLE_NAME,
    WORK,
    BundleChecksumError,
    BundleContentError,
    BundleError,
    BundleFormatError,
)
from pipeline.bundle.reader import open_bundle
from pipeline.bundle.tables import SCHEMA as TABLE_SCHEMA
from pipeline.core.config import BundleConfig, CellsConfig, EmbedConfig, PipelineConfig
from pipeline.core.neighbours import DuplicateCaption, NeighbourIndex
from pipeline.core.storage import sha256_file
from pipeline.dedup.image import SCHEMA as DUPLICATES_SCHEMA
from pipeline.index.faiss_index import exact_search, tie_aware_recall

REPO = Path(__file__).resolve().parent.parent
VERBATIM_COPIES = 6
KNN_K = 8
MIN_COUNT = 4
CELL_ROWS = 20  # several k-means cells even in this small bundle


def bundle_config(root: Path, **bundle: object) -> PipelineConfig:
    options = {
        "shards": str(root / "shards"),
        "out": str(root / "bundle"),
        "duplicate_caption_k": KNN_K,
        "duplicate_caption_min_count": MIN_COUNT,
        **bundle,
    }
    return dataclasses.replace(
        PipelineConfig(),
        bundle=BundleConfig(**options),
        embed=EmbedConfig(log_every_s=600),
        cells=CellsConfig(rows_per_cell=CELL_ROWS),
    )


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    truth = planted_images(root / "shards", verbatim_copies=VERBATIM_COPIES)
    cfg = bundle_config(root)
    summary = build_bundle(cfg)
    return root, cfg, summary, truth


def bundle_files(path: Path) -> set[str]:
    return {
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.relative_to(path).parts[0] != WORK and p.name != MANIFEST
    }


def copy_bundle(src: Path, dst: Path) -> Path:
    """A real copy (the bundle's files are hard links into _work/: tampering must not reach them)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(WORK))
    return dst


@pytest.mark.slow
def test_build_runs_every_step_and_the_manifest_matches_the_files(built):
    root, _, summary, truth = built
    assert summary["steps_run"] == [
        "ingest",
        "embed",
        "cells",
        "image_dedup",
        "caption_dedup",
        "index",
        "tables",
        "report",
    ]
    path = root / "bundle"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION
    assert set(manifest["files"]) == bundle_files(path)
    for rel, entry in manifest["files"].items():
        assert sha256_file(path / rel) == entry["sha256"] and (path / rel).stat().st_size == entry["bytes"]
    artifacts = manifest["artifacts"]
    for name in (
        "samples",
        "image_duplicates",
        "caption_duplicates",
        "caption_dedup_table",
        "index",
        "index_rows",
    ):
        assert manifest["files"][artifacts[name]["path"]]["sha256"] == artifacts[name]["sha256"]
    assert artifacts["image_duplicates"]["schema"] == [
        {"name": f.name, "type": str(f.type)} for f in DUPLICATES_SCHEMA
    ]
    assert artifacts["caption_dedup_table"]["schema"] == [
        {"name": f.name, "type": str(f.type)} for f in TABLE_SCHEMA
    ]
    counts = manifest["counts"]
    assert counts["rows"] == counts["samples_ok"] == len(truth) and counts["samples_rejected"] == 0
    assert counts["image_duplicate_groups"] == 9  # 8 photographs with copies + the verbatim picture
    assert manifest["model"]["name"] == "tiny-random-seed0" and manifest["model"]["semantic"] is False
    thresholds = manifest["thresholds"]
    assert (
        thresholds["duplicate_caption_min_count"] == MIN_COUNT and thresholds["duplicate_caption_k"] == KNN_K
    )
    assert thresholds["image_phash_max_distance"] == 12 and thresholds["image_semantic_ran"] is False
    assert manifest["index"]["kind"] == "flat" and manifest["index"]["recall_at_k"] == 1.0
    assert len(manifest["code_version"]["git_commit"]) == 40
    assert sorted(artifacts["embeddings"]["partitions"]) == ["00000", "00001"]


@pytest.mark.slow
def test_open_bundle_searches_with_brute_force_recall(built):
    root, _, _, _ = built
    bundle = open_bundle(root / "bundle")
    assert isinstance(bundle, NeighbourIndex)
    n = len(bundle)
    vectors = bundle.embeddings(np.arange(n))
    assert vectors.shape == (n, bundle.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    rng = np.random.default_rng(0)
    queries = (
        vectors[rng.choice(n, 30, replace=False)]
        + rng.normal(size=(30, bundle.dim)).astype(np.float32) * 0.05
    )
    scores, ids = bundle.search_embeddings(queries, 10)
    assert scores.shape == ids.shape == (30, 10) and ids.dtype == np.int64
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    queries_n = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    true_scores, _ = exact_search(vectors, queries_n, 10)
    assert tie_aware_recall(vectors, queries_n, ids, true_scores, 10) >= 0.95
    # More neighbours than rows: padded with -1, as FAISS does.
    _, all_ids = bundle.search_embeddings(queries[:1], n + 5)
    assert (all_ids[0, n:] == -1).all() and sorted(all_ids[0, :n]) == list(range(n))
    with pytest.raises(ValueError, match="shape"):
        bundle.search_embeddings(np.zeros((2, bundle.dim + 1)), 3)


@pytest.mark.slow
def test_row_lookups_and_duplicates_subindex(built):
    root, _, _, truth = built
    bundle = open_bundle(root / "bundle", verify=False)
    rows = pq.read_table(root / "bundle" / "index" / "index_rows.parquet").to_pylist()
    for r in rows[:: max(1, len(rows) // 10)]:
        row = bundle.row(r["row_id"])
        assert row["key"] == r["key"] and row["caption"] == r["caption"] and row["row_id"] == r["row_id"]
        assert bundle.row_of_key(r["key"]) == r["row_id"]
        assert truth[row["key"]]  # every bundle row is a planted sample
    with pytest.raises(IndexError):
        bundle.row(len(bundle))
    dups = pq.read_table(root / "bundle" / "image_duplicates.parquet")
    member = dups.column("row_id").to_pylist()[0]
    _, ids = bundle.search_duplicates(bundle.embeddings(np.array([member])), 1)
    assert ids[0, 0] in set(dups.column("row_id").to_pylist())


@pytest.mark.slow
def test_duplicate_caption_lookup_for_verbatim_rows_and_below_the_minimum(built):
    root, _, _, _truth = built
    bundle = open_bundle(root / "bundle", verify=False)
    table = bundle.table.to_pylist()
    verbatim = [r for r in table if r["caption"] == VERBATIM_CAPTION]
    assert len(verbatim) == VERBATIM_COPIES
    for r in verbatim:
        assert r["image_group_size"] == VERBATIM_COPIES and r["group_caption"] == VERBATIM_CAPTION
        assert r["group_caption_count"] == VERBATIM_COPIES and r["caption_group_size"] == VERBATIM_COPIES
        y_n = bundle.duplicate_caption(r["row_id"])
        assert y_n == DuplicateCaption(caption=VERBATIM_CAPTION, count=VERBATIM_COPIES)
    below = [r for r in table if r["cell_caption_count"] < MIN_COUNT]
    assert below, "some row has no caption repeated MIN_COUNT times in its cell"
    for r in below[:5]:
        y_n = bundle.duplicate_caption(r["row_id"])
        assert y_n.caption is None and y_n.count == r["cell_caption_count"]
    assert max(r["cell_rows"] for r in table) < len(table)  # cells, not the whole bundle


@pytest.mark.slow
def test_duplicate_caption_near_applies_the_authors_rule_like_brute_force(built):
    """y_N by embedding: the dominant normalised caption among the k nearest training images, counted
    only from min_count; equal to a brute-force count over exact neighbours, for every row's embedding
    and for perturbed ones."""
    from pipeline.dedup.text_normalize import normalize_captions

    root, _, _, _ = built
    bundle = open_bundle(root / "bundle", verify=False)
    n = len(bundle)
    vectors = bundle.embeddings(np.arange(n))
    captions = bundle.table.column("caption")
    normalized = normalize_captions(captions).to_pylist()
    rng = np.random.default_rng(1)
    queries = np.concatenate([vectors, vectors + rng.normal(size=vectors.shape).astype(np.float32) * 0.05])
    hits = 0
    for query in queries:
        scores = vectors @ (query / np.linalg.norm(query))
        nearest = np.argsort(-scores, kind="stable")[:KNN_K]
        counted = [normalized[i] for i in nearest if normalized[i]]
        best = max(counted, key=lambda c: (counted.count(c), -counted.index(c)), default=None)
        expected = best if best is not None and counted.count(best) >= MIN_COUNT else None
        found = bundle.duplicate_caption_near(query)
        got = None if found.caption is None else normalize_captions(pa.array([found.caption]))[0].as_py()
        assert got == expected
        hits += expected is not None
    assert hits >= VERBATIM_COPIES  # the verbatim rows at least have a y_N
    y_n = bundle.duplicate_caption_near(vectors[0], k=n, min_count=n + 1)
    assert y_n.caption is None  # nothing occurs more often than there are rows


@pytest.mark.slow
def test_nearest_captions_is_the_authors_rule_on_the_images_clip_embedding(built):
    """The y_N lookup AMG and the audit use (pipeline.audit.matching.NearestCaptions): the bundle's own
    CLIP model embeds x̂0, then duplicate_caption_near counts; a copy of the verbatim picture gets its
    caption, and a detector built with the lookup calls it only when G_dup asks."""
    import io

    import torch
    from PIL import Image

    from pipeline.amg import AMGConfig, MemorizationDetector, OpenClipBackend
    from pipeline.audit.matching import NearestCaptions, TrainingImages

    root, _, _, _ = built
    bundle = open_bundle(root / "bundle", verify=False)
    clip = OpenClipBackend.from_loaded_clip(bundle.clip_model())
    lookup = NearestCaptions(bundle, clip)
    verbatim = next(i for i in range(len(bundle)) if bundle.row(i)["caption"] == VERBATIM_CAPTION)
    with Image.open(io.BytesIO(TrainingImages(bundle)(verbatim))) as im:
        pixels = torch.from_numpy(np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32))
    copy = pixels.permute(2, 0, 1)[None] / 127.5 - 1
    noise = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = torch.cat([copy, noise])
    found = lookup(images)
    with torch.no_grad():
        queries = clip.embed(images).numpy()
    assert found == [bundle.duplicate_caption_near(q) for q in queries]
    assert found[0].caption == VERBATIM_CAPTION and found[0].count >= MIN_COUNT

    calls = []

    def counted(batch):
        calls.append(len(batch))
        return lookup(batch)

    detector = MemorizationDetector(clip, bundle, AMGConfig.preset("paper", "clip"), captions=counted)
    detection = detector.detect(images)
    assert calls == []  # nothing asked for y_N yet
    assert detection.select(torch.tensor([0])).captions[0].caption == VERBATIM_CAPTION
    assert calls == [3]  # looked up once, for the batch, on first use


@pytest.mark.slow
def test_duplicated_rows_search_only_the_byte_identical_copies(built):
    """DuplicatedRows (pipeline.audit.matching): the rows whose image has exact copies, searched with the
    bundle's own row ids and scores; everything else is the bundle's."""
    import hashlib

    from pipeline.audit.matching import DuplicatedRows, TrainingImages

    root, _, _, _ = built
    bundle = open_bundle(root / "bundle", verify=False)
    rows = DuplicatedRows(bundle, bundle)
    images = TrainingImages(bundle)
    digests = [hashlib.sha256(images(i)).hexdigest() for i in range(len(bundle))]
    copied = [i for i, d in enumerate(digests) if digests.count(d) >= 2]  # from the shards' bytes
    assert rows.rows.tolist() == copied
    verbatim = [i for i in range(len(bundle)) if bundle.row(i)["caption"] == VERBATIM_CAPTION]
    assert set(verbatim) <= set(copied) and len(verbatim) == VERBATIM_COPIES
    queries = bundle.embeddings(np.arange(len(bundle)))
    scores, ids = rows.search_embeddings(queries, 2)
    assert set(np.unique(ids)) <= set(copied)
    expected = (queries @ bundle.embeddings(np.array(copied)).T).max(axis=1)
    assert np.allclose(scores[:, 0], expected, atol=1e-5)
    assert rows.duplicate_caption(verbatim[0]) == bundle.duplicate_caption(verbatim[0])
    assert rows.row(verbatim[0]) == bundle.row(verbatim[0]) and rows.dim == bundle.dim
    with pytest.raises(ValueError, match="no image duplicated"):
        DuplicatedRows(bundle, bundle, min_copies=len(copied) + 1)


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_tampered_or_missing_file_fails_the_checksum(built, tmp_path):
    root, _, _, _ = built
    copy = copy_bundle(root / "bundle", tmp_path / "copy")
    assert open_bundle(copy).root_hash == json.loads((copy / MANIFEST).read_text())["root_hash"]
    target = copy / "caption_dedup_table.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError, match=r"caption_dedup_table\.parquet"):
        open_bundle(copy)
    target.write_bytes(bytes(data) + b"injected")  # a changed size is caught without reading the data
    with pytest.raises(BundleChecksumError, match=r"caption_dedup_table\.parquet \(size"):
        open_bundle(copy, verify=False)
    (copy / "index" / "dup_image.index").unlink()
    with pytest.raises(BundleContentError, match=r"missing \['index/dup_image\.index'\]"):
        open_bundle(copy, verify=False)


@pytest.mark.slow
def test_the_files_must_be_exactly_the_manifest_s_whatever_verify_says(built, tmp_path):
    root, _, _, _ = built
    for name, change, error, message in [
        ("entry dropped", lambda m: m["files"].pop(TABLE_NAME), BundleContentError, "unlisted"),
        ("no files", lambda m: m.update(files={}), BundleContentError, "lists no files"),
        (
            "path outside",
            lambda m: m["files"].update({"../../etc/hostname": {"bytes": 1, "sha256": "0"}}),
            BundleContentError,
            "outside the bundle",
        ),
        (
            "y_N minimum count edited",
            lambda m: m["thresholds"].update(duplicate_caption_min_count=1),
            BundleChecksumError,
            "root hash",
        ),
        (
            "sha edited",
            lambda m: m["files"][TABLE_NAME].update(sha256="0" * 64),
            BundleChecksumError,
            "root hash",
        ),
    ]:
        copy = copy_bundle(root / "bundle", tmp_path / name.replace(" ", "_"))
        edit_manifest(copy, change)
        for verify in (True, False):
            with pytest.raises(error, match=message):
                open_bundle(copy, verify=verify)
    copy = copy_bundle(root / "bundle", tmp_path / "extra")
    (copy / "index" / "planted.index").write_bytes(b"not from this build")
    with pytest.raises(BundleContentError, match=r"unlisted \['index/planted\.index'\]"):
        open_bundle(copy, verify=False)


@pytest.mark.slow
def test_consumers_pin_the_root_hash(built, tmp_path):
    root, _, _, _ = built
    bundle = open_bundle(root / "bundle", verify=False)
    assert open_bundle(root / "bundle", verify=False, expect=bundle.root_hash).root_hash == bundle.root_hash
    with pytest.raises(BundleChecksumError, match=f"expected {'0' * 64}"):
        open_bundle(root / "bundle", verify=False, expect="0" * 64)


@pytest.mark.slow
def test_unknown_format_version_and_non_bundles_are_refused_clearly(built, tmp_path):
    root, _, _, _ = built
    copy = copy_bundle(root / "bundle", tmp_path / "copy")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        BundleFormatError, match=rf"format version 99.*reads format version {BUNDLE_FORMAT_VERSION}"
    ):
        open_bundle(copy, verify=False)
    with pytest.raises(BundleError, match="not a bundle"):
        open_bundle(tmp_path / "nothing-here")
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(copy)


@pytest.mark.slow
def test_a_rebuild_removes_files_it_did_not_produce(built):
    root, cfg, _, _ = built
    path = root / "bundle"
    stray = path / "index" / "sscd.index"  # e.g. left by an earlier build with SSCD descriptors
    stray.write_bytes(b"from an earlier build")
    build_bundle(cfg)
    assert not stray.exists()
    open_bundle(path, verify=False)  # the files are exactly the manifest's again


@pytest.mark.slow
def test_row_counts_must_agree_across_the_bundle(built, tmp_path):
    root, _, _, _ = built
    invariants = json.loads((root / "bundle" / MANIFEST).read_text())["invariants"]
    rows = invariants["rows"]
    assert rows == invariants["samples_ok"] == invariants["index_ntotal"] == invariants["table_rows"] > 0
    copy = copy_bundle(root / "bundle", tmp_path / "copy")
    table = pq.read_table(copy / TABLE_NAME)
    pq.write_table(table.slice(0, rows - 1), copy / TABLE_NAME)  # one row short
    with pytest.raises(BundleError, match=f"table_rows = {rows - 1}"):
        check_invariants(copy, {"ok": rows})
    with pytest.raises(BundleError, match=f"samples_ok = {rows + 1}"):
        check_invariants(root / "bundle", {"ok": rows + 1})


def bundle_rows(path: Path) -> dict[str, set[str]]:
    """The keys each row-bearing part of a bundle holds."""
    bundle = open_bundle(path)
    samples = pq.read_table(path / "samples.parquet", columns=["key", "status"]).to_pylist()
    return {
        "samples_ok": {row["key"] for row in samples if row["status"] == "ok"},
        "table": set(bundle.table.column("key").to_pylist()),
        "index_rows": set(pq.read_table(path / "index" / "index_rows.parquet").column("key").to_pylist()),
        "captions": set(pq.read_table(path / "caption_duplicates.parquet").column("key").to_pylist()),
        "index_ntotal": {str(i) for i in range(len(bundle))},
    }


@pytest.mark.slow
def test_a_bundle_rebuilt_after_a_shard_is_removed_or_renamed_holds_exactly_the_input(built, tmp_path):
    root, _, _, _ = built
    shutil.copytree(root / "shards", tmp_path / "shards")
    cfg = bundle_config(tmp_path)
    build_bundle(cfg)
    shard_keys = {
        tar.stem: set(pq.read_table(tar.with_suffix(".parquet")).column("key").to_pylist())
        for tar in sorted((tmp_path / "shards").glob("*.tar"))
    }
    assert len(shard_keys) >= 2
    first, *rest = sorted(shard_keys)
    for suffix in (".tar", ".parquet", "_stats.json"):  # a takedown: the first shard is gone
        (tmp_path / "shards" / f"{first}{suffix}").unlink()
    build_bundle(cfg)
    rows = bundle_rows(tmp_path / "bundle")
    expected = set().union(*(shard_keys[name] for name in rest))
    assert rows["samples_ok"] <= expected and rows["table"] == rows["index_rows"] == rows["captions"]
    assert rows["table"] == rows["samples_ok"] and not (rows["table"] & shard_keys[first])
    assert len(rows["index_ntotal"]) == len(rows["table"])
    assert not list((tmp_path / "bundle" / "embeddings" / "img_emb").glob(f"img_emb_{first}.npy"))
    # Re-sharded input: the same rows under a new shard name are counted once, not twice.
    last = rest[-1]
    for suffix in (".tar", ".parquet", "_stats.json"):
        (tmp_path / "shards" / f"{last}{suffix}").rename(tmp_path / "shards" / f"9{last}{suffix}")
    build_bundle(cfg)
    renamed = bundle_rows(tmp_path / "bundle")
    assert renamed["table"] == rows["table"] and len(renamed["index_ntotal"]) == len(rows["table"])


@pytest.mark.slow
def test_rerun_is_a_no_op(built):
    root, cfg, _, _ = built
    path = root / "bundle"
    before = {rel: (path / rel).stat().st_mtime_ns for rel in bundle_files(path) | {MANIFEST}}
    summary = build_bundle(cfg)
    assert summary["steps_run"] == [] and summary["manifest_written"] is False
    assert len(summary["steps_skipped"]) == 8
    assert {rel: (path / rel).stat().st_mtime_ns for rel in before} == before


@pytest.mark.slow
def test_job_cli_resumes_only_what_changed(built, tmp_path):
    root, _, _, _ = built
    work = tmp_path / "resume"
    shutil.copytree(root / "bundle", work / "bundle")  # with _work/: a resumable copy
    (work / "shards").symlink_to(root / "shards")
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import build_artifacts
    finally:
        sys.path.remove(str(REPO / "jobs"))

    def args(*extra: str, min_count: int = MIN_COUNT) -> list[str]:
        return [
            "--shards",
            str(work / "shards"),
            "--out",
            str(work / "bundle"),
            "--duplicate-caption-k",
            str(KNN_K),
            "--duplicate-caption-min-count",
            str(min_count),
            "--cells-rows-per-cell",
            str(CELL_ROWS),
            *extra,
        ]

    assert build_artifacts.main(args())["steps_run"] == []
    # A lost output: only its step runs again, and the manifest is rewritten.
    (work / "bundle" / "caption_dedup_table.parquet").unlink()
    summary = build_artifacts.main(args())
    assert summary["steps_run"] == ["tables"] and summary["manifest_written"] is True
    open_bundle(work / "bundle")
    # A changed option: the steps it affects run, the others are kept.
    summary = build_artifacts.main(args("--index-kind", "hnsw"))
    assert summary["steps_run"] == ["index"] and summary["index"] == "HNSW32,Flat"
    bundle = open_bundle(work / "bundle")
    assert bundle.manifest["index"]["kind"] == "hnsw" and bundle.manifest["index"]["recall_at_k"] >= 0.95
    # Only the y_N threshold changed: nothing recomputes, the manifest records the new one.
    summary = build_artifacts.main(args("--index-kind", "hnsw", min_count=2))
    assert summary["steps_run"] == [] and summary["manifest_written"] is True
    assert open_bundle(work / "bundle").manifest["thresholds"]["duplicate_caption_min_count"] == 2


# ----------------------------------------------------------------------------------------------
# The G_dup table's counting, alone.
# ----------------------------------------------------------------------------------------------


def test_dominant_value_per_key_breaks_ties_by_the_earliest_row():
    from pipeline.bundle.tables import dominant

    keys = np.array([7, 7, 7, 7, 3, 3])
    values = np.array([5, 2, 2, 5, 9, 8])
    rows = np.array([10, 11, 12, 13, 1, 0])
    found = dominant(keys, values, rows)
    assert found["key"].tolist() == [3, 7] and found["value"].tolist() == [8, 5]  # 5 first seen at row 10
    assert found["count"].tolist() == [1, 2] and found["total"].tolist() == [2, 4]


def test_g_dup_table_built_as_shuffles_equals_counting_by_hand(tmp_path):
    """The partitioned table (map by caption hash, cell and image group; reduce; rows back to their
    partitions) against a direct count over the same rows, across partition boundaries."""
    from collections import Counter

    from pipeline.bundle.tables import TableInputs, build_dedup_table
    from pipeline.core.storage import atomic_write_array, atomic_write_table
    from pipeline.dedup.text_normalize import normalize_captions
    from pipeline.index.cells import assign_path
    from pipeline.io.embeddings import IMG_EMB, METADATA_SCHEMA, embedding_path, metadata_path

    rng = np.random.default_rng(0)
    n = 900
    pool = ["A memorised caption!", "a memorised caption", "a stock photo", "", None] + [
        f"photo {i}" for i in range(40)
    ]
    captions = [pool[i] for i in rng.integers(0, len(pool), n)]
    cells = rng.integers(0, 7, n)
    group_rows = np.arange(0, 300, 3)  # groups of three consecutive multiples of 3
    group_of = {int(r): int(r - r % 9) for r in group_rows}
    bounds = [0, 250, 600, 900]
    for i in range(3):
        name, lo, hi = f"{i:05d}", bounds[i], bounds[i + 1]
        embedding_path(tmp_path / "emb", IMG_EMB, name).parent.mkdir(parents=True, exist_ok=True)
        np.save(embedding_path(tmp_path / "emb", IMG_EMB, name), np.ones((hi - lo, 4), np.float16))
        meta = pa.table({"key": [f"k{j}" for j in range(lo, hi)], "caption": captions[lo:hi]})
        atomic_write_table(
            metadata_path(tmp_path / "emb", name),
            meta.cast(pa.schema([METADATA_SCHEMA.field("key"), METADATA_SCHEMA.field("caption")])),
        )
        atomic_write_array(
            assign_path(tmp_path / "cells", name),
            np.stack([cells[lo:hi], -np.ones(hi - lo, int)], 1).astype(np.int32),
        )
    sizes = Counter(group_of.values())
    atomic_write_table(
        tmp_path / "img.parquet",
        pa.table(
            {
                "row_id": list(group_of),
                "group_id": list(group_of.values()),
                "group_size": [sizes[g] for g in group_of.values()],
            }
        ),
    )
    atomic_write_table(
        tmp_path / "cap.parquet", pa.table({"group_id": np.arange(n), "group_size": np.ones(n, np.int64)})
    )
    inputs = TableInputs(
        str(tmp_path / "emb"),
        str(tmp_path / "cells"),
        str(tmp_path / "img.parquet"),
        str(tmp_path / "cap.parquet"),
    )
    stats = build_dedup_table(inputs, tmp_path / "table.parquet", tmp_path / "work", inline=True)
    table = pq.read_table(tmp_path / "table.parquet").to_pylist()
    assert stats["rows"] == n == len(table) and [r["row_id"] for r in table] == list(range(n))
    normal = [x or "" for x in normalize_captions(pa.array(captions, pa.string())).to_pylist()]

    def dominant_caption(members: list[int]) -> tuple[str | None, int]:
        said = [r for r in members if normal[r]]
        if not said:
            return None, 0
        counts = Counter(normal[r] for r in said)
        best = max(counts, key=lambda c: (counts[c], -min(r for r in said if normal[r] == c)))
        spellings = Counter(captions[r] for r in said if normal[r] == best)
        spelling = max(spellings, key=lambda c: (spellings[c], -min(r for r in said if captions[r] == c)))
        return spelling, counts[best]

    for r, row in enumerate(table):
        same = [j for j in range(n) if normal[j] and normal[j] == normal[r]]
        assert row["caption_count"] == len(same)
        assert row["caption_id"] == (-1 if not same else row["caption_id"])
        if same:
            assert captions[row["caption_id"]] == dominant_caption(same)[0]
        cell = [j for j in range(n) if cells[j] == cells[r]]
        assert (row["cell_caption"], row["cell_caption_count"]) == dominant_caption(cell) and row[
            "cell_rows"
        ] == len(cell)
        group = [j for j in group_of if group_of[j] == group_of.get(r)] if r in group_of else [r]
        assert (row["group_caption"], row["group_caption_count"]) == dominant_caption(group), r
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_a_bundle_built_from_an_embedding_folder_answers_as_the_one_built_from_shards(built, tmp_path):
    """``--embeddings``: the shards-built bundle's embedding folder, given as LAION's release is (no
    done markers), builds an equal bundle without ingest or embed; without sha256 and pHash columns
    those two passes are off, and the build says so."""
    root, cfg, _, _ = built
    source = tmp_path / "laion"
    shutil.copytree(root / "bundle" / "embeddings", source, ignore=shutil.ignore_patterns("done", "*.json"))
    other = dataclasses.replace(
        cfg, bundle=dataclasses.replace(cfg.bundle, shards="", embeddings=str(source))
    )
    other = dataclasses.replace(other, bundle=dataclasses.replace(other.bundle, out=str(tmp_path / "b")))
    summary = build_bundle(other)
    assert "ingest" not in summary["steps_run"] + summary["steps_skipped"] and "embed" in summary["steps_run"]
    a, b = open_bundle(root / "bundle"), open_bundle(tmp_path / "b")
    assert len(a) == len(b) and "samples" not in b.manifest["artifacts"]
    assert b.manifest["counts"]["samples_ok"] is None and b.manifest["invariants"]["rows"] == len(a)
    queries = a.embeddings(np.arange(0, len(a), 3))
    assert np.array_equal(a.search_embeddings(queries, 5)[1], b.search_embeddings(queries, 5)[1])
    assert [a.duplicate_caption(r) for r in range(len(a))] == [b.duplicate_caption(r) for r in range(len(b))]
    img = "embeddings/img_emb/img_emb_00000.npy"
    assert (tmp_path / "b" / img).stat().st_ino == (source / "img_emb" / "img_emb_00000.npy").stat().st_ino
    assert build_bundle(other)["steps_run"] == []  # nothing changed: nothing to do

    # LAION's release has no sha256 or pHash of the images: those passes are off, with a reason.
    for meta in (source / "metadata").glob("*.parquet"):
        pq.write_table(pq.read_table(meta).drop_columns(["sha256", "phash"]), meta)
    summary = build_bundle(other)
    assert summary["steps_run"][:3] == ["embed", "cells", "image_dedup"]
    passes = json.loads((tmp_path / "b" / WORK / "image_dedup" / "image_dedup_summary.json").read_text())[
        "passes"
    ]
    assert passes["exact"] == {"skipped": "no sha256 column in the metadata"}
    assert passes["phash"] == {"skipped": "no phash column in the metadata"}
    with pytest.raises(ValueError, match=r"give --shards .* or --embeddings"):
        build_bundle(dataclasses.replace(cfg, bundle=dataclasses.replace(cfg.bundle, shards="")))
