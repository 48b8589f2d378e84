"""AMG pipelines: bit-for-bit equality with diffusers when AMG does nothing, and end-to-end runs.

Tiny random models built from configs (no hub): a Stable Diffusion pipeline with 32×32 images and
8×8×4 latents, and pixel-space UNet2DModels (unconditional and class-conditional) at 16×16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

from demo.memorizing.components import pixel_schedulers, tiny_sd_components, tiny_uncond_unet
from demo.memorizing.descriptors import ThumbnailCopyDescriptor
from pipeline.amg import (
    AMGConfig,
    AMGDDIMPipeline,
    AMGDDPMPipeline,
    AMGStableDiffusionPipeline,
    AntiMemorizationGuidance,
    InMemoryNeighbourIndex,
    MemorizationDetector,
    NormalizedL2Backend,
    SSCDBackend,
)
from pipeline.amg.pipelines import _eps_coefficient, _from_eps

PROMPTS = ["a photo of a cat", "a red bicycle"]
DUP = "an oft repeated caption"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # samples tiny diffusion models


@pytest.fixture(scope="module")
def sd_components():
    return tiny_sd_components(seed=0)


@pytest.fixture(scope="module")
def sscd_index():
    """Stand-in SSCD over 8 random 32×32 'training images'; rows 0-2 share a duplicated caption."""
    backend = SSCDBackend(ThumbnailCopyDescriptor(), image_size=32)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = [DUP] * 3 + [f"unique caption {i}" for i in range(5)]
    return backend, InMemoryNeighbourIndex.from_images(backend, images, captions)


def _sd(pipe, **kwargs):
    return pipe(
        PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np", **kwargs
    )


def _amg(backend, index, mode="reference", **overrides):
    cfg = AMGConfig.preset(mode, backend.name, **overrides)
    return AntiMemorizationGuidance(MemorizationDetector(backend, index, cfg))


def test_sd_with_amg_disabled_or_silent_equals_diffusers_bit_for_bit(sd_components, sscd_index):
    backend, index = sscd_index
    plain = _sd(StableDiffusionPipeline(**sd_components)).images
    pipe = AMGStableDiffusionPipeline(**sd_components)
    assert np.array_equal(_sd(pipe).images, plain)  # amg=None: the parent's __call__
    disabled = _sd(pipe, amg=_amg(backend, index, enabled=False))
    assert np.array_equal(disabled.images, plain)
    assert disabled.amg_trace.steps == []
    # Enabled, but no gate can open: the AMG loop itself must not perturb a single bit.
    silent = _sd(
        pipe, amg=_amg(backend, index, mode="paper", threshold="constant", lambda_start=2.0, detect_every=1)
    )
    assert np.array_equal(silent.images, plain)
    assert len(silent.amg_trace.steps) == 4 and not any(silent.amg_trace.any_fired())
    assert silent.amg_trace.detections == 4 + 1 and silent.amg_trace.gradients == 0
    assert len(silent.amg_trace.final_sigma) == 2


def test_sd_end_to_end_all_terms_fire_and_caption_pass_is_batched(sd_components, sscd_index):
    backend, index = sscd_index
    pipe = AMGStableDiffusionPipeline(**sd_components)
    plain = _sd(pipe).images
    # Thresholds below any σ: every gate opens (σ − (−1) > 0 keeps s1, s2 positive on random models);
    # n0 is forced to a duplicated-caption row by an index holding only those rows' vectors.
    dup_index = InMemoryNeighbourIndex(index.embeddings(np.arange(3)), [DUP] * 3)
    amg = _amg(
        backend,
        dup_index,
        mode="reference",
        lambda_a=-1.0,
        lambda_b=0.0,
        c3_sigma_offset=None,
        c3_time_scale=None,
        c3=50.0,
        c1=2.0,
        c2_saturation=None,
        c2=2.0,
        scale_sigma_offset=-1.0,
    )
    out = _sd(pipe, amg=amg)
    trace = out.amg_trace
    assert not np.array_equal(out.images, plain) and np.isfinite(out.images).all()
    assert all(all(s.spe) and all(s.dup) and all(s.sim) for s in trace.steps)
    assert trace.steps[0].dup_caption == [DUP, DUP]
    assert all(s.s1[0] > 0 and s.s2[0] > 0 and s.c3[0] == 50.0 for s in trace.steps)
    # ε(x_t, y_N) ran as a separate pass at the first trigger only; afterwards it rode in the CFG batch.
    assert trace.caption_passes == 1
    # Batched and separate caption passes give the same result (up to batch-size float noise).
    amg_unbatched = _amg(
        backend,
        dup_index,
        mode="reference",
        lambda_a=-1.0,
        lambda_b=0.0,
        c3_sigma_offset=None,
        c3_time_scale=None,
        c3=50.0,
        c1=2.0,
        c2_saturation=None,
        c2=2.0,
        scale_sigma_offset=-1.0,
    )
    amg_unbatched.planned_captions = lambda state: [None] * state.batch_size
    separate = _sd(pipe, amg=amg_unbatched)
    assert separate.amg_trace.caption_passes == 4
    np.testing.assert_allclose(separate.images, out.images, atol=1e-4)
    # Paper mode fires everything from the same σ_t; its trace records the shared gate.
    paper = _sd(
        pipe,
        amg=_amg(
            backend,
            dup_index,
            mode="paper",
            threshold="constant",
            lambda_start=-1.0,
            c3=50.0,
            c1=2.0,
            c2=2.0,
            scale_sigma_offset=-1.0,
        ),
    )
    assert all(all(s.fired) and all(s.sim) for s in paper.amg_trace.steps)
    assert paper.amg_trace.detections == 4 + 1  # one per step plus the final image


def test_sd_trace_serialises(sd_components, sscd_index):
    import json

    backend, index = sscd_index
    out = _sd(AMGStableDiffusionPipeline(**sd_components), amg=_amg(backend, index))
    data = json.loads(json.dumps(out.amg_trace.to_dict()))
    assert data["config"]["mode"] == "reference" and len(data["steps"]) == 4
    assert set(data["steps"][0]) >= {"sigma", "threshold", "spe", "dup", "sim", "s1", "s2", "c3", "neighbour"}
    images, _nsfw, trace = AMGStableDiffusionPipeline(**sd_components)(
        PROMPTS[0], num_inference_steps=2, output_type="np", return_dict=False, amg=_amg(backend, index)
    )
    assert images.shape == (1, 32, 32, 3) and trace.steps


@pytest.fixture(scope="module")
def pixel_unet():
    return tiny_uncond_unet(sample_size=16, channels=(16, 32), seed=0)


@pytest.fixture(scope="module")
def nl2_index():
    backend = NormalizedL2Backend(image_size=16)
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    return backend, InMemoryNeighbourIndex.from_images(backend, images, [f"img {i}" for i in range(12)])


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pixel_pipelines_with_amg_disabled_or_silent_equal_diffusers(kind, pixel_unet, nl2_index):
    backend, index = nl2_index
    ddpm, ddim = pixel_schedulers()
    base_cls, amg_cls, scheduler = {
        "ddpm": (DDPMPipeline, AMGDDPMPipeline, ddpm),
        "ddim": (DDIMPipeline, AMGDDIMPipeline, ddim),
    }[kind]
    extra = {"eta": 0.5} if kind == "ddim" else {}

    def run(pipe, **kwargs):
        return pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(5),
            num_inference_steps=6,
            output_type="np",
            **extra,
            **kwargs,
        )

    plain = run(base_cls(unet=pixel_unet, scheduler=scheduler)).images
    pipe = amg_cls(unet=pixel_unet, scheduler=scheduler)
    assert np.array_equal(run(pipe).images, plain)
    assert np.array_equal(run(pipe, amg=_amg(backend, index, enabled=False)).images, plain)
    silent = run(
        pipe, amg=_amg(backend, index, mode="paper", threshold="constant", lambda_start=0.0, detect_every=1)
    )
    assert np.array_equal(silent.images, plain) and silent.amg_trace.detections == 6 + 1
    fired = run(pipe, amg=_amg(backend, index, threshold="constant", lambda_start=-100.0, c3=10.0))
    assert not np.array_equal(fired.images, plain)
    assert all(all(s.sim) and not any(s.spe) and not any(s.dup) for s in fired.amg_trace.steps)
    assert fired.amg_trace.gradients == 6


def test_class_conditional_unet_runs_with_labels_and_amg(nl2_index):
    backend, index = nl2_index
    unet = tiny_uncond_unet(sample_size=16, channels=(16, 32), num_class_embeds=3, seed=1)
    _, ddim = pixel_schedulers()
    pipe = AMGDDIMPipeline(unet=unet, scheduler=ddim)
    labels = torch.tensor([0, 2])

    # A plain transcription of DDIM sampling with class labels is the reference.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn((2, 3, 16, 16), generator=gen)
    ddim.set_timesteps(5)
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t, class_labels=labels).sample, t, x, eta=0.0, generator=gen).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    def run(**kwargs):
        return pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(6),
            num_inference_steps=5,
            output_type="np",
            class_labels=labels,
            **kwargs,
        )

    assert np.array_equal(run().images, expected)
    assert np.array_equal(run(amg=_amg(backend, index, enabled=False)).images, expected)
    other_class = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(6),
        num_inference_steps=5,
        output_type="np",
        class_labels=1,
    ).images
    assert not np.array_equal(other_class, expected)
    guided = run(amg=_amg(backend, index, threshold="constant", lambda_start=-100.0, c3=10.0))
    assert all(all(s.sim) for s in guided.amg_trace.steps) and not np.array_equal(guided.images, expected)


# ----------------------------------------------------------------------------- G_sim after clipping
def _schedulers(kind: str, clip: bool, prediction: str = "epsilon"):
    kwargs = {"beta_schedule": "linear", "clip_sample": clip, "prediction_type": prediction}
    return DDPMScheduler(**kwargs) if kind == "ddpm" else DDIMScheduler(**kwargs)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("kind", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_shift_after_the_step_equals_the_eps_path_without_clipping(kind, eta, prediction):
    """Unclipped, a DDPM/DDIM step is linear in ε̂: step(ε̂ + δ) = step(ε̂) + (d prev/d ε̂)·δ at every t."""
    scheduler = _schedulers(kind, clip=False, prediction=prediction)
    scheduler.set_timesteps(8)
    gen = torch.Generator().manual_seed(0)
    x, eps, delta = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    kwargs = {"eta": eta} if kind == "ddim" else {}
    for t in scheduler.timesteps:
        ab = scheduler.alphas_cumprod[int(t)].double()
        old = scheduler.step(
            _from_eps(scheduler, eps + delta, x, ab),
            t,
            x,
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        ).prev_sample
        new = (
            scheduler.step(
                _from_eps(scheduler, eps, x, ab), t, x, generator=torch.Generator().manual_seed(1), **kwargs
            ).prev_sample
            + _eps_coefficient(scheduler, t, eta).double() * delta
        )
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)


class _ShiftingAMG:
    """A stand-in for G_sim that the clamp would truncate: every step, ε̂ ← ε̂ + δ."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta
        self.config = AMGConfig.preset("paper", "nl2")

    def begin(self, batch_size, num_train_timesteps):
        return None

    def guide(self, state, *, eps, **kwargs):
        return eps + self.delta

    def finish(self, state, images):
        return None


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pixel_guidance_is_added_after_clipping(kind, pixel_unet):
    steps, shape = 4, (2, 3, 16, 16)
    delta = 0.8 * torch.randn(shape, generator=torch.Generator().manual_seed(2))
    amg_cls = AMGDDPMPipeline if kind == "ddpm" else AMGDDIMPipeline

    def pipeline(clip: bool) -> torch.Tensor:
        pipe = amg_cls(unet=pixel_unet, scheduler=_schedulers(kind, clip))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(5),
            num_inference_steps=steps,
            output_type="pt",
            amg=_ShiftingAMG(delta),
        )
        return out.images

    def by_hand(clip: bool, after_step: bool) -> torch.Tensor:
        scheduler = _schedulers(kind, clip)
        scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(shape, generator=gen)
        kwargs = {"eta": 0.0} if kind == "ddim" else {}
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = pixel_unet(x, t).sample
                if after_step:  # clipped step on the model's own ε̂, then (d prev/d ε̂)·δ
                    prev = scheduler.step(eps, t, x, generator=gen, **kwargs).prev_sample
                    x = prev + _eps_coefficient(scheduler, t, 0.0) * delta
                else:  # the ε-path: the guided ε̂ goes through the clamp
                    x = scheduler.step(eps + delta, t, x, generator=gen, **kwargs).prev_sample
        return (x / 2 + 0.5).clamp(0, 1)

    clipped = pipeline(clip=True)
    torch.testing.assert_close(clipped, by_hand(clip=True, after_step=True), rtol=1e-5, atol=1e-5)
    assert (clipped - by_hand(clip=True, after_step=False)).abs().max() > 1e-2  # the clamp would cut it
    unclipped = pipeline(clip=False)
    torch.testing.assert_close(unclipped, by_hand(clip=False, after_step=False), rtol=1e-4, atol=1e-4)


def test_unsupported_scheduler_is_refused(sd_components, sscd_index):
    from diffusers import EulerDiscreteScheduler

    backend, index = sscd_index
    comps = dict(sd_components)
    comps["scheduler"] = EulerDiscreteScheduler.from_config(comps["scheduler"].config)
    with pytest.raises(ValueError, match="variance-preserving"):
        _sd(AMGStableDiffusionPipeline(**comps), amg=_amg(backend, index))
