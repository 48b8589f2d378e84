"""Ingest img2dataset shards into samples.parquet, accounting for every row.

python jobs/ingest.py --shards DIR --out DIR
ray job submit --working-dir . -- python jobs/ingest.py --shards DIR --out DIR
"""

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session
from pipeline.ingest.ingest import run_ingest


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="ingest"), argv)
    # Ray starts only if a shard is to be read: a re-run over ingested shards does without it.
    with output_lock(cfg.ingest.out, job="ingest"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_ingest(cfg.ingest)
    summary.pop("per_shard")  # kept in ingest_summary.json; the stdout line stays one short line
    summary.update(up_to_date=summary["shards_processed"] == 0, ray_started=ray.started)
    return summary


if __name__ == "__main__":
    run_job(main)
