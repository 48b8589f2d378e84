"""Build the artifact bundle AMG and the audits open: ingest -> embed -> dedup -> index -> G_dup tables.

    python jobs/build_artifacts.py --shards DIR --out BUNDLE
    python jobs/build_artifacts.py --embeddings LAION_EMB_DIR --out BUNDLE --embed-model ViT-L-14 \
        --embed-pretrained openai        # LAION's released embeddings: no ingest, no embed
    python jobs/build_artifacts.py --shards DIR --out BUNDLE --embed-model ViT-B-32 \
        --embed-pretrained laion2b_s34b_b79k --duplicate-caption-min-count 21
    ray job submit --working-dir . -- python jobs/build_artifacts.py --shards DIR --out BUNDLE

Writes BUNDLE/manifest.json (format and code version, model, thresholds, counts, every file's size
and sha256, table schemas), samples.parquet, embeddings/ (LAION layout), image_duplicates.parquet,
caption_duplicates.parquet, caption_dedup_table.parquet and index/. Every step is resumable: a
re-run skips the steps whose inputs and options are unchanged (and does nothing when all are).
Open the result with pipeline.bundle.build.open_bundle(BUNDLE). Options of each stage are flags with the
stage's prefix (--embed-..., --cells-..., --image-dedup-..., --caption-dedup-..., --index-..., --ingest-...).
"""

from _bootstrap import run_job

from pipeline.bundle.build import build_bundle
from pipeline.bundle.layout import BundleError
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session


def main(argv: list[str] | None = None) -> dict:
    extra = ("ray", "ingest", "embed", "cells", "image_dedup", "caption_dedup", "index")
    cfg = parse_config(build_parser(__doc__, main="bundle", extra=extra), argv)
    # Ray starts with the first step that needs it (ingest or embed with shards to read).
    with output_lock(cfg.bundle.out, job="build_artifacts"), ray_session(cfg.ray, lazy=True) as ray:
        try:
            summary = build_bundle(cfg)
        except BundleError as exc:
            raise ValueError(str(exc)) from exc
    summary.update(up_to_date=not summary["steps_run"], ray_started=ray.started)
    return summary


if __name__ == "__main__":
    run_job(main)
