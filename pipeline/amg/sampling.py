"""Sampling many (prompt, seed) pairs through an AMG pipeline: one CPU generator per seed, so a sample
depends on its seed only, not on batching."""

from __future__ import annotations

import torch

from pipeline.amg.guidance import AntiMemorizationGuidance


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_text2img(
    pipe,
    prompts: list[str],
    seeds: list[int],
    amg: AntiMemorizationGuidance | None,
    steps: int,
    guidance_scale: float,
) -> tuple[torch.Tensor, list]:
    """Images (``(N, 3, H, W)`` in [−1, 1]) for every (prompt, seed) pair, one pipeline call per prompt."""
    out, traces = [], []
    for prompt in prompts:
        res = pipe(
            [prompt] * len(seeds),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=seeded_generators(seeds),
            output_type="pt",
            amg=amg,
        )
        out.append(res.images * 2 - 1)
        traces.append(getattr(res, "amg_trace", None))
    return torch.cat(out), traces
