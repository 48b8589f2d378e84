"""LAION-scale bundle build (issue #10): time and peak memory per step, quality against planted truth.

    python benchmarks/scale.py --rows 1000000 --dim 512 --work /data/scale --json scale-1m.json
    python benchmarks/scale.py --rows 10000000 --dim 128 --work /data/scale --json scale-10m.json
    python benchmarks/scale.py --rows 100000 --work /tmp/scale -- --no-verify-checksums   # job flags after --

(10M rows at 512-d are 10 GB of float16 embeddings, and the G_dup reference and the exact search read
them all; where disk or time is short, 128-d keeps the data model: say which was run. At 64-d chance
within-cluster cosines approach 0.95, so prefer 128-d.)

1. **Data.** A synthetic folder in LAION's released layout with planted truth
   (:mod:`synthetic_laion`: clustered CLIP-like unit vectors, 2% near copies and 0.5% exact copies in
   groups of 2-5 with their pHash and image size, memorized and stock captions repeated a planted number
   of times), written once under ``--work`` partition by partition and reused while its parameters
   file matches.
2. **Build.** The public job, as a user runs it: ``jobs/build_artifacts.py --embeddings SRC --out
   BUNDLE --embed-model synthetic [job flags after --]`` in a subprocess (a fresh bundle each run, local
   Ray, ``RAY_USAGE_STATS_ENABLED=0``). Every 0.5 s this process reads ``/proc``: the RSS of the job's
   process (the driver) and of every descendant (a local Ray's gcs, raylet, dashboard and workers),
   plus any ``ray::`` process left without a parent whose ``RAY_RAYLET_PID`` is the job's raylet.
   Reported: peak RSS of the driver, of each process (the top 5, named by their command line at the
   time of their peak), of the sum over all of them (RSS counts mapped files and Ray's shared object
   store in every process mapping them, so the sum of the anonymous parts is given too); and per step
   the same peaks, a step's samples being those taken before its done marker
   (``_work/steps/<step>.done.json``) and after the previous one. Step seconds come from the manifest
   (``steps``), the total from the wall clock (it includes Python and Ray start-up, the manifest and
   the checksum pass).
3. **Quality**, from the bundle's files (no internals):

   * image pairs: precision and recall of the pairs inside predicted groups (``image_duplicates.parquet``
     ``group_id``) against the pairs inside planted groups (truth ``image_group``), by group-size
     arithmetic (true positives = sum over predicted x planted group intersections of C(n, 2));
   * semantic recall: for a seeded sample of rows (``--sample`` uniform, plus ``--sample-grouped`` drawn
     from planted groups, where the pairs are), every pair with cosine >= the run's semantic threshold
     found by exact search over all N rows (streamed partition by partition, float32 blocks); recall =
     the fraction whose two rows are in one predicted group. Pairs that are not planted are counted too
     (the generator's chance pairs: there should be none);
   * index recall@k: the manifest's ``index.recall_at_k`` (the build's own self-check);
   * caption pairs: precision and recall of ``caption_duplicates.parquet`` groups against the planted
     caption groups (memorized and stock captions);
   * G_dup agreement, when the bundle's reader has ``duplicate_caption_near(embedding, k, min_count)``:
     on ``--gdup-queries`` seeded queries (half near rows of memorized-caption groups, half near random
     rows) its caption against the authors' rule computed by brute force here: exact top-``k`` rows by
     cosine over all N, their captions counted by normalised form
     (:func:`pipeline.dedup.text_normalize.normalize_captions`), the dominant one if its count reaches
     ``min_count`` else none.

Prints one JSON result and a Markdown block for BENCHMARKS.md (machine, date, command, the row).
Issue #10's targets at 1M x 512-d are checked in ``criteria``: total <= 300 s, no process above 2 GB RSS,
driver under 0.5 GB, image pair precision >= 0.98 and recall >= 0.97, semantic recall >= 0.99, index
recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from synthetic_laion import SyntheticLaion, read_truth

from pipeline.dedup.text_normalize import normalize_captions
from pipeline.io.embeddings import IMG_EMB, list_partitions, metadata_path

# Bundle file names, as documented in the README (read as files: the harness uses no build internals).
MANIFEST = "manifest.json"
IMAGE_DUPLICATES = "image_duplicates.parquet"
CAPTION_DUPLICATES = "caption_duplicates.parquet"
MARKERS = Path("_work") / "steps"

TARGETS = {
    "total_seconds_max": 300,
    "process_rss_mb_max": 2048,
    "driver_rss_mb_max": 512,
    "image_precision_min": 0.98,
    "image_recall_min": 0.97,
    "semantic_recall_min": 0.99,
    "index_recall_min": 0.95,
}
INTERVAL_S = 0.5
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 << 20


# ----------------------------------------------------------------------------------------------
# Memory: /proc sampling of the job's process tree.
# ----------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, start time in clock ticks since boot, rss bytes) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), int(fields[19]), int(fields[21]) * PAGE


def _anon(pid: int) -> int:
    """Resident bytes that are neither file-backed nor shared (``statm``: resident - shared)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return max(0, int(fields[1]) - int(fields[2])) * PAGE


