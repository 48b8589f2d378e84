"""What an embedding folder depends on, known without importing torch or open_clip.

A job whose outputs are up to date must say so in about a second, and importing open_clip (torch,
timm, transformers) takes several. So the embed stage's fingerprint and the bundle's are made from
the options, the model files' content and open_clip's version, never from a loaded model or
open_clip's registry; :func:`pipeline.embed.clip_models.clip_spec` reads those only when there is work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.config import EmbedConfig
from pipeline.core.storage import sha256_file
from pipeline.core.versions import installed_version

TINY_MODEL = "tiny"
#: Seed of every random initialisation (the tiny preset, or an architecture asked for without weights).
RANDOM_INIT_SEED = 0
#: The tiny preset: ViT with 16 patches of 16 px, 64-wide towers of two layers, 32-token captions.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def model_identity(cfg: EmbedConfig) -> dict[str, Any]:
    """The model behind the embeddings: its name, its weights by content, and the open_clip release.

    By content, not path or mtime: weights replaced in place under the same path are a new model
    (hashing a ViT-L checkpoint takes seconds, once per run). open_clip's version stands for the
    architecture configs and preprocessing it ships; the tiny preset's config is this project's own.

    Raises:
        FileNotFoundError: the checkpoint file does not exist.
    """
    identity: dict[str, Any] = {
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "open_clip": installed_version("open_clip_torch"),
    }
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {cfg.checkpoint} does not exist")
        identity["checkpoint_sha256"] = sha256_file(cfg.checkpoint)
    if cfg.model == TINY_MODEL:
        identity["tiny_config"] = TINY_CONFIG
    return identity


def resolve_precision(requested: str, device: str) -> str:
    """The precision a model runs in: fp32 on CPU; on GPU (``device`` ``cuda``) the requested one,
    ``auto`` meaning fp16.

    fp16 keeps more mantissa than bf16 for CLIP inference, runs on every CUDA GPU and is what
    clip-retrieval uses; bf16 is there for models whose activations overflow fp16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if device != "cuda":
        return "fp32"
    return "fp16" if requested == "auto" else requested
