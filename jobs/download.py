"""Download a URL list (parquet, csv, tsv, jsonl, json or txt) into img2dataset webdataset shards.

    python jobs/download.py --url-list urls.parquet --out shards/
    python jobs/download.py --url-list laion/ --input-format parquet --out shards/ --timeout 5
    ray job submit --working-dir . -- python jobs/download.py --url-list ... --out ... --distributor ray

Columns are detected from the header (url/URL/image_url..., caption/TEXT/text...) unless given.
Re-running with the same --out resumes: finished shards are not downloaded again.
"""

import dataclasses

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session
from pipeline.download.downloader import run_download


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="download"), argv)
    download = dataclasses.replace(
        cfg.download, img2dataset_console=cfg.download.img2dataset_console or cfg.ray.verbose
    )
    # Only the ray distributor needs Ray, and only when there is something to download.
    with output_lock(cfg.download.out, job="download"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_download(download)
    return {**summary, "ray_started": ray.started}


if __name__ == "__main__":
    run_job(main)
