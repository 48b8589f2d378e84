"""Train the memorizing models: a text-to-image latent diffusion model and a class-conditional pixel DDPM.

AMG can only be shown on a model that copies some training data and generalizes on the rest. Stable
Diffusion cannot be downloaded here, so the project trains its own, on Fashion-MNIST
(:mod:`demo.memorizing.fashion_set`): 500 pictures per class with generic captions ("a photo of a
sneaker") plus six planted pictures, each with a unique caption and repeated verbatim ×16, ×64 or
×256.

* ``text2img/``: a [`StableDiffusionPipeline`] in diffusers format: a CLIP BPE tokenizer built
  offline, a random frozen [`CLIPTextModel`], an [`AutoencoderKL`] (4× downsampling, 8×8×4 latents)
  trained as a plain autoencoder on the training pictures, and a [`UNet2DConditionModel`] trained with
  ε-prediction on SD v1's noise schedule, captions dropped 10% of the time for CFG.
* ``pixel/``: a [`DDPMPipeline`] whose pixel-space [`UNet2DModel`] is class-conditional (the planted
  pictures carry their true class) and grey (one channel), the analogue of the paper's
  class-conditional CIFAR-10 model.
* ``training_set.npz``: the distinct training pictures with captions, labels, copy counts and kinds;
  the evaluation and the demo bundle index exactly these.

Every random choice derives from one seed; on one machine and thread count a re-run gives the same
weights. :func:`train_memorizing_models` is the library entry point of ``jobs/train_memorizing_model.py``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from demo.memorizing import components
from demo.memorizing.fashion_set import PLANTED, FashionData, generic_caption, load_fashion_data
from demo.memorizing.layout import MANIFEST, PIXEL_DIR, TEXT2IMG_DIR, TRAINING_SET
from pipeline.core.config import AMGJobConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """Distinct training pictures with their captions and how many training rows repeat each.

    Attributes:
        images (`np.ndarray`): ``(N, S, S, 3)`` uint8, one per distinct (picture, caption) pair.
        captions (`list[str]`): caption of each.
        labels (`np.ndarray`): ``(N,)`` Fashion-MNIST class of each.
        copies (`np.ndarray`): ``(N,)`` number of training rows holding that pair.
        kinds (`list[str]`): ``generic`` or ``planted``.
    """

    images: np.ndarray
    captions: list[str]
    labels: np.ndarray
    copies: np.ndarray
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def rows(self) -> int:
        """Training rows, duplicates included."""
        return int(self.copies.sum())

    def planted(self) -> list[int]:
        """Positions of the planted pictures."""
        return [i for i, k in enumerate(self.kinds) if k == "planted"]

    def tensor(self) -> torch.Tensor:
        """``(N, 3, S, S)`` float images in [−1, 1]."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 127.5 - 1

    def row_index(self) -> np.ndarray:
        """For each training row (duplicates repeated), its distinct picture's position."""
        return np.repeat(np.arange(len(self)), self.copies)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            images=self.images,
            captions=np.array(self.captions),
            labels=self.labels,
            copies=self.copies,
            kinds=np.array(self.kinds),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TrainingSet:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                data["images"],
                [str(c) for c in data["captions"]],
                data["labels"].astype(np.int64),
                data["copies"].astype(np.int64),
                [str(k) for k in data["kinds"]],
            )


def build_training_set(data: FashionData) -> TrainingSet:
    """The generic pictures (one row each) followed by the planted ones (``copies`` rows each)."""
    planted_captions = [caption for _, caption, _ in PLANTED]
    return TrainingSet(
        images=np.concatenate([data.generic, data.planted]),
        captions=[generic_caption(int(c)) for c in data.generic_labels] + planted_captions,
        labels=np.concatenate([data.generic_labels, data.planted_labels]),
        copies=np.array([1] * len(data.generic) + [copies for _, _, copies in PLANTED], dtype=np.int64),
        kinds=["generic"] * len(data.generic) + ["planted"] * len(PLANTED),
    )


