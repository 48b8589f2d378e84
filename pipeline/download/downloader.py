"""Download a URL list into img2dataset webdataset shards, then count what came back.

img2dataset fetches, resizes and writes ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``.
This module chooses its arguments: the input format and the URL/caption columns are detected from
the file when the config leaves them unset, and other plain columns of the input are kept in the
shards. Afterwards the ``_stats.json`` files give successes and failures by kind.

Resuming is img2dataset's own ``incremental`` mode: a shard whose ``_stats.json`` exists is not
downloaded again. A download that finished every shard leaves a done marker (``OUT/.download/``)
with the fingerprint of the URL list (its files' sizes and mtimes) and of the options, and the
signatures of the shards it wrote; a re-run that finds them all unchanged does not start img2dataset
at all. img2dataset takes *every* ``*.json`` in the output folder for shard stats, so a foreign JSON
file there is refused before anything runs (the marker lives in a sub-folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray

from pipeline.core.config import DownloadConfig, result_options
from pipeline.core.ray_runtime import ensure_ray
from pipeline.core.stage import seconds_since
from pipeline.core.storage import DoneMarkers, fingerprint
from pipeline.io.shards import list_shards

log = logging.getLogger(__name__)

# img2dataset's input formats; each is also the file suffix that names it.
INPUT_FORMATS = (
    "csv.gz",
    "tsv.gz",
    "jsonl.gz",
    "json.gz",
    "txt.gz",
    "parquet",
    "jsonl",
    "json",
    "csv",
    "tsv",
    "txt",
)
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
DISTRIBUTORS = ("multiprocessing", "ray")
INCREMENTAL_MODES = ("incremental", "overwrite", "extend")

# Header names tried in order, case-insensitively (LAION uses URL and TEXT).
URL_COLUMN_NAMES = ("url", "image_url", "img_url", "imageurl", "photo_url", "link", "src")
CAPTION_COLUMN_NAMES = ("caption", "text", "alt", "alt_text", "title", "description", "prompt")
# Columns img2dataset writes itself; an input column of the same name cannot be kept.
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)
STATS_SUFFIX = "_stats.json"
#: img2dataset's console output (progress bars, per-worker stats) under ``DONE_DIR``, unless verbose.
CONSOLE_LOG = "img2dataset.log"
#: The done marker's folder under the output folder (img2dataset reads every top-level *.json).
DONE_DIR = ".download"
DOWNLOAD_SCHEMA_VERSION = 1

# Failure kinds: the first whose marker occurs in img2dataset's error message (lower-cased) wins.
_HTTP_ERROR = re.compile(r"http error (\d{3})")
_ERROR_KINDS = (
    ("timeout", ("timed out",)),
    (
        "dns",
        (
            "name or service not known",
            "name resolution",
            "no address associated",
            "nodename nor servname",
            "getaddrinfo failed",
        ),
    ),
    ("connection_refused", ("connection refused",)),
    ("connection_reset", ("connection reset", "remote end closed", "connection aborted")),
    ("ssl", ("ssl", "certificate")),
    ("not_an_image", ("image decoding error",)),
    ("robots_disallowed", ("x-robots-tag",)),
    ("hash_mismatch", ("hash mismatch",)),
    ("filtered_by_size", ("image too small", "image area too large", "aspect ratio too large")),
)


@dataclass(frozen=True)
class UrlListLayout:
    """What img2dataset must be told about a URL list: its format and which columns to use."""

    path: Path
    input_format: str
    url_col: str
    caption_col: str | None
    extra_columns: tuple[str, ...]


def format_of(path: Path) -> str | None:
    """img2dataset input format named by a file's suffix, or None."""
    name = path.name.lower()
    return next((fmt for fmt in INPUT_FORMATS if name.endswith("." + fmt)), None)


def _input_files(path: Path, input_format: str | None) -> tuple[str, list[Path]]:
    """The format and the files img2dataset will read (a folder: every file of that format)."""
    if path.is_file():
        fmt = input_format or format_of(path)
        if fmt is None:
            raise ValueError(
                f"cannot tell the format of {path} from its suffix; set --input-format "
                f"({', '.join(INPUT_FORMATS)})"
            )
        return fmt, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"URL list {path} does not exist")
    if input_format is None:
        found = sorted({f for p in path.iterdir() if p.is_file() and (f := format_of(p))})
        if len(found) != 1:
            what = f"several formats ({', '.join(found)})" if found else "no URL list files"
            raise ValueError(f"folder {path} holds {what}; set --input-format")
        input_format = found[0]
    files = sorted(path.glob(f"*.{input_format}"))  # the same glob img2dataset uses
    if not files:
        raise ValueError(f"folder {path} has no *.{input_format} files")
    return input_format, files


