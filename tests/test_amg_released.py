"""The released pixel procedure (``AMGConfig.preset("released_pixel", "nl2")``) against hand computation.

Everything is recomputed here in float64 NumPy from the definitions: the training set noised with
``numpy.random.default_rng([noise_seed, step])``, mL2 = ℓ2(x_t, nearest)/(α·mean of the k smallest),
the threshold 1.95 − 0.45·e^(−0.025·i) on the released step clock, ∇mL2 with the nearest row and the
denominator held fixed, and the step's mean shifted by Σ·g after the scheduler's (clipping) step.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from demo.memorizing.components import pixel_schedulers, tiny_uncond_unet
from pipeline.amg import (
    AMGConfig,
    AMGDDIMPipeline,
    AMGDDPMPipeline,
    AntiMemorizationGuidance,
    InMemoryNeighbourIndex,
    MemorizationDetector,
    NormalizedL2Backend,
    terms,
)
from pipeline.amg.pipelines import _step_variance

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE = 2  # 3×2×2 pictures: D = 12
D = 3 * SIDE * SIDE


def _train(n: int = 5, side: int = SIDE, seed: int = 0) -> torch.Tensor:
    """Pictures in [−1, 1] on a grid of 1/8, so the index's float32 (x + 1)/2 round-trips exactly."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(-8, 9, size=(n, 3, side, side)) / 8.0)


def _amg(train: torch.Tensor, **overrides) -> AntiMemorizationGuidance:
    backend = NormalizedL2Backend(image_size=train.shape[-1])
    index = InMemoryNeighbourIndex.from_images(backend, train, [f"row {i}" for i in range(len(train))])
    config = AMGConfig.preset("released_pixel", "nl2", **overrides)
    return AntiMemorizationGuidance(MemorizationDetector(backend, index, config))


def _noised(train: np.ndarray, alpha_bar: float, seed: int, step: int) -> np.ndarray:
    flat = train.reshape(len(train), -1)
    z = np.random.default_rng([seed, step]).standard_normal(flat.shape, dtype=np.float32).astype(np.float64)
    return math.sqrt(alpha_bar) * flat + math.sqrt(1 - alpha_bar) * z


def _hand(x: np.ndarray, noised: np.ndarray, k: int, alpha: float):
    """mL2, the nearest row, the denominator and ∇_x mL2 (denominator and nearest held fixed)."""
    d = np.sqrt(((x[None, :] - noised) ** 2).mean(axis=1))
    order = np.argsort(d, kind="stable")
    denominator = alpha * d[order[:k]].mean()
    j = int(order[0])
    ml2 = d[j] / denominator
    grad = (x - noised[j]) / (x.size * d[j] * denominator)
    return ml2, j, denominator, grad


def test_preset_has_the_released_constants():
    cfg = AMGConfig.preset("released_pixel", "nl2")
    assert (cfg.mode, cfg.backend, cfg.nl2_k, cfg.nl2_alpha) == ("released_pixel", "nl2", 50, 0.5)
    assert (cfg.c3, cfg.c3_margin, cfg.latch_threshold) == (1000.0, 80.0, -1.5)
    assert (cfg.threshold, cfg.lambda_a, cfg.lambda_b, cfg.lambda_rate) == ("exponential", -1.95, 0.45, 0.025)
    assert (cfg.lambda_respaced_steps, cfg.pause_after, cfg.pause_steps) == (250, 3, 10)
    assert json.loads(json.dumps(cfg.to_dict()))["mode"] == "released_pixel"
    with pytest.raises(ValueError, match="nl2"):
        AMGConfig.preset("released_pixel", "sscd")
    with pytest.raises(ValueError, match="nl2"):
        AMGConfig(mode="released_pixel", backend="sscd")
    with pytest.raises(ValueError, match="pause_after"):
        AMGConfig.preset("released_pixel", "nl2", pause_after=0)


