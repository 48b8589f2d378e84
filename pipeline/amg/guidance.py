"""One AMG step: detect, gate, scale, and add G_spe, G_dup and G_sim to the noise prediction.

:class:`AntiMemorizationGuidance` is what the AMG pipelines take as ``amg=``. The pipelines own the
models (UNet, VAE, text encoder) and the scheduler; at each denoising step they hand this object the
noisy sample, the noise predictions and two callables (how to turn x̂0 into pixels, and how to get
ε(x_t, y_N) for a caption), and get back the guided ε̂. Everything the step decided is recorded in
an :class:`AMGTrace` (σ_t, λ_t, which terms fired, s1, s2, c3, n0, y_N), returned with the images.
Each sample is detected on its own schedule (``AMGConfig.detect_every``): only the samples due a
detection at a step are decoded, scored and guided, so what AMG does to a sample does not depend on
its batch neighbours.

Modes (see :class:`~pipeline.amg.config.AMGConfig`):

* ``gate="shared"`` (paper Eq. 10): σ_t from ε̂; if σ_t > λ_t, ε̂ ← ε̂ + G_spe + G_dup + G_sim, all
  evaluated at the same x_t, σ_t and n0.
* ``gate="per_term"`` (released code): s1 from σ_t with no threshold (zero when σ ≤ 0); G_dup when
  n0 has a duplicated caption and σ_t > λ_t, and for ``dup_hold_steps`` steps in all from such a
  trigger (the triggering step included);
  then σ is measured again on the new x̂0 and G_sim is applied when that second σ exceeds λ_t.

The unconditional and class-conditional case applies G_sim alone.

``mode="released_pixel"`` is the released iDDPM procedure, a different algorithm with its own entry point,
:meth:`AntiMemorizationGuidance.guide_released`: σ = −mL2 of x_t against the training set noised to t, a
latch that arms guidance once the unguided chain came close to a training image, a pause after a run
of unguided steps, and a shift g of the step's mean (μ ← μ + Σ·g, added by the pixel pipelines after
the scheduler clipped x̂0) instead of a term added to ε̂.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.amg import terms
from pipeline.amg.config import AMGConfig
from pipeline.amg.detector import Detection, MemorizationDetector

ToPixels = Callable[[torch.Tensor], torch.Tensor]
#: (batch positions, captions) -> ε(x_t[rows], caption) for the current step.
CaptionEps = Callable[[torch.Tensor, list[str]], torch.Tensor]


@dataclass
class AMGStep:
    """Per-step diagnostics, one list entry per sample.

    Attributes:
        step (`int`): index in the sampling loop.
        timestep (`int`): scheduler timestep t.
        threshold (`float`): λ_t.
        sigma (`list[float | None]`): σ_t of x̂0 from the unguided ε̂; None for a sample not detected
            at this step (quiet, between its ``detect_every`` detections).
        neighbour (`list[int]`): index row of n0 (−1 where not detected).
        fired (`list[bool]`): σ_t > λ_t.
        spe, dup, sim (`list[bool]`): whether G_spe, G_dup, G_sim were applied.
        s1, s2, c3 (`list[float]`): the scales used (0 when a term was not applied).
        sigma_recheck (`list[float | None]`): per-term gating: σ measured after G_spe/G_dup.
        dup_caption (`list[str | None]`): y_N used by G_dup.
        latched (`list[bool]`, *optional*): ``released_pixel``: guidance armed (after this step's check).
        paused (`list[bool]`, *optional*): ``released_pixel``: the sample was in a pause at this step (its
            σ is recorded, no guidance applies and its counters do not move).

    ``released_pixel`` records σ = −mL2 against the noised training set, ``threshold`` = λ_i on the
    released step clock, ``sim`` where the mean shift applied and ``c3`` the mean-shift scale used
    (c3·c3_margin·(σ − λ)).
    """

    step: int
    timestep: int
    threshold: float
    sigma: list[float | None]
    neighbour: list[int]
    fired: list[bool]
    spe: list[bool]
    dup: list[bool]
    sim: list[bool]
    s1: list[float]
    s2: list[float]
    c3: list[float]
    sigma_recheck: list[float | None]
    dup_caption: list[str | None]
    latched: list[bool] | None = None
    paused: list[bool] | None = None


@dataclass
class AMGTrace:
    """Everything AMG did during one pipeline call, for audits and tests.

    Attributes:
        config (`dict`): the :class:`AMGConfig` used.
        steps (`list[AMGStep]`): one record per denoising step (empty when AMG was disabled).
        final_sigma (`list[float]`): σ of each output image against its nearest training row.
        final_neighbour (`list[int]`): that row.
        final_memorized (`list[bool]`): σ above ``config.memorized_threshold``.
        detections (`int`): detector passes made (embed + search), all steps together.
        images_detected (`int`): images those passes scored (a pass scores the samples due a detection,
            :meth:`AntiMemorizationGuidance._due`): for a latent model, the VAE decodes AMG added.
        gradients (`int`): σ gradients computed (backward passes through decoder and embedder).
        caption_passes (`int`): UNet passes run for y_N outside the CFG batch.
    """

    config: dict[str, Any]
    steps: list[AMGStep] = field(default_factory=list)
    final_sigma: list[float] = field(default_factory=list)
    final_neighbour: list[int] = field(default_factory=list)
    final_memorized: list[bool] = field(default_factory=list)
    detections: int = 0
    images_detected: int = 0
    gradients: int = 0
    caption_passes: int = 0

    def count_detection(self, images: int) -> None:
        """Record one detector pass that scored ``images`` samples."""
        self.detections += 1
        self.images_detected += images

    def any_fired(self) -> list[bool]:
        """Per sample: did any term apply at any step."""
        n = len(self.final_sigma) or (len(self.steps[0].sigma) if self.steps else 0)
        return [any(s.spe[i] or s.dup[i] or s.sim[i] for s in self.steps) for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""

        return asdict(self)


@dataclass
class AMGState:
    """Per-call state: trace, G_dup hold counters and sticky captions, caption UNet requests."""

    batch_size: int
    num_train_timesteps: int
    trace: AMGTrace
    hold: list[int]
    caption: list[str | None]
    planned: list[str | None]
    #: Per sample: the step of its last detection, and whether a gated term has applied to it (then it
    #: is detected at every step from there on; otherwise every ``detect_every``-th step). Per sample,
    #: so that what AMG does to a sample does not depend on what its batch neighbours did.
    last_detection: list[int | None] = field(default_factory=list)
    active: list[bool] = field(default_factory=list)
    #: ``released_pixel``: armed per sample, consecutive armed steps without guidance, pause steps left.
    latched: list[bool] = field(default_factory=list)
    unguided_run: list[int] = field(default_factory=list)
    pause_left: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepInputs:
    """What a pipeline hands :meth:`AntiMemorizationGuidance.guide` at one step (see its arguments)."""

    x_t: torch.Tensor
    alpha_bar: torch.Tensor
    eps: torch.Tensor
    to_pixels: ToPixels
    eps_uncond: torch.Tensor | None
    eps_cond: torch.Tensor | None
    guidance_scale: float
    caption_eps: CaptionEps | None
    cached_caption_eps: dict[int, tuple[str, torch.Tensor]]

    def select(self, rows: list[int]) -> StepInputs:
        """The inputs of the samples at batch positions ``rows``, renumbered 0..len(rows)−1 (caption
        requests are passed on with their batch positions)."""
        index = torch.tensor(rows, device=self.eps.device)
        position = {r: j for j, r in enumerate(rows)}
        outer = self.caption_eps

        def caption_eps(sub: torch.Tensor, captions: list[str]) -> torch.Tensor:
            return outer(index[sub], captions)

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index]

        return StepInputs(
            x_t=self.x_t[index],
            alpha_bar=self.alpha_bar,
            eps=self.eps[index],
            to_pixels=self.to_pixels,
            eps_uncond=pick(self.eps_uncond),
            eps_cond=pick(self.eps_cond),
            guidance_scale=self.guidance_scale,
            caption_eps=None if outer is None else caption_eps,
            cached_caption_eps={position[r]: v for r, v in self.cached_caption_eps.items() if r in position},
        )


def _list(x: torch.Tensor) -> list:
    return x.detach().cpu().tolist()


class AntiMemorizationGuidance:
    """Anti-Memorization Guidance for diffusers pipelines.

    Args:
        detector (`MemorizationDetector`): backend + neighbour index + threshold schedule.
        config (`AMGConfig`, *optional*): defaults to the detector's.

    Example:

    ```py
    >>> from pipeline.amg import AMGConfig, AntiMemorizationGuidance, MemorizationDetector, SSCDBackend
    >>> backend = SSCDBackend.from_file("sscd_disc_mixup.torchscript.pt")
    >>> config = AMGConfig.preset("reference", "sscd")
    >>> amg = AntiMemorizationGuidance(MemorizationDetector(backend, bundle_index, config))
    >>> out = pipe("Ann Graham Lotz", amg=amg)  # an AMGStableDiffusionPipeline
    >>> out.amg_trace.final_memorized
    ```
    """

    def __init__(self, detector: MemorizationDetector, config: AMGConfig | None = None):
        self.detector = detector
        self.config = config if config is not None else detector.config

    # ------------------------------------------------------------------ per call
    def begin(self, batch_size: int, num_train_timesteps: int) -> AMGState:
        """Fresh state for a pipeline call over ``batch_size`` samples."""
        return AMGState(
            batch_size=batch_size,
            num_train_timesteps=num_train_timesteps,
            trace=AMGTrace(config=self.config.to_dict()),
            hold=[0] * batch_size,
            caption=[None] * batch_size,
            planned=[None] * batch_size,
            last_detection=[None] * batch_size,
            active=[False] * batch_size,
            latched=[self.config.latch_threshold is None] * batch_size,
            unguided_run=[0] * batch_size,
            pause_left=[0] * batch_size,
        )

    def planned_captions(self, state: AMGState) -> list[str | None]:
        """Per sample, the y_N whose ε the pipeline should add to this step's CFG batch (or None).

        Per-term gating: samples inside a G_dup hold (G_dup will apply whatever σ is). Shared gate:
        samples for which G_dup applied at the previous step (a guess; a wrong guess costs nothing
        but the extra batch rows, a missing one costs a separate UNet pass).
        """
        if not (self.config.enabled and self.config.use_dup):
            return [None] * state.batch_size
        return list(state.planned)

    @torch.no_grad()
    def finish(self, state: AMGState, images: torch.Tensor | None) -> AMGTrace:
        """Score the output images (``(B, 3, H, W)`` in [−1, 1]) and close the trace."""
        if images is not None and self.config.enabled:
            det = self.detector.detect(images)
            state.trace.count_detection(len(images))
            state.trace.final_sigma = _list(det.sigma)
            state.trace.final_neighbour = _list(det.row_ids)
            state.trace.final_memorized = _list(self.detector.memorized(det.sigma))
        return state.trace

    # ------------------------------------------------------------------ helpers
    def _detect(self, state: AMGState, x_t, eps, alpha_bar, to_pixels: ToPixels) -> Detection:
        state.trace.count_detection(len(x_t))
        return self.detector.detect(to_pixels(terms.predict_x0(x_t, eps, alpha_bar)))

    def sigma_and_gradient(
        self,
        x_t: torch.Tensor,
        eps: torch.Tensor,
        alpha_bar: torch.Tensor,
        to_pixels: ToPixels,
        detection: Detection,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """σ and ∇_{x_t}σ through x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ (ε̂ held fixed), ``to_pixels`` and the backend.

        n0 (``detection``'s neighbours) is held constant; the UNet is not differentiated.
        """
        with torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            x0 = terms.predict_x0(x, eps.detach(), alpha_bar)
            sigma = self.detector.similarity(to_pixels(x0), detection)
            (grad,) = torch.autograd.grad(sigma.sum(), x)
        return sigma.detach(), grad.detach()

    def _g_sim(self, state, x_t, eps, alpha_bar, to_pixels, detection, gate, sigma, t, lam):
        """G_sim for the samples where ``gate`` is open (zero elsewhere), and c3 per sample."""
        g_sim = torch.zeros_like(eps)
        c3 = torch.zeros_like(sigma)
        rows = gate.nonzero().flatten()
        if len(rows) == 0:
            return g_sim, c3
        _, grad = self.sigma_and_gradient(
            x_t[rows], eps[rows], alpha_bar, to_pixels, detection.select(rows.cpu())
        )
        state.trace.gradients += 1
        c3_rows = terms.dissimilarity_scale(sigma[rows], t, lam, self.config)
        c3[rows] = c3_rows
        g_sim[rows] = terms.dissimilarity_guidance(grad.to(eps.dtype), alpha_bar, c3_rows.to(eps.dtype))
        return g_sim, c3

    # ------------------------------------------------------------------ text-conditional step
    def _due(self, state: AMGState, step: int) -> list[int]:
        """Batch positions to detect at ``step``: every sample whose gate has opened, and the quiet ones
        every ``detect_every``-th step (see AMGConfig.detect_every)."""
        every = self.config.detect_every
        return [
            i
            for i, (last, active) in enumerate(zip(state.last_detection, state.active, strict=True))
            if every <= 1 or active or last is None or step - last >= every
        ]

    @torch.no_grad()
    def guide(
        self,
        state: AMGState,
        *,
        step: int,
        t: torch.Tensor | int,
        x_t: torch.Tensor,
        alpha_bar: torch.Tensor,
        eps: torch.Tensor,
        to_pixels: ToPixels,
        eps_uncond: torch.Tensor | None = None,
        eps_cond: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        caption_eps: CaptionEps | None = None,
        cached_caption_eps: dict[int, tuple[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The guided noise prediction for one denoising step (``eps`` itself when nothing applied).

        Only the samples due a detection at this step (:meth:`_due`) are decoded, scored and guided;
        the others keep ``eps``.

        Args:
            state (`AMGState`): from :meth:`begin`.
            step (`int`): loop index.
            t (`int` or `torch.Tensor`): scheduler timestep.
            x_t (`torch.Tensor`): current sample (latents for latent models), ``(B, C, H, W)``.
            alpha_bar (`torch.Tensor`): ᾱ_t.
            eps (`torch.Tensor`): the pipeline's ε̂ (after CFG for text-conditional models).
            to_pixels (`Callable`): x̂0 -> images in [−1, 1] (the VAE decoder, or the identity).
            eps_uncond (`torch.Tensor`, *optional*): ε(x_t), needed for G_spe and G_dup.
            eps_cond (`torch.Tensor`, *optional*): ε(x_t, y), needed for G_spe.
            guidance_scale (`float`, *optional*, defaults to 1.0): the CFG scale used for ``eps``; G_spe
                and G_dup need CFG (scale > 1) and are skipped without it.
            caption_eps (`Callable`, *optional*): ε(x_t[rows], y_N) on demand, for G_dup.
            cached_caption_eps (`dict`, *optional*): row -> (caption, ε) computed in the CFG batch.
        """
        cfg = self.config
        if not cfg.enabled:
            return eps
        if cfg.mode == "released_pixel":
            raise ValueError(
                "mode 'released_pixel' is the released pixel-space procedure: run it in AMGDDPMPipeline or "
                "AMGDDIMPipeline (guide_released), not through guide()"
            )
        rows = self._due(state, step)
        if not rows:
            return eps  # every sample is quiet and between its detections
        inputs = StepInputs(
            x_t,
            alpha_bar,
            eps,
            to_pixels,
            eps_uncond,
            eps_cond,
            guidance_scale,
            caption_eps,
            cached_caption_eps or {},
        )
        everyone = len(rows) == state.batch_size
        guided = self._guide_rows(state, rows, step, t, inputs if everyone else inputs.select(rows))
        if guided is None:
            return eps
        if everyone:
            return guided
        out = eps.clone()
        out[torch.tensor(rows, device=eps.device)] = guided
        return out

    def _guide_rows(
        self, state: AMGState, rows: list[int], step: int, t: torch.Tensor | int, inputs: StepInputs
    ) -> torch.Tensor | None:
        """:meth:`guide` for the samples at batch positions ``rows`` (the tensors hold those rows only):
        the guided ε̂ of those rows, or None when no term applied to any of them."""
        cfg = self.config
        x_t, alpha_bar, eps, to_pixels = inputs.x_t, inputs.alpha_bar, inputs.eps, inputs.to_pixels
        eps_uncond, eps_cond, guidance_scale = inputs.eps_uncond, inputs.eps_cond, inputs.guidance_scale
        for r in rows:
            state.last_detection[r] = step
        t_int = int(t)
        lam = self.detector.threshold(t_int, state.num_train_timesteps)
        # x̂0 for σ_t: from ε̂ (the paper), or from ε(x_t, y) when detect_from says so and CFG ran.
        eps_detect = eps_cond if cfg.detect_from == "conditional" and eps_cond is not None else eps
        det = self._detect(state, x_t, eps_detect, alpha_bar, to_pixels)
        sigma = det.sigma.to(x_t.device)
        B = sigma.shape[0]
        zeros = torch.zeros_like(sigma)
        fired = sigma > lam
        text = eps_uncond is not None and eps_cond is not None and guidance_scale > 1
        s0 = float(cfg.s0 if cfg.s0 is not None else guidance_scale)
        sigma_s = sigma - cfg.scale_sigma_offset
        shared = cfg.gate == "shared"

        # G_spe
        spe_on = torch.full_like(fired, bool(text and cfg.use_spe))
        if shared:
            spe_on &= fired
        s1 = torch.where(spe_on, terms.despecification_scale(sigma_s, cfg.c1, s0), zeros) if text else zeros

        # y_N and G_dup
        # y_N is looked up only where G_dup can use it (the lookup may embed x̂0 and search the bundle).
        if text and cfg.use_dup and (not shared or bool(fired.any())):
            found = [c.caption if c.count >= cfg.dup_min_count else None for c in det.captions]
        else:
            found = [None] * B
        if cfg.dup_sticky_caption and not shared:
            for j, r in enumerate(rows):  # the latest y_N found stays until another is found (reference)
                if found[j] is not None:
                    state.caption[r] = found[j]
            y_n = [state.caption[r] for r in rows]
        else:
            y_n = found
        has_yn = torch.tensor([c is not None for c in y_n], device=sigma.device)
        dup_on = has_yn & bool(text and cfg.use_dup)
        hold = [state.hold[r] for r in rows]
        if shared:
            dup_on &= fired
        else:
            trigger = dup_on & fired
            held = dup_on & torch.tensor([h > 0 for h in hold], device=sigma.device)
            dup_on = trigger | held
            # A trigger's step counts as the hold's first: G_dup applies for dup_hold_steps steps in all.
            hold = [
                cfg.dup_hold_steps - 1 if trig else max(h - 1, 0)
                for trig, h in zip(trigger.tolist(), hold, strict=True)
            ]
            for r, h in zip(rows, hold, strict=True):
                state.hold[r] = h
        c2 = terms.reference_c2(s0, s1, cfg.c2_saturation) if cfg.c2_saturation is not None else cfg.c2
        s2 = torch.where(dup_on, terms.caption_dedup_scale(sigma_s, c2, s0, s1), zeros) if text else zeros
        dup_on = dup_on & (s2 > 0)

        guided = eps
        if text and bool((s1 > 0).any()):
            guided = guided + terms.despecification_guidance(eps_cond, eps_uncond, s1.to(eps.dtype))
        if bool(dup_on.any()):
            guided = guided + self._g_dup(state, inputs, s2, dup_on, y_n)
        # What to batch with the next step's CFG pass.
        for j, r in enumerate(rows):
            keep = bool(dup_on[j]) if shared else hold[j] > 0
            state.planned[r] = y_n[j] if keep else None

        # G_sim
        recheck: list[float | None] = [None] * B
        if shared:
            sim_det, sim_sigma, sim_eps = det, sigma, eps_detect
            sim_on = fired & cfg.use_sim
        else:
            changed = (s1 > 0) | dup_on
            sim_det, sim_sigma, sim_eps = det, sigma, guided
            if cfg.recheck_sigma and bool(changed.any()):
                det2 = self._detect(state, x_t, guided, alpha_bar, to_pixels)
                sim_det = det2
                sim_sigma = det2.sigma.to(sigma.device)
                recheck = [
                    float(v) if c else None for v, c in zip(_list(sim_sigma), changed.tolist(), strict=True)
                ]
            sim_on = (sim_sigma > lam) & cfg.use_sim
        g_sim, c3 = self._g_sim(
            state, x_t, sim_eps, alpha_bar, to_pixels, sim_det, sim_on, sim_sigma, t_int, lam
        )
        if bool(sim_on.any()):
            guided = guided + g_sim

        active = fired | dup_on | sim_on  # a G_dup hold only starts on a step that fired
        for j, r in enumerate(rows):
            # Once a sample's gate has opened it stays watched: between detections a guided sample
            # drifts back towards the copy it was steered from (BENCHMARKS.md, "AMG evaluation").
            state.active[r] = state.active[r] or bool(active[j])
        self._record(
            state,
            rows,
            AMGStep(
                step=step,
                timestep=t_int,
                threshold=float(lam),
                sigma=_list(sigma),
                neighbour=_list(det.row_ids),
                fired=_list(fired),
                spe=_list(s1 > 0),
                dup=_list(dup_on),
                sim=_list(sim_on),
                s1=_list(s1),
                s2=_list(torch.where(dup_on, s2, zeros)),
                c3=_list(c3),
                sigma_recheck=recheck,
                dup_caption=[y_n[j] if bool(dup_on[j]) else None for j in range(B)],
            ),
        )
        return None if guided is eps else guided

    def _g_dup(self, state: AMGState, inputs: StepInputs, s2, dup_on, y_n) -> torch.Tensor:
        """G_dup for the rows where ``dup_on``, with ε(x_t, y_N) from the CFG batch where it was
        computed there for the same caption, else from ``inputs.caption_eps``."""
        eps, eps_uncond, caption_eps = inputs.eps, inputs.eps_uncond, inputs.caption_eps
        rows = dup_on.nonzero().flatten().tolist()
        eps_caption = torch.zeros_like(eps)
        cached = inputs.cached_caption_eps
        missing = [r for r in rows if r not in cached or cached[r][0] != y_n[r]]
        for r in rows:
            if r in cached and cached[r][0] == y_n[r]:
                eps_caption[r] = cached[r][1]
        if missing:
            if caption_eps is None:
                raise ValueError("G_dup needs caption_eps to evaluate the UNet on y_N")
            idx = torch.tensor(missing, device=eps.device)
            eps_caption[idx] = caption_eps(idx, [y_n[r] for r in missing]).to(eps.dtype)
            state.trace.caption_passes += 1
        g_dup = terms.caption_dedup_guidance(eps_caption, eps_uncond, s2.to(eps.dtype))
        return torch.where(dup_on.view(-1, *([1] * (eps.ndim - 1))), g_dup, torch.zeros_like(g_dup))

    @staticmethod
    def _record(state: AMGState, rows: list[int], detected: AMGStep) -> None:
        """Append ``detected`` (lists over ``rows``) to the trace as lists over the whole batch; samples
        not detected at this step get σ None, neighbour −1 and no term."""
        if len(rows) == state.batch_size:
            state.trace.steps.append(detected)
            return
        n = state.batch_size
        full = {
            "sigma": [None] * n,
            "neighbour": [-1] * n,
            "fired": [False] * n,
            "spe": [False] * n,
            "dup": [False] * n,
            "sim": [False] * n,
            "s1": [0.0] * n,
            "s2": [0.0] * n,
            "c3": [0.0] * n,
            "sigma_recheck": [None] * n,
            "dup_caption": [None] * n,
        }
        for name, values in full.items():
            for r, v in zip(rows, getattr(detected, name), strict=True):
                values[r] = v
        state.trace.steps.append(
            AMGStep(step=detected.step, timestep=detected.timestep, threshold=detected.threshold, **full)
        )

    # ------------------------------------------------------------------ released pixel procedure
    @torch.no_grad()
    def guide_released(
        self,
        state: AMGState,
        *,
        step: int,
        num_steps: int,
        t: torch.Tensor | int,
        x_t: torch.Tensor,
        alpha_bar: torch.Tensor,
    ) -> torch.Tensor | None:
        """``released_pixel``: the mean shift g of one step (the pipeline adds Σ·g), or None.

        What the released iDDPM code does at each step, for one chain:

        1. Unless every sample is in a pause, σ = −mL2 of x_t against the training set noised to t
           (:meth:`MemorizationDetector.detect_noised`). The released code searches during a pause
           too, but uses the result only for its logs, so a batch that is all paused skips it.
        2. Latch: a sample's guidance arms once σ > ``latch_threshold`` (mL2 < 1.5) at a step outside
           a pause, and stays armed. Until then the chain is the released unguided chain.
        3. An armed sample outside a pause is guided where σ > λ_i, λ on the released step clock
           i = (N − 1 − n)·R/N (``lambda_respaced_steps`` R = 250). Its g = −c3·c3_margin·(σ − λ)·∇_{x_t}σ
           = 1000·80·(thres − mL2)·∇_{x_t}mL2, the gradient taken with the noised nearest row and the
           mL2 denominator held fixed, as the released code takes it.
        4. Pause: after ``pause_after`` consecutive armed steps without guidance, the next
           ``pause_steps`` steps neither check the latch nor guide, nor count.

        Args:
            state (`AMGState`): from :meth:`begin`.
            step (`int`): loop index n, 0-based.
            num_steps (`int`): loop length N.
            t (`int` or `torch.Tensor`): scheduler timestep (recorded).
            x_t (`torch.Tensor`): current sample ``(B, 3, S, S)``, S the index's pixel size.
            alpha_bar (`torch.Tensor`): ᾱ_t, to noise the training set.

        Returns:
            `torch.Tensor` or `None`: g, ``(B, C, H, W)``, zero for samples not guided; None when no
            sample was guided (the pipeline then leaves the step untouched).
        """
        cfg = self.config
        if not cfg.enabled:
            return None
        batch = x_t.shape[0]
        paused = [left > 0 for left in state.pause_left]
        state.pause_left = [max(left - 1, 0) for left in state.pause_left]
        if all(paused):
            return None
        clock = (
            terms.released_step_index(step, num_steps, cfg.lambda_respaced_steps)
            if cfg.lambda_respaced_steps is not None
            else int(t)
        )
        lam = self.detector.threshold(clock, state.num_train_timesteps)
        det = self.detector.detect_noised(x_t, alpha_bar, step)
        state.trace.count_detection(len(x_t))
        sigma = det.sigma.to(x_t.device)
        live = torch.tensor([not p for p in paused], device=sigma.device)
        if cfg.latch_threshold is not None:
            arm = (live & (sigma > cfg.latch_threshold)).tolist()
            state.latched = [was or now for was, now in zip(state.latched, arm, strict=True)]
        latched = torch.tensor(state.latched, device=sigma.device)
        fired = sigma > lam
        on = fired & latched & live & cfg.use_sim

        if cfg.pause_after is not None:
            for i in range(batch):
                if not (live[i] and latched[i]):
                    continue
                if on[i]:
                    state.unguided_run[i] = 0
                    continue
                state.unguided_run[i] += 1
                if state.unguided_run[i] >= cfg.pause_after:
                    state.pause_left[i] = cfg.pause_steps
                    state.unguided_run[i] = 0

        scale = torch.zeros_like(sigma)
        g = None
        if bool(on.any()):
            rows = on.nonzero().flatten()
            with torch.enable_grad():
                x = x_t[rows].detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.detector.noised_similarity(x, det.select(rows)).sum(), x)
            state.trace.gradients += 1
            scale[rows] = terms.dissimilarity_scale(sigma[rows], int(t), lam, cfg)
            g = torch.zeros_like(x_t)
            g[rows] = terms.released_mean_guidance(grad.to(x_t.dtype), scale[rows].to(x_t.dtype))

        none = [None] * batch
        state.trace.steps.append(
            AMGStep(
                step=step,
                timestep=int(t),
                threshold=float(lam),
                sigma=_list(sigma),
                neighbour=_list(det.row_ids),
                fired=_list(fired),
                spe=[False] * batch,
                dup=[False] * batch,
                sim=_list(on),
                s1=[0.0] * batch,
                s2=[0.0] * batch,
                c3=_list(scale),
                sigma_recheck=list(none),
                dup_caption=list(none),
                latched=list(state.latched),
                paused=paused,
            )
        )
        return g
