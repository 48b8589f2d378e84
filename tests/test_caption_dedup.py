"""Caption dedup: normalisation rules, quality on planted duplicates, the job on LAION metadata (in-process
and partitioned on Ray; the partitioned path itself: test_caption_partitioned.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures.planted_captions import PLANTED_SUFFIXES, generate, pair_scores
from pipeline.core.config import CaptionDedupConfig
from pipeline.dedup.caption import (
    OUTPUT_NAME,
    SUMMARY_NAME,
    find_caption_duplicates,
    read_captions,
    replaces_a_word,
    run_caption_dedup,
)
from pipeline.dedup.text_normalize import STOCK_SUFFIXES, normalize_caption, normalize_captions

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# Normalisation, rule by rule.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        # 1. HTML entities (also double-escaped) and tags
        ("Fish &amp; Chips", "fish chips"),
        ("Tom &amp;amp; Jerry &quot;classic&quot;", "tom jerry classic"),
        ("caf&eacute; &#233;t&#xE9;", "café été"),
        ("<a href='http://x.org/y'>Yale Hospital </a>Ribbon Cutting", "yale hospital ribbon cutting"),
        ("&lt;b&gt;bold&lt;/b&gt; text", "bold text"),
        # 2. Unicode NFKC
        ("Ｆｕｌｌｗｉｄｔｈ ＴＥＸＴ", "fullwidth text"),
        ("ﬁne ligature", "fine ligature"),
        ("no\u00a0break\u2009thin", "no break thin"),
        # 3. case
        ("A RED Car", "a red car"),
        ("ÉCOLE Straße", "école straße"),
        # 4. apostrophes and invisible characters deleted
        ("children's toys", "childrens toys"),
        ("children\u2019s toys", "childrens toys"),
        ("zero\u200bwidth soft\u00adhyphen \ufeffbom", "zerowidth softhyphen bom"),
        ("nul\x00byte", "nulbyte"),
        # 5. whitespace, separators, punctuation -> one space; symbols kept
        ("  red \t car\n\nparked  ", "red car parked"),
        ("red-car, parked: on (the) street!!!", "red car parked on the street"),
        ("Product | Brand ~ Shop", "product brand shop"),
        ("price $10 + €5 ♥ 😀", "price $10 + €5 ♥ 😀"),
        ('3.5" x 2\u2033', "3 5 x 2"),
        # 7. stock-site suffixes at the end, repeatedly
        ("Red car - Stock Photo", "red car"),
        ("Red car royalty free stock image", "red car"),
        ("Red Car - Royalty Free Stock Photo | Shutterstock", "red car"),
        ("Red car stock photo - Download Image Now - iStock", "red car"),
        ("Abstract waves - stock vector", "abstract waves"),
        ("Beach at dawn - Alamy", "beach at dawn"),
        ("Mountain lake Premium Vector", "mountain lake"),
        ("stock photo of a red car", "stock photo of a red car"),  # only at the end
        ("Stock Photo", "stock photo"),  # nothing but a suffix: kept, not emptied
        # empty results and null
        ("!!! ...", ""),
        ("", ""),
        (None, None),
    ],
)
def test_normalisation_rules(raw, normalized):
    assert normalize_caption(raw) == normalized


def test_every_stock_suffix_is_stripped():
    assert isinstance(STOCK_SUFFIXES, tuple) and len(STOCK_SUFFIXES) >= 10
    for suffix in STOCK_SUFFIXES:
        assert normalize_caption(f"A red car {suffix}") == "a red car", suffix
        assert normalize_caption(f"A Red Car. {suffix.upper()}") == "a red car", suffix
    for suffix in PLANTED_SUFFIXES:  # as the planted data appends them
        assert normalize_caption(f"A red car{suffix}") == "a red car", suffix


def test_normalize_captions_column_matches_single():
    texts = ["A  B", None, "Fish &amp; Chips - Stock Photo", "", "Ｘ"]
    assert normalize_captions(texts).to_pylist() == [normalize_caption(t) for t in texts]
    assert (
        normalize_captions(pa.chunked_array([texts[:2], texts[2:]])).to_pylist()
        == normalize_captions(texts).to_pylist()
    )


# ------------------------------------------------------------------------------------------------
# Dedup behaviour.
# ------------------------------------------------------------------------------------------------


def test_word_guard_keeps_meaningful_changes_apart_and_typos_together():
    assert replaces_a_word("a red car parked on the street", "a blue car parked on the street")
    assert replaces_a_word("two cats sleeping in the garden", "three cats sleeping in the garden")
    assert replaces_a_word("acme phone case 2019", "acme phone case 2020")
    assert not replaces_a_word("a red car parked on the street", "a red car parked on the stret")
    assert not replaces_a_word("a red car parked on the street", "a red car parekd on the street")  # swap
    assert not replaces_a_word("tomb raider legend", "tomb raider legend psp")  # an added word
    assert not replaces_a_word("red t shirt", "red tshirt")  # spacing only
    # Unsegmented scripts: one long "word" per caption is left to the Jaccard test.
    assert not replaces_a_word(
        "東京の夜景と赤い車が通りに停まっている写真です", "東京の夜景と赤い車が通りに停まっている写真"
    )


def test_small_example_groups_and_schema():
    captions = [
        "A red car parked on the street",  # 0
        "a red car parked on the street. - Stock Photo",  # 1 exact after normalisation
        "A blue car parked on the street",  # 2 hard negative
        "a red car parked on the stret",  # 3 typo of 0
        None,  # 4 null
        "",  # 5 empty
        "!!!",  # 6 empty after normalisation
        "Portrait of a young woman wearing a green coat",  # 7 singleton
    ]
    keys = pa.array([f"k{i}" for i in range(len(captions))])
    result = find_caption_duplicates(captions, CaptionDedupConfig(), keys=keys)
    table = result.table
    assert table.schema.names == ["key", "group_id", "group_size", "normalized_caption"]
    assert table.schema.field("group_id").type == pa.int64()
    assert table.column("key").to_pylist() == keys.to_pylist()
    groups = table.column("group_id").to_pylist()
    sizes = table.column("group_size").to_pylist()
    assert groups[0] == groups[1] == groups[3] == 0 and sizes[0] == 3
    assert groups[2] == 2 and groups[2] != groups[0]
    # Empty and null captions are never grouped, not even with each other.
    assert groups[4:7] == [4, 5, 6] and sizes[4:7] == [1, 1, 1]
    assert groups[7] == 7 and sizes[7] == 1
    assert table.column("normalized_caption").to_pylist()[1] == "a red car parked on the street"
    assert result.stats["empty_captions"] == 3
    assert result.stats["rows"] == len(captions)
    assert result.stats["exact_duplicate_rows"] == 1


def test_degenerate_inputs():
    none = find_caption_duplicates([None, "", " ", "?!"])
    assert none.table.column("group_id").to_pylist() == [0, 1, 2, 3]
    assert none.stats["empty_captions"] == 4 and none.stats["candidate_pairs"] == 0
    empty = find_caption_duplicates([])
    assert empty.table.num_rows == 0 and empty.table.schema.names[0] == "key"
    with pytest.raises(ValueError, match="threshold must be in"):
        find_caption_duplicates(["a"], CaptionDedupConfig(threshold=1.5))
    with pytest.raises(ValueError, match="shingle_size"):
        find_caption_duplicates(["a"], CaptionDedupConfig(shingle_size=20))


def test_precision_and_recall_on_planted_duplicates():
    planted = generate(20_000, seed=11)
    assert {"base", "variant", "typo", "negative"} <= set(planted.kind)
    result = find_caption_duplicates(planted.captions, CaptionDedupConfig())
    scores = pair_scores(planted.family, result.labels)
    assert scores["true_pairs"] > 10_000
    assert scores["precision"] >= 0.95, scores
    assert scores["recall"] >= 0.90, scores
    # Every group member really is one of the planted family's, for almost every row.
    assert result.stats["rejected_word_substitution"] > 0
    # Without the word guard the hard negatives chain template captions together.
    loose = find_caption_duplicates(
        planted.captions, dataclasses.replace(CaptionDedupConfig(), word_guard=False)
    )
    assert pair_scores(planted.family, loose.labels)["precision"] < scores["precision"]


def test_hard_negatives_only_differ_in_one_word():
    planted = generate(3000, seed=4)
    kinds = np.array(planted.kind)
    assert (kinds == "negative").sum() > 100
    result = find_caption_duplicates(planted.captions, CaptionDedupConfig())
    labels = result.labels
    # A hard-negative base is almost never merged with another family.
    neg = np.flatnonzero(kinds == "negative")
    merged = sum(len(set(planted.family[labels == labels[i]].tolist())) > 1 for i in neg)
    assert merged / len(neg) < 0.05


def test_results_do_not_depend_on_batch_size():
    planted = generate(3000, seed=8)
    b = find_caption_duplicates(planted.captions, CaptionDedupConfig(batch_size=5000))
    c = find_caption_duplicates(planted.captions, CaptionDedupConfig(batch_size=450))
    assert c.table.equals(b.table)


def test_pair_scores_count_like_enumeration():
    import itertools

    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 8, 80), rng.integers(0, 6, 80)
    pairs = list(itertools.combinations(range(80), 2))
    true_pairs = {(i, j) for i, j in pairs if truth[i] == truth[j]}
    pred_pairs = {(i, j) for i, j in pairs if predicted[i] == predicted[j]}
    scores = pair_scores(truth, predicted)
    assert scores["correct_pairs"] == len(true_pairs & pred_pairs)
    assert scores["precision"] == pytest.approx(len(true_pairs & pred_pairs) / len(pred_pairs))
    assert scores["recall"] == pytest.approx(len(true_pairs & pred_pairs) / len(true_pairs))


# ------------------------------------------------------------------------------------------------
# Input handling and the job.
# ------------------------------------------------------------------------------------------------


def test_missing_caption_column_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"url": ["u1"], "description": ["a cat"]}), path)
    with pytest.raises(
        ValueError, match=r"no caption column .*looked for caption, TEXT, text; columns are: url, description"
    ):
        read_captions(path)
    with pytest.raises(ValueError, match=r"caption column 'alt' not in .* columns are: url, description"):
        read_captions(path, caption_col="alt")
    assert read_captions(path, caption_col="description")[1].to_pylist() == ["a cat"]
    with pytest.raises(ValueError, match="key column 'id' not in"):
        read_captions(path, caption_col="description", key_col="id")


def test_folder_input_key_column_and_row_order(tmp_path: Path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["b1", "b2"], "caption": ["A dog", "a cat"]}), folder / "b.parquet")
    pq.write_table(pa.table({"key": ["a1", "a2"], "caption": ["A CAT!", None]}), folder / "a.parquet")
    (folder / "_SUCCESS.parquet").write_text("not parquet")  # ignored: hidden/underscore names
    out = tmp_path / "out"
    summary = run_caption_dedup(CaptionDedupConfig(input=str(folder), out=str(out)))
    table = pq.read_table(out / OUTPUT_NAME)
    assert table.column("key").to_pylist() == ["a1", "a2", "b1", "b2"]  # files by name, rows in order
    assert table.column("group_id").to_pylist() == [0, 1, 2, 0]
    assert table.column("group_size").to_pylist() == [2, 1, 1, 2]
    assert summary["rows"] == 4 and summary["empty_captions"] == 1 and summary["key_col"] == "key"
    assert json.loads((out / SUMMARY_NAME).read_text())["rows"] == 4


def _run_job(argv: list[str]) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dedup_captions_job", REPO / "jobs" / "dedup_captions.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(REPO / "jobs"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "jobs"))
    return module.main(argv)


def test_job_on_real_laion_metadata(shared_data: Path, tmp_path: Path):
    source = shared_data / "peer_samples" / "img2dataset" / "test_1000.parquet"
    summary = _run_job(["--input", str(source), "--out", str(tmp_path)])
    assert summary["rows"] == 1000 and summary["caption_col"] == "TEXT" and summary["mode"] == "in-process"
    table = pq.read_table(tmp_path / OUTPUT_NAME)
    texts = pq.read_table(source, columns=["TEXT"]).column("TEXT").to_pylist()
    assert table.num_rows == 1000
    assert table.column("key").to_pylist() == list(range(1000))  # no key column: row numbers
    groups = table.column("group_id").to_numpy()
    sizes = table.column("group_size").to_numpy()
    dup_rows = np.flatnonzero(sizes > 1)
    found = {}
    for row in dup_rows:
        found.setdefault(int(groups[row]), []).append(texts[row])
    # The real duplicates in this sample: an exact one and a near one (an added platform word).
    assert sorted(sorted(v) for v in found.values()) == [
        ["Patent Drawing", "Patent Drawing"],
        ["Tomb Raider: Legend", "Tomb Raider: Legend (PSP)"],
    ]
    assert summary["exact_duplicate_rows"] == 1 and summary["verified_pairs"] == 1
    assert summary["removable_rows"] == 2 and summary["groups"] == 998
    # Group ids are the first row of each group.
    assert all(groups[r] == min(np.flatnonzero(groups == groups[r])) for r in dup_rows)


@pytest.mark.slow
def test_job_on_ray_matches_in_process(shared_data: Path, tmp_path: Path, ray_local):
    source = shared_data / "peer_samples" / "img2dataset" / "test_1000.parquet"
    on_ray = _run_job(
        ["--input", str(source), "--out", str(tmp_path / "ray"), "--ray-min-rows", "0", "--batch-size", "300"]
    )
    local = _run_job(["--input", str(source), "--out", str(tmp_path / "local")])
    assert on_ray["mode"] == "partitioned" and local["mode"] == "in-process"
    assert pq.read_table(tmp_path / "ray" / OUTPUT_NAME).equals(
        pq.read_table(tmp_path / "local" / OUTPUT_NAME)
    )


@pytest.mark.slow
def test_job_missing_caption_column_exits_with_message(tmp_path: Path):
    import subprocess
    import sys

    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"URL": ["u"], "alt": ["x"]}), path)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "dedup_captions.py"),
            "--input",
            str(path),
            "--out",
            str(tmp_path / "o"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no caption column" in proc.stderr and "columns are: URL, alt" in proc.stderr
