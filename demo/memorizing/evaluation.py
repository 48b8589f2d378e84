"""AMG evaluated on the Fashion-MNIST memorizing models, in the layout of the paper's Tables 1–4.

The claim under test (Chen, Liu, Xu, CVPR 2024) is "copies removed with no or marginal loss of
quality and alignment". Two models (:mod:`demo.memorizing.training`) both copy their planted
pictures and make new items otherwise, so the claim can be measured, and nothing grades itself:

* **Copies**: a sample of a planted prompt (or of a planted picture's class, for the pixel model) is
  an *own copy* when its nearest training picture, by RMS pixel distance, is that planted picture and
  lies within twice the autoencoder's reconstruction RMS (a latent model cannot copy more closely
  than its decoder reproduces). Carlini's nL2 < 1.0 is reported beside it, with how often it flags
  held-out real images (nL2 < 1.4 flags about a quarter of them on this data, so it is no copy
  criterion here).
* **Alignment**: the accuracy, on the prompted class, of a classifier trained on Fashion-MNIST
  images the generators never saw (:mod:`demo.memorizing.classifier`).
* **Fidelity**: KID and FID on that classifier's features against the held-out real images, with
  bootstrap intervals and a real-versus-real floor.
* **Paired seeds**: every mode samples the same seeds, and the fraction of outputs bit-identical to
  plain sampling is reported; on a prompt nothing is detected for, AMG must change nothing.

AMG on the text-to-image model runs **through the bundle** built from its training set
(``jobs/build_artifacts.py`` via the demo): the bundle's SSCD-descriptor index gives n0 and σ, and
y_N is the authors' rule, the dominant caption among the training images nearest to x̂0's CLIP
embedding (:meth:`pipeline.bundle.reader.Bundle.duplicate_caption_near`). λ_t is calibrated from
plain samples of the generic prompts on seeds disjoint from the evaluation's and saved with the model
(:func:`calibrated_config`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from demo.memorizing import classifier as clf
from demo.memorizing import metrics
from demo.memorizing.fashion_mnist import CLASS_NAMES
from demo.memorizing.fashion_set import PLANTED, generic_caption, load_fashion_data
from demo.memorizing.layout import (
    CALIBRATION_SAMPLES,
    CALIBRATION_SEED_OFFSET,
    MANIFEST,
    MATCH_ROWS,
    PIXEL_DIR,
    STRONG_C3,
    TEXT2IMG_DIR,
    THRESHOLD_TABLES,
    THRESHOLDS,
    TRAINING_SET,
    calibration_seeds,
    fitted_on,
    threshold_table,
)
from demo.memorizing.training import TrainingSet
from pipeline.amg import sampling
from pipeline.amg.backends import NormalizedL2Backend
from pipeline.amg.config import AMGConfig
from pipeline.amg.detector import MemorizationDetector
from pipeline.amg.guidance import AntiMemorizationGuidance
from pipeline.amg.memory_index import InMemoryNeighbourIndex
from pipeline.amg.pipelines import AMGDDPMPipeline, AMGStableDiffusionPipeline

log = logging.getLogger(__name__)

#: Copy criterion: the nearest training picture is the planted one, within this many times the
#: autoencoder's mean reconstruction RMS.
OWN_COPY_RMS_FACTOR = 2.0
#: Carlini's nL2 below this also counts as "near a training picture" (reported, calibrated on real images).
NL2_NEAR = 1.0
#: KID as bootstrapped: 10 subsets per draw (the point estimate's 100 cost a second each).
KID = functools.partial(metrics.kid, n_subsets=10)
#: Fewer samples than this get no KID/FID (the statistics need a few dozen).
MIN_FIDELITY_SAMPLES = 50
#: σ of an exact copy, per similarity: cosine 1 (descriptors), −nL2 = 0 (pixels).
PERFECT_COPY_SIGMA = {"sscd": 1.0, "nl2": 0.0}
#: λ_t is the per-timestep maximum of σ_t over the calibration trajectories (200 per model).
CALIBRATION_PERCENTILE = 100.0
#: σ_t on the conditional x̂0 (``AMGConfig.detect_from``): on this model a copy shows there from t ≈ 860,
#: on the guided x̂0 only from t ≈ 400 (BENCHMARKS.md, "AMG evaluation").
CONDITIONAL = {"detect_from": "conditional"}
#: ... and by the RMS pixel distance to the duplicated rows instead of the copy descriptor.
PIXEL_L2 = {"backend": "l2", **CONDITIONAL}
#: The paper's constant c3 (Eq. 17) for ``l2``, chosen by benchmarks/amg_tune.py's rule on its tuning seeds
#: (150 / 200 / 250 / 300 left 1, 1, 0, 0 copies of 128 and kept 96.9, 94.5, 90.6, 89.1% class accuracy):
#: the ablation of the preset's margin-scaled G_sim.
L2_CONSTANT_C3 = 250.0
#: Text-to-image rows: name -> (mode, AMGConfig changes); None is plain sampling.
TEXT2IMG_MODES: dict[str, tuple[str, dict[str, Any]] | None] = {
    "plain": None,
    "paper": ("paper", {}),
    "paper_every_step": ("paper", {"detect_every": 1}),
    "paper_strong": ("paper", {"c3": STRONG_C3}),
    "paper_strong_no_spe": ("paper", {"c3": STRONG_C3, "use_spe": False}),
    "paper_strong_no_dup": ("paper", {"c3": STRONG_C3, "use_dup": False}),
    "paper_strong_sim_only": ("paper", {"c3": STRONG_C3, "use_spe": False, "use_dup": False}),
    "paper_conditional": ("paper", CONDITIONAL),
    "paper_conditional_sim_only": ("paper", {**CONDITIONAL, "use_spe": False, "use_dup": False}),
    "paper_l2": ("paper", PIXEL_L2),
    "paper_l2_no_spe": ("paper", {**PIXEL_L2, "use_spe": False}),
    "paper_l2_sim_only": ("paper", {**PIXEL_L2, "use_spe": False, "use_dup": False}),
    "paper_l2_constant_c3": ("paper", {**PIXEL_L2, "c3_margin": None, "c3": L2_CONSTANT_C3}),
    "reference": ("reference", {}),
}
#: Pixel rows: name -> (mode, AMGConfig changes).
PIXEL_MODES: dict[str, tuple[str, dict[str, Any]] | None] = {
    "plain": None,
    "paper": ("paper", {}),
    "paper_every_step": ("paper", {"detect_every": 1}),
    "released_pixel": ("released_pixel", {"calibrated": False}),
}


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation samples. Evaluation seeds are ``0..n-1``; calibration seeds start at
    :attr:`calibration_seed_offset`, so λ_t is never fitted on the samples it is judged on."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    planted_samples: int = 16
    generic_samples: int = 30
    calibration_samples: int = CALIBRATION_SAMPLES["text2img"]
    pixel_calibration_samples: int = CALIBRATION_SAMPLES["pixel"]
    calibration_seed_offset: int = CALIBRATION_SEED_OFFSET
    pixel_inference_steps: int = 100
    pixel_samples: int = 40
    bootstrap: int = 100
    copy_calibration_images: int = 2000
    seed: int = 0


# ----------------------------------------------------------------------------- models and detectors
@dataclass
class Models:
    """The two generators, their exact training set and the autoencoder's reconstruction RMS."""

    text2img: AMGStableDiffusionPipeline
    pixel: AMGDDPMPipeline
    train: TrainingSet
    recon_rms: float


