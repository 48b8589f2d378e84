"""The demo: the whole pipeline, end to end, on a generated LAION-like dataset with offline models.

    python jobs/demo.py --out demo-output        # what `make demo` runs

Builds the demo dataset, serves it on 127.0.0.1, downloads it with img2dataset and runs the
stages on a local Ray: ingest, the artifact bundle, then the memorization audit of the memorizing
demo model with and without AMG. Every output lands under --out; demo_summary.json holds each step's
summary, and the audit's report is OUT/audit/report.html (the path is printed at the end).
"""

from _bootstrap import run_job

from demo.run import run_demo
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session


def main(argv: list[str] | None = None) -> dict:
    extra = ("ray", "download", "ingest", "embed", "bundle", "audit", "amg")
    cfg = parse_config(build_parser(__doc__, main="demo", extra=extra), argv)
    with output_lock(cfg.demo.out, job="demo"), ray_session(cfg.ray):
        summary = run_demo(cfg)
    verdict = "passed" if summary["audit_check_passed"] else "FAILED"
    print(
        f"audit report: {summary['report']}  "
        f"(AMG off flags {summary['audit_prompts_flagged']['off']} prompts, "
        f"AMG on {summary['audit_prompts_flagged']['on']}; demo check {verdict})",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    run_job(main)