def test_released_step_clock_and_threshold():
    # 250 steps: exactly the released i = 249 … 0.
    assert [terms.released_step_index(n, 250, 250) for n in (0, 1, 248, 249)] == [249, 248, 1, 0]
    # Fewer steps: the remaining steps scaled to 250 (here ×25), 0 at the last step.
    assert [terms.released_step_index(n, 10, 250) for n in range(10)] == [225 - 25 * n for n in range(10)]
    with pytest.raises(ValueError):
        terms.released_step_index(10, 10, 250)
    cfg = AMGConfig.preset("released_pixel", "nl2")
    for i in (0, 20, 50, 100, 249):  # σ scale: λ_i = −(1.95 − 0.45·e^(−0.025·i))
        assert terms.threshold(i, 1000, cfg) == pytest.approx(
            -(1.95 - 0.45 * math.exp(-0.025 * i)), rel=1e-12
        )


def test_one_step_matches_hand_computation():
    train = _train()
    seed, step, num_steps, alpha_bar, k = 3, 7, 10, 0.55, 4
    amg = _amg(train, noise_seed=seed, nl2_k=k, latch_threshold=None)
    noised = _noised(train.numpy(), alpha_bar, seed, step)
    # Sample 0 sits near noised row 2 (guided); sample 1 is far from every row (mL2 ≈ 1/α = 2, not guided).
    offset = np.random.default_rng(11).normal(size=D) * 0.2
    x = np.stack([noised[2] + offset, np.full(D, 50.0)])
    x_t = torch.from_numpy(x.reshape(2, 3, SIDE, SIDE))
    state = amg.begin(2, 1000)
    g = amg.guide_released(
        state,
        step=step,
        num_steps=num_steps,
        t=300,
        x_t=x_t,
        alpha_bar=torch.tensor(alpha_bar, dtype=torch.float64),
    )

    i = (num_steps - 1 - step) * 250 / num_steps  # 5.0
    thres = 1.95 - 0.45 * math.exp(-0.025 * i)
    ml2, j, _, grad = _hand(x[0], noised, k, 0.5)
    ml2_far, _, _, _ = _hand(x[1], noised, k, 0.5)
    assert j == 2 and ml2 < thres < ml2_far
    scale = 1000 * 80 * (thres - ml2)
    expected = np.stack([scale * grad, np.zeros(D)]).reshape(2, 3, SIDE, SIDE)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-6, atol=1e-9)

    rec = state.trace.steps[0]
    np.testing.assert_allclose(rec.sigma, [-ml2, -ml2_far], rtol=1e-6)
    assert rec.threshold == pytest.approx(-thres, rel=1e-12)
    assert rec.fired == [True, False] and rec.sim == [True, False] and rec.neighbour[0] == 2
    np.testing.assert_allclose(rec.c3, [scale, 0.0], rtol=1e-6)
    assert state.trace.detections == 1 and state.trace.gradients == 1

    # The closed-form gradient above is the derivative of mL2 with nearest and denominator fixed.
    denominator = 0.5 * np.sort(np.sqrt(((x[0][None] - noised) ** 2).mean(1)))[:k].mean()
    h, direction = 1e-6, np.random.default_rng(12).normal(size=D)

    def ml2_at(v):
        return np.sqrt(((v - noised[2]) ** 2).mean()) / denominator

    fd = (ml2_at(x[0] + h * direction) - ml2_at(x[0] - h * direction)) / (2 * h)
    assert float(grad @ direction) == pytest.approx(fd, rel=1e-6)


