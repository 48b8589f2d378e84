"""A real `ray start --head` cluster on 127.0.0.1 and a real `ray job submit` of a job of ours."""

from __future__ import annotations

import json
import os
import secrets
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from shard_factory import encode, random_photo, sample, write_shard

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (401 under token auth) means the dashboard is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@pytest.fixture()
def ray_head(tmp_path: Path):
    """`ray start --head --block` in its own process group; stopping it leaves other Ray sessions alone."""
    # Its own short temp dir (socket paths are length-limited), so it leaves no ray_current_cluster
    # file in /tmp/ray for a later local ray.init() to trip over.
    ray_tmp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--object-store-memory=300000000", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(f"{address}/api/version", 90)
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_ingest_on_a_real_cluster(ray_head, tmp_path: Path):
    address, env = ray_head
    shards = tmp_path / "shards"
    write_shard(shards, 0, [sample(f"{i:09d}", encode(random_photo(i))) for i in range(5)] + [sample("000000009", b"")])
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env", "runtime_env.yaml", "--",
           "python", "jobs/ingest.py", "--shards", str(shards), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary_lines = [line for line in done.stdout.splitlines() if line.startswith('{"job": "ingest"')]
    assert summary_lines, done.stdout[-3000:]
    summary = json.loads(summary_lines[-1])
    assert (summary["rows_seen"], summary["ok"], summary["rejected"]) == (6, 5, 1)
    assert len(pd.read_parquet(out / "samples.parquet")) == 6
