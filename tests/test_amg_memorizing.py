"""The committed memorizing models copy their planted pictures, generalize otherwise, and AMG removes
the copies while leaving generic prompts untouched; the training job writes loadable pipelines.

Copy criterion (demo.memorizing.evaluation): a sample is an own copy when its nearest training picture
(RMS in pixels) is the planted picture of its prompt, within twice the autoencoder's reconstruction
RMS. These tests use a few seeds; BENCHMARKS.md "AMG evaluation" has the full figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, StableDiffusionPipeline

from demo.memorizing import metrics
from demo.memorizing.evaluation import (
    OWN_COPY_RMS_FACTOR,
    EvalSettings,
    calibrated_config,
    load_models,
    pixel_detector_parts,
    planted_index,
    sample_pixel,
    sample_text2img,
)
from demo.memorizing.fashion_mnist import available
from demo.memorizing.fashion_set import generic_caption
from demo.memorizing.layout import MANIFEST, STRONG_C3, THRESHOLDS
from demo.memorizing.training import TrainingSet, train_memorizing_models
from pipeline.amg import AntiMemorizationGuidance, MemorizationDetector
from pipeline.core.config import AMGJobConfig

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "amg-memorizing"
SETTINGS = EvalSettings(pixel_inference_steps=100)
SEEDS = list(range(4))

pytestmark = [
    pytest.mark.slow,  # samples the committed models for 50-100 steps and trains tiny new ones
    pytest.mark.usefixtures("one_torch_thread"),
]
committed = pytest.mark.skipif(
    not (MODEL_DIR / "training_set.npz").is_file(), reason="models/amg-memorizing is not in this checkout"
)


@pytest.fixture(scope="module")
def models():
    return load_models(MODEL_DIR)


@pytest.fixture(scope="module")
def thresholds():
    return json.loads((MODEL_DIR / THRESHOLDS).read_text())


def _own_copies(images: torch.Tensor, train: TrainingSet, planted: int, max_rms: float) -> np.ndarray:
    rms, nearest = metrics.nearest_rms(images, train.tensor())
    return metrics.own_copy(nearest, rms, np.full(len(images), planted), max_rms)


def _stand_in_index(train: TrainingSet):
    """The SSCD stand-in over the planted (duplicated) pictures in RAM: what the demo's bundle search
    over its duplicated rows finds, without building the bundle (the demo test covers that)."""
    from demo.memorizing.descriptors import ThumbnailCopyDescriptor
    from pipeline.amg import SSCDBackend

    backend = SSCDBackend(ThumbnailCopyDescriptor())
    return backend, planted_index(train, backend)


@committed
def test_plain_sampling_copies_the_most_duplicated_planted_picture_and_not_a_generic_prompt(models):
    train = models.train
    max_rms = OWN_COPY_RMS_FACTOR * models.recon_rms
    top = max(train.planted(), key=lambda p: train.copies[p])
    images, _ = sample_text2img(models.text2img, [train.captions[top]], SEEDS, None, SETTINGS)
    assert _own_copies(images, train, top, max_rms).mean() >= 0.5
    label = int(train.labels[top])
    generic, _ = sample_text2img(models.text2img, [generic_caption(label)], SEEDS, None, SETTINGS)
    rms, _ = metrics.nearest_rms(generic, train.tensor())
    assert (rms > max_rms).all()  # new items, not copies of any training picture


@committed
def test_amg_strong_paper_mode_removes_the_most_duplicated_copies_and_leaves_generic_samples_alone(
    models, thresholds
):
    train = models.train
    max_rms = OWN_COPY_RMS_FACTOR * models.recon_rms
    top = max(train.planted(), key=lambda p: train.copies[p])
    backend, index = _stand_in_index(train)
    config = calibrated_config(thresholds, "text2img", "paper", "sscd", c3=STRONG_C3)
    amg = AntiMemorizationGuidance(MemorizationDetector(backend, index, config))
    images, traces = sample_text2img(models.text2img, [train.captions[top]], SEEDS, amg, SETTINGS)
    assert not _own_copies(images, train, top, max_rms).any()
    assert all(traces[0].any_fired())
    prompt = generic_caption(int(train.labels[top]))
    plain, _ = sample_text2img(models.text2img, [prompt], SEEDS, None, SETTINGS)
    guided, traces = sample_text2img(models.text2img, [prompt], SEEDS, amg, SETTINGS)
    quiet = ~np.array(traces[0].any_fired())
    assert quiet.sum() >= 3
    assert torch.equal(guided[quiet], plain[quiet])


@committed
def test_paper_mode_by_pixel_distance_on_the_conditional_x0_removes_x64_copies_and_keeps_their_class(
    models, thresholds
):
    """The demo's AMG (``l2`` on the conditional x̂0, its calibrated λ_t, the preset's c3) on the two
    ×64 captions, the least duplicated of those the issue requires cleared."""
    from demo.memorizing import classifier as clf
    from pipeline.amg import PixelL2Backend

    train = models.train
    max_rms = OWN_COPY_RMS_FACTOR * models.recon_rms
    backend = PixelL2Backend(image_size=train.images.shape[1])
    index = planted_index(train, backend)
    config = calibrated_config(thresholds, "text2img", "paper", "l2", detect_from="conditional")
    amg = AntiMemorizationGuidance(MemorizationDetector(backend, index, config))
    classifier = clf.load_or_train()
    for p in (p for p in train.planted() if train.copies[p] == 64):
        plain, _ = sample_text2img(models.text2img, [train.captions[p]], SEEDS, None, SETTINGS)
        guided, traces = sample_text2img(models.text2img, [train.captions[p]], SEEDS, amg, SETTINGS)
        assert _own_copies(plain, train, p, max_rms).all()
        assert not _own_copies(guided, train, p, max_rms).any()
        assert all(traces[0].any_fired())
        assert (clf.predict(classifier, guided) == train.labels[p]).mean() >= 0.75


@committed
def test_pixel_model_copies_its_most_duplicated_planted_picture_and_amg_removes_it(models, thresholds):
    train = models.train
    max_rms = OWN_COPY_RMS_FACTOR * models.recon_rms
    top = max(train.planted(), key=lambda p: train.copies[p])
    label = int(train.labels[top])
    seeds = list(range(16))
    plain, _ = sample_pixel(models.pixel, [label], seeds, None, SETTINGS)
    copies = _own_copies(plain, train, top, max_rms)
    assert copies.sum() >= 1
    backend, index = pixel_detector_parts(train)
    config = calibrated_config(thresholds, "pixel", "paper", "nl2")
    guided, traces = sample_pixel(
        models.pixel,
        [label],
        seeds,
        AntiMemorizationGuidance(MemorizationDetector(backend, index, config)),
        SETTINGS,
    )
    assert not _own_copies(guided, train, top, max_rms).any()
    quiet = ~np.array(traces[0].any_fired())
    assert torch.equal(guided[quiet], plain[quiet])


@committed
def test_pixel_amg_leaves_a_class_without_a_planted_picture_bit_identical(models, thresholds):
    """The pixel model's generic prompts: λ_t calibrated on 800 trajectories of those classes (seeds the
    test does not use) opens no gate on new samples of them, so AMG changes no pixel."""
    train = models.train
    planted_classes = {int(train.labels[p]) for p in train.planted()}
    label = min(set(range(10)) - planted_classes)
    seeds = list(range(8))
    plain, _ = sample_pixel(models.pixel, [label], seeds, None, SETTINGS)
    backend, index = pixel_detector_parts(train)
    config = calibrated_config(thresholds, "pixel", "paper", "nl2")
    amg = AntiMemorizationGuidance(MemorizationDetector(backend, index, config))
    guided, traces = sample_pixel(models.pixel, [label], seeds, amg, SETTINGS)
    assert not any(traces[0].any_fired())
    assert torch.equal(guided, plain)


@pytest.mark.skipif(not available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_training_job_writes_loadable_diffusers_pipelines(tmp_path):
    cfg = AMGJobConfig(
        model_dir=str(tmp_path / "models"),
        generic_per_class=3,
        vae_steps=1,
        unet_steps=1,
        pixel_steps=1,
        unet_width=16,
        pixel_width=16,
        batch_size=4,
    )
    report = train_memorizing_models(cfg)
    assert (
        report["distinct_pictures"] == 30 + 6
        and report["training_rows"] == 30 + 16 + 16 + 64 + 64 + 256 + 256
    )
    text2img = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "text2img")
    assert text2img.tokenizer("a cat").input_ids[:3] == [
        text2img.tokenizer.bos_token_id,
        320,
        2368,
    ]  # CLIP ids
    pixel = DDPMPipeline.from_pretrained(tmp_path / "models" / "pixel")
    assert pixel.unet.config.num_class_embeds == 10
    manifest = json.loads((tmp_path / "models" / MANIFEST).read_text())
    assert manifest["seed"] == 0 and {"text2img", "pixel"} <= set(manifest)
    assert TrainingSet.load(tmp_path / "models" / "training_set.npz").rows == report["training_rows"]
