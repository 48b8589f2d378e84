"""The equations of AMG as small pure functions on tensors (paper Eqs. 10–17, the released constants).

Every function takes per-sample values as tensors broadcastable against the batch (shape ``(B,)``
for scales and similarities, ``(B, C, H, W)`` for noise predictions) and has no state, so each can
be checked against a transcription of its equation. :mod:`pipeline.amg.guidance` composes them.

:func:`calibrate_threshold` turns σ_t measured on plain samples into a λ_t table
(``threshold="calibrated"``, read by :func:`calibrated_threshold`).

The last group is the released iDDPM procedure (``mode="released_pixel"``): the training set noised to
t, the released mL2, its step clock, and the mean shift Σ·g that replaces G_sim there.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.amg.config import AMGConfig


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` of shape ``(B,)`` reshaped to broadcast over ``like`` of shape ``(B, ...)``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape[0], *([1] * (like.ndim - 1)))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """x̂0 = (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t (paper Eq. 12)."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def despecification_scale(sigma: torch.Tensor, c1: float, s0: float) -> torch.Tensor:
    """s1 = max(min(c1·σ_t, s0 − 1), 0) (paper Eq. 13)."""
    return torch.clamp(torch.clamp(c1 * sigma, max=s0 - 1), min=0)


def caption_dedup_scale(
    sigma: torch.Tensor, c2: torch.Tensor | float, s0: float, s1: torch.Tensor
) -> torch.Tensor:
    """s2 = max(min(c2·σ_t, s0 − s1 − 1), 0) (paper Eq. 15); ``c2`` may be per sample."""
    return torch.clamp(torch.minimum(c2 * sigma, s0 - s1 - 1), min=0)


def reference_c2(s0: float, s1: torch.Tensor, saturation: float) -> torch.Tensor:
    """The released code's c2 = (s0 − 1 − s1)/saturation (saturation = 0.3): s2 hits its bound at σ = 0.3."""
    return (s0 - 1 - s1) / saturation


def dissimilarity_scale(
    sigma: torch.Tensor, t: torch.Tensor | float, lam: float, config: AMGConfig
) -> torch.Tensor:
    """c3, times max(σ − offset, 0)·e^((origin − t)/scale) (reference: 100, 0.3, 1000, 170) and times
    c3_margin·max(σ − λ_t, 0) (the released pixel code: 1000·80·(thres − mL2)) where those are set.

    The released code only reaches the reference formula when σ > λ_t ≥ 0.3, so σ − 0.3 is positive
    there; the max(·, 0) keeps a threshold configured below the offset from turning G_sim into
    attraction. With a margin the push is zero at the gate and grows with how far inside it the sample
    is, so a sample that just crossed λ_t is nudged, not thrown (BENCHMARKS.md, "AMG evaluation").
    """
    c3 = torch.full_like(sigma, config.c3)
    if config.c3_sigma_offset is not None:
        c3 = c3 * torch.clamp(sigma - config.c3_sigma_offset, min=0)
    if config.c3_time_scale is not None:
        t = torch.as_tensor(t, dtype=sigma.dtype, device=sigma.device)
        c3 = c3 * torch.exp((config.c3_time_origin - t) / config.c3_time_scale)
    if config.c3_margin is not None:
        c3 = c3 * config.c3_margin * torch.clamp(sigma - lam, min=0)
    return c3


def despecification_guidance(
    eps_cond: torch.Tensor, eps_uncond: torch.Tensor, s1: torch.Tensor
) -> torch.Tensor:
    """G_spe = −s1·(ε(x_t, y) − ε(x_t)) (paper Eq. 14)."""
    return -_per_sample(s1, eps_cond) * (eps_cond - eps_uncond)


def caption_dedup_guidance(
    eps_caption: torch.Tensor, eps_uncond: torch.Tensor, s2: torch.Tensor
) -> torch.Tensor:
    """G_dup = −s2·(ε(x_t, y_N) − ε(x_t)) (paper Eq. 16)."""
    return -_per_sample(s2, eps_caption) * (eps_caption - eps_uncond)


def dissimilarity_guidance(
    grad_sigma: torch.Tensor, alpha_bar_t: torch.Tensor | float, c3: torch.Tensor
) -> torch.Tensor:
    """G_sim = c3·√(1 − ᾱ_t)·∇_{x_t}σ_t (paper Eq. 17)."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=grad_sigma.dtype, device=grad_sigma.device)
    return _per_sample(c3, grad_sigma) * (1 - alpha_bar_t).sqrt() * grad_sigma


def exponential_threshold(t: float, a: float, b: float, rate: float) -> float:
    """λ_t = a + b·e^(−rate·t) (released code: 0.3 + 0.1·e^(−0.005t) for SSCD)."""
    return a + b * math.exp(-rate * t)


def parabolic_threshold(t: float, num_train_timesteps: int, start: float, end: float) -> float:
    """λ_t = start + (end − start)·(1 − t/T)²: flat at the start of sampling (t = T), rising to ``end``.

    A parabola in t with its vertex at t = T: λ barely moves while x̂0 is still blurry and early
    detection matters, then rises over the last steps, when x̂0 is sharp and every sample scores
    higher against its nearest neighbour (paper §5: σ_t grows as t → 0).
    """
    u = 1.0 - float(t) / float(num_train_timesteps)
    return start + (end - start) * u * u


def calibrated_threshold(t: float, timesteps: Sequence[int], values: Sequence[float]) -> float:
    """λ_t from a calibrated table: linear in t between its timesteps, the end value outside them."""
    if t <= timesteps[0]:
        return float(values[0])
    if t >= timesteps[-1]:
        return float(values[-1])
    j = bisect.bisect_right(timesteps, t)
    t0, t1 = timesteps[j - 1], timesteps[j]
    return float(values[j - 1] + (values[j] - values[j - 1]) * (t - t0) / (t1 - t0))


def calibrate_threshold(
    timesteps: Sequence[int],
    sigmas_per_step: Sequence[Sequence[float]],
    percentile: float = 99.0,
    smooth: int = 5,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A λ_t table from σ_t measured on plain samples of prompts known not to be memorized.

    At each timestep, λ is the ``percentile`` of the σ values measured there over all those samples,
    so a clean sample crosses the gate at that step with probability about 1 − percentile/100; the
    per-step values are then averaged over a centred window of ``smooth`` table entries, which damps
    the noise of a high percentile of a few hundred samples. The window shrinks symmetrically near the
    ends (one entry at each end), so a straight stretch of the curve, such as its steep end at t → 0
    where x̂0 sharpens and σ rises, is reproduced without the lag a one-sided window would add.

    The table is not made monotone: σ_t of plain samples need not be monotone in t (x̂0 is blurry,
    then sharpens; the released x_t comparison is flat, then falls), and a monotone envelope would
    either raise λ where the measured curve dips, missing detections there, or lower it, firing on
    clean samples; the per-step percentile keeps the false-positive rate where it was chosen.

    Args:
        timesteps (`Sequence[int]`): the timestep of each group (any order; equal timesteps are merged).
            The clock of λ: the scheduler's t, or the released step index when
            ``AMGConfig.lambda_respaced_steps`` is set.
        sigmas_per_step (`Sequence[Sequence[float]]`): σ values measured at each timestep (any number
            per timestep; NaN and None are dropped).
        percentile (`float`, *optional*, defaults to 99.0): in [0, 100]; 100 is the largest σ seen.
        smooth (`int`, *optional*, defaults to 5): width of the moving average, in table entries (1: none;
            an even width acts as the odd one below it).

    Returns:
        `(tuple[int, ...], tuple[float, ...])`: ``lambda_timesteps`` (increasing) and ``lambda_values``,
        for ``AMGConfig(threshold="calibrated", ...)`` and :func:`pipeline.amg.config.save_threshold`.
    """
    if len(timesteps) != len(sigmas_per_step):
        raise ValueError(f"{len(timesteps)} timesteps but {len(sigmas_per_step)} groups of σ values")
    if not timesteps:
        raise ValueError("no σ values to calibrate λ_t on")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if int(smooth) != smooth or smooth < 1:
        raise ValueError(f"smooth must be a whole number of at least 1, got {smooth}")
    groups: dict[int, list[float]] = {}
    for t, values in zip(timesteps, sigmas_per_step, strict=True):
        kept = [float(v) for v in np.asarray(values, dtype=object).ravel() if v is not None]
        groups.setdefault(int(t), []).extend(v for v in kept if math.isfinite(v))
    empty = sorted(t for t, values in groups.items() if not values)
    if empty:
        raise ValueError(f"no finite σ value at timestep(s) {empty[:5]}")
    table_t = sorted(groups)
    raw = [float(np.percentile(groups[t], percentile)) for t in table_t]
    half = (int(smooth) - 1) // 2
    n = len(raw)
    smoothed = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        smoothed.append(float(np.mean(raw[i - h : i + h + 1])))
    return tuple(table_t), tuple(smoothed)


def threshold(t: float, num_train_timesteps: int, config: AMGConfig) -> float:
    """λ_t of ``config`` at timestep ``t`` (or at the released step index, see ``lambda_respaced_steps``)."""
    if config.threshold == "parabolic":
        return parabolic_threshold(t, num_train_timesteps, config.lambda_start, config.lambda_end)
    if config.threshold == "exponential":
        return exponential_threshold(t, config.lambda_a, config.lambda_b, config.lambda_rate)
    if config.threshold == "calibrated":
        return calibrated_threshold(t, config.lambda_timesteps, config.lambda_values)
    return config.lambda_start


# ----------------------------------------------------------------------------- released iDDPM procedure
def q_sample(x0: torch.Tensor, alpha_bar: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """x0 noised to ᾱ: √ᾱ·x0 + √(1 − ᾱ)·z (paper Eq. 1; the released code's ``q_sample``)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def released_step_index(step: int, num_steps: int, respaced_steps: int) -> float:
    """The released iDDPM step index i of loop step ``step`` (0-based) of ``num_steps``.

    i = (N − 1 − n)·R/N: the steps left after this one, scaled to the released R-step respacing, so i
    reaches 0 at the last step and equals the remaining step count (R − 1 … 0) when N = R. The released
    threshold is a curve over that index; mapping by the fraction of the trajectory keeps its whole
    range when sampling with fewer steps.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"step {step} is outside a loop of {num_steps} steps")
    return (num_steps - 1 - step) * respaced_steps / num_steps


def released_nl2(
    distances: torch.Tensor, k: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released mL2 from each query's distances to every training row, ``(B, N)``.

    mL2 = d(nearest)/(α·mean of the k smallest distances), the nearest included in the mean, as in the
    released code (k capped at N). Returns mL2 ``(B,)``, the nearest row ``(B,)`` and the denominator
    α·mean ``(B,)``, which the released gradient holds fixed.
    """
    k = max(1, min(int(k), distances.shape[1]))
    smallest = distances.topk(k, dim=1, largest=False).values
    denominator = alpha * smallest.mean(dim=1)
    nearest = distances.argmin(dim=1)
    return smallest[:, 0] / denominator, nearest, denominator


def released_mean_guidance(grad_sigma: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """g = −scale·∇_{x_t}σ = scale·∇_{x_t}mL2; the step's mean moves by Σ·g (Dhariwal–Nichol): mL2 grows."""
    return -_per_sample(scale, grad_sigma) * grad_sigma


def mean_shift(variance: torch.Tensor | float, g: torch.Tensor) -> torch.Tensor:
    """Σ·g, added to a sampler step's mean (its ``prev_sample``: mean + √Σ·z) after x̂0 was clipped."""
    return torch.as_tensor(variance, dtype=g.dtype, device=g.device) * g
