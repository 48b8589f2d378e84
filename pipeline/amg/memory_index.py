"""An in-memory :class:`~pipeline.core.neighbours.NeighbourIndex` for tests and small training sets.

The production index is the bundle's (FAISS over open_clip or SSCD vectors, a caption-dedup table);
this one holds everything in RAM on a ``faiss.IndexFlatIP`` (cosine backends, L2-normalised vectors)
or ``faiss.IndexFlatL2`` (pixel vectors for nL2, not normalised), and answers ``duplicate_caption``
from exact caption counts over the training rows it was given.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import faiss
import numpy as np
import torch

from pipeline.core.neighbours import DuplicateCaption


class FlatVectors:
    """Exact search over vectors held in RAM: the vector half of a :class:`NeighbourIndex`.

    Args:
        vectors (`np.ndarray`): ``(N, D)`` vectors, one per row (stored as float32).
        metric (`str`): ``"ip"`` (inner products, higher is closer) or ``"l2"`` (squared distances).
    """

    def __init__(self, vectors: np.ndarray, metric: str = "ip"):
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D (N, D), got shape {vectors.shape}")
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        self.metric = metric
        self._vectors = vectors
        flat = faiss.IndexFlatIP if metric == "ip" else faiss.IndexFlatL2
        self._index = flat(vectors.shape[1])
        self._index.add(vectors)

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        return self._index.search(queries, min(int(k), len(self)))

    def embeddings(self, row_ids: np.ndarray) -> np.ndarray:
        return self._vectors[np.asarray(row_ids, dtype=np.int64)]


class InMemoryNeighbourIndex(FlatVectors):
    """Exact nearest-neighbour search over a few thousand vectors, with captions and duplicate counts.

    Args:
        vectors (`np.ndarray`): ``(N, D)`` float32 vectors, one per row.
        captions (`Sequence[str]`): caption of each row.
        metric (`str`, *optional*, defaults to `"ip"`): ``"ip"`` (scores are inner products, higher is
            closer) or ``"l2"`` (scores are squared distances, lower is closer), FAISS conventions.
        caption_counts (`dict[str, int]`, *optional*): how often each caption occurs in the training
            set; defaults to the counts over ``captions``. Give it when rows were deduplicated.
        min_count (`int`, *optional*, defaults to 2): a caption counts as duplicated from this many rows.
        keys (`Sequence[str]`, *optional*): row keys (default: the row number).
        extra (`Sequence[dict]`, *optional*): more metadata per row, merged into :meth:`row`.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        captions: Sequence[str],
        metric: str = "ip",
        caption_counts: dict[str, int] | None = None,
        min_count: int = 2,
        keys: Sequence[str] | None = None,
        extra: Sequence[dict] | None = None,
    ):
        super().__init__(vectors, metric)
        if len(self._vectors) != len(captions):
            raise ValueError(f"vectors {self._vectors.shape} and {len(captions)} captions do not match")
        self._captions = list(captions)
        self._counts = dict(caption_counts) if caption_counts is not None else dict(Counter(self._captions))
        self.min_count = int(min_count)
        self._keys = list(keys) if keys is not None else [str(i) for i in range(len(self))]
        self._extra = list(extra) if extra is not None else [{} for _ in range(len(self))]

    def duplicate_caption(self, row_id: int) -> DuplicateCaption:
        caption = self._captions[int(row_id)]
        count = int(self._counts.get(caption, 1))
        return DuplicateCaption(caption if count >= self.min_count else None, count)

    def row(self, row_id: int) -> dict:
        row_id = int(row_id)
        return {"key": self._keys[row_id], "caption": self._captions[row_id], **self._extra[row_id]}

    @classmethod
    @torch.no_grad()
    def from_images(
        cls,
        backend,
        images: torch.Tensor,
        captions: Sequence[str],
        dedupe: bool = True,
        min_count: int = 2,
        batch_size: int = 64,
        keys: Sequence[str] | None = None,
    ) -> InMemoryNeighbourIndex:
        """Index ``images`` (``(N, 3, H, W)`` in [−1, 1]) with ``backend.embed``.

        Args:
            backend (`SimilarityBackend`): gives the vectors and the metric.
            images (`torch.Tensor`): the training images, one per training row.
            captions (`Sequence[str]`): their captions (duplicates included: they set the counts).
            dedupe (`bool`, *optional*, defaults to `True`): keep one row per distinct (image, caption)
                pair, as the released nL2 code searches a deduplicated training set; caption counts
                still count every row. The number of copies is in ``row(i)["copies"]``.
            min_count (`int`, *optional*, defaults to 2): see the class.
            batch_size (`int`, *optional*, defaults to 64): images per ``embed`` call.
            keys (`Sequence[str]`, *optional*): a key per input row.
        """
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        keys = list(keys) if keys is not None else [str(i) for i in range(len(images))]
        counts = Counter(captions)
        order: list[int] = []
        copies: Counter[str] = Counter()
        digests: list[str] = []
        for i in range(len(images)):
            digest = hashlib.sha1(
                images[i].detach().cpu().numpy().tobytes() + captions[i].encode()
            ).hexdigest()
            digests.append(digest)
            if not (dedupe and copies[digest]):
                order.append(i)
            copies[digest] += 1
        device = next(backend.parameters(), torch.empty(0)).device
        vectors = torch.cat(
            [
                backend.embed(images[order[s : s + batch_size]].to(device)).float().cpu()
                for s in range(0, len(order), batch_size)
            ]
        ).numpy()
        return cls(
            vectors,
            [captions[i] for i in order],
            metric=backend.metric,
            caption_counts=dict(counts),
            min_count=min_count,
            keys=[keys[i] for i in order],
            extra=[{"copies": copies[digests[i]], "source_row": i} for i in order],
        )
