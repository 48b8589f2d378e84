"""A real `ray start --head` cluster on 127.0.0.1 and a real `ray job submit` of a job of ours."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import submit_job

from fixtures.shard_factory import encode, random_photo, sample, write_shard


@pytest.mark.slow
def test_ray_job_submit_runs_ingest_on_a_real_cluster(ray_head, tmp_path: Path):
    address, env = ray_head
    shards = tmp_path / "shards"
    write_shard(
        shards,
        0,
        [sample(f"{i:09d}", encode(random_photo(i))) for i in range(5)] + [sample("000000009", b"")],
    )
    out = tmp_path / "out"
    done = submit_job(address, env, ["python", "jobs/ingest.py", "--shards", str(shards), "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary_lines = [line for line in done.stdout.splitlines() if line.startswith('{"job": "ingest"')]
    assert summary_lines, done.stdout[-3000:]
    summary = json.loads(summary_lines[-1])
    assert (summary["rows_seen"], summary["ok"], summary["rejected"]) == (6, 5, 1)
    assert len(pd.read_parquet(out / "samples.parquet")) == 6
