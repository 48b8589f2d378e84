"""Prompt-level memorization criteria that need no training data: Carlini's clique test and Wen's score.

Both are pure functions of tensors, so they are tested on constructed inputs and reused by the audit.

**Carlini et al. (USENIX Security 2023), extraction without the training set.** A memorized prompt
makes the model produce the same image from different seeds. For the N generations of one prompt:

1. :func:`tiled_l2`: the distance of two images is the largest, over a ``grid``×``grid`` tiling, of the
   root-mean-square difference of the corresponding tiles (pixels in [0, 1]). Taking the worst tile
   means that two images count as near-identical only when *every* region matches, so a shared
   plain background cannot make two different subjects look alike.
2. :func:`near_identical_graph`: an edge joins two generations whose distance is below ``threshold``.
3. :func:`max_clique`: the largest set of pairwise near-identical generations (exact, Bron–Kerbosch
   with pivoting and a size bound).
4. :func:`carlini_flag`: the prompt is flagged when that clique has at least ``clique_size`` members
   (capped at N, so a small audit budget asks for *all* its generations to agree).

Constants (:data:`CARLINI_DEFAULTS`): a 4×4 grid (16 tiles; 128-px tiles at 512 px), edge threshold
0.15, clique of 10. The paper's verified figure is its extraction cut, (ℓ2, δ = 0.15) between a
generation and a training image; its tile size, the threshold of the edges between generations and the
clique size of 10 (out of 500 generations) come from our reading of the paper and could not be
checked against its text (see ``shared/research/memorization.md`` §1), so all three are settings.
On the demo's memorizing model (32×32 images, 4 seeds per prompt, 50 DDIM steps), the generations of
each of its 8 audited training prompts are 0.003–0.089 apart without AMG (median 0.017; every prompt
a full clique), and 0.074–0.635 apart with AMG (median 0.30; 17% of pairs under 0.15, one prompt whose
4 guided samples agree with each other, yet none matches a training image).

**Wen et al. (ICLR 2024), a cheap detection score.** A memorized prompt pulls the noise prediction
hard towards its training image: d_t = ‖ε(x_t, c) − ε(x_t, ∅)‖₂ (the two classifier-free-guidance
branches, flattened per sample) is large. :func:`wen_norms` computes d_t for a batch,
:func:`wen_score` averages over steps and seeds. Wen et al. report AUC 0.994 at 50 steps × 4
generations on SD v1.4, and a usable score from the first step alone; its scale depends on the model
(latent size, text encoder), so a pre-screen threshold is calibrated per model on known negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.config import AuditConfig

#: Default constants of the clique criterion (see the module docstring for where they come from).
CARLINI_DEFAULTS = {"grid": 4, "threshold": 0.15, "clique_size": 10}


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images as float64 in [0, 1]; ``(N, C, H, W)``. Inputs in [−1, 1] are recognised by their range."""
    x = torch.as_tensor(images).detach().to(torch.float64)
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(x.shape)}")
    if x.numel() and float(x.min()) < 0:
        x = (x + 1) / 2
    return x.clamp(0, 1)


