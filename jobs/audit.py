"""Memorization audit of a text-to-image model against a training-set bundle, with and without AMG.

    python jobs/audit.py --bundle DIR --prompts FILE --out DIR --model PATH \
        [--samples-per-prompt N] [--amg off|on|both] [--mode paper|reference] [--seed S] [--dry-run]

Generates --samples-per-prompt images per prompt (seeded per prompt id and sample index) on a Ray
actor pool, matches each against its nearest training image through the bundle, applies Carlini's
clique criterion per prompt and Wen's score as a pre-screen, and writes results.parquet,
prompts.parquet, summary.json, report.html and the images under --out. Idempotent and resumable: a
re-run continues the same run id (model + bundle + settings) and generates only what is missing.
--dry-run only reads the prompt list and writes prompts.parquet.
"""

from _bootstrap import run_job

from pipeline.audit.runner import run_audit
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="audit", extra=("ray",)), argv)
    # Ray starts (or is joined) only when there is something to generate, after every check passed.
    with output_lock(cfg.audit.out, job="audit"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_audit(cfg.audit, cfg.ray)
    if not cfg.audit.dry_run:
        summary.update(up_to_date=summary["prompts_audited_now"] == 0 and summary["complete"])
    summary.update(ray_started=ray.started)
    return summary


if __name__ == "__main__":
    run_job(main)
