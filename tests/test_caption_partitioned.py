"""Caption dedup as shuffles (pipeline.dedup.caption_partitioned) against the in-process oracle.

The steps' pure parts (star rounds, unit plan, bucket windows, shuffle files) are tested without
Ray; the whole path runs on the session's local Ray over planted captions split into uneven files,
with empty captions, colliding text hashes, huge buckets and a chain of near-duplicates whose edges
land in different partitions.
"""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures.planted_captions import generate
from pipeline.core.config import CaptionDedupConfig
from pipeline.core.shuffle import read_part, write_routed
from pipeline.dedup.caption import (
    OUTPUT_NAME,
    SUMMARY_NAME,
    WORK_NAME,
    find_caption_duplicates,
    run_caption_dedup,
)
from pipeline.dedup.caption_partitioned import find_caption_duplicates_partitioned, plan_units
from pipeline.dedup.caption_steps import bucket_pairs, unique_pairs, window_pairs
from pipeline.dedup.union_find import component_stars, connected_components, large_star, small_star

COMPARED = (
    "rows",
    "empty_captions",
    "distinct_normalized",
    "exact_duplicate_rows",
    "candidate_pairs",
    "verified_pairs",
    "rejected_below_threshold",
    "rejected_word_substitution",
    "groups",
    "duplicate_groups",
    "rows_in_duplicate_groups",
    "removable_rows",
    "lsh_bands",
    "lsh_rows",
)

# ------------------------------------------------------------------------------------------------
# Pure steps (no Ray).
# ------------------------------------------------------------------------------------------------


def _star_rounds(edges: np.ndarray, parts: int, seed: int = 0) -> tuple[dict[int, int], int]:
    """The components step as the driver runs it, with partitions simulated in this process."""

    def owner(x: np.ndarray) -> np.ndarray:
        return (x * 2654435761) % parts

    which = np.random.default_rng(seed).integers(0, parts, len(edges))
    stars = [component_stars(edges[which == p]) for p in range(parts)]
    a = np.concatenate([s[0] for s in stars])
    b = np.concatenate([s[1] for s in stars])
    for rounds in range(1, 200):
        u, v = np.concatenate([a, b]), np.concatenate([b, a])
        steps = [large_star(u[owner(u) == k], v[owner(u) == k]) for k in range(parts)]
        if sum(s.unsettled for s in steps) == 0:
            return {int(n): int(m) for s in steps for n, m in zip(*s.labels, strict=True)}, rounds
        x = np.concatenate([s.edges[0] for s in steps])
        m = np.concatenate([s.edges[1] for s in steps])
        out = [small_star(x[owner(x) == k], m[owner(x) == k]) for k in range(parts)]
        a = np.concatenate([o[0] for o in out])
        b = np.concatenate([o[1] for o in out])
    raise AssertionError("did not settle")


def test_star_rounds_label_components_like_scipy():
    rng = np.random.default_rng(1)
    for trial in range(150):
        n = int(rng.integers(2, 300))
        if trial % 3 == 0:  # one long chain, its nodes in shuffled order
            perm = rng.permutation(n)
            edges = np.stack([perm[:-1], perm[1:]], axis=1)
        else:
            edges = rng.integers(0, n, (int(rng.integers(0, 3 * n)), 2))
        labels, _ = _star_rounds(edges, int(rng.integers(1, 8)), seed=trial)
        reference = connected_components(n, edges)
        on_edges = np.unique(edges[edges[:, 0] != edges[:, 1]])
        assert sorted(labels) == on_edges.tolist()  # only nodes on edges take part
        assert all(labels[int(x)] == reference[x] for x in on_edges)
    # Ids far beyond 32 bits, and a long shuffled chain that needs many rounds.
    perm = rng.permutation(20_000).astype(np.int64) + (1 << 40)
    labels, rounds = _star_rounds(np.stack([perm[:-1], perm[1:]], axis=1), 8)
    assert set(labels.values()) == {int(perm.min())} and rounds > 3


