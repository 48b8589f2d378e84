"""Reading img2dataset output: one shard = ``NNNNN.tar`` (+ ``NNNNN.parquet`` + ``NNNNN_stats.json``).

A shard is complete only once img2dataset has written its ``_stats.json`` (it writes the tar and the
parquet in place and the stats file last): :func:`complete_shards` sets the others aside, and the
stages that read shards check each one again after reading it (:func:`check_after_read`): it must
not have changed meanwhile, and the rows read must equal the stats file's ``count`` (every URL of
the shard's input). Shards written by other tools have no stats file; ``require_stats=False``
accepts them.

The reader never raises on bad data. It turns a shard into raw sample rows (image bytes, caption,
metadata) and records what went wrong per row, so the decode stage can account for every sample:

* samples are read from the tar in order; a tar cut off mid-way yields every complete sample before
  the break and one row for the broken sample;
* no member is read into memory unless it is an ordinary file of at most ``max_member_bytes``: a
  larger member or a sparse one (a few KB on disk that expand to gigabytes) rejects its sample;
* every member ends up in exactly one row: a key met again after its sample ended, or a file that
  repeats within a sample, becomes its own rejected row (``duplicate_key``; the first one is kept),
  and keys that look like path traversal (``..`` parts, absolute, backslashes) are rejected as
  ``bad_key``; plain directory prefixes (``part/000001.jpg``) are webdataset keys and stay;
* img2dataset's parquet lists the URLs that failed to download; they become rows too, with the
  download error, so rows seen = URLs in the shard's input;
* shards from other tools (a tar with no parquet, no captions) read the same way.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.core.stage import Commit

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
STATS_SUFFIX = "_stats.json"

#: Largest tar member read into memory (the stages' ``max_member_bytes`` default).
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024

# Reasons a row is rejected before any decoding; the decode stage adds image-level reasons.
READ_TRUNCATED_TAR = "truncated_tar"
READ_DOWNLOAD_FAILED = "download_failed"
READ_MISSING_FROM_TAR = "missing_from_tar"
READ_UNREADABLE_SHARD = "unreadable_shard"
READ_MEMBER_TOO_LARGE = "member_too_large"
READ_SPARSE_MEMBER = "sparse_member"
READ_DUPLICATE_KEY = "duplicate_key"
READ_BAD_KEY = "bad_key"

#: ``a`` met again in a tar becomes the rejected row ``a:duplicate-1`` (keys stay unique per shard).
DUPLICATE_SEPARATOR = ":duplicate-"

# Why a whole shard is left for a later run after it was read (see :func:`check_after_read`).
SHARD_CHANGED_DURING_READ = "changed_during_read"
SHARD_STATS_MISMATCH = "stats_mismatch"


@dataclass(frozen=True)
class Shard:
    """The files of one img2dataset output shard; ``tar`` or ``parquet`` may be missing."""

    name: str
    tar: Path | None
    parquet: Path | None
    stats: Path | None

    def signature(self) -> dict[str, Any]:
        """Sizes and mtimes of the shard's files, stats file included: a changed shard is never done."""
        sig = {}
        for label, path in (("tar", self.tar), ("parquet", self.parquet), ("stats", self.stats)):
            if path is None:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            sig[label] = [st.st_size, st.st_mtime_ns]
        return sig


def list_shards(folder: str | Path) -> list[Shard]:
    """Every shard in ``folder``, sorted by name. A shard is a ``.tar``, or a ``.parquet`` with no tar.

    Unfinished shards are listed too (``stats`` is None until img2dataset wrote the stats file); the
    stages that read shards keep only :func:`complete_shards`.
    """
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
        stats = folder / f"{name}{STATS_SUFFIX}"
        shards.append(Shard(name, tars.get(name), parquets.get(name), stats if stats.exists() else None))
    return shards


