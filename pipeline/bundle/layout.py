"""Names, format version and errors of the bundle layout, shared by the builder and the reader."""

from __future__ import annotations

from pipeline.bundle.tables import OUTPUT_NAME as TABLE_NAME
from pipeline.dedup.image import OUTPUT_NAME as IMAGE_DUPLICATES
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
BUNDLE_FORMAT_VERSION = 1


MANIFEST = "manifest.json"


WORK = "_work"


SAMPLES = "samples.parquet"


EMBEDDINGS = "embeddings"


CAPTION_DUPLICATES = "caption_duplicates.parquet"


INDEX_DIR = "index"


STEPS = ("ingest", "embed", "image_dedup", "caption_dedup", "index", "sscd_index", "tables")


#: Embedding kinds a bundle can be searched by -> (index file, info file) under ``index/``.
INDEXED_KINDS = {IMG_EMB: (INDEX_NAME, INFO_NAME), SSCD_EMB: (SSCD_INDEX_NAME, SSCD_INFO_NAME)}


class BundleError(RuntimeError):
    """A bundle cannot be used: missing or unreadable manifest, missing files, inconsistent contents."""


class BundleFormatError(BundleError):
    """The bundle's format version is not the one this code reads."""


class BundleChecksumError(BundleError):
    """A file's size or sha256 differs from the manifest (tampered, truncated or rebuilt in place)."""