def test_component_stars_and_star_steps():
    node, root = component_stars(np.array([[5, 9], [9, 7], [30, 20], [7, 5]]))
    assert sorted(zip(node.tolist(), root.tolist(), strict=True)) == [(7, 5), (9, 5), (30, 20)]
    step = large_star(np.array([5, 7, 9, 7]), np.array([7, 5, 7, 9]))  # path 5-7-9, both directions
    assert step.unsettled == 1  # 7: neither a centre nor a leaf
    assert dict(zip(*step.labels, strict=True)) == {5: 5, 7: 5, 9: 7}
    with pytest.raises(ValueError, match="larger end"):
        small_star(np.array([1]), np.array([2]))


def test_plan_units_cuts_files_into_row_units():
    units, bounds = plan_units([("a", 5), ("b", 0), ("c", 2), ("d", 9)], 4)
    assert bounds == [0, 4, 8, 12, 16]
    assert [[(s.path, s.lo, s.hi) for s in unit] for unit in units] == [
        [("a", 0, 4)],
        [("a", 4, 5), ("c", 0, 2), ("d", 0, 1)],
        [("d", 1, 5)],
        [("d", 5, 9)],
    ]
    assert plan_units([("a", 0)], 4) == ([], [0])


def test_window_pairs_over_ids_and_keys_equal_bucket_pairs():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 6, (400, 3)).astype(np.uint64)
    expected = bucket_pairs(keys, 5)
    # The same buckets as (band, key) records of arbitrary, shuffled ids (ids = 1000 + row).
    band = np.repeat(np.arange(3), 400)
    ids = np.tile(np.arange(400) + 1000, 3)
    order = rng.permutation(len(ids))
    got = unique_pairs(window_pairs([band[order], keys.T.ravel()[order]], ids[order], 5))
    assert np.array_equal(got, expected + 1000)


def test_unique_pairs_take_ids_beyond_32_bits():
    big = 1 << 40
    pairs = np.array([[big + 1, 3], [3, big + 1], [big, big + 2], [3, 4]])
    assert unique_pairs(pairs).tolist() == [[3, 4], [3, big + 1], [big, big + 2]]


def test_shuffle_file_round_trip(tmp_path: Path):
    table = pa.table({"row": np.arange(7), "text": pa.array(list("abcdefg"), pa.large_string())})
    write_routed(str(tmp_path / "f.arrow"), table, np.array([2, 0, 2, 1, 0, 2, 2]), 4)
    assert read_part([str(tmp_path / "f.arrow")], 2).column("text").to_pylist() == ["a", "c", "f", "g"]
    assert read_part([str(tmp_path / "f.arrow")], 3).num_rows == 0
    assert read_part([str(tmp_path / "f.arrow")] * 2, 0).column("row").to_pylist() == [1, 4, 1, 4]