def _cmdline(pid: int, width: int = 90) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = raw.rstrip(b"\0").decode(errors="replace").split("\0")
    if words and words[0].startswith("ray::"):
        return words[0][:width]
    text = " ".join(Path(w).name if i == 0 or w.startswith("/") else w for i, w in enumerate(words))
    return text[:width]


def _raylet_of(pid: int) -> int | None:
    """The ``RAY_RAYLET_PID`` in a Ray worker's environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"RAY_RAYLET_PID="):
            try:
                return int(entry.split(b"=", 1)[1])
            except ValueError:
                return None
    return None


class MemorySampler(threading.Thread):
    """Samples the RSS of a process tree every ``interval`` seconds until :meth:`stop`.

    ``samples`` holds (monotonic time, driver bytes, sum bytes, largest process bytes, its pid, sum of
    the anonymous part: RSS less file-backed and shared pages, which RSS counts in every process mapping
    them, e.g. Ray's object store);
    ``peaks`` per pid: (peak bytes, command line then).
    """

    def __init__(self, root_pid: int, interval: float = INTERVAL_S):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.uid = os.getuid()
        root = _stat(root_pid)
        self.root_start = root[1] if root else 0
        self.samples: list[tuple[float, int, int, int, int, int]] = []
        self.raylets: set[int] = set()  # the raylets of the job's own Ray (its descendants)
        self.peaks: dict[int, tuple[int, str]] = {}
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            self.sample()
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def processes(self) -> dict[int, int]:
        """pid -> rss of the job's processes now."""
        table: dict[int, tuple[int, int, int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                info = _stat(int(entry.name))
                if info is not None:
                    table[int(entry.name)] = info
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = set(), [self.root_pid] if self.root_pid in table else []
        while todo:
            pid = todo.pop()
            ours.add(pid)
            todo.extend(children.get(pid, []))
        for pid in ours:
            if pid not in self.raylets and _cmdline(pid).split(" ", 1)[0] == "raylet":
                self.raylets.add(pid)
        for pid, (_, start, _) in table.items():
            if pid in ours or start < self.root_start:
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid != self.uid or not _cmdline(pid).startswith("ray::"):
                    continue
            except OSError:
                continue
            # A ray:: worker outside the tree (orphaned) is ours when its raylet was (Ray sets
            # RAY_RAYLET_PID in every worker's environment); other agents' Ray workers are not.
            if _raylet_of(pid) in self.raylets:
                ours.add(pid)
        return {pid: table[pid][2] for pid in ours if table[pid][2] > 0}  # zombies have none

    def sample(self) -> None:
        rss = self.processes()
        if not rss:
            return
        for pid, value in rss.items():
            if value > self.peaks.get(pid, (-1, ""))[0]:
                self.peaks[pid] = (value, _cmdline(pid))
        top = max(rss, key=rss.__getitem__)
        anon = sum(_anon(pid) for pid in rss)
        self.samples.append(
            (time.monotonic(), rss.get(self.root_pid, 0), sum(rss.values()), rss[top], top, anon)
        )


def step_markers(bundle: Path, since: float) -> list[tuple[str, float]]:
    """(step, wall-clock mtime) of the done markers the build wrote after ``since``, in time order."""
    folder = bundle / MARKERS
    if not folder.is_dir():
        return []
    found = [
        (path.name.removesuffix(".done.json"), path.stat().st_mtime) for path in folder.glob("*.done.json")
    ]
    return sorted([(name, t) for name, t in found if t >= since], key=lambda item: item[1])


def memory_report(sampler: MemorySampler, markers: list[tuple[str, float]], clock_offset: float) -> dict:
    """Peaks overall, per process (top 5) and per step (samples up to the step's marker)."""
    samples = sampler.samples
    if not samples:
        return {"samples": 0}
    top = sorted(sampler.peaks.items(), key=lambda kv: -kv[1][0])[:5]
    out: dict = {
        "interval_s": sampler.interval,
        "samples": len(samples),
        "processes_seen": len(sampler.peaks),
        "driver_peak_mb": round(max(s[1] for s in samples) / MB),
        "sum_peak_mb": round(max(s[2] for s in samples) / MB),
        "sum_anon_peak_mb": round(max(s[5] for s in samples) / MB),
        "max_process_peak_mb": round(max(s[3] for s in samples) / MB),
        "top_processes": [
            {"pid": pid, "peak_mb": round(value / MB), "cmd": cmd, "driver": pid == sampler.root_pid}
            for pid, (value, cmd) in top
        ],
    }
    per_step: dict[str, dict] = {}
    bounds = [(name, t - clock_offset) for name, t in markers] + [("manifest_and_checks", float("inf"))]
    lo = -float("inf")
    for name, hi in bounds:
        chunk = [s for s in samples if lo < s[0] <= hi]
        lo = hi
        if not chunk:
            continue
        biggest = max(chunk, key=lambda s: s[3])
        per_step[name] = {
            "driver_peak_mb": round(max(s[1] for s in chunk) / MB),
            "sum_peak_mb": round(max(s[2] for s in chunk) / MB),
            "max_process_peak_mb": round(biggest[3] / MB),
            "max_process": sampler.peaks.get(biggest[4], (0, "?"))[1],
        }
    out["per_step"] = per_step
    return out


# ----------------------------------------------------------------------------------------------
# The build.
# ----------------------------------------------------------------------------------------------


def run_build(source: Path, bundle: Path, extra: list[str], logs: Path) -> dict:
    """The build job in a subprocess, sampled; its summary, wall time, steps and memory."""
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "build_artifacts.py"),
        "--embeddings",
        str(source),
        "--out",
        str(bundle),
        "--embed-model",
        "synthetic",
        *extra,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if not any(a.startswith("--ray-address") for a in extra):
        env.pop("RAY_ADDRESS", None)  # a local Ray, started by the driver: its processes are descendants
    print(f"build: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    wall_start, started = time.time(), time.monotonic()
    clock_offset = wall_start - started  # wall-clock time = monotonic + offset
    with (logs / "build.stdout").open("w") as out, (logs / "build.log").open("w") as err:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        sampler = MemorySampler(job.pid)
        sampler.start()
        try:
            rc = job.wait()
        except BaseException:
            os.killpg(job.pid, signal.SIGTERM)
            job.wait(timeout=60)
            raise
        finally:
            sampler.stop()
    wall = time.monotonic() - started
    lines = (logs / "build.stdout").read_text().strip().splitlines()
    summary = None
    if lines:
        try:
            summary = json.loads(lines[-1])
        except ValueError:
            summary = None
    result: dict = {
        "command": shlex.join(cmd),
        "returncode": rc,
        "wall_seconds": round(wall, 1),
        "summary": summary,
    }
    markers = step_markers(bundle, wall_start - 1)
    result["marker_timeline_s"] = {name: round(t - wall_start, 1) for name, t in markers}
    manifest = read_json(bundle / MANIFEST)
    if manifest:
        order = {name: i for i, (name, _) in enumerate(markers)}  # the order the steps ran in
        recorded = sorted(manifest.get("steps", {}).items(), key=lambda kv: order.get(kv[0], len(order)))
        steps = {k: v.get("seconds") for k, v in recorded if v.get("seconds") is not None}
        result["steps_seconds"] = steps
        result["outside_steps_seconds"] = round(wall - sum(steps.values()), 1)
    result["memory"] = memory_report(sampler, markers, clock_offset)
    if rc != 0:
        tail = (logs / "build.log").read_text().splitlines()[-30:]
        result["log_tail"] = tail
        print("\n".join(tail), file=sys.stderr)
    return result


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Quality.
# ----------------------------------------------------------------------------------------------


def pair_quality(
    pred_rows: np.ndarray, pred_groups: np.ndarray, true_rows: np.ndarray, true_groups: np.ndarray
) -> dict:
    """Precision and recall of the pairs inside groups, by counting (no pair is enumerated).

    Each side lists only rows in groups of two or more (a row at most once).
    """

    def pairs(groups: np.ndarray) -> int:
        _, counts = np.unique(groups, return_counts=True)
        return int((counts * (counts - 1) // 2).sum())

    _, ip, it = np.intersect1d(pred_rows, true_rows, assume_unique=True, return_indices=True)
    if len(ip):
        _, counts = np.unique(np.stack([pred_groups[ip], true_groups[it]]), axis=1, return_counts=True)
        hits = int((counts * (counts - 1) // 2).sum())
    else:
        hits = 0
    found, true = pairs(pred_groups), pairs(true_groups)
    return {
        "true_pairs": true,
        "found_pairs": found,
        "correct_pairs": hits,
        "precision": round(hits / found, 4) if found else 1.0,
        "recall": round(hits / true, 4) if true else 1.0,
    }


def predicted_image_groups(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, group ids) of the rows in image groups, sorted by row id."""
    table = pq.read_table(bundle / IMAGE_DUPLICATES, columns=["row_id", "group_id"])
    rows, groups = table.column("row_id").to_numpy(), table.column("group_id").to_numpy()
    order = np.argsort(rows)
    return rows[order], groups[order]


def planted(source: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, planted group) of the rows in a planted group (``column`` >= 0), sorted by row id."""
    truth = read_truth(source, ["row_id", column])
    groups = truth.column(column).to_numpy()
    keep = groups >= 0
    return truth.column("row_id").to_numpy()[keep], groups[keep]


def predicted_caption_groups(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, group ids) of the rows in caption groups of 2 or more (one file row per bundle row)."""
    rows, groups, offset = [], [], 0
    for batch in pq.ParquetFile(bundle / CAPTION_DUPLICATES).iter_batches(columns=["group_id", "group_size"]):
        size = batch.column("group_size").to_numpy()
        keep = np.flatnonzero(size > 1)
        rows.append(keep + offset)
        groups.append(batch.column("group_id").to_numpy()[keep])
        offset += batch.num_rows
    return np.concatenate(rows), np.concatenate(groups)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gather(source: Path, rows: np.ndarray) -> np.ndarray:
    """Unit float32 vectors of ``rows`` (any order) from the memory-mapped partitions."""
    parts = list_partitions(source)
    starts = np.cumsum([0] + [p.num_rows() for p in parts])
    out = np.empty((len(rows), parts[0].embeddings(IMG_EMB).shape[1]), dtype=np.float32)
    which = np.searchsorted(starts, rows, side="right") - 1
    for p in np.unique(which):
        sel = which == p
        out[sel] = parts[p].embeddings(IMG_EMB)[rows[sel] - starts[p]]
    return unit(out)


def exact_scan(
    source: Path, queries: np.ndarray, threshold: float, n_threshold: int, k: int, block: int = 16_384
) -> tuple[list[tuple[int, int, float]], np.ndarray, np.ndarray]:
    """One streamed pass of exact cosine search over every row of ``source``.

    The first ``n_threshold`` queries get every (query, row, cosine) at or above ``threshold``; the
    others their exact top ``k`` (row ids, scores), best first.
    """
    hits: list[tuple[int, int, float]] = []
    top_q = queries[n_threshold:]
    best_s = np.full((len(top_q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(top_q), 0), dtype=np.int64)
    offset = 0
    for part in list_partitions(source):
        data = part.embeddings(IMG_EMB)
        for lo in range(0, len(data), block):
            x = unit(data[lo : lo + block])
            scores = queries @ x.T
            q, j = np.nonzero(scores[:n_threshold] >= threshold)
            hits += zip(q.tolist(), (j + offset + lo).tolist(), scores[q, j].tolist(), strict=True)
            if len(top_q):
                s = np.concatenate([best_s, scores[n_threshold:]], axis=1)
                i = np.concatenate(
                    [best_i, np.broadcast_to(np.arange(lo, lo + len(x)) + offset, (len(top_q), len(x)))],
                    axis=1,
                )
                if s.shape[1] > k:
                    keep = np.argpartition(-s, k - 1, axis=1)[:, :k]
                    s, i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
                best_s, best_i = s, i
        offset += len(data)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return hits, np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


def semantic_recall(
    rows: np.ndarray,
    n_uniform: int,
    hits: list[tuple[int, int, float]],
    pred: tuple[np.ndarray, np.ndarray],
    truth: tuple[np.ndarray, np.ndarray],
) -> dict:
    """Recall of the exact pairs (query row, other row) at or above the threshold: same predicted group."""
    pred_rows, pred_groups = pred
    true_rows, true_groups = truth

    def lookup(keys: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(keys, at), 0, max(len(keys) - 1, 0))
        found = (keys[pos] == at) if len(keys) else np.zeros(len(at), bool)
        return np.where(found, values[pos] if len(keys) else -1, -1)

    def score(subset: set[tuple[int, int]]) -> dict:
        if not subset:
            return {"pairs": 0}
        pairs = np.array(sorted(subset), dtype=np.int64)
        ga, gb = lookup(pred_rows, pred_groups, pairs[:, 0]), lookup(pred_rows, pred_groups, pairs[:, 1])
        ta, tb = lookup(true_rows, true_groups, pairs[:, 0]), lookup(true_rows, true_groups, pairs[:, 1])
        same = (ga >= 0) & (ga == gb)
        planted_pair = (ta >= 0) & (ta == tb)
        return {
            "pairs": len(pairs),
            "in_one_predicted_group": int(same.sum()),
            "recall": round(float(same.mean()), 4),
            "not_planted_pairs": int((~planted_pair).sum()),
        }

    uniform, grouped = set(), set()
    for q, j, _ in hits:
        row = int(rows[q])
        if j == row:
            continue
        (uniform if q < n_uniform else grouped).add((min(row, j), max(row, j)))
    return {
        "uniform_sample": score(uniform),
        "grouped_sample": score(grouped),
        "all": score(uniform | grouped),
    }


def captions_of(source: Path, rows: np.ndarray) -> dict[int, str]:
    """Normalised caption of each of ``rows``, read from the partitions that hold them."""
    wanted = np.unique(rows)
    out: dict[int, str] = {}
    offset = 0
    for part in list_partitions(source):
        n = part.num_rows()
        local = wanted[(wanted >= offset) & (wanted < offset + n)] - offset
        if len(local):
            column = pq.read_table(metadata_path(source, part.name), columns=["caption"]).column("caption")
            texts = normalize_captions(column.take(pa.array(local))).to_pylist()
            out.update(zip((local + offset).tolist(), texts, strict=True))
        offset += n
    return out


def reference_caption(neighbours: np.ndarray, captions: dict[int, str], min_count: int) -> str | None:
    """The authors' rule: the most frequent (normalised, non-empty) caption among the neighbours, if it
    occurs at least ``min_count`` times (ties: the one of the nearest neighbour)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for rank, row in enumerate(neighbours.tolist()):
        text = captions.get(row) or ""
        if text:
            counts[text] = counts.get(text, 0) + 1
            first.setdefault(text, rank)
    if not counts:
        return None
    best = max(counts, key=lambda t: (counts[t], -first[t]))
    return best if counts[best] >= min_count else None


def gdup_queries(source: Path, info: dict, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` query vectors: half near rows of memorized-caption groups (one group after another, so
    every planted count is asked), half near random rows; (vectors, kind: 1 memorized, 0 random)."""
    rng = np.random.default_rng(seed + 3)
    rows_c, groups_c = planted(source, "caption_group")
    memorized = info["memorized_captions"]
    rows = []
    for q in range(n // 2):
        members = rows_c[groups_c == q % memorized]
        if len(members):
            rows.append(int(rng.choice(members)))
    kind = [1] * len(rows)
    total = info["params"]["rows"]
    rows += rng.choice(total, n - len(rows), replace=False).tolist()
    kind += [0] * (n - len(kind))
    base = gather(source, np.array(rows, dtype=np.int64))
    noise = unit(rng.standard_normal(base.shape).astype(np.float32)) * 0.1
    return unit(base + noise), np.array(kind)


def gdup_agreement(
    bundle: Path, queries: np.ndarray, kinds: np.ndarray, reference: list[str | None], k: int, min_count: int
) -> dict:
    from pipeline.bundle.reader import Bundle, open_bundle

    if not hasattr(Bundle, "duplicate_caption_near"):
        print(
            "G_dup: the bundle reader has no duplicate_caption_near yet: agreement skipped", file=sys.stderr
        )
        return {"skipped": "pipeline.bundle.reader.Bundle has no duplicate_caption_near"}
    opened = open_bundle(bundle, verify=False)
    answers = []
    started = time.monotonic()
    for q in queries:
        got = opened.duplicate_caption_near(q, k=k, min_count=min_count)
        text = getattr(got, "caption", None)
        answers.append(normalize_captions([text]).to_pylist()[0] if text else None)
    seconds = time.monotonic() - started
    agree = np.array([a == r for a, r in zip(answers, reference, strict=True)])
    ref_some = np.array([r is not None for r in reference])
    got_some = np.array([a is not None for a in answers])
    return {
        "queries": len(queries),
        "agreement": round(float(agree.mean()), 4),
        "agreement_memorized_half": round(float(agree[kinds == 1].mean()), 4) if (kinds == 1).any() else None,
        "agreement_random_half": round(float(agree[kinds == 0].mean()), 4) if (kinds == 0).any() else None,
        "both_caption_same": int((agree & ref_some).sum()),
        "both_none": int((agree & ~ref_some).sum()),
        "reference_only": int((ref_some & ~got_some).sum()),
        "method_only": int((~ref_some & got_some).sum()),
        "different_caption": int((ref_some & got_some & ~agree).sum()),
        "ms_per_query": round(1000 * seconds / max(1, len(queries)), 2),
    }


def attempt(out: dict, key: str, compute):
    """``compute()``, or None with the error recorded as ``out[key]`` (a stage mid-change may write
    files the harness cannot read: the other measures still come)."""
    try:
        return compute()
    except Exception as exc:  # any failure is reported, not raised
        out[key] = f"{type(exc).__name__}: {exc}"
        print(f"quality: {key}: {out[key]}", file=sys.stderr)
        return None


def quality(bundle: Path, source: Path, info: dict, args: argparse.Namespace) -> dict:
    manifest = read_json(bundle / MANIFEST) or {}
    thresholds = manifest.get("thresholds", {})
    threshold = args.threshold or thresholds.get("image_semantic_threshold") or 0.95
    out: dict = {}
    index = manifest.get("index", {})
    out["index"] = {k: index.get(k) for k in ("factory", "recall_at_k", "recall_k", "recall_queries")}

    started = time.monotonic()
    truth = planted(source, "image_group")
    pred = attempt(out, "image_pairs_error", lambda: predicted_image_groups(bundle))
    if pred is not None:
        out["image_pairs"] = pair_quality(*pred, *truth)
    captions = attempt(out, "caption_pairs_error", lambda: predicted_caption_groups(bundle))
    if captions is not None:
        out["caption_pairs"] = pair_quality(*captions, *planted(source, "caption_group"))

    # One exact pass over all rows: sampled rows' pairs above the threshold, G_dup queries' top k.
    n = info["params"]["rows"]
    rng = np.random.default_rng(args.seed + 1)
    uniform = np.sort(rng.choice(n, min(args.sample, n), replace=False))
    grouped = np.sort(rng.choice(truth[0], min(args.sample_grouped, len(truth[0])), replace=False))
    rows = np.concatenate([uniform, grouped])
    queries, kinds = gdup_queries(source, info, args.gdup_queries, args.seed)
    scan_started = time.monotonic()
    hits, top_rows, _ = exact_scan(
        source, np.concatenate([gather(source, rows), queries]), threshold, len(rows), args.gdup_k
    )
    out["semantic"] = {
        "threshold": threshold,
        "sample_uniform": len(uniform),
        "sample_grouped": len(grouped),
        **(semantic_recall(rows, len(uniform), hits, pred, truth) if pred is not None else {}),
        "exact_scan_seconds": round(time.monotonic() - scan_started, 1),
    }
    captions = captions_of(source, top_rows.ravel())
    reference = [reference_caption(r, captions, args.gdup_min_count) for r in top_rows]
    out["gdup"] = {
        "k": args.gdup_k,
        "min_count": args.gdup_min_count,
        "reference_with_caption": sum(r is not None for r in reference),
        "reference_with_caption_memorized_half": sum(
            r is not None for r, kind in zip(reference, kinds, strict=True) if kind == 1
        ),
    }
    agreement = attempt(
        out["gdup"],
        "agreement_error",
        lambda: gdup_agreement(bundle, queries, kinds, reference, args.gdup_k, args.gdup_min_count),
    )
    out["gdup"].update(agreement or {})
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        mem_kb = 0
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / (1 << 20), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def criteria(result: dict) -> dict:
    build, q = result.get("build", {}), result.get("quality", {})
    memory = build.get("memory", {})
    image, semantic = q.get("image_pairs", {}), q.get("semantic", {}).get("all", {})
    recall_at_k = q.get("index", {}).get("recall_at_k")
    checks = {
        "total_seconds": (build.get("wall_seconds"), TARGETS["total_seconds_max"], "<="),
        "max_process_rss_mb": (memory.get("max_process_peak_mb"), TARGETS["process_rss_mb_max"], "<="),
        "driver_rss_mb": (memory.get("driver_peak_mb"), TARGETS["driver_rss_mb_max"], "<"),
        "image_precision": (image.get("precision"), TARGETS["image_precision_min"], ">="),
        "image_recall": (image.get("recall"), TARGETS["image_recall_min"], ">="),
        "semantic_recall": (semantic.get("recall"), TARGETS["semantic_recall_min"], ">="),
        "index_recall_at_k": (recall_at_k, TARGETS["index_recall_min"], ">="),
    }
    out = {}
    for name, (value, target, op) in checks.items():
        ok = None
        if value is not None:
            ok = {"<=": value <= target, "<": value < target, ">=": value >= target}[op]
        out[name] = {"value": value, "target": f"{op} {target}", "ok": ok}
    return out


def markdown(result: dict) -> str:
    b, q, m = result.get("build", {}), result.get("quality", {}), result["machine"]
    mem = b.get("memory", {})
    steps = b.get("steps_seconds", {})
    image, caption = q.get("image_pairs", {}), q.get("caption_pairs", {})
    semantic, gdup = q.get("semantic", {}).get("all", {}), q.get("gdup", {})

    def pr(d: dict) -> str:
        return f"{d.get('precision', '-')} / {d.get('recall', '-')}" if d else "-"

    step_text = ", ".join(f"{k} {v:.0f}" for k, v in steps.items()) or "-"
    per_step = mem.get("per_step", {})
    step_mem = (
        ", ".join(f"{k} {v['max_process_peak_mb']}/{v['sum_peak_mb']}" for k, v in per_step.items()) or "-"
    )
    agreement = gdup.get("agreement", gdup.get("skipped", "-"))
    head = (
        "| rows x dim | total s | steps (s) | driver peak MB | largest process MB | sum RSS MB "
        "| per step: largest/sum MB | image P / R | semantic recall | index recall@k | caption P / R "
        "| G_dup agreement |"
    )
    row = (
        f"| {result['rows']:,} x {result['dim']} | {b.get('wall_seconds', '-')} | {step_text} "
        f"| {mem.get('driver_peak_mb', '-')} | {mem.get('max_process_peak_mb', '-')} "
        f"| {mem.get('sum_peak_mb', '-')} "
        f"| {step_mem} | {pr(image)} | {semantic.get('recall', '-')} ({semantic.get('pairs', 0)} pairs) "
        f"| {q.get('index', {}).get('recall_at_k', '-')} ({q.get('index', {}).get('factory', '-')}) "
        f"| {pr(caption)} | {agreement} |"
    )
    return "\n".join(
        [
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; {m['date_utc']} UTC; "
            f"`{result['command']}`",
            "",
            head,
            "|" + "---|" * head.count(" | ") + "---|",
            row,
        ]
    )


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part-rows", type=int, default=100_000, help="rows per partition of the data")
    parser.add_argument("--work", required=True, help="folder for the data (kept, reused) and the bundle")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--keep", action="store_true", help="keep the bundle after the run")
    parser.add_argument(
        "--reuse-bundle", action="store_true", help="no build: score the bundle a --keep run left"
    )
    parser.add_argument("--gen-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--sample", type=int, default=1000, help="uniform sample rows for semantic recall")
    parser.add_argument("--sample-grouped", type=int, default=1000, help="sample rows of planted groups")
    parser.add_argument("--threshold", type=float, default=None, help="default: the manifest's")
    parser.add_argument("--gdup-queries", type=int, default=200)
    parser.add_argument("--gdup-k", type=int, default=1000)
    parser.add_argument("--gdup-min-count", type=int, default=21)
    args = parser.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.rows}x{args.dim}-s{args.seed}"
    source, bundle, logs = work / f"data-{tag}", work / f"bundle-{tag}", work / f"logs-{tag}"
    logs.mkdir(exist_ok=True)
    result: dict = {
        "rows": args.rows,
        "dim": args.dim,
        "seed": args.seed,
        "command": shlex.join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "machine": machine(),
        "targets": TARGETS,
    }
    data = SyntheticLaion(args.rows, args.dim, args.seed, args.part_rows)
    reused = data.matches(source)
    info = data.ensure(source, args.gen_workers)
    result["data"] = {
        "folder": str(source),
        "reused": reused,
        **{k: v for k, v in info.items() if k != "partitions"},
    }
    print(json.dumps({"data": result["data"]}), flush=True)

    if args.reuse_bundle and (bundle / MANIFEST).is_file():
        result["build"] = {"reused": str(bundle)}
    else:
        if bundle.exists():
            shutil.rmtree(bundle)
        result["build"] = run_build(source, bundle, extra, logs)
        print(json.dumps({"build": result["build"]}), flush=True)
    if (bundle / MANIFEST).is_file() and result["build"].get("returncode", 0) == 0:
        result["quality"] = quality(bundle, source, info, args)
    result["criteria"] = criteria(result)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.keep and not args.reuse_bundle and bundle.exists():
        shutil.rmtree(bundle)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
