"""Write the demo dataset: real photographs with planted duplicates, a URL list and its ground truth.

    python jobs/make_demo_data.py --out demo-output

Writes DIR/images/ (files to serve over HTTP), DIR/urls_relative.parquet (url relative to images/,
caption, demo_kind, demo_group) and DIR/truth.parquet (every row's planted relationship). The same
options give byte-identical files. demo.data.download_demo then serves and downloads them.
"""

from _bootstrap import run_job

from demo.data import make_demo_data
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="demo", extra=()), argv)
    with output_lock(cfg.demo.out, job="make_demo_data"):
        summary = make_demo_data(cfg.demo)
    return {**summary, "up_to_date": summary.pop("skipped")}


if __name__ == "__main__":
    run_job(main)
