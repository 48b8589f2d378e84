"""Find duplicate captions (normalise, exact hash, MinHash LSH, Jaccard check, union-find).

Runs on any parquet with a caption column, LAION metadata (URL, TEXT) included; no images needed.
Writes OUT/caption_duplicates.parquet (key, group_id, group_size, normalized_caption; one row per
input row, in input order), OUT/caption_dedup_summary.json and OUT/dedup_report.html. Inputs with fewer than
--ray-min-rows rows run in-process without starting Ray; larger ones run as Ray tasks.

    python jobs/dedup_captions.py --input PARQUET_OR_DIR --out DIR [--caption-col TEXT --key-col key]
    ray job submit --working-dir . -- python jobs/dedup_captions.py --input DATA --out OUT
"""

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session
from pipeline.dedup.caption import run_caption_dedup


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="caption_dedup"), argv)
    # Ray starts only for an input of --ray-min-rows rows or more that is to be deduplicated.
    with output_lock(cfg.caption_dedup.out, job="dedup_captions"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_caption_dedup(cfg.caption_dedup, cfg.ray)
    summary.pop("stage_seconds")  # kept in caption_dedup_summary.json; the stdout line stays short
    summary.update(up_to_date=summary["skipped"], ray_started=ray.started)
    return summary


if __name__ == "__main__":
    run_job(main)