def test_noised_detection_is_reproducible_and_the_same_for_every_sample():
    train = _train()
    amg = _amg(train, noise_seed=1)
    x = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = amg.detector.detect_noised(x, torch.tensor(0.3), step=4)
    b = amg.detector.detect_noised(x[[2, 0]], torch.tensor(0.3), step=4)
    torch.testing.assert_close(a.sigma[[2, 0]], b.sigma)
    c = amg.detector.detect_noised(x, torch.tensor(0.3), step=5)  # fresh noise at another step
    assert not torch.equal(a.sigma, c.sigma)
    with pytest.raises(ValueError, match="same channels and size"):
        amg.detector.detect_noised(torch.zeros(1, 3, 4, 4), torch.tensor(0.3), step=0)
    small = _amg(train, noised_max_rows=3)
    with pytest.raises(ValueError, match="noised_max_rows"):
        small.detector.detect_noised(x, torch.tensor(0.3), step=0)


def _run(amg, xs, num_steps, alpha_bar=0.5):
    state = amg.begin(xs[0].shape[0], 1000)
    outs = []
    for n, x in enumerate(xs):
        outs.append(
            amg.guide_released(
                state, step=n, num_steps=num_steps, t=999 - n, x_t=x, alpha_bar=torch.tensor(alpha_bar)
            )
        )
    return state, outs


def test_no_guidance_before_the_latch():
    train = _train()
    seed = 2
    # λ far below every σ: any armed step would be guided; only the latch (mL2 < 1.5) holds it back.
    amg = _amg(train, noise_seed=seed, lambda_a=-100.0, pause_after=None)
    far = torch.full((1, 3, SIDE, SIDE), 50.0, dtype=torch.float64)  # mL2 ≈ 2 > 1.5
    near = torch.from_numpy(_noised(train.numpy(), 0.5, seed, 3)[1].reshape(1, 3, SIDE, SIDE))
    state, outs = _run(amg, [far, far, far, near, far, far], num_steps=6)
    steps = state.trace.steps
    assert [s.fired[0] for s in steps] == [True] * 6
    assert [s.latched[0] for s in steps] == [False, False, False, True, True, True]
    assert [s.sim[0] for s in steps] == [False, False, False, True, True, True]
    assert outs[:3] == [None, None, None] and all(o is not None for o in outs[3:])
    assert all(s.sigma[0] < -1.5 for s in steps[:3]) and steps[3].sigma[0] > -1.5


def test_pause_after_three_unguided_steps():
    train = _train()
    seed = 2
    amg = _amg(train, noise_seed=seed, latch_threshold=None, pause_after=3, pause_steps=4)
    far = torch.full((1, 3, SIDE, SIDE), 50.0, dtype=torch.float64)  # never guided: mL2 ≈ 2 > thres
    state, outs = _run(amg, [far] * 12, num_steps=12)
    # Steps 0-2 unguided -> steps 3-6 paused (no search at all) -> 7-9 unguided -> 10, 11 paused.
    assert [s.step for s in state.trace.steps] == [0, 1, 2, 7, 8, 9]
    assert state.trace.detections == 6 and outs == [None] * 12

    # Two samples: the far one pauses, the near one keeps being guided; the paused one is recorded,
    # never guided during its pause even when it comes close, and its counters do not move.
    near_at = {
        n: torch.from_numpy(_noised(train.numpy(), 0.5, seed, n)[0].reshape(1, 3, SIDE, SIDE))
        for n in range(8)
    }
    xs = [torch.cat([far if n != 4 else near_at[n], near_at[n]]) for n in range(8)]
    state, outs = _run(amg, xs, num_steps=8)
    steps = state.trace.steps
    assert len(steps) == 8
    assert [s.paused[0] for s in steps] == [False] * 3 + [True] * 4 + [False]
    assert [s.sim[0] for s in steps] == [False] * 8  # step 4 comes close, inside the pause
    assert steps[4].fired[0] and [s.sim[1] for s in steps] == [True] * 8


