"""The memorizing evaluation's metrics: KID/FID with intervals, copy criteria, the metric classifier."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from demo.memorizing import metrics
from demo.memorizing.classifier import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    features,
    load_classifier,
    load_or_train,
    predict,
    save_classifier,
    train_classifier,
)
from demo.memorizing.fashion_mnist import available
from demo.memorizing.metrics import (
    accuracy_interval,
    bootstrap_interval,
    calibrate_copy_threshold,
    fid,
    frechet_distance,
    kid,
    nearest_rms,
    own_copy,
    real_floor,
    to_signed_tensor,
)

needs_data = pytest.mark.skipif(
    not available(), reason="Debian's dataset-fashion-mnist is not installed (make venv installs it as root)"
)

FAST_KID = functools.partial(kid, n_subsets=5)


def _relu_gaussian(rng: np.random.Generator, n: int, shift: float = 0.0, d: int = 64) -> np.ndarray:
    """ReLU'd Gaussian features, shaped like the classifier's penultimate activations."""
    return np.maximum(rng.normal(size=(n, d)) + shift, 0.0)


def test_kid_of_one_distribution_is_near_zero_and_its_interval_covers_zero():
    rng = np.random.default_rng(0)
    a, b = _relu_gaussian(rng, 300), _relu_gaussian(rng, 1200)
    point, low, high = bootstrap_interval(FAST_KID, a, b, n_boot=60, seed=0)
    assert abs(point) < 0.003 and low <= 0.0 <= high and low <= point <= high
    floor, floor_low, floor_high = real_floor(FAST_KID, b, size=300, n_boot=40)
    assert abs(floor) < 0.003 and floor_low <= 0.0 <= floor_high


def test_kid_bootstrap_leaves_out_a_row_paired_with_its_own_copy():
    # A resample repeats rows; counting a row against its copy inflates a U-statistic by about
    # (k(x,x) - k(x,y))/n, several times the statistic's own spread.
    rng = np.random.default_rng(1)
    a, b = _relu_gaussian(rng, 300), _relu_gaussian(rng, 1200)
    with_rows: list[float] = []
    naive: list[float] = []

    def kid_with_rows(x: np.ndarray, y: np.ndarray, rows_a=None, rows_b=None) -> float:
        with_rows.append(kid(x, y, n_subsets=5, rows_a=rows_a, rows_b=rows_b))
        return with_rows[-1]

    def naive_kid(x: np.ndarray, y: np.ndarray) -> float:
        naive.append(kid(x, y, n_subsets=5))
        return naive[-1]

    point, low, high = bootstrap_interval(kid_with_rows, a, b, n_boot=40, seed=0)
    bootstrap_interval(naive_kid, a, b, n_boot=40, seed=0)
    spread = np.std(with_rows[1:])
    assert abs(np.mean(with_rows[1:]) - point) < spread and low <= point <= high
    assert np.mean(naive[1:]) - point > 2 * spread


def test_fid_interval_is_centred_on_its_estimate_though_repeated_rows_raise_every_draw():
    rng = np.random.default_rng(10)
    a, b = _relu_gaussian(rng, 200), _relu_gaussian(rng, 800)
    seen: list[float] = []

    def recorded_fid(x: np.ndarray, y: np.ndarray) -> float:
        seen.append(fid(x, y))
        return seen[-1]

    point, low, high = bootstrap_interval(recorded_fid, a, b, n_boot=40, seed=0)
    assert min(seen[1:]) > point  # ~63% distinct rows: a narrower sample, a larger FID
    assert low < point < high


def test_kid_of_shifted_distributions_is_clearly_positive():
    rng = np.random.default_rng(2)
    a, b = _relu_gaussian(rng, 300, shift=0.3), _relu_gaussian(rng, 1200)
    point, low, _ = bootstrap_interval(FAST_KID, a, b, n_boot=40, seed=0)
    assert low > 0.05 and point > 10 * abs(kid(_relu_gaussian(rng, 300), b, n_subsets=5))
    assert fid(a, b) > fid(_relu_gaussian(rng, 300), b) + 1.0  # FID's small-sample bias is in both


def test_kid_and_fid_are_symmetric_and_deterministic_with_the_seed():
    rng = np.random.default_rng(3)
    a, b = _relu_gaussian(rng, 200, shift=0.2), _relu_gaussian(rng, 200)
    assert kid(a, b, n_subsets=10, seed=4) == kid(a, b, n_subsets=10, seed=4)
    # equal sizes and subsets of the whole set: the same pairs whichever set comes first
    assert kid(a, b, n_subsets=3) == pytest.approx(kid(b, a, n_subsets=3), rel=1e-9)
    assert kid(a, b[:150], subset_size=100, seed=1) != kid(a, b[:150], subset_size=100, seed=2)
    assert kid(a, b[:150], subset_size=100) == pytest.approx(kid(b[:150], a, subset_size=100), rel=0.2)
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-6)
    assert bootstrap_interval(fid, a, b, n_boot=20, seed=5) == bootstrap_interval(
        fid, a, b, n_boot=20, seed=5
    )


def test_fid_matches_the_closed_form_of_gaussians():
    # Diagonal: sum over dimensions of (m1 - m2)^2 + (s1 - s2)^2.
    m1, m2, v1, v2 = (
        np.array([0.0, 1.0, -2.0]),
        np.array([1.0, 1.0, 0.5]),
        np.array([1.0, 4.0, 0.25]),
        np.ones(3),
    )
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, abs=1e-9)
    # Commuting full covariances Q D Q^T: the same sum in Q's eigenbasis.
    q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(3, 3)))
    s1, s2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    assert frechet_distance(m1, s1, m1, s2) == pytest.approx(((np.sqrt(v1) - 1) ** 2).sum(), abs=1e-9)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)
    # fid() fits mean and variance (ddof 1): standardised 1-d samples have exactly the chosen ones.
    z = np.random.default_rng(7).normal(size=50)
    z = (z - z.mean()) / z.std(ddof=1)
    a, b = (3.0 + 2.0 * z)[:, None], (1.0 + 0.5 * z[::-1])[:, None]
    # rank-1 covariances (singular, as dead ReLU units make them): twice the 1-d distance
    assert fid(np.hstack([a, a]), np.hstack([b, b])) == pytest.approx(2 * (2.0**2 + 1.5**2), rel=1e-6)
    assert fid(a, b) == pytest.approx((3.0 - 1.0) ** 2 + (2.0 - 0.5) ** 2, rel=1e-9)


def _brute(images: np.ndarray, train: np.ndarray, k: int, alpha: float = 0.5):
    """All RMS distances in [0, 1] units, by broadcasting; nL2 straight from Carlini's definition."""
    q = images.reshape(len(images), -1).astype(np.float64) / 255
    t = train.reshape(len(train), -1).astype(np.float64) / 255
    d = np.sqrt(((q[:, None] - t[None]) ** 2).mean(-1))
    order = np.argsort(d, axis=1)
    nearest = np.take_along_axis(d, order, axis=1)
    return nearest[:, 0], order[:, 0], nearest[:, 0] / (alpha * nearest[:, :k].mean(1))


