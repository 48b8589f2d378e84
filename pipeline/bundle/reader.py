"""Opening a bundle: format check, checksums, and the :class:`NeighbourIndex` AMG and the audits search.

:func:`open_bundle` checks the format version (a bundle of another version is refused, naming the
supported one) and, unless ``verify=False``, every file's sha256 against the manifest (reading
everything: for a LAION-scale bundle pass ``verify=False`` and check once with :meth:`Bundle.verify`).
The returned :class:`Bundle` implements :class:`pipeline.core.neighbours.NeighbourIndex`; ``kind``
picks the vectors it searches: ``img_emb`` (open_clip, the default) or ``sscd_emb``.

Imports nothing from the build side, so a deployment that only consumes bundles loads little.
"""

from __future__ import annotations

import dataclasses
import functools
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
    BundleContentError,
    BundleError,
    BundleFormatError,
    bundle_files,
    confined,
    root_hash,
)
from pipeline.core.config import EmbedConfig
from pipeline.core.neighbours import DuplicateCaption
from pipeline.core.storage import sha256_file
from pipeline.index.faiss_index import load_index, set_search_params, wide_search
from pipeline.io.embeddings import IMG_EMB, list_partitions, normalize


def apply_search_params(index: Any, info: dict[str, Any]) -> None:
    params = info.get("index", {})
    set_search_params(index, nprobe=params.get("nprobe"), ef_search=params.get("ef_search"))