def read_stats(shard: Shard) -> dict[str, Any] | None:
    """The shard's ``_stats.json`` as a dict; None when it is absent or not (yet) a whole JSON object."""
    if shard.stats is None:
        return None
    try:
        stats = json.loads(shard.stats.read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def stats_count(shard: Shard) -> int | None:
    """img2dataset's ``count`` (URLs in the shard's input, downloaded or not), if its stats file has one."""
    count = (read_stats(shard) or {}).get("count")
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def complete_shards(shards: list[Shard], require_stats: bool = True) -> tuple[list[Shard], list[str]]:
    """(shards to read, names of incomplete ones). Incomplete: no stats file (when ``require_stats``),
    or a stats file that is not a whole JSON object yet (img2dataset is still writing it).

    ``require_stats=False`` is for shards written by other tools (clip-retrieval's tars), which have
    no stats file; their rows are then not checked against a count.
    """
    complete, incomplete = [], []
    for shard in shards:
        if shard.stats is None:
            (incomplete if require_stats else complete).append(shard)
        elif read_stats(shard) is None:
            incomplete.append(shard)
        else:
            complete.append(shard)
    names = [s.name for s in incomplete]
    if names:
        log.warning(
            "%d incomplete shard(s) left for a later run (no complete %s yet): %s",
            len(names),
            STATS_SUFFIX,
            ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""),
        )
    return complete, names


@dataclass(frozen=True)
class ShardProblem:
    """Why a shard that was read cannot be marked done (see :func:`check_after_read`)."""

    reason: str  # SHARD_CHANGED_DURING_READ or SHARD_STATS_MISMATCH
    detail: str
    rows_seen: int
    stats_count: int | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def check_after_read(shard: Shard, before: Mapping[str, Any], rows_seen: int) -> ShardProblem | None:
    """What makes a freshly read shard untrustworthy, if anything; None when it may be marked done.

    Args:
        shard (`Shard`): the shard that was read.
        before (`Mapping`): its :meth:`Shard.signature` taken before the read.
        rows_seen (`int`): rows the reader produced for it.

    The shard must be unchanged since ``before`` (else ``changed_during_read``), and when its stats
    file has a ``count``, ``rows_seen`` must equal it (else ``stats_mismatch``).
    """
    after = shard.signature()
    if dict(before) != after:
        changed = sorted(label for label in set(before) | set(after) if before.get(label) != after.get(label))
        detail = (
            f"{', '.join(changed)} changed while the shard was read (size, mtime: {dict(before)} -> {after})"
        )
        return ShardProblem(SHARD_CHANGED_DURING_READ, detail, rows_seen)
    count = stats_count(shard)
    if count is not None and rows_seen != count:
        name = shard.stats.name if shard.stats is not None else STATS_SUFFIX
        detail = f"{rows_seen} rows read, {count} in {name} (img2dataset's count of the shard's URLs)"
        return ShardProblem(SHARD_STATS_MISMATCH, detail, rows_seen, count)
    return None


class ShardInputs:
    """The shards a shard-partitioned stage (ingest, embed) reads, and what became of them this run.

    Only complete shards are read (:func:`complete_shards`). :meth:`sign` takes every shard's
    signature before the read; :meth:`commit_checked` checks the shard again just before its done
    marker (:func:`check_after_read`) and defers it instead when it changed or its rows differ from
    its ``_stats.json`` count. :meth:`summary` gives the fields that report what was left out.
    """

    def __init__(self, folder: str | Path, require_stats: bool = True):
        complete, self.incomplete = complete_shards(list_shards(folder), require_stats)
        self.shards = {shard.name: shard for shard in complete}
        self.signatures: dict[str, Any] = {}
        self.problems: dict[str, ShardProblem] = {}

    def sign(self) -> dict[str, Any]:
        """Each shard's signature, taken now, before any read (the stage's ``partitions()``)."""
        self.signatures = {name: shard.signature() for name, shard in self.shards.items()}
        return self.signatures

    def commit_checked(self, commit: Commit, name: str, info: dict[str, Any], rows_seen: int) -> None:
        """``commit(name, info)``, unless the shard is untrustworthy now: then ``commit.defer`` it."""
        problem = check_after_read(self.shards[name], self.signatures[name], rows_seen)
        if problem is None:
            commit(name, info)
            return
        self.problems[name] = problem
        commit.defer(name, str(problem))

    def summary(self) -> dict[str, Any]:
        """Summary fields of ingest and embed: the shards not marked done in this run, and why."""
        return {
            "shards_incomplete": list(self.incomplete),
            "shards_changed_during_read": sorted(
                name for name, p in self.problems.items() if p.reason == SHARD_CHANGED_DURING_READ
            ),
            "shards_stats_mismatch": {
                name: {"rows_seen": p.rows_seen, "stats_count": p.stats_count}
                for name, p in sorted(self.problems.items())
                if p.reason == SHARD_STATS_MISMATCH
            },
        }