def load_models(model_dir: str | Path) -> Models:
    """The committed memorizing models (``jobs/train_memorizing_model.py`` makes them)."""
    model_dir = Path(model_dir)
    if not (model_dir / TRAINING_SET).is_file():
        raise FileNotFoundError(f"{model_dir} holds no memorizing models; run jobs/train_memorizing_model.py")
    text2img = AMGStableDiffusionPipeline.from_pretrained(model_dir / TEXT2IMG_DIR)
    text2img.set_progress_bar_config(disable=True)
    pixel = AMGDDPMPipeline.from_pretrained(model_dir / PIXEL_DIR)
    pixel.set_progress_bar_config(disable=True)
    manifest = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))
    return Models(
        text2img,
        pixel,
        TrainingSet.load(model_dir / TRAINING_SET),
        manifest["text2img"]["vae"]["train_recon_rms"],
    )


def text2img_detector_parts(bundle: str | Path, sscd_checkpoint: str | None, similarity: str = "sscd"):
    """``(backend, index, captions)`` through the bundle of the model's training set: σ and n0 by
    ``similarity`` over its duplicated rows (the SSCD descriptors, or for ``l2`` the pixels read from
    its shards; see :data:`MATCH_ROWS`) and the authors' y_N rule over its CLIP index
    (:func:`pipeline.audit.matching.open_matcher`)."""
    from pipeline.audit.matching import open_matcher

    matcher = open_matcher(bundle, similarity, sscd_checkpoint, match_rows=MATCH_ROWS)
    return matcher.backend, matcher.index, matcher.captions


