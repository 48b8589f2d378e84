"""Model factory for the embedding stage: open_clip models (and SSCD copy-detection descriptors).

One entry point, :func:`load_clip`, covers the three ways a model is named in :class:`EmbedConfig`:

* an open_clip architecture with a pretrained tag (``--model ViT-B-32 --pretrained laion2b_s34b_b79k``),
  downloaded from the hub on clusters;
* an architecture with a local checkpoint file (``--checkpoint PATH``);
* the offline ``tiny`` preset: a small config registered with open_clip (64 px images, a narrow
  two-layer transformer), randomly initialised with a fixed seed, so tests and the demo run on a CPU
  with no network. Its embeddings are deterministic but carry no meaning, and everything it writes
  says so (``semantic=False``).

Asked-for weights that cannot be loaded raise :class:`ModelLoadError`; there is never a silent
fallback to random weights.

The image preprocessing is split in two so the object store carries small uint8 pictures: the
geometric part of open_clip's eval transform (resize, crop) runs in the CPU decode tasks
(:func:`pipeline.embed.embed.fit_to_model`), the float conversion and normalisation run next to the model
(:meth:`LoadedClip.encode_images`). :func:`clip_spec` derives everything the decode tasks need from
open_clip's configs alone, without building the model or touching the network.

All encoders run fixed-size batches (the last one padded): a row's embedding then does not depend on
which other rows share its batch, so re-runs and retries reproduce outputs bit for bit on a machine.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import open_clip.factory
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image

from pipeline.core.config import EmbedConfig
from pipeline.embed.identity import RANDOM_INIT_SEED, TINY_CONFIG, TINY_MODEL, resolve_precision

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# SSCD was trained on ImageNet-normalised inputs (facebookresearch/sscd-copy-detection README).
SSCD_MEAN = (0.485, 0.456, 0.406)
SSCD_STD = (0.229, 0.224, 0.225)


class ModelLoadError(RuntimeError):
    """Weights that were asked for could not be loaded (no network, unknown file, wrong architecture)."""


def register_tiny() -> None:
    """Make ``tiny`` a model name open_clip knows (``create_model``, ``get_tokenizer``); idempotent.

    open_clip registers configs from JSON files only; the preset lives in code, so it goes straight
    into open_clip's registry (looked up on the module each time: open_clip rebinds it on rescans).
    """
    registry = open_clip.factory._MODEL_CONFIGS
    if TINY_MODEL not in registry:
        registry[TINY_MODEL] = TINY_CONFIG


@dataclass(frozen=True)
class ClipSpec:
    """What the pipeline knows about a model before loading it: labels, output size, preprocessing.

    Attributes:
        arch (`str`): open_clip architecture name.
        pretrained (`str`, *optional*): pretrained tag, if one was asked for.
        checkpoint (`str`, *optional*): local checkpoint file, if one was asked for.
        name (`str`): label written to metadata, markers and logs.
        semantic (`bool`): False for random weights, whose embeddings carry no meaning.
        dim (`int`): embedding width.
        preprocess (`dict`): open_clip ``PreprocessCfg`` fields (size, mean, std, interpolation, ...).
        quick_gelu (`bool`): the pretrained tag was trained with QuickGELU activations.
    """

    arch: str
    pretrained: str | None
    checkpoint: str | None
    name: str
    semantic: bool
    dim: int
    preprocess: dict[str, Any]
    quick_gelu: bool = False


def clip_spec(cfg: EmbedConfig) -> ClipSpec:
    """Check the model options and describe the model from open_clip's configs (no weights, no network).

    Raises:
        ValueError: unknown architecture or tag, or contradictory options.
        FileNotFoundError: the checkpoint file does not exist.
    """
    register_tiny()
    arch = cfg.model
    if ":" in arch:
        raise ValueError(
            f"model {arch!r}: only built-in open_clip names are supported (with --pretrained or --checkpoint)"
        )
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(
            f"unknown open_clip model {arch!r}; known: {TINY_MODEL}, {', '.join(open_clip.list_models())}"
        )
    if cfg.pretrained and cfg.checkpoint:
        raise ValueError("give either --pretrained or --checkpoint, not both")
    preprocess = asdict(PreprocessCfg())
    tag_cfg: dict[str, Any] = {}
    if cfg.pretrained:
        if arch == TINY_MODEL:
            raise ValueError(
                "the tiny preset has no pretrained weights (use --checkpoint for trained tiny weights)"
            )
        tag_cfg = open_clip.get_pretrained_cfg(arch, cfg.pretrained)
        if not tag_cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ValueError(f"unknown pretrained tag {cfg.pretrained!r} for {arch}; known: {tags}")
        preprocess = merge_preprocess_dict(preprocess, tag_cfg)
        name = f"{arch}/{cfg.pretrained}"
    elif cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {cfg.checkpoint} does not exist")
        name = f"{arch}@{Path(cfg.checkpoint).name}"
    else:
        name = f"{arch}-random-seed{RANDOM_INIT_SEED}"
    size = model_cfg["vision_cfg"]["image_size"]
    preprocess["size"] = (size, size) if isinstance(size, int) else tuple(size)
    square = preprocess["size"][0] == preprocess["size"][1]
    if not (preprocess["resize_mode"] == "squash" or (preprocess["resize_mode"] == "shortest" and square)):
        raise ValueError(
            f"{name}: preprocessing {preprocess['resize_mode']!r} to {preprocess['size']} is not supported "
            "by the embed stage (supported: 'shortest' to a square, or 'squash')"
        )
    return ClipSpec(
        arch=arch,
        pretrained=cfg.pretrained,
        checkpoint=cfg.checkpoint,
        name=name,
        semantic=bool(cfg.pretrained or cfg.checkpoint),
        dim=int(model_cfg["embed_dim"]),
        preprocess=preprocess,
        quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
    )


def fetch_weights(spec: ClipSpec) -> None:
    """Download a pretrained tag's weights into the local cache now, so a job fails before any work starts.

    Raises:
        ModelLoadError: the weights cannot be fetched (no network, hub error).
    """
    if not spec.pretrained:
        return
    try:
        open_clip.download_pretrained(open_clip.get_pretrained_cfg(spec.arch, spec.pretrained))
    except Exception as exc:
        raise ModelLoadError(_refusal(spec, exc)) from exc


@dataclass
class LoadedClip:
    """A ready model with its tokenizer and preprocessing; see :func:`load_clip`.

    Attributes:
        model: the open_clip model, in eval mode on ``device``.
        preprocess: open_clip's full eval transform (PIL image -> normalised tensor).
        tokenizer: open_clip tokenizer (list of strings -> token ids).
        name (`str`): label for outputs and logs.
        semantic (`bool`): False for random weights.
        dim (`int`): embedding width.
        spec (`ClipSpec`): what the model was loaded from.
        device (`torch.device`): where it runs.
        dtype (`torch.dtype`): its weights' dtype.
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    name: str
    semantic: bool
    dim: int
    spec: ClipSpec
    device: torch.device
    dtype: torch.dtype

    def encode_images(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Unit-norm float16 embeddings of uint8 ``(N, H, W, 3)`` pictures already resized and cropped."""
        mean, std = self.spec.preprocess["mean"], self.spec.preprocess["std"]

        def encode(chunk: torch.Tensor) -> torch.Tensor:
            return self.model.encode_image(normalize_pixels(chunk, mean, std, self.dtype))

        inputs = torch.from_numpy(np.ascontiguousarray(pixels))
        return encode_fixed_batches(encode, inputs, batch_size, self.device, self.dim)

    def encode_texts(self, captions: Sequence[str], batch_size: int) -> np.ndarray:
        """Unit-norm float16 caption embeddings; each distinct caption is encoded once."""
        unique = list(dict.fromkeys(captions))
        tokens = self.tokenizer(unique) if unique else torch.zeros(0, dtype=torch.long)
        embeddings = encode_fixed_batches(self.model.encode_text, tokens, batch_size, self.device, self.dim)
        index = {caption: i for i, caption in enumerate(unique)}
        return embeddings[[index[caption] for caption in captions]]


def load_clip(cfg: EmbedConfig, device: torch.device | str, precision: str = "fp32") -> LoadedClip:
    """Build the model of ``cfg`` on ``device``; the one factory every stage, test and benchmark uses.

    Args:
        cfg (`EmbedConfig`): ``model`` with ``pretrained`` or ``checkpoint`` (or neither: random weights).
        device (`torch.device` or `str`): where the model runs.
        precision (`str`): ``fp32``, ``fp16``, ``bf16`` or ``auto``, resolved by :func:`resolve_precision`.

    Raises:
        ModelLoadError: asked-for weights could not be loaded; no random fallback.
    """
    spec = clip_spec(cfg)
    device = torch.device(device)
    precision = resolve_precision(precision, device.type)
    weights = spec.pretrained or spec.checkpoint
    if not spec.semantic:
        log.warning("%s: random weights (seed %d), embeddings are NOT semantic", spec.name, RANDOM_INIT_SEED)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(
                spec.arch,
                pretrained=weights,
                precision=precision,
                device=device,
                force_quick_gelu=spec.quick_gelu,
                require_pretrained=bool(weights),
            )
    except Exception as exc:
        if weights:
            raise ModelLoadError(_refusal(spec, exc)) from exc
        raise
    model.eval()
    _check_preprocess(spec, open_clip.get_model_preprocess_cfg(model))
    return LoadedClip(
        model=model,
        preprocess=image_transform_v2(PreprocessCfg(**spec.preprocess), is_train=False),
        tokenizer=open_clip.get_tokenizer(spec.arch),
        name=spec.name,
        semantic=spec.semantic,
        dim=spec.dim,
        spec=spec,
        device=device,
        dtype=_TORCH_DTYPES[precision],
    )


def _refusal(spec: ClipSpec, exc: BaseException) -> str:
    return (
        f"could not load weights for {spec.name} ({type(exc).__name__}: {exc}); refusing to fall back to "
        "random weights. The jobs run offline (HF_HUB_OFFLINE=1) unless HF_HUB_OFFLINE=0 is exported: "
        "allow downloads, pre-fetch the weights into the Hugging Face cache, or pass --checkpoint PATH."
    )


def _check_preprocess(spec: ClipSpec, actual: dict[str, Any]) -> None:
    """The decode tasks preprocess with ``spec``; make sure the built model agrees with it."""

    def canonical(cfg: dict[str, Any]) -> dict[str, Any]:
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return {**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}, "size": size}

    if canonical(actual) != canonical(spec.preprocess):
        raise RuntimeError(
            f"{spec.name}: model preprocessing {actual} differs from the derived {spec.preprocess}"
        )


def normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised ``(N, 3, H, W)`` in ``dtype``, as ToTensor + Normalize do."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t).to(dtype)


@torch.inference_mode()
def encode_fixed_batches(
    encode: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dim: int,
) -> np.ndarray:
    """Run ``encode`` over ``inputs`` in batches of ``batch_size`` rows; unit-norm float16 ``(N, dim)``.

    The last batch is padded with zeros, so kernels see one shape and a row's result does not depend
    on its neighbours (matmul kernels pick different blockings for different batch sizes).
    """
    outputs = [torch.zeros((0, dim), dtype=torch.float16)]
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        rows = len(chunk)
        if rows < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((batch_size - rows, *chunk.shape[1:]))])
        embedded = encode(chunk.to(device, non_blocking=True))[:rows]
        outputs.append(F.normalize(embedded.float(), dim=-1).half().cpu())
    return torch.cat(outputs).numpy()


@dataclass
class LoadedSSCD:
    """An SSCD TorchScript descriptor model; inputs are uint8 ``(N, S, S, 3)`` squashed to ``image_size``."""

    model: torch.jit.ScriptModule
    image_size: int
    dim: int
    device: torch.device

    def encode(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Unit-norm float16 copy-detection descriptors (fp32 compute: TorchScript keeps its own dtypes)."""

        def encode(chunk: torch.Tensor) -> torch.Tensor:
            return self.model(normalize_pixels(chunk, SSCD_MEAN, SSCD_STD, torch.float32))

        inputs = torch.from_numpy(np.ascontiguousarray(pixels))
        return encode_fixed_batches(encode, inputs, batch_size, self.device, self.dim)


def load_sscd(path: str | Path, image_size: int, device: torch.device | str) -> LoadedSSCD:
    """Load an SSCD TorchScript file and probe its descriptor width with one blank picture.

    Raises:
        ModelLoadError: the file is missing or is not a TorchScript image model.
    """
    device = torch.device(device)
    try:
        # SSCD is released only as TorchScript (sscd_disc_mixup.torchscript.pt): torch 2.9+ deprecates
        # torch.jit.load with a FutureWarning per load (driver and every actor) that names no way to
        # load such a file without it. Only that warning, only around this load.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
            model = torch.jit.load(str(path), map_location=device).eval()
        with torch.inference_mode():
            probe = model(torch.zeros(1, 3, image_size, image_size, device=device))
    except Exception as exc:
        raise ModelLoadError(
            f"could not load SSCD TorchScript model {path}: {type(exc).__name__}: {exc}"
        ) from exc
    if probe.ndim != 2:
        raise ModelLoadError(f"SSCD model {path} returned shape {tuple(probe.shape)}, expected (N, dim)")
    return LoadedSSCD(model=model, image_size=image_size, dim=int(probe.shape[1]), device=device)
