"""AMG evaluation on the memorizing demo models, in the style of the paper's Tables 1–5.

For plain sampling, AMG ``paper``, AMG ``reference`` and each term ablated, it samples the
text-to-image model on every duplicated training caption (and on non-duplicated ones), and the
unconditional model without prompts, then measures:

* **Copying**, with two stated criteria against the exact training set:
  - Carlini et al.'s normalised L2 in pixel space, nL2 = ℓ2(x, n0)/(α·mean ℓ2(x, S)) with S the k = 50
    nearest training pictures (capped at the 32 there are) and α = 0.5; a copy when nL2 < 1.4.
  - The copy descriptor the SSCD backend uses (the offline stand-in of
    :mod:`demo.memorizing.descriptors`, or a real SSCD file); a copy when the similarity exceeds 0.5.
  ``frac_memorized`` counts an image when either criterion flags it. Top-5% and Top-1 follow the
  paper: 95th percentile and maximum of the descriptor similarity, 5th percentile and minimum of nL2.
* **Fidelity proxy** (FID is not computable offline: no Inception weights): the image's denoising
  loss under the unconditional demo model, mean ‖ε − ε_θ(√ᾱ_t·x + √(1−ᾱ_t)·ε, t)‖² over 10 noise
  levels t = 50, 150, …, 950 and 2 fixed noises each, ×100. This is the diffusion ELBO's integrand
  (Ho et al. 2020's L_simple), i.e. a likelihood proxy of the image under a model of the demo pictures:
  lower is more likely. Reference points: the training pictures score 0.9, uniform noise 26. It ranks
  what AMG produces on these models in the order the eye does (copies < colour mush < saturated blobs
  < noise), where the feature-space alternatives tried (KID and Kynkäänniemi precision on random-conv
  or VAE features) ranked uniform noise with or above copies. Caveat: the density model memorized the
  same pictures, so, like FID against the training set, it also rewards copying. KID×10³ on random
  convolutional features is kept in ``summary.json`` only. The mean gradient energy relative to the
  training pictures (``sharpness``, 1 = as sharp as the data) is reported beside it.
* **Text-alignment proxy** (CLIP score needs a trained CLIP): the accuracy with which the generator's
  own conditional model picks the prompt among all 32 training captions from the image (a diffusion
  classifier, Li et al. 2023: the caption with the lowest denoising error over a fixed set of noise
  levels and noises). Our text encoder is random, so this is the only text–image model there is; it
  asks whether the image still depicts the prompt as the model understands it. Higher is better.

:func:`run_amg_evaluation` writes ``summary.json`` (``{"off": {...}, "on": {...}, "modes": {...}}``),
``table.md`` and sample grids to the output folder. ``on`` is AMG ``reference`` with the nL2 backend:
the released constants, and on this model the one released setting that removes every copy (with the
copy-descriptor backend they remove the descriptor's copies but not nL2's; see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from demo.memorizing.descriptors import ThumbnailCopyDescriptor
from demo.memorizing.training import (
    REFERENCE_PICTURES,
    TEXT2IMG_DIR,
    TRAINING_SET,
    UNCOND_DIR,
    TrainingSet,
    train_from_config,
)
from pipeline.amg.backends import NormalizedL2Backend, SSCDBackend
from pipeline.amg.config import AMGConfig
from pipeline.amg.detector import MemorizationDetector
from pipeline.amg.guidance import AntiMemorizationGuidance
from pipeline.amg.memory_index import InMemoryNeighbourIndex
from pipeline.amg.pipelines import AMGDDIMPipeline, AMGStableDiffusionPipeline
from pipeline.amg.sampling import sample_text2img, seeded_generators

log = logging.getLogger(__name__)

NL2_COPY = 1.4
DESCRIPTOR_COPY = 0.5
#: Rows of the text-to-image table: (mode, backend, use_spe, use_dup, use_sim, other AMGConfig changes);
#: None is plain sampling.
TEXT2IMG_MODES: dict[str, tuple[str, str, bool, bool, bool, dict] | None] = {
    "off": None,
    "paper": ("paper", "sscd", True, True, True, {}),
    "paper_strong": ("paper", "sscd", True, True, True, {"c3": 1000.0}),
    "reference": ("reference", "sscd", True, True, True, {}),
    "paper_nl2": ("paper", "nl2", True, True, True, {}),
    "reference_nl2": ("reference", "nl2", True, True, True, {}),
    "paper_detect_every_4": ("paper", "sscd", True, True, True, {"detect_every": 4}),
    "paper_no_sim": ("paper", "sscd", True, True, False, {}),
    "paper_no_spe": ("paper", "sscd", False, True, True, {}),
    "paper_no_dup": ("paper", "sscd", True, False, True, {}),
    "reference_no_sim": ("reference", "sscd", True, True, False, {}),
    "reference_no_spe": ("reference", "sscd", False, True, True, {}),
    "reference_no_dup": ("reference", "sscd", True, False, True, {}),
}
UNCOND_MODES = {"off": None, "paper": "paper", "reference": "reference"}


# ----------------------------------------------------------------------------- models and detectors
def load_models(model_dir: str | Path) -> tuple[AMGStableDiffusionPipeline, AMGDDIMPipeline, TrainingSet]:
    """The committed (or freshly trained) memorizing models and their exact training set."""
    from diffusers import DDIMScheduler

    model_dir = Path(model_dir)
    if not (model_dir / TRAINING_SET).is_file():
        raise FileNotFoundError(f"{model_dir} holds no memorizing models; run jobs/train_memorizing_model.py")
    text2img = AMGStableDiffusionPipeline.from_pretrained(model_dir / TEXT2IMG_DIR)
    text2img.set_progress_bar_config(disable=True)
    uncond = AMGDDIMPipeline.from_pretrained(model_dir / UNCOND_DIR)
    uncond.scheduler = DDIMScheduler.from_config(uncond.scheduler.config)
    uncond.set_progress_bar_config(disable=True)
    return text2img, uncond, TrainingSet.load(model_dir / TRAINING_SET)


def descriptor_backend(sscd_checkpoint: str | None, image_size: int) -> SSCDBackend:
    """SSCD from a TorchScript file, or the offline stand-in descriptor."""
    if sscd_checkpoint:
        return SSCDBackend.from_file(sscd_checkpoint)
    return SSCDBackend(ThumbnailCopyDescriptor(), image_size=image_size)


def training_indexes(train: TrainingSet, sscd_checkpoint: str | None = None) -> dict[str, tuple[Any, Any]]:
    """``{"sscd": (backend, index), "nl2": (backend, index)}`` over the distinct training pictures.

    Caption counts include every duplicated row, so y_N is found for the verbatim-duplicated pictures.
    """
    images = train.tensor()
    captions = [c for c, n in zip(train.captions, train.copies, strict=False) for _ in range(int(n))]
    rows = images[torch.from_numpy(train.row_index())]
    keys = [str(i) for i in train.row_index()]  # the distinct picture each training row holds
    out = {}
    for backend in (
        descriptor_backend(sscd_checkpoint, images.shape[-1]),
        NormalizedL2Backend(images.shape[-1]),
    ):
        out[backend.name] = (
            backend,
            InMemoryNeighbourIndex.from_images(backend, rows, captions, dedupe=True, keys=keys),
        )
    return out


# ----------------------------------------------------------------------------- copy metrics
@torch.no_grad()
def copy_scores(
    images: torch.Tensor, indexes: dict[str, tuple[Any, Any]], k: int = 50, alpha: float = 0.5
) -> dict[str, np.ndarray]:
    """Per image: descriptor similarity and nL2 to the nearest training picture, and its position."""
    cfg_sscd = AMGConfig.preset("reference", "sscd")
    cfg_nl2 = AMGConfig.preset("reference", "nl2", nl2_k=k, nl2_alpha=alpha)
    d_sscd = MemorizationDetector(*indexes["sscd"], cfg_sscd).detect(images)
    d_nl2 = MemorizationDetector(*indexes["nl2"], cfg_nl2).detect(images)
    sscd_rows = [int(indexes["sscd"][1].row(int(r))["key"]) for r in d_sscd.row_ids]
    nl2_rows = [int(indexes["nl2"][1].row(int(r))["key"]) for r in d_nl2.row_ids]
    return {
        "descriptor": d_sscd.sigma.numpy(),
        "descriptor_row": np.array(sscd_rows),
        "nl2": (-d_nl2.sigma).numpy(),
        "nl2_row": np.array(nl2_rows),
    }


# ----------------------------------------------------------------------------- fidelity and alignment
class RandomFeatures(torch.nn.Module):
    """A fixed, randomly initialised conv net (seeded); 512 pooled activations per image."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers, width = [], 3
            for out in (64, 128, 256):
                layers += [torch.nn.Conv2d(width, out, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2)]
                width = out
            self.net = torch.nn.Sequential(*layers).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.net(images.float())
        return torch.cat([h.mean((2, 3)), h.std((2, 3))], dim=1)


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the kernel (xᵀy/d + 1)³ (Bińkowski et al. 2018), features z-scored on ``y``."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")  # the unbiased estimate needs two samples on each side
    mean, std = y.mean(0, keepdims=True), y.std(0, keepdims=True) + 1e-6
    x, y = (x - mean) / std, (y - mean) / std
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