def bundle_detectors(bundle: str | Path, sscd_checkpoint: str | None):
    """``similarity -> (backend, index, captions)`` through ``bundle`` (:func:`text2img_detector_parts`),
    each opened once, on first use."""
    return functools.cache(functools.partial(text2img_detector_parts, bundle, sscd_checkpoint))


def planted_index(train: TrainingSet, backend) -> InMemoryNeighbourIndex:
    """``backend``'s vectors of the planted pictures in RAM: what a search of the training-set bundle's
    duplicated rows (:data:`MATCH_ROWS`) finds, without building the bundle."""
    planted = train.planted()
    return InMemoryNeighbourIndex.from_images(
        backend, train.tensor()[planted], [train.captions[p] for p in planted]
    )


def pixel_detector_parts(train: TrainingSet) -> tuple[NormalizedL2Backend, InMemoryNeighbourIndex]:
    """Carlini's nL2 over the distinct training pictures in grey, as the pixel model makes them (the
    released pixel code searches a deduplicated training set too)."""
    backend = NormalizedL2Backend(image_size=train.images.shape[1], channels=1)
    index = InMemoryNeighbourIndex.from_images(backend, train.tensor()[:, :1], train.captions, dedupe=True)
    return backend, index


# ----------------------------------------------------------------------------- sampling
def sample_text2img(
    pipe, prompts: list[str], seeds: list[int], amg, settings: EvalSettings
) -> tuple[torch.Tensor, list]:
    """``(len(prompts)·len(seeds), 3, H, W)`` images in [−1, 1] and one trace per prompt."""
    return sampling.sample_text2img(
        pipe, prompts, seeds, amg, settings.num_inference_steps, settings.guidance_scale
    )


@torch.no_grad()
def sample_pixel(
    pipe, labels: list[int], seeds: list[int], amg, settings: EvalSettings
) -> tuple[torch.Tensor, list]:
    """Class-conditional DDPM samples, ``len(seeds)`` per label, in [−1, 1], and one trace per label."""
    images, traces = [], []
    for label in labels:
        out = pipe(
            batch_size=len(seeds),
            generator=sampling.seeded_generators(seeds),
            num_inference_steps=settings.pixel_inference_steps,
            output_type="pt",
            class_labels=[label] * len(seeds),
            amg=amg,
        )
        images.append((out.images * 2 - 1).expand(-1, 3, -1, -1))  # grey, judged as the RGB data
        traces.append(out.amg_trace)
    return torch.cat(images), traces


# ----------------------------------------------------------------------------- λ_t calibration
def _probe(mode: str, backend: str, detect_from: str = "guided") -> AMGConfig:
    """A config whose gates never open: the loop measures σ_t at every step and changes nothing."""
    never = {"threshold": "constant", "lambda_start": float("inf"), "detect_every": 1}
    return AMGConfig.preset(mode, backend, detect_from=detect_from, **never)


def calibrate_threshold(traces: list, percentile: float) -> dict[str, list[float]]:
    """λ_t from plain trajectories: the per-timestep ``percentile`` of σ_t (see
    :func:`pipeline.amg.terms.calibrate_threshold`)."""
    from pipeline.amg.terms import calibrate_threshold as fit

    steps = [s for tr in traces for s in tr.steps]
    timesteps = sorted({s.timestep for s in steps})
    sigmas = [np.concatenate([s.sigma for s in steps if s.timestep == t]) for t in timesteps]
    lambda_timesteps, lambda_values = fit(timesteps, sigmas, percentile=percentile)
    return {"lambda_timesteps": list(lambda_timesteps), "lambda_values": list(lambda_values)}


