"""Names, format version, content rules and errors of the bundle layout, shared by builder and reader.

What a bundle is: every file under its folder except ``manifest.json``, the ``_work/`` resume state
and dot-files (temporaries of an interrupted write, the output lock). The manifest lists exactly
those files with their size and sha256, and :func:`root_hash` over the manifest identifies the bundle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.bundle.tables import OUTPUT_NAME as TABLE_NAME
from pipeline.dedup.names import OUTPUT_NAME as IMAGE_DUPLICATES
from pipeline.index.build import (
    DUP_INDEX_NAME,
    INDEX_NAME,
    INFO_NAME,
    ROWS_NAME,
    SSCD_INDEX_NAME,
    SSCD_INFO_NAME,
)
from pipeline.io.embeddings import IMG_EMB, SSCD_EMB

__all__ = ["DUP_INDEX_NAME", "IMAGE_DUPLICATES", "INDEX_NAME", "INFO_NAME", "ROWS_NAME", "TABLE_NAME"]

#: Version of the bundle layout and manifest; :func:`open_bundle` reads exactly this version.
#: 2: the manifest lists exactly the bundle's files and carries their root hash.
BUNDLE_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WORK = "_work"
SAMPLES = "samples.parquet"
EMBEDDINGS = "embeddings"
CAPTION_DUPLICATES = "caption_duplicates.parquet"
INDEX_DIR = "index"
STEPS = (
    "ingest",
    "embed",
    "cells",
    "image_dedup",
    "caption_dedup",
    "index",
    "sscd_index",
    "tables",
    "report",
)


#: Embedding kinds a bundle can be searched by -> (index file, info file) under ``index/``.
INDEXED_KINDS = {IMG_EMB: (INDEX_NAME, INFO_NAME), SSCD_EMB: (SSCD_INDEX_NAME, SSCD_INFO_NAME)}


class BundleError(RuntimeError):
    """A bundle cannot be used: missing or unreadable manifest, missing files, inconsistent contents."""


class BundleFormatError(BundleError):
    """The bundle's format version is not the one this code reads."""


class BundleChecksumError(BundleError):
    """A file's size or sha256 differs from the manifest (tampered, truncated or rebuilt in place)."""


class BundleContentError(BundleError):
    """The files on disk are not the manifest's: a file missing, unlisted, or outside the bundle."""


def bundle_files(root: Path) -> list[Path]:
    """Every file of the bundle: all but the manifest itself, the ``_work/`` resume state and dot-files."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] == WORK or rel.as_posix() == MANIFEST:
            continue
        if any(part.startswith(".") for part in rel.parts):  # temporaries, the output lock
            continue
        files.append(path)
    return files


def root_hash(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (all but the ``root_hash`` field itself).

    It covers every file's size and sha256 and every setting a consumer reads (thresholds, the
    y_N minimum count, model names and hashes), so it identifies this build of the bundle.
    """
    body = {key: value for key, value in manifest.items() if key != "root_hash"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def confined(rel: str) -> bool:
    """Whether a manifest path names a file inside the bundle (relative, normalised, no ``..``)."""
    path = PurePosixPath(rel)
    return (
        bool(rel)
        and "\\" not in rel
        and not path.is_absolute()
        and ".." not in path.parts
        and path.as_posix() == rel
        and path.parts[0] != WORK
    )