def check_files(
    root: str | Path, manifest: dict[str, Any], full: bool = True, expect: str | None = None
) -> str:
    """Check that the bundle's files are exactly the manifest's; return the bundle's root hash.

    Always: every manifest path is confined to the bundle; the files on disk (see
    :func:`~pipeline.bundle.layout.bundle_files`) are the listed ones, none missing or unlisted, no
    symbolic links; each size matches; the root hash of the manifest equals its recorded one (and
    ``expect``, when a consumer pins one). With ``full``, also every file's sha256 (reads everything).

    Raises:
        BundleContentError: a path outside the bundle, a missing, unlisted or linked file.
        BundleChecksumError: a size, sha256 or root hash differs.
    """
    root = Path(root)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleContentError(f"bundle {root}: the manifest lists no files")
    outside = [rel for rel in files if not isinstance(rel, str) or not confined(rel)]
    if outside:
        raise BundleContentError(f"bundle {root}: manifest paths outside the bundle: {outside[:5]}")
    on_disk = {path.relative_to(root).as_posix(): path for path in bundle_files(root)}
    missing, unlisted = sorted(set(files) - set(on_disk)), sorted(set(on_disk) - set(files))
    linked = sorted(rel for rel, path in on_disk.items() if path.is_symlink())
    if missing or unlisted or linked:
        raise BundleContentError(
            f"bundle {root} is not its manifest: missing {missing[:5]}, unlisted {unlisted[:5]}, "
            f"symbolic links {linked[:5]}"
        )
    computed = root_hash(manifest)
    if manifest.get("root_hash") != computed:
        raise BundleChecksumError(
            f"bundle {root}: the manifest's root hash {manifest.get('root_hash')} is not that of its "
            f"content ({computed}); the manifest was edited"
        )
    if expect is not None and expect != computed:
        raise BundleChecksumError(f"bundle {root} has root hash {computed}, expected {expect}")
    bad = []
    for rel, entry in files.items():
        size = on_disk[rel].stat().st_size
        if size != entry.get("bytes"):
            bad.append(f"{rel} (size {size}, manifest {entry.get('bytes')})")
        elif full and sha256_file(on_disk[rel]) != entry.get("sha256"):
            bad.append(f"{rel} (sha256 differs from the manifest)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise BundleChecksumError(f"bundle {root} fails its checksums: {', '.join(bad[:5])}{more}")
    return computed


class Bundle:
    """An opened bundle: nearest-training-row search and the per-row lookups AMG and audits need.

    Implements :class:`pipeline.core.neighbours.NeighbourIndex`. Use :func:`open_bundle` to get one.

    Attributes:
        path (`Path`): the bundle folder.
        manifest (`dict`): the parsed ``manifest.json``.
        root_hash (`str`): the bundle's identity, checked against its files when it was opened.
        min_count (`int`): the y_N minimum count (``thresholds.duplicate_caption_min_count``).
        kind (`str`): the vectors searched and returned: ``img_emb`` or ``sscd_emb``.
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], root_hash: str, mmap: bool = True, kind: str = IMG_EMB
    ):
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
        self.root_hash = root_hash
        self.kind = kind
        self.min_count = int(manifest["thresholds"]["duplicate_caption_min_count"])
        self.index = load_index(path / INDEX_DIR / index_name, mmap=mmap)
        info = json.loads((path / INDEX_DIR / info_name).read_text())
        apply_search_params(self.index, info)
        dup_path = path / INDEX_DIR / DUP_INDEX_NAME  # over img_emb: searched with CLIP vectors only
        has_dup = dup_path.is_file() and kind == IMG_EMB
        self.duplicates_index = load_index(dup_path, mmap=False) if has_dup else None
        self.table = pq.read_table(path / TABLE_NAME)
        self.duplicate_caption_k = int(manifest["thresholds"].get("duplicate_caption_k", 1000))
        self._cell_caption = self.table.column("cell_caption")
        self._cell_count = self.table.column("cell_caption_count").to_numpy()
        self._caption_id = self.table.column("caption_id").to_numpy()
        self._caption_count = self.table.column("caption_count").to_numpy()
        self._near = functools.lru_cache(maxsize=4096)(self._dominant_caption_near)
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
        """y_N when ``row_id`` is the nearest neighbour n0: the dominant caption of its k-means cell.

        The caption is returned when it occurs at least ``min_count`` times among the rows of n0's
        cell, else None; ``count`` is that occurrence count either way. For the authors' rule on the
        query itself, see :meth:`duplicate_caption_near`.
        """
        row = int(self._check_rows(np.asarray(row_id)))
        count = int(self._cell_count[row])
        caption = self._cell_caption[row].as_py() if count >= self.min_count else None
        return DuplicateCaption(caption=caption, count=count)

    def duplicate_caption_near(
        self, embedding: np.ndarray, k: int | None = None, min_count: int | None = None
    ) -> DuplicateCaption:
        """y_N by the authors' rule: the dominant caption among the ``k`` training images nearest to
        ``embedding`` (x̂0's CLIP embedding), when it occurs at least ``min_count`` times, else None.

        Captions are counted by their normalised form (the table's ``caption_id``); ties go to the
        caption of the nearer image. ``k`` defaults to the bundle's ``duplicate_caption_k`` (1,000, the
        authors'), ``min_count`` to its ``duplicate_caption_min_count`` (21). Repeated queries are
        answered from a cache keyed by the query's float16 bytes.
        """
        query = self._queries(np.asarray(embedding, dtype=np.float32).reshape(1, -1))[0]
        k = int(k or self.duplicate_caption_k)
        min_count = int(min_count or self.min_count)
        return self._near(query.astype(np.float16).tobytes(), k, min_count)

    def _dominant_caption_near(self, query: bytes, k: int, min_count: int) -> DuplicateCaption:
        vector = np.frombuffer(query, dtype=np.float16).astype(np.float32)[None, :]
        _, ids = self.index.search(vector, min(k, len(self)), params=wide_search(self.index, k))
        ids = ids[0][ids[0] >= 0]
        captions = self._caption_id[ids]
        # Only captions that occur min_count times in the whole bundle can reach it among k neighbours.
        common = captions[(captions >= 0) & (self._caption_count[ids] >= min_count)]
        if len(common) == 0:
            return DuplicateCaption(caption=None, count=0)
        values, first, counts = np.unique(common, return_index=True, return_counts=True)
        best = np.lexsort((first, -counts))[0]
        count = int(counts[best])
        caption = self.table.column("caption")[int(values[best])].as_py() if count >= min_count else None
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
        """Check every file's sha256 against the manifest (see :func:`check_files`)."""
        check_files(self.path, self.manifest, full=True, expect=self.root_hash)

    def embed_config(self) -> EmbedConfig:
        """The embed options the bundle's embeddings were made with (model, checkpoint, SSCD file)."""
        known = {f.name for f in dataclasses.fields(EmbedConfig)}
        recorded = self.manifest.get("config", {}).get("embed", {})
        return EmbedConfig(**{k: v for k, v in recorded.items() if k in known})

    def clip_model(self, device: Any = "cpu") -> Any:
        """The open_clip model behind the bundle's embeddings (a
        :class:`~pipeline.embed.clip_models.LoadedClip`), its checkpoint file checked against the
        manifest first: queries must be embedded by the model the rows were."""
        from pipeline.embed.clip_models import load_clip  # torch and open_clip: only for queries to embed

        model = self.manifest.get("model", {})
        check_model_file(
            model.get("checkpoint"), model.get("checkpoint_sha256"), "CLIP checkpoint", self.path
        )
        return load_clip(self.embed_config(), device)


def check_model_file(path: str | None, sha256: str | None, what: str, bundle: str | Path) -> str | None:
    """The sha256 of a model file a bundle names, after checking it is the file the manifest recorded.

    Raises:
        ValueError: the manifest has no sha256 for it, or the file differs.
    """
    if not path:
        return None
    if not sha256:
        raise ValueError(
            f"bundle {bundle} names the {what} ({path}) without its sha256, so it cannot be checked; "
            f"rebuild the bundle with jobs/build_artifacts.py"
        )
    digest = sha256_file(path)
    if digest != sha256:
        raise ValueError(f"{path} is not the {what} (sha256 {digest[:12]}..., bundle {sha256[:12]}...)")
    return digest


def open_bundle(
    path: str | Path, verify: bool = True, mmap: bool = True, kind: str = IMG_EMB, expect: str | None = None
) -> Bundle:
    """Open a bundle written by :func:`~pipeline.bundle.build.build_bundle`.

    The files on disk must be exactly the manifest's, with its sizes and root hash, whatever
    ``verify`` says (:func:`check_files`).

    Args:
        path: the bundle folder.
        verify (`bool`): also check every file's sha256. This reads the whole bundle; for very large
            bundles pass False (sizes and the root hash are still checked) and call
            :meth:`Bundle.verify` once.
        expect (`str`, *optional*): the root hash the caller pins (e.g. the one an audit recorded);
            any other bundle is refused.
        mmap (`bool`): memory-map the index (and the embeddings, always mapped).
        kind (`str`): vectors to search: ``img_emb`` (open_clip image embeddings) or ``sscd_emb``
            (SSCD copy descriptors; the bundle must have been built with ``--embed-sscd-checkpoint``).

    Raises:
        BundleError: no readable manifest, or inconsistent contents.
        BundleFormatError: the manifest's ``format_version`` is not :data:`BUNDLE_FORMAT_VERSION`.
        BundleContentError: the files are not the manifest's (missing, unlisted, outside, linked).
        BundleChecksumError: a size, the root hash, ``expect`` or (with ``verify``) a sha256 differs.
    """
    path = Path(path)
    manifest = read_manifest(path)
    checked = check_files(path, manifest, full=verify, expect=expect)
    return Bundle(path, manifest, checked, mmap=mmap, kind=kind)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The bundle's parsed manifest, after checking it exists, parses and has the supported format.

    Raises:
        BundleError: no readable manifest.
        BundleFormatError: another ``format_version`` than :data:`BUNDLE_FORMAT_VERSION`.
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
    return manifest


def bundle_root_hash(path: str | Path, verify: bool = True) -> str:
    """The root hash of the bundle at ``path``, after :func:`check_files` (every sha256 with ``verify``)."""
    return check_files(path, read_manifest(path), full=verify)
