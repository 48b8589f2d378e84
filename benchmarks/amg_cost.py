"""AMG's cost: wall time per image over plain sampling on the same pipeline, detected vs not detected.

    python benchmarks/amg_cost.py --model-dir models/amg-memorizing --json /tmp/amg_cost.json

On the memorizing text-to-image model (and the unconditional one) it times, per image, plain
sampling and AMG ``paper`` / ``reference`` on two groups of prompts:

* *fires*: the duplicated training captions, where the model copies and AMG's gates open;
* *quiet*: captions the model never saw, with thresholds for which no λ-gate opens, so only the
  per-step detection (x̂0 → VAE decode → descriptor → index search) is paid. In ``reference`` mode G_spe
  has no λ-gate and still changes ε̂ (it scales with σ > 0), so the released behaviour also measures
  σ a second time per step even here.

``paper_detect_every_4`` is paper mode with ``AMGConfig.detect_every = 4`` (detection every 4th step
while nothing is detected, every step once a gate opens).

Runs are interleaved (plain, paper, reference, plain, ...) and the median of ``--repeats`` is
reported, with the number of UNet passes, detections and gradients per image from the AMG trace,
and a per-operation breakdown (one CFG UNet pass, one detection, one σ gradient). Prints a Markdown
table (for BENCHMARKS.md); ``--json`` writes the raw figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from demo.memorizing.evaluation import _amg, load_models, training_indexes
from pipeline.amg.guidance import AntiMemorizationGuidance

NOVEL_PROMPTS = [
    "A sailing boat on a calm lake at sunrise",
    "A bowl of ramen with chopsticks",
    "Snow-covered pine trees under a grey sky",
    "A vintage typewriter on a desk",
]
QUIET = {"paper": {"lambda_start": 2.0, "lambda_end": 2.0}, "reference": {"lambda_a": 2.0, "lambda_b": 0.0}}


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default=str(ROOT / "models" / "amg-memorizing"))
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe, uncond, train = load_models(args.model_dir)
    indexes = training_indexes(train)
    dup_prompts = [train.captions[i] for i in train.duplicated()]

    def run(prompts, amg):
        traces = []
        for p in prompts:
            gens = [torch.Generator().manual_seed(s) for s in range(args.batch)]
            res = pipe(
                [p] * args.batch, num_inference_steps=args.steps, generator=gens, output_type="pt", amg=amg
            )
            traces.append(getattr(res, "amg_trace", None))
        return traces

    groups = {"fires": (dup_prompts, {}), "quiet": (NOVEL_PROMPTS, QUIET)}
    results: dict = {"text2img": {}, "uncond": {}}
    for group, (prompts, overrides) in groups.items():
        n_images = len(prompts) * args.batch
        amgs: dict[str, AntiMemorizationGuidance | None] = {"plain": None}
        for mode in ("paper", "reference"):
            amgs[mode] = _amg(mode, "sscd", indexes, overrides)
        amgs["paper_detect_every_4"] = _amg("paper", "sscd", indexes, overrides, detect_every=4)
        times: dict[str, list[float]] = {k: [] for k in amgs}
        counts: dict[str, dict] = {}
        run(prompts[:1], amgs["paper"])  # warm-up
        for _ in range(args.repeats):
            for name, amg in amgs.items():
                t0 = time.perf_counter()
                traces = run(prompts, amg)
                times[name].append((time.perf_counter() - t0) / n_images)
                if amg is not None:
                    counts[name] = {
                        "detections_per_image": sum(t.detections for t in traces) / n_images,
                        "gradients_per_call": sum(t.gradients for t in traces) / len(traces),
                        "caption_passes_per_call": sum(t.caption_passes for t in traces) / len(traces),
                        "fired_fraction": sum(sum(t.any_fired()) for t in traces) / n_images,
                        "final_memorized": sum(sum(t.final_memorized) for t in traces) / n_images,
                    }
        plain = statistics.median(times["plain"])
        results["text2img"][group] = {
            name: {
                "seconds_per_image": statistics.median(ts),
                "ratio": statistics.median(ts) / plain,
                "all": ts,
                **counts.get(name, {}),
            }
            for name, ts in times.items()
        }

    # Unconditional model, nL2 backend: fires (the model copies) vs quiet (threshold nothing reaches).
    for group, overrides in (
        ("fires", {}),
        (
            "quiet",
            {
                "paper": {"lambda_start": 0.0, "lambda_end": 0.0},
                "reference": {"lambda_a": 0.0, "lambda_b": 0.0},
            },
        ),
    ):
        amgs = {
            "plain": None,
            "paper": _amg("paper", "nl2", indexes, overrides),
            "reference": _amg("reference", "nl2", indexes, overrides),
        }
        times = {k: [] for k in amgs}
        n = 4 * args.batch
        for _ in range(args.repeats):
            for name, amg in amgs.items():
                t0 = time.perf_counter()
                uncond(
                    batch_size=n,
                    generator=[torch.Generator().manual_seed(s) for s in range(n)],
                    num_inference_steps=args.steps,
                    output_type="pt",
                    amg=amg,
                )
                times[name].append((time.perf_counter() - t0) / n)
        plain = statistics.median(times["plain"])
        results["uncond"][group] = {
            name: {
                "seconds_per_image": statistics.median(ts),
                "ratio": statistics.median(ts) / plain,
                "all": ts,
            }
            for name, ts in times.items()
        }

    # Per-operation breakdown on the text-to-image model, batch of args.batch.
    amg = _amg("paper", "sscd", indexes, {})
    latents = torch.randn(args.batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = pipe.encode_prompt([dup_prompts[0]] * args.batch, "cpu", 1, True)
    states = torch.cat([states[1], states[0]])
    t = torch.tensor(500)
    ab = pipe.scheduler.alphas_cumprod[500]

    def to_pixels(z):
        return pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]

    with torch.no_grad():
        ops = {
            "unet_cfg_pass": lambda: pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=states),
            "vae_decode": lambda: to_pixels(latents),
            "detection": lambda: amg.detector.detect(to_pixels(latents)),
        }
        det = amg.detector.detect(to_pixels(latents))
    ops["sigma_gradient"] = lambda: amg.sigma_and_gradient(latents, latents, ab, to_pixels, det)
    results["ops_ms_per_batch"] = {
        k: 1000 * statistics.median(_time(f, 5 * args.repeats)) for k, f in ops.items()
    }

    results["setup"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "device": "cpu",
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def markdown(results: dict) -> str:
    s = results["setup"]
    lines = [
        f"CPU only ({s['cpus']} cores, {s['torch_threads']} torch threads, load average "
        f"{s['load_average'][0]:.1f} at the start), DDIM {s['steps']} steps, {s['batch']} images per call, "
        f"median of {s['repeats']} interleaved runs.",
        "",
        "| Model | Prompts | Mode | s/image | × plain | detections/image | fired |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in ("text2img", "uncond"):
        for group, rows in results[model].items():
            for name, r in rows.items():
                det = f"{r['detections_per_image']:.0f}" if "detections_per_image" in r else "–"
                fired = f"{100 * r['fired_fraction']:.0f}%" if "fired_fraction" in r else "–"
                lines.append(
                    f"| {model} | {group} | {name} | {r['seconds_per_image']:.3f} | {r['ratio']:.2f} | {det} "
                    f"| {fired} |"
                )
    lines += [
        "",
        "Per operation (ms per batch): "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["ops_ms_per_batch"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
