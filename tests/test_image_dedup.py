"""Image duplicates: the passes, the grouping, and precision/recall on planted real-photo duplicates."""

from __future__ import annotations

import dataclasses
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from demo.data import to_rgb
from fixtures.shard_factory import sample, write_shard
from pipeline.core.config import EmbedConfig, ImageDedupConfig
from pipeline.dedup.image import (
    exact_pairs,
    find_image_duplicates,
    phash_pairs,
    representatives,
    semantic_pairs,
)
from pipeline.dedup.image_shuffle import run_image_dedup
from pipeline.dedup.names import OUTPUT_NAME
from pipeline.embed.phash import hamming_distance

REPO = Path(__file__).resolve().parent.parent
SIDE = 192

# ----------------------------------------------------------------------------------------------
# Planted data: real photographs (scikit-image's bundled samples) with edited copies.
# ----------------------------------------------------------------------------------------------

#: Photographs that get copies; each copy must land in its photograph's group.
BASES = ("astronaut", "coffee", "rocket", "coins", "camera", "clock", "horse", "chelsea")
#: Copies per photograph: re-encodes, resizes, a crop, a brightness change, a byte-identical copy.
EDITS = ("jpeg_q12", "down_up_0.35", "resized_128", "center_crop_0.95", "brightness", "byte_copy")
#: Unique pictures, and hard negatives that must stay apart: a stereo pair (two photos of one
#: scene), disjoint and half-overlapping crops of one photo, three textures.
UNIQUE = ("page", "text", "immunohistochemistry", "microaneurysms", "colorwheel", "logo")
HARD_NEGATIVES = {
    "stereo": (("stereo_motorcycle", 0, None), ("stereo_motorcycle", 1, None)),
    "hubble_crops": (
        ("hubble_deep_field", None, (0, 0, 400)),
        ("hubble_deep_field", None, (0, 200, 400)),  # overlaps the first by half
        ("hubble_deep_field", None, (400, 400, 400)),
    ),
    "retina_crops": (("retina", None, (255, 255, 300)), ("retina", None, (555, 555, 300))),
    "textures": (("grass", None, None), ("gravel", None, None), ("brick", None, None)),
}


