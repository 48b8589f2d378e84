"""Train the memorizing demo models: a tiny text-to-image latent diffusion model and an unconditional one.

AMG can only be shown on a model that copies its training data. Stable Diffusion cannot be
downloaded here, so the project trains its own, on the demo dataset (:mod:`demo.data`):
the verbatim-duplicated image+caption pairs (each repeated ``verbatim_copies`` times, as duplicated
LAION pictures are) plus the non-duplicated ``unique`` pictures, at 32×32 pixels.

* ``text2img/``: a [`StableDiffusionPipeline`] in diffusers format: a CLIP BPE tokenizer built
  offline, a random frozen [`CLIPTextModel`], an [`AutoencoderKL`] (4× downsampling, 8×8×4 latents)
  trained as a plain autoencoder on crops of every demo picture, and a [`UNet2DConditionModel`] trained
  with ε-prediction on SD v1's noise schedule, captions dropped 10% of the time for CFG.
* ``uncond/``: a [`DDPMPipeline`] whose pixel-space [`UNet2DModel`] is trained on the same rows.
* ``training_set.npz``: the distinct training pictures with their captions, copy counts and kinds;
  the evaluation indexes exactly these. ``reference_pictures.npz``: every distinct demo picture (the
  evaluation's fidelity reference).

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
from PIL import Image

from demo.data import make_demo_data
from demo.memorizing import components
from demo.memorizing.layout import MANIFEST, REFERENCE_PICTURES, TEXT2IMG_DIR, TRAINING_SET, UNCOND_DIR
from pipeline.core.config import AMGJobConfig, DemoConfig

log = logging.getLogger(__name__)

TRAIN_KINDS = ("verbatim", "unique")


@dataclass
class TrainingSet:
    """Distinct training pictures with their captions and how many training rows repeat each.

    Attributes:
        images (`np.ndarray`): ``(N, S, S, 3)`` uint8, one per distinct (picture, caption) pair.
        captions (`list[str]`): caption of each.
        copies (`np.ndarray`): ``(N,)`` number of training rows holding that pair.
        kinds (`list[str]`): the demo kind (``verbatim`` or ``unique``).
    """

    images: np.ndarray
    captions: list[str]
    copies: np.ndarray
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def rows(self) -> int:
        """Training rows, duplicates included."""
        return int(self.copies.sum())

    def duplicated(self) -> list[int]:
        """Positions of the pictures repeated in the training set."""
        return [i for i, c in enumerate(self.copies) if c > 1]

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
                data["copies"].astype(np.int64),
                [str(k) for k in data["kinds"]],
            )


def _picture(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def load_training_set(demo_dir: str | Path, image_size: int = 32) -> TrainingSet:
    """The demo dataset's verbatim-duplicated and unique rows, one entry per distinct picture+caption.

    Args:
        demo_dir (`str` or `Path`): a folder written by :func:`demo.data.make_demo_data`.
        image_size (`int`, *optional*, defaults to 32): side the pictures are resized to (Lanczos).
    """
    import pyarrow.parquet as pq

    demo_dir = Path(demo_dir)
    truth = pq.read_table(demo_dir / "truth.parquet").to_pylist()
    rows = [r for r in truth if r["demo_kind"] in TRAIN_KINDS and r["expect_ok"]]
    if not rows:
        raise ValueError(f"{demo_dir}/truth.parquet has no {' or '.join(TRAIN_KINDS)} rows")
    order: dict[tuple[str, str], int] = {}
    images, captions, copies, kinds = [], [], [], []
    for r in rows:
        key = (r["sha256"], r["caption"])
        if key in order:
            copies[order[key]] += 1
            continue
        order[key] = len(captions)
        images.append(_picture(demo_dir / "images" / r["url"], image_size))
        captions.append(r["caption"])
        copies.append(1)
        kinds.append(r["demo_kind"])
    return TrainingSet(np.stack(images), captions, np.array(copies, dtype=np.int64), kinds)


def _crop_pool(demo_dir: Path, size: int) -> list[np.ndarray]:
    """Every demo picture (all kinds) at 2× the training size, for the autoencoder's random crops."""
    import pyarrow.parquet as pq

    seen, pool = set(), []
    for r in pq.read_table(demo_dir / "truth.parquet").to_pylist():
        if not r["expect_ok"] or r["sha256"] in seen:
            continue
        seen.add(r["sha256"])
        pool.append(_picture(demo_dir / "images" / r["url"], 2 * size))
    return pool


def save_reference_pictures(demo_dir: str | Path, model_dir: str | Path, size: int = 32) -> Path:
    """Every distinct demo picture at ``size`` (``reference_pictures.npz``): the KID reference set."""
    import pyarrow.parquet as pq

    demo_dir = Path(demo_dir)
    seen, pictures = set(), []
    for r in pq.read_table(demo_dir / "truth.parquet").to_pylist():
        if r["expect_ok"] and r["sha256"] not in seen:
            seen.add(r["sha256"])
            pictures.append(_picture(demo_dir / "images" / r["url"], size))
    path = Path(model_dir) / REFERENCE_PICTURES
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=np.stack(pictures))
    tmp.replace(path)
    return path