@dataclass
class TarSample:
    """The files of one sample in a webdataset tar, keyed by extension."""

    key: str
    files: dict[str, bytes]
    error: str | None = None


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``); the key is everything before the first dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _key_problem(key: str) -> str | None:
    """Why ``key`` is refused (a ``bad_key`` row), or None. Keys are data, but also look like paths."""
    if not key or key.endswith("/"):
        problem = "no key before the extension"
    elif key.startswith("/"):
        problem = "absolute path"
    elif "\\" in key:
        problem = "backslash in the key"
    elif ".." in key.split("/"):
        problem = "'..' path part"
    else:
        return None
    return f"{READ_BAD_KEY}: {problem} in key {key!r}; not read"


def member_problem(member: tarfile.TarInfo, max_member_bytes: int) -> str | None:
    """Why a member's data is not read (its sample is rejected), or None."""
    if member.issparse():
        return (
            f"{READ_SPARSE_MEMBER}: {member.name} is a sparse file ({member.size} bytes expanded); not read"
        )
    if member.size > max_member_bytes:
        return (
            f"{READ_MEMBER_TOO_LARGE}: {member.name} is {member.size} bytes, over the cap of "
            f"{max_member_bytes} bytes (max_member_bytes); not read"
        )
    return None


def iter_tar_samples(path: Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[TarSample]:
    """Samples of a webdataset tar in order; a broken tail yields one sample carrying the error.

    Files of one sample sit next to each other in a webdataset tar, so a sample is complete when
    the next key starts (or when one of its extensions comes again). When the tar breaks, the sample
    being read is the broken one.

    Every regular member belongs to exactly one yielded sample. Rejected samples carry ``error``:
    a sparse member or one over ``max_member_bytes`` (its data is skipped, never read); a key that
    looks like path traversal (``bad_key``); a key met again, after its sample ended or by a repeated
    extension (``duplicate_key``: the repeat is the sample ``<key>:duplicate-<n>``, none of it read,
    and the first sample keeps its files).
    """
    current: TarSample | None = None
    group = ""  # the tar key shared by the current sample's members
    extensions: set[str] = set()  # met in the current sample, read or not
    seen: set[str] = set()
    repeats: Counter[str] = Counter()

    def repeat(key: str, detail: str) -> TarSample:
        repeats[key] += 1
        return TarSample(f"{key}{DUPLICATE_SEPARATOR}{repeats[key]}", {}, f"{READ_DUPLICATE_KEY}: {detail}")

    try:
        if path.stat().st_size == 0:
            return
        with tarfile.open(path, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and (key != group or ext in extensions):
                    yield current
                    current = None
                if current is None:
                    if key in seen:
                        detail = f"{member.name}: key {key!r} was read before in this tar; the first is kept"
                        current = repeat(key, detail)
                    else:
                        seen.add(key)
                        current = TarSample(key=key or member.name, files={}, error=_key_problem(key))
                    group, extensions = key, set()
                extensions.add(ext)
                if current.error is not None and current.error.startswith((READ_DUPLICATE_KEY, READ_BAD_KEY)):
                    continue  # nothing of such a sample is used: read none of it
                problem = member_problem(member, max_member_bytes)
                if problem is not None:
                    current.error = current.error or problem
                    continue
                fh = archive.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        reason = f"{READ_TRUNCATED_TAR}: tar unreadable from this sample on ({exc})"
        if current is None:
            current = TarSample(key="", files={})
        current.error = current.error or reason
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


def read_shard(shard: Shard, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> list[dict[str, Any]]:
    """All raw rows of one shard: its tar samples, then parquet rows the tar does not hold.

    ``max_member_bytes``: larger tar members are not read; their samples are rejected
    (``member_too_large``).
    """
    parquet_rows, parquet_problem = _read_parquet_rows(shard.parquet)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    if shard.tar is not None:
        for sample in iter_tar_samples(shard.tar, max_member_bytes):
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
