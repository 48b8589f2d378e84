"""Image dedup benchmarks: semantic-pass speed and recall against exact search, pHash speed, quality.

    python benchmarks/image_dedup.py perf --sizes 25000,100000,400000,1000000 --json perf.json
    python benchmarks/image_dedup.py quality --json quality.json

``perf``: synthetic CLIP-like embeddings (d=512, stored float16, normalised to float32 as the stage
does): points around 1 centre per 1,000 rows, plus 5% planted near-copies (cosine ~0.97-0.995 to their
source, as re-encodes give). For each N it times, in the same run,

* the approximate semantic pass (IVF-Flat, nlist ~2*sqrt(N), nprobe 8: what ``search=auto`` runs above
  100k rows) end to end: training, adding, searching all N rows, pair extraction;
* exact flat search: every row at N <= ``--full-exact-max``, else a seeded sample of ``--sample``
  query rows, whose time is scaled by N / sample (labelled "extrapolated");
* recall of the approximate pass: of the pairs exact search finds with cosine >= 0.95 for the sampled
  rows, the fraction the approximate pass found (from either side of the pair), and the fraction of
  planted near-copy pairs found;
* the pHash pass over as many synthetic 64-bit hashes (random, plus 5% copies with 0-12 flipped bits):
  brute force (sampled above ``--full-exact-max``) and, up to ``--multihash-max``, multi-index hashing.

``quality``: precision and recall of duplicate *pairs* (every pair inside a predicted group against
every pair inside a planted group) on the project's planted data: the test set of
``tests/test_image_dedup.py`` and the demo dataset (``demo.data``), both embedded by the real
embed stage with the offline tiny model; pHash radius swept, and the random-weight semantic pass shown
for what it is.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import faiss

from pipeline.dedup.image import phash_pairs, semantic_pairs
from pipeline.index.faiss_index import KnnSearch
from pipeline.io.embeddings import normalize

THRESHOLD = 0.95
K = 32


# ----------------------------------------------------------------------------------------------
# perf
# ----------------------------------------------------------------------------------------------


def synthetic_embeddings(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float16 embeddings of ``n`` rows (5% planted near-copies) and, per copy, its source row (-1 else)."""
    rng = np.random.default_rng(seed)
    n_copy = n // 20
    n_base = n - n_copy
    clusters = max(10, n_base // 1000)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    out = np.empty((n, d), dtype=np.float16)
    chunk = 100_000
    for lo in range(0, n_base, chunk):
        hi = min(lo + chunk, n_base)
        block = centres[rng.integers(0, clusters, hi - lo)] + 1.2 * rng.standard_normal(
            (hi - lo, d), dtype=np.float32
        )
        out[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    source = rng.choice(n_base, n_copy, replace=False)
    noise = rng.standard_normal((n_copy, d), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    scale = rng.uniform(0.1, 0.25, (n_copy, 1)).astype(np.float32)  # cosine ~0.97-0.995
    copies = out[source].astype(np.float32) + scale * noise
    out[n_base:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    copy_of = np.full(n, -1, dtype=np.int64)
    copy_of[n_base:] = source
    return out, copy_of


def exact_knn(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    index.search(queries[:64], k)  # warm-up: thread pool, first touch of the matrix
    started = time.monotonic()
    scores, ids = index.search(queries, k)
    return scores, ids, time.monotonic() - started


def pair_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, pairs.tolist()))


def perf_one(
    n: int, d: int, sample: int, full_exact_max: int, seed: int, nprobe: int, multihash_max: int
) -> dict:
    result: dict = {"n": n, "d": d, "k": K, "threshold": THRESHOLD}
    raw, copy_of = synthetic_embeddings(n, d, seed)
    x = normalize(raw)
    del raw
    gc.collect()
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(n, min(sample, n), replace=False))
    full = n <= full_exact_max

    # Exact flat search: all rows (measured) or a sample (time extrapolated).
    if full:
        started = time.monotonic()
        exact_pairs, _, _ = semantic_pairs(x, THRESHOLD, k=K, search=KnnSearch("flat", use_gpu=False))
        result["exact_seconds"] = round(time.monotonic() - started, 2)
        result["exact_timing"] = "measured (all rows)"
        _, _, seconds = exact_knn(x, x[rows], K + 1)
        result["exact_seconds_extrapolated_check"] = round(seconds * n / len(rows), 1)
        exact_set = pair_set(exact_pairs)
        sampled = set(rows.tolist())
        truth = {p for p in exact_set if p[0] in sampled or p[1] in sampled}
    else:
        scores, ids, seconds = exact_knn(x, x[rows], K + 1)
        result["exact_seconds"] = round(seconds * n / len(rows), 1)
        result["exact_timing"] = f"extrapolated from {len(rows)} sampled query rows ({seconds:.1f} s)"
        truth = set()
        for q, row in enumerate(rows.tolist()):
            for j, s in zip(ids[q].tolist(), scores[q].tolist(), strict=False):
                if j != row and s >= THRESHOLD:
                    truth.add((min(row, j), max(row, j)))
    result["exact_pairs_in_sample"] = len(truth)

    # The approximate pass (IVF), end to end.
    started = time.monotonic()
    approx, _, info = semantic_pairs(x, THRESHOLD, k=K, search=KnnSearch("ivf", nprobe=nprobe, use_gpu=False))
    result["ivf_seconds"] = round(time.monotonic() - started, 2)
    result["ivf_nprobe"] = nprobe
    found = pair_set(approx)
    result["ivf_pairs"] = len(found)
    result["ivf_recall_vs_exact"] = round(len(truth & found) / max(1, len(truth)), 4)
    planted = {(min(int(s), i), max(int(s), i)) for i, s in enumerate(copy_of.tolist()) if s >= 0}
    if full:
        result["exact_planted_recall"] = round(len(planted & exact_set) / len(planted), 4)
        result["ivf_recall_vs_exact_all_pairs"] = round(len(exact_set & found) / max(1, len(exact_set)), 4)
    result["ivf_planted_recall"] = round(len(planted & found) / len(planted), 4)
    result["ivf_saturated_rows"] = info["saturated_rows"]
    result["speedup_exact_over_ivf"] = round(result["exact_seconds"] / result["ivf_seconds"], 2)
    del x
    gc.collect()

    # pHash: synthetic hashes with planted near-copies.
    hrng = np.random.default_rng(seed + 2)
    hashes = hrng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + hrng.integers(
        0, 2, n, dtype=np.uint64
    )
    n_copy = n // 20
    src = hrng.choice(n - n_copy, n_copy, replace=False)
    flips = np.zeros(n_copy, dtype=np.uint64)
    for _ in range(12):
        on = hrng.random(n_copy) < 0.5
        flips[on] |= np.uint64(1) << hrng.integers(0, 64, on.sum()).astype(np.uint64)
    hashes[n - n_copy :] = hashes[src] ^ flips
    if n > multihash_max:  # far slower than brute force on CPU (see the smaller N): brute force only
        codes = np.ascontiguousarray(hashes.astype(">u8").view(np.uint8).reshape(-1, 8))
        index = faiss.IndexBinaryFlat(64)
        index.add(codes)
        index.range_search(codes[:64], 13)
        started = time.monotonic()
        lims, _, ids = index.range_search(codes[rows], 13)
        seconds = time.monotonic() - started
        result["phash_brute_seconds"] = round(seconds * n / len(rows), 1)
        result["phash_brute_timing"] = f"extrapolated from {len(rows)} sampled query rows"
        return result
    started = time.monotonic()
    multi, _, multi_info = phash_pairs(hashes, 12, exhaustive_max_n=0)
    result["phash_multihash_seconds"] = round(time.monotonic() - started, 2)
    result["phash_index"] = multi_info["index"]
    if full:
        started = time.monotonic()
        brute, _, _ = phash_pairs(hashes, 12, exhaustive_max_n=10**12)
        result["phash_brute_seconds"] = round(time.monotonic() - started, 2)
        result["phash_brute_timing"] = "measured (all rows)"
        result["phash_multihash_equals_brute"] = bool(np.array_equal(brute, multi))
    else:
        codes = np.ascontiguousarray(hashes.astype(">u8").view(np.uint8).reshape(-1, 8))
        index = faiss.IndexBinaryFlat(64)
        index.add(codes)
        started = time.monotonic()
        lims, _, ids = index.range_search(codes[rows], 13)
        seconds = time.monotonic() - started
        result["phash_brute_seconds"] = round(seconds * n / len(rows), 1)
        result["phash_brute_timing"] = f"extrapolated from {len(rows)} sampled query rows"
        multi_set = pair_set(multi)
        missing = 0
        for q, row in enumerate(rows.tolist()):
            for j in ids[lims[q] : lims[q + 1]].tolist():
                if j != row and (min(row, j), max(row, j)) not in multi_set:
                    missing += 1
        result["phash_multihash_equals_brute"] = missing == 0
    result["phash_pairs"] = len(multi)
    result["speedup_phash_brute_over_multihash"] = round(
        result["phash_brute_seconds"] / result["phash_multihash_seconds"], 2
    )
    return result


def run_perf(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for n in sizes:
        started = time.monotonic()
        runs.append(
            perf_one(n, args.d, args.sample, args.full_exact_max, args.seed, args.nprobe, args.multihash_max)
        )
        runs[-1]["wall_seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(runs[-1]), flush=True)
    for a, b in itertools.pairwise(runs):
        b["ivf_time_growth_exponent"] = round(
            np.log(b["ivf_seconds"] / a["ivf_seconds"]) / np.log(b["n"] / a["n"]), 2
        )
    return {"machine": machine(), "runs": runs}


# ----------------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------------


def pairs_from_groups(groups: dict[str, str]) -> set[tuple[str, str]]:
    from itertools import combinations

    members: dict[str, list[str]] = {}
    for key, group in groups.items():
        members.setdefault(group, []).append(key)
    return {tuple(sorted(p)) for m in members.values() for p in combinations(m, 2)}


def score(table, keys: list[str], true_groups: dict[str, str]) -> dict:
    predicted = {k: f"alone:{k}" for k in keys}
    for key, group in zip(
        table.column("key").to_pylist(), table.column("group_id").to_pylist(), strict=False
    ):
        predicted[key] = f"g{group}"
    p, t = pairs_from_groups(predicted), pairs_from_groups(true_groups)
    hits = len(p & t)
    return {
        "true_pairs": len(t),
        "found_pairs": len(p),
        "precision": round(hits / len(p), 4) if p else 1.0,
        "recall": round(hits / len(t), 4) if t else 1.0,
    }


def evaluate(emb_dir: Path, true_groups: dict[str, str], label: str) -> dict:
    from pipeline.core.config import ImageDedupConfig
    from pipeline.dedup.image import META_COLUMNS, find_image_duplicates
    from pipeline.embed.phash import hamming_distance
    from pipeline.io.embeddings import load_metadata, load_unit_embeddings

    meta = load_metadata(emb_dir, META_COLUMNS)
    vectors = load_unit_embeddings(emb_dir)
    keys = meta.column("key").to_pylist()
    out: dict = {"dataset": label, "rows": len(keys)}

    def run(**options) -> dict:
        cfg = ImageDedupConfig(embeddings="-", out="-", **options)
        return score(find_image_duplicates(meta, vectors, cfg, semantic_model=False).table, keys, true_groups)

    out["exact_only"] = run(phash=False, semantic="off")
    out["phash_sweep"] = {
        r: run(phash_max_distance=r, semantic="off") for r in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18)
    }
    out["random_semantic"] = {
        t: run(semantic="on", semantic_threshold=t, phash_max_distance=12) for t in (0.95, 0.99, 0.999)
    }
    # Hamming distances: planted duplicate pairs vs pairs of different pictures.
    hashes = meta.column("phash").to_numpy().astype(np.uint64)
    index = {k: i for i, k in enumerate(keys)}
    true = pairs_from_groups(true_groups)
    dup_d = [int(hamming_distance(hashes[index[a]], hashes[index[b]])) for a, b in true]
    iu = np.triu_indices(len(keys), 1)
    all_d = hamming_distance(hashes[iu[0]], hashes[iu[1]])
    same = np.array(
        [(keys[i], keys[j]) in true or (keys[j], keys[i]) in true for i, j in zip(*iu, strict=False)]
    )
    cos = np.einsum("ij,ij->i", vectors[iu[0]], vectors[iu[1]])
    out["hamming_duplicate_pairs"] = {
        "max": max(dup_d) if dup_d else None,
        "p90": float(np.percentile(dup_d, 90)),
    }
    out["hamming_different_pictures_min"] = int(all_d[~same].min())
    out["random_cosine_duplicate_pairs_min"] = round(float(cos[same].min()), 4)
    out["random_cosine_different_pictures_max"] = round(float(cos[~same].max()), 4)
    return out


def run_quality(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq
    from test_image_dedup import planted_images

    from demo.data import download_demo, make_demo_data
    from pipeline.core.config import DemoConfig, DownloadConfig, EmbedConfig, RayConfig
    from pipeline.core.ray_runtime import ray_session
    from pipeline.embed.embed import run_embed

    results = []
    with tempfile.TemporaryDirectory() as tmp, ray_session(RayConfig(num_cpus=2, progress_bars=False)):
        tmp = Path(tmp)
        truth = planted_images(tmp / "planted" / "shards")
        run_embed(
            EmbedConfig(
                shards=str(tmp / "planted" / "shards"), out=str(tmp / "planted" / "emb"), log_every_s=600
            )
        )
        groups = {k: (g if g.startswith("dup:") else k) for k, g in truth.items()}
        results.append(evaluate(tmp / "planted" / "emb", groups, "tests/test_image_dedup.py planted set"))

        demo = tmp / "demo"
        make_demo_data(DemoConfig(out=str(demo)))
        download_demo(demo, DownloadConfig(url_list="-", out="-", skip_reencode=True, timeout=5), 64)
        run_embed(EmbedConfig(shards=str(demo / "shards"), out=str(demo / "emb"), log_every_s=600))
        meta = pq.read_table(demo / "emb" / "metadata", columns=["key", "url"]).to_pylist()
        by_name = {r["url"]: r for r in pq.read_table(demo / "truth.parquet").to_pylist()}
        groups = {}
        for row in meta:
            t = by_name[row["url"].rsplit("/", 1)[-1]]
            dup = t["demo_kind"] in ("near_duplicate", "verbatim")
            groups[row["key"]] = t["demo_group"] if dup else row["key"]
        results.append(evaluate(demo / "emb", groups, "demo dataset (demo.data)"))
    return {"machine": machine(), "results": results}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "gpus": faiss.get_num_gpus(),
        "load_average_at_end": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    perf = sub.add_parser("perf")
    perf.add_argument("--sizes", default="25000,100000,400000,1000000")
    perf.add_argument("--d", type=int, default=512)
    perf.add_argument(
        "--sample", type=int, default=5000, help="query rows for exact search above --full-exact-max"
    )
    perf.add_argument("--full-exact-max", type=int, default=100_000)
    perf.add_argument("--nprobe", type=int, default=8)
    perf.add_argument(
        "--multihash-max", type=int, default=100_000, help="time pHash multi-index hashing up to this N"
    )
    perf.add_argument("--seed", type=int, default=0)
    perf.add_argument("--json")
    quality = sub.add_parser("quality")
    quality.add_argument("--json")
    args = parser.parse_args()
    result = run_perf(args) if args.what == "perf" else run_quality(args)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
