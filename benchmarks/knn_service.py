"""kNN service load test: throughput and p50/p99 latency of /knn-service, against FAISS in-process.

    python benchmarks/knn_service.py --rows 1000000 --json knn.json

1. **Bundle.** N rows are built into a real bundle by ``build_bundle`` from a synthetic embedding
   folder in LAION's layout (512-d float16 vectors, clustered, 2% near-copies and 0.5% exact copies,
   8-word captions, planted repeated ones: ``synthetic_laion.py``), given to the build as
   ``--embeddings`` (as LAION's released embeddings would be: no ingest, no embed, no images). Image
   dedup runs its exact pass only (the other passes are measured by ``scale.py``), and the index is
   what the auto rules choose for N.
2. **Floor.** The same index, opened as a replica opens it (``open_bundle``, memory-mapped), searched
   in this process: one query at a time (latency) and in batches of 32 (throughput).
3. **Service.** ``jobs/serve_knn.py`` on 127.0.0.1 with one replica. First one client GETs
   ``/indices-list`` (no work: the cost of Serve's HTTP path alone); then C client threads in this
   process post ``embedding_input`` queries (held-out vectors near the data) for ``--seconds``
   each; every answer is checked to rank as the floor does (the same similarity at each rank).

Client threads, the HTTP proxy, the replica and the floor share the machine's cores, so on a small
machine the service's figures include the clients' own cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from synthetic_laion import write_embedding_folder

from pipeline.bundle.build import build_bundle
from pipeline.bundle.reader import open_bundle
from pipeline.core.config import PipelineConfig
from pipeline.serve.app import wait_until_routed

DIM = 512


def build_synthetic_bundle(root: Path, n: int, seed: int) -> dict:
    """The bundle of N synthetic rows, built from their embedding folder (``--embeddings``)."""
    source = root.parent / "embeddings"
    write_embedding_folder(source, n, seed, DIM)  # reused when it holds these rows already
    cfg = PipelineConfig()
    cfg = dataclasses.replace(
        cfg,
        bundle=dataclasses.replace(cfg.bundle, embeddings=str(source), out=str(root), verify_checksums=False),
        image_dedup=dataclasses.replace(cfg.image_dedup, phash=False, semantic="off"),
    )
    return build_bundle(cfg)


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def floor(bundle, queries: np.ndarray, k: int) -> dict:
    """FAISS in this process, through the bundle the replica opens: single-query latency, batch-32 rate."""
    bundle.search_embeddings(queries[:32], k)  # warm-up
    single = []
    for q in queries[:500]:
        started = time.perf_counter()
        bundle.search_embeddings(q, k)
        single.append(time.perf_counter() - started)
    started = time.perf_counter()
    done = 0
    while time.perf_counter() - started < 10:
        bundle.search_embeddings(queries[done % len(queries) : done % len(queries) + 32], k)
        done += 32
    return {
        **percentiles(single),
        "qps_single": round(len(single) / sum(single), 1),
        "qps_batch32": round(done / (time.perf_counter() - started), 1),
    }


def load(url: str, queries: np.ndarray, k: int, clients: int, seconds: float, expect) -> dict:
    """``clients`` threads posting queries for ``seconds``; latency per request, answers checked."""
    latencies: list[float] = []
    wrong = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop:
            q = queries[i % len(queries)]
            body = json.dumps(
                {"embedding_input": q.tolist(), "num_images": k, "indice_name": "bench"}
            ).encode()
            started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=120) as response:
                answer = json.loads(response.read())
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                wrong[0] += not expect(i % len(queries), answer)
            i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "qps": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
        "answers_ranked_unlike_floor": wrong[0],
    }


def route_floor(url: str, requests: int = 300) -> dict:
    """One client GETting ``/indices-list`` (a handler that does nothing): what Serve's HTTP proxy and
    the hop to the replica cost per request on this machine, before any search."""
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
        latencies.append(time.perf_counter() - started)
    return {"requests": requests, **percentiles(latencies)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ks", default="40,1000", help="num_images per request (ClipClient default, AMG-sd)")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--work", default=None, help="folder for the bundle (default: a temporary one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="knn-bench-"))
    root = work / "bundle"
    result: dict = {"rows": args.rows, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    started = time.monotonic()
    if not (root / "manifest.json").is_file():
        build = build_synthetic_bundle(root, args.rows, seed=0)
        result["build"] = {"seconds": round(time.monotonic() - started, 1), "index": build["index"]}
    bundle = open_bundle(root, verify=False)
    rng = np.random.default_rng(1)
    base = bundle.embeddings(rng.choice(len(bundle), 2000, replace=False))
    queries = base + rng.normal(0, 0.03, base.shape).astype(np.float32)
    result["index"] = bundle.manifest["index"]["factory"]
    result["floor"], result["service"] = {}, {}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "jobs/serve_knn.py",
        "--bundle",
        str(root),
        "--indice-name",
        "bench",
        "--port",
        str(port),
        "--cache-dir",
        str(work / "cache"),
        "--ray-num-cpus",
        str(os.cpu_count()),
    ]
    with (work / "serve.log").open("w") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        try:
            wait_until_routed(f"http://127.0.0.1:{port}", 600, running=lambda: server.poll() is None)
        except RuntimeError as exc:
            raise RuntimeError(f"the service did not start: see {work / 'serve.log'}") from exc
        result["serve_floor"] = route_floor(f"http://127.0.0.1:{port}/indices-list")
        print(json.dumps({"serve_floor": result["serve_floor"]}), flush=True)
        for k in (int(x) for x in args.ks.split(",")):
            result["floor"][k] = floor(bundle, queries, k)
            scores, ids = bundle.search_embeddings(queries, k)

            def expect(
                i: int, answer: list[dict], scores: np.ndarray = scores, ids: np.ndarray = ids
            ) -> bool:
                """The answer ranks as the floor does: the same similarity at every rank (equal-scored
                ids may swap), and as many results (HNSW may find fewer than k; -1 ids are dropped)."""
                got = np.array([a["similarity"] for a in answer], dtype=np.float32)
                want = scores[i][ids[i] >= 0]
                return len(got) == len(want) and bool(np.allclose(got, want, atol=1e-4))

            load(f"http://127.0.0.1:{port}/knn-service", queries, k, 1, 3, expect)  # warm-up
            result["service"][k] = [
                load(f"http://127.0.0.1:{port}/knn-service", queries, k, int(c), args.seconds, expect)
                for c in args.clients.split(",")
            ]
            print(
                json.dumps({"k": k, "floor": result["floor"][k], "service": result["service"][k]}), flush=True
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