@torch.no_grad()
def denoising_loss(unet, scheduler, images: torch.Tensor, seed: int = 0, noises: int = 2) -> np.ndarray:
    """Per image: mean ‖ε − ε_θ(x_t, t)‖² over t = 50, 150, …, 950 and ``noises`` fixed noises (×100)."""
    gen = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod
    images = images.float()
    if images.shape[-1] != unet.config.sample_size:
        images = F.interpolate(images, size=unet.config.sample_size, mode="bilinear", antialias=True)
    total = torch.zeros(len(images))
    timesteps = range(50, scheduler.config.num_train_timesteps, 100)
    for t in timesteps:
        ab = alphas[t]
        for _ in range(noises):
            noise = torch.randn(images.shape, generator=gen)
            x_t = ab.sqrt() * images + (1 - ab).sqrt() * noise
            total += ((unet(x_t, t).sample - noise) ** 2).flatten(1).mean(1)
    return (100 * total / (len(timesteps) * noises)).numpy()


def gradient_energy(images: torch.Tensor) -> float:
    """Mean squared finite difference of [0, 1] pixels (blur lowers it, noise raises it)."""
    px = (images.float().clamp(-1, 1) + 1) / 2
    return float(
        ((px[..., 1:, :] - px[..., :-1, :]) ** 2).mean() + ((px[..., 1:] - px[..., :-1]) ** 2).mean()
    )