def test_row_counts_are_checked_before_any_work(tmp_path: Path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c"]}), path)
    with pytest.raises(ValueError, match="has 3 rows, not 2"):
        find_caption_duplicates_partitioned([(path, 2)], CaptionDedupConfig(), tmp_path / "w", tmp_path / "o")
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# The whole path on Ray against the oracle.
# ------------------------------------------------------------------------------------------------


def _write_files(folder: Path, captions: list, sizes: list[int], keys: list | None = None) -> list:
    """``captions`` cut into Parquet files of ``sizes`` rows (small row groups): (path, rows) list."""
    assert sum(sizes) == len(captions)
    folder.mkdir(parents=True, exist_ok=True)
    out, lo = [], 0
    for i, size in enumerate(sizes):
        columns = {"caption": pa.array(captions[lo : lo + size], pa.string())}
        if keys is not None:
            columns = {"key": pa.array(keys[lo : lo + size]), **columns}
        path = folder / f"part_{i:03d}.parquet"
        pq.write_table(pa.table(columns), path, row_group_size=300)
        out.append((path, size))
        lo += size
    return out


def _check_equal(tmp_path: Path, captions: list, cfg: CaptionDedupConfig, sizes: list[int], **kwargs) -> dict:
    keys = [f"k{i}" for i in range(len(captions))]
    files = _write_files(tmp_path / "in", captions, sizes, keys)
    oracle = find_caption_duplicates(captions, cfg, keys=pa.array(keys))
    out = tmp_path / "out" / OUTPUT_NAME
    stats = find_caption_duplicates_partitioned(files, cfg, tmp_path / "work", out, **kwargs)
    table = pq.read_table(out)
    assert table.schema == oracle.table.schema
    assert table.equals(oracle.table)
    assert {k: stats[k] for k in COMPARED} == {k: oracle.stats[k] for k in COMPARED}
    assert stats["mode"] == "partitioned" and not any((tmp_path / "work").iterdir())  # shuffle files gone
    return stats


def _with_empties(captions: list, seed: int) -> list:
    captions = list(captions)
    rng = np.random.default_rng(seed)
    for i, value in zip(
        rng.choice(len(captions), 60, replace=False), [None, "", "!!! ...", " "] * 15, strict=True
    ):
        captions[i] = value
    return captions


@pytest.mark.slow
def test_partitioned_equals_in_process_on_planted_captions(tmp_path: Path, ray_local):
    planted = generate(6000, seed=21)
    captions = _with_empties(planted.captions, seed=5)
    cfg = CaptionDedupConfig(batch_size=700)
    stats = _check_equal(tmp_path, captions, cfg, [1000, 0, 1700, 2300, 1000], reducers=3)
    assert stats["units"] == 9 and stats["parts"] == 3 and stats["verified_pairs"] > 500
    assert stats["empty_captions"] == 60 and stats["peak_worker_rss_mb"] > 0


@pytest.mark.slow
def test_partitioned_compares_texts_not_hashes(tmp_path: Path, ray_local):
    """With one bit of text hash every exact reducer gets thousands of different texts on one hash:
    only comparing the texts themselves keeps them apart."""
    planted = generate(3000, seed=8)
    _check_equal(
        tmp_path,
        _with_empties(planted.captions, 2),
        CaptionDedupConfig(batch_size=500),
        [3000],
        reducers=4,
        hash_bits=1,
    )


@pytest.mark.slow
def test_partitioned_huge_buckets(tmp_path: Path, ray_local):
    """2,000 near-identical captions share band keys: buckets far larger than the window, whose
    windowed pairs must be those of the in-process order (nodes by first row)."""
    rng = np.random.default_rng(4)
    near = [f"an identical long product title for a huge bucket number {i % 1500:04d}" for i in range(2000)]
    filler = [" ".join(rng.choice(list(string.ascii_lowercase), 12)) for _ in range(1000)]
    captions = near + filler
    order = rng.permutation(len(captions))
    captions = [captions[i] for i in order]
    cfg = CaptionDedupConfig(batch_size=400, bucket_window=4)
    stats = _check_equal(tmp_path, captions, cfg, [1300, 1700], reducers=3)
    assert stats["exact_duplicate_rows"] >= 500 and stats["candidate_pairs"] > 1500


def _chain(length: int, rng: np.random.Generator) -> list[str]:
    """Captions each one letter away from the previous one (a different letter every step): each
    is a near duplicate of its neighbours, not of the far end of the chain."""
    words = [list("".join(rng.choice(list(string.ascii_lowercase), 8))) for _ in range(12)]
    chain = []
    for step in range(length):
        w, pos = step % 12, step // 12
        words[w][pos] = string.ascii_lowercase[(string.ascii_lowercase.index(words[w][pos]) + 1) % 26]
        chain.append(" ".join("".join(w) for w in words))
    return chain


@pytest.mark.slow
def test_partitioned_chain_across_partitions_iterates(tmp_path: Path, ray_local):
    rng = np.random.default_rng(7)
    chain = _chain(40, rng)
    filler = [
        " ".join("".join(rng.choice(list(string.ascii_lowercase), 6)) for _ in range(8)) for _ in range(1960)
    ]
    captions = filler[:]
    # Chain members spread over every unit, in scrambled order: each node range holds a few.
    slots = np.sort(rng.choice(np.arange(len(filler) + len(chain)), len(chain), replace=False))
    for slot, member in zip(slots, rng.permutation(len(chain)), strict=True):
        captions.insert(int(slot), chain[member])
    oracle = find_caption_duplicates(captions, CaptionDedupConfig())
    chain_rows = [i for i, c in enumerate(captions) if c in set(chain)]
    assert len(set(oracle.labels[chain_rows].tolist())) == 1  # one group, transitively
    cfg = CaptionDedupConfig(batch_size=100)
    stats = _check_equal(tmp_path, captions, cfg, [2000], reducers=5)
    assert stats["cc_rounds"] >= 3


@pytest.mark.slow
def test_partitioned_on_an_embedding_folder_as_the_bundle_calls_it(tmp_path: Path, ray_local):
    """The bundle's input: metadata partitions of an embedding folder in list_partitions order."""
    from pipeline.io.embeddings import IMG_EMB, embedding_path, list_partitions, load_metadata, metadata_path

    planted = generate(2500, seed=3)
    captions = _with_empties(planted.captions, 9)
    folder, lo = tmp_path / "emb", 0
    for name, size in (("2", 900), ("10", 700), ("1", 0), ("3", 900)):  # natural order: 1, 2, 3, 10
        path = embedding_path(folder, IMG_EMB, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.zeros((size, 4), np.float16))
        metadata_path(folder, name).parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "key": [f"{name}-{i}" for i in range(size)],
            "caption": pa.array(captions[lo : lo + size], pa.string()),
        }
        pq.write_table(pa.table(meta), metadata_path(folder, name))
        lo += size
    meta = load_metadata(folder, ["key", "caption"])
    oracle = find_caption_duplicates(meta.column("caption"), CaptionDedupConfig(), keys=meta.column("key"))
    partitions = [(metadata_path(folder, p.name), p.num_rows()) for p in list_partitions(folder)]
    out = tmp_path / OUTPUT_NAME
    cfg = CaptionDedupConfig(batch_size=600)
    stats = find_caption_duplicates_partitioned(partitions, cfg, tmp_path / "work", out)
    assert pq.read_table(out).equals(oracle.table)
    assert {k: stats[k] for k in COMPARED} == {k: oracle.stats[k] for k in COMPARED}


