"""The committed memorizing models copy their training pictures, and AMG stops them; jobs run.

Copy criterion (stated in demo.memorizing.evaluation): Carlini's nL2 < 1.4 against the exact training
set (k = 50 capped at its 32 pictures, α = 0.5), or the copy descriptor above 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, StableDiffusionPipeline

from demo.memorizing.evaluation import (
    EvalSettings,
    _amg,
    copy_scores,
    evaluate,
    load_models,
    training_indexes,
)
from demo.memorizing.training import MANIFEST, TrainingSet, train_memorizing_models

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "amg-memorizing"
STEPS = 50  # as in the evaluation
SEEDS = [0, 1]


pytestmark = [
    pytest.mark.slow,  # samples the committed models for 50 steps and trains new ones
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not (MODEL_DIR / "training_set.npz").is_file(), reason="models/amg-memorizing is not in this checkout"
    ),
]


@pytest.fixture(scope="module")
def models():
    pipe, uncond, train = load_models(MODEL_DIR)
    return pipe, uncond, train, training_indexes(train)


def _sample(pipe, train: TrainingSet, amg=None) -> torch.Tensor:
    out = []
    for i in train.duplicated():
        res = pipe(
            [train.captions[i]] * len(SEEDS),
            num_inference_steps=STEPS,
            output_type="pt",
            amg=amg,
            generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        )
        out.append(res.images * 2 - 1)
    return torch.cat(out)


def _copies(scores) -> np.ndarray:
    return (scores["nl2"] < 1.4) | (scores["descriptor"] > 0.5)


def test_plain_sampling_of_duplicated_prompts_regenerates_their_training_pictures(models):
    pipe, _, train, indexes = models
    assert len(train.duplicated()) >= 3 and train.copies[train.duplicated()].min() >= 2
    images = _sample(pipe, train)
    scores = copy_scores(images, indexes)
    own = np.repeat(train.duplicated(), len(SEEDS))
    own_copy = (scores["nl2"] < 1.4) & (scores["nl2_row"] == own)
    assert own_copy.mean() > 0.5, scores  # a clear majority copies its own training picture
    assert (scores["descriptor_row"] == own).mean() > 0.5


def test_amg_brings_copies_of_duplicated_prompts_to_zero(models):
    pipe, _, train, indexes = models
    amg = _amg("reference", "nl2", indexes, {})
    images = _sample(pipe, train, amg)
    assert _copies(copy_scores(images, indexes)).sum() == 0


def test_unconditional_model_copies_and_amg_pushes_it_away(models):
    """The pixel model copies; G_sim with the released constants moves its samples away from the copies.

    It does not remove them by the nL2 criterion (BENCHMARKS.md, "AMG evaluation"): the samples keep
    their training picture's layout and change colour and noise. The test pins that measured behaviour.
    """
    _, uncond, _train, indexes = models

    def run(amg=None):
        gens = [torch.Generator().manual_seed(s) for s in range(6)]
        out = uncond(batch_size=6, generator=gens, num_inference_steps=STEPS, output_type="pt", amg=amg)
        return copy_scores(out.images * 2 - 1, indexes), out

    plain, _ = run()
    assert (plain["nl2"] < 1.4).mean() > 0.5 and (plain["descriptor"] > 0.5).mean() > 0.5
    guided, out = run(_amg("reference", "nl2", indexes, {}))
    assert np.mean([np.mean(s.sim) for s in out.amg_trace.steps]) > 0.5  # G_sim applied at most steps
    assert guided["nl2"].mean() > plain["nl2"].mean() + 0.2
    assert (guided["descriptor"] > 0.5).sum() < (plain["descriptor"] > 0.5).sum()


def test_evaluation_writes_the_summary_the_audit_reads(models, tmp_path):
    settings = EvalSettings(
        num_inference_steps=3, samples_per_prompt=1, unique_prompts=1, unique_samples=1, uncond_samples=2
    )
    modes = {"off": None, "reference": ("reference", "sscd", True, True, True, {})}
    summary = evaluate(MODEL_DIR, tmp_path, settings, modes=modes)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= data["off"]["frac_memorized"] <= 1 and 0 <= data["on"]["frac_memorized"] <= 1
    assert set(data["modes"]) == {"off", "reference"} and data["on"]["mode"] == "reference"
    for key in (
        "denoising_loss",
        "alignment_accuracy",
        "descriptor_top5pct",
        "nl2_top1",
        "frac_nl2_below_1.4",
    ):
        assert key in data["modes"]["reference"]
    assert set(data["unconditional"]) == {"off", "paper", "reference"}
    assert (tmp_path / "table.md").read_text().count("| reference |") >= 1
    assert (tmp_path / "samples_text2img.png").is_file() and summary["seconds"] >= 0


def test_training_job_writes_loadable_diffusers_pipelines(tmp_path):
    from demo.data import make_demo_data
    from pipeline.core.config import DemoConfig

    make_demo_data(DemoConfig(out=str(tmp_path / "demo"), image_size=32))
    report = train_memorizing_models(
        tmp_path / "demo",
        tmp_path / "models",
        seed=0,
        image_size=32,
        vae_steps=1,
        unet_steps=1,
        uncond_steps=1,
        batch_size=4,
    )
    assert report["training_rows"] > report["distinct_pictures"] >= len(report["duplicated"]) > 0
    text2img = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / "text2img")
    assert text2img.tokenizer("a cat").input_ids[:3] == [
        text2img.tokenizer.bos_token_id,
        320,
        2368,
    ]  # CLIP ids
    DDPMPipeline.from_pretrained(tmp_path / "models" / "uncond")
    assert json.loads((tmp_path / "models" / MANIFEST).read_text())["seed"] == 0
    assert TrainingSet.load(tmp_path / "models" / "training_set.npz").rows == report["training_rows"]
