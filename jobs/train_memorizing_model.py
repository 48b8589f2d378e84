"""Train the memorizing demo models AMG is evaluated on (a few minutes on 2 CPU cores).

    python jobs/train_memorizing_model.py --demo-dir demo-output --model-dir models/amg-memorizing

Trains, with one fixed seed, a tiny text-to-image latent diffusion model (diffusers
StableDiffusionPipeline format) and a matching unconditional pixel-space DDPM on the demo dataset's
verbatim-duplicated image+caption pairs plus its non-duplicated pictures, and writes them with the
exact training set and a manifest under --model-dir. The committed copy in models/amg-memorizing was
made by this job with its defaults. See demo.memorizing.training.
"""

from _bootstrap import run_job

from demo.memorizing.training import train_from_config
from pipeline.core.cli import build_parser, parse_config


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="amg", extra=()), argv).amg
    report = train_from_config(cfg)
    return {"job": "train_memorizing_model", "model_dir": cfg.model_dir, **report}


if __name__ == "__main__":
    run_job(main)