def calibrated_config(
    thresholds: dict[str, Any], model: str, mode: str, backend: str, **changes
) -> AMGConfig:
    """The preset of ``mode`` with the model's λ_t calibrated for ``backend`` and ``detect_from``
    (unless ``calibrated=False``)."""
    calibrated = changes.pop("calibrated", True)
    if calibrated:
        table = thresholds[threshold_table(model, backend, changes.get("detect_from", "guided"))]
        changes = {
            "threshold": "calibrated",
            "lambda_timesteps": tuple(table["lambda_timesteps"]),
            "lambda_values": tuple(table["lambda_values"]),
            **changes,
        }
    return AMGConfig.preset(mode, backend, **changes)


def text2img_guidance(thresholds: dict[str, Any], detectors, mode: str, changes: dict[str, Any]):
    """AMG for the text-to-image model: ``mode``'s preset with ``changes`` (``backend`` picks the
    similarity, default ``sscd``) and its calibrated λ_t, detecting through ``detectors(similarity)``."""
    changes = dict(changes)
    similarity = changes.pop("backend", "sscd")
    config = calibrated_config(thresholds, "text2img", mode, similarity, **changes)
    backend, index, captions = detectors(similarity)
    return AntiMemorizationGuidance(MemorizationDetector(backend, index, config, captions=captions))


