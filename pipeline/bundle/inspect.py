"""Looking into a bundle without Ray: what it is, what it found, whether it verifies, and y_N lookups.

:func:`inspect_bundle` reads only what it reports: the manifest (format, root hash, model,
thresholds, counts), a few columns of ``image_duplicates.parquet`` and ``caption_duplicates.parquet``
(the largest groups), and, for a ``key`` or ``caption`` lookup, the bundle opened through
:func:`~pipeline.bundle.reader.open_bundle` (memory-mapped index, the G_dup table). The checks are
:func:`~pipeline.bundle.reader.open_bundle`'s: by default the cheap ones (file list, sizes, root
hash; ``open_bundle(path, verify=False)``), with ``verify`` every file's sha256 as well.

y_N of a key is :meth:`Bundle.duplicate_caption` of the key's row; for a caption, the rows whose
caption is the same after :mod:`pipeline.dedup.text_normalize` normalisation (the bundle's
``caption_duplicates.parquet`` holds every row's normalised caption, in row-id order), each with its y_N.

:func:`apply_dedup_inputs` names, from a bundle's manifest, the inputs ``jobs/apply_dedup.py --bundle``
acts on.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.bundle.layout import (
    CAPTION_DUPLICATES,
    EMBEDDINGS,
    IMAGE_DUPLICATES,
    BundleError,
    BundleFormatError,
)
from pipeline.bundle.reader import Bundle, check_files, open_bundle, read_manifest
from pipeline.core.config import ApplyDedupConfig
from pipeline.core.stage import seconds_since
from pipeline.dedup.text_normalize import normalize_caption

#: Largest groups listed by default, and rows listed for a caption lookup.
TOP_GROUPS = 5
CAPTION_MATCHES = 20
#: Members of a group listed besides its representative.
MEMBERS_LISTED = 5

#: The manifest's counts in reading order (others follow).
COUNTS_ORDER = (
    "samples_seen",
    "samples_ok",
    "samples_rejected",
    "rows",
    "image_duplicate_groups",
    "rows_in_image_groups",
    "removable_image_rows",
    "caption_duplicate_groups",
    "rows_in_caption_groups",
    "rows_with_duplicate_caption",
)

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------------------------
# Groups, from a few columns.
# ----------------------------------------------------------------------------------------------


def _largest(group_ids: np.ndarray, sizes: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(the ``top`` largest groups' ids, their sizes, the number of groups): size down, then id up."""
    ids, first = np.unique(group_ids, return_index=True)
    group_sizes = sizes[first]
    order = np.lexsort((ids, -group_sizes))[:top]
    return ids[order], group_sizes[order], len(ids)


def image_groups(path: Path, top: int = TOP_GROUPS) -> dict[str, Any]:
    """Groups in ``image_duplicates.parquet``, rows in them, and the ``top`` largest with their members."""
    columns = ["key", "group_id", "group_size", "representative_key", "method"]
    table = pq.read_table(path, columns=columns)
    if table.num_rows == 0:
        return {"groups": 0, "rows": 0, "largest": []}
    gids = table.column("group_id").to_numpy()
    ids, sizes, groups = _largest(gids, table.column("group_size").to_numpy(), top)
    chosen = table.filter(pc.is_in(table.column("group_id"), value_set=pa.array(ids, pa.int64())))
    by_group: dict[int, list[dict[str, Any]]] = {}
    for row in chosen.to_pylist():
        by_group.setdefault(row["group_id"], []).append(row)
    largest = []
    for gid, size in zip(ids.tolist(), sizes.tolist(), strict=True):
        members = by_group[gid]
        others = [m["key"] for m in members if m["key"] != m["representative_key"]]
        largest.append(
            {
                "group_id": gid,
                "size": size,
                "representative_key": members[0]["representative_key"],
                "methods": dict(Counter(m["method"] for m in members if m["key"] != m["representative_key"])),
                "members": others[:MEMBERS_LISTED],
            }
        )
    return {"groups": groups, "rows": table.num_rows, "largest": largest}