def tiles(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, grid*grid, C*h*w)``: each image cut into a ``grid``×``grid`` tiling (edge rows/columns that
    do not divide evenly are dropped, at most ``grid − 1`` pixels per side)."""
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"{h}x{w} images cannot be cut into a {grid}x{grid} grid")
    x = images[:, :, : th * grid, : tw * grid]
    x = x.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, grid * grid, c * th * tw)


def tiled_l2(
    images: torch.Tensor, grid: int = CARLINI_DEFAULTS["grid"], others: torch.Tensor | None = None
) -> np.ndarray:
    """Pairwise tiled distance: for each pair, the largest per-tile RMS pixel difference (pixels in [0, 1]).

    Args:
        images (`torch.Tensor`): ``(N, C, H, W)`` in [0, 1] (or [−1, 1]).
        grid (`int`, *optional*, defaults to 4): tiles per side.
        others (`torch.Tensor`, *optional*): ``(M, C, H, W)`` of the same size; default: ``images``.

    Returns:
        ``(N, M)`` float64 distances; 0 on the diagonal when ``others`` is None.
    """
    a = tiles(_to_unit(images), grid)
    b = a if others is None else tiles(_to_unit(others), grid)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError("images and others must have the same size")
    dist = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    d = a.shape[-1]
    for t in range(a.shape[1]):  # one tile at a time: memory stays at N×M plus one tile of every image
        dist = torch.maximum(dist, torch.cdist(a[:, t], b[:, t]) / d**0.5)
    out = dist.numpy()
    if others is None:
        np.fill_diagonal(out, 0.0)
    return out


def near_identical_graph(
    distances: np.ndarray, threshold: float = CARLINI_DEFAULTS["threshold"]
) -> np.ndarray:
    """Boolean adjacency: i and j (i ≠ j) are joined when their distance is below ``threshold``."""
    adj = np.asarray(distances) < threshold
    adj = adj & adj.T
    np.fill_diagonal(adj, False)
    return adj


def max_clique(adjacency: np.ndarray) -> list[int]:
    """One largest clique of an undirected graph, as sorted vertex ids (exact).

    Bron–Kerbosch with Tomita pivoting, pruned when the candidates cannot beat the best clique found.
    A prompt's near-identical generations form one dense block, which this finds without branching.
    """
    adj = np.asarray(adjacency, dtype=bool)
    n = adj.shape[0]
    if n == 0:
        return []
    neighbours = [set(np.flatnonzero(adj[i]).tolist()) for i in range(n)]
    best: list[int] = [0]

    def expand(clique: list[int], candidates: set[int], excluded: set[int]) -> None:
        nonlocal best
        if not candidates and not excluded:
            if len(clique) > len(best):
                best = list(clique)
            return
        if len(clique) + len(candidates) <= len(best):
            return
        pivot = max(candidates | excluded, key=lambda u: len(neighbours[u] & candidates))
        for v in sorted(candidates - neighbours[pivot]):
            expand([*clique, v], candidates & neighbours[v], excluded & neighbours[v])
            candidates = candidates - {v}
            excluded = excluded | {v}
            if len(clique) + len(candidates) <= len(best):
                return

    expand([], set(range(n)), set())
    return sorted(best)


@dataclass(frozen=True)
class CliqueResult:
    """Carlini's criterion for one prompt.

    Attributes:
        clique (`list[int]`): generations in the largest near-identical clique (positions in the input).
        required (`int`): clique size that flags the prompt (``clique_size`` capped at N, at least 2).
        flagged (`bool`): ``len(clique) >= required``.
        median_distance (`float`): median pairwise tiled distance among the generations (NaN if N < 2).
    """

    clique: list[int]
    required: int
    flagged: bool
    median_distance: float


def carlini_flag(
    images: torch.Tensor,
    grid: int = CARLINI_DEFAULTS["grid"],
    threshold: float = CARLINI_DEFAULTS["threshold"],
    clique_size: int = CARLINI_DEFAULTS["clique_size"],
) -> CliqueResult:
    """Flag a prompt whose generations (``(N, C, H, W)``) hold a large clique of near-identical images.

    With fewer than two generations nothing can agree, so nothing is flagged.
    """
    n = int(images.shape[0])
    required = max(2, min(int(clique_size), n))
    if n < 2:
        return CliqueResult(list(range(n)), required, False, float("nan"))
    dist = tiled_l2(images, grid)
    clique = max_clique(near_identical_graph(dist, threshold))
    upper = dist[np.triu_indices(n, 1)]
    return CliqueResult(clique, required, len(clique) >= required, float(np.median(upper)))


def criteria(cfg: AuditConfig, detection: dict[str, Any]) -> dict[str, Any]:
    """The flags' definitions and constants, as recorded in ``summary.json`` and shown in the report."""
    required = max(2, min(cfg.clique_size, cfg.samples_per_prompt))
    return {
        "memorized_threshold": detection["memorized_threshold"],
        "tile_grid": cfg.tile_grid,
        "tile_threshold": cfg.tile_threshold,
        "clique_size": cfg.clique_size,
        "clique_required": required,
        "wen_steps": cfg.wen_steps,
        "wen_samples": cfg.wen_samples,
        "wen_threshold": cfg.wen_threshold,
        "memorized_rule": f"a sample is memorized when its {cfg.similarity} similarity to the nearest "
        f"training image in the bundle exceeds {detection['memorized_threshold']}",
        "carlini_rule": f"a prompt's generations hold a Carlini clique when at least {required} of them are "
        f"pairwise within {cfg.tile_threshold} tiled L2 (largest per-tile RMS pixel difference "
        f"on a {cfg.tile_grid}x{cfg.tile_grid} grid, pixels in [0, 1])",
        "flag_rule": "a prompt is flagged in a mode when one of its samples is memorized; a Carlini clique "
        "is reported beside it (candidates without training data, confirmed by the bundle match)",
        "wen_rule": f"Wen score: mean of |eps(x_t, c) - eps(x_t, 0)|_2 over the first {cfg.wen_steps} "
        f"step(s) and {cfg.wen_samples} seed(s); prompts below {cfg.wen_threshold} are not generated"
        + (" (pre-screen off)" if cfg.wen_threshold <= 0 else ""),
    }