# ----------------------------------------------------------------------------- scoring
@dataclass
class Judge:
    """Everything a sample is judged with, none of it the generator's own: the classifier, the real
    held-out features, the training pictures and the copy threshold."""

    classifier: Any
    real_features: np.ndarray
    train: TrainingSet
    max_rms: float
    bootstrap: int
    seed: int

    @functools.cached_property
    def train_images(self) -> torch.Tensor:
        """The training pictures as a tensor, made once for every :meth:`score` call."""
        return self.train.tensor()

    def score(
        self, images: torch.Tensor, classes: np.ndarray, planted: np.ndarray, plain: torch.Tensor | None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Summary of ``images`` (:meth:`summarize`) and the per-sample detail it is made from
        (:meth:`measure`)."""
        detail = self.measure(images, classes, planted, plain)
        return self.summarize(detail), detail

    def measure(
        self, images: torch.Tensor, classes: np.ndarray, planted: np.ndarray, plain: torch.Tensor | None
    ) -> dict[str, np.ndarray]:
        """Per sample: own copy, class correct, nearest training picture and its RMS, nL2, classifier
        features and, given ``plain``, bit-identity (``planted[i]`` = the planted position sample i may
        copy, or −1)."""
        rms, nearest, nl2 = metrics.nearest_and_nl2(images, self.train_images)
        detail = {
            "own": metrics.own_copy(nearest, rms, planted, self.max_rms) & (planted >= 0),
            "correct": clf.predict(self.classifier, images) == classes,
            "rms": rms,
            "nearest": nearest,
            "nl2": nl2,
            "features": clf.features(self.classifier, images),
            "planted": planted,
        }
        if plain is not None:
            detail["same"] = (images == plain).flatten(1).all(dim=1).numpy()
        return detail

    def summarize(self, detail: dict[str, np.ndarray]) -> dict[str, Any]:
        """The summary row of measured samples: :meth:`measure`'s detail, or the same rows of each of
        its arrays, so a group of samples is summarized without measuring it again."""
        own, planted, nl2, feats = detail["own"], detail["planted"], detail["nl2"], detail["features"]
        row: dict[str, Any] = {
            "n": len(own),
            "accuracy": metrics.accuracy_interval(detail["correct"]),
            "nl2_below_1": float((nl2 < NL2_NEAR).mean()),
            "nl2_top5pct": float(np.percentile(nl2, 5)),
            "nl2_top1": float(nl2.min()),
        }
        if (planted >= 0).any():
            row["own_copy"] = float(own[planted >= 0].mean())
        if len(own) >= MIN_FIDELITY_SAMPLES:
            kid = metrics.bootstrap_interval(
                KID, feats, self.real_features, n_boot=self.bootstrap, seed=self.seed
            )
            row["kid"] = list(kid)
            row["fid"] = float(metrics.fid(feats, self.real_features))
        if "same" in detail:
            row["bit_identical"] = float(detail["same"].mean())
        return row


def _by_copies(own: np.ndarray, planted: np.ndarray, train: TrainingSet) -> dict[str, float]:
    """Own-copy rate per duplication count (×16, ×64, ×256)."""
    out = {}
    for copies in sorted({int(train.copies[p]) for p in train.planted()}):
        sel = np.isin(planted, [p for p in train.planted() if train.copies[p] == copies])
        out[f"x{copies}"] = float(own[sel].mean())
    return out


def trace_stats(traces: list) -> dict[str, Any]:
    """Over the AMG traces of some calls: the fraction of samples where a gate opened, the x̂0 scored
    per sample (its output included) and the fraction of steps each term applied at."""
    steps = [s for tr in traces if tr is not None for s in tr.steps]
    if not steps:
        return {}
    fired = np.concatenate([np.array(tr.any_fired()) for tr in traces if tr is not None])
    return {
        "gate_opened": float(fired.mean()),
        "detections_per_image": float(
            sum(tr.images_detected for tr in traces if tr is not None) / len(fired)
        ),
        "terms_applied": {
            term: float(np.mean([np.mean(getattr(s, term)) for s in steps])) for term in ("spe", "dup", "sim")
        },
    }


# ----------------------------------------------------------------------------- the two experiments
def evaluate_text2img(models: Models, detectors, judge: Judge, thresholds, settings: EvalSettings, out: Path):
    """Table 1/3/4 rows for the text-to-image model: planted and generic prompts per mode
    (``detectors``: similarity -> detector parts, :func:`bundle_detectors`)."""
    train = models.train
    seeds = list(range(settings.planted_samples))
    gseeds = list(range(settings.generic_samples))
    planted_prompts = [train.captions[p] for p in train.planted()]
    generic_prompts = [generic_caption(c) for c in range(len(CLASS_NAMES))]
    planted_of = np.repeat(np.array(train.planted()), len(seeds))
    planted_classes = np.repeat(train.labels[train.planted()], len(seeds))
    generic_classes = np.repeat(np.arange(len(CLASS_NAMES)), len(gseeds))
    rows: dict[str, Any] = {}
    plain: dict[str, torch.Tensor] = {}
    grids: dict[str, torch.Tensor] = {}
    for name, spec in TEXT2IMG_MODES.items():
        started = time.monotonic()
        amg = None if spec is None else text2img_guidance(thresholds, detectors, *spec)
        p_images, p_traces = sample_text2img(models.text2img, planted_prompts, seeds, amg, settings)
        g_images, g_traces = sample_text2img(models.text2img, generic_prompts, gseeds, amg, settings)
        seconds = time.monotonic() - started
        if spec is None:
            plain = {"planted": p_images, "generic": g_images}
        p_row, p_detail = judge.score(p_images, planted_classes, planted_of, plain["planted"])
        g_row, _ = judge.score(g_images, generic_classes, np.full(len(g_images), -1), plain["generic"])
        p_row["own_copy_by_count"] = _by_copies(p_detail["own"], planted_of, train)
        high = np.isin(planted_of, [p for p in train.planted() if train.copies[p] >= 64])
        p_row["own_copy_x64_up"] = float(p_detail["own"][high].mean())
        p_row["accuracy_x64_up"] = metrics.accuracy_interval(p_detail["correct"][high])
        rows[name] = {
            "planted": {**p_row, **trace_stats(p_traces)},
            "generic": {**g_row, **trace_stats(g_traces)},
            "seconds_per_image": seconds / (len(p_images) + len(g_images)),
        }
        grids[name] = torch.cat([p_images[:: len(seeds)], g_images[:: len(gseeds)]])
        log.info(
            "text2img %s: planted own copy %.3f, generic acc %s", name, p_row["own_copy"], g_row["accuracy"]
        )
    _grid(list(grids.values()), out / "samples_text2img.png")
    return rows


def evaluate_pixel(models: Models, judge: Judge, thresholds, settings: EvalSettings, out: Path):
    """Table 2 rows for the class-conditional pixel model: every class, planted classes marked."""
    train = models.train
    backend, index = pixel_detector_parts(train)
    seeds = list(range(settings.pixel_samples))
    labels = list(range(len(CLASS_NAMES)))
    classes = np.repeat(np.array(labels), len(seeds))
    planted_by_class = {int(train.labels[p]): p for p in train.planted()}
    planted_of = np.array([planted_by_class.get(int(c), -1) for c in classes])
    rows: dict[str, Any] = {}
    plain = None
    grids = []
    for name, spec in PIXEL_MODES.items():
        started = time.monotonic()
        amg = None
        if spec is not None:
            mode, changes = spec
            config = calibrated_config(thresholds, "pixel", mode, "nl2", **changes)
            amg = AntiMemorizationGuidance(MemorizationDetector(backend, index, config))
        images, traces = sample_pixel(models.pixel, labels, seeds, amg, settings)
        seconds = time.monotonic() - started
        if spec is None:
            plain = images
        row, detail = judge.score(images, classes, planted_of, plain)
        row["own_copy_by_count"] = _by_copies(detail["own"], planted_of, train)
        rows[name] = {**row, **trace_stats(traces), "seconds_per_image": seconds / len(images)}
        # The classes without a planted picture are the pixel model's generic prompts: judged alone,
        # on the same terms (KID, accuracy, bit-identity), and the planted classes beside them.
        for group, of_planted in (("other_classes", False), ("planted_classes", True)):
            in_group = (planted_of >= 0) == of_planted
            g_row = judge.summarize({key: values[in_group] for key, values in detail.items()})
            g_traces = [
                tr for c, tr in zip(labels, traces, strict=True) if (c in planted_by_class) == of_planted
            ]
            rows[name][group] = {**g_row, **trace_stats(g_traces)}
        grids.append(images[:: len(seeds) // 4][: 4 * len(labels)])
        log.info("pixel %s: own copy %.3f, acc %s", name, row["own_copy"], row["accuracy"])
    _grid(grids, out / "samples_pixel.png")
    return rows


# ----------------------------------------------------------------------------- calibration run
def calibrate_text2img(
    models: Models, detectors, settings: EvalSettings, similarity: str = "sscd", detect_from: str = "guided"
) -> dict[str, Any]:
    """λ_t of the text-to-image model from plain samples of its generic captions (prompts known not to
    be memorized), on calibration seeds, with σ by ``similarity`` on the ``detect_from`` x̂0."""
    backend, index, captions = detectors(similarity)
    probe = AntiMemorizationGuidance(
        MemorizationDetector(backend, index, _probe("paper", similarity, detect_from), captions=captions)
    )
    prompts = [generic_caption(c) for c in range(len(CLASS_NAMES))]
    seeds = _calibration_seeds(settings, "text2img")
    _, traces = sample_text2img(models.text2img, prompts, seeds, probe, settings)
    return {**calibrate_threshold(traces, CALIBRATION_PERCENTILE), "prompts": prompts}


def calibrate_pixel(models: Models, settings: EvalSettings) -> dict[str, Any]:
    """λ_t of the pixel model from plain samples of the classes without a planted picture."""
    backend, index = pixel_detector_parts(models.train)
    probe = AntiMemorizationGuidance(MemorizationDetector(backend, index, _probe("paper", "nl2")))
    planted = {int(models.train.labels[p]) for p in models.train.planted()}
    clean = sorted(set(range(len(CLASS_NAMES))) - planted)
    _, traces = sample_pixel(models.pixel, clean, _calibration_seeds(settings, "pixel"), probe, settings)
    return {**calibrate_threshold(traces, CALIBRATION_PERCENTILE), "classes": clean}


def _calibration_seeds(settings: EvalSettings, model: str) -> list[int]:
    n = settings.pixel_calibration_samples if model == "pixel" else settings.calibration_samples
    return calibration_seeds(n, settings.calibration_seed_offset)


def ensure_thresholds(
    cfg,
    detectors,
    settings: EvalSettings | None = None,
    models: Models | None = None,
    names: tuple[str, ...] = tuple(THRESHOLD_TABLES),
) -> dict[str, Any]:
    """``model_dir/amg_thresholds.json``, each λ_t table (:data:`THRESHOLD_TABLES`) calibrated and
    written first when missing or calibrated on other seeds than ``settings`` asks for (``detectors``:
    similarity -> text-to-image detector parts).

    A table also records ``memorized_threshold``: for a similarity, halfway between λ at the last step
    (the most any calibration sample reached there) and a perfect copy's σ, so a final image that only
    edges past the calibration samples is not called a copy; for the ``l2`` distance, the own-copy
    distance itself (:data:`OWN_COPY_RMS_FACTOR` times the autoencoder's reconstruction RMS), the
    criterion the evaluation counts copies by.
    """
    path = Path(cfg.model_dir) / THRESHOLDS
    thresholds = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    settings = settings or EvalSettings()
    seeds = {name: _calibration_seeds(settings, THRESHOLD_TABLES[name][0]) for name in names}
    missing = [name for name in names if not fitted_on(thresholds.get(name), seeds[name])]
    for name in missing:
        models = models or load_models(cfg.model_dir)
        model, similarity, detect_from = THRESHOLD_TABLES[name]
        if model == "pixel":
            table = calibrate_pixel(models, settings)
        else:
            table = calibrate_text2img(models, detectors, settings, similarity, detect_from)
        last = table["lambda_values"][int(np.argmin(table["lambda_timesteps"]))]
        table["memorized_threshold"] = (
            -OWN_COPY_RMS_FACTOR * models.recon_rms
            if similarity == "l2"
            else (last + PERFECT_COPY_SIGMA[similarity]) / 2
        )
        table["similarity"] = similarity
        table["detect_from"] = detect_from
        table["calibration"] = {
            "percentile": CALIBRATION_PERCENTILE,
            "seeds": [seeds[name][0], seeds[name][-1]],
        }
        thresholds[name] = table
    if missing:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_finite(thresholds), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    return thresholds


# ----------------------------------------------------------------------------- output
def _grid(rows: list[torch.Tensor], path: Path, scale: int = 2) -> None:
    """One row of images per tensor, in [−1, 1], as a PNG."""
    width = max(len(r) for r in rows)
    size = rows[0].shape[-1]
    canvas = np.full((len(rows) * size, width * size, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        pixels = ((row.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for j, image in enumerate(pixels):
            canvas[i * size : (i + 1) * size, j * size : (j + 1) * size] = image
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(
        path
    )


def markdown_tables(summary: dict[str, Any]) -> str:
    """The paper's tables (1: text-to-image; 2: pixel; 3/4: terms ablated, cost) as Markdown."""

    def ci(v: list[float]) -> str:
        return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"

    def acc(v: list[float]) -> str:
        return f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"

    s = summary["settings"]
    lines = [
        f"Text-to-image model, through the bundle ({s['planted_samples']} seeds per planted caption, "
        f"{s['generic_samples']} per generic prompt; copies = own copy, nearest training picture is the "
        f"planted one within {summary['max_rms']:.3f} RMS):",
        "",
        "| Mode | own copies ×16 / ×64 / ×256 | % memorized (≥×64) ↓ | planted class acc. (≥×64) | "
        "generic KID [95% CI] | generic FID | generic class acc. [95% CI] | generic bit-identical | "
        "generic gate opened | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["text2img"].items():
        p, g = r["planted"], r["generic"]
        counts = " / ".join(f"{100 * v:.0f}%" for v in p["own_copy_by_count"].values())
        lines.append(
            f"| {name} | {counts} | {100 * p['own_copy_x64_up']:.1f} | {acc(p['accuracy_x64_up'])} | "
            f"{ci(g['kid'])} | {g['fid']:.2f} | {acc(g['accuracy'])} | "
            f"{100 * g.get('bit_identical', 1.0):.1f}% | {100 * g.get('gate_opened', 0.0):.1f}% | "
            f"{r['seconds_per_image']:.3f} |"
        )
    lines += [
        "",
        f"Pixel DDPM, class-conditional ({s['pixel_samples']} seeds per class, "
        f"DDPM {s['pixel_inference_steps']} steps; planted classes can copy their planted picture):",
        "",
        "| Mode | own copies ×16 / ×64 / ×256 | KID [95% CI] | FID | class acc. [95% CI] | "
        "bit-identical | gate opened | s/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["pixel"].items():
        counts = " / ".join(f"{100 * v:.1f}%" for v in r["own_copy_by_count"].values())
        lines.append(
            f"| {name} | {counts} | {ci(r['kid'])} | {r['fid']:.2f} | {acc(r['accuracy'])} | "
            f"{100 * r.get('bit_identical', 1.0):.1f}% | {100 * r.get('gate_opened', 0.0):.1f}% | "
            f"{r['seconds_per_image']:.3f} |"
        )
    lines += [
        "",
        "Pixel DDPM by group: the classes without a planted picture (the generic prompts' analogue) and "
        "the planted pictures' classes:",
        "",
        "| Mode | other classes: KID [95% CI] | class acc. [95% CI] | bit-identical | gate opened "
        "| planted classes: class acc. [95% CI] | bit-identical | gate opened |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["pixel"].items():
        o, p = r["other_classes"], r["planted_classes"]
        lines.append(
            f"| {name} | {ci(o['kid'])} | {acc(o['accuracy'])} | {100 * o.get('bit_identical', 1.0):.1f}% | "
            f"{100 * o.get('gate_opened', 0.0):.1f}% | {acc(p['accuracy'])} | "
            f"{100 * p.get('bit_identical', 1.0):.1f}% | {100 * p.get('gate_opened', 0.0):.1f}% |"
        )
    floor = summary["real_floor"]
    cal = summary["copy_calibration"]
    rms_key = f"{summary['max_rms']:g}"
    lines += [
        "",
        f"Real-versus-real floor (two disjoint sets of {s['generic_samples'] * 10} held-out images): "
        f"KID {ci(floor['kid'])}, FID {ci(floor['fid'])}. Classifier accuracy on the "
        f"held-out real images {acc(summary['classifier_accuracy'])}.",
        f"Held-out real images against the training set ({s['copy_calibration_images']}): "
        f"{100 * cal['fraction_nl2_below']['1.4']:.1f}% have nL2 < 1.4, "
        f"{100 * cal['fraction_nl2_below']['1']:.1f}% nL2 < 1.0, and "
        f"{100 * cal['fraction_rms_below'][rms_key]:.2f}% lie within the own-copy RMS of a training picture.",
        "",
    ]
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None and NumPy scalars made plain, for strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def run_amg_evaluation(cfg, detectors, settings: EvalSettings | None = None) -> dict[str, Any]:
    """The whole evaluation from an ``AMGJobConfig``; writes ``summary.json``, ``table.md`` and grids.

    ``detectors`` is the text-to-image detection through the bundle: similarity -> ``(backend, index,
    captions)`` (:func:`bundle_detectors`: :func:`pipeline.audit.matching.open_matcher` and its y_N
    lookup). λ_t is read from
    ``model_dir/amg_thresholds.json``, calibrated and written there first when missing.
    """
    started = time.monotonic()
    settings = settings or EvalSettings(
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        planted_samples=cfg.samples_per_prompt,
        seed=cfg.seed,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(cfg.model_dir)
    thresholds = ensure_thresholds(cfg, detectors, settings, models)
    data = load_fashion_data(cfg.generic_per_class, cfg.seed)
    classifier = clf.load_or_train(cfg.classifier_dir)
    held_out = metrics.to_signed_tensor(data.held_out)
    real = clf.features(classifier, held_out)
    max_rms = OWN_COPY_RMS_FACTOR * models.recon_rms
    judge = Judge(classifier, real, models.train, max_rms, settings.bootstrap, cfg.seed)
    n_generic = settings.generic_samples * len(CLASS_NAMES)
    floor = {
        "kid": list(metrics.real_floor(KID, real, n_generic, cfg.seed, settings.bootstrap)),
        "fid": list(metrics.real_floor(metrics.fid, real, n_generic, cfg.seed, settings.bootstrap)),
    }
    calibration = metrics.calibrate_copy_threshold(
        held_out[: settings.copy_calibration_images], models.train.tensor(), rms_thresholds=(max_rms,)
    )
    accuracy = metrics.accuracy_interval(clf.predict(classifier, held_out) == data.held_out_labels)
    summary: dict[str, Any] = {
        "settings": asdict(settings),
        "max_rms": max_rms,
        "classifier_accuracy": accuracy,
        "real_floor": floor,
        "copy_calibration": calibration,
        "thresholds": thresholds,
        "planted": [{"caption": c, "label": label, "copies": n} for label, c, n in PLANTED],
        "text2img": evaluate_text2img(models, detectors, judge, thresholds, settings, out),
        "pixel": evaluate_pixel(models, judge, thresholds, settings, out),
    }
    summary["seconds"] = round(time.monotonic() - started)
    (out / "table.md").write_text(markdown_tables(summary), encoding="utf-8")
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(_finite(summary), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out / "summary.json")
    return summary