def test_released_pipeline_step_is_the_scheduler_step_plus_variance_times_g():
    """Two DDPM steps by hand: prev_sample = step(model output) + Σ·g, Σ the posterior variance."""
    unet = tiny_uncond_unet(sample_size=16, channels=(16, 32), seed=0)
    train = _train(n=6, side=16, seed=1)
    seed, c3 = 5, 10.0
    amg = _amg(train, noise_seed=seed, latch_threshold=None, lambda_a=-100.0, c3=c3, nl2_k=4)
    ddpm, _ = pixel_schedulers()
    pipe = AMGDDPMPipeline(unet=unet, scheduler=ddpm)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=1,
        generator=torch.Generator().manual_seed(7),
        num_inference_steps=2,
        output_type="pt",
        amg=amg,
    )

    gen = torch.Generator().manual_seed(7)
    x = torch.randn((1, 3, 16, 16), generator=gen)
    ddpm.set_timesteps(2)
    shifts = []
    for n, t in enumerate(ddpm.timesteps):
        ab = float(ddpm.alphas_cumprod[int(t)])
        prev_t = int(ddpm.previous_timestep(t))
        ab_prev = float(ddpm.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev) if int(t) > 0 else 0.0
        thres = 100.0 - 0.45 * math.exp(-0.025 * ((1 - n) * 250 / 2))
        ml2, _, _, grad = _hand(x.double().numpy().ravel(), _noised(train.numpy(), ab, seed, n), 4, 0.5)
        g = c3 * 80 * (thres - ml2) * grad
        with torch.no_grad():
            prev = ddpm.step(unet(x, t).sample, t, x, generator=gen).prev_sample
        shift = torch.from_numpy(variance * g.reshape(1, 3, 16, 16)).float()
        shifts.append(float(shift.abs().max()))
        x = prev + shift
    assert shifts[0] > 1e-3 and shifts[1] == 0.0  # the last DDPM step adds no noise: Σ = 0
    expected = (x / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out.images, expected, rtol=1e-5, atol=1e-5)
    assert [s.sim for s in out.amg_trace.steps] == [[True], [True]]


def test_step_variance_is_the_schedulers_own():
    ddpm, ddim = pixel_schedulers()
    x = torch.zeros(1, 3, 4, 4)
    ddpm.set_timesteps(10)
    t = int(ddpm.timesteps[3])
    ab, ab_prev = float(ddpm.alphas_cumprod[t]), float(ddpm.alphas_cumprod[int(ddpm.previous_timestep(t))])
    posterior = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    assert float(_step_variance(ddpm, t, x, x, 0.0)) == pytest.approx(posterior, rel=1e-5)
    ddim.set_timesteps(10)
    t = int(ddim.timesteps[3])
    ab, ab_prev = float(ddim.alphas_cumprod[t]), float(ddim.alphas_cumprod[t - 100])
    sigma2 = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    assert float(_step_variance(ddim, t, x, x, 0.5)) == pytest.approx(0.25 * sigma2, rel=1e-5)


def test_ddim_with_eta_zero_is_refused_and_eta_positive_runs():
    unet = tiny_uncond_unet(sample_size=16, channels=(16, 32), seed=0)
    amg = _amg(_train(n=6, side=16, seed=1), latch_threshold=None, lambda_a=-100.0, c3=1e-3)
    _, ddim = pixel_schedulers()
    pipe = AMGDDIMPipeline(unet=unet, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 1, "num_inference_steps": 2, "output_type": "np", "amg": amg}
    with pytest.raises(ValueError, match="eta"):
        pipe(generator=torch.Generator().manual_seed(0), eta=0.0, **kwargs)
    out = pipe(generator=torch.Generator().manual_seed(0), eta=1.0, **kwargs)
    assert all(s.sim == [True] for s in out.amg_trace.steps)


def test_text_guidance_refuses_the_pixel_procedure():
    amg = _amg(_train())
    state = amg.begin(1, 1000)
    x = torch.zeros(1, 3, SIDE, SIDE)
    with pytest.raises(ValueError, match="released_pixel"):
        amg.guide(state, step=0, t=10, x_t=x, alpha_bar=torch.tensor(0.5), eps=x, to_pixels=lambda v: v)
