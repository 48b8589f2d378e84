"""Configuration of Anti-Memorization Guidance: every constant of the method, in one frozen dataclass.

AMG (Chen, Liu, Xu, CVPR 2024, arXiv 2404.00922) adds three terms to the noise prediction when the
sample being generated looks like a training image. The paper gives the equations but not its
constants; the authors' released code fixes them. :class:`AMGConfig` holds both readings:

* ``mode="paper"``: one gate ``1{σ_t > λ_t}`` for all three terms (paper Eq. 10), constant c1, c2, c3
  and a parabolic threshold λ_t (the paper names the shape but gives no formula; ours is in
  :func:`pipeline.amg.terms.parabolic_threshold`).
* ``mode="reference"``: the released code's behaviour: G_spe ungated (its scale is zero when σ ≤ 0),
  G_dup gated on λ_t with a hold of ``dup_hold_steps`` steps after each trigger, σ measured again
  after G_spe/G_dup and G_sim gated on that second score, c2 = (s0 − 1 − s1)/0.3 and
  c3 = 100·(σ − 0.3)·e^((1000 − t)/170), and an exponential threshold
  λ_t = a + b·e^(−rate·t).
* ``mode="released_pixel"`` (``nl2`` only; the pixel pipelines
  :class:`~pipeline.amg.pipelines.AMGDDPMPipeline` and :class:`~pipeline.amg.pipelines.AMGDDIMPipeline`
  with η > 0): the released iDDPM algorithm, which is not the paper's Eq. 8/17 but its own procedure.
  σ = −mL2 compares the current x_t with the training set noised to the same t (fresh noise each
  step), mL2 = ℓ2(x_t, nearest)/(α·mean of the k smallest); guidance arms only once
  σ > ``latch_threshold`` (mL2 < 1.5) and then stays armed; it applies where
  σ > λ_i = −1.95 + 0.45·e^(−0.025·i), i the released 250-step index; it shifts the step's mean after
  x̂0 was clipped, μ ← μ + Σ·g with g = 1000·80·(σ − λ_i)·∇_{x_t}mL2; and after ``pause_after`` = 3
  consecutive unguided steps it pauses for ``pause_steps`` = 10 steps.

λ_t may also be ``threshold="calibrated"``: a per-timestep table (``lambda_timesteps`` →
``lambda_values``, linear in t between entries) measured on plain samples of prompts known not to be
memorized with :func:`pipeline.amg.terms.calibrate_threshold`, saved next to a model with
:func:`save_threshold` and read back with :func:`load_threshold`::

    table = load_threshold(model_dir / "amg_threshold.json")
    config = AMGConfig.preset("paper", "nl2", threshold="calibrated", **table)

Build one with :meth:`AMGConfig.preset` (mode and backend pick the constants; keyword arguments
override any of them). No constant of the method appears as a literal elsewhere in ``pipeline.amg``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import option

MODES = ("paper", "reference", "released_pixel")
BACKENDS = ("sscd", "clip", "nl2", "l2")
#: Which preset table each backend reads: SSCD and CLIP share the cosine-scale constants.
PRESET_FAMILY = {"sscd": "cosine", "clip": "cosine", "nl2": "nl2", "l2": "l2"}
THRESHOLDS = ("parabolic", "exponential", "constant", "calibrated")
#: Noise predictions x̂0 may be taken from for σ_t (``AMGConfig.detect_from``).
DETECT_FROM = ("guided", "conditional")
#: ``format`` tag and version of a λ_t table file (:func:`save_threshold`).
THRESHOLD_FILE_FORMAT = "amg_threshold_table"
THRESHOLD_FILE_VERSION = 1


@dataclass(frozen=True)
class AMGConfig:
    r"""All settings of Anti-Memorization Guidance.

    Notation follows the paper: σ_t is the similarity between the predicted clean sample x̂0 and its
    nearest training neighbour n0 (higher = more similar; for the ``nl2`` backend σ = −nL2), λ_t the
    threshold, s0 the classifier-free guidance scale, t the scheduler's (training) timestep.

    Args:
        mode (`str`, *optional*, defaults to `"paper"`):
            ``"paper"`` (one shared gate), ``"reference"`` (the authors' per-term gates) or
            ``"released_pixel"`` (the released iDDPM procedure, ``nl2`` and the pixel pipelines only; see
            the module docstring and the ``latch_threshold`` … ``noised_max_rows`` fields).
        backend (`str`, *optional*, defaults to `"sscd"`):
            Similarity used for σ_t: ``"sscd"`` (dot product of normalised SSCD descriptors),
            ``"clip"`` (cosine of open_clip image embeddings), ``"nl2"`` (Carlini's normalised
            L2 in pixel space, σ = −nL2) or ``"l2"`` (the plain RMS pixel distance to n0, σ = −ℓ2;
            paper mode only). Only used to pick presets and to check the detector.
        enabled (`bool`, *optional*, defaults to `True`):
            False runs the AMG pipelines' loop with no detection and no guidance (plain sampling).
        use_spe (`bool`, *optional*, defaults to `True`):
            Apply despecification guidance G_spe (ablation switch).
        use_dup (`bool`, *optional*, defaults to `True`):
            Apply caption-deduplication guidance G_dup (ablation switch).
        use_sim (`bool`, *optional*, defaults to `True`):
            Apply dissimilarity guidance G_sim (ablation switch).
        s0 (`float`, *optional*):
            CFG scale the bounds of s1 and s2 refer to; None uses the pipeline's ``guidance_scale``
            (7.5 in the authors' runs).
        c1 (`float`, *optional*, defaults to 13.0):
            s1 = clip(c1·σ_t, 0, s0 − 1) (paper Eq. 13).
        c2 (`float`, *optional*, defaults to 13.0):
            s2 = clip(c2·σ_t, 0, s0 − s1 − 1) (paper Eq. 15); ignored when ``c2_saturation`` is set.
        c2_saturation (`float`, *optional*):
            When set, c2 = (s0 − 1 − s1)/c2_saturation, so s2 reaches its bound at σ = c2_saturation
            (reference: 0.3).
        c3 (`float`, *optional*, defaults to 100.0):
            G_sim = c3·√(1 − ᾱ_t)·∇σ_t (paper Eq. 17); with the options below c3 becomes
            c3·(σ − c3_sigma_offset)·e^((c3_time_origin − t)/c3_time_scale), times
            c3_margin·(σ − λ_t) when that is set.
        c3_sigma_offset (`float`, *optional*):
            Reference: 0.3 (c3 grows with σ above 0.3). None drops the factor.
        c3_time_scale (`float`, *optional*):
            Reference: 170 (c3 grows as t → 0). None drops the factor.
        c3_time_origin (`float`, *optional*, defaults to 1000.0):
            t at which the time factor equals 1.
        scale_sigma_offset (`float`, *optional*, defaults to 0.0):
            s1, s2 use σ − offset instead of σ. 0 is the paper; a positive σ scale is needed for
            G_spe/G_dup to act at all, so with ``nl2`` (σ = −nL2 < 0) they stay off unless this is set.
        threshold (`str`, *optional*, defaults to `"exponential"`):
            Shape of λ_t: ``"parabolic"``, ``"exponential"``, ``"constant"`` or ``"calibrated"`` (the
            table ``lambda_timesteps`` → ``lambda_values``, linear in t between entries, held at the end
            values outside them).
        lambda_start (`float`, *optional*, defaults to 0.3):
            Parabolic: λ at t = T (start of sampling). Constant: the value.
        lambda_end (`float`, *optional*, defaults to 0.4):
            Parabolic: λ at t = 0 (end of sampling).
        lambda_a (`float`, *optional*, defaults to 0.3):
            Exponential λ_t = a + b·e^(−rate·t): a.
        lambda_b (`float`, *optional*, defaults to 0.1):
            Exponential: b.
        lambda_rate (`float`, *optional*, defaults to 0.005):
            Exponential: rate, per timestep (per released step when ``lambda_respaced_steps`` is set).
        lambda_timesteps (`tuple[int, ...]`, *optional*):
            Calibrated: the timesteps of the table, strictly increasing (lists are accepted and stored
            as tuples).
        lambda_values (`tuple[float, ...]`, *optional*):
            Calibrated: λ at each of ``lambda_timesteps``, on the σ scale of the backend (higher = more
            similar; −nL2 for ``nl2``).
        lambda_respaced_steps (`int`, *optional*):
            When set, λ's clock is not the timestep t but the released iDDPM step index
            i = (N − 1 − n)·R/N at loop step n of N, R this value (released: 250): i counts down to 0 at
            the last step and equals the remaining step count exactly when N = R. The released schedule
            is a curve over the respaced trajectory, so it is mapped by the fraction of the trajectory
            left, not by the noise level of a different β schedule. Used by ``released_pixel``.
        latch_threshold (`float`, *optional*):
            ``released_pixel``: guidance arms for a sample once its σ exceeds this at some step (while
            the chain is still unguided) and stays armed for the rest of the call; None arms it from the
            start. Released: mL2 < 1.5, i.e. −1.5.
        c3_margin (`float`, *optional*):
            When set, G_sim's scale (``released_pixel``: the mean shift's) is c3·c3_margin·max(σ − λ_t, 0):
            zero at the gate, growing with how far inside it the sample is (released pixel code:
            classifier_scale 1000 × 80 × (thres − mL2); the released SD code's c3·(σ − 0.3) is the same
            idea against λ_t's floor). None uses c3 alone (paper Eq. 17).
        pause_after (`int`, *optional*):
            ``released_pixel``: after this many consecutive armed steps without guidance, detection and
            guidance pause (released: 3); None never pauses.
        pause_steps (`int`, *optional*, defaults to 10):
            ``released_pixel``: length of such a pause, in sampling steps. The released script's counter is
            shared by its paired unguided chain, which halves the pause to 5 steps of the guided chain;
            10 is the written constant.
        noise_seed (`int`, *optional*, defaults to 0):
            ``released_pixel``: the training set is noised at loop step n with standard normal noise from
            ``numpy.random.default_rng([noise_seed, n])``: fresh at each step, the same for every sample
            and every call, so results do not depend on batching and are reproducible.
        noised_max_rows (`int`, *optional*, defaults to 50000):
            ``released_pixel`` compares x_t with every training row (noised) at every step; an index with
            more rows is refused (CIFAR-10's 50k fits).
        gate (`str`, *optional*, defaults to `"per_term"`):
            ``"shared"``: the paper's single indicator for all terms; ``"per_term"``: the reference's.
        recheck_sigma (`bool`, *optional*, defaults to `True`):
            Per-term gating only: after G_spe/G_dup changed ε̂, measure σ again (new x̂0, new search)
            and gate and scale G_sim on that second score, as the released code does.
        dup_hold_steps (`int`, *optional*, defaults to 10):
            A G_dup trigger applies G_dup for this many steps in all, its own step included
            (reference: 10).
        dup_sticky_caption (`bool`, *optional*, defaults to `True`):
            Keep the latest duplicated caption y_N found through the steps where none is found
            (reference).
        dup_min_count (`int`, *optional*, defaults to 2):
            y_N is used only when n0's caption occurs at least this often in the training set (on top
            of the index's own table, which returns no caption below its minimum count).
        nl2_k (`int`, *optional*, defaults to 50):
            Carlini's nL2: size of the neighbour set the distance is normalised by (capped at the
            index size).
        nl2_alpha (`float`, *optional*, defaults to 0.5):
            Carlini's nL2: α in nL2 = ℓ2(x, n0)/(α·mean ℓ2(x, S)).
        memorized_threshold (`float`, *optional*, defaults to 0.5):
            σ above which a final image counts as memorized (SSCD 0.5; nl2: −1.4, i.e. nL2 < 1.4).
        detect_every (`int`, *optional*, defaults to 5):
            A cost option, not in the paper, applied to each sample alone: until a gated term (shared
            gate, G_dup or G_sim) first applies to a sample, detect it only every n-th step and leave
            its ε̂ untouched on the steps in between (no G_spe either). From then on it is detected at
            every step to the end (between detections a guided sample drifts back towards its copy);
            its batch neighbours keep their own schedule, so what AMG does to a sample does not depend
            on its batch neighbours.
            Detecting x̂0 costs a VAE decode, about a UNet pass, so detection at every step doubles the
            time of a prompt nothing is detected for; every 5th step brings it under 1.3× (every 4th
            step measured 1.28–1.32×; BENCHMARKS.md "AMG cost"). 1 reproduces the paper's loop; the
            ``reference`` and ``released_pixel`` presets use 1, as the released code does.
        detect_from (`str`, *optional*, defaults to `"guided"`):
            Which noise prediction x̂0 is taken from for σ_t (and for G_sim's gradient under the shared
            gate): ``"guided"``, the pipeline's ε̂ after classifier-free guidance, as the paper and the
            released code do; or ``"conditional"``, ε(x_t, y) alone, the model's own estimate of the
            clean image given the prompt. Early in sampling the guided x̂0 extrapolates s0 times past
            the conditional one and is mostly noise, so a copy shows up in the conditional x̂0 many steps
            sooner (BENCHMARKS.md, "AMG evaluation"). Without CFG both are the same.
    """

    mode: str = option(
        "paper", "paper (one gate), reference (the authors' released behaviour) or released_pixel"
    )
    backend: str = option("sscd", "similarity for σ_t: sscd, clip, nl2 or l2")
    enabled: bool = option(True, "False: plain sampling through the AMG loop")
    use_spe: bool = option(True, "apply G_spe (despecification)")
    use_dup: bool = option(True, "apply G_dup (caption deduplication)")
    use_sim: bool = option(True, "apply G_sim (dissimilarity)")
    s0: float | None = option(None, "CFG scale for the s1/s2 bounds (None: the pipeline's guidance_scale)")
    c1: float = option(13.0, "s1 = clip(c1·σ, 0, s0−1)")
    c2: float = option(13.0, "s2 = clip(c2·σ, 0, s0−s1−1)")
    c2_saturation: float | None = option(None, "if set, c2 = (s0−1−s1)/c2_saturation")
    c3: float = option(100.0, "G_sim = c3·√(1−ᾱ_t)·∇σ")
    c3_sigma_offset: float | None = option(None, "if set, c3 ← c3·(σ − offset)")
    c3_time_scale: float | None = option(None, "if set, c3 ← c3·exp((origin − t)/scale)")
    c3_time_origin: float = option(1000.0, "t where the c3 time factor is 1")
    scale_sigma_offset: float = option(0.0, "s1, s2 use σ − offset")
    threshold: str = option("exponential", "λ_t shape: parabolic, exponential or constant")
    lambda_start: float = option(0.3, "parabolic: λ at t=T; constant: λ")
    lambda_end: float = option(0.4, "parabolic: λ at t=0")
    lambda_a: float = option(0.3, "exponential λ = a + b·exp(−rate·t): a")
    lambda_b: float = option(0.1, "exponential: b")
    lambda_rate: float = option(0.005, "exponential: rate per timestep")
    lambda_timesteps: tuple[int, ...] | None = option(None, "calibrated: timesteps of the λ table")
    lambda_values: tuple[float, ...] | None = option(None, "calibrated: λ at each table timestep")
    lambda_respaced_steps: int | None = option(
        None, "if set, λ's clock is the released step index i = (N−1−n)·R/N instead of t"
    )
    latch_threshold: float | None = option(None, "released_pixel: arm guidance once σ exceeds this")
    c3_margin: float | None = option(
        None, "G_sim scale c3·c3_margin·(σ − λ_t) instead of c3 (released_pixel: 80)"
    )
    pause_after: int | None = option(None, "released_pixel: pause after this many unguided armed steps")
    pause_steps: int = option(10, "released_pixel: length of a pause, in steps")
    noise_seed: int = option(0, "released_pixel: seed of the noise that noises the training set")
    noised_max_rows: int = option(50_000, "released_pixel: most training rows compared at every step")
    gate: str = option("per_term", "shared (paper) or per_term (reference)")
    recheck_sigma: bool = option(True, "per_term: re-measure σ after G_spe/G_dup before G_sim")
    dup_hold_steps: int = option(10, "steps G_dup stays on after a trigger")
    dup_sticky_caption: bool = option(True, "keep the latest y_N found through steps without one")
    dup_min_count: int = option(2, "minimum duplicate count of n0's caption for G_dup")
    nl2_k: int = option(50, "nL2 neighbour-set size k")
    nl2_alpha: float = option(0.5, "nL2 α")
    memorized_threshold: float = option(0.5, "σ above which an image counts as memorized")
    detect_every: int = option(
        5, "per sample, until a gated term first applies, detect only every n-th step (1: every step)"
    )
    detect_from: str = option("guided", "x̂0 for σ_t from the guided ε̂ (paper) or the conditional ε(x_t, y)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"AMGConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"AMGConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.mode == "released_pixel" and self.backend != "nl2":
            raise ValueError("AMGConfig mode 'released_pixel' compares pixels: it needs backend 'nl2'")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"AMGConfig.threshold must be one of {THRESHOLDS}, got {self.threshold!r}")
        if (
            self.threshold == "calibrated"
            or self.lambda_timesteps is not None
            or self.lambda_values is not None
        ):
            # YAML and JSON give lists; the config is frozen and hashable, so the table is kept as tuples.
            timesteps, values = check_threshold_table(self.lambda_timesteps, self.lambda_values)
            object.__setattr__(self, "lambda_timesteps", timesteps)
            object.__setattr__(self, "lambda_values", values)
        if self.lambda_respaced_steps is not None and self.lambda_respaced_steps < 1:
            raise ValueError("AMGConfig.lambda_respaced_steps must be at least 1")
        if self.pause_after is not None and self.pause_after < 1:
            raise ValueError("AMGConfig.pause_after must be at least 1 (or None: never pause)")
        if self.pause_steps < 0 or self.noised_max_rows < 1:
            raise ValueError("AMGConfig: pause_steps >= 0 and noised_max_rows >= 1")
        if self.gate not in ("shared", "per_term"):
            raise ValueError(f"AMGConfig.gate must be 'shared' or 'per_term', got {self.gate!r}")
        if self.s0 is not None and self.s0 < 1:
            raise ValueError(f"AMGConfig.s0 must be at least 1, got {self.s0}")
        if self.c2_saturation is not None and self.c2_saturation <= 0:
            raise ValueError("AMGConfig.c2_saturation must be positive")
        if self.c3_margin is not None and self.c3_margin <= 0:
            raise ValueError("AMGConfig.c3_margin must be positive (or None: a constant c3)")
        if self.c3_time_scale is not None and self.c3_time_scale <= 0:
            raise ValueError("AMGConfig.c3_time_scale must be positive")
        if self.detect_every < 1:
            raise ValueError("AMGConfig.detect_every must be at least 1")
        if self.detect_from not in DETECT_FROM:
            raise ValueError(f"AMGConfig.detect_from must be one of {DETECT_FROM}, got {self.detect_from!r}")
        if self.dup_hold_steps < 0 or self.dup_min_count < 1 or self.nl2_k < 1 or self.nl2_alpha <= 0:
            raise ValueError("AMGConfig: dup_hold_steps >= 0, dup_min_count >= 1, nl2_k >= 1, nl2_alpha > 0")

    @classmethod
    def preset(cls, mode: str = "paper", backend: str = "sscd", **overrides: Any) -> AMGConfig:
        """The constants of ``mode`` for ``backend``, with ``overrides`` applied on top.

        Args:
            mode (`str`, *optional*, defaults to `"paper"`): ``"paper"``, ``"reference"`` or
                ``"released_pixel"`` (``nl2`` only).
            backend (`str`, *optional*, defaults to `"sscd"`): ``"sscd"``, ``"clip"``, ``"nl2"`` or ``"l2"``.
            overrides: any field of :class:`AMGConfig`.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        key = (mode, PRESET_FAMILY[backend])
        if key not in PRESETS:
            defined = sorted(b for b, family in PRESET_FAMILY.items() if (mode, family) in PRESETS)
            raise ValueError(
                f"mode {mode!r} has no preset for backend {backend!r} (defined for {', '.join(defined)})"
            )
        values = dict(PRESETS[key])
        values.update(mode=mode, backend=backend)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown AMGConfig field(s): {', '.join(sorted(unknown))}")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> AMGConfig:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view, for summaries and manifests (JSON-serialisable; tables are tuples)."""
        return dataclasses.asdict(self)


# Carlini's nL2 threshold schedule in the released iDDPM code is written over a 250-step respacing
# of 4000 diffusion steps (1.95 − 0.45·e^(−0.025·i), i = 0…249). With a 1000-step scheduler,
# i = t·250/1000, so the rate per timestep is 0.025/4. On the σ = −nL2 scale that is
# λ_t = −1.95 + 0.45·e^(−0.00625·t).
_NL2_RATE = 0.025 * 250 / 1000

PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # Cosine-scale backends (SSCD; CLIP uses the same constants and must be calibrated for its scale).
    ("reference", "cosine"): {
        "gate": "per_term",
        "recheck_sigma": True,
        "c1": 13.0,
        "c2_saturation": 0.3,
        "c3": 100.0,
        "c3_sigma_offset": 0.3,
        "c3_time_scale": 170.0,
        "c3_time_origin": 1000.0,
        "threshold": "exponential",
        "lambda_a": 0.3,
        "lambda_b": 0.1,
        "lambda_rate": 0.005,
        "dup_hold_steps": 10,
        "dup_sticky_caption": True,
        "memorized_threshold": 0.5,
        "detect_every": 1,
    },
    # Paper mode: the same endpoints as the reference curve (0.30 at t = T, 0.40 at t = 0) joined by a
    # parabola with its vertex at t = T; c1 as in the code; c2 = c1; a constant c3 (see BENCHMARKS.md).
    ("paper", "cosine"): {
        "gate": "shared",
        "recheck_sigma": False,
        "c1": 13.0,
        "c2": 13.0,
        "c2_saturation": None,
        "c3": 300.0,
        "c3_sigma_offset": None,
        "c3_time_scale": None,
        "threshold": "parabolic",
        "lambda_start": 0.3,
        "lambda_end": 0.4,
        "dup_hold_steps": 0,
        "dup_sticky_caption": False,
        "memorized_threshold": 0.5,
    },
    # Unconditional / pixel-level (iDDPM code): G_sim only in practice (σ = −nL2 < 0 zeroes s1, s2),
    # constant c3 (the code's classifier_scale 1000), threshold −1.95 + 0.45·e^(−rate·t).
    ("reference", "nl2"): {
        "gate": "per_term",
        "recheck_sigma": True,
        "c1": 13.0,
        "c2_saturation": 0.3,
        "c3": 1000.0,
        "c3_sigma_offset": None,
        "c3_time_scale": None,
        "threshold": "exponential",
        "lambda_a": -1.95,
        "lambda_b": 0.45,
        "lambda_rate": _NL2_RATE,
        "dup_hold_steps": 10,
        "dup_sticky_caption": True,
        "memorized_threshold": -1.4,
        "detect_every": 1,
    },
    # The released iDDPM procedure (AMG-iddpm gaussian_diffusion.py, image_sample_guided.py): σ = −mL2 of
    # x_t against the noised training set (k = 50, α = 0.5), latch at mL2 < 1.5, guidance where
    # mL2 < 1.95 − 0.45·e^(−0.025·i) over the 250-step respaced index i, mean shift Σ·g with
    # g = classifier_scale·(thres − mL2)·80·∇mL2 (classifier_scale 1000), pause 10 steps after 3
    # unguided ones. G_spe and G_dup do not exist there (no text); the gate fields are unused.
    ("released_pixel", "nl2"): {
        "gate": "per_term",
        "recheck_sigma": False,
        "use_spe": False,
        "use_dup": False,
        "c3": 1000.0,
        "c3_margin": 80.0,
        "c3_sigma_offset": None,
        "c3_time_scale": None,
        "threshold": "exponential",
        "lambda_a": -1.95,
        "lambda_b": 0.45,
        "lambda_rate": 0.025,
        "lambda_respaced_steps": 250,
        "latch_threshold": -1.5,
        "pause_after": 3,
        "pause_steps": 10,
        "nl2_k": 50,
        "nl2_alpha": 0.5,
        "dup_hold_steps": 0,
        "dup_sticky_caption": False,
        "memorized_threshold": -1.4,
        "detect_every": 1,
    },
    # Paper mode, nL2: a parabola through the reference curve's endpoints (−1.95 at t = T, −1.5 at t = 0).
    ("paper", "nl2"): {
        "gate": "shared",
        "recheck_sigma": False,
        "c1": 13.0,
        "c2": 13.0,
        "c2_saturation": None,
        "c3": 1000.0,
        "c3_sigma_offset": None,
        "c3_time_scale": None,
        "threshold": "parabolic",
        "lambda_start": -1.95,
        "lambda_end": -1.5,
        "dup_hold_steps": 0,
        "dup_sticky_caption": False,
        "memorized_threshold": -1.4,
    },
    # Paper mode, plain pixel distance (σ = −RMS in [0, 1] units; not in the paper, PixelL2Backend). No
    # published λ: the constant −0.1 is a placeholder to be replaced by a calibrated table. σ + 1 = 1 − RMS
    # gives s1 and s2 a positive scale, so G_spe and G_dup act as with a cosine. G_sim's scale grows with
    # the margin σ − λ_t, as in both released codes: c3 is the scale at a margin of 0.1 (about where a
    # copy sits inside a calibrated gate). c3 = 1250: of 750 / 1000 / 1250 / 1500 / 2000 on the
    # Fashion-MNIST text-to-image model's tuning seeds (200000–200063, never the evaluation's;
    # benchmarks/amg_tune.py), the smallest that left no copy of a ×64/×256 caption (27, 1, 0, 0, 0 of
    # 256) with their class accuracy at least 90% (97.7, 97.7, 97.3, 97.3, 98.0%). A constant c3 (the
    # paper's Eq. 17) needed 250 to leave none of 128, and kept 90.6% there (89.1% when evaluated).
    ("paper", "l2"): {
        "gate": "shared",
        "recheck_sigma": False,
        "c1": 13.0,
        "c2": 13.0,
        "c2_saturation": None,
        "c3": 1250.0,
        "c3_margin": 10.0,
        "c3_sigma_offset": None,
        "c3_time_scale": None,
        "scale_sigma_offset": -1.0,
        "threshold": "constant",
        "lambda_start": -0.1,
        "dup_hold_steps": 0,
        "dup_sticky_caption": False,
        "memorized_threshold": -0.05,
    },
}


# ----------------------------------------------------------------------------- calibrated λ_t tables
def check_threshold_table(
    timesteps: Sequence[int] | None, values: Sequence[float] | None
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A valid λ_t table as tuples: both given, as long as each other, at least one entry, timesteps
    strictly increasing integers, values finite. Raises ``ValueError`` naming what is wrong."""
    if timesteps is None or values is None:
        raise ValueError("a calibrated λ_t needs both lambda_timesteps and lambda_values")
    try:
        times = tuple(int(t) for t in timesteps)
        lams = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"λ_t table: timesteps must be integers and values numbers ({exc})") from None
    if any(t != float(u) for t, u in zip(times, timesteps, strict=False)):
        raise ValueError("λ_t table: lambda_timesteps must be whole numbers")
    if len(times) != len(lams):
        raise ValueError(f"λ_t table: {len(times)} timesteps but {len(lams)} values")
    if not times:
        raise ValueError("λ_t table: empty")
    if any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError("λ_t table: lambda_timesteps must be strictly increasing")
    if not all(math.isfinite(v) for v in lams):
        raise ValueError("λ_t table: lambda_values must be finite")
    return times, lams


def save_threshold(
    path: str | Path,
    lambda_timesteps: Sequence[int],
    lambda_values: Sequence[float],
    **metadata: Any,
) -> Path:
    """Write a calibrated λ_t table as JSON (atomically), e.g. next to the model it was measured on.

    ``metadata`` (JSON-serialisable: the percentile, the smoothing, the backend, the seeds and prompts
    used) is stored alongside and returned by :func:`load_threshold` under ``"metadata"`` only when asked.
    """
    from pipeline.core.storage import atomic_write_json  # pyarrow: only when a table is written

    timesteps, values = check_threshold_table(lambda_timesteps, lambda_values)
    path = Path(path)
    atomic_write_json(
        path,
        {
            "format": THRESHOLD_FILE_FORMAT,
            "version": THRESHOLD_FILE_VERSION,
            "lambda_timesteps": list(timesteps),
            "lambda_values": list(values),
            "metadata": dict(metadata),
        },
    )
    return path


def load_threshold(path: str | Path, with_metadata: bool = False) -> dict[str, Any]:
    """Read a table written by :func:`save_threshold`: ``{"lambda_timesteps": (...), "lambda_values":
    (...)}``, ready for ``AMGConfig.preset(..., threshold="calibrated", **table)``; with
    ``with_metadata=True`` also ``"metadata"``. Raises ``ValueError`` for a file that is not such a table."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != THRESHOLD_FILE_FORMAT:
        raise ValueError(f"{path} is not an AMG λ_t table (format {THRESHOLD_FILE_FORMAT!r})")
    if data.get("version") != THRESHOLD_FILE_VERSION:
        raise ValueError(
            f"{path}: λ_t table version {data.get('version')!r}, this code reads {THRESHOLD_FILE_VERSION}"
        )
    try:
        timesteps, values = check_threshold_table(data.get("lambda_timesteps"), data.get("lambda_values"))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    table: dict[str, Any] = {"lambda_timesteps": timesteps, "lambda_values": values}
    if with_metadata:
        table["metadata"] = data.get("metadata", {})
    return table