def _lr(step: int, steps: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_vae(
    train: TrainingSet,
    steps: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    kl_weight: float = 1e-6,
    log_every: int = 200,
):
    """A :func:`~demo.memorizing.components.tiny_vae` trained to reconstruct the distinct training
    pictures (each equally often, flipped half the time, so it also decodes what AMG steers to)."""
    size = train.images.shape[1]
    vae = components.tiny_vae(
        channels=(16, 32, 64), sample_size=size, seed=int(torch.randint(2**31, (1,), generator=gen))
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    images = train.tensor()
    losses = []
    started = time.monotonic()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, lr))
        batch = images[torch.randint(len(images), (batch_size,), generator=gen)]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info(
                "vae step %d/%d loss %.4f (%.0fs)",
                step + 1,
                steps,
                np.mean(losses[-log_every:]),
                time.monotonic() - started,
            )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(512)])
        recon = torch.cat([vae.decode(z).sample for z in latents.split(512)]).clamp(-1, 1)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    rms = ((recon - images) / 2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return vae, {
        "steps": steps,
        "final_loss": float(np.mean(losses[-50:])),
        "train_recon_rms": float(rms.mean()),
        "train_recon_rms_p99": float(rms.quantile(0.99)),
        "scaling_factor": vae.config.scaling_factor,
        "seconds": round(time.monotonic() - started),
    }


def _train_denoiser(
    model,
    forward,
    x0_rows: torch.Tensor,
    scheduler,
    steps: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    name: str,
    cond_rows: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    p_uncond: float = 0.1,
    log_every: int = 200,
):
    """ε-prediction training; every training row (duplicates included) is equally likely per draw."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    alphas = scheduler.alphas_cumprod
    losses = []
    started = time.monotonic()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, lr))
        pick = torch.randint(len(x0_rows), (batch_size,), generator=gen)
        x0 = x0_rows[pick]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        ab = alphas[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        cond = None
        if cond_rows is not None:
            cond = cond_rows[pick].clone()
            if uncond is not None:
                drop = torch.rand(batch_size, generator=gen) < p_uncond
                cond[drop] = uncond
        loss = F.mse_loss(forward(x_t, t, cond), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info(
                "%s step %d/%d loss %.4f (%.0fs)",
                name,
                step + 1,
                steps,
                np.mean(losses[-log_every:]),
                time.monotonic() - started,
            )
    model.eval().requires_grad_(False)
    return {
        "steps": steps,
        "final_loss": float(np.mean(losses[-200:])),
        "seconds": round(time.monotonic() - started),
    }


def _tokenized_embedder(tokenizer, text_encoder):
    def embed(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            return text_encoder(ids)[0]

    return embed


def train_text2img(train: TrainingSet, out: Path, settings: AMGJobConfig) -> dict[str, Any]:
    """Train and save the text-to-image pipeline under ``out``; returns its part of the manifest."""
    from diffusers import StableDiffusionPipeline

    seed = settings.seed
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = components.build_clip_tokenizer(num_merges=2000, max_length=32)
    text_encoder = components.tiny_text_encoder(tokenizer, hidden_size=32, seed=seed)
    embed = _tokenized_embedder(tokenizer, text_encoder)
    report: dict[str, Any] = {}
    vae, report["vae"] = train_vae(
        train, settings.vae_steps, settings.batch_size, settings.learning_rate, gen
    )
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in train.tensor().split(512)])
        latents = latents * vae.config.scaling_factor
    distinct = list(dict.fromkeys(train.captions))
    states = embed(distinct)
    caption_row = torch.tensor([distinct.index(c) for c in train.captions])
    row_index = torch.from_numpy(train.row_index())
    ddpm_sd, ddim_sd = components.sd_schedulers()
    unet = components.tiny_cond_unet(
        sample_size=latents.shape[-1],
        cross_attention_dim=32,
        channels=(settings.unet_width, 2 * settings.unet_width),
        seed=seed,
    )
    report["unet"] = _train_denoiser(
        unet,
        lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample,
        latents[row_index],
        ddpm_sd,
        settings.unet_steps,
        settings.batch_size,
        settings.learning_rate,
        gen,
        "text2img unet",
        cond_rows=states[caption_row[row_index]],
        uncond=embed([""])[0],
    )
    report["unet"]["parameters"] = sum(p.numel() for p in unet.parameters())
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_sd,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    ).save_pretrained(out)
    return report


def train_pixel(train: TrainingSet, out: Path, settings: AMGJobConfig) -> dict[str, Any]:
    """Train and save the class-conditional pixel DDPM under ``out``; returns its part of the manifest."""
    from diffusers import DDPMPipeline

    seed = settings.seed
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    row_index = torch.from_numpy(train.row_index())
    ddpm_px, _ = components.pixel_schedulers()
    unet = components.tiny_uncond_unet(
        image_channels=1,  # grey, as the data is: three channels drift apart into colour casts
        sample_size=train.images.shape[1],
        channels=(settings.pixel_width, 2 * settings.pixel_width, 2 * settings.pixel_width),
        num_class_embeds=int(train.labels.max()) + 1,
        seed=seed,
    )
    labels = torch.from_numpy(train.labels)
    report = _train_denoiser(
        unet,
        lambda x, t, c: unet(x, t, class_labels=c).sample,
        train.tensor()[row_index, :1],
        ddpm_px,
        settings.pixel_steps,
        settings.batch_size,
        settings.learning_rate,
        gen,
        "pixel unet",
        cond_rows=labels[row_index],
        uncond=None,
        p_uncond=0.0,
    )
    report["parameters"] = sum(p.numel() for p in unet.parameters())
    DDPMPipeline(unet=unet, scheduler=ddpm_px).save_pretrained(out)
    return report


def train_memorizing_models(
    settings: AMGJobConfig, parts: tuple[str, ...] = ("text2img", "pixel")
) -> dict[str, Any]:
    """Train and save ``parts`` and ``training_set.npz`` under ``settings.model_dir``.

    Args:
        settings (`AMGJobConfig`): model folder, seed, data size, model sizes, steps, optimiser.
        parts (`tuple[str, ...]`, *optional*): ``text2img`` and/or ``pixel``; a manifest already in
            the folder keeps the entries of the parts not trained now.

    Returns:
        The manifest written to ``model_dir/manifest.json``: sizes, losses, times, data summary.
    """
    started = time.monotonic()
    model_dir = Path(settings.model_dir)
    data = load_fashion_data(settings.generic_per_class, settings.seed)
    train = build_training_set(data)
    log.info(
        "training set: %d distinct pictures, %d rows; planted: %s",
        len(train),
        train.rows,
        {train.captions[i]: int(train.copies[i]) for i in train.planted()},
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = model_dir / MANIFEST
    report: dict[str, Any] = (
        json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    )
    if "text2img" in parts:
        report["text2img"] = train_text2img(train, model_dir / TEXT2IMG_DIR, settings)
    if "pixel" in parts:
        report["pixel"] = train_pixel(train, model_dir / PIXEL_DIR, settings)
    train.save(model_dir / TRAINING_SET)
    report.update(
        seed=settings.seed,
        torch_threads=torch.get_num_threads(),
        distinct_pictures=len(train),
        training_rows=train.rows,
        generic_per_class=settings.generic_per_class,
        planted={train.captions[i]: int(train.copies[i]) for i in train.planted()},
        bytes=sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
    )
    report.setdefault("seconds", {})["+".join(parts)] = round(time.monotonic() - started)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    return report
