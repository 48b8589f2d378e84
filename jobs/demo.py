"""The demo: the whole pipeline, end to end, on a generated LAION-like dataset with offline models.

    python jobs/demo.py --out demo-output        # what `make demo` runs

Builds the demo dataset, serves it on 127.0.0.1, downloads it with img2dataset and runs the
stages on a local Ray. Every output lands under --out; demo_summary.json holds each step's summary.
"""

from _bootstrap import run_job

from pipeline.cli import build_parser, parse_config
from pipeline.demo import run_demo
from pipeline.ray_runtime import ray_session


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(build_parser(__doc__, main="demo", extra=("ray", "download", "ingest")), argv)
    with ray_session(cfg.ray):
        return run_demo(cfg)


if __name__ == "__main__":
    run_job(main)
