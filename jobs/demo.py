"""The demo: the whole pipeline, end to end, on a generated LAION-like dataset with offline models.

    python jobs/demo.py --out demo-output        # what `make demo` runs

Builds the demo dataset, serves it on 127.0.0.1, downloads it with img2dataset and runs the
stages on a local Ray: ingest, the artifact bundle, then the memorization audit of the memorizing
demo model with and without AMG. Every output lands under --out. It ends with where to look: the
audit's report (OUT/audit/report.html), the bundle's duplicate report (OUT/bundle/dedup_report.html)
and demo_summary.json (each step's summary), then the one-line JSON summary. --verbose adds Ray's
own output (Ray Data progress, worker output).
"""

from pathlib import Path

from _bootstrap import run_job

from demo.run import run_demo
from pipeline.core.cli import build_parser, parse_config
from pipeline.core.lock import output_lock
from pipeline.core.ray_runtime import ray_session


def main(argv: list[str] | None = None) -> dict:
    extra = ("ray", "download", "ingest", "embed", "bundle", "audit", "amg")
    cfg = parse_config(build_parser(__doc__, main="demo", extra=extra), argv)
    # Ray starts with the first stage that needs it; a re-run with everything done never starts it.
    with output_lock(cfg.demo.out, job="demo"), ray_session(cfg.ray, lazy=True) as ray:
        summary = run_demo(cfg)
    summary["ray_started"] = ray.started
    print_where_to_look(summary)
    return summary


def print_where_to_look(summary: dict) -> None:
    """The demo's last words before its JSON line (stdout): the verdict and the files to open."""
    flagged = summary["audit_prompts_flagged"]
    verdict = "passed" if summary["audit_check_passed"] else "FAILED"
    lines = [
        f"demo check {verdict}: AMG off flags {flagged['off']} prompts as memorized, AMG on {flagged['on']}",
        f"  audit report: {summary['report']}",
    ]
    if summary.get("dedup_report"):
        lines.append(f"  dedup report: {summary['dedup_report']}")
    lines.append(f"  summary:      {Path(summary['out']) / 'demo_summary.json'}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    run_job(main)
