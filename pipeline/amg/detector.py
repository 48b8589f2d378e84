"""Memorization detection: nearest training neighbour n0 of an image and its similarity σ.

:class:`MemorizationDetector` joins a similarity backend, a :class:`~pipeline.core.neighbours.NeighbourIndex`
over that backend's vectors and the threshold schedule of an :class:`~pipeline.amg.config.AMGConfig`.
``detect`` is the cheap path run at every step (one embedding, one index search, no gradient);
``similarity`` re-scores images against the neighbours a detection found, differentiably, for G_sim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.amg import terms
from pipeline.amg.backends import SimilarityBackend
from pipeline.amg.config import AMGConfig
from pipeline.core.neighbours import DuplicateCaption, NeighbourIndex


@dataclass
class Detection:
    """What one detection found for a batch.

    Attributes:
        sigma (`torch.Tensor`): ``(B,)`` similarity to the nearest training neighbour (float32).
        row_ids (`torch.Tensor`): ``(B,)`` index row of n0.
        neighbours (`torch.Tensor`): ``(B, K, D)`` stored vectors, n0 first (K = 1 for cosine backends,
            the nL2 neighbour set otherwise); held constant when differentiating σ.
        captions (`list[DuplicateCaption]`): n0's duplicated caption (y_N) and its count, per sample.
    """

    sigma: torch.Tensor
    row_ids: torch.Tensor
    neighbours: torch.Tensor
    captions: list[DuplicateCaption]

    def select(self, rows: torch.Tensor) -> Detection:
        """The detection of the samples ``rows`` (a long tensor of batch positions)."""
        rows_list = rows.tolist()
        return Detection(
            self.sigma[rows], self.row_ids[rows], self.neighbours[rows], [self.captions[i] for i in rows_list]
        )


class MemorizationDetector:
    """Backend + neighbour index + threshold schedule.

    Args:
        backend (`SimilarityBackend`): embeds images and scores them against neighbours.
        index (`NeighbourIndex`): training rows in the backend's vector space (same ``dim``).
        config (`AMGConfig`, *optional*): threshold schedule, nL2 k and α, memorization threshold;
            defaults to ``AMGConfig.preset(backend=backend.name)``.
    """

    def __init__(self, backend: SimilarityBackend, index: NeighbourIndex, config: AMGConfig | None = None):
        if index.dim != backend.dim:
            raise ValueError(
                f"the index holds {index.dim}-d vectors but the {backend.name} backend makes "
                f"{backend.dim}-d ones"
            )
        if len(index) == 0:
            raise ValueError("the neighbour index is empty")
        self.backend = backend
        self.index = index
        self.config = config if config is not None else AMGConfig.preset(backend=backend.name)
        if self.config.backend != backend.name:
            raise ValueError(
                f"config is for backend {self.config.backend!r} but the backend is {backend.name!r}"
            )
        if backend.name == "nl2":
            backend.neighbours_needed = self.config.nl2_k
            backend.alpha = self.config.nl2_alpha

    @property
    def k(self) -> int:
        """Neighbours fetched per query."""
        return max(1, min(self.backend.neighbours_needed, len(self.index)))

    def threshold(self, t: float, num_train_timesteps: int) -> float:
        """λ_t."""
        return terms.threshold(t, num_train_timesteps, self.config)

    def memorized(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ above the memorization threshold (SSCD > 0.5, nL2 < 1.4 by default)."""
        return sigma > self.config.memorized_threshold

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Detection:
        """Find n0 for each image (``(B, 3, H, W)`` in [−1, 1]) and score it; no gradient."""
        queries = self.backend.embed(images).float()
        _, ids = self.index.search_embeddings(queries.cpu().numpy(), self.k)
        ids = np.asarray(ids, dtype=np.int64)
        if (ids < 0).any():
            raise RuntimeError("the neighbour index returned fewer rows than asked for")
        vectors = torch.from_numpy(np.asarray(self.index.embeddings(ids.reshape(-1)), dtype=np.float32))
        neighbours = vectors.reshape(ids.shape[0], ids.shape[1], -1).to(queries.device)
        if self.backend.metric == "l2" and ids.shape[1] > 1:
            # Exact distances decide n0 (the index may be approximate or rank ties differently).
            order = self.backend.distances(queries, neighbours).argsort(dim=1)
            neighbours = torch.gather(neighbours, 1, order[..., None].expand_as(neighbours))
            ids = np.take_along_axis(ids, order.cpu().numpy(), axis=1)
        sigma = self.backend.score(queries, neighbours)
        row_ids = torch.from_numpy(ids[:, 0].copy())
        captions = [self.index.duplicate_caption(int(r)) for r in row_ids.tolist()]
        return Detection(sigma.float(), row_ids, neighbours, captions)

    def similarity(self, images: torch.Tensor, detection: Detection) -> torch.Tensor:
        """σ of ``images`` against ``detection``'s neighbours (n0 held constant); differentiable."""
        return self.backend.score(self.backend.embed(images), detection.neighbours)