def photo(name: str, part: int | None = None, box: tuple[int, int, int] | None = None) -> Image.Image:
    """A square picture from ``skimage.data.<name>`` (centred, or ``box`` = top, left, side)."""
    from skimage import data

    pixels = getattr(data, name)()
    if part is not None:
        pixels = pixels[part]
    image = to_rgb(np.asarray(pixels))
    if box is None:
        side = min(image.size)
        top, left = (image.height - side) // 2, (image.width - side) // 2
    else:
        top, left, side = box
    return image.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def edited(image: Image.Image, edit: str, original: bytes, i: int) -> bytes:
    if edit == "jpeg_q12":
        return jpeg(image, 12)
    if edit == "down_up_0.35":
        small = round(SIDE * 0.35)
        return jpeg(
            image.resize((small, small), Image.Resampling.BILINEAR).resize(
                (SIDE, SIDE), Image.Resampling.BICUBIC
            )
        )
    if edit == "resized_128":
        return jpeg(image.resize((128, 128), Image.Resampling.LANCZOS))
    if edit == "center_crop_0.95":
        side = round(SIDE * 0.95)
        off = (SIDE - side) // 2
        return jpeg(
            image.crop((off, off, off + side, off + side)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
        )
    if edit == "brightness":
        return jpeg(ImageEnhance.Brightness(image).enhance(0.75 if i % 2 else 1.25))
    if edit == "byte_copy":
        return original
    raise ValueError(edit)


VERBATIM_CAPTION = "Microscope image of a single round cell, on a gray background"


def planted_images(folder: Path, shards: int = 2, verbatim_copies: int = 0) -> dict[str, str]:
    """Write img2dataset shards of planted duplicates; return key -> true group (unique keys: own group).

    With ``verbatim_copies``, one more picture is repeated byte for byte with one identical caption
    (what diffusion models memorise). Rows are dealt round-robin over the shards in a seeded order,
    so groups span shards.
    """
    rows: list[tuple[str, bytes, str, str]] = []  # (group, bytes, caption, label)
    if verbatim_copies:
        data = jpeg(photo("cell"))
        rows += [("dup:verbatim", data, VERBATIM_CAPTION, "verbatim")] * verbatim_copies
    for i, name in enumerate(BASES):
        image = photo(name)
        original = jpeg(image)
        rows.append((f"dup:{name}", original, f"a photo of {name}", "original"))
        for edit in EDITS:
            rows.append((f"dup:{name}", edited(image, edit, original, i), f"{name} picture, {edit}", edit))
    for name in UNIQUE:
        rows.append((f"unique:{name}", jpeg(photo(name)), f"unique {name}", "unique"))
    for group, parts in HARD_NEGATIVES.items():
        for j, (name, part, box) in enumerate(parts):
            rows.append(
                (f"negative:{group}:{j}", jpeg(photo(name, part, box)), f"{group} {j}", "hard_negative")
            )
    order = np.random.default_rng(0).permutation(len(rows))
    truth, per_shard = {}, [[] for _ in range(shards)]
    for position, index in enumerate(order):
        group, data, caption, _ = rows[int(index)]
        shard = position % shards
        key = f"{shard:05d}{len(per_shard[shard]):04d}"
        per_shard[shard].append(sample(key, data, caption=caption))
        truth[key] = group
    for shard, samples in enumerate(per_shard):
        write_shard(folder, shard, samples)
    return truth


def pairs_of(groups: dict[str, str]) -> set[tuple[str, str]]:
    """Every unordered pair of keys sharing a group label."""
    by_group: dict[str, list[str]] = {}
    for key, group in groups.items():
        by_group.setdefault(group, []).append(key)
    return {tuple(sorted(p)) for members in by_group.values() for p in itertools.combinations(members, 2)}


def precision_recall(predicted: set, true: set) -> tuple[float, float]:
    hits = len(predicted & true)
    return (hits / len(predicted) if predicted else 1.0), (hits / len(true) if true else 1.0)


@pytest.fixture(scope="module")
def planted(ray_local, tmp_path_factory):
    """Planted shards, embedded by the real embed stage (tiny offline model) on the session's Ray."""
    from pipeline.embed.embed import run_embed

    root = tmp_path_factory.mktemp("planted_images")
    truth = planted_images(root / "shards")
    run_embed(EmbedConfig(shards=str(root / "shards"), out=str(root / "emb"), log_every_s=600))
    return root, truth


def predicted_groups(dup_table: pa.Table, keys: list[str]) -> dict[str, str]:
    groups = {key: f"alone:{key}" for key in keys}
    for key, group in zip(
        dup_table.column("key").to_pylist(), dup_table.column("group_id").to_pylist(), strict=False
    ):
        groups[key] = f"group:{group}"
    return groups


# ----------------------------------------------------------------------------------------------
# End to end on planted photographs.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_planted_duplicates_precision_and_recall(planted):
    root, truth = planted
    summary = run_image_dedup(ImageDedupConfig(embeddings=str(root / "emb"), out=str(root / "dedup")))
    assert summary["rows"] == len(truth)
    # The tiny model has random weights: the semantic pass must not run on its embeddings.
    assert summary["semantic_model"] is False
    assert "skipped" in summary["passes"]["semantic"]
    table = pq.read_table(root / "dedup" / OUTPUT_NAME)
    predicted = pairs_of(predicted_groups(table, list(truth)))
    true = pairs_of(
        {k: g for k, g in truth.items() if g.startswith("dup:")}
        | {k: k for k, g in truth.items() if not g.startswith("dup:")}
    )
    precision, recall = precision_recall(predicted, true)
    print(
        f"\nplanted image duplicates: {len(true)} true pairs, {len(predicted)} found, "
        f"precision {precision:.3f}, recall {recall:.3f}"
    )
    assert precision >= 0.95
    assert recall >= 0.90
    # No hard negative (stereo pair, crops of one photo, textures) is grouped with anything.
    grouped = set(table.column("key").to_pylist())
    negatives = [k for k, g in truth.items() if g.startswith(("negative:", "unique:"))]
    assert not grouped & set(negatives)


@pytest.mark.slow
def test_planted_groups_schema_representative_and_methods(planted):
    root, _truth = planted
    run_image_dedup(ImageDedupConfig(embeddings=str(root / "emb"), out=str(root / "dedup")))
    table = pq.read_table(root / "dedup" / OUTPUT_NAME)
    assert table.schema.names == [
        "key",
        "row_id",
        "group_id",
        "group_size",
        "representative_key",
        "is_representative",
        "similarity",
        "hamming_distance",
        "method",
        "linked_by",
    ]
    rows = table.to_pylist()
    meta = {r["key"]: r for r in pq.read_table(root / "emb" / "metadata").to_pylist()}
    for group_id, members in itertools.groupby(rows, key=lambda r: r["group_id"]):
        members = list(members)
        reps = [m for m in members if m["is_representative"]]
        assert len(reps) == 1 and reps[0]["row_id"] == group_id and members[0] is reps[0]
        assert all(m["group_size"] == len(members) for m in members)
        assert all(m["representative_key"] == reps[0]["key"] for m in members)
        # The representative has the most pixels, ties broken by the smallest key.
        best = min(members, key=lambda m: (-meta[m["key"]]["width"] * meta[m["key"]]["height"], m["key"]))
        assert reps[0]["key"] == best["key"]
        assert reps[0]["method"] == "representative" and reps[0]["similarity"] == pytest.approx(1.0)
    by_method = {r["method"] for r in rows}
    assert {"representative", "exact", "phash"} <= by_method
    # Byte copies are linked by sha256 and carry the exact method when next to their original.
    for r in rows:
        if r["method"] == "exact":
            assert meta[r["key"]]["sha256"] == meta[r["representative_key"]]["sha256"]
        if r["method"] == "phash":
            assert r["hamming_distance"] <= 12


@pytest.mark.slow
def test_rerun_is_skipped_and_option_change_recomputes(planted):
    root, _ = planted
    cfg = ImageDedupConfig(embeddings=str(root / "emb"), out=str(root / "dedup_rerun"))
    first = run_image_dedup(cfg)
    assert first["skipped"] is False
    mtime = (root / "dedup_rerun" / OUTPUT_NAME).stat().st_mtime_ns
    assert run_image_dedup(cfg)["skipped"] is True
    assert (root / "dedup_rerun" / OUTPUT_NAME).stat().st_mtime_ns == mtime
    stricter = ImageDedupConfig(
        embeddings=str(root / "emb"), out=str(root / "dedup_rerun"), phash_max_distance=0
    )
    again = run_image_dedup(stricter)
    assert again["skipped"] is False and again["rows_in_groups"] <= first["rows_in_groups"]


@pytest.mark.slow
def test_forced_semantic_pass_on_random_weights_is_measured_not_trusted(planted):
    """The random-weight model's cosines group unrelated pictures: that is why 'auto' skips it."""
    root, truth = planted
    cfg = ImageDedupConfig(
        embeddings=str(root / "emb"), out=str(root / "dedup_semantic"), semantic="on", semantic_threshold=0.99
    )
    summary = run_image_dedup(cfg)
    assert summary["passes"]["semantic"]["k"] == cfg.semantic_k
    table = pq.read_table(root / "dedup_semantic" / OUTPUT_NAME)
    predicted = pairs_of(predicted_groups(table, list(truth)))
    true = pairs_of({k: (g if g.startswith("dup:") else k) for k, g in truth.items()})
    precision, recall = precision_recall(predicted, true)
    print(f"\nrandom-weight semantic pass at cosine 0.99: precision {precision:.3f}, recall {recall:.3f}")
    assert recall >= 0.90  # it adds links; precision is what it costs (see BENCHMARKS.md)


@pytest.mark.slow
def test_job_cli(planted, capsys):
    root, _ = planted
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import dedup_images
    finally:
        sys.path.remove(str(REPO / "jobs"))
    summary = dedup_images.main(
        ["--embeddings", str(root / "emb"), "--out", str(root / "dedup_cli"), "--phash-max-distance", "8"]
    )
    assert summary["job"] == "dedup_images" and (root / "dedup_cli" / OUTPUT_NAME).is_file()
    assert "passes" not in summary  # kept in the summary file; the stdout line stays short


# ----------------------------------------------------------------------------------------------
# The passes, alone.
# ----------------------------------------------------------------------------------------------


def test_exact_pairs_link_identical_hashes_only():
    pairs = exact_pairs(["a", "b", "a", None, "", "a", "b", ""])
    assert pairs.tolist() == [[0, 2], [0, 5], [1, 6]]
    assert exact_pairs([]).shape == (0, 2)


def test_phash_radius_is_inclusive_and_flat_hashes_are_left_out():
    base = np.uint64(0x0123456789ABCDEF)
    three = base ^ np.uint64(0b111)
    four = base ^ np.uint64(0b1111 << 20)
    hashes = np.array([base, three, four, 0, 0], dtype=np.uint64)
    pairs, dist = phash_pairs(hashes, 3)
    assert pairs.tolist() == [[0, 1]] and dist.tolist() == [3]  # two flat images (hash 0) do not pair
    pairs, _ = phash_pairs(hashes, 4)
    assert pairs.tolist() == [[0, 1], [0, 2]]  # 1 and 2 differ in 7 bits
    pairs, _ = phash_pairs(hashes, 4, valid=np.array([True, False, True, True, True]))
    assert pairs.tolist() == [[0, 2]]
    rng = np.random.default_rng(3)
    many = rng.integers(0, 2**63, size=1500, dtype=np.uint64)
    many[700:900] = many[:200] ^ np.uint64(0b101)
    pairs, dist = phash_pairs(many, 10, batch=100)
    brute = hamming_distance(many[:, None], many[None, :])
    expected = np.argwhere(np.triu(brute <= 10, k=1))
    assert np.array_equal(pairs, expected) and (dist == brute[pairs[:, 0], pairs[:, 1]]).all()


def clustered(
    n: int, d: int, dup_fraction: float, seed: int, noise: float = 0.02
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around 50 centres, plus near-copies of the first rows; returns (vectors, copy_of)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d))
    base = centres[rng.integers(0, 50, n)] + rng.normal(size=(n, d)) * 0.9
    n_dup = int(n * dup_fraction)
    copies = base[:n_dup] + rng.normal(size=(n_dup, d)) * noise * np.linalg.norm(
        base[:n_dup], axis=1, keepdims=True
    ) / np.sqrt(d)
    x = np.concatenate([base, copies]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.concatenate([np.full(n, -1), np.arange(n_dup)])


def test_semantic_pairs_are_the_exact_pairs_above_the_threshold_capped_per_row():
    x, _ = clustered(3000, 32, 0.2, seed=1)
    x[5] = 0  # an all-zero row never pairs
    sims = x @ x.T
    expected = {tuple(p) for p in np.argwhere(np.triu(sims >= 0.95, k=1)).tolist() if 5 not in p}
    pairs, cosines, saturated = semantic_pairs(x, 0.95, k=8, block_rows=500)
    assert {tuple(p) for p in pairs.tolist()} == expected and len(expected) >= 550
    assert np.allclose(cosines, sims[pairs[:, 0], pairs[:, 1]], atol=1e-6) and saturated == 0
    # The torch path (a GPU on clusters; its CPU device here) finds the same pairs.
    on_torch, torch_cosines, _ = semantic_pairs(x, 0.95, k=8, block_rows=500, device="cpu")
    assert np.array_equal(on_torch, pairs) and np.allclose(torch_cosines, cosines, atol=1e-5)
    # Owners: only their partners are searched; k caps each owner's partners at its closest.
    noise = np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32) * 1e-3
    twins = np.repeat(x[:1], 6, axis=0) + noise
    twins /= np.linalg.norm(twins, axis=1, keepdims=True)
    pairs, _, saturated = semantic_pairs(twins, 0.9, k=2, owners=np.array([0]))
    assert saturated == 1 and len(pairs) == 2 and (pairs[:, 0] == 0).all()


