"""The generator actor in-process: seeds per (prompt, sample), batch-size independence, Wen pre-screen.

A tiny random Stable Diffusion pipeline (32×32 images) and the stand-in SSCD descriptor over a few
random 'training images' in RAM; the bundle-backed runs are in tests/test_audit_run.py.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.audit.actor as actor_module
from demo.memorizing.components import tiny_sd_components
from demo.memorizing.descriptors import ThumbnailCopyDescriptor
from pipeline.amg import InMemoryNeighbourIndex, SSCDBackend
from pipeline.amg.pipelines import AMGStableDiffusionPipeline
from pipeline.audit.actor import GeneratorActor, WorkerSpec
from pipeline.audit.identity import sample_seed
from pipeline.audit.matching import Matcher
from pipeline.audit.runner import amg_configs
from pipeline.core.config import AuditConfig

pytestmark = pytest.mark.slow  # samples a tiny Stable Diffusion pipeline


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The actor sets torch's (process-wide) thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "text2img"
    AMGStableDiffusionPipeline(**tiny_sd_components(seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture()
def in_memory_matcher(monkeypatch):
    backend = SSCDBackend(ThumbnailCopyDescriptor(), image_size=32)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = ["an oft repeated caption"] * 2 + [f"caption {i}" for i in range(4)]
    index = InMemoryNeighbourIndex.from_images(backend, images, captions, keys=[f"k{i}" for i in range(6)])
    matcher = Matcher(backend, index, "stand-in", None, lambda row: None)
    monkeypatch.setattr(actor_module, "open_matcher", lambda *args, **kwargs: matcher)
    return matcher


def _spec(model: str, **changes) -> WorkerSpec:
    cfg = AuditConfig(
        prompts="p", out="o", samples_per_prompt=3, num_inference_steps=3, memorized_threshold=0.3
    )
    on, detection = amg_configs(cfg)
    spec = WorkerSpec(
        model_dir=model,
        bundle="",
        bundle_root="",
        similarity="sscd",
        sscd_checkpoint=None,
        amg_on=on,
        detection=detection,
        samples_per_prompt=3,
        seed=0,
        num_inference_steps=3,
        guidance_scale=7.5,
        batch_size=3,
        tile_grid=4,
        tile_threshold=0.15,
        clique_size=10,
        wen_steps=2,
        wen_samples=2,
        wen_threshold=0.0,
        torch_threads=1,
    )
    return dataclasses.replace(spec, **changes)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_samples_do_not_depend_on_batch_size(tiny_model, in_memory_matcher):
    results = {}
    for batch_size in (1, 3):
        actor = GeneratorActor(_spec(tiny_model, batch_size=batch_size))
        results[batch_size] = actor.audit_prompt("p1", "a photo of a cat", ["off", "on"])
    one, three = results[1], results[3]
    assert one["wen"]["wen_score"] == pytest.approx(three["wen"]["wen_score"], rel=1e-5)
    for mode in ("off", "on"):
        rows1, rows3 = one["modes"][mode]["rows"], three["modes"][mode]["rows"]
        assert (
            [r["seed"] for r in rows1]
            == [r["seed"] for r in rows3]
            == [sample_seed(0, "p1", k) for k in range(3)]
        )
        assert [r["matched_key"] for r in rows1] == [r["matched_key"] for r in rows3]
        assert [r["memorized"] for r in rows1] == [r["memorized"] for r in rows3]
        assert np.allclose([r["similarity"] for r in rows1], [r["similarity"] for r in rows3], atol=1e-4)
        for a, b in zip(one["modes"][mode]["images"], three["modes"][mode]["images"], strict=False):
            assert np.abs(_pixels(a) - _pixels(b)).max() <= 1  # at most one 8-bit level of float noise
    # Distinct seeds give distinct samples, and AMG 'on' starts from the same noise as 'off'.
    imgs = [_pixels(b) for b in three["modes"]["off"]["images"]]
    assert np.abs(imgs[0] - imgs[1]).max() > 10
    assert three["modes"]["on"]["rows"][0]["amg_fired_steps"] is not None
    assert three["modes"]["off"]["rows"][0]["amg_fired"] is None


def test_sample_rows_carry_the_match_and_flags(tiny_model, in_memory_matcher):
    actor = GeneratorActor(_spec(tiny_model))
    result = actor.audit_prompt("p2", "a red bicycle", ["off"])
    rows = result["modes"]["off"]["rows"]
    assert [r["sample_index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["matched_key"] in {f"k{i}" for i in range(6)} and r["similarity_kind"] == "sscd"
        assert r["memorized"] == (r["similarity"] > 0.3) and r["seconds"] > 0
    clique = result["modes"]["off"]["clique"]
    assert clique["required"] == 3 and isinstance(clique["flagged"], bool)
    assert sum(r["in_clique"] for r in rows) in (0, len(clique["clique"]))


def test_wen_prescreen_skips_low_scoring_prompts(tiny_model, in_memory_matcher):
    actor = GeneratorActor(_spec(tiny_model, wen_threshold=1e9))
    result = actor.audit_prompt("p3", "a red bicycle", ["off", "on"])
    assert result["wen"]["skipped"] and result["modes"] == {}
    assert len(result["wen"]["wen_norms"]) == 2 and len(result["wen"]["wen_norms"][0]) == 2
    # A stored score is reused, not recomputed.
    again = actor.audit_prompt("p3", "a red bicycle", ["off"], wen={**result["wen"], "skipped": False})
    assert again["wen"]["wen_score"] == result["wen"]["wen_score"] and len(again["modes"]["off"]["rows"]) == 3
