"""The AMG step composed from its terms: gates, scales, G_dup hold, σ re-check, on scripted detections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.amg.config import AMGConfig
from pipeline.amg.detector import Detection
from pipeline.amg.guidance import AntiMemorizationGuidance
from pipeline.core.neighbours import DuplicateCaption

B, SHAPE = 3, (3, 2, 4, 4)
ALPHA_BAR = torch.tensor(0.64, dtype=torch.float64)
LAMBDA = 0.3
S0 = 7.5


class ScriptedDetector:
    """Returns the σ values it is given, in order; σ(images) = Σ images·w for gradients (∇ = w)."""

    def __init__(self, sigmas: list[list[float]], captions: list[str | None], config: AMGConfig):
        self.sigmas = list(sigmas)
        self.captions = [DuplicateCaption(c, 5 if c else 1) for c in captions]
        self.config = config
        self.w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        self.calls = 0

    def threshold(self, t, T):
        return LAMBDA

    def detect(self, images):
        """The next scripted σ list, as long as the batch detected (fewer rows when some are quiet)."""
        self.calls += 1
        sigma = torch.tensor(self.sigmas.pop(0), dtype=torch.float64)
        n = len(images)
        assert len(sigma) == n, f"scripted {len(sigma)} σ for {n} detected rows"
        return Detection(sigma, torch.arange(n), self.w.flatten(1)[:n, None, :], list(self.captions[:n]))

    def similarity(self, images, detection):
        return (images.flatten(1) * detection.neighbours[:, 0]).sum(-1)

    def memorized(self, sigma):
        return sigma > 0.5


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x_t, eps_u, eps_c, eps_n = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4))
    eps = eps_u + S0 * (eps_c - eps_u)
    return x_t, eps_u, eps_c, eps_n, eps


def _step(amg, state, det, step, seed):
    x_t, eps_u, eps_c, eps_n, eps = _inputs(seed)
    calls = []

    def caption_eps(rows, captions):
        calls.append((rows.tolist(), captions))
        return eps_n[rows]

    out = amg.guide(
        state,
        step=step,
        t=500,
        x_t=x_t,
        alpha_bar=ALPHA_BAR,
        eps=eps,
        to_pixels=lambda z: z,
        eps_uncond=eps_u,
        eps_cond=eps_c,
        guidance_scale=S0,
        caption_eps=caption_eps,
    )
    return out, (x_t, eps_u, eps_c, eps_n, eps), calls


def test_shared_gate_applies_all_three_terms_above_lambda_only():
    cfg = AMGConfig.preset(
        "paper", "sscd", c1=13.0, c2=13.0, c3=2.0, threshold="constant", lambda_start=LAMBDA
    )
    det = ScriptedDetector([[0.2, 0.45, 0.8]], ["dup caption", "dup caption", None], cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    out, (_x_t, eps_u, eps_c, eps_n, eps), calls = _step(amg, state, det, 0, seed=1)

    grad = det.w / math.sqrt(0.64)  # ∂σ/∂x_t through x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ
    expected = eps.clone()
    for i, sigma in enumerate([0.2, 0.45, 0.8]):
        if sigma <= LAMBDA:
            continue
        s1 = max(min(13 * sigma, S0 - 1), 0)
        s2 = max(min(13 * sigma, S0 - s1 - 1), 0) if i < 2 else 0.0
        expected[i] += -s1 * (eps_c[i] - eps_u[i]) - s2 * (eps_n[i] - eps_u[i])
        expected[i] += 2.0 * math.sqrt(1 - 0.64) * grad[i]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    rec = state.trace.steps[0]
    assert (
        rec.fired == [False, True, True] and rec.spe == [False, True, True] and rec.sim == [False, True, True]
    )
    assert rec.dup == [False, True, False]  # sample 2: s1 = s0 − 1 leaves no budget for s2
    assert rec.s1 == pytest.approx([0.0, 5.85, 6.5]) and rec.s2 == pytest.approx([0.0, 0.65, 0.0])
    assert calls == [([1], ["dup caption"])] and det.calls == 1  # one detection: no re-check in paper mode
    assert state.planned == [None, "dup caption", None]  # batched with the next CFG pass


def test_nothing_detected_returns_the_input_tensor_itself():
    cfg = AMGConfig.preset("paper", "sscd", threshold="constant", lambda_start=LAMBDA)
    det = ScriptedDetector([[0.1, 0.2, 0.29]], ["a", "b", "c"], cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    x_t, eps_u, eps_c, _, eps = _inputs(0)
    out = amg.guide(
        state,
        step=0,
        t=10,
        x_t=x_t,
        alpha_bar=ALPHA_BAR,
        eps=eps,
        to_pixels=lambda z: z,
        eps_uncond=eps_u,
        eps_cond=eps_c,
        guidance_scale=S0,
    )
    assert out is eps and state.trace.gradients == 0 and state.trace.detections == 1


def test_disabled_config_does_nothing():
    cfg = AMGConfig.preset("reference", "sscd", enabled=False)
    det = ScriptedDetector([], [None] * B, cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    x_t, eps_u, eps_c, _, eps = _inputs(0)
    assert (
        amg.guide(
            state,
            step=0,
            t=10,
            x_t=x_t,
            alpha_bar=ALPHA_BAR,
            eps=eps,
            to_pixels=lambda z: z,
            eps_uncond=eps_u,
            eps_cond=eps_c,
            guidance_scale=S0,
        )
        is eps
    )
    assert det.calls == 0 and state.trace.steps == []


def test_reference_gates_hold_and_recheck():
    cfg = AMGConfig.preset("reference", "sscd", threshold="constant", lambda_start=LAMBDA, dup_hold_steps=2)
    # Per step: σ1 for the 3 samples, then σ2 (re-check after G_spe/G_dup).
    script = [
        [0.2, 0.35, -0.1],
        [0.25, 0.32, -0.1],  # step 0: sample 1 triggers G_dup; σ2 of sample 1 > λ -> G_sim
        [0.1, 0.1, -0.1],
        [0.1, 0.29, -0.1],  # step 1: no trigger, sample 1 held (the hold's 2nd step); σ2 below λ
        [0.1, 0.1, -0.1],
        [0.1, 0.1, -0.1],  # step 2: hold over (2 steps in all, the trigger's included)
        [0.1, 0.1, -0.1],
        [0.1, 0.1, -0.1],  # step 3: still over
    ]
    det = ScriptedDetector(script, ["cap0", "cap1", None], cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    grad = det.w / math.sqrt(0.64)
    for step in range(4):
        sig1, sig2 = script[2 * step], script[2 * step + 1]
        out, (_x_t, eps_u, eps_c, eps_n, eps), _calls = _step(amg, state, det, step, seed=10 + step)
        expected = eps.clone()
        for i in range(B):
            s1 = max(min(13 * sig1[i], 6.5), 0)  # G_spe: no threshold, zero for σ <= 0
            held = i == 1 and step == 1
            dup = i == 1 and (sig1[i] > LAMBDA or held)
            s2 = max(min((6.5 - s1) / 0.3 * sig1[i], 6.5 - s1), 0) if dup else 0.0
            expected[i] += -s1 * (eps_c[i] - eps_u[i]) - s2 * (eps_n[i] - eps_u[i])
            if sig2[i] > LAMBDA:
                c3 = 100 * (sig2[i] - 0.3) * math.exp((1000 - 500) / 170)
                expected[i] += c3 * math.sqrt(1 - 0.64) * grad[i]
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-9)
        rec = state.trace.steps[-1]
        assert rec.dup == [False, step < 2, False], step
        assert rec.sim == [False, step == 0, False]
        assert rec.spe == [True, True, False]
        assert rec.sigma_recheck[2] is None and rec.sigma_recheck[0] == pytest.approx(sig2[0])
    assert det.calls == 8  # two detections per step: σ1, then σ2 after G_spe changed ε̂
    assert state.trace.steps[0].dup_caption == [None, "cap1", None]


def test_reference_caption_is_the_latest_found_and_kept_through_steps_without_one():
    cfg = AMGConfig.preset("reference", "sscd", threshold="constant", lambda_start=LAMBDA, use_spe=False)
    det = ScriptedDetector([[0.4, 0.0, 0.0], [0.1, 0.0, 0.0]] * 3, ["first", None, None], cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    _step(amg, state, det, 0, seed=1)
    det.captions = [DuplicateCaption("second", 9)] * B  # n0 changes: the reference takes the new y_N
    _step(amg, state, det, 1, seed=2)
    det.captions = [DuplicateCaption(None, 0)] * B  # no y_N now: the latest one stays
    _step(amg, state, det, 2, seed=3)
    assert [s.dup_caption[0] for s in state.trace.steps] == ["first", "second", "second"]


def test_unconditional_uses_g_sim_only():
    cfg = AMGConfig.preset("reference", "nl2", threshold="constant", lambda_start=-1.6, c3=7.0)
    det = ScriptedDetector([[-1.0, -1.9, -0.5]], [None] * B, cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    cfg_threshold = -1.6
    det.threshold = lambda t, T: cfg_threshold
    x_t, _, _, _, eps = _inputs(3)
    out = amg.guide(state, step=0, t=100, x_t=x_t, alpha_bar=ALPHA_BAR, eps=eps, to_pixels=lambda z: z)
    grad = det.w / math.sqrt(0.64)
    expected = eps.clone()
    for i, sigma in enumerate([-1.0, -1.9, -0.5]):
        if sigma > cfg_threshold:
            expected[i] += 7.0 * math.sqrt(1 - 0.64) * grad[i]
    torch.testing.assert_close(out, expected)
    rec = state.trace.steps[0]
    assert rec.spe == [False] * 3 and rec.dup == [False] * 3 and rec.sim == [True, False, True]
    assert np.allclose(rec.c3, [7.0, 0.0, 7.0])


def test_paper_g_sim_scaled_by_the_margin_pushes_harder_the_deeper_a_sample_is_inside_the_gate():
    cfg = AMGConfig.preset(
        "paper", "l2", threshold="constant", lambda_start=-0.15, c3=7.0, c3_margin=10.0, detect_every=1
    )
    det = ScriptedDetector([[-0.05, -0.2, -0.1]], [None] * B, cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    det.threshold = lambda t, T: -0.15
    x_t, _, _, _, eps = _inputs(3)
    out = amg.guide(state, step=0, t=100, x_t=x_t, alpha_bar=ALPHA_BAR, eps=eps, to_pixels=lambda z: z)
    grad = det.w / math.sqrt(0.64)
    scales = [7.0 * 10.0 * max(sigma + 0.15, 0.0) for sigma in (-0.05, -0.2, -0.1)]  # c3·m·(σ − λ)
    expected = eps.clone()
    for i, scale in enumerate(scales):
        expected[i] += scale * math.sqrt(1 - 0.64) * grad[i]
    torch.testing.assert_close(out, expected)
    rec = state.trace.steps[0]
    assert rec.sim == [True, False, True]
    np.testing.assert_allclose(rec.c3, [7.0, 0.0, 3.5], rtol=1e-6)


def test_detect_every_schedules_each_sample_alone():
    """A quiet sample is detected every detect_every-th step whatever its batch neighbours do; a sample
    whose gate opened is detected at every step from then on, even once σ is back under λ."""
    cfg = AMGConfig.preset(
        "paper", "sscd", threshold="constant", lambda_start=LAMBDA, detect_every=3, c1=1.0, c3=1.0
    )
    script = {
        0: [0.1, 0.1, 0.1],  # all due (first step)
        3: [0.1, 0.5, 0.1],  # all due; sample 1 fires
        4: [0.5],  # sample 1 alone: still above λ
        5: [0.1],  # sample 1 alone: under λ, still watched
        6: [0.1, 0.1, 0.1],  # samples 0 and 2, three steps after step 3, and sample 1
        7: [0.1],
        8: [0.1],
        9: [0.1, 0.1, 0.1],
        10: [0.1],
    }
    det = ScriptedDetector(list(script.values()), ["a", "b", "c"], cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    changed_rows, caption_requests = [], []
    for step in range(11):
        out, (*_, eps), calls = _step(amg, state, det, step, seed=step)
        changed_rows.append([i for i in range(B) if not torch.equal(out[i], eps[i])])
        caption_requests.append([rows for rows, _ in calls])
    # G_dup's ε(x_t, y_N) is asked for at the sample's batch position, also when it is detected alone.
    assert caption_requests[3] == [[1]] and caption_requests[4] == [[1]]
    assert [s.step for s in state.trace.steps] == list(script)
    assert changed_rows == [[], [], [], [1], [1], [], [], [], [], [], []]
    by_step = {s.step: s for s in state.trace.steps}
    assert by_step[4].sigma == [None, 0.5, None] and by_step[4].neighbour[0] == -1
    assert by_step[7].sigma == [None, 0.1, None] and by_step[4].sim == [False, True, False]
    assert state.trace.any_fired() == [False, True, False]
    assert state.trace.detections == len(script) and state.trace.images_detected == 3 * 4 + 5  # rows scored
    with pytest.raises(ValueError, match="detect_every"):
        AMGConfig(detect_every=0)


def test_dup_min_count_filters_y_n():
    cfg = AMGConfig.preset("paper", "sscd", threshold="constant", lambda_start=LAMBDA, dup_min_count=6)
    det = ScriptedDetector([[0.45, 0.45, 0.45]], ["five copies", "five copies", None], cfg)  # count 5 < 6
    amg = AntiMemorizationGuidance(det, cfg)
    state = amg.begin(B, 1000)
    _, _, calls = _step(amg, state, det, 0, seed=4)
    assert calls == [] and state.trace.steps[0].dup == [False] * 3


def test_in_memory_index_keeps_or_folds_repeated_rows_and_counts_their_copies():
    from pipeline.amg import InMemoryNeighbourIndex, NormalizedL2Backend

    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = torch.cat([images[:1], images[:1], images[1:]])  # row 0 twice, with the same caption
    captions = ["a", "a", "b", "c"]
    backend = NormalizedL2Backend(image_size=8)
    folded = InMemoryNeighbourIndex.from_images(backend, rows, captions)
    kept = InMemoryNeighbourIndex.from_images(backend, rows, captions, dedupe=False)
    assert len(folded) == 3 and len(kept) == 4
    assert [folded.row(i)["copies"] for i in range(3)] == [2, 1, 1]
    assert [kept.row(i)["copies"] for i in range(4)] == [2, 2, 1, 1]
    assert folded.duplicate_caption(0).count == kept.duplicate_caption(1).count == 2


class RecordingDetector(ScriptedDetector):
    """A :class:`ScriptedDetector` that keeps the images each detection was asked about."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def detect(self, images):
        self.seen.append(images.clone())
        return super().detect(images)


