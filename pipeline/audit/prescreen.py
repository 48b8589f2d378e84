"""Wen et al.'s pre-screen: prompts whose text-conditioning strength is low are not generated."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def wen_prescreen(
    pipe, prompt: str, seeds: Sequence[int], num_inference_steps: int, guidance_scale: float, steps: int = 1
) -> tuple[float, list[list[float]]]:
    """Wen et al.'s score of ``prompt``: mean over the first ``steps`` sampling steps and the ``seeds`` of
    ‖ε(x_t, c) − ε(x_t, ∅)‖₂, following the CFG trajectory the full generation takes from the same seeds.

    Costs ``steps`` UNet passes (batched over seeds, both CFG branches), against the full sampling's
    ``num_inference_steps`` and the detector. Returns the score and the norms, ``(steps, seeds)``.
    """

    device = pipe._execution_device
    n = len(seeds)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, device, n, True)
        states = torch.cat([uncond, cond])
        h = w = pipe.unet.config.sample_size * pipe.vae_scale_factor
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, h, w, cond.dtype, device, generators)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the pipeline's stays untouched
        scheduler.set_timesteps(num_inference_steps, device=device)
        norms = []
        for t in scheduler.timesteps[: max(1, int(steps))]:
            x = torch.cat([latents] * 2)
            if hasattr(scheduler, "scale_model_input"):
                x = scheduler.scale_model_input(x, t)
            eps_u, eps_c = pipe.unet(x, t, encoder_hidden_states=states, return_dict=False)[0].chunk(2)
            norms.append(wen_norms(eps_c, eps_u))
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return wen_score(norms), [n_.tolist() for n_ in norms]


def wen_norms(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """d_t = ‖ε(x_t, c) − ε(x_t, ∅)‖₂ per sample (all latent channels and positions), float64 ``(B,)``."""
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"shapes differ: {tuple(eps_cond.shape)} vs {tuple(eps_uncond.shape)}")
    diff = (eps_cond.detach().to(torch.float64) - eps_uncond.detach().to(torch.float64)).flatten(1)
    return diff.norm(dim=1)


def wen_score(step_norms: Sequence[torch.Tensor] | torch.Tensor) -> float:
    """A prompt's score: the mean of d_t over the steps and seeds measured (``(steps, seeds)``)."""
    values = (
        torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in step_norms])
        if isinstance(step_norms, (list, tuple))
        else torch.as_tensor(step_norms, dtype=torch.float64)
    )
    if values.numel() == 0:
        raise ValueError("no Wen norms to average")
    return float(values.mean())
