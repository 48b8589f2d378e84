"""Caption dedup throughput and quality: this project's pipeline vs datasketch used the plain way.

Both sides get the same synthetic captions with planted duplicates and hard negatives
(:mod:`fixtures.planted_captions`), the same normaliser, shingles (character n-grams), threshold,
``num_perm`` and seed, and are scored with pairwise precision/recall against the planted truth.

* **ours**: :func:`pipeline.dedup.caption.find_caption_duplicates` end to end (normalise, exact
  pass, vectorised MinHash over distinct captions, banding, Jaccard + word-guard verification,
  union-find), in-process; with ``--ray`` also on a local Ray (timed after Ray is up and warm).
* **plain datasketch**: normalise, then one ``datasketch.MinHash`` per caption updated shingle by
  shingle, ``MinHashLSH(threshold, num_perm)`` insert of every caption, then a query per caption;
  every returned pair is a duplicate (datasketch does no verification), and groups are the
  connected components of those pairs.

    .venv/bin/python benchmarks/caption_dedup.py --rows 200000 [--plain-rows N] [--ray] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and tests/fixtures (planted captions)

from fixtures.planted_captions import generate, pair_scores
from pipeline.core.config import CaptionDedupConfig
from pipeline.dedup.caption import find_caption_duplicates
from pipeline.dedup.minhash import lsh_params
from pipeline.dedup.text_normalize import normalize_captions
from pipeline.dedup.union_find import connected_components


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def plain_datasketch(captions: list[str], cfg: CaptionDedupConfig) -> tuple[np.ndarray, dict]:
    """The plain way: MinHash per caption, shingle by shingle; LSH insert and query; no verification."""
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    normalized = normalize_captions(captions).to_pylist()
    t_norm = time.perf_counter()
    k = cfg.shingle_size
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=(cfg.fp_weight, cfg.fn_weight))
    sketches: dict[int, MinHash] = {}
    for i, text in enumerate(normalized):
        if not text:
            continue  # like ours: empty captions are never duplicates
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=cfg.minhash_scheme)
        for j in range(max(len(text) - k + 1, 1)):
            m.update(text[j : j + k].encode("utf-8"))
        sketches[i] = m
    t_hash = time.perf_counter()
    for i, m in sketches.items():
        lsh.insert(i, m)
    t_insert = time.perf_counter()
    pairs = [(i, j) for i, m in sketches.items() for j in lsh.query(m) if j > i]
    t_query = time.perf_counter()
    labels = connected_components(len(captions), np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    ended = time.perf_counter()
    return labels, {
        "seconds": round(ended - started, 3),
        "stage_seconds": {
            "normalize": round(t_norm - started, 3),
            "minhash": round(t_hash - t_norm, 3),
            "lsh_insert": round(t_insert - t_hash, 3),
            "lsh_query": round(t_query - t_insert, 3),
            "union_find": round(ended - t_query, 3),
        },
        "candidate_pairs": len(pairs),
        "lsh_bands": lsh.b,
        "lsh_rows": lsh.r,
    }


def shingle_separation(n: int, seed: int) -> list[dict]:
    """Exact Jaccard of planted typo pairs vs one-word hard negatives, per shingle kind.

    Pairs: members of one family whose normalised captions differ (typo variants), and each
    hard-negative base against the base it was made from (one slot word changed).
    """
    import itertools
    from collections import defaultdict

    planted = generate(n, seed=seed)
    norm = normalize_captions(planted.captions).to_pylist()
    members = defaultdict(list)
    for i, f in enumerate(planted.family.tolist()):
        members[f].append(i)
    positives = [
        (a, b) for idx in members.values() for a, b in itertools.combinations(idx, 2) if norm[a] != norm[b]
    ]
    base_row = {
        int(planted.family[i]): i for i, kind in enumerate(planted.kind) if kind in ("base", "negative")
    }
    negatives = [
        (base_row[f - 1], i)
        for f, i in base_row.items()
        if planted.kind[i] == "negative" and f - 1 in base_row
    ]

    def chars(k):
        return lambda t: {t[i : i + k] for i in range(max(len(t) - k + 1, 1))}

    def words(t):
        return set(t.split())

    def words12(t):
        w = t.split()
        return set(w) | {f"{x} {y}" for x, y in itertools.pairwise(w)}

    kinds = {"char 3": chars(3), "char 4": chars(4), "char 5": chars(5), "word 1": words, "word 1+2": words12}
    rows = []
    for name, fn in kinds.items():
        sets = {}

        def jac(a, b, fn=fn, sets=sets):
            sa = sets.setdefault(a, fn(norm[a]))
            sb = sets.setdefault(b, fn(norm[b]))
            return len(sa & sb) / len(sa | sb)

        pos = np.array([jac(a, b) for a, b in positives])
        neg = np.array([jac(a, b) for a, b in negatives])
        rows.extend(
            {
                "shingles": name,
                "threshold": t,
                "typo_pairs_kept": round(float((pos >= t).mean()), 3),
                "hard_negatives_joined": round(float((neg >= t).mean()), 3),
            }
            for t in (0.6, 0.7, 0.8)
        )
    return rows


def parameter_sweep(n: int, seed: int) -> list[dict]:
    """Ours end to end over shingle sizes and thresholds (word guard on), plus guard off at the default."""
    planted = generate(n, seed=seed)
    base = CaptionDedupConfig()
    grid = [(k, t, True) for k in (3, 4, 5) for t in (0.5, 0.6, 0.7, 0.8)]
    grid += [(base.shingle_size, base.threshold, False)]
    rows = []
    for k, t, guard in grid:
        cfg = dataclasses.replace(base, shingle_size=k, threshold=t, word_guard=guard)
        lsh_params(t, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
        run = find_caption_duplicates(planted.captions, cfg, use_ray=False)
        scores = pair_scores(planted.family, run.labels)
        rows.append(
            {
                "shingle_size": k,
                "threshold": t,
                "word_guard": guard,
                "lsh": f"{run.stats['lsh_bands']}x{run.stats['lsh_rows']}",
                "candidate_pairs": run.stats["candidate_pairs"],
                "seconds": run.stats["seconds"],
                "precision": round(scores["precision"], 4),
                "recall": round(scores["recall"], 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic captions")
    parser.add_argument(
        "--plain-rows", type=int, default=None, help="rows for plain datasketch (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted data")
    parser.add_argument("--ray", action="store_true", help="also time our Ray path (local Ray, all cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument(
        "--equal-recall-thresholds",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[0.65, 0.6, 0.55, 0.5],
        help="thresholds tried for ours, in order, until its recall reaches plain datasketch's",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead: shingle-kind separation and a (shingle size, threshold) sweep on --rows rows",
    )
    args = parser.parse_args()
    if args.sweep:
        results = {
            "command": "benchmarks/caption_dedup.py " + " ".join(sys.argv[1:]),
            "separation": shingle_separation(args.rows, args.seed),
        }
        for row in results["separation"]:
            print(json.dumps(row), flush=True)
        results["sweep"] = parameter_sweep(args.rows, args.seed)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return

    cfg = CaptionDedupConfig()
    lsh_params(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)  # warm datasketch's optimiser cache
    planted = generate(args.rows, seed=args.seed)
    results: dict = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "benchmarks/caption_dedup.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "rows": args.rows,
        "config": {
            k: getattr(cfg, k)
            for k in ("threshold", "shingle_size", "num_perm", "seed", "minhash_scheme", "word_guard")
        },
    }

    find_caption_duplicates(planted.captions[:2000], cfg, use_ray=False)  # warm imports and caches
    ours = find_caption_duplicates(planted.captions, cfg, use_ray=False)
    results["ours"] = {
        **{k: ours.stats[k] for k in ("seconds", "stage_seconds", "candidate_pairs", "verified_pairs")},
        "rows_per_s": round(args.rows / ours.stats["seconds"]),
        **pair_scores(planted.family, ours.labels),
    }
    print("ours (in-process):", json.dumps(results["ours"]), flush=True)

    if args.ray:
        import ray

        t = time.perf_counter()
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t
        ray_cfg = dataclasses.replace(
            cfg, ray_min_rows=0, batch_size=max(1, args.rows // (2 * os.cpu_count()))
        )
        find_caption_duplicates(planted.captions[:5000], ray_cfg, use_ray=True)  # warm the workers
        on_ray = find_caption_duplicates(planted.captions, ray_cfg, use_ray=True)
        ray.shutdown()
        results["ours_ray"] = {
            **{k: on_ray.stats[k] for k in ("seconds", "stage_seconds")},
            "ray_start_seconds": round(ray_start, 3),
            "batch_size": ray_cfg.batch_size,
            "rows_per_s": round(args.rows / on_ray.stats["seconds"]),
            "same_output_as_in_process": bool(on_ray.table.equals(ours.table)),
            **pair_scores(planted.family, on_ray.labels),
        }
        print("ours (Ray):", json.dumps(results["ours_ray"]), flush=True)

    n_plain = min(args.plain_rows or args.rows, args.rows)
    plain_labels, plain = plain_datasketch(planted.captions[:n_plain], cfg)
    ours_subset = ours
    if n_plain < args.rows:
        ours_subset = find_caption_duplicates(planted.captions[:n_plain], cfg, use_ray=False)
    results["plain_datasketch"] = {
        **plain,
        "rows": n_plain,
        "rows_per_s": round(n_plain / plain["seconds"]),
        **pair_scores(planted.family[:n_plain], plain_labels),
    }
    results["ours_on_plain_rows"] = {
        "rows": n_plain,
        "seconds": ours_subset.stats["seconds"],
        "rows_per_s": round(n_plain / ours_subset.stats["seconds"]),
        **pair_scores(planted.family[:n_plain], ours_subset.labels),
    }
    results["speedup_rows_per_s"] = round(
        results["ours_on_plain_rows"]["rows_per_s"] / results["plain_datasketch"]["rows_per_s"], 1
    )
    # Equal recall: ours verifies every candidate (Jaccard >= threshold, word guard), so at the same
    # threshold it may keep slightly fewer true pairs than plain LSH, which verifies nothing. Re-run
    # ours at lower thresholds until its recall is at least plain's, and time that run too.
    plain_recall = results["plain_datasketch"]["recall"]
    for threshold in args.equal_recall_thresholds:
        if results["ours_on_plain_rows"]["recall"] >= plain_recall:
            break
        lower = dataclasses.replace(cfg, threshold=threshold)
        lsh_params(lower.threshold, lower.num_perm, lower.fp_weight, lower.fn_weight)
        run = find_caption_duplicates(planted.captions[:n_plain], lower, use_ray=False)
        entry = {
            "threshold": threshold,
            "seconds": run.stats["seconds"],
            "rows_per_s": round(n_plain / run.stats["seconds"]),
            "candidate_pairs": run.stats["candidate_pairs"],
            **pair_scores(planted.family[:n_plain], run.labels),
        }
        results.setdefault("ours_lower_thresholds", []).append(entry)
        print("ours at threshold", threshold, json.dumps(entry), flush=True)
        if entry["recall"] >= plain_recall:
            results["speedup_at_equal_recall"] = round(
                entry["rows_per_s"] / results["plain_datasketch"]["rows_per_s"], 1
            )
            break
    results["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print("plain datasketch:", json.dumps(results["plain_datasketch"]), flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
