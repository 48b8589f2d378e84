"""Download a URL list (parquet, csv, tsv, jsonl, json or txt) into img2dataset webdataset shards.

    python jobs/download.py --url-list urls.parquet --out shards/
    python jobs/download.py --url-list laion/ --input-format parquet --out shards/ --timeout 5
    ray job submit --working-dir . -- python jobs/download.py --url-list ... --out ... --distributor ray

Columns are detected from the header (url/URL/image_url..., caption/TEXT/text...) unless given.
Re-running with the same --out resumes: finished shards are not downloaded again.
"""

from contextlib import nullcontext

from _bootstrap import run_job

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session
from pipeline.download.downloader import run_download


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="download"), argv)
    # Only the ray distributor needs Ray; the default multiprocessing one must not pay for starting it.
    ray = ray_session(cfg.ray) if cfg.download.distributor == "ray" else nullcontext()
    with output_lock(cfg.download.out, job="download"), ray:
        return run_download(cfg.download)


if __name__ == "__main__":
    run_job(main)
