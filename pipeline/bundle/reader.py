"""Opening a bundle: format check, checksums, and the :class:`NeighbourIndex` AMG and the audits search.

:func:`open_bundle` checks the format version (a bundle of another version is refused, naming the
supported one) and, unless ``verify=False``, every file's sha256 against the manifest (reading
everything: for a LAION-scale bundle pass ``verify=False`` and check once with :meth:`Bundle.verify`).
The returned :class:`Bundle` implements :class:`pipeline.core.neighbours.NeighbourIndex`; ``kind``
picks the vectors it searches: ``img_emb`` (open_clip, the default) or ``sscd_emb``.

Imports nothing from the build side, so a deployment that only consumes bundles loads little.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.bundle.layout import (
    BUNDLE_FORMAT_VERSION,
    DUP_INDEX_NAME,
    EMBEDDINGS,
    INDEX_DIR,
    INDEXED_KINDS,
    MANIFEST,
    TABLE_NAME,
    BundleChecksumError,
    BundleError,
    BundleFormatError,
)
from pipeline.core.neighbours import DuplicateCaption
from pipeline.core.storage import sha256_file
from pipeline.index.faiss_index import load_index, set_search_params
from pipeline.io.embeddings import IMG_EMB, list_partitions, normalize


def apply_search_params(index: Any, info: dict[str, Any]) -> None:
    params = info.get("index", {})
    set_search_params(index, nprobe=params.get("nprobe"), ef_search=params.get("ef_search"))


def verify_files(root: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in ``manifest`` exists with its recorded size and sha256.

    Raises:
        BundleChecksumError: some file is missing or differs (the first few are named).
    """
    root = Path(root)
    bad = []
    for rel, entry in manifest.get("files", {}).items():
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif path.stat().st_size != entry["bytes"]:
            bad.append(f"{rel} (size {path.stat().st_size}, manifest {entry['bytes']})")
        elif sha256_file(path) != entry["sha256"]:
            bad.append(f"{rel} (sha256 differs from the manifest)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise BundleChecksumError(f"bundle {root} fails its checksums: {', '.join(bad[:5])}{more}")


class Bundle:
    """An opened bundle: nearest-training-row search and the per-row lookups AMG and audits need.

    Implements :class:`pipeline.core.neighbours.NeighbourIndex`. Use :func:`open_bundle` to get one.

    Attributes:
        path (`Path`): the bundle folder.
        manifest (`dict`): the parsed ``manifest.json``.
        min_count (`int`): the y_N minimum count (``thresholds.duplicate_caption_min_count``).
        kind (`str`): the vectors searched and returned: ``img_emb`` or ``sscd_emb``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], mmap: bool = True, kind: str = IMG_EMB):
        if kind not in INDEXED_KINDS:
            raise ValueError(f"kind must be one of {', '.join(INDEXED_KINDS)}, got {kind!r}")
        index_name, info_name = INDEXED_KINDS[kind]
        if not (path / INDEX_DIR / index_name).is_file():
            raise BundleError(
                f"bundle {path} has no {kind} index ({INDEX_DIR}/{index_name}); "
                f"SSCD descriptors are indexed when the bundle is built with --embed-sscd-checkpoint FILE"
            )
        self.path = path
        self.manifest = manifest
        self.kind = kind
        self.min_count = int(manifest["thresholds"]["duplicate_caption_min_count"])
        self.index = load_index(path / INDEX_DIR / index_name, mmap=mmap)
        info = json.loads((path / INDEX_DIR / info_name).read_text())
        apply_search_params(self.index, info)
        dup_path = path / INDEX_DIR / DUP_INDEX_NAME  # over img_emb: searched with CLIP vectors only
        has_dup = dup_path.is_file() and kind == IMG_EMB
        self.duplicates_index = load_index(dup_path, mmap=False) if has_dup else None
        self.table = pq.read_table(path / TABLE_NAME)
        self._knn_caption = self.table.column("knn_caption")
        self._knn_count = self.table.column("knn_caption_count").to_numpy()
        self._key_to_row: dict[str, int] | None = None
        self._parts = [p.embeddings(kind, mmap=True) for p in list_partitions(path / EMBEDDINGS)]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        counts = {
            "index": int(self.index.ntotal),
            "table": self.table.num_rows,
            "embeddings": int(self._starts[-1]),
        }
        if len(set(counts.values())) != 1:
            raise BundleError(f"bundle {path} is inconsistent: rows per part {counts}")

    # NeighbourIndex ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {queries.shape}")
        return normalize(queries)

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, row_ids)``, each ``(Q, k)``, best first; queries are L2-normalised first.

        Scores are cosine similarities (approximate for a PQ index). Where fewer than k rows exist,
        the result is padded with row id -1 (and the lowest float32 score), as ``faiss.Index.search`` does.
        """
        scores, ids = self.index.search(self._queries(queries), int(k))
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def search_duplicates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search_embeddings`, among the images that have duplicates only (row ids)."""
        if self.duplicates_index is None:
            raise BundleError(f"bundle {self.path} has no {DUP_INDEX_NAME}")
        scores, ids = self.duplicates_index.search(self._queries(queries), int(k))
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def _check_rows(self, row_ids: np.ndarray) -> np.ndarray:
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= len(self)):
            raise IndexError(f"row ids must be in [0, {len(self)}); got {row_ids.min()}..{row_ids.max()}")
        return row_ids

    def embeddings(self, row_ids: np.ndarray) -> np.ndarray:
        """Stored :attr:`kind` vectors of ``row_ids`` (any shape), L2-normalised float32, ``(*ids, dim)``."""
        row_ids = self._check_rows(row_ids)
        flat = row_ids.reshape(-1)
        part = np.searchsorted(self._starts, flat, side="right") - 1
        out = np.empty((len(flat), self.dim), dtype=np.float32)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self._parts[p][flat[sel] - self._starts[p]]
        return normalize(out).reshape(*row_ids.shape, self.dim)

    def duplicate_caption(self, row_id: int) -> DuplicateCaption:
        """y_N when ``row_id`` is the nearest neighbour n0: its neighbourhood's dominant caption.

        The caption is returned when it occurs at least ``min_count`` times among the row's
        ``knn_k`` nearest training images, else None; ``count`` is that occurrence count either way.
        """
        row = int(self._check_rows(np.asarray(row_id)))
        count = int(self._knn_count[row])
        caption = self._knn_caption[row].as_py() if count >= self.min_count else None
        return DuplicateCaption(caption=caption, count=count)

    def row(self, row_id: int) -> dict:
        """The row's G_dup entry: key, caption, image group, group caption, caption group, kNN caption."""
        row = int(self._check_rows(np.asarray(row_id)))
        return self.table.slice(row, 1).to_pylist()[0]

    # Extras -----------------------------------------------------------------------------------

    def row_of_key(self, key: str) -> int:
        """Row id of a sample key (KeyError if the key is not in the bundle)."""
        if self._key_to_row is None:
            self._key_to_row = {k: i for i, k in enumerate(self.table.column("key").to_pylist())}
        return self._key_to_row[key]

    def verify(self) -> None:
        """Check every file against the manifest (see :func:`verify_files`)."""
        verify_files(self.path, self.manifest)


def open_bundle(path: str | Path, verify: bool = True, mmap: bool = True, kind: str = IMG_EMB) -> Bundle:
    """Open a bundle written by :func:`build_bundle`.

    Args:
        path: the bundle folder.
        verify (`bool`): check every file's size and sha256 against the manifest first. This reads
            the whole bundle; for very large bundles pass False and call :meth:`Bundle.verify` once.
        mmap (`bool`): memory-map the index (and the embeddings, always mapped).
        kind (`str`): vectors to search: ``img_emb`` (open_clip image embeddings) or ``sscd_emb``
            (SSCD copy descriptors; the bundle must have been built with ``--embed-sscd-checkpoint``).

    Raises:
        BundleError: no readable manifest, or inconsistent contents.
        BundleFormatError: the manifest's ``format_version`` is not :data:`BUNDLE_FORMAT_VERSION`.
        BundleChecksumError: with ``verify``, a file is missing or differs from the manifest.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST} (build one with jobs/build_artifacts.py)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleFormatError(
            f"bundle {path} has format version {version!r}; this code reads format version "
            f"{BUNDLE_FORMAT_VERSION} only (rebuild it with jobs/build_artifacts.py, or use the code "
            f"version that wrote it: {manifest.get('code_version') if isinstance(manifest, dict) else None})"
        )
    if verify:
        verify_files(path, manifest)
    return Bundle(path, manifest, mmap=mmap, kind=kind)
