"""Prompt lists in every published layout: detection, merging, stable ids, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.io.prompts import PromptListError, normalize_prompt, prompt_id, read_prompts


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_text_skips_blank_lines_and_merges_duplicates(tmp_path: Path):
    table = read_prompts(write(tmp_path / "p.txt", "a cat\n\n  a  cat \nA dog on a sofa\n")).to_pylist()
    assert [r["prompt"] for r in table] == ["a cat", "A dog on a sofa"]
    assert table[0]["occurrences"] == 2 and table[0]["source_rows"] == [0, 1]


def test_ids_are_stable_across_layouts(tmp_path: Path):
    txt = read_prompts(write(tmp_path / "p.txt", "Mothers influence on her young hippo\n"))
    jsn = read_prompts(write(tmp_path / "p.json", json.dumps(["Mothers  influence on her young hippo"])))
    assert txt["prompt_id"].to_pylist() == jsn["prompt_id"].to_pylist()
    assert prompt_id("x\u00a0y") == prompt_id("x y")  # NFKC: a no-break space is a space
    assert normalize_prompt("  ﬁne\tart ") == "fine art"


def test_jsonl_keeps_extra_fields_and_finds_the_caption_field(tmp_path: Path):
    lines = [
        {"caption": "first", "index": 7, "url": "http://x/1"},
        {"caption": "second", "index": 9, "url": "u"},
    ]
    table = read_prompts(
        write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    ).to_pylist()
    assert [r["prompt"] for r in table] == ["first", "second"]
    assert json.loads(table[0]["extra"]) == {"index": 7, "url": "http://x/1"}


def test_semicolon_csv_with_quotes_and_an_unnamed_index_column(tmp_path: Path):
    text = ';Caption;URL;type\n0;"A quoted; caption";http://a;VM\n1;Plain one;http://b;TM\n'
    table = read_prompts(write(tmp_path / "p.csv", text)).to_pylist()
    assert [r["prompt"] for r in table] == ["A quoted; caption", "Plain one"]
    assert json.loads(table[1]["extra"]) == {"URL": "http://b", "type": "TM"}


def test_tsv_and_list_literal_cells(tmp_path: Path):
    text = "text\tsource\n\"['one prompt', 'two prompt']\"\tx\nthree prompt\ty\n"
    table = read_prompts(write(tmp_path / "p.tsv", text)).to_pylist()
    assert [r["prompt"] for r in table] == ["one prompt", "two prompt", "three prompt"]
    assert table[1]["source_rows"] == [0]


def test_parquet_with_laion_text_column(tmp_path: Path):
    pd.DataFrame({"URL": ["u1", "u2"], "TEXT": ["laion caption", None]}).to_parquet(tmp_path / "m.parquet")
    table = read_prompts(tmp_path / "m.parquet").to_pylist()
    assert [r["prompt"] for r in table] == ["laion caption"]


def test_unknown_layouts_fail_with_a_clear_message(tmp_path: Path):
    with pytest.raises(PromptListError, match="no prompt column found; columns are: url, score"):
        read_prompts(write(tmp_path / "p.csv", "url,score\nhttp://a,1\n"))
    with pytest.raises(PromptListError, match="unknown prompt-list layout"):
        read_prompts(write(tmp_path / "p.xml", "<prompts/>"))
    with pytest.raises(PromptListError, match="expected a JSON list"):
        read_prompts(write(tmp_path / "p.json", '{"prompt": "x"}'))
    with pytest.raises(PromptListError, match="column 'Prompt' not found"):
        read_prompts(write(tmp_path / "q.csv", "text\nx\n"), column="Prompt")
    with pytest.raises(PromptListError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("sdv1_500_memorized.jsonl", 500),
        ("memorized_laion_prompts.csv", 500),
        ("unmemorized_laion_prompts.csv", 500),
        ("sd1_mem345.txt", 345),
        ("group_nomem500.txt", 500),
    ],
)
def test_published_memorization_prompt_lists(shared_data: Path, name: str, rows: int):
    table = read_prompts(shared_data / "memorized_prompts" / name)
    assert sum(table["occurrences"].to_pylist()) == rows  # every row is accounted for
    assert len(set(table["prompt_id"].to_pylist())) == table.num_rows


def test_the_same_prompts_in_two_layouts_get_the_same_ids(shared_data: Path):
    folder = shared_data / "memorized_prompts"
    jsonl = set(read_prompts(folder / "sdv1_500_memorized.jsonl")["prompt_id"].to_pylist())
    csv_ids = set(read_prompts(folder / "memorized_laion_prompts.csv")["prompt_id"].to_pylist())
    sd1 = set(read_prompts(folder / "sd1_mem345.txt")["prompt_id"].to_pylist())
    assert jsonl == csv_ids
    assert sd1 <= jsonl  # SOURCE.md: all 345 SD v1.4 prompts are among the 500
