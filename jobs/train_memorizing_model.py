"""Train the memorizing models AMG is evaluated on (about half an hour on 2 CPU cores).

    python jobs/train_memorizing_model.py --model-dir models/amg-memorizing

Trains, with one fixed seed, a small text-to-image latent diffusion model (diffusers
StableDiffusionPipeline format) and a class-conditional pixel DDPM on Fashion-MNIST (Debian's
dataset-fashion-mnist) with six planted pictures repeated x16, x64 and x256 under unique captions,
and writes them with the exact training set and a manifest under --model-dir. The committed copy in
models/amg-memorizing was made by this job with its defaults. See demo.memorizing.training.
"""

from _bootstrap import run_job

from demo.memorizing.training import train_memorizing_models
from pipeline.core.cli import build_parser, parse_config


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="amg", extra=()), argv).amg
    report = train_memorizing_models(cfg)
    return {"job": "train_memorizing_model", "model_dir": cfg.model_dir, **report}


if __name__ == "__main__":
    run_job(main)
