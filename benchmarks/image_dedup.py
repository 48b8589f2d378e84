"""Image dedup quality on the project's planted photographs (speed and scale: benchmarks/scale.py).

    python benchmarks/image_dedup.py quality --json quality.json

``quality``: precision and recall of duplicate *pairs* (every pair inside a predicted group against
every pair inside a planted group) on the project's planted data: the test set of
``tests/test_image_dedup.py`` and the demo dataset (``demo.data``), both embedded by the real
embed stage with the offline tiny model; pHash radius swept, and the random-weight semantic pass shown
for what it is.
"""

from __future__ import annotations

import argparse
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
    # Groups as plain connected components (chains allowed) against groups verified against their
    # representative (the default), over the same pairs.
    out["phash_sweep_single_linkage"] = {
        r: run(phash_max_distance=r, semantic="off", linkage="single") for r in (12, 14, 16, 18, 20)
    }
    out["phash_sweep"] |= {r: run(phash_max_distance=r, semantic="off") for r in (20,)}
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
    quality = sub.add_parser("quality")
    quality.add_argument("--json")
    args = parser.parse_args()
    result = run_quality(args)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
