"""Similarity backends for σ_t: SSCD descriptors, open_clip image embeddings, pixel distances.

A backend turns images into the vectors a :class:`~pipeline.core.neighbours.NeighbourIndex` searches
(``embed``) and scores a query against the neighbours the search returned (``score``). Both are
differentiable in the images, which is how G_sim's gradient reaches x_t: x_t → x̂0 → (VAE decoder)
→ ``embed`` → ``score``, with the neighbours held constant.

Images are ``(B, 3, H, W)`` tensors in [−1, 1], what a VAE decoder or a pixel-space UNet's x̂0 gives.

* :class:`SSCDBackend`: a TorchScript copy-detection model (SSCD, Pizzi et al. 2022), σ = dot product
  of L2-normalised descriptors; memorized above 0.5 (Somepalli et al.; AMG paper §4). Its input is
  prepared as the released AMG code prepares x̂0 (``preprocessing="released"``: [−1, 1], 224 px, no
  normalisation), since the thresholds were tuned on that, or as SSCD was trained (``"imagenet"``).
* :class:`OpenClipBackend`: open_clip ``encode_image``, σ = cosine. Its scale differs from SSCD's; set
  the thresholds of :class:`~pipeline.amg.config.AMGConfig` for the model used.
* :class:`NormalizedL2Backend`: pixels, σ = −nL2 with nL2 = ℓ2(x, n0)/(α·mean_{z∈S} ℓ2(x, z)), S the
  k nearest training images (Carlini et al. 2023; AMG paper Eq. 8; k = 50, α = 0.5); memorized when
  nL2 < 1.4.
* :class:`PixelL2Backend`: pixels, σ = −ℓ2(x, n0), the plain RMS distance to the nearest row. Not in the
  paper: for small pictures searched against the duplicated rows only, where nL2's neighbour set
  would be copies of n0 itself and a descriptor scores any item of n0's class as high as a near copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: SSCDBackend input preparations: name -> (default side, keep [−1, 1], ImageNet normalisation, antialias).
#: ``released``: the released AMG code (AMG-sd ``txt2img.py``) resizes the decoded x̂0 bilinearly to
#: 224 (no antialiasing) and feeds it to SSCD in [−1, 1], unnormalised. ``imagenet``: [0, 1] at 320
#: (SSCD's "skew 320" evaluation resize), normalised with ImageNet's mean and std, as SSCD was trained
#: and as the embed stage makes a bundle's ``sscd_emb`` vectors.
SSCD_PREPROCESSING: dict[str, tuple[int, bool, bool, bool | None]] = {
    "released": (224, True, False, False),
    "imagenet": (320, False, True, None),
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_square(images: torch.Tensor, size: int, antialias: bool | None = None) -> torch.Tensor:
    """Differentiable bilinear resize to a ``size``-sided square (antialiased when shrinking, unless
    ``antialias`` says otherwise)."""
    if images.shape[-2:] == (size, size):
        return images
    if antialias is None:
        antialias = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


class SimilarityBackend(torch.nn.Module):
    """Base class: ``embed`` images into index vectors, ``score`` queries against fixed neighbours.

    Attributes:
        name (`str`): label for traces and summaries.
        metric (`str`): ``"ip"`` (inner product, higher is closer) or ``"l2"`` (distance), the FAISS
            metric of an index over this backend's vectors.
        dim (`int`): vector width.
        neighbours_needed (`int`): how many nearest rows ``score`` needs (1, or k for nL2).
    """

    name: str = "backend"
    metric: str = "ip"
    dim: int = 0
    neighbours_needed: int = 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, dim)`` float vectors of ``(B, 3, H, W)`` images in [−1, 1]; differentiable."""
        raise NotImplementedError

    def score(self, queries: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """σ of each query, ``(B,)``, against its neighbours ``(B, K, dim)`` (nearest first)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        return self.score(self.embed(images), neighbours)


class _CosineBackend(SimilarityBackend):
    """Shared part of SSCD and CLIP: resize, normalise, encode, L2-normalise; σ = q·n0.

    ``signed`` keeps the images in [−1, 1] (otherwise [0, 1]); ``normalise`` applies ``mean`` and ``std``;
    ``antialias`` is passed to :func:`resize_square`.
    """

    metric = "ip"

    def __init__(
        self,
        encoder: torch.nn.Module,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        dim: int | None = None,
        signed: bool = False,
        normalise: bool = True,
        antialias: bool | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.image_size = int(image_size)
        self.signed = bool(signed)
        self.normalise = bool(normalise)
        self.antialias = antialias
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if dim is None:
            with torch.no_grad():
                probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.mean.device)
                dim = int(self._encode(probe).shape[-1])
        self.dim = int(dim)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """What reaches the encoder for ``(B, 3, H, W)`` images in [−1, 1]; differentiable."""
        dtype = self.mean.dtype  # float32, or float64 after ``.double()``
        pixels = images.to(dtype)
        if not self.signed:
            pixels = (pixels + 1) / 2  # [−1, 1] -> [0, 1]
        pixels = resize_square(pixels, self.image_size, self.antialias)
        if self.normalise:
            pixels = (pixels - self.mean) / self.std
        return pixels

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._encode(self.preprocess(images)).to(self.mean.dtype), dim=-1)

    def score(self, queries: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        return (queries * neighbours[:, 0].to(queries)).sum(-1)


class SSCDBackend(_CosineBackend):
    """SSCD copy-detection descriptors from a TorchScript file; σ = dot product of normalised descriptors.

    The default input preparation is the released AMG code's, because the constants of the method for
    SSCD (λ_t 0.3–0.4, the 0.5 memorization line, c3's 0.3 offset, c2's 0.3 saturation) were tuned on σ
    measured that way: the decoded x̂0 in [−1, 1], resized bilinearly to 224 px, no normalisation.
    ``"imagenet"`` prepares images as SSCD was trained ([0, 1] at 320 px, ImageNet mean and std),
    which is also how the embed stage makes a bundle's ``sscd_emb`` vectors: queries searched against
    such an index match its vectors only with ``"imagenet"`` (the released code itself compared its
    [−1, 1] query with neighbours embedded from [0, 1] pictures).

    Args:
        model (`torch.nn.Module`): the descriptor network, e.g.
            ``torch.jit.load("sscd_disc_mixup.torchscript.pt")``.
        image_size (`int`, *optional*): side of the square input; defaults to the preparation's (224
            released, 320 imagenet).
        mean (`tuple`, *optional*, defaults to ImageNet's): input normalisation mean (``"imagenet"``).
        std (`tuple`, *optional*, defaults to ImageNet's): input normalisation std (``"imagenet"``).
        preprocessing (`str`, *optional*, defaults to `"released"`): ``"released"`` or ``"imagenet"``
            (see :data:`SSCD_PREPROCESSING`).
    """

    name = "sscd"

    def __init__(
        self,
        model: torch.nn.Module,
        image_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        preprocessing: str = "released",
    ):
        if preprocessing not in SSCD_PREPROCESSING:
            raise ValueError(
                f"SSCDBackend preprocessing must be one of {tuple(SSCD_PREPROCESSING)}, got {preprocessing!r}"
            )
        side, signed, normalise, antialias = SSCD_PREPROCESSING[preprocessing]
        super().__init__(
            model,
            side if image_size is None else image_size,
            mean,
            std,
            signed=signed,
            normalise=normalise,
            antialias=antialias,
        )
        self.preprocessing = preprocessing

    @classmethod
    def from_file(
        cls, path: str | Path, image_size: int | None = None, device: torch.device | str = "cpu", **kwargs
    ) -> SSCDBackend:
        """Load a TorchScript descriptor file (SSCD's released ``*.torchscript.pt``); ``kwargs`` (e.g.
        ``preprocessing``) go to the constructor."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SSCD TorchScript file {path} does not exist")
        # SSCD is released only as TorchScript: torch 2.9+ deprecates torch.jit.load with a FutureWarning
        # per load (every audit actor) that names no way to load such a file without it. Only that
        # warning, only around this load.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
            model = torch.jit.load(str(path), map_location=device).eval()
        return cls(model, image_size=image_size, **kwargs).to(device)


class OpenClipBackend(_CosineBackend):
    """open_clip image embeddings; σ = cosine similarity.

    Args:
        model (`torch.nn.Module`): an open_clip model (its ``encode_image`` is used).
        image_size (`int`): side of the square model input.
        mean (`tuple`, *optional*, defaults to OpenAI CLIP's): input normalisation mean.
        std (`tuple`, *optional*, defaults to OpenAI CLIP's): input normalisation std.
    """

    name = "clip"

    def __init__(
        self,
        model: torch.nn.Module,
        image_size: int,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__(model, image_size, mean, std)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(pixels)

    @classmethod
    def from_loaded_clip(cls, loaded) -> OpenClipBackend:
        """From :class:`pipeline.embed.clip_models.LoadedClip` (the model behind the bundle's embeddings)."""
        size = loaded.spec.preprocess["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(loaded.model, int(size), loaded.spec.preprocess["mean"], loaded.spec.preprocess["std"])


class NormalizedL2Backend(SimilarityBackend):
    r"""Carlini et al.'s normalised L2 in pixel space, as a similarity: σ = −nL2.

    nL2(x) = ℓ2(x, n0) / (α · (1/k)·Σ_{z∈S} ℓ2(x, z)), with S the k nearest training images of x and
    ℓ2 the root-mean-square pixel difference (the normalisation cancels in the ratio).

    Args:
        image_size (`int`, *optional*, defaults to 32): images are compared at this square size.
        k (`int`, *optional*, defaults to 50): neighbour-set size (capped at the index size by the detector).
        alpha (`float`, *optional*, defaults to 0.5): α.
        channels (`int`, *optional*, defaults to 3): image channels (1 for a grey pixel model).
    """

    name = "nl2"
    metric = "l2"

    def __init__(self, image_size: int = 32, k: int = 50, alpha: float = 0.5, channels: int = 3):
        super().__init__()
        self.image_size = int(image_size)
        self.dim = int(channels) * self.image_size * self.image_size
        self.neighbours_needed = int(k)
        self.alpha = float(alpha)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.to(torch.float64 if images.dtype == torch.float64 else torch.float32) + 1) / 2
        return resize_square(pixels, self.image_size).reshape(images.shape[0], -1)

    def distances(self, queries: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """RMS pixel distance of each query to each of its neighbours, ``(B, K)``."""
        diff = queries[:, None, :] - neighbours.to(queries)
        return (diff.pow(2).mean(-1) + 1e-12).sqrt()

    def score(self, queries: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        d = self.distances(queries, neighbours)
        return -d[:, 0] / (self.alpha * d.mean(-1))


class PixelL2Backend(NormalizedL2Backend):
    """Pixels, σ = −ℓ2(x, n0): the RMS difference to the nearest training row, in [0, 1] units.

    Searched over the duplicated rows only (``match_rows="duplicated"``), nL2's denominator would be
    the distance to copies of n0 itself, and a copy descriptor on 28-pixel pictures scores a new item of
    n0's class as high as a near copy (BENCHMARKS.md, "AMG evaluation"). The plain distance keeps both
    apart and its gradient does not fade near a copy, as a cosine's does. λ_t has no published value on
    this scale: calibrate it (``threshold="calibrated"``).

    Args:
        image_size (`int`, *optional*, defaults to 32): images are compared at this square size.
        channels (`int`, *optional*, defaults to 3): image channels.
    """

    name = "l2"

    def __init__(self, image_size: int = 32, channels: int = 3):
        super().__init__(image_size=image_size, k=1, channels=channels)

    def score(self, queries: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        return -self.distances(queries, neighbours[:, :1])[:, 0]