@pytest.mark.parametrize("detect_from", ["guided", "conditional"])
def test_detect_from_picks_the_x0_sigma_is_measured_on_and_the_terms_still_add_to_the_guided_eps(detect_from):
    from pipeline.amg.terms import predict_x0

    cfg = AMGConfig.preset(
        "paper", "sscd", c3=2.0, threshold="constant", lambda_start=LAMBDA, detect_from=detect_from
    )
    det = RecordingDetector([[0.2, 0.45, 0.8]], [None] * B, cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    out, (x_t, eps_u, eps_c, _, eps), _ = _step(amg, amg.begin(B, 1000), det, 0, seed=3)

    source = eps_c if detect_from == "conditional" else eps
    torch.testing.assert_close(det.seen[0], predict_x0(x_t, source, ALPHA_BAR), rtol=0, atol=0)
    expected = eps.clone()  # G_spe and G_sim are added to ε̂ whichever x̂0 was measured
    for i in (1, 2):
        expected[i] += -min(13 * [0.2, 0.45, 0.8][i], S0 - 1) * (eps_c[i] - eps_u[i])
        expected[i] += 2.0 * math.sqrt(1 - 0.64) * det.w[i] / math.sqrt(0.64)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_detect_from_conditional_without_cfg_measures_the_only_eps_there_is():
    from pipeline.amg.terms import predict_x0

    cfg = AMGConfig.preset(
        "paper", "sscd", threshold="constant", lambda_start=LAMBDA, detect_from="conditional"
    )
    det = RecordingDetector([[0.1, 0.1, 0.1]], [None] * B, cfg)
    amg = AntiMemorizationGuidance(det, cfg)
    x_t, _, _, _, eps = _inputs(4)
    out = amg.guide(
        amg.begin(B, 1000), step=0, t=500, x_t=x_t, alpha_bar=ALPHA_BAR, eps=eps, to_pixels=lambda z: z
    )
    assert out is eps
    torch.testing.assert_close(det.seen[0], predict_x0(x_t, eps, ALPHA_BAR), rtol=0, atol=0)
    with pytest.raises(ValueError, match="detect_from"):
        AMGConfig(detect_from="uncond")
