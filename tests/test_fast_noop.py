"""The demo's console, and fast no-ops: a job whose outputs are up to date says so and touches no Ray.

Jobs open their Ray session lazily (:func:`pipeline.core.ray_runtime.ray_session` with ``lazy=True``):
Ray starts with the first thing that needs it, and a stage decides that it has nothing to do from its
fingerprint alone, before it imports a model library or plans its workers. The in-process test checks
the session's answers before Ray is up; the slow tests run the real jobs as users do (``make demo``,
then each job twice over the demo's outputs) and read what they print.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_script

REPO = Path(__file__).resolve().parent.parent
#: Nothing listens there: a job that tried to join this "cluster" would fail or hang.
DEAD_CLUSTER = "127.0.0.1:9"
#: The demo's console budget (issue: "at most about 40 lines").
DEMO_MAX_LINES = 60  # two bundles (photos, the model's training set) and one line per audited prompt


LAZY_SESSION_CHECK = """
import ray
from pipeline.core import ray_runtime
from pipeline.core.config import RayConfig

assert not ray.is_initialized()
with ray_runtime.ray_session(RayConfig(num_cpus=3), lazy=True) as session:
    assert ray.init is not ray_runtime._RAY_INIT  # a Ray call would start this session's Ray
    assert ray_runtime.cluster_gpus() == (ray_runtime.local_gpu_count() or 0)
    assert ray_runtime.cpu_actor_pool_size() == 2  # 3 CPUs, one left to read and decode tasks
    assert ray_runtime.on_gpu_worker(lambda x: x + 1, 41) == 42  # a local Ray's GPU task runs here
    assert not ray.is_initialized()
assert session.started is False and not ray.is_initialized()
assert ray.init is ray_runtime._RAY_INIT  # Ray's own again once the session is closed
print("ok")
"""


@pytest.mark.slow
def test_a_lazy_session_answers_planning_questions_without_starting_ray():
    """What stages ask before their work (GPUs, pool size, where to run) needs no local Ray.

    Run in a fresh interpreter: this test process may already hold the suite's shared Ray session.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", LAZY_SESSION_CHECK],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _run(job: str, *args: str, ray_address: str | None = None) -> tuple[dict, list[str], float]:
    """Run ``jobs/JOB.py`` as ``make demo`` does: (summary, every console line, seconds start to exit)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    started = time.monotonic()
    done = run_script(f"jobs/{job}.py", *args, env=env, timeout=900)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines() + done.stdout.splitlines()
    return json.loads(done.stdout.strip().splitlines()[-1]), lines, seconds


@pytest.mark.slow
def test_the_demo_console_is_short_and_ends_with_where_to_look(demo_run):
    lines, summary, out = demo_run["lines"], demo_run["summary"], demo_run["out"]
    assert len(lines) <= DEMO_MAX_LINES, "\n".join(lines)
    assert summary["audit_check_passed"] and summary["up_to_date"] is False
    *_, verdict, audit, dedup, where, last = lines
    assert verdict.startswith("demo check passed")
    assert audit.split(": ", 1)[1] == str(out / "audit" / "report.html")
    assert dedup.split(": ", 1)[1] == str(out / "bundle" / "dedup_report.html")
    assert where.split(":", 1)[1].strip() == str(out / "demo_summary.json")
    assert json.loads(last) == summary
    noise = ("Traceback", "FutureWarning", "DeprecationWarning", "truncated", "pip install")
    assert not [line for line in lines if any(word in line for word in noise)], "\n".join(lines)


def _jobs(demo_out: Path, work: Path) -> dict[str, list[str]]:
    """Each job with arguments over the demo's outputs. Those writing into the demo's own folders use
    the demo's settings, so their first run is already a no-op; the others write under ``work``."""
    from demo.memorizing.layout import THRESHOLDS
    from demo.run import (
        AUDIT_OVERRIDES,
        AUDIT_PROMPTS,
        DEMO_DUPLICATE_CAPTION_MIN_COUNT,
        FASHION,
        SSCD_STAND_IN,
    )

    thresholds = json.loads((REPO / "models" / "amg-memorizing" / THRESHOLDS).read_text())
    memorized_threshold = thresholds["text2img"]["memorized_threshold"]

    sscd = str(demo_out / SSCD_STAND_IN)
    shards = str(demo_out / "shards")
    return {
        "make_demo_data": ["--out", str(demo_out)],
        "demo": ["--out", str(demo_out)],
        "build_artifacts": [
            *("--shards", shards, "--out", str(demo_out / "bundle")),
            *("--embed-sscd-checkpoint", sscd),
            *("--duplicate-caption-min-count", str(DEMO_DUPLICATE_CAPTION_MIN_COUNT)),
        ],
        "audit": [
            *("--bundle", str(demo_out / FASHION / "bundle")),
            *("--prompts", str(demo_out / AUDIT_PROMPTS), "--out", str(demo_out / "audit")),
            *("--model", str(REPO / "models" / "amg-memorizing"), "--amg", "both", "--similarity", "sscd"),
            *(
                "--mode",
                "paper",
                "--amg-overrides",
                str(demo_out / AUDIT_OVERRIDES),
                "--match-rows",
                "duplicated",
            ),
            *("--memorized-threshold", str(memorized_threshold)),
        ],
        "ingest": ["--shards", shards, "--out", str(work / "ingest")],
        "embed": ["--shards", shards, "--out", str(work / "emb"), "--log-every-s", "600"],
        "dedup_images": ["--embeddings", str(work / "emb"), "--out", str(work / "dedup")],
        "dedup_captions": [
            "--input",
            str(demo_out / "ingest" / "samples.parquet"),
            "--out",
            str(work / "cap"),
        ],
        "build_index": ["--embeddings", str(work / "emb"), "--out", str(work / "index")],
        "apply_dedup": [
            "--bundle",
            str(demo_out / "bundle"),
            "--out",
            str(work / "apply"),
            "--filter-shards",
        ],
    }


@pytest.mark.slow
def test_a_rerun_with_nothing_to_do_says_so_and_never_touches_ray(demo_run, tmp_path: Path):
    """Every job twice over the demo's outputs; the second run has RAY_ADDRESS pointing at a dead
    address, so a job that joined a cluster (to count its GPUs, say) would fail there."""
    seconds = {}
    for job, args in _jobs(demo_run["out"], tmp_path).items():
        first, _, _ = _run(job, *args)
        if job in ("ingest", "embed"):
            assert first["up_to_date"] is False and first["ray_started"] is True  # Ray Data reads shards
        second, lines, seconds[job] = _run(job, *args, ray_address=DEAD_CLUSTER)
        assert second["up_to_date"] is True, (job, second)
        assert second.get("ray_started") in (False, None), (job, second)  # None: a job without Ray
        assert any(f"{job}: nothing to do" in line for line in lines), (job, lines)
        assert not [line for line in lines if "started a local Ray" in line or "joining Ray" in line]
        # The same result, reported again from the markers.
        same = ("rows_seen", "ok", "rejected", "embedded", "groups", "rows", "kept", "dropped", "complete")
        assert {k: second[k] for k in same if k in first} == {k: first[k] for k in same if k in first}
    print("no-op re-runs, seconds from process start to exit:", {k: round(v, 2) for k, v in seconds.items()})
