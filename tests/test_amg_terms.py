"""AMG equations, scales, schedules and presets on fixed tensors, against plain transcriptions."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from pipeline.amg import terms
from pipeline.amg.config import AMGConfig

SIGMAS = [-0.3, 0.0, 0.05, 0.2, 0.3, 0.45, 0.5, 0.9]
EPS_SHAPE = (len(SIGMAS), 4, 3, 3)


def _eps(seed: int, shape=EPS_SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_predict_x0_is_eq_12():
    x_t, eps = _eps(0), _eps(1)
    ab = 0.37
    expected = (x_t.numpy() - math.sqrt(1 - ab) * eps.numpy()) / math.sqrt(ab)
    np.testing.assert_allclose(
        terms.predict_x0(x_t, eps, torch.tensor(ab, dtype=torch.float64)), expected, rtol=1e-12
    )


@pytest.mark.parametrize("s0", [7.5, 3.0])
def test_s1_is_eq_13(s0):
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    expected = [max(min(13.0 * s, s0 - 1), 0.0) for s in SIGMAS]
    np.testing.assert_allclose(terms.despecification_scale(sigma, 13.0, s0), expected, rtol=1e-12)


def test_s2_is_eq_15_with_constant_and_reference_c2():
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    s0 = 7.5
    s1 = terms.despecification_scale(sigma, 13.0, s0)
    # Paper form, constant c2.
    expected = [max(min(4.0 * s, s0 - a - 1), 0.0) for s, a in zip(SIGMAS, s1.tolist(), strict=False)]
    np.testing.assert_allclose(terms.caption_dedup_scale(sigma, 4.0, s0, s1), expected, rtol=1e-12)
    # Released code: s2 = max(min(6.5 − s1, (6.5 − s1)/0.3·σ), 0).
    c2 = terms.reference_c2(s0, s1, 0.3)
    expected = [
        max(min(6.5 - a, (6.5 - a) / 0.3 * s), 0.0) for s, a in zip(SIGMAS, s1.tolist(), strict=False)
    ]
    np.testing.assert_allclose(terms.caption_dedup_scale(sigma, c2, s0, s1), expected, rtol=1e-12)
    # The two scales never exceed the CFG budget s0 − 1.
    assert bool(((s1 + terms.caption_dedup_scale(sigma, c2, s0, s1)) <= s0 - 1 + 1e-12).all())


def test_g_spe_and_g_dup_are_eqs_14_and_16():
    eps_c, eps_u, eps_n = _eps(2), _eps(3), _eps(4)
    s = torch.tensor([0.0, 1.0, 2.5, 6.5, 0.3, 0.0, 4.0, 1.5], dtype=torch.float64)
    g_spe = terms.despecification_guidance(eps_c, eps_u, s)
    g_dup = terms.caption_dedup_guidance(eps_n, eps_u, s)
    for i, si in enumerate(s.tolist()):
        np.testing.assert_allclose(g_spe[i], -si * (eps_c[i].numpy() - eps_u[i].numpy()), rtol=1e-12)
        np.testing.assert_allclose(g_dup[i], -si * (eps_n[i].numpy() - eps_u[i].numpy()), rtol=1e-12)


def test_g_sim_is_eq_17():
    grad = _eps(5)
    c3 = torch.tensor([100.0, 0.0, 3.0, 1e3, 7.0, 1.0, 2.0, 50.0], dtype=torch.float64)
    ab = 0.81
    g = terms.dissimilarity_guidance(grad, torch.tensor(ab, dtype=torch.float64), c3)
    for i, ci in enumerate(c3.tolist()):
        np.testing.assert_allclose(g[i], ci * math.sqrt(1 - ab) * grad[i].numpy(), rtol=1e-12)


def test_c3_paper_is_constant_and_reference_is_the_released_formula():
    sigma = torch.tensor([0.31, 0.4, 0.5, 0.9], dtype=torch.float64)
    paper = AMGConfig.preset("paper", "sscd")
    np.testing.assert_allclose(terms.dissimilarity_scale(sigma, 500, 0.3, paper), [paper.c3] * 4)
    ref = AMGConfig.preset("reference", "sscd")
    for t in (981, 501, 1):
        expected = [100 * (s - 0.3) * math.exp((1000 - t) / 170) for s in sigma.tolist()]
        np.testing.assert_allclose(terms.dissimilarity_scale(sigma, t, 0.3, ref), expected, rtol=1e-12)
    # Below the offset the scale is zero, never negative (no attraction).
    assert float(terms.dissimilarity_scale(torch.tensor([0.1]), 500, 0.3, ref)) == 0.0


def test_c3_margin_scales_g_sim_by_how_far_inside_the_gate_a_sample_is():
    sigma = torch.tensor([-0.2, -0.13, -0.1, 0.0], dtype=torch.float64)
    lam = -0.13
    l2 = AMGConfig.preset("paper", "l2")
    expected = [l2.c3 * l2.c3_margin * max(s - lam, 0.0) for s in sigma.tolist()]
    np.testing.assert_allclose(terms.dissimilarity_scale(sigma, 500, lam, l2), expected, rtol=1e-12)
    # Zero at and below the gate (no attraction); at a margin of 0.1 the preset's c3 × 0.1 × c3_margin.
    assert terms.dissimilarity_scale(sigma, 500, lam, l2)[:2].tolist() == [0.0, 0.0]
    assert float(terms.dissimilarity_scale(torch.tensor([-0.03]), 500, lam, l2)) == pytest.approx(l2.c3)
    # The released pixel code's scale: classifier_scale 1000 × 80 × (thres − mL2), σ = −mL2.
    released = AMGConfig.preset("released_pixel", "nl2")
    scale = terms.dissimilarity_scale(torch.tensor([-1.2]), 500, -1.5, released)
    assert float(scale) == pytest.approx(1000 * 80 * (1.5 - 1.2))
    with pytest.raises(ValueError, match="c3_margin"):
        AMGConfig.preset("paper", "l2", c3_margin=0.0)


def test_reference_threshold_schedules():
    sscd = AMGConfig.preset("reference", "sscd")
    # Values from the released SD code's curve, 0.3 + 0.1·e^(−0.005t), listed in the research notes.
    for t, value in [(981, 0.3007), (501, 0.308), (201, 0.337), (101, 0.360), (1, 0.3995)]:
        assert terms.threshold(t, 1000, sscd) == pytest.approx(value, abs=6e-4)
        assert terms.threshold(t, 1000, sscd) == pytest.approx(0.3 + 0.1 * math.exp(-0.005 * t), rel=1e-12)
    nl2 = AMGConfig.preset("reference", "nl2")
    # iDDPM code: mL2 < 1.95 − 0.45·e^(−0.025·i) over 250 respaced steps; σ = −nL2, t = 4·i.
    for i in (0, 20, 50, 100, 249):
        expected = -(1.95 - 0.45 * math.exp(-0.025 * i))
        assert terms.threshold(4 * i, 1000, nl2) == pytest.approx(expected, rel=1e-12)


def test_paper_threshold_is_a_parabola_between_the_reference_endpoints():
    paper = AMGConfig.preset("paper", "sscd")
    T = 1000
    values = [terms.threshold(t, T, paper) for t in range(0, T + 1, 50)]
    assert terms.threshold(T, T, paper) == pytest.approx(0.3)
    assert terms.threshold(0, T, paper) == pytest.approx(0.4)
    assert terms.threshold(500, T, paper) == pytest.approx(0.3 + 0.1 * 0.25)
    # Second differences of a parabola sampled on a uniform grid are constant.
    second = np.diff(values, 2)
    np.testing.assert_allclose(second, second[0], rtol=1e-9)
    assert all(a >= b for a, b in itertools.pairwise(values))  # rises as t -> 0
    const = AMGConfig.preset("paper", "sscd", threshold="constant", lambda_start=0.42)
    assert terms.threshold(123, T, const) == 0.42


def test_reference_preset_has_the_released_constants():
    cfg = AMGConfig.preset("reference", "sscd")
    assert (cfg.gate, cfg.c1, cfg.c2_saturation, cfg.c3, cfg.c3_sigma_offset, cfg.c3_time_scale) == (
        "per_term",
        13.0,
        0.3,
        100.0,
        0.3,
        170.0,
    )
    assert (cfg.lambda_a, cfg.lambda_b, cfg.lambda_rate, cfg.dup_hold_steps) == (0.3, 0.1, 0.005, 10)
    assert cfg.s0 is None and cfg.memorized_threshold == 0.5 and cfg.recheck_sigma
    nl2 = AMGConfig.preset("reference", "nl2")
    assert (nl2.nl2_k, nl2.nl2_alpha, nl2.memorized_threshold) == (50, 0.5, -1.4)
    paper = AMGConfig.preset("paper", "clip", c3=5.0)
    assert (paper.gate, paper.threshold, paper.backend, paper.c3) == ("shared", "parabolic", "clip", 5.0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        AMGConfig(mode="strong")
    with pytest.raises(ValueError, match="backend"):
        AMGConfig.preset("paper", "dino")
    with pytest.raises(ValueError, match="unknown AMGConfig field"):
        AMGConfig.preset("paper", "sscd", c4=1.0)
    with pytest.raises(ValueError, match="s0"):
        AMGConfig(s0=0.5)
    with pytest.raises(ValueError, match="threshold"):
        AMGConfig(threshold="cubic")


# ----------------------------------------------------------------------------- calibrated λ_t
TABLE = {"lambda_timesteps": (100, 300, 700), "lambda_values": (-2.0, -1.0, -1.5)}


def test_calibrated_threshold_interpolates_linearly_and_holds_the_ends():
    cfg = AMGConfig.preset("paper", "nl2", threshold="calibrated", **TABLE)
    expected = {0: -2.0, 100: -2.0, 200: -1.5, 300: -1.0, 500: -1.25, 600: -1.375, 700: -1.5, 999: -1.5}
    for t, value in expected.items():
        assert terms.threshold(t, 1000, cfg) == pytest.approx(value, rel=1e-12)
    # Lists (YAML, JSON) are accepted and kept as tuples; the config stays JSON-serialisable.
    listed = AMGConfig.preset(
        "paper", "nl2", threshold="calibrated", lambda_timesteps=[100, 300, 700], lambda_values=[-2, -1, -1.5]
    )
    assert listed == cfg and isinstance(listed.lambda_values, tuple)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert AMGConfig(**data) == cfg


def test_calibrate_threshold_is_the_per_step_percentile_smoothed():
    rng = np.random.default_rng(0)
    means = {999: -2.0, 666: -1.8, 333: -1.6, 0: -1.0}
    timesteps = list(means)  # decreasing, as a sampler visits them
    sigmas = [rng.normal(means[t], 1.0, size=20_000) for t in timesteps]
    table_t, raw = terms.calibrate_threshold(timesteps, sigmas, percentile=99.0, smooth=1)
    assert table_t == (0, 333, 666, 999)
    for t, value in zip(table_t, raw, strict=True):
        assert value == pytest.approx(np.percentile(sigmas[timesteps.index(t)], 99.0), rel=1e-12)
        assert value == pytest.approx(means[t] + 2.326, abs=0.06)  # the normal's 99th percentile
    # A centred window of 3, shrinking symmetrically: the ends stay, the inner entries are averaged.
    _, smoothed = terms.calibrate_threshold(timesteps, sigmas, percentile=99.0, smooth=3)
    assert smoothed[0] == raw[0] and smoothed[-1] == raw[-1]
    assert smoothed[1] == pytest.approx(np.mean(raw[0:3])) and smoothed[2] == pytest.approx(np.mean(raw[1:4]))
    # A straight line goes through the smoothing unchanged.
    _, line = terms.calibrate_threshold([0, 1, 2, 3, 4, 5], [[2.0 * i] for i in range(6)], 100.0, smooth=5)
    np.testing.assert_allclose(line, [0, 2, 4, 6, 8, 10])
    # Equal timesteps are merged, NaN and None dropped; percentile 100 is the largest σ seen.
    table_t, top = terms.calibrate_threshold([5, 5, 9], [[0.1, np.nan], [0.3, None], [0.2]], 100.0, smooth=1)
    assert table_t == (5, 9) and top == (0.3, 0.2)


def test_threshold_table_round_trips_through_json(tmp_path):
    from pipeline.amg import load_threshold, save_threshold

    path = save_threshold(
        tmp_path / "amg_threshold.json", [100, 300, 700], [-2.0, -1.0, -1.5], percentile=99.0, backend="nl2"
    )
    assert load_threshold(path) == TABLE
    with_meta = load_threshold(path, with_metadata=True)
    assert with_meta["metadata"] == {"percentile": 99.0, "backend": "nl2"}
    cfg = AMGConfig.preset("paper", "nl2", threshold="calibrated", **load_threshold(path))
    assert terms.threshold(500, 1000, cfg) == pytest.approx(-1.25)
    assert json.loads(path.read_text())["format"] == "amg_threshold_table"


def test_threshold_table_validation(tmp_path):
    from pipeline.amg import load_threshold, save_threshold

    with pytest.raises(ValueError, match="both lambda_timesteps and lambda_values"):
        AMGConfig.preset("paper", "nl2", threshold="calibrated")
    bad = [
        (([1, 2], [0.1]), "2 timesteps but 1 values"),
        (([], []), "empty"),
        (([2, 1], [0.1, 0.2]), "strictly increasing"),
        (([1, 1], [0.1, 0.2]), "strictly increasing"),
        (([1, 2], [0.1, float("nan")]), "finite"),
        (([1.5, 2], [0.1, 0.2]), "whole numbers"),
        ((["a", 2], [0.1, 0.2]), "integers"),
    ]
    for (ts, vs), message in bad:
        with pytest.raises(ValueError, match=message):
            AMGConfig.preset("paper", "nl2", threshold="calibrated", lambda_timesteps=ts, lambda_values=vs)
        with pytest.raises(ValueError, match=message):
            save_threshold(tmp_path / "t.json", ts, vs)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"lambda_timesteps": [1], "lambda_values": [0.1]}))
    with pytest.raises(ValueError, match="not an AMG λ_t table"):
        load_threshold(other)
    other.write_text(
        json.dumps(
            {"format": "amg_threshold_table", "version": 99, "lambda_timesteps": [1], "lambda_values": [0.1]}
        )
    )
    with pytest.raises(ValueError, match="version 99"):
        load_threshold(other)
    other.write_text(
        json.dumps(
            {
                "format": "amg_threshold_table",
                "version": 1,
                "lambda_timesteps": [2, 1],
                "lambda_values": [0.1, 0.2],
            }
        )
    )
    with pytest.raises(ValueError, match="strictly increasing"):
        load_threshold(other)
    other.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_threshold(other)
    for args, message in [
        (([1, 2], [[0.1]]), "2 timesteps but 1 groups"),
        (([], []), "no σ values"),
        (([1], [[0.1]], 101.0), "percentile"),
        (([1], [[0.1]], 99.0, 0), "smooth"),
        (([1, 2], [[0.1], [np.nan]]), r"no finite σ value at timestep\(s\) \[2\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            terms.calibrate_threshold(*args)


def test_l2_has_a_paper_preset_only_and_its_scales_act_on_sigma_plus_one():
    cfg = AMGConfig.preset("paper", "l2")
    assert cfg.gate == "shared" and cfg.scale_sigma_offset == -1.0
    # σ = −0.05 (a near copy): s1 = clip(13·(σ + 1), 0, s0 − 1) saturates, as with a cosine near 1
    s1 = terms.despecification_scale(torch.tensor([-0.05]) - cfg.scale_sigma_offset, cfg.c1, 7.5)
    assert s1.item() == pytest.approx(6.5)
    for mode in ("reference", "released_pixel"):
        with pytest.raises(ValueError, match="no preset for backend 'l2'"):
            AMGConfig.preset(mode, "l2")
