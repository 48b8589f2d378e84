"""Build the FAISS similarity index over an embedding folder's image embeddings (LAION layout).

    python jobs/build_index.py --embeddings DIR --out DIR
    python jobs/build_index.py --embeddings DIR --out DIR --kind ivf_pq --memory-budget-mb 16000
    python jobs/build_index.py --embeddings DIR --out DIR --duplicates DEDUP/image_duplicates.parquet

The index type follows N and --memory-budget-mb (flat, HNSW, IVF-Flat, OPQ+IVF-PQ; --kind forces
one); nprobe/efSearch are tuned until recall@k against exact search on a sample reaches
--target-recall. Writes OUT/image.index (load it memory-mapped with pipeline.index.faiss_index.load_index),
OUT/index_rows.parquet (row_id -> key, caption, partition, partition_row), OUT/index_info.json (plan,
self-check) and, with --duplicates, OUT/dup_image.index over the duplicated images only.
"""

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session
from pipeline.index.build import run_build_index


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="index"), argv)
    # A local Ray is never started (its GPU task would run here anyway); a cluster is joined for work only.
    with output_lock(cfg.index.out, job="build_index"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_build_index(cfg.index)
    summary.update(up_to_date=summary["skipped"], ray_started=ray.started)
    return summary


if __name__ == "__main__":
    run_job(main)