def _read_schema(path: Path, fmt: str) -> pa.Schema:
    """Column names and types from the start of the file, without reading all of it."""
    base = fmt.removesuffix(".gz")
    try:
        if base == "parquet":
            return pq.read_schema(path)
        if base in ("csv", "tsv"):
            options = pacsv.ParseOptions(delimiter="\t" if base == "tsv" else ",")
            with pacsv.open_csv(path, parse_options=options) as reader:
                return reader.schema
        if base == "jsonl":
            with pajson.open_json(path) as reader:
                return reader.schema
        if base == "json":
            import pandas as pd  # only for a JSON array file, which pyarrow cannot read

            return pa.Schema.from_pandas(pd.read_json(path), preserve_index=False)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ValueError(f"cannot read {path} as {fmt}: {exc}") from exc
    return pa.schema([("url", pa.string())])  # txt: one URL per line, no header


def _pick_column(
    columns: tuple[str, ...], given: str | None, candidates: tuple[str, ...], what: str, source: Path
) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{what} column {given!r} is not in {source}; its columns: {', '.join(columns)}")
        return given
    by_lower: dict[str, list[str]] = {}
    for name in columns:
        by_lower.setdefault(name.lower(), []).append(name)
    for candidate in candidates:
        matches = by_lower.get(candidate, [])
        if len(matches) > 1:
            raise ValueError(
                f"{source} has several {what} columns ({', '.join(matches)}); choose one with --{what}-col"
            )
        if matches:
            return matches[0]
    return None


def _json_safe(kind: pa.DataType) -> bool:
    """Whether values of this type survive img2dataset's json.dumps of the sample metadata."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _json_safe(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_json_safe(kind.field(i).type) for i in range(kind.num_fields))
    return any(
        check(kind)
        for check in (
            pa.types.is_null,
            pa.types.is_boolean,
            pa.types.is_integer,
            pa.types.is_floating,
            pa.types.is_string,
            pa.types.is_large_string,
        )
    )


def _extra_columns(
    schema: pa.Schema, chosen: set[str], requested: str | None, source: Path
) -> tuple[str, ...]:
    if requested is None:
        return tuple(
            f.name
            for f in schema
            if f.name not in chosen
            and f.name not in RESERVED_COLUMNS
            and not f.name.startswith("__index_level_")
            and _json_safe(f.type)
        )
    names = tuple(n.strip() for n in requested.split(",") if n.strip())
    for name in names:
        if name not in schema.names:
            raise ValueError(
                f"extra column {name!r} is not in {source}; its columns: {', '.join(schema.names)}"
            )
        if name in RESERVED_COLUMNS or name in chosen:
            raise ValueError(f"extra column {name!r} clashes with a column img2dataset writes itself")
        if not _json_safe(schema.field(name).type):
            raise ValueError(
                f"extra column {name!r} has type {schema.field(name).type}, which cannot be "
                "stored in the samples' JSON; keep numbers, strings, booleans and lists of them"
            )
    return names


def inspect_url_list(cfg: DownloadConfig) -> UrlListLayout:
    """Format and columns of ``cfg.url_list`` (of its first file, for a folder); clear errors if unusable."""
    path = Path(cfg.url_list)
    fmt, files = _input_files(path, cfg.input_format)
    first = files[0]
    schema = _read_schema(first, fmt)
    columns = tuple(schema.names)
    if fmt.startswith("txt"):
        if cfg.caption_col is not None or cfg.url_col not in (None, "url"):
            raise ValueError(f"{first} is a plain list of URLs: it has no columns to choose")
        return UrlListLayout(path, fmt, "url", None, ())
    url_col = _pick_column(columns, cfg.url_col, URL_COLUMN_NAMES, "url", first)
    if url_col is None:
        raise ValueError(
            f"no URL column found in {first}; its columns: {', '.join(columns)}. Name it with --url-col"
        )
    caption_col = _pick_column(columns, cfg.caption_col, CAPTION_COLUMN_NAMES, "caption", first)
    if caption_col is None:
        log.warning(
            "no caption column found in %s (columns: %s); samples get no captions", first, ", ".join(columns)
        )
    if caption_col == url_col:
        raise ValueError(f"the URL and caption columns are both {url_col!r}")
    if fmt != "parquet":
        # img2dataset reads every column of a text format and renames the chosen ones to url/caption.
        for target, chosen in (("url", url_col), ("caption", caption_col)):
            if chosen is not None and chosen != target and target in columns:
                raise ValueError(
                    f"{first} has a column named {target!r} besides the chosen {chosen!r}; "
                    "img2dataset cannot rename one onto the other. Drop or rename it"
                )
    chosen = {url_col} | ({caption_col} if caption_col else set())
    extra = _extra_columns(schema, chosen, cfg.extra_columns, first)
    return UrlListLayout(path, fmt, url_col, caption_col, extra)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"download.{name} must be one of {', '.join(choices)}; got {value!r}")


def validate(cfg: DownloadConfig) -> None:
    """Refuse a config img2dataset would fail on late or obscurely."""
    if not cfg.url_list or not cfg.out:
        raise ValueError("download.url_list and download.out are required")
    if cfg.input_format is not None:
        _check_choice("input_format", cfg.input_format, INPUT_FORMATS)
    _check_choice("resize_mode", cfg.resize_mode, RESIZE_MODES)
    _check_choice("encode_format", cfg.encode_format, ENCODE_FORMATS)
    _check_choice("distributor", cfg.distributor, DISTRIBUTORS)
    _check_choice("incremental_mode", cfg.incremental_mode, INCREMENTAL_MODES)
    for name in ("image_size", "number_sample_per_shard", "processes_count", "thread_count", "timeout"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"download.{name} must be at least 1; got {getattr(cfg, name)}")
    quality_range = (0, 9) if cfg.encode_format == "png" else (0, 100)
    if not quality_range[0] <= cfg.encode_quality <= quality_range[1]:
        raise ValueError(
            f"download.encode_quality must be within {quality_range} for {cfg.encode_format} "
            f"(for png it is the compression level); got {cfg.encode_quality}"
        )
    if cfg.retries < 0:
        raise ValueError(f"download.retries must be 0 or more; got {cfg.retries}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(
            p.name for p in out.glob("*.json") if not re.fullmatch(r"\d+" + STATS_SUFFIX, p.name)
        )
        if foreign:
            raise ValueError(
                f"output folder {out} holds {', '.join(foreign)}; img2dataset would read every "
                "*.json there as a shard's stats. Move them or choose another --out"
            )


def error_kind(message: str) -> str:
    """A short, countable kind for one of img2dataset's error messages (``http_404``, ``timeout``...)."""
    text = message.lower()
    if match := _HTTP_ERROR.search(text):
        return f"http_{match.group(1)}"
    return next((kind for kind, markers in _ERROR_KINDS if any(m in text for m in markers)), "other")


