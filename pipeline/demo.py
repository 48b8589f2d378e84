"""The demo: every stage of the pipeline, end to end, on the demo dataset and offline models.

Steps, each resumable (a re-run finds the previous outputs and skips their work):

1. write the demo dataset (real photographs with planted duplicates; :mod:`pipeline.demo_data`);
2. serve it on 127.0.0.1 and download it with img2dataset into webdataset shards;
3. ingest the shards (every row accounted for).

Everything lands under ``cfg.demo.out`` (``demo-output/`` by default).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.demo_data import download_demo, make_demo_data
from pipeline.ingest import run_ingest
from pipeline.storage import atomic_write_json

SHARDS = "shards"
INGEST = "ingest"


def run_demo(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the demo's steps in order; needs a Ray session. Returns (and writes) the demo summary."""
    started = time.monotonic()
    out = Path(cfg.demo.out)
    steps: dict[str, Any] = {}
    steps["data"] = make_demo_data(cfg.demo)
    # The demo serves byte-identical files, so keep their bytes (and sha256) as served.
    download = dataclasses.replace(cfg.download, skip_reencode=True, timeout=5)
    steps["download"] = download_demo(out, download, cfg.demo.samples_per_shard)
    ingest_cfg = dataclasses.replace(cfg.ingest, shards=str(out / SHARDS), out=str(out / INGEST))
    steps["ingest"] = run_ingest(ingest_cfg)
    summary = {
        "job": "demo",
        "out": str(out),
        "urls": steps["download"]["urls"],
        "downloaded": steps["download"]["successes"],
        "rows_seen": steps["ingest"]["rows_seen"],
        "ok": steps["ingest"]["ok"],
        "rejected": steps["ingest"]["rejected"],
        "seconds": round(time.monotonic() - started, 3),
    }
    atomic_write_json(out / "demo_summary.json", {**summary, "steps": steps})
    return summary
