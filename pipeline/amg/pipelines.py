"""diffusers pipelines with Anti-Memorization Guidance: Stable Diffusion, DDPM and DDIM.

Each class subclasses the diffusers pipeline of the same family and takes the parent's arguments
plus ``amg=`` (an :class:`~pipeline.amg.guidance.AntiMemorizationGuidance`). Only the denoising loop
is written here; prompt encoding, latent preparation, scheduler steps, decoding and post-processing
are the parent's own methods. With ``amg=None`` the parent's ``__call__`` runs unchanged; with an
``amg`` whose config is disabled (or whose gates never open) the loop below reproduces the parent's
output bit for bit (same generator, same images), which the tests check.

Supported schedulers: those of the variance-preserving family that expose ``alphas_cumprod`` and need
no input scaling (DDIM, DDPM, PNDM, DPM-Solver, UniPC, ...); x̂0 and G_sim's √(1 − ᾱ_t) use ᾱ_t of
the step's timestep. ``epsilon`` and ``v_prediction`` models are supported.

In the pixel pipelines G_sim is a shift δε of ε̂, but it is not passed to the scheduler inside ε̂: a
scheduler with ``clip_sample`` (or thresholding) would clamp the guided x̂0 and cut the guidance short.
With a DDPM or DDIM scheduler the step is taken on the model's own output and its ``prev_sample`` is
moved by (d prev/d ε̂)·δε, the coefficient of ε̂ in the unclipped step (:func:`_eps_coefficient`): the
same output as the ε-path when nothing is clipped, and the guidance added after clipping otherwise, as
the released code adds its shift to the mean after clipping. Other schedulers get the guided ε̂.

The pixel pipelines also run ``AMGConfig.preset("released_pixel", "nl2")``, the released iDDPM
procedure (:meth:`~pipeline.amg.guidance.AntiMemorizationGuidance.guide_released`): the scheduler takes
its ordinary step, which clips x̂0, and Σ·g is added to its ``prev_sample`` = μ + √Σ·z afterwards, which
is the released "mean + variance × gradient" after clipping. It needs a step with variance: a
DDPMScheduler, or a DDIMScheduler with η > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor

from pipeline.amg import terms
from pipeline.amg.guidance import AMGTrace, AntiMemorizationGuidance


@dataclass
class AMGStableDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    """[`StableDiffusionPipelineOutput`] plus ``amg_trace`` (an :class:`AMGTrace`, None without AMG)."""

    amg_trace: AMGTrace | None = None


@dataclass
class AMGImagePipelineOutput(ImagePipelineOutput):
    """[`ImagePipelineOutput`] plus ``amg_trace`` (an :class:`AMGTrace`, None without AMG)."""

    amg_trace: AMGTrace | None = None


def _check_scheduler(scheduler) -> None:
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"AMG needs a scheduler with alphas_cumprod; {type(scheduler).__name__} has none")
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(
            f"AMG supports variance-preserving schedulers (init_noise_sigma 1); "
            f"{type(scheduler).__name__} is not"
        )
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"AMG supports epsilon and v_prediction models, not {kind!r}")


def _check_released_scheduler(scheduler, eta: float) -> None:
    """``released_pixel`` shifts the step's mean by Σ·g: the step must be a DDPM-style one with Σ > 0."""
    if isinstance(scheduler, DDIMScheduler):
        if not eta > 0:
            raise ValueError(
                "AMG mode 'released_pixel' adds Σ·g to the step's mean, and a DDIM step with eta = 0 has "
                "no variance (Σ = 0): sample with eta > 0 (eta = 1 is DDPM's variance) or use AMGDDPMPipeline"
            )
        return
    if not isinstance(scheduler, DDPMScheduler):
        raise ValueError(
            f"AMG mode 'released_pixel' needs the step variance Σ of a DDPMScheduler or a DDIMScheduler "
            f"with eta > 0, not {type(scheduler).__name__}"
        )
    if scheduler.config.variance_type == "fixed_large_log":
        raise ValueError(
            "AMG mode 'released_pixel' does not support DDPMScheduler variance_type 'fixed_large_log'"
        )