def write_embedding_folder(folder: Path, vectors: np.ndarray, meta: pa.Table, parts: int) -> None:
    """An embedding folder (LAION layout, float16) of ``vectors`` and ``meta`` split into ``parts``."""
    from pipeline.io.embeddings import IMG_EMB, METADATA_SCHEMA, embedding_path, metadata_path

    schema = pa.schema([METADATA_SCHEMA.field(c) for c in meta.column_names], metadata={"semantic": "true"})
    for i, rows in enumerate(np.array_split(np.arange(len(vectors)), parts)):
        name = f"{i:05d}"
        embedding_path(folder, IMG_EMB, name).parent.mkdir(parents=True, exist_ok=True)
        np.save(embedding_path(folder, IMG_EMB, name), vectors[rows].astype(np.float16))
        metadata_path(folder, name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(meta.take(pa.array(rows)).cast(schema), metadata_path(folder, name))


def planted_rows(n: int, seed: int) -> tuple[np.ndarray, pa.Table, np.ndarray]:
    """Clustered unit vectors with 10% near-copies (pHash 0-6 bits off), a fifth of them exact copies."""
    x, copy_of = clustered(n, 48, 0.1, seed=seed, noise=0.15)
    rng = np.random.default_rng(seed)
    hashes = rng.integers(1, 2**63, size=len(x), dtype=np.uint64)
    copies = np.flatnonzero(copy_of >= 0)
    for i in copies:
        flips = rng.choice(64, size=int(rng.integers(0, 7)), replace=False)
        hashes[i] = hashes[copy_of[i]] ^ np.uint64(sum(1 << int(b) for b in flips))
    sha = [f"{i:064x}" for i in range(len(x))]
    for i in copies[: len(copies) // 5]:  # byte-identical copies
        x[i], hashes[i], sha[i] = x[copy_of[i]], hashes[copy_of[i]], sha[copy_of[i]]
    meta = pa.table(
        {
            "key": [f"k{i:06d}" for i in range(len(x))],
            "sha256": sha,
            "width": np.where(copy_of >= 0, 200, 400).astype(np.int32),
            "height": np.full(len(x), 300, np.int32),
            "phash": pa.array(hashes, pa.uint64()),
        }
    )
    return x, meta, copy_of


@pytest.mark.parametrize("phash_confirm", [0.8, -1.0])
def test_partitioned_stage_over_cells_finds_the_groups_of_the_in_memory_pass(tmp_path, phash_confirm):
    """Rows compared within k-means cells (top-2) and shuffled between map and reduce tasks give the
    groups that comparing every row with every row gives, on clustered data with planted copies."""
    from pipeline.core.config import CellsConfig

    x, meta, copy_of = planted_rows(4000, seed=2)
    write_embedding_folder(tmp_path / "emb", x, meta, parts=3)
    cfg = ImageDedupConfig(
        embeddings=str(tmp_path / "emb"),
        out=str(tmp_path / "out"),
        report=False,
        phash_confirm_cosine=phash_confirm,
    )
    summary = run_image_dedup(cfg, CellsConfig(rows_per_cell=400))
    assert summary["cells"]["nlist"] == 11 and summary["cells"]["buckets"] >= 1
    table = pq.read_table(tmp_path / "out" / OUTPUT_NAME)
    vectors = x.astype(np.float16).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    oracle = find_image_duplicates(meta, vectors, cfg)
    found = dict(zip(table.column("row_id").to_pylist(), table.column("group_id").to_pylist(), strict=True))
    expected = {r: int(g) for r, g in enumerate(oracle.group_id.tolist()) if oracle.group_size[r] > 1}
    differ = {r for r in set(expected) | set(found) if found.get(r) != expected.get(r)}
    print(f"\ncells vs all-pairs: {len(expected)} grouped rows, {len(differ)} differ")
    assert len(differ) <= 0.01 * len(expected)  # the boundary loss of top-2 cells
    assert np.mean([r in found for r in np.flatnonzero(copy_of >= 0).tolist()]) >= 0.99
    assert summary["passes"]["exact"]["pairs"] >= 80 and summary["passes"]["semantic"]["pairs"] >= 400
    assert not (tmp_path / "out" / "_shuffle").exists()  # the work files are gone


@pytest.mark.parametrize("linkage", ["single", "verified"])
def test_groups_join_passes_and_only_verified_members_stay(linkage):
    # rows 0-1 share a sha256, 1-2 share a pHash, 2-3 are close embeddings, 4 is alone, 5 is a zero vector
    hashes = np.array([1, 0xF0F0F0F0F0F0F0F0, 0xF0F0F0F0F0F0F0F1, 7 << 40, 99, 12345], dtype=np.uint64)
    x = np.eye(6, 8, dtype=np.float32)
    x[3] = x[2] + 0.01
    x[3] /= np.linalg.norm(x[3])
    x[5] = 0
    meta = pa.table(
        {
            "key": [f"k{i}" for i in range(6)],
            "caption": [""] * 6,
            "sha256": ["s", "s", "a", "b", "c", "d"],
            "width": [10, 20, 10, 10, 10, 10],
            "height": [10, 20, 10, 10, 10, 10],
            "phash": pa.array(hashes, pa.uint64()),
        }
    )
    cfg = ImageDedupConfig(
        embeddings="x", out="y", semantic="on", phash_max_distance=2, phash_confirm_cosine=-1, linkage=linkage
    )
    result = find_image_duplicates(meta, x, cfg)
    rows = {r["key"]: r for r in result.table.to_pylist()}
    assert rows["k1"]["method"] == "representative"  # most pixels
    assert rows["k0"]["method"] == "exact" and rows["k0"]["linked_by"] == "exact"
    assert rows["k2"]["method"] == "phash" and rows["k2"]["linked_by"] == "phash|semantic"
    if linkage == "single":  # k3 is linked only through k2: a chain
        assert result.group_id.tolist() == [1, 1, 1, 1, 4, 5]
        assert rows["k3"]["method"] == "transitive" and rows["k3"]["linked_by"] == "semantic"
        assert result.stats["groups"] == 1 and result.stats["removable_rows"] == 3
    else:  # k3 fails every test against k1 and leaves; alone, it has no group
        assert result.group_id.tolist() == [1, 1, 1, 3, 4, 5] and "k3" not in rows
        assert result.stats["members_moved_by_verification"] == 1 and result.stats["removable_rows"] == 2


def test_verification_regroups_the_members_it_moves_out():
    """A chain A-B-C-D where only neighbours match: B stays with A (the representative); C and D
    leave together and form their own group, C (the larger) representing it."""
    angles = np.radians([0.0, 15.0, 30.0, 45.0])  # cos 15° = 0.966, cos 30° = 0.866
    x = np.stack([np.cos(angles), np.sin(angles), 0 * angles, 0 * angles], axis=1).astype(np.float32)
    sims = x @ x.T
    assert sims[0, 2] < 0.95 <= min(sims[0, 1], sims[1, 2], sims[2, 3])  # only neighbours match
    meta = pa.table(
        {
            "key": list("abcd"),
            "sha256": ["1", "2", "3", "4"],
            "width": [30, 10, 20, 10],
            "height": [10, 10, 10, 10],
            "phash": pa.nulls(4, pa.uint64()),
        }
    )
    cfg = ImageDedupConfig(embeddings="x", out="y", semantic="on", semantic_threshold=0.95)
    assert find_image_duplicates(meta, x, cfg).group_id.tolist() == [0, 0, 2, 2]
    chained = find_image_duplicates(meta, x, dataclasses.replace(cfg, linkage="single"))
    assert chained.group_id.tolist() == [0, 0, 0, 0]


def test_representative_ties_go_to_the_smallest_key():
    labels = np.array([0, 0, 0, 3, 3])
    reps = representatives(labels, np.array([4, 9, 9, 1, 1]), ["c", "b", "a", "z", "y"])
    assert reps.tolist() == [2, 2, 2, 4, 4]


def test_bad_options_are_refused():
    meta = pa.table({"key": ["a"], "sha256": ["x"], "width": [1], "height": [1]})
    for bad in (
        {"semantic": "maybe"},
        {"phash_max_distance": 64},
        {"linkage": "chain"},
        {"phash_confirm_cosine": 1.5},
        {"semantic_threshold": 2.0},
    ):
        with pytest.raises(ValueError):
            find_image_duplicates(meta, None, ImageDedupConfig(embeddings="x", out="y", **bad))


# ----------------------------------------------------------------------------------------------
# The dedup report on the planted photographs.
# ----------------------------------------------------------------------------------------------

REPORT_SECTIONS = ("counts", "histograms", "image-groups", "borderline", "removable", "sampling")


@pytest.mark.slow
def test_dedup_report_renders_in_headless_chromium(planted, tmp_path: Path):
    """dedup_images writes dedup_report.html with thumbnails from the shards; it renders offline in
    headless Chromium with every section, and a missing report makes the stage run again."""
    from test_report import _run_chromium

    from pipeline.dedup.report import REPORT_NAME

    root, _ = planted
    cfg = ImageDedupConfig(
        embeddings=str(root / "emb"), out=str(root / "dedup_report"), shards=str(root / "shards")
    )
    summary = run_image_dedup(cfg)
    page = Path(summary["report"])
    assert page == root / "dedup_report" / REPORT_NAME and page.is_file()
    text = page.read_text()
    assert len(text.encode()) < 3_000_000
    assert text.count('class="group"') == 8  # the eight photographs with copies
    assert text.count("data:image/jpeg;base64,") >= 8 * 7  # their thumbnails, read from the tars
    assert 'data-method="phash"' in text  # borderline pHash pairs
    # What Chromium renders (offline: any request but the file itself would fail).
    offline = ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
    dom = _run_chromium([*offline, "--dump-dom", page.as_uri()], tmp_path).stdout
    for section in REPORT_SECTIONS:
        assert f'id="{section}"' in dom, section
    for element in ('id="pass-exact"', 'id="pass-phash"', 'id="hist-phash"', 'class="threshold"'):
        assert element in dom, element
    shot = tmp_path / "dedup_report.png"
    done = _run_chromium(
        [*offline, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()], tmp_path
    )
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        arr = np.asarray(im.convert("RGB"))
    # Rendered photographs, not a blank page: many colours, and a good part of the page is not white.
    colours = len(np.unique(arr.reshape(-1, 3)[::7], axis=0))
    inked = (arr.min(axis=2) < 200).mean()
    print(f"\ndedup report: {len(text.encode()) / 1e3:.0f} kB, {colours} colours, {inked:.1%} inked; {shot}")
    assert colours > 5000 and inked > 0.08
    # The report is an output of the stage: without it, the stage runs again.
    page.unlink()
    again = run_image_dedup(cfg)
    assert again["skipped"] is False and page.is_file()
