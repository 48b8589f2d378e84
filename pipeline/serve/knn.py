"""One served bundle: query embedding, search, duplicate collapsing and metadata, without any HTTP.

What the LAION kNN service answered from its index and metadata, this answers from a bundle:

* **search**: ``modality=image`` searches the bundle's image index (:meth:`Bundle.search_embeddings`);
  ``modality=text`` searches the captions' embeddings (``text_emb``), exactly, partition by partition
  (a bundle has no text index; the scan is linear in N);
* **queries**: ``embedding_input`` as given (L2-normalised); ``text``, ``image`` and ``image_url`` are
  embedded with the bundle's own model (:meth:`Bundle.clip_model`), loaded on the first such query,
  with the same decode and resize as the embed stage;
* **deduplicate**: clip back drops results whose embeddings are within 0.94 cosine of a better one;
  here each image-duplicate group of the bundle (exact, pHash and semantic passes) keeps its best
  result, so "one row per duplicate group" holds by the same definition as the bundle's tables;
* **rows**: ``url``, ``caption``, ``key``, ``shard`` and the image group of every row, in a
  memory-mapped Arrow file derived once per bundle (:class:`RowStore`), so a replica's memory does
  not grow with N; ``url`` in answers is this service's ``/image/<key>``, which reads the image's
  bytes from the shards the bundle was built from (:class:`~pipeline.io.images.TarImageIndex`).
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bundle.layout import EMBEDDINGS, TABLE_NAME
from pipeline.bundle.reader import Bundle, open_bundle
from pipeline.core.storage import unique_tmp_path
from pipeline.embed.prepare import fit_to_model
from pipeline.io.decode import DECOMPRESSION_BOMB, decode_image, reason_of
from pipeline.io.embeddings import TEXT_EMB, list_partitions, normalize
from pipeline.io.images import TarImageIndex
from pipeline.serve.protocol import BadRequest, KnnRequest, Limits

log = logging.getLogger(__name__)

ROWS_FILE = "rows.arrow"
GROUPS_FILE = "image_groups.npy"
KEYS_FILE = "keys_sorted.npy"
ORDER_FILE = "keys_order.npy"
#: Bumped when the derived files change shape; part of the cache folder's name.
CACHE_VERSION = 1
#: Leading bytes of the image formats img2dataset writes, and their media types.
MEDIA_TYPES = {
    b"\xff\xd8": "image/jpeg",
    b"\x89PNG": "image/png",
    b"GIF8": "image/gif",
    b"RIFF": "image/webp",
}
#: Seconds an ``image_url`` download may take.
URL_TIMEOUT_S = 10


class RowStore:
    """Per-row ``key``, ``url``, ``caption``, ``shard`` (memory-mapped Arrow), image group ids and a
    sorted key index (memory-mapped ``.npy``), derived from the bundle once and kept under
    ``cache_dir/<root hash>-v<version>/``. Building streams the bundle partition by partition; only
    sorting the keys holds them all (about N × key length bytes)."""

    COLUMNS = ("key", "url", "caption", "shard")

    def __init__(self, bundle: Bundle, cache_dir: str | Path):
        folder = Path(cache_dir) / f"{bundle.root_hash}-v{CACHE_VERSION}"
        if not (folder / ORDER_FILE).is_file():  # written last: its presence means a complete cache
            _build_row_cache(bundle, folder)
        self.folder = folder
        self.table = pa.ipc.open_file(pa.memory_map(str(folder / ROWS_FILE))).read_all()
        self.groups = np.load(folder / GROUPS_FILE, mmap_mode="r")
        self.keys = np.load(folder / KEYS_FILE, mmap_mode="r")
        self.order = np.load(folder / ORDER_FILE, mmap_mode="r")
        if not len(self.table) == len(self.groups) == len(bundle):
            raise RuntimeError(f"row cache {folder} does not match bundle {bundle.path}; delete it")

    def __len__(self) -> int:
        return len(self.table)

    def rows(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """The rows ``ids`` (row ids of the bundle), as dicts of :attr:`COLUMNS`."""
        return self.table.take(pa.array(np.asarray(ids, dtype=np.int64))).to_pylist()

    def row_of_key(self, key: str) -> int | None:
        """Row id of sample ``key``, by binary search in the sorted keys; None if absent."""
        needle = key.encode("utf-8")
        if len(needle) > self.keys.dtype.itemsize:
            return None
        at = int(np.searchsorted(self.keys, needle))
        if at < len(self.keys) and self.keys[at] == needle:
            return int(self.order[at])
        return None


def _build_row_cache(bundle: Bundle, folder: Path) -> None:
    """Write the row cache into a temporary folder, then rename it into place (complete or absent)."""
    log.info("knn: deriving the row cache of bundle %s (once per bundle) in %s", bundle.path, folder)
    tmp = unique_tmp_path(folder)
    tmp.mkdir(parents=True)
    try:
        keys: list[np.ndarray] = []
        schema = pa.schema([(c, pa.string()) for c in RowStore.COLUMNS])
        with pa.ipc.new_file(str(tmp / ROWS_FILE), schema) as sink:
            for part in list_partitions(bundle.path / EMBEDDINGS):
                meta = part.metadata(list(RowStore.COLUMNS))
                batch = pa.table([meta.column(c).cast(pa.string()) for c in RowStore.COLUMNS], schema=schema)
                sink.write_table(batch)
                keys.append(np.asarray(meta.column("key").to_numpy(zero_copy_only=False), dtype=bytes))
        groups = pq.read_table(bundle.path / TABLE_NAME, columns=["image_group_id"]).column(0).to_numpy()
        np.save(tmp / GROUPS_FILE, groups.astype(np.int64))
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype="S1")
        order = np.argsort(all_keys, kind="stable")
        np.save(tmp / KEYS_FILE, all_keys[order])
        np.save(tmp / ORDER_FILE, order.astype(np.int64))
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another replica on this node finished first: its copy is the same
            if not (folder / ORDER_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ServeOptions:
    """How answers are shaped: where clients reach the images, and the request limits."""

    public_url: str
    limits: Limits = field(default_factory=Limits)
    include_images: bool = False


class ServedBundle:
    """A bundle answering clip back's queries; thread-safe, one per replica and served name."""

    def __init__(self, name: str, path: str | Path, cache_dir: str | Path, options: ServeOptions):
        self.name = name
        self.bundle = open_bundle(path, verify=False)
        self.rows = RowStore(self.bundle, cache_dir)
        self.options = options
        shards = self.bundle.manifest.get("config", {}).get("bundle", {}).get("shards") or ""
        self.images = TarImageIndex(shards) if shards else None  # a bundle built from embeddings alone
        self._model: Any = None
        self._model_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.bundle.dim

    # queries -----------------------------------------------------------------------------------

    def model(self) -> Any:
        """The bundle's CLIP model on this replica, loaded at the first text or image query."""
        with self._model_lock:
            if self._model is None:
                self._model = self.bundle.clip_model("cuda" if _has_cuda() else "cpu")
            return self._model

    def query_vector(self, request: KnnRequest) -> np.ndarray:
        """The request's query as a ``(dim,)`` float32 vector (the search L2-normalises it)."""
        if request.embedding is not None:
            vector = np.asarray(request.embedding, dtype=np.float32)
            if vector.shape != (self.dim,):
                raise BadRequest(f"embedding_input has {vector.size} numbers; this index needs {self.dim}")
            if not np.any(vector):
                raise BadRequest("embedding_input is all zeros")
            return vector  # normalised by the search, once, as a direct search_embeddings call does
        if request.text is not None:
            return self.model().encode_texts([request.text], 1).astype(np.float32)[0]
        data = request.image if request.image is not None else self._download(request.image_url or "")
        decoded = decode_image(data, self.options.limits.max_image_pixels)
        if decoded.image is None:
            status = 413 if reason_of(decoded.error or "") == DECOMPRESSION_BOMB else 400
            raise BadRequest(f"the query image cannot be used: {decoded.error}", status=status)
        model = self.model()
        pixels = np.asarray(fit_to_model(decoded.image, model.spec.preprocess), dtype=np.uint8)[None]
        return model.encode_images(pixels, 1).astype(np.float32)[0]

    def _download(self, url: str) -> bytes:
        limit = self.options.limits.max_image_bytes
        try:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
                data = response.read(limit + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BadRequest(f"image_url could not be fetched: {exc}") from exc
        if len(data) > limit:
            raise BadRequest(f"the image at image_url is over {limit} bytes", status=413)
        return data

    # search ------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, row ids)`` of the ``k`` nearest rows to each query, best first (ids -1 past N)."""
        if modality == "image":
            return self.bundle.search_embeddings(queries, k)
        return _exact_search(self._caption_embeddings, normalize(queries), k)

    @cached_property
    def _caption_embeddings(self) -> list[np.ndarray]:
        """The partitions' ``text_emb`` arrays, memory-mapped at the first text-modality query."""
        partitions = list_partitions(self.bundle.path / EMBEDDINGS)
        if not all(p.has(TEXT_EMB) for p in partitions):
            raise BadRequest(
                f"{self.name} has no caption embeddings ({TEXT_EMB}/): modality=text is unavailable"
            )
        return [p.embeddings(TEXT_EMB, mmap=True) for p in partitions]

    def answer(self, request: KnnRequest, scores: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
        """clip back's answer from one query's search results (``scores``, ``ids``: 1-D, best first)."""
        found = ids >= 0
        scores, ids = scores[found], ids[found]
        if request.deduplicate and len(ids):
            # The best result of each image-duplicate group, in rank order.
            _, first = np.unique(np.asarray(self.rows.groups[ids]), return_index=True)
            keep = np.sort(first)
            scores, ids = scores[keep], ids[keep]
        described = self.rows.rows(ids[: request.num_images])
        results = []
        for rank, (row_id, score) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True)):
            result: dict[str, Any] = {}
            if rank < len(described):
                row = described[rank]
                result = {"url": self.image_url(row["key"]), "caption": row["caption"]}
                if self.options.include_images:
                    image = self.images.image(row["shard"], row["key"]) if self.images else None
                    result["image"] = None if image is None else _b64(image)
            result.update(id=int(row_id), similarity=float(score))
            results.append(result)
        return results

    # rows and images ---------------------------------------------------------------------------

    def image_url(self, key: str) -> str:
        query = urllib.parse.urlencode({"indice_name": self.name})
        return f"{self.options.public_url}/image/{urllib.parse.quote(key, safe='')}?{query}"

    def metadata(self, ids: list[int]) -> list[dict[str, Any]]:
        """``/metadata``: each id with its row (original ``url`` as ``original_url``)."""
        if any(not 0 <= i < len(self.rows) for i in ids):
            raise BadRequest(f"ids must be row ids in [0, {len(self.rows)})")
        out = []
        for row_id, row in zip(ids, self.rows.rows(np.asarray(ids, dtype=np.int64)), strict=True):
            meta = {"url": self.image_url(row["key"]), "caption": row["caption"], "key": row["key"]}
            out.append({"id": row_id, "metadata": {**meta, "original_url": row["url"]}})
        return out

    def image(self, key: str) -> tuple[bytes, str]:
        """The encoded image of sample ``key``, read from its shard, and its media type."""
        if self.images is None:
            raise BadRequest(f"{self.name} was built from embeddings alone: it has no images", status=404)
        row = self.rows.row_of_key(key)
        if row is None:
            raise BadRequest(f"no sample with key {key!r} in {self.name}", status=404)
        (described,) = self.rows.rows(np.asarray([row]))
        data = self.images.image(described["shard"], key)
        if data is None:
            raise BadRequest(f"the image of {key!r} is not in the shards at {self.images.folder}", status=404)
        kind = next((kind for magic, kind in MEDIA_TYPES.items() if data.startswith(magic)), None)
        return data, kind or "application/octet-stream"


def _exact_search(parts: list[np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of unit ``queries`` against row-normalised partitions, one at a time."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    start = 0
    for part in parts:
        scores = queries @ normalize(part).T
        ids = np.broadcast_to(np.arange(start, start + len(part)), scores.shape)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids], axis=1)
        if best_scores.shape[1] > k:
            top = np.argpartition(-best_scores, k, axis=1)[:, :k]
            best_scores = np.take_along_axis(best_scores, top, axis=1)
            best_ids = np.take_along_axis(best_ids, top, axis=1)
        start += len(part)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    scores, ids = np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_ids, order, axis=1)
    if scores.shape[1] < k:  # fewer rows than k: pad as faiss does
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.finfo(np.float32).min)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores.astype(np.float32), ids


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
