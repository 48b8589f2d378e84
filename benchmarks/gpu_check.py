"""The GPU checks of issue #10, as one script that fits in about 8 minutes on one GPU node.

    python benchmarks/gpu_check.py --work /tmp/gpu --json gpu.json

1. **Embedding throughput** (``benchmarks/embed_throughput.py``): ViT-B-32 and ViT-L-14 with random
   weights in fp16 on synthetic img2dataset shards, end to end through the embed stage and the
   model-only ceiling, against clip-retrieval's published 2,500 and 312 images/s per A100.
2. **Image dedup at 10M rows** (``jobs/dedup_images.py``) on a synthetic LAION-layout folder
   (``benchmarks/synthetic_laion.py``, 128-d so that the data is written in about a minute): the k-means
   cells, then the within-cell passes, whose similarity products run on the GPU (torch) because the
   cluster has one; the summary says how long each step took.

Each part runs in a subprocess with its own time limit; a part that fails or runs out of time is
recorded as such and the next one still runs. Prints one JSON result and a Markdown block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def run(label: str, command: list[str], timeout_s: int, log: Path) -> dict:
    """``command`` in a subprocess (its output to ``log``); its last stdout line parsed as JSON if it is."""
    started = time.monotonic()
    with open(log, "w") as fh:
        try:
            done = subprocess.run(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return {"part": label, "ok": False, "error": f"over {timeout_s} s", "seconds": timeout_s}
    lines = done.stdout.strip().splitlines()
    log.with_suffix(".stdout").write_text(done.stdout)
    result: dict = {
        "part": label,
        "ok": done.returncode == 0,
        "seconds": round(time.monotonic() - started, 1),
    }
    try:
        result["result"] = json.loads(lines[-1]) if lines else None
    except ValueError:
        result["result"] = lines[-5:]
    return result


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", required=True, help="folder for shards, the synthetic data and outputs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the image dedup part")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    embed = [PYTHON, "benchmarks/embed_throughput.py", "--precision", "fp16"]
    parts = [
        run(
            "embed ViT-B-32 (fp16, random weights)",
            [
                *embed,
                "--model",
                "ViT-B-32",
                "--images",
                "8192",
                "--batch-size",
                "256",
                "--json",
                str(work / "b32.json"),
            ],
            150,
            work / "b32.log",
        ),
        run(
            "embed ViT-L-14 (fp16, random weights)",
            [
                *embed,
                "--model",
                "ViT-L-14",
                "--images",
                "2048",
                "--batch-size",
                "128",
                "--json",
                str(work / "l14.json"),
            ],
            150,
            work / "l14.log",
        ),
    ]
    data = work / f"data-{args.rows}x{args.dim}"
    parts.append(
        run(
            f"synthetic data {args.rows:,} x {args.dim}",
            [
                PYTHON,
                "benchmarks/synthetic_laion.py",
                "--rows",
                str(args.rows),
                "--dim",
                str(args.dim),
                "--out",
                str(data),
            ],
            120,
            work / "data.log",
        )
    )
    parts.append(
        run(
            f"image dedup {args.rows:,} x {args.dim} (cells, semantic products on the GPU)",
            [
                PYTHON,
                "jobs/dedup_images.py",
                "--embeddings",
                str(data),
                "--out",
                str(work / "dedup"),
                "--no-report",
            ],
            240,
            work / "dedup.log",
        )
    )
    result = {
        "machine": {
            "gpu": gpu_name(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        },
        "parts": parts,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
