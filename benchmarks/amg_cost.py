"""AMG's cost: wall time per image over plain sampling on the same pipeline, when nothing is detected
and when guidance fires.

    OMP_NUM_THREADS=1 python benchmarks/amg_cost.py --model-dir models/amg-memorizing --json amg_cost.json

Why: AMG runs a detection (x̂0 → VAE decode → copy descriptor → index search) inside the sampling
loop, and a σ gradient wherever a gate opens. On a prompt the model does not copy, the overhead over
plain sampling must stay at most 1.3× with the default settings (``AMGConfig.detect_every = 5``:
detection every 5th step while no gate is open); where guidance fires, the cost is reported.

What: on the memorizing models (:mod:`demo.memorizing.training`) and the λ_t calibrated for them
(``amg_thresholds.json``, written next to the models by ``jobs/evaluate_amg.py``), two groups each:

* text-to-image model (DDIM ``--steps``, CFG 7.5, ``--batch`` seeds per prompt and call):
  *quiet* = the 10 generic class prompts ("a photo of a sneaker"), which the calibrated λ_t is fitted
  not to fire on; *fires* = the planted captions duplicated ≥ ×64, which the model copies. Modes:
  plain, ``paper`` (defaults: calibrated λ_t, ``detect_every`` 5), ``paper`` with ``detect_every=1``
  (the paper's per-step loop), ``paper_l2`` (the demo's detection: RMS pixel distance to the
  duplicated pictures on the conditional x̂0, its own calibrated λ_t), ``reference`` (the released
  per-term behaviour, calibrated λ_t too). Detection searches the SSCD stand-in's descriptors of the
  training pictures in RAM (``l2``: the planted pictures' pixels), the flat exact search the demo's
  training-set bundle does, with y_N from n0's caption count; ``--bundle`` (and ``--sscd``) detect
  through that bundle instead, with the authors' y_N rule.
* pixel DDPM (DDPM ``--pixel-steps``, class-conditional): *quiet* = the classes without a planted
  picture, *fires* = the classes of the planted pictures duplicated ≥ ×64. Modes: plain, ``paper``
  (nL2, calibrated), ``paper`` with ``detect_every=1``, ``released_pixel`` (its own preset).

Per mode: seconds per image (median of ``--repeats`` runs, modes interleaved within each run), the
ratio to plain in the same runs, that ratio over the *silent* calls alone (the pipeline calls in
which no gate opened for any sample: AMG's cost when nothing is detected), detections per image
(the x̂0 scored per image over the call, its output included; each sample is detected on its own
schedule), σ gradients per call and the
fraction of samples where any gate opened (``AMGTrace.any_fired``; on *quiet* it should be near 0 in
``paper`` mode, while ``reference``'s ungated G_spe counts wherever σ > 0). Also the cost of one
operation on a batch of the text-to-image model: a CFG UNet pass, a VAE decode, a detection (embed +
search, on decoded pixels) and a σ gradient (decode and embed, forward and backward). Prints a
Markdown table for BENCHMARKS.md; ``--json`` writes the raw figures.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from demo.memorizing.evaluation import (
    PIXEL_MODES,
    EvalSettings,
    Models,
    bundle_detectors,
    calibrated_config,
    load_models,
    pixel_detector_parts,
    planted_index,
    sample_pixel,
    sample_text2img,
    text2img_guidance,
    trace_stats,
)
from demo.memorizing.fashion_mnist import CLASS_NAMES
from demo.memorizing.fashion_set import generic_caption
from demo.memorizing.layout import THRESHOLDS
from demo.memorizing.training import TrainingSet
from demo.run import TRAINING_SET_MIN_COUNT
from pipeline.amg import (
    AntiMemorizationGuidance,
    InMemoryNeighbourIndex,
    MemorizationDetector,
    PixelL2Backend,
    SSCDBackend,
)

#: Planted pictures duplicated at least this often make the *fires* group: the models copy them.
FIRES_MIN_COPIES = 64
#: Text-to-image rows: name -> (mode, :func:`calibrated_config` changes); None is plain sampling.
TEXT2IMG_MODES: dict[str, tuple[str, dict[str, Any]] | None] = {
    "plain": None,
    "paper": ("paper", {}),
    "paper_every_step": ("paper", {"detect_every": 1}),
    "paper_l2": ("paper", {"backend": "l2", "detect_from": "conditional"}),  # the demo's detection
    "reference": ("reference", {}),
}
#: Timestep of the per-operation breakdown (mid-trajectory; the cost does not depend on it).
OPS_TIMESTEP = 500

# A (mode, changes) spec -> the guidance to sample with.
MakeAMG = Callable[[str, dict[str, Any]], AntiMemorizationGuidance]
# (prompts or labels, guidance or None) -> one AMG trace (or None) per pipeline call.
Sample = Callable[[list, AntiMemorizationGuidance | None], list]


# ----------------------------------------------------------------------------- what is sampled
def in_memory_detectors(train: TrainingSet):
    """``similarity -> (backend, index, None)`` in RAM, without a bundle. ``sscd``: the SSCD stand-in's
    descriptors of the distinct training pictures, y_N = n0's caption when ``TRAINING_SET_MIN_COUNT``
    training rows carry it (as in the training-set bundle, which also holds the verbatim repeats: same
    vectors, so the same n0 and σ). ``l2``: the planted pictures' pixels (the bundle's duplicated rows)."""
    from demo.memorizing.descriptors import ThumbnailCopyDescriptor

    def sscd():
        backend = SSCDBackend(ThumbnailCopyDescriptor())
        rows = torch.from_numpy(train.row_index())
        captions = [train.captions[i] for i in rows.tolist()]
        index = InMemoryNeighbourIndex.from_images(
            backend, train.tensor()[rows], captions, min_count=TRAINING_SET_MIN_COUNT
        )
        return backend, index, None

    def l2():
        backend = PixelL2Backend(image_size=train.images.shape[1])
        return backend, planted_index(train, backend), None

    made = {"sscd": sscd, "l2": l2}
    return functools.cache(lambda similarity: made[similarity]())


def high_copy_planted(train: TrainingSet) -> list[int]:
    """Positions of the planted pictures duplicated at least ``FIRES_MIN_COPIES`` times."""
    return [p for p in train.planted() if train.copies[p] >= FIRES_MIN_COPIES]


def text2img_groups(train: TrainingSet) -> dict[str, list[str]]:
    """*quiet*: the generic class prompts; *fires*: the planted captions ≥ ×64."""
    return {
        "quiet": [generic_caption(c) for c in range(len(CLASS_NAMES))],
        "fires": [train.captions[p] for p in high_copy_planted(train)],
    }


def pixel_groups(train: TrainingSet) -> dict[str, list[int]]:
    """*quiet*: classes without a planted picture; *fires*: classes of the planted pictures ≥ ×64."""
    planted_classes = {int(train.labels[p]) for p in train.planted()}
    return {
        "quiet": [c for c in range(len(CLASS_NAMES)) if c not in planted_classes],
        "fires": [int(train.labels[p]) for p in high_copy_planted(train)],
    }


def load_thresholds(model_dir: Path) -> dict[str, Any]:
    path = model_dir / THRESHOLDS
    if not path.is_file():
        raise SystemExit(f"{path} is missing: jobs/evaluate_amg.py calibrates λ_t and writes it")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- timing
def trace_counts(traces: list) -> dict[str, float]:
    """Detections per image (x̂0 scored, the output included), σ gradients and caption UNet passes
    per call, and the fraction of samples where any gate opened (the evaluation's trace_stats)."""
    stats = trace_stats(traces)
    return {
        "detections_per_image": stats["detections_per_image"],
        "gradients_per_call": statistics.mean(tr.gradients for tr in traces),
        "caption_passes_per_call": statistics.mean(tr.caption_passes for tr in traces),
        "fired_fraction": stats["gate_opened"],
    }


def time_modes(
    sample: Sample, items: list, amgs: dict[str, AntiMemorizationGuidance | None], batch: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Seconds per image of every mode over ``items``, modes interleaved in each of ``repeats`` runs,
    each item (one pipeline call) timed alone; and, for an AMG mode, the ratio to plain over the calls
    in which no gate opened for any sample (*silent*: the cost when nothing is detected)."""
    for amg in amgs.values():  # warm-up: lazy initialisation and caches stay out of the timings
        sample(items[:1], amg)
    n_images = len(items) * batch
    runs: dict[str, list[list[float]]] = {name: [] for name in amgs}  # per run, seconds per item
    counts: dict[str, dict[str, float]] = {}
    silent: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, amg in amgs.items():
            seconds, traces = [], []
            for item in items:
                started = time.perf_counter()
                traces += sample([item], amg)
                seconds.append(time.perf_counter() - started)
            runs[name].append(seconds)
            if amg is not None:  # the same in every run: the seeds are fixed
                counts[name] = trace_counts(traces)
                silent[name] = [i for i, tr in enumerate(traces) if not any(tr.any_fired())]
    per_item = {name: [statistics.median(col) for col in zip(*rs, strict=True)] for name, rs in runs.items()}
    plain = statistics.median(sum(r) / n_images for r in runs["plain"])
    results = {}
    for name, rs in runs.items():
        per_image = statistics.median(sum(r) / n_images for r in rs)
        quiet_calls = silent.get(name, [])
        results[name] = {
            "seconds_per_image": per_image,
            "ratio": per_image / plain,
            "all": [sum(r) / n_images for r in rs],
            **counts.get(name, {}),
        }
        if name in silent:
            results[name]["silent_calls"] = len(quiet_calls)
            results[name]["silent_ratio"] = (
                sum(per_item[name][i] for i in quiet_calls) / sum(per_item["plain"][i] for i in quiet_calls)
                if quiet_calls
                else None
            )
    return results


def bench_model(
    groups: dict[str, list],
    modes: dict[str, tuple[str, dict[str, Any]] | None],
    make_amg: MakeAMG,
    sample: Sample,
    batch: int,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """:func:`time_modes` for each group, with a fresh guidance per mode."""
    results = {}
    for group, items in groups.items():
        amgs = {name: None if spec is None else make_amg(*spec) for name, spec in modes.items()}
        results[group] = time_modes(sample, items, amgs, batch, repeats)
    return results


def bench_text2img(
    models: Models, detectors, thresholds, settings: EvalSettings, batch: int, repeats: int
) -> dict[str, dict[str, Any]]:
    make_amg = functools.partial(text2img_guidance, thresholds, detectors)

    def sample(prompts: list[str], amg) -> list:
        return sample_text2img(models.text2img, prompts, list(range(batch)), amg, settings)[1]

    return bench_model(text2img_groups(models.train), TEXT2IMG_MODES, make_amg, sample, batch, repeats)


def bench_pixel(
    models: Models, thresholds, settings: EvalSettings, batch: int, repeats: int
) -> dict[str, dict[str, Any]]:
    backend, index = pixel_detector_parts(models.train)

    def make_amg(mode: str, changes: dict[str, Any]) -> AntiMemorizationGuidance:
        config = calibrated_config(thresholds, "pixel", mode, "nl2", **changes)
        return AntiMemorizationGuidance(MemorizationDetector(backend, index, config))

    def sample(labels: list[int], amg) -> list:
        return sample_pixel(models.pixel, labels, list(range(batch)), amg, settings)[1]

    return bench_model(pixel_groups(models.train), PIXEL_MODES, make_amg, sample, batch, repeats)


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


@torch.no_grad()
def operation_ms(models: Models, parts, thresholds, batch: int, runs: int) -> dict[str, float]:
    """Milliseconds per batch of one operation of the text-to-image loop (paper mode's detector)."""
    pipe = models.text2img
    backend, index, captions = parts
    config = calibrated_config(thresholds, "text2img", "paper", "sscd")
    amg = AntiMemorizationGuidance(MemorizationDetector(backend, index, config, captions=captions))
    unet = pipe.unet.config
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen)
    eps = torch.randn(latents.shape, generator=gen)
    cond, uncond = pipe.encode_prompt([text2img_groups(models.train)["fires"][0]] * batch, "cpu", 1, True)
    states = torch.cat([uncond, cond])
    alpha_bar = pipe.scheduler.alphas_cumprod[OPS_TIMESTEP]

    def to_pixels(z: torch.Tensor) -> torch.Tensor:  # as the pipeline decodes x̂0
        return pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]

    pixels = to_pixels(latents)
    detection = amg.detector.detect(pixels)
    ops = {
        "unet_cfg_pass": lambda: pipe.unet(
            torch.cat([latents] * 2), OPS_TIMESTEP, encoder_hidden_states=states
        ),
        "vae_decode": lambda: to_pixels(latents),
        "detection": lambda: amg.detector.detect(pixels),
        "sigma_gradient": lambda: amg.sigma_and_gradient(latents, eps, alpha_bar, to_pixels, detection),
    }
    return {name: median_ms(fn, runs) for name, fn in ops.items()}


# ----------------------------------------------------------------------------- report
def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    return platform.machine()


def command_line() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(["python", *sys.argv])


def markdown(results: dict[str, Any]) -> str:
    s = results["setup"]
    lines = [
        f"Machine: {s['machine']}, {s['cpus']} CPUs, CPU only; torch {s['torch']}, torch threads "
        f"{s['torch_threads']}; 1-minute load average {s['load_average'][0]:.1f} at the start, "
        f"{s['load_average'][1]:.1f} at the end. Date: {s['date']}. Command:",
        "",
        "```",
        s["command"],
        "```",
        "",
        f"Text-to-image: DDIM {s['steps']} steps, CFG {s['guidance_scale']}; pixel: DDPM {s['pixel_steps']} "
        f"steps. {s['batch']} images per call, median of {s['repeats']} interleaved runs, λ_t calibrated "
        f"(`{THRESHOLDS}`). Text-to-image detection: {s['detector']}.",
        "",
        "| Model | Prompts | Mode | s/image | × plain | × plain, silent calls | detections/image "
        "| σ gradients/call | fired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in ("text2img", "pixel"):
        for group, rows in results[model].items():
            n_calls = len(results["setup"]["groups"][model][group])
            for name, r in rows.items():
                amg = "fired_fraction" in r
                silent = (
                    f"{r['silent_ratio']:.2f} ({r['silent_calls']}/{n_calls})"
                    if r.get("silent_ratio") is not None
                    else f"– (0/{n_calls})"
                )
                lines.append(
                    f"| {model} | {group} | {name} | {r['seconds_per_image']:.3f} | {r['ratio']:.2f} | "
                    + (
                        f"{silent} | {r['detections_per_image']:.1f} | {r['gradients_per_call']:.1f} | "
                        f"{100 * r['fired_fraction']:.0f}% |"
                        if amg
                        else "– | – | – | – |"
                    )
                )
    ops = results["ops_ms_per_batch"]
    lines += [
        "",
        f"Text-to-image, one operation on a batch of {s['batch']} (ms): "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in ops.items())
        + ". A detection in the loop is a VAE decode plus a detection.",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default=str(ROOT / "models" / "amg-memorizing"))
    parser.add_argument("--steps", type=int, default=50, help="text-to-image DDIM steps")
    parser.add_argument("--pixel-steps", type=int, default=100, help="pixel model DDPM steps")
    parser.add_argument("--batch", type=int, default=8, help="images (seeds) per pipeline call")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; the median is reported")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--bundle", help="detect through this training-set bundle instead of the in-RAM index"
    )
    parser.add_argument(
        "--sscd", help="with --bundle: the SSCD TorchScript file its descriptors were made with"
    )
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args()
    if args.sscd and not args.bundle:
        parser.error("--sscd goes with --bundle")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    model_dir = Path(args.model_dir)
    models = load_models(model_dir)
    thresholds = load_thresholds(model_dir)
    if args.bundle:
        detectors = bundle_detectors(args.bundle, args.sscd)
        detector = f"through the bundle {args.bundle}"
    else:
        detectors = in_memory_detectors(models.train)
        detector = (
            f"in RAM: the SSCD stand-in over the {len(detectors('sscd')[1])} distinct training pictures, "
            "l2 over the planted ones (flat exact search)"
        )
    settings = EvalSettings(num_inference_steps=args.steps, pixel_inference_steps=args.pixel_steps)
    results: dict[str, Any] = {
        "text2img": bench_text2img(models, detectors, thresholds, settings, args.batch, args.repeats),
        "pixel": bench_pixel(models, thresholds, settings, args.batch, args.repeats),
        "ops_ms_per_batch": operation_ms(
            models, detectors("sscd"), thresholds, args.batch, max(5, 5 * args.repeats)
        ),
    }
    results["setup"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [load_start, os.getloadavg()[0]],
        "device": "cpu",
        "detector": detector,
        "steps": args.steps,
        "pixel_steps": args.pixel_steps,
        "guidance_scale": settings.guidance_scale,
        "batch": args.batch,
        "repeats": args.repeats,
        "groups": {"text2img": text2img_groups(models.train), "pixel": pixel_groups(models.train)},
    }
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