def _stats_versions(out: Path) -> dict[str, int]:
    """Shard name -> mtime of its stats file: a shard counts as downloaded by a run if this changed."""
    if not out.is_dir():
        return {}
    return {p.name.removesuffix(STATS_SUFFIX): p.stat().st_mtime_ns for p in out.glob("*" + STATS_SUFFIX)}


def summarize_shards(out: str | Path) -> dict[str, Any]:
    """Totals over every finished shard in ``out``, from img2dataset's ``NNNNN_stats.json`` files.

    A shard with a tar or parquet but no stats file was cut off mid-way; it is listed under
    ``incomplete_shards`` and a re-run in incremental mode downloads it again.
    """
    shards = list_shards(out)
    totals: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    incomplete = []
    for shard in shards:
        if shard.stats is None:
            incomplete.append(shard.name)
            continue
        stats = json.loads(shard.stats.read_text())
        for field in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[field] += int(stats.get(field, 0))
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                kinds[error_kind(message)] += int(n)
    return {
        "shards": len(shards) - len(incomplete),
        "incomplete_shards": incomplete,
        "urls": totals["count"],
        "successes": totals["successes"],
        "failures": totals["count"] - totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "failures_by_kind": dict(sorted(kinds.items())),
    }


def url_list_signature(cfg: DownloadConfig) -> list[list[Any]]:
    """Name, size and mtime of each file of the URL list: what the download's marker says it read."""
    _, files = _input_files(Path(cfg.url_list), cfg.input_format)
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def _shard_signatures(out: Path) -> dict[str, Any]:
    try:
        return {shard.name: shard.signature() for shard in list_shards(out)}
    except FileNotFoundError:  # no folder or no shard yet
        return {}


