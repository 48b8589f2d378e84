"""The equations of AMG as small pure functions on tensors (paper Eqs. 10–17, the released constants).

Every function takes per-sample values as tensors broadcastable against the batch (shape ``(B,)``
for scales and similarities, ``(B, C, H, W)`` for noise predictions) and has no state, so each can
be checked against a transcription of its equation. :mod:`pipeline.amg.guidance` composes them.
"""

from __future__ import annotations

import math

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


def dissimilarity_scale(sigma: torch.Tensor, t: torch.Tensor | float, config: AMGConfig) -> torch.Tensor:
    """c3, constant (paper) or c3·max(σ − offset, 0)·e^((origin − t)/scale) (reference: 100, 0.3, 1000, 170).

    The released code only reaches this formula when σ > λ_t ≥ 0.3, so σ − 0.3 is positive there;
    the max(·, 0) keeps a threshold configured below the offset from turning G_sim into attraction.
    """
    c3 = torch.full_like(sigma, config.c3)
    if config.c3_sigma_offset is not None:
        c3 = c3 * torch.clamp(sigma - config.c3_sigma_offset, min=0)
    if config.c3_time_scale is not None:
        t = torch.as_tensor(t, dtype=sigma.dtype, device=sigma.device)
        c3 = c3 * torch.exp((config.c3_time_origin - t) / config.c3_time_scale)
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


def threshold(t: float, num_train_timesteps: int, config: AMGConfig) -> float:
    """λ_t of ``config`` at timestep ``t``."""
    if config.threshold == "parabolic":
        return parabolic_threshold(t, num_train_timesteps, config.lambda_start, config.lambda_end)
    if config.threshold == "exponential":
        return exponential_threshold(t, config.lambda_a, config.lambda_b, config.lambda_rate)
    return config.lambda_start