def _column_at_rows(path: Path, column: str, rows: list[int]) -> dict[int, Any]:
    """``column``'s value at each row number, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    starts = np.cumsum([0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
    out: dict[int, Any] = {}
    wanted: dict[int, list[int]] = {}
    for row in rows:
        wanted.setdefault(int(np.searchsorted(starts, row, side="right") - 1), []).append(row)
    for group, members in wanted.items():
        values = parquet.read_row_group(group, columns=[column]).column(column)
        for row in members:
            out[row] = values[row - int(starts[group])].as_py()
    return out


def caption_groups(path: Path, top: int = TOP_GROUPS) -> dict[str, Any]:
    """Caption groups of two or more rows, rows in them, and the ``top`` largest with their caption."""
    table = pq.read_table(path, columns=["group_id", "group_size"])
    table = table.filter(pc.greater(table.column("group_size"), 1))
    if table.num_rows == 0:
        return {"groups": 0, "rows": 0, "largest": []}
    ids, sizes, groups = _largest(
        table.column("group_id").to_numpy(), table.column("group_size").to_numpy(), top
    )
    captions = _column_at_rows(path, "normalized_caption", ids.tolist())  # group id = its first row
    largest = [
        {"group_id": gid, "size": size, "normalized_caption": captions[gid]}
        for gid, size in zip(ids.tolist(), sizes.tolist(), strict=True)
    ]
    return {"groups": groups, "rows": table.num_rows, "largest": largest}


# ----------------------------------------------------------------------------------------------
# Lookups through the Bundle API.
# ----------------------------------------------------------------------------------------------


def _y_n(bundle: Bundle, row_id: int) -> dict[str, Any]:
    found = bundle.duplicate_caption(row_id)
    return {"y_N": found.caption, "count": found.count}


def lookup_key(bundle: Bundle, key: str) -> dict[str, Any]:
    """y_N of the row with ``key`` (``found: False`` when the bundle has no such key)."""
    try:
        row_id = bundle.row_of_key(key)
    except KeyError:
        return {"key": key, "found": False}
    row = bundle.row(row_id)
    return {
        "key": key,
        "found": True,
        "row_id": row_id,
        "caption": row["caption"],
        **_y_n(bundle, row_id),
        "min_count": bundle.min_count,
        "cell_rows": row["cell_rows"],
        "image_group_size": row["image_group_size"],
        "caption_group_size": row["caption_group_size"],
    }


def lookup_caption(bundle: Bundle, caption: str, limit: int = CAPTION_MATCHES) -> dict[str, Any]:
    """The rows whose normalised caption equals ``caption``'s, and each one's y_N (the first ``limit``)."""
    normalized = normalize_caption(caption)
    column = pq.read_table(bundle.path / CAPTION_DUPLICATES, columns=["normalized_caption"]).column(
        "normalized_caption"
    )
    rows: list[int] = []
    if normalized:
        rows = np.flatnonzero(pc.fill_null(pc.equal(column, normalized), False).to_numpy()).tolist()
    keys = bundle.table.column("key")
    return {
        "caption": caption,
        "normalized": normalized,
        "found": bool(rows),
        "rows": len(rows),
        "min_count": bundle.min_count,
        "matches": [{"row_id": r, "key": keys[r].as_py(), **_y_n(bundle, r)} for r in rows[:limit]],
    }


# ----------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------


def inspect_bundle(
    path: str | Path,
    verify: bool = False,
    key: str | None = None,
    caption: str | None = None,
    top: int = TOP_GROUPS,
) -> dict[str, Any]:
    """Everything ``jobs/inspect_bundle.py`` reports about the bundle at ``path``, as a JSON-able dict.

    ``verify`` reads every file against its sha256; without it only the cheap checks run. A bundle
    that fails them is still described from its manifest, with ``verify.ok`` False and no lookup.

    Raises:
        BundleError: not a bundle (no readable manifest).
        BundleFormatError: another format version.
    """
    started = time.monotonic()
    root = Path(path)
    manifest = read_manifest(root)
    check: dict[str, Any] = {"mode": "full" if verify else "cheap", "ok": True, "error": None}
    bundle = None
    try:
        if key is not None or caption is not None:
            bundle = open_bundle(root, verify=verify)  # the same checks, and the opened bundle
        else:
            check_files(root, manifest, full=verify)
    except BundleFormatError:
        raise
    except BundleError as exc:
        check.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    except (OSError, pa.ArrowException) as exc:  # passed the cheap checks, yet does not read
        check.update(ok=False, error=_unreadable(exc, verify))
    code = manifest.get("code_version") or {}
    index = manifest.get("index") or {}
    info: dict[str, Any] = {
        "job": "inspect_bundle",
        "bundle": str(root),
        "format_version": manifest.get("format_version"),
        "root_hash": manifest.get("root_hash"),
        "created_utc": manifest.get("created_utc"),
        "code_version": {k: code.get(k) for k in ("package", "git_commit", "git_dirty")},
        "model": manifest.get("model"),
        "thresholds": manifest.get("thresholds"),
        "counts": manifest.get("counts"),
        "index": {k: index.get(k) for k in ("kind", "factory", "recall_at_k", "recall_k")},
        "indexes": sorted(manifest.get("indexes") or {}),
        "verify": check,
    }
    lookup: dict[str, Any] = {}
    if check["ok"]:  # the tables are the manifest's: read their groups, answer the lookups
        try:
            info["image_groups"] = image_groups(root / IMAGE_DUPLICATES, top)
            info["caption_groups"] = caption_groups(root / CAPTION_DUPLICATES, top)
            if bundle is not None and key is not None:
                lookup["key"] = lookup_key(bundle, key)
            if bundle is not None and caption is not None:
                lookup["caption"] = lookup_caption(bundle, caption)
        except (OSError, pa.ArrowException) as exc:
            check.update(ok=False, error=_unreadable(exc, verify))
            lookup.clear()
    if not check["ok"] and (key is not None or caption is not None):
        lookup["skipped"] = "the bundle failed its checks"
    if lookup:
        info["lookup"] = lookup
    info["seconds"] = seconds_since(started)
    return info


def _unreadable(exc: Exception, verify: bool) -> str:
    hint = "" if verify else "; its file list, sizes and root hash match: --verify compares every sha256"
    return f"a file of the bundle cannot be read ({type(exc).__name__}: {exc}){hint}"


def exit_code(info: dict[str, Any]) -> int:
    """0; 1 when the bundle failed its checks; 2 when a looked-up key is not in the bundle."""
    if not info["verify"]["ok"]:
        return EXIT_VERIFY_FAILED
    if not info.get("lookup", {}).get("key", {"found": True})["found"]:
        return EXIT_BAD_INPUT
    return EXIT_OK


def _short(text: Any, width: int = 80) -> str:
    text = "" if text is None else str(text)
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _y_n_text(entry: dict[str, Any], min_count: int) -> str:
    if entry["y_N"] is not None:
        return f"y_N {_short(entry['y_N'])} (count {entry['count']} >= {min_count})"
    return f"no y_N (dominant caption count {entry['count']} < {min_count})"


def render(info: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"bundle       {info['bundle']}"]
    lines.append(f"format       {info['format_version']}    root hash {info['root_hash']}")
    code = info["code_version"]
    dirty = " (uncommitted changes)" if code.get("git_dirty") else ""
    lines.append(f"built        {info['created_utc']}  code {code.get('git_commit')}{dirty}")
    model = info.get("model") or {}
    extra = ", ".join(
        f"{k} {model[k]}" for k in ("pretrained", "checkpoint", "semantic", "dim") if model.get(k) is not None
    )
    lines.append(f"model        {model.get('name')}" + (f" ({extra})" if extra else ""))
    index = info["index"]
    lines.append(
        f"index        {index.get('factory')} ({index.get('kind')}; recall@{index.get('recall_k')} "
        f"{index.get('recall_at_k')}); searchable by {', '.join(info['indexes']) or 'nothing'}"
    )
    thresholds = dict(info.get("thresholds") or {})
    for label, prefix in (("image", "image_"), ("caption", "caption_")):
        part = {k.removeprefix(prefix): v for k, v in thresholds.items() if k.startswith(prefix)}
        for k in list(thresholds):
            if k.startswith(prefix):
                thresholds.pop(k)
        if part:
            head = "thresholds" if label == "image" else ""
            lines.append(f"{head:<12} {label:<8} " + ", ".join(f"{k} {v}" for k, v in part.items()))
    if thresholds:
        lines.append(f"{'':<12} {'y_N':<8} " + ", ".join(f"{k} {v}" for k, v in thresholds.items()))
    counts = dict(info.get("counts") or {})
    counts = {k: counts.pop(k) for k in COUNTS_ORDER if k in counts} | counts
    head = "counts"
    for chunk in (list(counts.items())[i : i + 4] for i in range(0, len(counts), 4)):
        lines.append(f"{head:<12} " + ", ".join(f"{k} {v}" for k, v in chunk))
        head = ""
    check = info["verify"]
    what = (
        "every sha256"
        if check["mode"] == "full"
        else "file list, sizes, root hash; --verify reads every sha256"
    )
    status = "OK" if check["ok"] else f"FAILED: {check['error']}"
    lines.append(f"verify       {status} ({what})")
    images = info.get("image_groups")
    if images is not None:
        lines.append(f"image groups {images['groups']} ({images['rows']} rows); largest:")
        for g in images["largest"]:
            methods = ", ".join(f"{m} {n}" for m, n in sorted(g["methods"].items()))
            more = " ..." if g["size"] - 1 > len(g["members"]) else ""
            lines.append(
                f"  {g['size']:>5} rows  keep {g['representative_key']}  ({methods})  "
                f"also {' '.join(g['members'])}{more}"
            )
    captions = info.get("caption_groups")
    if captions is not None:
        lines.append(f"caption groups {captions['groups']} ({captions['rows']} rows); largest:")
        lines.extend(f"  {g['size']:>5} rows  {_short(g['normalized_caption'])}" for g in captions["largest"])
    lookup = info.get("lookup") or {}
    if "skipped" in lookup:
        lines.append(f"lookup       skipped: {lookup['skipped']}")
    entry = lookup.get("key")
    if entry is not None:
        if not entry["found"]:
            lines.append(f"key          {entry['key']}: not in this bundle")
        else:
            caption = _short(entry["caption"], 60)
            lines.append(f"key          {entry['key']} -> row {entry['row_id']}, caption {caption}")
            lines.append(
                f"             {_y_n_text(entry, entry['min_count'])} "
                f"among the {entry['cell_rows']} rows of its cell"
            )
    entry = lookup.get("caption")
    if entry is not None:
        lines.append(
            f"caption      {_short(entry['caption'], 60)} (normalised {_short(entry['normalized'], 60)}): "
            f"{entry['rows']} row(s)"
        )
        lines.extend(
            f"  row {m['row_id']} key {m['key']}: {_y_n_text(m, entry['min_count'])}"
            for m in entry["matches"]
        )
        if entry["rows"] > len(entry["matches"]):
            lines.append(
                f"  ... and {entry['rows'] - len(entry['matches'])} more (--json lists the first ones)"
            )
    lines.append(f"(read in {info['seconds']:.2f} s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Inputs of jobs/apply_dedup.py --bundle.
# ----------------------------------------------------------------------------------------------


def apply_dedup_inputs(cfg: ApplyDedupConfig) -> ApplyDedupConfig:
    """``cfg`` with the paths ``--bundle`` stands for filled in (paths given explicitly win).

    The duplicate tables and the embedding folder are the bundle's; the shards are the folder the
    bundle was built from (its manifest's ``config.bundle.shards``), unless ``cfg.shards`` is set.
    The bundle must pass the cheap checks (file list, sizes, root hash).

    Raises:
        ValueError: the bundle fails its checks, or the shards it names are not here.
    """
    if not cfg.bundle:
        return cfg
    root = Path(cfg.bundle)
    try:
        manifest = read_manifest(root)
        check_files(root, manifest, full=False)
    except BundleError as exc:
        raise ValueError(str(exc)) from exc
    shards = cfg.shards or ((manifest.get("config") or {}).get("bundle") or {}).get("shards") or ""
    if not cfg.shards and not Path(shards).is_dir():
        raise ValueError(
            f"bundle {root} was built from the shards at {shards!r}, which is not a folder here: "
            f"pass --shards DIR"
        )
    return dataclasses.replace(
        cfg,
        shards=shards,
        image_duplicates=cfg.image_duplicates or str(root / IMAGE_DUPLICATES),
        caption_duplicates=cfg.caption_duplicates or str(root / CAPTION_DUPLICATES),
        embeddings=cfg.embeddings or str(root / EMBEDDINGS),
    )
