"""Reading img2dataset output: one shard = ``NNNNN.tar`` (+ ``NNNNN.parquet`` + ``NNNNN_stats.json``).

The reader never raises on bad data. It turns a shard into raw sample rows (image bytes, caption,
metadata) and records what went wrong per row, so the decode stage can account for every sample:

* samples are read from the tar in order; a tar cut off mid-way yields every complete sample before
  the break and one row for the broken sample;
* img2dataset's parquet lists the URLs that failed to download; they become rows too, with the
  download error, so rows seen = URLs in the shard's input;
* shards from other tools (a tar with no parquet, no captions) read the same way.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Reasons a row is rejected before any decoding; the decode stage adds image-level reasons.
READ_TRUNCATED_TAR = "truncated_tar"
READ_DOWNLOAD_FAILED = "download_failed"
READ_MISSING_FROM_TAR = "missing_from_tar"
READ_UNREADABLE_SHARD = "unreadable_shard"


@dataclass(frozen=True)
class Shard:
    """The files of one img2dataset output shard; ``tar`` or ``parquet`` may be missing."""

    name: str
    tar: Path | None
    parquet: Path | None
    stats: Path | None

    def signature(self) -> dict[str, Any]:
        """Sizes and mtimes of the shard's files, so a changed shard is never taken as done."""
        sig = {}
        for label, path in (("tar", self.tar), ("parquet", self.parquet)):
            if path is not None and path.exists():
                st = path.stat()
                sig[label] = [st.st_size, st.st_mtime_ns]
        return sig


def list_shards(folder: str | Path) -> list[Shard]:
    """Every shard in ``folder``, sorted by name. A shard is a ``.tar``, or a ``.parquet`` with no tar."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} does not exist")
    tars = {p.stem: p for p in folder.glob("*.tar")}
    parquets = {p.stem: p for p in folder.glob("*.parquet")}
    names = sorted(set(tars) | set(parquets))
    if not names:
        raise FileNotFoundError(f"no shards (*.tar or *.parquet) in {folder}")
    shards = []
    for name in names:
        stats = folder / f"{name}_stats.json"
        shards.append(Shard(name, tars.get(name), parquets.get(name), stats if stats.exists() else None))
    return shards


@dataclass
class TarSample:
    """The files of one sample in a webdataset tar, keyed by extension."""

    key: str
    files: dict[str, bytes]
    error: str | None = None


def _split_member_name(name: str) -> tuple[str, str]:
    """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``); the key is everything before the first dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_samples(path: Path) -> Iterator[TarSample]:
    """Samples of a webdataset tar in order; a broken tail yields one sample carrying the error.

    Files of one sample sit next to each other in a webdataset tar, so a sample is complete when
    the next key starts. When the tar breaks, the sample being read is the broken one.
    """
    current: TarSample | None = None
    try:
        if path.stat().st_size == 0:
            return
        with tarfile.open(path, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, ext = _split_member_name(member.name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key=key, files={})
                fh = archive.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        reason = f"{READ_TRUNCATED_TAR}: tar unreadable from this sample on ({exc})"
        if current is None:
            current = TarSample(key="", files={})
        current.error = reason
    if current is not None:
        yield current


def _read_parquet_rows(path: Path | None) -> tuple[dict[str, dict[str, Any]], str | None]:
    if path is None:
        return {}, None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        return {}, f"unreadable parquet {path.name}: {exc}"
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row.get("key")
        if key is not None:
            by_key[str(key)] = row
    return by_key, None


def _decode_caption(data: bytes | None) -> tuple[str, str | None]:
    if data is None:
        return "", "no caption file"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), "caption is not valid UTF-8; replaced bad bytes"


def _parse_json(data: bytes | None) -> tuple[dict[str, Any], str | None]:
    if data is None:
        return {}, None
    try:
        meta = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError as exc:
        return {}, f"malformed json ignored ({exc})"
    if not isinstance(meta, dict):
        return {}, "json is not an object; ignored"
    return meta, None


def _image_file(files: dict[str, bytes]) -> tuple[bytes | None, str]:
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            return files[ext], ext
    return None, ""


def raw_row(
    shard: str,
    key: str,
    *,
    image: bytes | None = None,
    image_ext: str = "",
    caption: str = "",
    url: str = "",
    read_error: str | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """One row handed from the reader to the decode stage."""
    return {
        "key": key,
        "shard": shard,
        "image": image,
        "image_ext": image_ext,
        "caption": caption,
        "url": url,
        "read_error": read_error,
        "warning": "; ".join(w for w in (warnings or []) if w) or None,
    }


def read_shard(shard: Shard) -> list[dict[str, Any]]:
    """All raw rows of one shard: its tar samples, then parquet rows the tar does not hold."""
    parquet_rows, parquet_problem = _read_parquet_rows(shard.parquet)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    if shard.tar is not None:
        for sample in iter_tar_samples(shard.tar):
            key = sample.key or f"{shard.name}:broken-tail"
            seen.add(key)
            meta, json_warning = _parse_json(sample.files.get("json"))
            caption, caption_warning = _decode_caption(sample.files.get("txt"))
            image, ext = _image_file(sample.files)
            source = parquet_rows.get(key, {})
            url = str(meta.get("url") or source.get("url") or "")
            rows.append(
                raw_row(
                    shard.name,
                    key,
                    image=image,
                    image_ext=ext,
                    caption=caption,
                    url=url,
                    read_error=sample.error,
                    warnings=[json_warning, caption_warning, parquet_problem],
                )
            )
    for key, source in sorted(parquet_rows.items()):
        if key in seen:
            continue
        status = source.get("status")
        if status == "success":
            error = f"{READ_MISSING_FROM_TAR}: listed as downloaded but not in the tar"
        else:
            error = f"{READ_DOWNLOAD_FAILED}: {source.get('error_message') or status or 'unknown error'}"
        rows.append(
            raw_row(
                shard.name,
                key,
                caption=str(source.get("caption") or ""),
                url=str(source.get("url") or ""),
                read_error=error,
            )
        )
    if not rows and shard.tar is None and parquet_problem:
        error = f"{READ_UNREADABLE_SHARD}: {parquet_problem}"
        rows.append(raw_row(shard.name, f"{shard.name}:unreadable", read_error=error))
    for row in rows:
        row["shard_rows"] = len(rows)
    return rows
