"""Fast no-ops: a job whose outputs are up to date says so and finishes without starting Ray.

Jobs open their Ray session lazily (:func:`pipeline.core.ray_runtime.ray_session` with ``lazy=True``):
Ray starts with the first thing that needs it. The in-process test checks the session's answers
before Ray is up; the slow test runs real jobs twice, as users do, and reads their summaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.shard_factory import encode, random_photo, sample, write_shard

REPO = Path(__file__).resolve().parent.parent


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


def _shards(folder: Path) -> Path:
    for shard in range(2):
        photos = [sample(f"{shard:04d}{i:05d}", encode(random_photo(10 * shard + i))) for i in range(4)]
        write_shard(folder, shard, photos)
    return folder


def _run(job: str, *args: str) -> tuple[dict, str, float]:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, f"jobs/{job}.py", *args, "--ray-num-cpus", "2", "--ray-object-store-mb", "256"]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr, seconds


@pytest.mark.slow
def test_a_rerun_with_nothing_to_do_says_so_and_never_starts_ray(tmp_path: Path):
    """ingest and embed start Ray for their first run; dedup_images never needs a local one."""
    shards = _shards(tmp_path / "shards")
    jobs = {
        "ingest": ["--shards", str(shards), "--out", str(tmp_path / "ingest")],
        "embed": ["--shards", str(shards), "--out", str(tmp_path / "emb"), "--log-every-s", "600"],
        "dedup_images": ["--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "dedup")],
    }
    times = {}
    for job, args in jobs.items():
        first, _, _ = _run(job, *args)
        assert first["up_to_date"] is False
        assert first["ray_started"] is (job != "dedup_images")  # Ray Data reads the shards; FAISS runs here
        second, log, times[job] = _run(job, *args)
        assert second["up_to_date"] is True and second["ray_started"] is False
        assert f"{job}: nothing to do" in log and "Ray not started" in log
        assert "started a local Ray" not in log
        # The same result, reported again from the markers.
        same = ("rows_seen", "ok", "rejected", "embedded", "groups", "rows_in_groups")
        assert {k: second[k] for k in same if k in first} == {k: first[k] for k in same if k in first}
    print("no-op re-runs, seconds (process start to exit):", {k: round(v, 2) for k, v in times.items()})
