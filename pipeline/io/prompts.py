"""Prompt lists in the layouts people publish them in, read into one table with stable prompt ids.

Accepted: plain text (one prompt per line), a JSON list (of strings, or of objects), JSONL (objects
with a prompt/caption/text field; other fields are kept), CSV/TSV with any delimiter and quoted
fields (e.g. the ``;``-separated memorized-prompt files with a ``Caption`` column), and parquet
(LAION metadata's ``TEXT``). A prompt cell holding a list literal (``['a', 'b']``) yields one prompt
per element. Prompts that normalise to the same text are merged; the id is a hash of that text, so
it is stable across files, orderings and re-runs.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text", "title")
CSV_DELIMITERS = ",;\t|"

PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("occurrences", pa.int32()),
        ("source_rows", pa.list_(pa.int64())),
        ("extra", pa.string()),
    ]
)


class PromptListError(ValueError):
    """A prompt list that cannot be read; the message says what was found and what is accepted."""


def normalize_prompt(text: str) -> str:
    """Unicode NFKC and collapsed whitespace: what makes two prompt lines the same prompt."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of SHA-256 of its normalised text."""
    return hashlib.sha256(normalize_prompt(text).encode("utf-8")).hexdigest()[:16]


def find_prompt_column(columns: Sequence[str], requested: str | None = None) -> str:
    """The prompt column among ``columns``: ``requested`` if given, else the first known name (any case)."""
    if requested is not None:
        if requested not in columns:
            raise PromptListError(
                f"prompt column {requested!r} not found; columns are: {', '.join(map(str, columns))}"
            )
        return requested
    by_lower = {str(c).strip().lower(): c for c in columns}
    for name in PROMPT_COLUMNS:
        if name in by_lower:
            return by_lower[name]
    raise PromptListError(
        f"no prompt column found; columns are: {', '.join(map(str, columns))}. "
        f"Expected one of {', '.join(PROMPT_COLUMNS)} (any case), or pass the column name."
    )


def _sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        header = sample.splitlines()[0] if sample else ""
        counts = {d: header.count(d) for d in CSV_DELIMITERS}
        best = max(counts, key=counts.get)
        return best if counts[best] else ","  # a single column: any delimiter reads it


def _read_table(path: Path) -> pd.DataFrame | list[Any]:
    """Rows of the file as a DataFrame (tabular formats) or a list (plain text / JSON list)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise PromptListError(f"{path.name} line {number}: not JSON ({exc})") from exc
        if rows and all(isinstance(r, dict) for r in rows):
            return pd.DataFrame(rows)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PromptListError(f"{path.name}: not JSON ({exc})") from exc
        if not isinstance(data, list):
            raise PromptListError(f"{path.name}: expected a JSON list of prompts, got {type(data).__name__}")
        if data and all(isinstance(r, dict) for r in data):
            return pd.DataFrame(data)
        return data
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else _sniff_delimiter(text[:65536])
        return pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False)
    if suffix in (".txt", ""):
        return [line for line in text.splitlines() if line.strip()]
    raise PromptListError(
        f"unknown prompt-list layout {path.name!r}: use .txt, .json, .jsonl, .csv, .tsv or .parquet"
    )


def _as_prompts(cell: Any) -> list[str]:
    """A prompt cell as prompts: a string, a list, or a string holding a list literal."""
    if cell is None or (isinstance(cell, float) and pd.isna(cell)):
        return []
    if isinstance(cell, (list, tuple)) or hasattr(cell, "tolist"):
        return [str(c) for c in (cell.tolist() if hasattr(cell, "tolist") else cell)]
    text = str(cell)
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, list):
            return [str(v) for v in value]
    return [text]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and pd.isna(value):
        return None
    return value


def _entries(rows: pd.DataFrame | list[Any], column: str | None) -> Iterable[tuple[int, str, dict[str, Any]]]:
    """(source row, prompt, extra fields) for every prompt in the file, in file order."""
    if isinstance(rows, list):
        for number, item in enumerate(rows):
            if not isinstance(item, str):
                raise PromptListError(f"entry {number} is a {type(item).__name__}, expected a string prompt")
            yield number, item, {}
        return
    name = find_prompt_column([str(c) for c in rows.columns], column)
    extras = [c for c in rows.columns if str(c) != name and not str(c).startswith("Unnamed")]
    for number, record in enumerate(rows.to_dict(orient="records")):
        extra = {str(c): _jsonable(record[c]) for c in extras}
        for prompt in _as_prompts(record[name]):
            yield number, prompt, extra


def read_prompts(path: str | Path, column: str | None = None) -> pa.Table:
    """Read a prompt list into a table with the :data:`PROMPTS_SCHEMA` columns, duplicates merged.

    Args:
        path (`str` or `Path`): the prompt list; its suffix names its layout.
        column (`str`, *optional*): the prompt column of a tabular file (default: detected).

    Raises:
        PromptListError: unknown layout, no prompt column (the message lists the columns), or no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptListError(f"prompt list {path} does not exist")
    merged: dict[str, dict[str, Any]] = {}
    for row, prompt, extra in _entries(_read_table(path), column):
        text = normalize_prompt(prompt)
        if not text:
            continue
        pid = prompt_id(text)
        if pid in merged:
            merged[pid]["source_rows"].append(row)
            merged[pid]["occurrences"] += 1
        else:
            merged[pid] = {
                "prompt_id": pid,
                "prompt": text,
                "occurrences": 1,
                "source_rows": [row],
                "extra": json.dumps(extra, sort_keys=True, default=str),
            }
    if not merged:
        raise PromptListError(f"{path.name}: no prompts found")
    return pa.Table.from_pylist(list(merged.values()), schema=PROMPTS_SCHEMA)