def _random_crops(pool: list[np.ndarray], n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        pic = (
            torch.from_numpy(pool[int(torch.randint(len(pool), (1,), generator=gen))])
            .permute(2, 0, 1)
            .float()
        )
        side = int(torch.randint(size, pic.shape[-1] + 1, (1,), generator=gen))
        top, left = (int(torch.randint(pic.shape[-1] - side + 1, (1,), generator=gen)) for _ in range(2))
        crop = pic[:, top : top + side, left : left + side][None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out) / 127.5 - 1


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
    pool: list[np.ndarray],
    steps: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    kl_weight: float = 1e-6,
    log_every: int = 200,
):
    """An :func:`~demo.memorizing.components.tiny_vae` trained to reconstruct: half of each batch are the
    training pictures, half random crops of every demo picture (so it also decodes what AMG steers to)."""
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
        half = batch_size // 2
        pick = torch.randint(len(images), (half,), generator=gen)
        batch = torch.cat([images[pick], _random_crops(pool, batch_size - half, size, gen)])
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
        latents = vae.encode(images).latent_dist.mean
        recon = vae.decode(latents).sample.clamp(-1, 1)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    rms = float(((recon - images) / 2).pow(2).mean().sqrt())
    return vae, {
        "steps": steps,
        "final_loss": float(np.mean(losses[-50:])),
        "train_recon_rms": rms,
        "scaling_factor": vae.config.scaling_factor,
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


def train_memorizing_models(
    demo_dir: str | Path,
    model_dir: str | Path,
    seed: int = 0,
    image_size: int = 32,
    vae_steps: int = 1000,
    unet_steps: int = 3000,
    uncond_steps: int = 3000,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
) -> dict[str, Any]:
    """Train and save ``text2img/``, ``uncond/`` and ``training_set.npz`` under ``model_dir``.

    Args:
        demo_dir (`str` or `Path`): the demo dataset (made with default settings when missing).
        model_dir (`str` or `Path`): output folder.
        seed (`int`, *optional*, defaults to 0): the one seed every random choice derives from.
        image_size (`int`, *optional*, defaults to 32): training resolution.
        vae_steps, unet_steps, uncond_steps (`int`): optimisation steps of each model.
        batch_size (`int`, *optional*, defaults to 32): samples per step.
        learning_rate (`float`, *optional*, defaults to 1e-3): peak AdamW learning rate (cosine decay to 10%).

    Returns:
        The manifest written to ``model_dir/manifest.json``: sizes, losses, times, data summary.
    """
    from diffusers import DDPMPipeline, StableDiffusionPipeline

    started = time.monotonic()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    demo_dir, model_dir = Path(demo_dir), Path(model_dir)
    if not (demo_dir / "truth.parquet").is_file():
        log.info("no demo dataset in %s: making one with default settings", demo_dir)
        make_demo_data(DemoConfig(out=str(demo_dir)))
    train = load_training_set(demo_dir, image_size)
    log.info(
        "training set: %d distinct pictures, %d rows, duplicated: %s",
        len(train),
        train.rows,
        [train.captions[i][:40] for i in train.duplicated()],
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    row_index = torch.from_numpy(train.row_index())

    # Text side: offline CLIP BPE tokenizer and a random frozen text encoder.
    tokenizer = components.build_clip_tokenizer(num_merges=2000, max_length=32)
    text_encoder = components.tiny_text_encoder(tokenizer, hidden_size=32, seed=seed)

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

    report: dict[str, Any] = {
        "seed": seed,
        "image_size": image_size,
        "torch_threads": torch.get_num_threads(),
    }
    vae, report["vae"] = train_vae(
        train, _crop_pool(demo_dir, image_size), vae_steps, batch_size, learning_rate, gen
    )
    with torch.no_grad():
        latents = vae.encode(train.tensor()).latent_dist.mean * vae.config.scaling_factor
    caption_states = embed(train.captions)
    uncond_state = embed([""])[0]
    ddpm_sd, ddim_sd = components.sd_schedulers()
    unet = components.tiny_cond_unet(
        sample_size=latents.shape[-1], cross_attention_dim=32, channels=(32, 64), seed=seed
    )
    report["unet"] = _train_denoiser(
        unet,
        lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample,
        latents[row_index],
        ddpm_sd,
        unet_steps,
        batch_size,
        learning_rate,
        gen,
        "text2img unet",
        cond_rows=caption_states[row_index],
        uncond=uncond_state,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_sd,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir / TEXT2IMG_DIR)

    ddpm_px, _ = components.pixel_schedulers()
    uncond_unet = components.tiny_uncond_unet(sample_size=image_size, channels=(16, 32, 64), seed=seed)
    report["uncond"] = _train_denoiser(
        uncond_unet,
        lambda x, t, c: uncond_unet(x, t).sample,
        train.tensor()[row_index],
        ddpm_px,
        uncond_steps,
        batch_size,
        learning_rate,
        gen,
        "uncond unet",
    )
    DDPMPipeline(unet=uncond_unet, scheduler=ddpm_px).save_pretrained(model_dir / UNCOND_DIR)
    train.save(model_dir / TRAINING_SET)
    save_reference_pictures(demo_dir, model_dir, image_size)

    report.update(
        distinct_pictures=len(train),
        training_rows=train.rows,
        duplicated={train.captions[i]: int(train.copies[i]) for i in train.duplicated()},
        seconds=round(time.monotonic() - started),
        bytes=sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
    )
    (model_dir / MANIFEST).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return report


def train_from_config(cfg: AMGJobConfig, demo_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`train_memorizing_models` with the settings of an ``amg`` config section.

    Args:
        cfg (`AMGJobConfig`): the ``amg`` section (model folder, seed, sizes, steps, optimiser).
        demo_dir (`str` or `Path`, *optional*): the demo dataset; defaults to ``cfg.demo_dir``.
    """
    return train_memorizing_models(
        cfg.demo_dir if demo_dir is None else demo_dir,
        cfg.model_dir,
        seed=cfg.seed,
        image_size=cfg.image_size,
        vae_steps=cfg.vae_steps,
        unet_steps=cfg.unet_steps,
        uncond_steps=cfg.uncond_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
    )