@torch.no_grad()
def diffusion_classifier_accuracy(
    pipe: AMGStableDiffusionPipeline,
    images: torch.Tensor,
    targets: list[int],
    captions: list[str],
    timesteps=(100, 250, 400, 550, 700),
    noises: int = 2,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Share of images whose lowest-denoising-error caption (of ``captions``) is their prompt; the picks."""
    ids = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    states = pipe.text_encoder(ids)[0]
    z0 = pipe.vae.encode(images.float()).latent_dist.mean * pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    probes = [(t, torch.randn(z0.shape[1:], generator=gen)) for t in timesteps for _ in range(noises)]
    ac = pipe.scheduler.alphas_cumprod
    errors = torch.zeros(len(images), len(captions))
    for i in range(len(images)):
        for t, noise in probes:
            ab = ac[t]
            z_t = (ab.sqrt() * z0[i] + (1 - ab).sqrt() * noise).expand(len(captions), -1, -1, -1)
            eps = pipe.unet(z_t, t, encoder_hidden_states=states).sample
            errors[i] += ((eps - noise) ** 2).flatten(1).mean(1)
    picks = errors.argmin(1).numpy()
    return float((picks == np.array(targets)).mean()), picks


def _amg(mode: str, backend_name: str, indexes, overrides: dict[str, dict[str, Any]], **switches):
    cfg = AMGConfig.preset(mode, backend_name, **{**overrides.get(mode, {}), **switches})
    backend, index = indexes[backend_name]
    return AntiMemorizationGuidance(MemorizationDetector(backend, index, cfg))


def _metrics(
    images: torch.Tensor,
    indexes,
    features: RandomFeatures,
    reference_feats: np.ndarray,
    train_energy: float,
    density,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    s = copy_scores(images, indexes)
    copies = (s["nl2"] < NL2_COPY) | (s["descriptor"] > DESCRIPTOR_COPY)
    feats = features(images).numpy()
    return {
        "n": len(images),
        "frac_memorized": float(copies.mean()),
        "frac_nl2_below_1.4": float((s["nl2"] < NL2_COPY).mean()),
        "frac_nl2_below_1.6": float((s["nl2"] < 1.6).mean()),
        "frac_descriptor_above_0.5": float((s["descriptor"] > DESCRIPTOR_COPY).mean()),
        "frac_descriptor_above_0.4": float((s["descriptor"] > 0.4).mean()),
        "descriptor_top5pct": float(np.percentile(s["descriptor"], 95)),
        "descriptor_top1": float(s["descriptor"].max()),
        "nl2_top5pct": float(np.percentile(s["nl2"], 5)),
        "nl2_top1": float(s["nl2"].min()),
        "denoising_loss": float(density(images).mean()),
        "kid_x1000": 1000 * kid(feats, reference_feats),
        "sharpness": gradient_energy(images) / train_energy,
    }, s


def _grid(rows: list[torch.Tensor], path: Path, scale: int = 3) -> None:
    """Save rows of [−1, 1] images as one PNG (rows top to bottom)."""
    tiles = [torch.cat(list(r), dim=-1) for r in rows]
    grid = torch.cat(tiles, dim=-2)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.Resampling.NEAREST).save(
        path
    )


@dataclass
class EvalSettings:
    """What :func:`evaluate` samples: steps, CFG scale, seeds, how many non-duplicated prompts."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    samples_per_prompt: int = 4
    unique_prompts: int = 8
    unique_samples: int = 2
    uncond_samples: int = 32
    seed: int = 0


def evaluate(
    model_dir: str | Path,
    out: str | Path,
    settings: EvalSettings,
    sscd_checkpoint: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    modes: dict[str, tuple[str, str, bool, bool, bool, dict] | None] | None = None,
    on_mode: str = "reference_nl2",
) -> dict[str, Any]:
    """Run the comparison and write ``summary.json``, ``table.md`` and sample grids under ``out``."""
    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    modes = modes if modes is not None else TEXT2IMG_MODES
    pipe, uncond, train = load_models(model_dir)
    indexes = training_indexes(train, sscd_checkpoint)
    features = RandomFeatures(settings.seed)
    reference = _reference_pictures(Path(model_dir), train)
    reference_feats = features(reference).numpy()
    train_images = train.tensor()
    train_energy = gradient_energy(train_images)

    def density(images: torch.Tensor) -> np.ndarray:
        return denoising_loss(uncond.unet, uncond.scheduler, images, seed=settings.seed)

    dup = train.duplicated()
    uniq = [i for i in range(len(train)) if i not in dup][: settings.unique_prompts]
    seeds = [settings.seed + s for s in range(settings.samples_per_prompt)]
    useeds = [settings.seed + s for s in range(settings.unique_samples)]
    dup_targets = [i for i in dup for _ in seeds]
    uniq_targets = [i for i in uniq for _ in useeds]

    summary: dict[str, Any] = {
        "criterion": f"copy = nL2 < {NL2_COPY} (Carlini, k=50 capped at {len(train)}, alpha=0.5) "
        f"or copy descriptor > {DESCRIPTOR_COPY}, against the {len(train)} distinct training pictures",
        "descriptor": "SSCD file " + sscd_checkpoint
        if sscd_checkpoint
        else "offline stand-in (ThumbnailCopyDescriptor)",
        "settings": settings.__dict__,
        "overrides": overrides,
        "duplicated_prompts": [train.captions[i] for i in dup],
        "modes": {},
        "unique_prompts": {},
        "unconditional": {},
    }
    grids: dict[str, torch.Tensor] = {}
    for name, spec in modes.items():
        t0 = time.monotonic()
        amg = None
        if spec is not None:
            mode, backend, spe, dup_term, sim, extra = spec
            amg = _amg(mode, backend, indexes, overrides, use_spe=spe, use_dup=dup_term, use_sim=sim, **extra)
        images, traces = sample_text2img(
            pipe,
            [train.captions[i] for i in dup],
            seeds,
            amg,
            settings.num_inference_steps,
            settings.guidance_scale,
        )
        seconds = time.monotonic() - t0
        row, scores = _metrics(images, indexes, features, reference_feats, train_energy, density)
        row["own_picture_copied"] = float(
            ((scores["nl2"] < NL2_COPY) & (scores["nl2_row"] == np.array(dup_targets))).mean()
        )
        row["alignment_accuracy"], _ = diffusion_classifier_accuracy(
            pipe, images, dup_targets, train.captions, seed=settings.seed
        )
        row["seconds_per_image"] = seconds / len(images)
        if spec is not None:
            steps = [s for tr in traces for s in tr.steps]
            row["fired_steps"] = {
                term: float(np.mean([np.mean(getattr(s, term)) for s in steps]))
                for term in ("spe", "dup", "sim")
            }
        summary["modes"][name] = row
        grids[name] = images[:: settings.samples_per_prompt][: len(dup)]
        log.info("text2img %s: %s", name, {k: v for k, v in row.items() if not isinstance(v, dict)})
        if name in ("off", "paper", "reference"):
            u_images, _ = sample_text2img(
                pipe,
                [train.captions[i] for i in uniq],
                useeds,
                amg,
                settings.num_inference_steps,
                settings.guidance_scale,
            )
            urow, _uscores = _metrics(u_images, indexes, features, reference_feats, train_energy, density)
            urow["alignment_accuracy"], _ = diffusion_classifier_accuracy(
                pipe, u_images, uniq_targets, train.captions, seed=settings.seed
            )
            summary["unique_prompts"][name] = urow

    # Unconditional model: G_sim alone, nL2 backend (the paper's CIFAR-10 setting).
    useeds_u = [settings.seed + s for s in range(settings.uncond_samples)]
    for name, mode in UNCOND_MODES.items():
        amg = None if mode is None else _amg(mode, "nl2", indexes, overrides)
        t0 = time.monotonic()
        res = uncond(
            batch_size=len(useeds_u),
            generator=seeded_generators(useeds_u),
            num_inference_steps=settings.num_inference_steps,
            output_type="pt",
            amg=amg,
        )
        images = res.images * 2 - 1
        row, _ = _metrics(images, indexes, features, reference_feats, train_energy, density)
        row["seconds_per_image"] = (time.monotonic() - t0) / len(images)
        summary["unconditional"][name] = row
        grids["uncond_" + name] = images[:8]
        log.info("uncond %s: %s", name, row)

    train_row = {"n": len(train)}
    train_row["kid_x1000"] = 1000 * kid(features(train_images).numpy(), reference_feats)
    train_row["denoising_loss"] = float(density(train_images).mean())
    noise = torch.rand(train_images.shape, generator=torch.Generator().manual_seed(settings.seed)) * 2 - 1
    summary["uniform_noise"] = {"denoising_loss": float(density(noise).mean())}
    summary["training_pictures"] = train_row
    summary["off"] = {"frac_memorized": summary["modes"]["off"]["frac_memorized"], **summary["modes"]["off"]}
    on_name = on_mode if on_mode in summary["modes"] else next(n for n in summary["modes"] if n != "off")
    summary["on"] = {"mode": on_name, **summary["modes"][on_name]}
    summary["seconds"] = round(time.monotonic() - started)

    _grid([train_images[dup]] + [grids[n] for n in modes], out / "samples_text2img.png")
    _grid([grids["uncond_" + n] for n in UNCOND_MODES], out / "samples_uncond.png")
    (out / "table.md").write_text(markdown_table(summary), encoding="utf-8")
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(_finite(summary), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out / "summary.json")
    return summary


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None, so ``summary.json`` is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _reference_pictures(model_dir: Path, train: TrainingSet) -> torch.Tensor:
    """Every distinct demo picture the manifest points at, else the training pictures alone."""
    manifest = model_dir / REFERENCE_PICTURES
    if manifest.is_file():
        with np.load(manifest) as data:
            return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return train.tensor()


def markdown_table(summary: dict[str, Any]) -> str:
    """Tables in the paper's layout (Table 1/4: text-to-image and ablations; Table 2: unconditional)."""
    lines = [
        "Text-to-image, duplicated prompts "
        f"({len(summary['duplicated_prompts'])} prompts × "
        f"{summary['settings']['samples_per_prompt']} seeds):",
        "",
        "| Mode | Top-5% desc ↓ | Top-1 desc ↓ | %>0.5 desc ↓ | Top-5% nL2 ↑ | Top-1 nL2 ↑ | %<1.4 nL2 ↓ "
        "| % memorized ↓ | own picture ↓ | fidelity: denoising loss ↓ | sharpness | alignment ↑ | s/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["modes"].items():
        lines.append(
            f"| {name} | {r['descriptor_top5pct']:.2f} | {r['descriptor_top1']:.2f} | "
            f"{100 * r['frac_descriptor_above_0.5']:.1f} | {r['nl2_top5pct']:.2f} | {r['nl2_top1']:.2f} | "
            f"{100 * r['frac_nl2_below_1.4']:.1f} | {100 * r['frac_memorized']:.1f} | "
            f"{100 * r['own_picture_copied']:.1f} | {r['denoising_loss']:.1f} | {r['sharpness']:.2f} | "
            f"{100 * r['alignment_accuracy']:.1f} | {r['seconds_per_image']:.2f} |"
        )
    if summary.get("unique_prompts"):
        lines += [
            "",
            "Text-to-image, non-duplicated prompts:",
            "",
            "| Mode | % memorized | %<1.4 nL2 | %>0.5 desc | denoising loss | alignment |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in summary["unique_prompts"].items():
            lines.append(
                f"| {name} | {100 * r['frac_memorized']:.1f} | {100 * r['frac_nl2_below_1.4']:.1f} | "
                f"{100 * r['frac_descriptor_above_0.5']:.1f} | {r['denoising_loss']:.1f} | "
                f"{100 * r['alignment_accuracy']:.1f} |"
            )
    lines += [
        "",
        "Unconditional (G_sim only, nL2 backend):",
        "",
        "| Mode | Top-5% nL2 ↑ | Top-1 nL2 ↑ | %<1.4 ↓ | %<1.6 ↓ | %>0.5 desc ↓ | denoising loss ↓ "
        "| sharpness |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["unconditional"].items():
        lines.append(
            f"| {name} | {r['nl2_top5pct']:.2f} | {r['nl2_top1']:.2f} | "
            f"{100 * r['frac_nl2_below_1.4']:.1f} | "
            f"{100 * r['frac_nl2_below_1.6']:.1f} | {100 * r['frac_descriptor_above_0.5']:.1f} | "
            f"{r['denoising_loss']:.1f} | {r['sharpness']:.2f} |"
        )
    lines += [
        "",
        f"Denoising loss of the training pictures {summary['training_pictures']['denoising_loss']:.1f}, "
        f"of uniform noise {summary['uniform_noise']['denoising_loss']:.1f}.",
        "",
    ]
    return "\n".join(lines)


def run_amg_evaluation(cfg) -> dict[str, Any]:
    """The evaluation as ``jobs/evaluate_amg.py`` and the demo run it, from an ``AMGJobConfig``.

    Trains the memorizing models first when ``cfg.model_dir`` holds none. Returns a compact summary
    (the full one is in ``cfg.out/summary.json``).
    """
    import yaml

    if not (Path(cfg.model_dir) / TRAINING_SET).is_file():
        train_from_config(cfg)
    overrides = {}
    if cfg.overrides:
        overrides = yaml.safe_load(Path(cfg.overrides).read_text(encoding="utf-8")) or {}
        if not isinstance(overrides, dict) or not set(overrides) <= {"paper", "reference"}:
            raise ValueError(f"{cfg.overrides}: expected a mapping with keys 'paper' and/or 'reference'")
    settings = EvalSettings(
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        samples_per_prompt=cfg.samples_per_prompt,
        seed=cfg.seed,
    )
    summary = evaluate(cfg.model_dir, cfg.out, settings, cfg.sscd_checkpoint, overrides)
    return {
        "out": str(cfg.out),
        "off_frac_memorized": summary["off"]["frac_memorized"],
        "on_frac_memorized": summary["on"]["frac_memorized"],
        "frac_memorized": {name: row["frac_memorized"] for name, row in summary["modes"].items()},
        "uncond_frac_memorized": {
            name: row["frac_memorized"] for name, row in summary["unconditional"].items()
        },
        "seconds": summary["seconds"],
    }
