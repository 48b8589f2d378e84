"""The dedup report: every element on small synthetic tables, the borderline search, the writer end to
end on a tiny embedding folder with shards, a bounded page at a million rows, and the writer's memory on
a 300k-row folder."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures.shard_factory import encode, random_photo, sample, write_shard
from pipeline.core.config import CaptionDedupConfig, ImageDedupConfig
from pipeline.core.html import thumbnail
from pipeline.dedup.image import SCHEMA
from pipeline.dedup.report import (
    CaptionSection,
    ImageSection,
    Pair,
    ReportLimits,
    largest_groups,
    phash_neighbours,
    pick_borderline,
    render_dedup_report,
    semantic_neighbours,
    size_buckets,
    write_dedup_report,
)
from pipeline.io.embeddings import METADATA_SCHEMA, EmbeddingRows

T_PHASH, T_SEMANTIC = 12, 0.95


def image_table(groups: list[list[tuple[str, int | None, float | None]]]) -> pa.Table:
    """``image_duplicates.parquet`` rows: per group, (method, Hamming distance, cosine) per member,
    the representative first; row ids are dealt in order, keys are ``k<row>``."""
    rows, row = [], 0
    for members in groups:
        rep = row
        for i, (method, d, cos) in enumerate(members):
            rows.append(
                {
                    "key": f"k{row}",
                    "row_id": row,
                    "group_id": rep,
                    "group_size": len(members),
                    "representative_key": f"k{rep}",
                    "is_representative": i == 0,
                    "similarity": cos,
                    "hamming_distance": d,
                    "method": method,
                    "linked_by": {"exact": "exact", "phash": "phash", "semantic": "semantic"}.get(
                        method, "phash|semantic"
                    ),
                }
            )
            row += 1
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def caption_table(groups: list[int], raw: list[list[str]]) -> tuple[pa.Table, pa.Array]:
    """One row per caption: groups of the given sizes (group id = first row), raw captions per group."""
    keys, gids, sizes, normalized, captions = [], [], [], [], []
    for size, variants in zip(groups, raw, strict=True):
        first = len(keys)
        for i in range(size):
            keys.append(f"c{len(keys)}")
            gids.append(first)
            sizes.append(size)
            normalized.append(variants[0].lower())
            captions.append(variants[i % len(variants)])
    table = pa.table(
        {
            "key": keys,
            "group_id": pa.array(gids, pa.int64()),
            "group_size": pa.array(sizes, pa.int64()),
            "normalized_caption": normalized,
        }
    )
    return table, pa.array(captions)


def png(colour: tuple[int, int, int]) -> bytes:
    return thumbnail(encode(Image.new("RGB", (120, 90), colour), "PNG"), 80, "JPEG")


def example() -> tuple[ImageSection, CaptionSection]:
    table = image_table(
        [
            [("representative", 0, 1.0), ("exact", 0, 1.0), ("phash", 11, 0.97), ("transitive", 19, 0.8)],
            [("representative", 0, 1.0), ("semantic", 20, 0.955), ("phash", 3, 0.99)],
            [("representative", 0, 1.0), ("phash", 12, 0.9)],
        ]
    )
    borderline = [
        Pair("phash", 100, 101, "a<b>", "b", 12, True, "sample"),
        Pair("phash", 102, 103, "c", "d", 10, True, "groups"),
        Pair("phash", 104, 105, "e", "f", 13, False, "sample"),
        Pair("phash", 106, 107, "g", "h", 14, False, "sample", same_group=True),
        Pair("semantic", 108, 109, "i", "j", 0.955, True, "sample"),
        Pair("semantic", 110, 111, "k", "l", 0.94, False, "sample"),
    ]
    thumbs = {r: png((200, 40, 40)) for r in range(9)} | {r: png((40, 40, 200)) for r in range(100, 112)}
    images = ImageSection(
        table=table,
        rows=1000,
        phash_max_distance=T_PHASH,
        semantic_threshold=T_SEMANTIC,
        semantic_ran=True,
        passes={"exact": {"pairs": 1}, "phash": {"pairs": 3}, "semantic": {"pairs": 1}},
        borderline=borderline,
        nearest={"phash": np.array([3, 12, 13, 20, 30]), "semantic": np.array([0.5, 0.94, 0.96])},
        sampling={"phash": {"queries": 1000, "reference": 1000, "seconds": 0.1}},
        thumbnails=thumbs,
    )
    captions, raw = caption_table(
        [3, 2, 1, 1], [["A red car", "a red car!", "A RED CAR"], ["Tomb raider"], ["x"], ["y"]]
    )
    return images, CaptionSection(captions, 0.7, raw, {"verified_pairs": 2})


def test_every_element_is_on_the_page():
    images, captions = example()
    page = render_dedup_report(images, captions, provenance={"created": "today", "shards": "s/"})
    # self-contained
    assert "<script src" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    for section in ("counts", "histograms", "image-groups", "borderline", "caption-groups", "removable"):
        assert f'id="{section}"' in page, section
    # counts per pass, exact pHash semantic caption
    for name in ("exact", "phash", "semantic", "caption"):
        assert f'id="pass-{name}"' in page
    assert "Hamming ≤ 12" in page and "cosine ≥ 0.95" in page and "Jaccard ≥ 0.7" in page
    # histograms: group sizes, pHash distances and cosines, thresholds drawn
    for chart in ("hist-group-sizes", "hist-phash", "hist-semantic"):
        assert f'id="{chart}"' in page
    assert page.count('class="threshold"') == 2
    assert "≤ 12 is a duplicate" in page and "≥ 0.95 is a duplicate" in page
    # group strips: 3 groups, each member labelled with method and distance
    assert page.count('class="group"') == 3
    assert "phash · d=11 · cos 0.970" in page and "transitive · d=19" in page
    assert page.count('<figure class="representative">') == 3
    # borderline pairs: both sides of both thresholds, with both thumbnails; keys escaped
    for method in ("phash", "semantic"):
        for side in ("true", "false"):
            assert f'data-method="{method}" data-duplicate="{side}"' in page
    assert "a&lt;b&gt;" in page and "a<b>" not in page
    assert "same group" in page
    # caption groups: normalised caption, size, raw variants with counts
    assert "a red car" in page and "A RED CAR" in page and "×1" in page
    assert 'id="caption-group-table"' in page
    # removable rows: count and a listed sample with the representative
    assert "Images: 6 removable rows" in page and "Captions: 3 removable rows" in page
    assert 'id="removable-images"' in page and 'id="removable-captions"' in page
    # the sampling is said
    assert 'id="sampling"' in page and "1,000 seeded sample rows" in page
    # thumbnails: 9 group members + 12 pair images
    assert page.count("data:image/jpeg;base64,") == 9 + 12


def test_caption_only_report_and_missing_thumbnails():
    images, captions = example()
    page = render_dedup_report(None, captions)
    assert 'id="caption-groups"' in page and 'id="image-groups"' not in page and "data:image" not in page
    images.thumbnails = {}
    images.thumbnails_note = "No shard folder was given (--shards)"
    page = render_dedup_report(images, None)
    assert "No shard folder was given" in page and "data:image" not in page
    assert page.count('class="group"') == 3  # the groups are still listed


def test_largest_groups_and_borderline_selection():
    table = image_table(
        [[("representative", 0, 1.0)] + [("phash", d, 0.9) for d in range(1, 12)]]
        + [[("representative", 0, 1.0), ("exact", 0, 1.0)]] * 20
        + [[("representative", 0, 1.0), ("transitive", 30, 0.5), ("phash", 2, 0.99)]]
    )
    groups = largest_groups(table, ReportLimits(groups=3, members=4))
    assert [len(g) for g in groups] == [4, 3, 2]
    big = groups[0]
    assert big[0]["is_representative"] and [m["hamming_distance"] for m in big[1:]] == [11, 10, 9]
    assert groups[1][1]["method"] == "transitive"  # the weakest link comes first
    pairs = [Pair("phash", 2 * i, 2 * i + 1, "", "", d, d <= 12) for i, d in enumerate(range(8, 17))]
    picked = pick_borderline(pairs + pairs, 3)  # duplicates are dropped
    dup = [p.value for p in picked if p.duplicate]
    nodup = [p.value for p in picked if not p.duplicate]
    assert dup == [12, 11, 10] and nodup == [13, 14, 15]  # one per distance, nearest first
    # copies of one picture do not fill a side: rows not shown yet come first within a distance
    same = [Pair("phash", 0, 1 + i, "", "", 13, False) for i in range(5)] + [
        Pair("phash", 8, 9, "", "", 13, False)
    ]
    assert {8, 9} <= {r for p in pick_borderline(same, 2) for r in (p.a, p.b)}
    labels, counts = size_buckets({"a": np.array([2, 2, 3, 7, 100])})
    assert labels[:4] == ["2", "3", "4", "5–8"] and sum(counts["a"]) == 5 and counts["a"][0] == 2


def test_phash_search_finds_both_sides_and_is_bounded():
    rng = np.random.default_rng(0)
    hashes = rng.integers(1, 2**63, 500, dtype=np.int64).astype(np.uint64)
    # row 1 differs from row 0 in 12 bits (duplicate), row 2 in 13 (not), row 3 in 11
    for row, bits in ((1, 12), (2, 13), (3, 11)):
        hashes[row] = hashes[0] ^ np.uint64(sum(1 << b for b in range(bits)))
    valid = np.ones(500, bool)
    pairs, nearest, info = phash_neighbours(hashes, valid, np.arange(500), 12, ReportLimits())
    found = {(min(a, b), max(a, b)): d for a, b, d in pairs}
    assert found[(0, 1)] == 12 and found[(0, 2)] == 13 and found[(0, 3)] == 11
    assert info["reference"] == 500 and len(nearest) == 500 and nearest.min() >= 1
    # a comparison budget caps the reference rows whatever N is
    _, _, info = phash_neighbours(hashes, valid, np.arange(100), 12, ReportLimits(phash_comparisons=5_000))
    assert info["reference"] == 50


def test_semantic_search_finds_both_sides():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ortho = rng.normal(size=16).astype(np.float32)
    ortho -= ortho.dot(vectors[0]) * vectors[0]
    ortho /= np.linalg.norm(ortho)
    for row, cos in ((1, 0.96), (2, 0.94)):
        vectors[row] = cos * vectors[0] + np.sqrt(1 - cos**2) * ortho
    vectors[3] = 0  # never pairs
    pairs, _, info = semantic_neighbours(EmbeddingRows(vectors=vectors), np.arange(300), 0.95, ReportLimits())
    found = {(min(a, b), max(a, b)): c for a, b, c in pairs}
    assert found[(0, 1)] == pytest.approx(0.96, abs=1e-4) and found[(0, 2)] == pytest.approx(0.94, abs=1e-4)
    assert info["queries"] == 299 and not any(3 in k for k in found)


def tiny_folder(root: Path) -> tuple[Path, Path]:
    """Two shards of 12 pictures and their embedding folder: rows 0-2 one picture re-encoded, the rest
    unrelated; pHashes planted so rows 0/1 differ by 2 bits and 0/4 by 13."""
    pictures = [random_photo(0, (64, 64))] * 3 + [random_photo(i, (64, 64)) for i in range(1, 10)]
    keys = [f"{i:05d}" for i in range(12)]
    shards = root / "shards"
    for s in range(2):
        rows = [sample(keys[i], encode(pictures[i]), f"cap {i % 4}") for i in range(s, 12, 2)]
        write_shard(shards, s, rows)
    emb = root / "emb"
    (emb / "img_emb").mkdir(parents=True)
    (emb / "metadata").mkdir()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 8)).astype(np.float16)
    hashes = rng.integers(1, 2**63, 12, dtype=np.int64).astype(np.uint64)
    hashes[1] = hashes[0] ^ np.uint64(3)
    hashes[4] = hashes[0] ^ np.uint64((1 << 13) - 1)
    np.save(emb / "img_emb" / "img_emb_0.npy", vectors)
    meta = {
        "key": keys,
        "caption": [f"cap {i % 4}" for i in range(12)],
        "url": [""] * 12,
        "sha256": ["s"] * 12,
        "width": [64] * 12,
        "height": [64] * 12,
        "shard": [f"{int(k) % 2:05d}" for k in keys],
        "phash": hashes,
    }
    pq.write_table(pa.table(meta, schema=METADATA_SCHEMA), emb / "metadata" / "metadata_0.parquet")
    return shards, emb


def test_writer_reads_thumbnails_and_searches_the_embedding_folder(tmp_path: Path):
    shards, emb = tiny_folder(tmp_path)
    table = image_table([[("representative", 0, 1.0), ("phash", 2, 0.9), ("exact", 0, 1.0)]])
    table = table.set_column(0, "key", pa.array(["00000", "00001", "00002"]))
    summary = {"rows": 12, "passes": {"exact": {"pairs": 1}, "phash": {"pairs": 1}, "semantic": {"pairs": 0}}}
    out = tmp_path / "out" / "dedup_report.html"
    done = write_dedup_report(
        out,
        image_duplicates=table,
        image_summary=summary,
        image_cfg=ImageDedupConfig(),
        embeddings=emb,
        shards=shards,
        caption_duplicates=caption_table([3, 3, 3, 3], [["cap"]] * 4)[0],
        caption_cfg=CaptionDedupConfig(),
    )
    page = out.read_text()
    assert done["bytes"] == len(page.encode()) and done["thumbnails"] >= 3
    assert page.count('class="group"') == 1 and "data:image/jpeg;base64," in page
    assert 'data-method="phash" data-duplicate="false"' in page  # rows 0 and 4: 13 bits apart
    assert "cap 0" in page  # raw captions from the embedding folder's metadata
    # no shard folder: the groups without pictures, and the page says so
    write_dedup_report(out, image_duplicates=table, image_summary=summary, embeddings=emb)
    page = out.read_text()
    assert "data:image" not in page and "No shard folder was given" in page


def test_page_stays_small_and_fast_at_a_million_rows():
    n = 1_000_000
    rng = np.random.default_rng(0)
    sizes = np.minimum(rng.zipf(1.6, size=n // 2) + 1, 5000)
    sizes = sizes[np.cumsum(sizes) <= n]
    group_of_row = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    m = len(group_of_row)
    rows = np.arange(m)
    is_rep = rows == starts[group_of_row]
    methods = np.array(["exact", "phash", "semantic", "transitive"], dtype=object)[rng.integers(0, 4, m)]
    methods[is_rep] = "representative"
    table = pa.table(
        {
            "key": pa.array(rows.astype(str)),
            "row_id": pa.array(rows, pa.int64()),
            "group_id": pa.array(starts[group_of_row], pa.int64()),
            "group_size": pa.array(sizes[group_of_row], pa.int64()),
            "representative_key": pa.array(starts[group_of_row].astype(str)),
            "is_representative": pa.array(is_rep),
            "similarity": pa.array(rng.uniform(0.8, 1.0, m).astype(np.float32)),
            "hamming_distance": pa.array(rng.integers(0, 20, m).astype(np.int16)),
            "method": pa.array(methods.tolist(), pa.string()),
            "linked_by": pa.array(np.where(is_rep, "exact|phash", "phash").tolist(), pa.string()),
        },
        schema=SCHEMA,
    )
    caption_gid = np.sort(rng.integers(0, n // 3, n))
    first = np.searchsorted(caption_gid, caption_gid)  # group id = first row of the group
    captions = pa.table(
        {
            "key": pa.array(np.arange(n).astype(str)),
            "group_id": pa.array(first, pa.int64()),
            "group_size": pa.array(np.bincount(caption_gid)[caption_gid], pa.int64()),
            "normalized_caption": pa.array(np.char.add("caption ", caption_gid.astype(str)).tolist()),
        }
    )
    raw = pa.array(np.char.add("Caption ", caption_gid.astype(str)).tolist())
    pairs = [Pair("phash", i, i + 1, str(i), str(i + 1), 10 + i % 5, i % 5 <= 2) for i in range(0, 2000, 2)]
    thumb = thumbnail(encode(random_photo(3, (256, 256))), 80, "JPEG")
    images = ImageSection(
        table=table,
        rows=n,
        borderline=pairs,
        nearest={"phash": rng.integers(0, 40, 2000), "semantic": rng.uniform(0.5, 1.0, 2000)},
        thumbnails=dict.fromkeys(range(m), thumb),  # every row has a picture: the page still caps them
    )
    started = time.monotonic()
    page = render_dedup_report(images, CaptionSection(captions, 0.7, raw))
    seconds = time.monotonic() - started
    size = len(page.encode())
    print(f"\n1M-row tables: page {size / 1e6:.2f} MB, rendered in {seconds:.2f} s")
    assert size < 3_000_000 and seconds < 5
    assert page.count("data:image/jpeg") <= 12 * 8 + 24 * 2
    assert page.count('class="group"') == 12 and page.count('class="bpair"') <= 24


# ----------------------------------------------------------------------------------------------
# Bounded memory: the writer on a LAION-like folder, in a fresh process whose peak RSS is measured.
# ----------------------------------------------------------------------------------------------


def laion_like(root: Path, n: int, parts: int, dim: int = 16) -> dict[str, str]:
    """An embedding folder of ``n`` rows in ``parts`` partitions (captions of ~90 characters, pHashes,
    shard names, float16 embeddings), its ``image_duplicates.parquet`` (30% of rows in groups of 2-5,
    and a few large groups) and ``caption_duplicates.parquet`` (10% of rows in caption groups): the
    files the bundle's report step reads."""
    rng = np.random.default_rng(0)
    emb = root / "emb"
    (emb / "img_emb").mkdir(parents=True)
    (emb / "metadata").mkdir()
    vocab = np.array([f"word{i:04d}" for i in range(5000)], dtype=object)
    words = rng.integers(0, len(vocab), (n, 10))
    captions = np.array([" ".join(vocab[w]) for w in words], dtype=object)
    hashes = rng.integers(1, 2**63, n, dtype=np.int64).astype(np.uint64)
    keys = np.char.mod("%09d", np.arange(n)).astype(object)
    # image groups: a few large ones, then groups of 2-5, until 30% of the rows are in one
    sizes = np.r_[np.maximum(2, np.array([2000, 1500, 1000]) * n // 300_000), rng.integers(2, 6, n // 8)]
    sizes = sizes[np.cumsum(sizes) <= int(0.3 * n)]
    members = np.sort(rng.choice(n, int(sizes.sum()), replace=False))
    rng.shuffle(members)
    group = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    reps = members[starts][group]
    is_rep = members == reps
    flips = rng.integers(0, 16, len(members)).astype(np.uint64)
    hashes[members[~is_rep]] = hashes[reps[~is_rep]] ^ ((np.uint64(1) << flips[~is_rep]) - np.uint64(1))
    methods = np.array(["exact", "phash", "semantic", "transitive"], dtype=object)[
        rng.integers(0, 4, len(members))
    ]
    methods[is_rep] = "representative"
    image = pa.table(
        {
            "key": pa.array(keys[members].tolist()),
            "row_id": pa.array(members, pa.int64()),
            "group_id": pa.array(reps, pa.int64()),
            "group_size": pa.array(sizes[group], pa.int64()),
            "representative_key": pa.array(keys[reps].tolist()),
            "is_representative": pa.array(is_rep),
            "similarity": pa.array(np.where(is_rep, 1.0, rng.uniform(0.9, 1.0, len(members))), pa.float32()),
            "hamming_distance": pa.array(np.where(is_rep, 0, flips), pa.int16()),
            "method": pa.array(methods.tolist(), pa.string()),
            "linked_by": pa.array(np.where(is_rep, "exact|phash", "phash").tolist(), pa.string()),
        },
        schema=SCHEMA,
    )
    pq.write_table(image, root / "image_duplicates.parquet")
    # caption groups: 10% of the rows, in groups of 2-4 and a few of hundreds; variants by case
    csizes = np.r_[np.maximum(2, np.array([900, 700, 500]) * n // 300_000), rng.integers(2, 5, n // 20)]
    csizes = csizes[np.cumsum(csizes) <= n // 10]
    cmembers = np.sort(rng.choice(n, int(csizes.sum()), replace=False))
    cgroup = np.repeat(np.arange(len(csizes)), csizes)
    cfirst = cmembers[np.r_[0, np.cumsum(csizes)[:-1]]][cgroup]  # sorted rows: the first row per group
    captions[cmembers] = captions[cfirst]
    upper = cmembers[rng.random(len(cmembers)) < 0.3]
    captions[upper] = [c.upper() for c in captions[upper]]
    group_id, group_size = np.arange(n), np.ones(n, np.int64)
    group_id[cmembers], group_size[cmembers] = cfirst, csizes[cgroup]
    pq.write_table(
        pa.table(
            {
                "key": pa.array(keys.tolist()),
                "group_id": pa.array(group_id, pa.int64()),
                "group_size": pa.array(group_size, pa.int64()),
                "normalized_caption": pa.array([c.lower() for c in captions]),
            }
        ),
        root / "caption_duplicates.parquet",
    )
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        vectors = rng.normal(size=(hi - lo, dim)).astype(np.float32)
        np.save(
            emb / "img_emb" / f"img_emb_{p}.npy",
            (vectors / np.linalg.norm(vectors, axis=1)[:, None]).astype(np.float16),
        )
        meta = {
            "key": keys[lo:hi].tolist(),
            "caption": captions[lo:hi].tolist(),
            "url": [f"https://example.com/{k}.jpg" for k in keys[lo:hi]],
            "sha256": [None] * (hi - lo),
            "width": np.full(hi - lo, 512, np.int32),
            "height": np.full(hi - lo, 384, np.int32),
            "shard": [f"{r // 10_000:05d}" for r in range(lo, hi)],
            "phash": hashes[lo:hi],
        }
        pq.write_table(pa.table(meta, schema=METADATA_SCHEMA), emb / "metadata" / f"metadata_{p}.parquet")
    (root / "shards").mkdir()
    passes = {"exact": {"pairs": 10}, "phash": {"pairs": 20}, "semantic": {"pairs": 30}}
    (root / "image_summary.json").write_text(json.dumps({"rows": n, "passes": passes}))
    (root / "caption_summary.json").write_text(json.dumps({"verified_pairs": int(csizes.sum())}))
    return {
        "image_duplicates": str(root / "image_duplicates.parquet"),
        "image_summary": str(root / "image_summary.json"),
        "embeddings": str(emb),
        "shards": str(root / "shards"),
        "caption_duplicates": str(root / "caption_duplicates.parquet"),
        "caption_summary": str(root / "caption_summary.json"),
    }


#: Run in a fresh interpreter: the writer once on a small folder (one-off costs: Arrow's compute registry
#: and memory pool, FAISS's threads), then on the large one; the growth of its peak RSS over that second
#: call is printed. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec (the child would
#: start at pytest's peak).
_MEASURE = """
import json, re, sys
from pathlib import Path
from pipeline.dedup.report import ReportLimits, write_dedup_report
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024
small, large, limits = json.loads(sys.argv[1])
limits = ReportLimits(**limits)
write_dedup_report(small.pop("path"), title="Bundle duplicates", limits=limits, **small)
before = peak_mb()
done = write_dedup_report(large.pop("path"), title="Bundle duplicates", limits=limits, **large)
print(json.dumps({"before_mb": before, "growth_mb": peak_mb() - before, **done}))
"""


@pytest.mark.slow  # a second interpreter
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_writer_memory_stays_bounded_on_a_large_folder(tmp_path: Path):
    """The bundle's report step on 300k rows, in a fresh process: the page has every section, and the
    writer's peak RSS grows by a bounded amount over a first call on 30k rows (it reads the metadata of
    the shown rows only, the pHashes and the tables a batch at a time). Measured: 15-22 MB here, 18 MB
    at 1M rows; loading whole columns (before) grew by 105-160 MB here and by 386 MB at 1M rows."""
    n = 300_000
    started = time.monotonic()
    small = laion_like(tmp_path / "small", 30_000, parts=1)
    large = laion_like(tmp_path / "large", n, parts=6)
    built = time.monotonic() - started
    out = tmp_path / "dedup_report.html"
    # the semantic search against 20k reference rows: its memory is one chunk of reference rows
    # whatever N is (16 MB of float32), not what is measured here
    limits = {"semantic_flops": 2_000 * 16 * 20_000}
    runs = [{"path": str(tmp_path / "small.html"), **small}, {"path": str(out), **large}, limits]
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(runs)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{n:,} rows: data in {built:.1f} s; report {measured}")
    page = out.read_text()
    for section in ("counts", "histograms", "image-groups", "borderline", "caption-groups", "removable"):
        assert f'id="{section}"' in page, section
    assert page.count('class="group"') == 12 and 'id="caption-group-table"' in page
    assert "WORD" in page  # raw caption variants (upper-cased copies) read from the embedding folder
    assert "Searched 2,000 sampled rows against 300,000 of 300,000 rows" in page  # pHash: every row
    assert measured["growth_mb"] < 50, measured