def _step_variance(
    scheduler, t: torch.Tensor | int, model_output: torch.Tensor, x_t: torch.Tensor, eta: float
):
    """Σ of one scheduler step: the variance of the noise ``scheduler.step`` adds to its mean.

    DDPMScheduler: the posterior variance of its ``variance_type`` (the model's own for ``learned`` and
    ``learned_range``), 0 at the last step, which adds no noise. DDIMScheduler: (η·σ_t)². Read from the
    scheduler's own ``_get_variance`` so that Σ is what the step uses.
    """
    t = int(t)
    if isinstance(scheduler, DDIMScheduler):
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        std = eta * scheduler._get_variance(t, prev_t) ** 0.5
        return (std**2).to(device=x_t.device, dtype=x_t.dtype)
    if t <= 0:
        return torch.zeros((), device=x_t.device, dtype=x_t.dtype)
    channels = x_t.shape[1]
    kind = scheduler.variance_type
    predicted = None
    if model_output.shape[1] == 2 * channels and kind in ("learned", "learned_range"):
        predicted = model_output[:, channels:]
    value = scheduler._get_variance(t, predicted_variance=predicted)
    if kind == "fixed_small_log":  # diffusers returns the standard deviation for this one
        value = value**2
    elif kind == "learned_range":  # and the log-variance for this one
        value = torch.exp(value)
    return torch.as_tensor(value).to(device=x_t.device, dtype=x_t.dtype)


def _eps_coefficient(scheduler, t: torch.Tensor | int, eta: float) -> torch.Tensor | None:
    """d prev_sample/d ε̂ of one DDPM or DDIM step when x̂0 is not clipped (None for other schedulers).

    With x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t the step is linear in ε̂ (for ε and v models alike, since v is
    converted through the same x̂0), so a shift δε of ε̂ moves the output by this coefficient times δε:

    * DDPMScheduler: prev = c0·x̂0 + c_t·x_t + √Σ·z with c0 = √ᾱ_prev·β_t/(1 − ᾱ_t), so −c0·√(1−ᾱ_t)/√ᾱ_t.
    * DDIMScheduler: prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − s²)·ε̂ + s·z, s = η·σ_t, so
      −√ᾱ_prev·√(1−ᾱ_t)/√ᾱ_t + √(1 − ᾱ_prev − s²).
    """
    t = int(t)
    alphas = scheduler.alphas_cumprod
    if isinstance(scheduler, DDIMScheduler):
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        ab_prev = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        ab = alphas[t]
        std = eta * scheduler._get_variance(t, prev_t) ** 0.5
        return -ab_prev.sqrt() * (1 - ab).sqrt() / ab.sqrt() + (1 - ab_prev - std**2).sqrt()
    if isinstance(scheduler, DDPMScheduler):
        prev_t = int(scheduler.previous_timestep(t))
        ab_prev = alphas[prev_t] if prev_t >= 0 else scheduler.one
        ab = alphas[t]
        beta = 1 - ab / ab_prev
        return -(ab_prev.sqrt() * beta / (1 - ab)) * (1 - ab).sqrt() / ab.sqrt()
    return None