def test_nearest_rms_and_nl2_match_brute_force():
    rng = np.random.default_rng(8)
    train = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)
    images = rng.integers(0, 256, size=(11, 6, 6, 3), dtype=np.uint8)
    images[3] = train[17]  # an exact copy
    rms, index, values = _brute(images, train, k=5)
    got_rms, got_index = nearest_rms(images, train)
    np.testing.assert_allclose(got_rms, rms, atol=1e-6)
    np.testing.assert_array_equal(got_index, index)
    one_rms, got_nearest, got_nl2 = metrics.nearest_and_nl2(images, train, k=5)
    np.testing.assert_allclose(got_nl2, values, rtol=1e-6, atol=1e-4)  # the backend's 1e-12 under √
    np.testing.assert_array_equal(got_nearest, index)
    np.testing.assert_array_equal(one_rms, got_rms)  # nearest_rms's, from the same scan
    assert got_index[3] == 17 and got_rms[3] < 1e-5 and got_nl2[3] < 1e-4
    # small chunks cross every boundary and give the same neighbours
    chunked = metrics._neighbours(images, train, k=5, query_chunk=3, train_chunk=7)
    np.testing.assert_allclose(chunked[2], values, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(chunked[1][:, 0], index)
    # the generators' float (B, 3, H, W) in [-1, 1] is the same picture as the data's uint8 (n, H, W, 3)
    np.testing.assert_allclose(nearest_rms(to_signed_tensor(images), train)[0], rms, atol=1e-6)
    with pytest.raises(ValueError, match="differ in size"):
        nearest_rms(rng.integers(0, 256, size=(2, 5, 5, 3), dtype=np.uint8), train)


def test_own_copy_needs_the_planted_neighbour_within_the_distance():
    nearest_index = np.array([5, 5, 3, 3])
    rms = np.array([0.01, 0.2, 0.01, 0.2])
    assert own_copy(nearest_index, rms, 5, max_rms=0.1).tolist() == [True, False, False, False]
    assert own_copy(nearest_index, rms, np.array([5, 5, 3, 5]), max_rms=0.2).tolist() == [True] * 3 + [False]
    assert own_copy(nearest_index, np.full(4, 0.1), 5, max_rms=0.1).tolist() == [True, True, False, False]


def test_calibration_reports_how_often_real_pictures_pass_for_copies():
    rng = np.random.default_rng(9)
    train = rng.integers(0, 256, size=(30, 6, 6, 3), dtype=np.uint8)
    held_out = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
    report = calibrate_copy_threshold(held_out, train, k=10, nl2_thresholds=(1.4, 2.0), rms_thresholds=(0.3,))
    rms, _, values = metrics.nearest_and_nl2(held_out, train, k=10)
    assert report["fraction_nl2_below"] == {"1.4": (values < 1.4).mean(), "2": (values < 2.0).mean()}
    assert report["fraction_rms_below"] == {"0.3": (rms < 0.3).mean()}
    assert report["nl2"]["p50"] == pytest.approx(np.median(values))
    assert report["nearest_rms"]["p1"] <= report["nearest_rms"]["p50"] <= report["nearest_rms"]["p99"]
    assert (report["n_held_out"], report["n_train"], report["k"]) == (20, 30, 10)


def test_accuracy_interval_is_wilsons():
    accuracy, low, high = accuracy_interval(np.array([True] * 8 + [False] * 2))
    assert (
        accuracy == 0.8 and low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    )
    accuracy, low, high = accuracy_interval(np.ones(50, dtype=bool))
    assert accuracy == 1.0 and high == 1.0 and 0.9 < low < 1.0
    with pytest.raises(ValueError):
        accuracy_interval(np.array([], dtype=bool))


def _toy_pictures(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by where a bright bar lies, on noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    images = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 4 + 9 * label : 10 + 9 * label, 6:26] = 230
    return images, labels


@pytest.mark.usefixtures("one_torch_thread")  # bit-identical weights need one thread's summation order
def test_classifier_training_is_deterministic_and_round_trips(tmp_path):
    images, labels = _toy_pictures(256)
    state = torch.random.get_rng_state()
    model, report = train_classifier(images, labels, epochs=2, batch_size=32, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    again, _ = train_classifier(images, labels, epochs=2, batch_size=32, seed=0)
    other, _ = train_classifier(images, labels, epochs=2, batch_size=32, seed=1)
    first = model.state_dict()
    assert all(torch.equal(first[name], t) for name, t in again.state_dict().items())
    assert not all(torch.equal(first[name], t) for name, t in other.state_dict().items())
    assert report["epochs"] == 2 and report["n_train"] == 256 and len(report["epoch_losses"]) == 2

    test_images, test_labels = _toy_pictures(64, seed=1)
    labels_out = predict(model, test_images)
    assert (labels_out == test_labels).mean() > 0.9
    np.testing.assert_array_equal(predict(model, to_signed_tensor(test_images)), labels_out)
    feats = features(model, test_images, batch_size=10)
    assert feats.shape == (64, 128) and feats.dtype == np.float64

    save_classifier(model, tmp_path / "clf", report)
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = load_or_train(tmp_path / "clf")  # present: loaded, not retrained
    np.testing.assert_array_equal(predict(loaded, test_images), labels_out)
    np.testing.assert_allclose(features(loaded, test_images), feats, rtol=1e-6, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no classifier"):
        load_classifier(tmp_path / "missing")


@needs_data
def test_classifier_learns_real_fashion_mnist_from_a_small_subset(tmp_path):
    from demo.memorizing.fashion_set import load_fashion_data

    data = load_fashion_data()
    model, _ = train_classifier(data.classifier[:3000], data.classifier_labels[:3000], epochs=1, seed=0)
    predicted = predict(model, data.held_out[:2000])
    _, low, _ = accuracy_interval(predicted == data.held_out_labels[:2000])
    assert low > 0.6  # chance is 10%; the full split and two epochs reach about 91%
    save_classifier(model, tmp_path)
    np.testing.assert_array_equal(predict(load_classifier(tmp_path), data.held_out[:2000]), predicted)


def test_calibrated_threshold_is_the_per_step_maximum_of_plain_trajectories_and_loads_as_a_config():
    from types import SimpleNamespace

    from demo.memorizing.evaluation import calibrate_threshold, calibrated_config

    def trace(sigmas):  # one pipeline call: per step, σ of each sample
        steps = [
            SimpleNamespace(timestep=t, sigma=list(s)) for t, s in zip((901, 501, 1), sigmas, strict=True)
        ]
        return SimpleNamespace(steps=steps)

    traces = [trace([[0.1, 0.2], [0.5, 0.4], [0.7, 0.9]]), trace([[0.3, 0.0], [0.2, 0.6], [0.8, 0.1]])]
    table = calibrate_threshold(traces, percentile=100.0)
    assert table["lambda_timesteps"] == [1, 501, 901]
    # smoothing may blend neighbours, but never beyond the range of the per-step maxima (0.3 .. 0.9)
    assert all(0.3 <= v <= 0.9 for v in table["lambda_values"])
    config = calibrated_config({"m": table}, "m", "paper", "sscd")
    assert config.threshold == "calibrated" and list(config.lambda_values) == table["lambda_values"]
    assert calibrated_config({"m": table}, "m", "paper", "sscd", calibrated=False).threshold == "parabolic"


def test_calibrated_config_reads_the_table_of_its_similarity_and_x0():
    from demo.memorizing.evaluation import calibrated_config

    tables = {
        "text2img": {"lambda_timesteps": [1, 999], "lambda_values": [0.9, 0.8]},
        "text2img_l2_conditional": {"lambda_timesteps": [1, 999], "lambda_values": [-0.15, -0.1]},
    }
    l2 = calibrated_config(tables, "text2img", "paper", "l2", detect_from="conditional")
    assert l2.lambda_values == (-0.15, -0.1) and l2.backend == "l2" and l2.detect_from == "conditional"
    assert calibrated_config(tables, "text2img", "paper", "sscd").lambda_values == (0.9, 0.8)


def test_thresholds_are_recalibrated_when_the_seeds_they_were_fitted_on_change(tmp_path):
    """A λ_t table carries the calibration seeds it was fitted on: tables whose seeds match the settings
    are read as they are (no model is loaded), one fitted on other seeds is calibrated again."""
    import dataclasses
    import json
    from types import SimpleNamespace

    from demo.memorizing.evaluation import EvalSettings, ensure_thresholds
    from demo.memorizing.layout import THRESHOLD_TABLES, THRESHOLDS

    settings = EvalSettings()
    first = settings.calibration_seed_offset
    last = {"pixel": first + settings.pixel_calibration_samples - 1}
    tables = {
        name: {"lambda_values": [0.5], "calibration": {"seeds": [first, last.get(model, first + 19)]}}
        for name, (model, _, _) in THRESHOLD_TABLES.items()
    }
    assert settings.calibration_samples == 20
    (tmp_path / THRESHOLDS).write_text(json.dumps(tables))
    cfg = SimpleNamespace(model_dir=tmp_path)  # no models here: calibrating would fail to load them
    assert ensure_thresholds(cfg, None, settings) == tables
    more = dataclasses.replace(settings, pixel_calibration_samples=settings.pixel_calibration_samples + 1)
    assert ensure_thresholds(cfg, None, more, names=("text2img",)) == tables
    with pytest.raises(FileNotFoundError, match="memorizing models"):
        ensure_thresholds(cfg, None, more)


def test_judge_counts_own_copies_class_accuracy_and_bit_identity_against_the_committed_training_set():
    from demo.memorizing.classifier import DEFAULT_FOLDER
    from demo.memorizing.evaluation import Judge
    from demo.memorizing.training import TrainingSet

    set_file = DEFAULT_FOLDER.parent / "amg-memorizing" / "training_set.npz"
    if not (DEFAULT_FOLDER / WEIGHTS_FILE).is_file() or not set_file.is_file():
        pytest.skip("the committed classifier or memorizing training set is not in this checkout")
    train = TrainingSet.load(set_file)
    first, second = train.planted()[:2]
    generic = train.kinds.index("generic")
    images = train.tensor()[[first, second, generic]]
    judge = Judge(load_classifier(DEFAULT_FOLDER), np.zeros((1, 1)), train, 0.118, bootstrap=10, seed=0)
    # sample 1 is a picture of the training set, but not the planted one of its prompt
    planted_of = np.array([first, first, -1])
    classes = train.labels[[first, second, generic]]
    changed = images.clone()
    changed[2] = -changed[2]
    row, detail = judge.score(images, classes, planted_of, changed)
    assert detail["own"].tolist() == [True, False, False] and row["own_copy"] == 0.5
    assert detail["nearest"].tolist() == [first, second, generic] and (detail["rms"] < 1e-5).all()
    assert row["bit_identical"] == pytest.approx(2 / 3) and row["n"] == 3 and "kid" not in row
    assert row["accuracy"][0] == detail["correct"].mean()
    # A group of the scored samples is summarized from the detail as it would be scored alone.
    group = np.array([True, True, False])
    alone, _ = judge.score(images[group], classes[group], planted_of[group], changed[group])
    assert judge.summarize({key: values[group] for key, values in detail.items()}) == alone