def run_download(cfg: DownloadConfig, *, source: Any = None) -> dict[str, Any]:
    """Download ``cfg.url_list`` into webdataset shards in ``cfg.out`` and summarise the whole folder.

    With ``distributor='ray'`` a Ray session must be up: img2dataset then runs one Ray task per
    shard (``processes_count`` is ignored, and a failed shard is not retried within the run).

    In ``incremental`` mode, a folder whose last download finished every shard, from the same URL
    list and options, with every shard unchanged since, is reported from its marker (``up_to_date``)
    without starting img2dataset.

    Args:
        cfg (`DownloadConfig`): the download's options.
        source (*optional*): what the URL list is made from, for the marker, when the list itself is
            regenerated on each run (the demo's carries a new server port each time); by default the
            list files' names, sizes and mtimes.
    """
    started = time.monotonic()
    validate(cfg)
    layout = inspect_url_list(cfg)
    out = Path(cfg.out)
    inputs = {
        "schema": DOWNLOAD_SCHEMA_VERSION,
        "options": result_options(cfg),
        "columns": [layout.input_format, layout.url_col, layout.caption_col, list(layout.extra_columns)],
        "source": url_list_signature(cfg) if source is None else source,
    }
    markers = DoneMarkers(out / DONE_DIR, fingerprint(inputs))
    done = markers.read("download") if cfg.incremental_mode == "incremental" else None
    if done is not None and done.get("shards") == _shard_signatures(out):
        log.info("download: up to date (%d shards)", len(done["shards"]))
        return {
            **done["summary"],
            "shards_downloaded": 0,
            "shards_skipped": len(done["shards"]),
            "up_to_date": True,
            "seconds": seconds_since(started),
        }
    markers.path("download").unlink(missing_ok=True)  # the shards are about to change
    summary = _download(cfg, layout)
    if not summary["incomplete_shards"]:
        markers.write("download", {"summary": summary, "shards": _shard_signatures(out)})
    return {**summary, "up_to_date": False, "seconds": seconds_since(started)}


def _download(cfg: DownloadConfig, layout: UrlListLayout) -> dict[str, Any]:
    """Run img2dataset; the folder's summary, with how many shards this run wrote."""
    out = Path(cfg.out)
    if cfg.distributor == "ray":
        ensure_ray()  # a job's lazy session starts now, with work to do
        if not ray.is_initialized():
            raise ValueError(
                "distributor 'ray' needs a Ray session (see pipeline.core.ray_runtime.ray_session)"
            )
    before = _stats_versions(out)
    # albumentations (imported by img2dataset's resizer) asks PyPI for updates unless told not to;
    # spawned download processes inherit the setting.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset  # imported here: it pulls in torch and cv2 (seconds) for jobs that never download

    log.info(
        "downloading %s (%s, url=%s, caption=%s, extra=%s) into %s",
        layout.path,
        layout.input_format,
        layout.url_col,
        layout.caption_col,
        ",".join(layout.extra_columns) or "-",
        out,
    )
    console = out / DONE_DIR / CONSOLE_LOG
    with nullcontext() if cfg.img2dataset_console else _console_into(console):
        _img2dataset_download(img2dataset, cfg, layout)
    summary = summarize_shards(out)
    if summary["incomplete_shards"]:
        log.warning(
            "shards %s did not finish; run again to resume them", ", ".join(summary["incomplete_shards"])
        )
    after = _stats_versions(out)
    downloaded = sum(1 for name, version in after.items() if before.get(name) != version)
    log.info(
        "download: %d of %d URLs fetched into %d shard(s)%s",
        summary["successes"],
        summary["urls"],
        summary["shards"],
        ""
        if cfg.img2dataset_console
        else f"; img2dataset's own output in {console} (--verbose shows it here)",
    )
    return {
        "job": "download",
        "out": str(out),
        "input_format": layout.input_format,
        "url_col": layout.url_col,
        "caption_col": layout.caption_col,
        **summary,
        "shards_downloaded": downloaded,
        "shards_skipped": len(after) - downloaded,
    }


@contextmanager
def _console_into(path: Path) -> Iterator[None]:
    """This process's stdout and stderr, and those of the processes it starts, appended to ``path``.

    img2dataset prints its progress bars and per-worker statistics from its own processes, so the
    file descriptors are redirected (for them) as well as ``sys.stdout``/``sys.stderr`` (for this
    process, whose streams need not be file descriptors 1 and 2); the job's console keeps one line.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with path.open("a", encoding="utf-8", buffering=1) as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                with redirect_stdout(sink), redirect_stderr(sink):
                    yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _img2dataset_download(img2dataset: Any, cfg: DownloadConfig, layout: UrlListLayout) -> None:
    img2dataset.download(
        url_list=str(layout.path),
        output_folder=cfg.out,
        input_format=layout.input_format,
        url_col=layout.url_col,
        caption_col=layout.caption_col,
        save_additional_columns=list(layout.extra_columns) or None,
        output_format="webdataset",
        compute_hash="sha256",
        enable_wandb=False,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        skip_reencode=cfg.skip_reencode,
        number_sample_per_shard=cfg.number_sample_per_shard,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        timeout=cfg.timeout,
        retries=cfg.retries,
        distributor=cfg.distributor,
        incremental_mode=cfg.incremental_mode,
    )