def _alpha_bar(scheduler, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod[int(t)].to(device=like.device, dtype=like.dtype)


def _to_eps(scheduler, output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """A model output as a noise prediction (v-prediction: ε = √(1−ᾱ)·x_t + √ᾱ·v)."""
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * output
    return output


def _from_eps(scheduler, eps: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_eps`."""
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        return (eps - (1 - alpha_bar).sqrt() * x_t) / alpha_bar.sqrt()
    return eps


class AMGStableDiffusionPipeline(StableDiffusionPipeline):
    r"""[`StableDiffusionPipeline`] whose ``__call__`` also takes ``amg=``: Anti-Memorization Guidance.

    Components and loading are the parent's (``AMGStableDiffusionPipeline.from_pretrained(path)`` or
    ``AMGStableDiffusionPipeline(**pipe.components)``). At each step the guided ε̂ is the CFG output
    plus G_spe, G_dup and G_sim as decided by ``amg`` (see :mod:`pipeline.amg.guidance`); x̂0 is decoded
    by the VAE when the similarity backend needs pixels, and G_sim's gradient flows through the VAE
    decoder and the backend, never through the UNet. ε(x_t, y_N) for G_dup is batched with the CFG
    pass whenever G_dup is expected to apply.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),  # read only, never mutated
        amg: AntiMemorizationGuidance | None = None,
        **kwargs,
    ):
        r"""
        Generate images, with Anti-Memorization Guidance when ``amg`` is given.

        Args:
            prompt ... callback_on_step_end_tensor_inputs:
                As in [`StableDiffusionPipeline.__call__`]. IP-Adapter inputs and the deprecated
                ``callback``/``callback_steps`` are not supported together with ``amg``.
            amg (`AntiMemorizationGuidance`, *optional*):
                Detector and settings of AMG. None runs [`StableDiffusionPipeline.__call__`] itself.

        Returns:
            [`AMGStableDiffusionPipelineOutput`] or `tuple`: the parent's output plus ``amg_trace``
            (per-step σ_t, λ_t, fired terms, s1, s2, c3, n0, y_N, and σ of the final images); the tuple
            form is ``(images, nsfw_content_detected, amg_trace)``.
        """
        parent_args = {
            "prompt": prompt,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "timesteps": timesteps,
            "sigmas": sigmas,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt,
            "num_images_per_prompt": num_images_per_prompt,
            "eta": eta,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "ip_adapter_image": ip_adapter_image,
            "ip_adapter_image_embeds": ip_adapter_image_embeds,
            "output_type": output_type,
            "return_dict": return_dict,
            "cross_attention_kwargs": cross_attention_kwargs,
            "guidance_rescale": guidance_rescale,
            "clip_skip": clip_skip,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
        }
        if amg is None:
            return super().__call__(**parent_args, **kwargs)
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise NotImplementedError("AMG does not support IP-Adapter inputs")
        if kwargs.get("callback") is not None or kwargs.get("callback_steps") is not None:
            raise NotImplementedError(
                "use callback_on_step_end with AMG (callback/callback_steps are deprecated)"
            )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        _check_scheduler(self.scheduler)

        # 0.-2. Defaults and checks, as the parent does them.
        if not height or not width:
            size = self.unet.config.sample_size
            height = size if isinstance(size, int) else size[0]
            width = size if isinstance(size, int) else size[1]
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            None,
            None,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 3. Prompts.
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 4.-6. Timesteps, latents, scheduler kwargs, guidance embedding.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(
                batch_size * num_images_per_prompt
            )
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 7. Denoising loop with AMG.
        state = amg.begin(latents.shape[0], self.scheduler.config.num_train_timesteps)
        caption_cache: dict[str, torch.Tensor] = {}

        def caption_embeds(captions: list[str]) -> torch.Tensor:
            for c in dict.fromkeys(captions):
                if c not in caption_cache:
                    caption_cache[c] = self.encode_prompt(c, device, 1, False, clip_skip=self.clip_skip)[0]
            return torch.cat([caption_cache[c] for c in captions])

        def to_pixels(x0: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(x0 / self.vae.config.scaling_factor, return_dict=False)[0]

        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                planned = amg.planned_captions(state) if self.do_classifier_free_guidance else []
                extra_rows = [r for r, c in enumerate(planned) if c is not None]
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                encoder_states = prompt_embeds
                if extra_rows and timestep_cond is None:
                    latent_model_input = torch.cat([latent_model_input, latents[extra_rows]])
                    encoder_states = torch.cat(
                        [prompt_embeds, caption_embeds([planned[r] for r in extra_rows])]
                    )
                else:
                    extra_rows = []
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                output = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=encoder_states,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]
                n_main = output.shape[0] - len(extra_rows)
                noise_pred, caption_out = output[:n_main], output[n_main:]
                noise_pred_uncond = noise_pred_text = None
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (
                        noise_pred_text - noise_pred_uncond
                    )
                if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(
                        noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale
                    )

                alpha_bar = _alpha_bar(self.scheduler, t, latents)

                def caption_eps(
                    rows: torch.Tensor, captions: list[str], t=t, alpha_bar=alpha_bar, latents=latents
                ) -> torch.Tensor:
                    x = latents[rows]
                    if hasattr(self.scheduler, "scale_model_input"):
                        x = self.scheduler.scale_model_input(x, t)
                    out = self.unet(
                        x,
                        t,
                        encoder_hidden_states=caption_embeds(captions),
                        cross_attention_kwargs=self.cross_attention_kwargs,
                        return_dict=False,
                    )[0]
                    return _to_eps(self.scheduler, out, latents[rows], alpha_bar)

                def to_eps(out: torch.Tensor, latents=latents, alpha_bar=alpha_bar) -> torch.Tensor:
                    return _to_eps(self.scheduler, out, latents, alpha_bar)

                cached = {
                    r: (planned[r], _to_eps(self.scheduler, caption_out[j], latents[r], alpha_bar))
                    for j, r in enumerate(extra_rows)
                }
                eps = to_eps(noise_pred)
                guided = amg.guide(
                    state,
                    step=i,
                    t=t,
                    x_t=latents,
                    alpha_bar=alpha_bar,
                    eps=eps,
                    to_pixels=to_pixels,
                    eps_uncond=to_eps(noise_pred_uncond) if noise_pred_uncond is not None else None,
                    eps_cond=to_eps(noise_pred_text) if noise_pred_text is not None else None,
                    guidance_scale=self.guidance_scale if self.do_classifier_free_guidance else 1.0,
                    caption_eps=caption_eps,
                    cached_caption_eps=cached,
                )
                if guided is not eps:  # some term applied; otherwise keep the parent's tensor untouched
                    noise_pred = _from_eps(self.scheduler, guided, latents, alpha_bar)

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[
                    0
                ]

                if callback_on_step_end is not None:
                    callback_kwargs = {k: locals()[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop(
                        "negative_prompt_embeds", negative_prompt_embeds
                    )
                if i == len(timesteps) - 1 or (i + 1) % self.scheduler.order == 0:
                    progress_bar.update()

        # 8. Decode and post-process, as the parent does.
        if output_type != "latent":
            image = self.vae.decode(
                latents / self.vae.config.scaling_factor, return_dict=False, generator=generator
            )[0]
            trace = amg.finish(state, image.clamp(-1, 1))
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None
            trace = amg.finish(state, None)
        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        image = self.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=do_denormalize
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept, trace)
        return AMGStableDiffusionPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, amg_trace=trace
        )


class _AMGUnconditionalMixin:
    """The shared loop of the DDPM and DDIM variants: ε(x_t[, class]) plus G_sim, or the released
    pixel procedure's mean shift (``mode="released_pixel"``)."""

    def _amg_loop(
        self,
        batch_size,
        generator,
        num_inference_steps,
        output_type,
        return_dict,
        class_labels,
        amg,
        step_kwargs,
    ):
        if isinstance(self.unet.config.sample_size, int):
            image_shape = (
                batch_size,
                self.unet.config.in_channels,
                self.unet.config.sample_size,
                self.unet.config.sample_size,
            )
        else:
            image_shape = (batch_size, self.unet.config.in_channels, *self.unet.config.sample_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        device = self._execution_device
        if device.type == "mps":
            image = randn_tensor(image_shape, generator=generator, dtype=self.unet.dtype).to(device)
        else:
            image = randn_tensor(image_shape, generator=generator, device=device, dtype=self.unet.dtype)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=device).reshape(-1)
            if class_labels.numel() == 1 and batch_size > 1:
                class_labels = class_labels.expand(batch_size)
            if class_labels.numel() != batch_size:
                raise ValueError(f"{class_labels.numel()} class labels for a batch of {batch_size}")
        released = amg is not None and amg.config.enabled and amg.config.mode == "released_pixel"
        eta = float(step_kwargs.get("eta") or 0.0)
        if amg is not None:
            _check_scheduler(self.scheduler)
            if released:
                _check_released_scheduler(self.scheduler, eta)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        state = amg.begin(batch_size, self.scheduler.config.num_train_timesteps) if amg is not None else None
        for i, t in enumerate(self.progress_bar(timesteps)):
            # 1. The model's prediction at x_t.
            model_output = self.unet(image, t, class_labels=class_labels).sample
            shift = None
            if released:
                # 2a. released_pixel: g from x_t against the noised training set; the step's mean moves
                # by Σ·g after the scheduler clipped x̂0 (Dhariwal–Nichol, as the released code does).
                g = amg.guide_released(
                    state,
                    step=i,
                    num_steps=len(timesteps),
                    t=t,
                    x_t=image,
                    alpha_bar=_alpha_bar(self.scheduler, t, image),
                )
                if g is not None:
                    variance = _step_variance(self.scheduler, t, model_output, image, eta)
                    shift = terms.mean_shift(variance, g)
            elif amg is not None:
                # 2b. paper / reference: G_sim = δε on ε̂. The scheduler may clip x̂0, which would cut the
                # guidance short; so the step is taken unguided and the output moved by what δε moves
                # it without clipping, (d prev/d ε̂)·δε, as the released code adds its shift after clipping.
                shift, model_output = self._amg_guide(amg, state, i, t, image, model_output, eta)
            # 3. The scheduler's step (clips x̂0 when configured to), then the shift if any.
            image = self.scheduler.step(
                model_output, t, image, **step_kwargs, generator=generator
            ).prev_sample
            if shift is not None:
                image = image + shift
        trace = amg.finish(state, image.clamp(-1, 1)) if amg is not None else None
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, trace)
        return AMGImagePipelineOutput(images=image, amg_trace=trace)

    def _amg_guide(self, amg, state, i, t, x_t, model_output, eta):
        """(shift of the step's output or None, model output for the step).

        DDPM and DDIM schedulers: the model's own output and (d prev/d ε̂)·(guided − ε̂), added after
        the step. Other schedulers: no shift, and the guided ε̂ as model output (they do not clip x̂0
        here; if one did, the clamp would truncate the guidance).
        """
        channels = x_t.shape[1]
        learned_variance = model_output.shape[1] == 2 * channels
        output, variance = (
            (model_output[:, :channels], model_output[:, channels:])
            if learned_variance
            else (model_output, None)
        )
        alpha_bar = _alpha_bar(self.scheduler, t, x_t)
        eps = _to_eps(self.scheduler, output, x_t, alpha_bar)
        guided = amg.guide(state, step=i, t=t, x_t=x_t, alpha_bar=alpha_bar, eps=eps, to_pixels=lambda x0: x0)
        if guided is eps:  # nothing applied: the model's own output, untouched
            return None, model_output
        coefficient = _eps_coefficient(self.scheduler, t, eta)
        if coefficient is not None:
            return coefficient.to(guided) * (guided - eps), model_output
        output = _from_eps(self.scheduler, guided, x_t, alpha_bar)
        return None, torch.cat([output, variance], dim=1) if learned_variance else output


class AMGDDPMPipeline(_AMGUnconditionalMixin, DDPMPipeline):
    r"""[`DDPMPipeline`] with class labels and Anti-Memorization Guidance (G_sim only).

    ``unet`` may be unconditional or class-conditional (a [`UNet2DModel`] with ``num_class_embeds``).
    With ``AMGConfig.preset("released_pixel", "nl2")`` it runs the released iDDPM procedure (mean shift
    Σ·g after the step; see the module docstring).
    """

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
        class_labels: torch.Tensor | list[int] | int | None = None,
        amg: AntiMemorizationGuidance | None = None,
    ):
        r"""
        Args:
            batch_size, generator, num_inference_steps, output_type, return_dict:
                As in [`DDPMPipeline.__call__`].
            class_labels (`torch.Tensor`, `list[int]` or `int`, *optional*):
                Class of each sample (or one for all) for a class-conditional ``unet``.
            amg (`AntiMemorizationGuidance`, *optional*):
                AMG settings and detector. With neither ``amg`` nor ``class_labels`` the parent runs.

        Returns:
            [`AMGImagePipelineOutput`] or `tuple` ``(images, amg_trace)``.
        """
        if amg is None and class_labels is None:
            return super().__call__(
                batch_size=batch_size,
                generator=generator,
                num_inference_steps=num_inference_steps,
                output_type=output_type,
                return_dict=return_dict,
            )
        return self._amg_loop(
            batch_size, generator, num_inference_steps, output_type, return_dict, class_labels, amg, {}
        )


class AMGDDIMPipeline(_AMGUnconditionalMixin, DDIMPipeline):
    r"""[`DDIMPipeline`] with class labels and Anti-Memorization Guidance (G_sim only).

    ``mode="released_pixel"`` needs ``eta > 0`` (a DDIM step with η = 0 has no variance to shift by).
    """

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        class_labels: torch.Tensor | list[int] | int | None = None,
        amg: AntiMemorizationGuidance | None = None,
    ):
        r"""
        Args:
            batch_size, generator, eta, num_inference_steps, use_clipped_model_output, output_type,
            return_dict:
                As in [`DDIMPipeline.__call__`].
            class_labels (`torch.Tensor`, `list[int]` or `int`, *optional*):
                Class of each sample (or one for all) for a class-conditional ``unet``.
            amg (`AntiMemorizationGuidance`, *optional*):
                AMG settings and detector. With neither ``amg`` nor ``class_labels`` the parent runs.

        Returns:
            [`AMGImagePipelineOutput`] or `tuple` ``(images, amg_trace)``.
        """
        if amg is None and class_labels is None:
            return super().__call__(
                batch_size=batch_size,
                generator=generator,
                eta=eta,
                num_inference_steps=num_inference_steps,
                use_clipped_model_output=use_clipped_model_output,
                output_type=output_type,
                return_dict=return_dict,
            )
        return self._amg_loop(
            batch_size,
            generator,
            num_inference_steps,
            output_type,
            return_dict,
            class_labels,
            amg,
            {"eta": eta, "use_clipped_model_output": use_clipped_model_output},
        )
