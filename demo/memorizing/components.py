"""Diffusion components built from configs only (no hub): tokenizer, text encoder, VAE, UNets, schedulers.

The tokenizer is OpenAI CLIP's byte-level BPE, rebuilt from the merge list open_clip ships
(``open_clip/bpe_simple_vocab_16e6.txt.gz``) and truncated to its first ``num_merges`` merges: BPE
ranks are ordered, so a prefix of the merge list is itself a valid BPE that splits rarer words into
more pieces. Token ids of everything it keeps are CLIP's own (``"a</w>"`` is 320, ``"cat</w>"`` 2368),
it is a genuine [`CLIPTokenizer`] (``StableDiffusionPipeline`` saves and reloads it), and its small
vocabulary keeps the text encoder's embedding table small.

The tiny text encoder is a randomly initialised, frozen [`CLIPTextModel`]: distinct prompts get
distinct embeddings, which is all a model trained on a handful of captions needs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

#: Sizes of CLIP's vocabulary layout: 256 byte symbols, 256 of them word-final, then merges, then 2 specials.
_BYTE_SYMBOLS = 256


def clip_bpe_file() -> Path:
    """open_clip's bundled CLIP merge list."""
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(num_merges: int = 4000, max_length: int = 32) -> CLIPTokenizer:
    """CLIP's BPE tokenizer with the first ``num_merges`` merges, built offline.

    Args:
        num_merges (`int`, *optional*, defaults to 4000): merges kept (CLIP has 48,894).
        max_length (`int`, *optional*, defaults to 32): ``model_max_length`` (CLIP uses 77).
    """
    from open_clip.tokenizer import bytes_to_unicode

    with gzip.open(clip_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the truncated CLIP vocabulary")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_text_encoder(
    tokenizer: CLIPTokenizer, hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> CLIPTextModel:
    """A random, frozen CLIP text transformer sized for ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.eval().requires_grad_(False)


def tiny_vae(
    channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4, sample_size: int = 64, seed: int = 0
) -> AutoencoderKL:
    """An [`AutoencoderKL`] downsampling by 2^(len(channels) − 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=16,
            sample_size=sample_size,
        )


def tiny_cond_unet(
    sample_size: int = 16,
    in_channels: int = 4,
    cross_attention_dim: int = 32,
    channels: tuple[int, int] = (32, 64),
    seed: int = 0,
) -> UNet2DConditionModel:
    """A two-level [`UNet2DConditionModel`] with cross-attention at the lower level."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=16,
        )


def tiny_uncond_unet(
    sample_size: int = 32,
    channels: tuple[int, ...] = (32, 64, 64),
    num_class_embeds: int | None = None,
    seed: int = 0,
    image_channels: int = 3,
) -> UNet2DModel:
    """A pixel-space [`UNet2DModel`]; ``num_class_embeds`` makes it class-conditional."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=sample_size,
            in_channels=image_channels,
            out_channels=image_channels,
            block_out_channels=channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            norm_num_groups=16,
            num_class_embeds=num_class_embeds,
        )


def sd_schedulers(num_train_timesteps: int = 1000) -> tuple[DDPMScheduler, DDIMScheduler]:
    """Stable Diffusion v1's noise schedule (scaled-linear β, 0.00085 to 0.012), for training and sampling."""
    kwargs = {
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
    }
    return DDPMScheduler(**kwargs), DDIMScheduler(**kwargs, set_alpha_to_one=False, steps_offset=1)


def pixel_schedulers(num_train_timesteps: int = 1000) -> tuple[DDPMScheduler, DDIMScheduler]:
    """DDPM's linear β schedule (1e-4 to 0.02) for pixel-space models, training and sampling."""
    kwargs = {"num_train_timesteps": num_train_timesteps, "beta_schedule": "linear", "clip_sample": True}
    return DDPMScheduler(**kwargs), DDIMScheduler(**kwargs)


def tiny_sd_components(seed: int = 0, sample_size: int = 8) -> dict:
    """Random tiny Stable Diffusion components (for tests): 32×32 images, 8×8×4 latents."""
    tokenizer = build_clip_tokenizer(num_merges=1000, max_length=16)
    _, ddim = sd_schedulers()
    return {
        "unet": tiny_cond_unet(sample_size=sample_size, cross_attention_dim=32, seed=seed),
        "vae": tiny_vae(channels=(16, 32, 32), sample_size=sample_size * 4, seed=seed),
        "text_encoder": tiny_text_encoder(tokenizer, hidden_size=32, seed=seed),
        "tokenizer": tokenizer,
        "scheduler": ddim,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }
