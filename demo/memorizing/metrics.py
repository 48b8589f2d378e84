"""Metrics for the memorizing evaluation that do not grade the generator by itself.

* **Fidelity:** KID (primary: unbiased at any sample size) and FID, on the metric classifier's features
  (:mod:`demo.memorizing.classifier`) of generations against held-out real pictures. Each comes with a
  bootstrap interval and the real-versus-real floor, the value two samples of real pictures get, so a
  difference can be read against noise.
* **Copies:** the nearest training picture by RMS pixel distance, Carlini et al.'s normalised L2 (the
  definition of :class:`pipeline.amg.backends.NormalizedL2Backend`, reused), and the **own copy**
  criterion: the nearest training picture is the planted one, and closer than the autoencoder can
  reproduce it. :func:`calibrate_copy_threshold` measures how often each criterion flags real pictures
  that copy nothing (on Fashion-MNIST, nL2 < 1.4 flags about a quarter of them).
* **Alignment:** classifier accuracy with a Wilson interval.

Features are float ``(n, d)`` arrays. Images are uint8 ``(n, H, W, 3)`` (the data's layout) or float
``(n, 3, H, W)`` in [−1, 1] (the generators' output).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import numpy as np
import scipy.linalg
import torch

from pipeline.amg.backends import NormalizedL2Backend

#: A two-sample statistic of generated and reference features, e.g. :func:`kid` or :func:`fid`.
Statistic = Callable[..., float]


def to_signed_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Float ``(B, 3, H, W)`` in [−1, 1] from the data's uint8 ``(n, H, W, 3)`` or the generators' output.

    uint8 input is taken as the data's channels-last pictures; anything else must already be
    channels-first in [−1, 1].
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (n, H, W, 3), got {images.shape}")
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    tensor = torch.as_tensor(images, dtype=torch.float32)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"float images must be (B, 3, H, W) in [-1, 1], got {tuple(tensor.shape)}")
    return tensor


# --- fidelity -------------------------------------------------------------------------------------


def _as_features(features: np.ndarray) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"features must be (n >= 2, d), got {array.shape}")
    return array


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y/d + 1)³, KID's kernel."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _within_mean(x: np.ndarray, rows: np.ndarray | None) -> float:
    """Mean kernel over pairs of distinct samples: off the diagonal, and off pairs of one row's copies."""
    k = _polynomial_kernel(x, x)
    if rows is None:
        return float((k.sum() - np.trace(k)) / (len(x) * (len(x) - 1)))
    return float(k[rows[:, None] != rows[None, :]].mean())


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    rows_a: np.ndarray | None = None,
    rows_b: np.ndarray | None = None,
) -> float:
    """Kernel Inception Distance: unbiased MMD² with k(x, y) = (x·y/d + 1)³ (Bińkowski et al. 2018).

    As the reference implementations (Bińkowski's, torch-fidelity) do: averaged over ``n_subsets``
    seeded subsets of min(``subset_size``, n_a, n_b) rows drawn without replacement from each set.
    Unbiased, so it is near 0 (and can be negative) for two samples of one distribution, at any size.

    Args:
        rows_a, rows_b: the original row of each row when a set is a bootstrap resample
            (:func:`bootstrap_interval` passes them). A row and its own copy are not two draws, and
            pairing them would add about (k(x, x) − k(x, y))/n, far more than the statistic's noise;
            such pairs are left out of the within-set means.
    """
    a, b = _as_features(features_a), _as_features(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}")
    m = min(len(a), len(b), subset_size)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(n_subsets):
        ia = rng.choice(len(a), m, replace=False)
        ib = rng.choice(len(b), m, replace=False)
        x, y = a[ia], b[ib]
        total += (
            _within_mean(x, None if rows_a is None else np.asarray(rows_a)[ia])
            + _within_mean(y, None if rows_b is None else np.asarray(rows_b)[ib])
            - 2.0 * float(_polynomial_kernel(x, y).mean())
        )
    return total / n_subsets


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½): the Fréchet distance of two Gaussians.

    The matrix square root is ``scipy.linalg.sqrtm``, as in pytorch-fid; where it is not finite
    (near-singular covariances, e.g. ReLU features that never fire) both covariances get 1e-6 on the
    diagonal, pytorch-fid's remedy. Imaginary parts are rounding and are dropped.
    """
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular Σ: handled below
        covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma_a)) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean.real))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (sample mean and covariance, ddof 1).

    Biased upward at small n and the bias depends on n, so compare FIDs only at equal sample sizes
    (:func:`real_floor` takes ``size`` for that); KID has no such bias.
    """
    a, b = _as_features(features_a), _as_features(features_b)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def bootstrap_interval(
    statistic: Statistic,
    generated_features: np.ndarray,
    reference_features: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    resample_reference: bool = False,
) -> tuple[float, float, float]:
    """``(point, low, high)``: the statistic and its percentile bootstrap interval, centred on the point.

    Each draw resamples the generated rows with replacement (and the reference rows, when
    ``resample_reference``; by default the reference is held fixed, being the larger sample) and
    recomputes ``statistic(generated, reference)``.

    Repeated rows bias the draws, not only spread them: a resample holds about 63% distinct rows, which
    raises FID by more than its interval is wide (at 1,000 real rows against real: 2.7, draws 4.4–7.7).
    So the draws are shifted by their mean's offset from the point (the bootstrap's bias estimate) and
    the interval says how far the statistic moves at this sample size. A statistic that takes
    ``rows_a`` and ``rows_b`` keywords (:func:`kid`) also gets the resamples' original rows, so a
    U-statistic leaves out pairs of a row with its own copy and has no such bias to begin with.
    KID at its default 100 subsets costs about a second a draw; pass e.g.
    ``functools.partial(kid, n_subsets=10)`` for the bootstrap.
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    generated, reference = np.asarray(generated_features), np.asarray(reference_features)
    point = float(statistic(generated, reference))
    takes_rows = {"rows_a", "rows_b"} <= set(inspect.signature(statistic).parameters)
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for i in range(n_boot):
        rows_a = rng.integers(0, len(generated), len(generated))
        rows_b = rng.integers(0, len(reference), len(reference)) if resample_reference else None
        kwargs: dict[str, Any] = {"rows_a": rows_a, "rows_b": rows_b} if takes_rows else {}
        draws[i] = statistic(generated[rows_a], reference if rows_b is None else reference[rows_b], **kwargs)
    low, high = np.quantile(draws - (draws.mean() - point), [(1 - level) / 2, (1 + level) / 2])
    return point, float(low), float(high)


def real_floor(
    statistic: Statistic,
    real_features: np.ndarray,
    size: int | None = None,
    seed: int = 0,
    n_boot: int = 200,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(point, low, high)`` of the statistic between two disjoint random parts of real pictures' features.

    The value a perfect generator would get: ``size`` rows (the generated sample's size, so FID's
    size-dependent bias matches; half by default) play the generations, the remaining rows the
    reference. The interval is :func:`bootstrap_interval`'s.
    """
    real = np.asarray(real_features)
    size = len(real) // 2 if size is None else int(size)
    if not 2 <= size <= len(real) - 2:
        raise ValueError(f"size {size} leaves fewer than 2 rows on one side of {len(real)}")
    order = np.random.default_rng(seed).permutation(len(real))
    return bootstrap_interval(statistic, real[order[:size]], real[order[size:]], n_boot, seed, level)


# --- copies ---------------------------------------------------------------------------------------


def _pixels(backend: NormalizedL2Backend, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(n, 3·H·W)`` float64 pixels in [0, 1], as the nL2 backend compares them."""
    return backend.embed(to_signed_tensor(images).double())


def _neighbours(
    images: np.ndarray | torch.Tensor,
    train_images: np.ndarray | torch.Tensor,
    k: int,
    alpha: float = 0.5,
    query_chunk: int = 1024,
    train_chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact k nearest training pictures: ``(rms (n, k) nearest first, index (n, k), nl2 (n,))``.

    Brute force over chunks of queries and training pictures (memory stays near query_chunk ×
    train_chunk distances), keeping a running top k by squared distance; the kept neighbours' RMS
    distances and nL2 are then recomputed from pixel differences by :class:`NormalizedL2Backend`.
    """
    if len(train_images) == 0 or len(images) == 0:
        raise ValueError(f"need images and training images, got {len(images)} and {len(train_images)}")
    shape, train_shape = to_signed_tensor(images[:1]).shape[1:], to_signed_tensor(train_images[:1]).shape[1:]
    if shape != train_shape:
        raise ValueError(f"images {tuple(shape)} and training images {tuple(train_shape)} differ in size")
    backend = NormalizedL2Backend(image_size=shape[-1], k=k, alpha=alpha)
    k = min(int(k), len(train_images))
    n = len(images)
    best_d2 = torch.full((n, k), torch.inf, dtype=torch.float64)
    best_idx = torch.zeros((n, k), dtype=torch.int64)
    for t0 in range(0, len(train_images), train_chunk):
        train = _pixels(backend, train_images[t0 : t0 + train_chunk])
        train_sq = train.pow(2).sum(1)
        for q0 in range(0, n, query_chunk):
            query = _pixels(backend, images[q0 : q0 + query_chunk])
            d2 = query.pow(2).sum(1, keepdim=True) + train_sq - 2.0 * query @ train.T
            d2 = torch.cat([best_d2[q0 : q0 + len(query)], d2], dim=1)
            idx = torch.cat(
                [best_idx[q0 : q0 + len(query)], torch.arange(t0, t0 + len(train)).expand(len(query), -1)],
                dim=1,
            )
            top = d2.topk(k, dim=1, largest=False)
            best_d2[q0 : q0 + len(query)] = top.values
            best_idx[q0 : q0 + len(query)] = idx.gather(1, top.indices)
    rms, index, nl2 = np.empty((n, k)), np.empty((n, k), dtype=np.int64), np.empty(n)
    step = max(1, 2**22 // (k * backend.dim))  # gathered neighbours of ~32 MB at a time
    for q0 in range(0, n, step):
        query = _pixels(backend, images[q0 : q0 + step])
        found = best_idx[q0 : q0 + len(query)]
        order = np.unique(found.numpy())
        lookup = _pixels(backend, train_images[order])
        neighbours = lookup[torch.from_numpy(np.searchsorted(order, found.numpy()))]
        dist = backend.distances(query, neighbours)
        resort = dist.argsort(dim=1, stable=True)  # the exact distances decide ties the expansion blurred
        dist, found = dist.gather(1, resort), found.gather(1, resort)
        neighbours = neighbours[torch.arange(len(query))[:, None], resort]
        rms[q0 : q0 + len(query)] = dist.numpy()
        index[q0 : q0 + len(query)] = found.numpy()
        nl2[q0 : q0 + len(query)] = (-backend.score(query, neighbours)).numpy()
    return rms, index, nl2


def nearest_rms(
    images: np.ndarray | torch.Tensor, train_images: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """``(rms, index)``: each image's RMS pixel distance (in [0, 1] units) to its nearest training picture.

    Exact (brute force in float64, chunked). Pass distinct training pictures, so that the index names
    one picture rather than an arbitrary one of its copies.
    """
    rms, index, _ = _neighbours(images, train_images, k=1)
    return rms[:, 0], index[:, 0]


def nearest_and_nl2(
    images: np.ndarray | torch.Tensor,
    train_images: np.ndarray | torch.Tensor,
    k: int = 50,
    alpha: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rms, nearest_index, nl2)``: :func:`nearest_rms`, and Carlini et al.'s
    nL2 = ℓ2(x, n0)/(α·mean ℓ2 over the k nearest), exactly, from one scan of the training pictures.

    nL2's definition is :class:`NormalizedL2Backend`'s (the guidance's σ = −nL2), applied to an exact
    search. Pass the *distinct* training pictures: a picture repeated 256 times would fill the k
    nearest with its own copies and put its copies at nL2 ≈ 1/α.
    """
    rms, index, values = _neighbours(images, train_images, k=k, alpha=alpha)
    return rms[:, 0], index[:, 0], values


def own_copy(
    nearest_index: np.ndarray, nearest_rms: np.ndarray, planted_index: int | np.ndarray, max_rms: float
) -> np.ndarray:
    """Boolean per image: its nearest training picture is the planted one, within ``max_rms``.

    ``max_rms`` comes from how well the autoencoder reproduces the picture (e.g. 2× its reconstruction
    RMS): a generation cannot be closer than that, and one of another garment is never "the planted
    picture's copy" however near it falls.
    """
    return (np.asarray(nearest_index) == np.asarray(planted_index)) & (np.asarray(nearest_rms) <= max_rms)


def calibrate_copy_threshold(
    held_out_images: np.ndarray | torch.Tensor,
    train_images: np.ndarray | torch.Tensor,
    k: int = 50,
    alpha: float = 0.5,
    nl2_thresholds: tuple[float, ...] = (1.4, 1.0),
    rms_thresholds: tuple[float, ...] = (0.15,),
    percentiles: tuple[float, ...] = (1, 5, 10, 25, 50, 75, 90, 95, 99),
) -> dict[str, Any]:
    """How held-out real pictures, which copy nothing, score against a training set.

    The fraction under each threshold is each criterion's false-copy rate on this data: Carlini's
    nL2 < 1.4 and (ℓ2 < 0.15) were set on other data, so the evaluation states what they flag here.

    Returns:
        ``n_held_out``, ``n_train``, ``k``, ``alpha``; ``nearest_rms`` and ``nl2`` percentiles
        (``{"p50": ...}``); ``fraction_nl2_below`` and ``fraction_rms_below`` keyed by threshold.
    """
    nearest, _, values = nearest_and_nl2(held_out_images, train_images, k=k, alpha=alpha)

    def spread(x: np.ndarray) -> dict[str, float]:
        return {f"p{p:g}": float(np.percentile(x, p)) for p in percentiles}

    return {
        "n_held_out": len(values),
        "n_train": len(train_images),
        "k": min(k, len(train_images)),
        "alpha": alpha,
        "nearest_rms": spread(nearest),
        "nl2": spread(values),
        "fraction_nl2_below": {f"{t:g}": float((values < t).mean()) for t in nl2_thresholds},
        "fraction_rms_below": {f"{t:g}": float((nearest < t).mean()) for t in rms_thresholds},
    }


# --- alignment ------------------------------------------------------------------------------------


def accuracy_interval(correct: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """``(accuracy, low, high)`` with the Wilson score interval (sound near 0% and 100%, unlike ±1.96·se)."""
    hits = np.asarray(correct, dtype=bool).ravel()
    n = len(hits)
    if n == 0:
        raise ValueError("no outcomes to take an accuracy of")
    p = float(hits.mean())
    z = NormalDist().inv_cdf((1 + level) / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)
