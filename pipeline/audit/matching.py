"""Similarity through the bundle: the matcher for audit samples, and training images for the report.

The matcher compares an audit sample with the bundle by SSCD, CLIP or nL2 similarity, and finds
G_dup's duplicated caption y_N by the authors' rule (:class:`NearestCaptions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.amg import NormalizedL2Backend, OpenClipBackend, PixelL2Backend, SSCDBackend
from pipeline.amg.memory_index import FlatVectors
from pipeline.audit.layout import SIMILARITIES
from pipeline.bundle.layout import IMAGE_DUPLICATES
from pipeline.bundle.reader import Bundle, check_model_file, open_bundle
from pipeline.core.config import AuditConfig
from pipeline.core.neighbours import DuplicateCaption
from pipeline.io.decode import decode_image
from pipeline.io.embeddings import IMG_EMB, SSCD_EMB, load_metadata
from pipeline.io.images import ShardImages

log = logging.getLogger(__name__)

#: Largest bundle the nl2 similarity decodes into RAM (pixels of every training image).
NL2_MAX_ROWS = 200_000
#: Rows to search: every training row, or only the rows whose image is duplicated (DuplicatedRows).
MATCH_ROWS = ("all", "duplicated")
#: Largest number of duplicated rows :class:`DuplicatedRows` holds in RAM.
DUPLICATED_MAX_ROWS = 5_000_000


@dataclass
class Matcher:
    """The audit's similarity: a backend, the bundle's index over that backend's vectors, and image access.

    Attributes:
        backend: a :class:`~pipeline.amg.SimilarityBackend` making query vectors like the bundle's.
        index: the bundle's :class:`~pipeline.core.neighbours.NeighbourIndex` over them.
        descriptor (`str`): what makes the vectors, for the provenance.
        descriptor_checksum (`str`, *optional*): checksum of the descriptor model file.
        training_image (`Callable[[int], bytes | None]`): encoded image of a training row, for the report.
        captions (`NearestCaptions`, *optional*): y_N of the images a detection looks at, for G_dup
            (None: n0's entry in the index).
    """

    backend: Any
    index: Any
    descriptor: str
    descriptor_checksum: str | None
    training_image: Callable[[int], bytes | None]
    captions: NearestCaptions | None = None


class NearestCaptions:
    """y_N by the authors' rule: the dominant caption among the bundle's training images nearest to
    x̂0's CLIP embedding (:meth:`~pipeline.bundle.reader.Bundle.duplicate_caption_near`, with the
    bundle's k and minimum count), whatever similarity σ is measured with. The released code asked
    LAION's kNN service the same question about x̂0.

    Args:
        bundle (`Bundle`): opened with ``kind="img_emb"``.
        clip (`OpenClipBackend`, *optional*): the bundle's own open_clip model, so queries match its
            vectors; loaded from the bundle on first use when not given (an audit whose G_dup never
            asks for y_N never loads it).
        device (`str`, *optional*, defaults to `"cpu"`): where that model is loaded.
    """

    def __init__(self, bundle: Bundle, clip: OpenClipBackend | None = None, device: str = "cpu"):
        self.bundle = bundle
        self.device = device
        self._clip = clip

    @property
    def clip(self) -> OpenClipBackend:
        if self._clip is None:
            loaded = self.bundle.clip_model(self.device)
            self._clip = OpenClipBackend.from_loaded_clip(loaded).to(self.device)
        return self._clip

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[DuplicateCaption]:
        queries = self.clip.embed(images.to(next(self.clip.parameters()).device)).float().cpu().numpy()
        return [self.bundle.duplicate_caption_near(q) for q in queries]


class TrainingImages:
    """Encoded training images of bundle rows, read back from the img2dataset shards the bundle was built
    from (the bundle holds embeddings, not pictures). Shards are found where the manifest says, or in
    ``shards`` when given; a missing shard folder gives None for every row."""

    def __init__(self, bundle, shards: str | Path | None = None):

        self.folder = Path(shards or bundle.manifest.get("config", {}).get("bundle", {}).get("shards") or "")
        meta = load_metadata(bundle.path / "embeddings", ["key", "shard"])
        self.keys = meta.column("key").to_pylist()
        self.shards = meta.column("shard").to_pylist()
        self.images = ShardImages(self.folder)  # one shard at a time: rows are asked for shard by shard

    def __call__(self, row_id: int) -> bytes | None:
        row_id = int(row_id)
        if not 0 <= row_id < len(self.keys) or not self.shards[row_id]:
            return None
        return self.images.image(str(self.shards[row_id]), str(self.keys[row_id]))

    def pixels(self, size: int) -> np.ndarray:
        """Every row's image at ``size``×``size`` as ``(N, 3, size, size)`` float32 in [−1, 1] (row order)."""

        out = np.zeros((len(self.keys), 3, size, size), dtype=np.float32)
        order = sorted(range(len(self.keys)), key=lambda i: (str(self.shards[i]), i))
        for i in order:
            decoded = decode_image(self(i), 89_478_485)
            if decoded.image is None:
                raise FileNotFoundError(
                    f"training image of bundle row {i} (key {self.keys[i]}) not found in "
                    f"{self.folder}; nl2 needs the shards the bundle was built from"
                )
            arr = np.asarray(decoded.image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
            out[i] = arr.transpose(2, 0, 1) / 127.5 - 1
        return out


class DuplicatedRows:
    """The bundle's rows whose image is duplicated at least ``min_copies`` times by the given dedup
    methods, as a :class:`~pipeline.core.neighbours.NeighbourIndex` (row ids stay the bundle's).

    Memorized training images are duplicated ones (Carlini et al. 2023), so n0 may be searched among
    them only. On data whose ordinary pictures all look alike (Fashion-MNIST's trousers), a sample
    that copies nothing is still close to some training picture, and a detector over every row
    cannot tell it from a copy until the last steps; over the duplicated rows it can. The released
    AMG code searched all of LAION; this is a choice of the deployment (``--match-rows``).

    Args:
        index: the bundle's index (``open_bundle``, any kind) or a :class:`PixelIndex` over it.
        bundle (`Bundle`): the bundle whose ``image_duplicates.parquet`` says which rows are duplicated.
        methods (`tuple[str, ...]`, *optional*, defaults to `("exact",)`): dedup links that count
            (``exact``: byte-identical; ``phash``, ``semantic``: near duplicates).
        min_copies (`int`, *optional*, defaults to 2): rows per duplicated image, linked that way.
    """

    def __init__(self, index, bundle: Bundle, methods: tuple[str, ...] = ("exact",), min_copies: int = 2):
        table = pq.read_table(bundle.path / IMAGE_DUPLICATES, columns=["row_id", "group_id", "linked_by"])
        rows = table.column("row_id").to_numpy()
        groups = table.column("group_id").to_numpy()
        linked = np.array(
            [bool(set(str(v).split("|")) & set(methods)) for v in table.column("linked_by").to_pylist()]
        )
        rows, groups = rows[linked], groups[linked]
        ids, counts = np.unique(groups, return_counts=True)
        keep = np.isin(groups, ids[counts >= min_copies])
        self.rows = np.sort(rows[keep]).astype(np.int64)
        if len(self.rows) == 0:
            raise ValueError(f"bundle {bundle.path} has no image duplicated {min_copies}+ times by {methods}")
        if len(self.rows) > DUPLICATED_MAX_ROWS:
            raise ValueError(f"{len(self.rows)} duplicated rows exceed {DUPLICATED_MAX_ROWS} held in RAM")
        self.index = index
        self._flat = FlatVectors(index.embeddings(self.rows), metric=getattr(index, "metric", "ip"))

    @property
    def dim(self) -> int:
        return self._flat.dim

    def __len__(self) -> int:
        return len(self.rows)

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._flat.search_embeddings(queries, k)
        return scores, np.where(ids >= 0, self.rows[np.maximum(ids, 0)], -1)

    def embeddings(self, row_ids: np.ndarray) -> np.ndarray:
        return self.index.embeddings(row_ids)

    def duplicate_caption(self, row_id: int):
        return self.index.duplicate_caption(row_id)

    def row(self, row_id: int) -> dict:
        return self.index.row(row_id)


class PixelIndex(FlatVectors):
    """A :class:`~pipeline.core.neighbours.NeighbourIndex` over training pixels, for the nl2 similarity:
    exact L2 search over every bundle row's image at one size; captions, duplicate captions and row
    metadata are the bundle's."""

    def __init__(self, bundle, pixels: np.ndarray):
        # NormalizedL2Backend's vectors: pixels in [0, 1]
        super().__init__((pixels.reshape(len(pixels), -1).astype(np.float32) + 1) / 2, metric="l2")
        self.bundle = bundle

    def duplicate_caption(self, row_id: int):
        return self.bundle.duplicate_caption(row_id)

    def row(self, row_id: int) -> dict:
        return self.bundle.row(row_id)


def open_matcher(
    bundle: str | Path,
    similarity: str,
    sscd_checkpoint: str | None = None,
    device: str = "cpu",
    pixel_size: int = 32,
    expect: str | None = None,
    match_rows: str = "all",
) -> Matcher:
    """The backend and bundle index for ``similarity``, so that queries are made like the bundle's vectors.

    * ``sscd``: the bundle's ``sscd_emb`` index and the SSCD TorchScript file it was embedded with (the
      manifest's path, or ``sscd_checkpoint``, which must have the manifest's sha256);
    * ``clip``: the bundle's ``img_emb`` index and the open_clip model of its manifest;
    * ``nl2``: Carlini's normalised L2 over every training image at ``pixel_size`` (read from the
      bundle's shards; small bundles only), with the bundle's captions and duplicate counts;
    * ``l2``: the same pixels, σ = the plain RMS distance to n0 (:class:`PixelL2Backend`).

    ``expect`` pins the bundle's root hash (the one the audit's driver checked and recorded).
    ``match_rows="duplicated"`` searches only the rows whose image is byte-identically duplicated
    (:class:`DuplicatedRows`).
    A model file the bundle names is loaded only when the manifest has its sha256 and the file matches.
    """

    if similarity == "sscd":
        index = open_bundle(bundle, verify=False, kind=SSCD_EMB, expect=expect)
        model = index.manifest.get("indexes", {}).get(SSCD_EMB, {}).get("model", {})
        path = sscd_checkpoint or model.get("checkpoint")
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"the SSCD model the bundle was embedded with ({model.get('checkpoint')}) is not here; "
                f"pass --sscd-checkpoint FILE (sha256 {model.get('sha256')})"
            )
        what = "model the bundle's SSCD descriptors were made with"
        digest = check_model_file(path, model.get("sha256"), what, bundle)
        # Queries are prepared as the embed stage prepared the bundle's rows (ImageNet normalisation at
        # the recorded size), not as the released AMG code fed SSCD: the two sides must match.
        backend = SSCDBackend.from_file(
            path, image_size=int(model.get("image_size") or 320), device=device, preprocessing="imagenet"
        )
        descriptor = f"SSCD {path}"
        captions = NearestCaptions(
            open_bundle(bundle, verify=False, kind=IMG_EMB, expect=expect), device=device
        )
    elif similarity == "clip":
        index = open_bundle(bundle, verify=False, kind=IMG_EMB, expect=expect)
        loaded = index.clip_model(device)
        backend = OpenClipBackend.from_loaded_clip(loaded).to(device)
        digest = None
        descriptor = f"open_clip {loaded.spec.name}"
        captions = NearestCaptions(index, backend)
    elif similarity in ("nl2", "l2"):
        base = open_bundle(bundle, verify=False, kind=IMG_EMB, expect=expect)
        if len(base) > NL2_MAX_ROWS:
            raise ValueError(
                f"{similarity} compares pixels with every training image in RAM; the bundle has {len(base)} "
                f"rows (at most {NL2_MAX_ROWS}): use --similarity sscd or clip"
            )
        images = TrainingImages(base)
        index = PixelIndex(base, images.pixels(pixel_size))
        backend = (NormalizedL2Backend if similarity == "nl2" else PixelL2Backend)(image_size=pixel_size)
        digest = None
        descriptor = f"pixels at {pixel_size}x{pixel_size}"
        return Matcher(
            backend,
            _rows(index, base, match_rows),
            descriptor,
            digest,
            images,
            NearestCaptions(base, device=device),
        )
    else:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    return Matcher(
        backend, _rows(index, index, match_rows), descriptor, digest, TrainingImages(index), captions
    )


def _rows(index, bundle: Bundle, match_rows: str):
    if match_rows not in MATCH_ROWS:
        raise ValueError(f"match_rows must be one of {', '.join(MATCH_ROWS)}, got {match_rows!r}")
    return index if match_rows == "all" else DuplicatedRows(index, bundle)


def training_image_reader(
    cfg: AuditConfig, expect: str | None = None
) -> Callable[[int], bytes | None] | None:
    """Encoded bytes of a bundle row's training image (for the report), or None when they cannot be read."""
    try:
        return TrainingImages(open_bundle(cfg.bundle, verify=False, expect=expect))
    except (OSError, ValueError, RuntimeError) as exc:  # the report still renders, with placeholders
        log.warning("no training images for the report: %s", exc)
        return None
