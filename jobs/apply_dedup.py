"""Act on duplicates: a keep-list and a drop-list, and optionally a filtered copy of the shards.

    python jobs/apply_dedup.py --bundle BUNDLE --out DIR [--filter-shards]
    python jobs/apply_dedup.py --shards DIR --image-duplicates image_duplicates.parquet \
        [--embeddings EMB] --out DIR [--policy largest|earliest|score --score-column aesthetic]
    python jobs/apply_dedup.py --bundle BUNDLE --out DIR --captions   # also drop caption duplicates

Every row of the shards is accounted for, in OUT/keep_list.parquet or OUT/drop_list.parquet (key,
url, reason, group, representative, group_size, shard, policy_value): one row per duplicate group
is kept (the largest image by default), unique rows are kept, the others are dropped as duplicates
of the kept row, and rows that were never embedded (failed downloads, undecodable images) are
dropped as rejected. With --filter-shards, OUT/shards/ holds the shards (same names: tar + parquet
+ _stats.json) with only the kept rows. Runs in one process, without Ray; a re-run over unchanged
inputs with the same options does nothing.
"""

from _bootstrap import run_job

from pipeline.bundle.inspect import apply_dedup_inputs
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.dedup.apply import run_apply_dedup


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="apply_dedup", extra=()), argv)
    with output_lock(cfg.apply_dedup.out, job="apply_dedup"):
        summary = run_apply_dedup(apply_dedup_inputs(cfg.apply_dedup))
    summary.pop("per_shard", None)  # kept in apply_dedup_summary.json; the stdout line stays short
    return {**summary, "up_to_date": summary["skipped"]}


if __name__ == "__main__":
    run_job(main)
