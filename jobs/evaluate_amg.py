"""Evaluate Anti-Memorization Guidance on the memorizing models (the paper's Tables 1–4).

    python jobs/evaluate_amg.py --out demo-output/amg_eval

Samples the text-to-image model on its planted captions and its generic class prompts, and the
class-conditional pixel DDPM on every class, with plain sampling, AMG (paper mode with λ_t calibrated
on generic prompts, each term ablated, the released constants, the released pixel algorithm), on
paired seeds. AMG on the text-to-image model runs through the bundle of its training set (built
from the demo's img2dataset shards when --bundle holds none; needs a local Ray). Judges copies (own
copy of the planted picture), class accuracy and KID/FID with a Fashion-MNIST classifier trained on
images the generators never saw. Writes OUT/summary.json, OUT/table.md and sample grids.
"""

from pathlib import Path

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(
        build_parser(__doc__, main="amg", extra=("ray", "download", "embed", "bundle", "demo")), argv
    )
    a = cfg.amg
    with output_lock(a.out, job="evaluate_amg"):
        from demo.memorizing.evaluation import bundle_detectors, run_amg_evaluation
        from demo.run import FASHION, memorizing_model, stand_in_sscd, training_set_bundle

        bundle = Path(a.bundle)
        if not (bundle / "manifest.json").is_file():
            if bundle != Path(cfg.demo.out) / FASHION / "bundle":
                raise FileNotFoundError(f"no bundle in {bundle}; build it with jobs/build_artifacts.py")
            with ray_session(cfg.ray):
                training_set_bundle(cfg, memorizing_model(cfg))
        sscd = a.sscd_checkpoint or str(stand_in_sscd(cfg))
        summary = run_amg_evaluation(a, bundle_detectors(bundle, sscd))
    return {
        "job": "evaluate_amg",
        "out": a.out,
        "text2img_own_copy_x64_up": {
            m: r["planted"]["own_copy_x64_up"] for m, r in summary["text2img"].items()
        },
        "pixel_own_copy": {m: r["own_copy"] for m, r in summary["pixel"].items()},
        "seconds": summary["seconds"],
    }


if __name__ == "__main__":
    run_job(main)