@pytest.mark.slow
def test_partitioned_row_numbers_and_no_rows(tmp_path: Path, ray_local):
    planted = generate(1200, seed=6)
    files = _write_files(tmp_path / "in", planted.captions, [500, 700])
    oracle = find_caption_duplicates(planted.captions, CaptionDedupConfig())
    out = tmp_path / "a.parquet"
    cfg = CaptionDedupConfig(batch_size=300)
    find_caption_duplicates_partitioned(files, cfg, tmp_path / "w", out, key_col=None)
    assert pq.read_table(out).equals(oracle.table)  # keys: the row numbers
    none = _write_files(tmp_path / "none", [], [0])
    stats = find_caption_duplicates_partitioned(none, cfg, tmp_path / "w", tmp_path / "b.parquet")
    table = pq.read_table(tmp_path / "b.parquet")
    assert table.num_rows == 0 and table.schema.names == [
        "key",
        "group_id",
        "group_size",
        "normalized_caption",
    ]
    assert stats["rows"] == 0 and stats["groups"] == 0


@pytest.mark.slow
def test_stage_runs_partitioned_from_ray_min_rows(tmp_path: Path, ray_local):
    planted = generate(1500, seed=12)
    folder = tmp_path / "parts"
    _write_files(folder, _with_empties(planted.captions, 1), [600, 900], [f"r{i}" for i in range(1500)])
    base = CaptionDedupConfig(input=str(folder), report=False, batch_size=400)
    big = run_caption_dedup(dataclasses.replace(base, out=str(tmp_path / "p"), ray_min_rows=1000))
    small = run_caption_dedup(dataclasses.replace(base, out=str(tmp_path / "i")))
    assert big["mode"] == "partitioned" and small["mode"] == "in-process"
    assert pq.read_table(tmp_path / "p" / OUTPUT_NAME).equals(pq.read_table(tmp_path / "i" / OUTPUT_NAME))
    assert json.loads((tmp_path / "p" / SUMMARY_NAME).read_text())["groups"] == small["groups"]
    assert not (tmp_path / "p" / WORK_NAME).exists()
