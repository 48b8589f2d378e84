"""Memorization detection: nearest training neighbour n0 of an image and its similarity σ.

:class:`MemorizationDetector` joins a similarity backend, a :class:`~pipeline.core.neighbours.NeighbourIndex`
over that backend's vectors and the threshold schedule of an :class:`~pipeline.amg.config.AMGConfig`.
``detect`` is the cheap path run at every step (one embedding, one index search, no gradient);
``similarity`` re-scores images against the neighbours a detection found, differentiably, for G_sim.
For ``mode="released_pixel"``, ``detect_noised`` compares the current x_t with every training row noised
to the same t (the nl2 index's stored pixels, a fresh seeded noise draw per step) and
``noised_similarity`` is the released σ = −mL2 with the nearest row and the denominator held fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.amg import terms
from pipeline.amg.backends import SimilarityBackend
from pipeline.amg.config import AMGConfig
from pipeline.core.neighbours import DuplicateCaption, NeighbourIndex

#: ``released_pixel`` draws the noise for the training set in chunks of about this many values (memory
#: bound only: the draws are the same for any chunk size).
_NOISE_CHUNK_VALUES = 1 << 22

#: Images (``(B, 3, H, W)`` in [−1, 1], the x̂0 a detection looked at) -> y_N of each.
CaptionLookup = Callable[[torch.Tensor], list[DuplicateCaption]]


class LazyCaptions(Sequence):
    """y_N of a detection's samples, looked up on first use only: the lookup may embed and search,
    and guidance needs it only on the steps where G_dup can apply."""

    def __init__(self, lookup: Callable[[], list[DuplicateCaption]], size: int):
        self._lookup = lookup
        self._size = size
        self._values: list[DuplicateCaption] | None = None

    def _all(self) -> list[DuplicateCaption]:
        if self._values is None:
            self._values = list(self._lookup())
            if len(self._values) != self._size:
                raise RuntimeError(
                    f"the caption lookup gave {len(self._values)} answers for {self._size} images"
                )
        return self._values

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i):
        return self._all()[i]


@dataclass
class Detection:
    """What one detection found for a batch.

    Attributes:
        sigma (`torch.Tensor`): ``(B,)`` similarity to the nearest training neighbour (float32).
        row_ids (`torch.Tensor`): ``(B,)`` index row of n0.
        neighbours (`torch.Tensor`): ``(B, K, D)`` stored vectors, n0 first (K = 1 for cosine backends,
            the nL2 neighbour set otherwise); held constant when differentiating σ.
        captions (`Sequence[DuplicateCaption]`): the duplicated caption (y_N) and its count, per sample
            (n0's, or by the detector's caption lookup; see :class:`MemorizationDetector`).
    """

    sigma: torch.Tensor
    row_ids: torch.Tensor
    neighbours: torch.Tensor
    captions: Sequence[DuplicateCaption]

    def select(self, rows: torch.Tensor) -> Detection:
        """The detection of the samples ``rows`` (a long tensor of batch positions)."""
        rows_list = rows.tolist()
        captions = self.captions
        subset = LazyCaptions(lambda: [captions[i] for i in rows_list], len(rows_list))
        return Detection(self.sigma[rows], self.row_ids[rows], self.neighbours[rows], subset)


class MemorizationDetector:
    """Backend + neighbour index + threshold schedule.

    Args:
        backend (`SimilarityBackend`): embeds images and scores them against neighbours.
        index (`NeighbourIndex`): training rows in the backend's vector space (same ``dim``).
        config (`AMGConfig`, *optional*): threshold schedule, nL2 k and α, memorization threshold;
            defaults to ``AMGConfig.preset(backend=backend.name)``.
        captions (`CaptionLookup`, *optional*): how y_N is found from the images a detection looked at,
            e.g. the authors' rule, the dominant caption among the training images nearest to x̂0
            (:class:`pipeline.audit.matching.NearestCaptions`). Without it, y_N is n0's entry in the
            index (``index.duplicate_caption(n0)``). Looked up only when G_dup may use it.
    """

    def __init__(
        self,
        backend: SimilarityBackend,
        index: NeighbourIndex,
        config: AMGConfig | None = None,
        captions: CaptionLookup | None = None,
    ):
        if index.dim != backend.dim:
            raise ValueError(
                f"the index holds {index.dim}-d vectors but the {backend.name} backend makes "
                f"{backend.dim}-d ones"
            )
        if len(index) == 0:
            raise ValueError("the neighbour index is empty")
        self.backend = backend
        self.index = index
        self.caption_lookup = captions
        self._released_rows: torch.Tensor | None = None  # released_pixel's training pixels, on first use
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
        if self.caption_lookup is None:
            rows = row_ids.tolist()
            captions = LazyCaptions(lambda: [self.index.duplicate_caption(int(r)) for r in rows], len(rows))
        else:
            lookup, pixels = self.caption_lookup, images.detach()
            captions = LazyCaptions(lambda: lookup(pixels), len(pixels))
        return Detection(sigma.float(), row_ids, neighbours, captions)

    def similarity(self, images: torch.Tensor, detection: Detection) -> torch.Tensor:
        """σ of ``images`` against ``detection``'s neighbours (n0 held constant); differentiable."""
        return self.backend.score(self.backend.embed(images), detection.neighbours)

    # ------------------------------------------------------------------ released_pixel
    def _clean_rows(self, device: torch.device) -> torch.Tensor:
        """Every training row as a ``(N, D)`` float32 pixel vector in [−1, 1] (cached)."""
        rows = self._released_rows
        if rows is None:
            if self.backend.name != "nl2":
                raise ValueError("released_pixel compares pixels: it needs the nl2 backend's pixel index")
            n = len(self.index)
            if n > self.config.noised_max_rows:
                raise ValueError(
                    f"released_pixel compares x_t with every training row at every step; the index has {n} "
                    f"rows, more than AMGConfig.noised_max_rows = {self.config.noised_max_rows}"
                )
            # The nl2 index stores (image + 1)/2 flattened (C, H, W): back to the sampler's [−1, 1].
            vectors = np.asarray(self.index.embeddings(np.arange(n)), dtype=np.float32)
            rows = torch.from_numpy(vectors) * 2 - 1
            self._released_rows = rows
        return rows.to(device)

    @torch.no_grad()
    def detect_noised(self, x_t: torch.Tensor, alpha_bar: torch.Tensor, step: int) -> NoisedDetection:
        """``released_pixel``: σ = −mL2 of the current x_t against the training set noised to the same t.

        The released code compares x_t, not x̂0, with ``q_sample(train, t)`` = √ᾱ_t·x0 + √(1 − ᾱ_t)·z,
        fresh z at every step, and takes mL2 = ℓ2(x_t, nearest)/(α·mean of the k smallest ℓ2), ℓ2 the RMS
        difference. Here z comes from ``numpy.random.default_rng([config.noise_seed, step])``, drawn row
        by row in index order (so chunking does not change it), and is the same for every sample of the
        batch. The released code draws the noised set twice per search (once for the distances, once
        for the nearest row it differentiates against); one draw serves both here.

        Args:
            x_t (`torch.Tensor`): ``(B, 3, S, S)`` samples at the index's pixel size S.
            alpha_bar (`torch.Tensor`): ᾱ_t of the step.
            step (`int`): loop index, which seeds the noise.
        """
        cfg = self.config
        batch = x_t.shape[0]
        queries = x_t.reshape(batch, -1)
        if queries.shape[1] != self.index.dim:
            raise ValueError(
                f"released_pixel compares x_t with the training pixels: the sample has {queries.shape[1]} "
                f"values, the index rows {self.index.dim} (same channels and size needed)"
            )
        # float64: distances by the matrix-product expansion (fast) keep ~1e-10 accuracy near a copy.
        dtype = torch.float64
        queries = queries.to(dtype)
        clean = self._clean_rows(queries.device)
        n, dim = clean.shape
        alpha_bar = torch.as_tensor(alpha_bar, dtype=dtype, device=queries.device)
        rng = np.random.default_rng([int(cfg.noise_seed), int(step)])
        chunk = max(1, _NOISE_CHUNK_VALUES // dim)
        distances = torch.empty(batch, n, dtype=dtype, device=queries.device)
        best = torch.full((batch,), math.inf, dtype=dtype, device=queries.device)
        nearest = torch.zeros(batch, dim, dtype=dtype, device=queries.device)
        for start in range(0, n, chunk):
            rows = clean[start : start + chunk].to(dtype)
            noise = torch.from_numpy(rng.standard_normal(tuple(rows.shape), dtype=np.float32))
            noised = terms.q_sample(rows, alpha_bar, noise.to(device=queries.device, dtype=dtype))
            d = torch.cdist(queries, noised) / math.sqrt(dim)
            distances[:, start : start + len(rows)] = d
            low, where = d.min(dim=1)
            better = low < best  # strict: the first of equal rows wins, as argmin
            nearest[better] = noised[where[better]]
            best = torch.where(better, low, best)
        ml2, row_ids, denominator = terms.released_nl2(distances, cfg.nl2_k, cfg.nl2_alpha)
        return NoisedDetection((-ml2).float(), row_ids.cpu(), nearest, denominator)

    def noised_similarity(self, x_t: torch.Tensor, detection: NoisedDetection) -> torch.Tensor:
        """σ = −ℓ2(x_t, nearest)/denominator with the noised nearest row and the denominator held fixed,
        as the released gradient has it; differentiable in ``x_t``."""
        queries = x_t.reshape(x_t.shape[0], -1)
        nearest = detection.nearest.to(queries)[:, None, :]
        return -self.backend.distances(queries, nearest)[:, 0] / detection.denominator.to(queries)


@dataclass
class NoisedDetection:
    """What :meth:`MemorizationDetector.detect_noised` found (``released_pixel``).

    Attributes:
        sigma (`torch.Tensor`): ``(B,)`` −mL2 of x_t against the noised training set (float32).
        row_ids (`torch.Tensor`): ``(B,)`` index row of the nearest noised training image.
        nearest (`torch.Tensor`): ``(B, D)`` that noised row, held constant in the gradient.
        denominator (`torch.Tensor`): ``(B,)`` α·mean of the k smallest distances, held constant too.
    """

    sigma: torch.Tensor
    row_ids: torch.Tensor
    nearest: torch.Tensor
    denominator: torch.Tensor

    def select(self, rows: torch.Tensor) -> NoisedDetection:
        """The detection of the samples ``rows`` (a long tensor of batch positions)."""
        return NoisedDetection(
            self.sigma[rows], self.row_ids[rows.cpu()], self.nearest[rows], self.denominator[rows]
        )
