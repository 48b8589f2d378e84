"""Find duplicate images in an embedding folder (LAION layout): exact sha256, pHash, CLIP cosine.

    python jobs/dedup_images.py --embeddings DIR --out DIR
    python jobs/dedup_images.py --embeddings DIR --out DIR --phash-max-distance 8 --semantic on
    ray job submit --working-dir . -- python jobs/dedup_images.py --embeddings DIR --out DIR

Writes OUT/image_duplicates.parquet (key, row_id, group_id, group_size, representative_key,
is_representative, similarity, hamming_distance, method, linked_by: one row per image in a group of
two or more), OUT/image_dedup_summary.json and OUT/dedup_report.html (groups, thresholds, borderline pairs;
thumbnails with --shards). Rows are compared within k-means cells (OUT/cells/, options --cells-...);
from --cells-ray-min-rows rows the work runs as Ray tasks. A re-run with the same options over
unchanged inputs does nothing.
"""

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session
from pipeline.dedup.image_shuffle import run_image_dedup


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="image_dedup", extra=("ray", "cells")), argv)
    # A local Ray is never started (its GPU task would run here anyway); a cluster is joined for work only.
    with output_lock(cfg.image_dedup.out, job="dedup_images"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_image_dedup(cfg.image_dedup, cfg.cells)
    summary.pop("passes", None)  # kept in image_dedup_summary.json; the stdout line stays short
    summary.update(up_to_date=summary["skipped"], ray_started=ray.started)
    return summary


if __name__ == "__main__":
    run_job(main)
