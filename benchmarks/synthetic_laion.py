"""Synthetic LAION-layout embedding folders with planted truth, written partition by partition.

    python benchmarks/synthetic_laion.py --rows 100000 --dim 512 --out /tmp/laion100k

Writes the layout of LAION's released embeddings (what ``jobs/build_artifacts.py --embeddings`` reads),
plus the truth the benchmarks score against::

    img_emb/img_emb_{i}.npy          float16 (rows, dim), L2-normalised
    metadata/metadata_{i}.parquet    pipeline.io.embeddings.METADATA_SCHEMA (key, caption, url, sha256,
                                     width, height, shard, phash uint64), labelled embed_model=synthetic,
                                     semantic=true
    truth/truth_{i}.parquet          row_id, image_group, caption_group (planted; -1: none)
    synthetic_laion.json             the parameters and counts, written last (a folder without it, or
                                     with other parameters, is incomplete or another data set)

Each partition of ``part_rows`` rows is computed on its own from the seed and a small global plan (the
planted copies and caption groups: a few percent of N as integers), so memory is bounded by one
partition whatever N is (10M x 512 float16 would be 10 GB), and partitions can be written in parallel.

The data model (every quantity a pure function of the seed and the row id):

* **Vectors**, "CLIP-like": ``normalise(a*m + centre[cluster(row)] + s(row) * z(row))`` with ``m`` one
  global direction (CLIP embeddings sit in a cone: unrelated images have cosine ~0.2-0.3), one centre
  per ~1,000 rows, ``z(row)`` Gaussian noise from a counter-based RNG (Philox at counter ``row``, so any
  row can be recomputed anywhere) and ``s(row)`` uniform in [0.6, 0.9]. Two unrelated rows of one
  cluster have cosine ~0.65-0.8 (at 512-d the largest chance cosine stays well below 0.9, see
  :func:`cosine_profile`), of two clusters ~0.2-0.3, so no chance pair reaches 0.95.
* **Near copies** (2% of rows; re-encodes of a *source* row): ``normalise(v_src + t * w)`` with ``w`` a
  random unit vector and ``t`` uniform in [0.1, 0.25] (cosine 0.970-0.995 to the source), pHash =
  the source's with 0-6 random bits flipped, their own sha256, width and height 256-384 (sources are
  512x512: the largest image of their group, hence its representative).
* **Exact copies** (0.5% of rows): the source's vector (bit for bit), sha256, pHash, width and height.
* Copies come in planted groups of one source and 1-4 copies (2-5 images), the source anywhere in the
  folder (usually another partition). Copy-copy cosines can fall below 0.95 (two independent
  perturbations): such pairs join through their source.
* **Every other row**: a random 64-bit pHash (uint64, never 0), a unique sha256, width and height
  256-512.
* **Captions**: 8 words of a 20,000-word vocabulary (``w00000`` ... ``w19999``), unique per row, except
  *memorized* captions: ``min(500, max(16, N/2000))`` distinct ones, the j-th repeated
  ``MEMORIZED_COUNTS[j % 8]`` times (5 ... 300) on the rows of one planted image group plus rows of one
  cluster (the neighbours of that image, as LAION's memorized images carry their duplicated caption);
  a third of those rows spell it differently (capitalised, a stock-site suffix) but normalise equal
  (:mod:`pipeline.dedup.text_normalize`); and 2% of rows carry one of 200 generic stock captions
  (``a repeated stock caption 17``), spread at random.
* **Truth**: ``image_group`` is the source's row id for the source and its copies, else -1;
  ``caption_group`` is ``j`` for the j-th memorized caption, ``n_memorized + i`` for stock caption i,
  else -1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from pipeline.core.storage import atomic_write_json, atomic_write_table
from pipeline.io.embeddings import IMG_EMB, METADATA_SCHEMA, embedding_path, metadata_path

GENERATOR_VERSION = 1
PARAMS_NAME = "synthetic_laion.json"
TRUTH = "truth"
OURS = {IMG_EMB, "metadata", TRUTH, PARAMS_NAME}  # what a folder of ours holds (it may be replaced)
TRUTH_SCHEMA = pa.schema([("row_id", pa.int64()), ("image_group", pa.int64()), ("caption_group", pa.int64())])

ROWS_PER_CLUSTER = 1_000
MEAN_WEIGHT = math.sqrt(0.4)  # a: cosine ~0.2-0.3 between clusters
NOISE_SCALE = (0.6, 0.9)  # s(row): cosine ~0.65-0.8 within a cluster
NEAR_COPY_FRACTION = 0.02
EXACT_COPY_FRACTION = 0.005
COPY_DISTANCE = (0.1, 0.25)  # t: cosine 1/sqrt(1+t^2) = 0.970-0.995 to the source
COPIES_PER_GROUP = (1, 2, 3, 4)  # groups of 2-5 images
MAX_FLIPPED_BITS = 6
SOURCE_SIDE = 512
COPY_SIDE = (256, 384)
OTHER_SIDE = (256, 512)
VOCABULARY = 20_000
CAPTION_WORDS = 8
MEMORIZED_COUNTS = (5, 10, 20, 21, 30, 50, 100, 300)
STOCK_FRACTION = 0.02
STOCK_CAPTIONS = 200

# Salts of the per-row hashes: each quantity draws from its own stream.
_CLUSTER, _SCALE, _PHASH, _SHA, _WIDTH, _HEIGHT, _T, _FLIP, _NFLIP, _STOCK, _STOCK_ID, _VARIANT = range(1, 13)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised: a bijection of uint64 with full avalanche."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> floats uniform in (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planted structure, small enough to hold for any N (a few percent of N as integers).

    Attributes:
        copy_rows, copy_source, copy_exact: per copy row (sorted), its source and whether it is exact.
        sources: the source rows, sorted.
        memorized_rows, memorized_caption, memorized_variant: per row carrying a memorized caption (sorted),
            which one and whether it is spelled differently.
        memorized_texts: the memorized captions; memorized_counts: rows planted with each.
    """

    copy_rows: np.ndarray
    copy_source: np.ndarray
    copy_exact: np.ndarray
    sources: np.ndarray
    memorized_rows: np.ndarray
    memorized_caption: np.ndarray
    memorized_variant: np.ndarray
    memorized_texts: list[str]
    memorized_counts: list[int]


@dataclasses.dataclass(frozen=True)
class SyntheticLaion:
    """The data set of ``rows`` rows of dimension ``dim`` from ``seed``, in partitions of ``part_rows``."""

    rows: int
    dim: int = 512
    seed: int = 0
    part_rows: int = 100_000

    # -- parameters ---------------------------------------------------------------------------

    def params(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}

    @property
    def clusters(self) -> int:
        return max(10, self.rows // ROWS_PER_CLUSTER)

    @property
    def partitions(self) -> int:
        return -(-self.rows // self.part_rows)

    def partition_name(self, part: int) -> str:
        return f"{part:05d}"

    def partition_rows(self, part: int) -> tuple[int, int]:
        lo = part * self.part_rows
        return lo, min(lo + self.part_rows, self.rows)

    @property
    def n_memorized(self) -> int:
        return min(500, max(16, self.rows // 2000), self.clusters)

    # -- per-row hashes -------------------------------------------------------------------------

    def _hash(self, rows: np.ndarray, salt: int) -> np.ndarray:
        key = _mix(np.uint64((self.seed * 1_000_003 + salt) & 0xFFFFFFFFFFFFFFFF))
        return _mix(np.asarray(rows, dtype=np.int64).astype(np.uint64) ^ key)

    def cluster_of(self, rows: np.ndarray) -> np.ndarray:
        """The cluster a row's vector is drawn around (for copies: their source's, see :meth:`vectors`)."""
        return (self._hash(rows, _CLUSTER) % np.uint64(self.clusters)).astype(np.int64)

    def _globals(self) -> tuple[np.ndarray, np.ndarray]:
        """The global direction ``m`` and the cluster centres, float64 (clusters x dim)."""
        rng = np.random.default_rng([self.seed, 0xC1])
        return rng.standard_normal(self.dim), rng.standard_normal((self.clusters, self.dim))

    def _noise(self, lo: int, hi: int) -> np.ndarray:
        """Gaussian ``z`` of rows lo..hi (float64): Box-Muller over Philox, row r at counter r * stride."""
        half = -(-self.dim // 2)
        stride = -(-2 * half // 4)  # Philox counter steps per row (4 outputs each)
        n = hi - lo
        raw = np.random.Philox(key=[self.seed, 0x5EED], counter=lo * stride).random_raw(n * stride * 4)
        u = _unit(raw.reshape(n, stride * 4)[:, : 2 * half])
        radius = np.sqrt(-2.0 * np.log(u[:, :half]))
        angle = 2.0 * np.pi * u[:, half:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, : self.dim]

    def _plain(self, lo: int, hi: int, mean: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """Unit float32 vectors of rows lo..hi as if none were a copy."""
        rows = np.arange(lo, hi)
        s = NOISE_SCALE[0] + (NOISE_SCALE[1] - NOISE_SCALE[0]) * _unit(self._hash(rows, _SCALE))
        x = MEAN_WEIGHT * mean + centres[self.cluster_of(rows)] + s[:, None] * self._noise(lo, hi)
        return normalise_rows(x).astype(np.float32)

    def _plain_one(self, row: int, mean: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """The vector of one row, always through the same one-row computation: a source's vector is
        computed this way in its own partition and in its exact copies', so they agree bit for bit."""
        return self._plain(row, row + 1, mean, centres)[0]

    # -- the plan -------------------------------------------------------------------------------

    def plan(self) -> Plan:
        n = self.rows
        rng = np.random.default_rng([self.seed, 0x9A])
        n_near, n_exact = round(n * NEAR_COPY_FRACTION), round(n * EXACT_COPY_FRACTION)
        n_copies = n_near + n_exact
        sizes = rng.choice(COPIES_PER_GROUP, size=n_copies // 2 + 2)
        ends = np.cumsum(sizes)
        sizes = sizes[: int(np.searchsorted(ends, n_copies)) + 1]
        sizes[-1] -= int(sizes.sum()) - n_copies
        sizes = sizes[sizes > 0]
        chosen = rng.choice(n, len(sizes) + n_copies, replace=False)
        sources, copies = chosen[: len(sizes)], chosen[len(sizes) :]
        copy_source = np.repeat(sources, sizes)
        exact = np.zeros(n_copies, dtype=bool)
        exact[rng.choice(n_copies, n_exact, replace=False)] = True
        order = np.argsort(copies)
        copy_rows, copy_source, exact = copies[order], copy_source[order], exact[order]

        # Memorized captions: one cluster each; the rows of a planted image group there, then other
        # rows of the cluster (copies excluded: their vectors follow their source's cluster).
        m = self.n_memorized
        clusters = rng.choice(self.clusters, m, replace=False)
        wanted = np.full(self.clusters, -1, dtype=np.int64)
        wanted[clusters] = np.arange(m)
        members: list[list[np.ndarray]] = [[] for _ in range(m)]
        for lo in range(0, n, 1_000_000):
            rows = np.arange(lo, min(lo + 1_000_000, n))
            rows = rows[~np.isin(rows, copy_rows, assume_unique=True)]
            which = wanted[self.cluster_of(rows)]
            keep = which >= 0
            for j, row in zip(which[keep].tolist(), rows[keep].tolist(), strict=True):
                members[j].append(row)
        group_of_cluster: dict[int, np.ndarray] = {}
        source_cluster = self.cluster_of(sources)
        for source, cluster in zip(sources.tolist(), source_cluster.tolist(), strict=True):
            if wanted[cluster] >= 0 and cluster not in group_of_cluster:
                group_of_cluster[cluster] = np.concatenate([[source], copy_rows[copy_source == source]])
        words = np.array([f"w{i:05d}" for i in range(VOCABULARY)], dtype=object)
        texts, counts, rows_of, ids_of = [], [], [], []
        for j, cluster in enumerate(clusters.tolist()):
            count = MEMORIZED_COUNTS[j % len(MEMORIZED_COUNTS)]
            group = group_of_cluster.get(cluster, np.zeros(0, np.int64))
            pool = np.array(members[j], dtype=np.int64)
            pool = rng.permutation(pool[~np.isin(pool, group)])
            rows = np.concatenate([group, pool])[:count]
            texts.append(" ".join(words[rng.integers(0, VOCABULARY, CAPTION_WORDS)]))
            counts.append(len(rows))
            rows_of.append(rows)
            ids_of.append(np.full(len(rows), j, dtype=np.int64))
        mem_rows = np.concatenate(rows_of) if rows_of else np.zeros(0, np.int64)
        mem_ids = np.concatenate(ids_of) if ids_of else np.zeros(0, np.int64)
        order = np.argsort(mem_rows)
        variant = (_unit(self._hash(mem_rows[order], _VARIANT)) < 1 / 3).astype(bool)
        return Plan(
            copy_rows=copy_rows,
            copy_source=copy_source,
            copy_exact=exact,
            sources=np.sort(sources),
            memorized_rows=mem_rows[order],
            memorized_caption=mem_ids[order],
            memorized_variant=variant,
            memorized_texts=texts,
            memorized_counts=counts,
        )

    # -- one partition ----------------------------------------------------------------------------

    def _sha256(self, rows: np.ndarray) -> list[str]:
        return [hashlib.sha256(f"synthetic:{self.seed}:{r}".encode()).hexdigest() for r in rows.tolist()]

    def _phash(self, rows: np.ndarray) -> np.ndarray:
        h = self._hash(rows, _PHASH)
        return np.where(h == 0, np.uint64(1), h)

    def _side(self, rows: np.ndarray, salt: int, lo: int, hi: int) -> np.ndarray:
        return (lo + self._hash(rows, salt) % np.uint64(hi - lo + 1)).astype(np.int32)

    def generate(self, part: int, plan: Plan) -> tuple[np.ndarray, pa.Table, pa.Table]:
        """Partition ``part``: float16 vectors, metadata (METADATA_SCHEMA) and truth."""
        lo, hi = self.partition_rows(part)
        rows = np.arange(lo, hi)
        mean, centres = self._globals()
        out = np.empty((hi - lo, self.dim), dtype=np.float16)
        block = 8_192
        for a in range(lo, hi, block):
            b = min(a + block, hi)
            out[a - lo : b - lo] = self._plain(a, b, mean, centres)

        sha = np.array(self._sha256(rows), dtype=object)
        phash = self._phash(rows)
        width = self._side(rows, _WIDTH, *OTHER_SIDE)
        height = self._side(rows, _HEIGHT, *OTHER_SIDE)
        image_group = np.full(hi - lo, -1, dtype=np.int64)

        s_lo, s_hi = np.searchsorted(plan.sources, [lo, hi])
        for src in plan.sources[s_lo:s_hi].tolist():
            out[src - lo] = self._plain_one(src, mean, centres)
        src_local = plan.sources[s_lo:s_hi] - lo
        width[src_local] = height[src_local] = SOURCE_SIDE
        image_group[src_local] = plan.sources[s_lo:s_hi]

        c_lo, c_hi = np.searchsorted(plan.copy_rows, [lo, hi])
        copies = plan.copy_rows[c_lo:c_hi]
        sources = plan.copy_source[c_lo:c_hi]
        exact = plan.copy_exact[c_lo:c_hi]
        if len(copies):
            local = copies - lo
            source_vectors = np.stack([self._plain_one(s, mean, centres) for s in sources.tolist()])
            image_group[local] = sources
            # exact copies: the source's vector, sha256, pHash and size
            out[local[exact]] = source_vectors[exact]
            sha[local[exact]] = self._sha256(sources[exact])
            phash[local[exact]] = self._phash(sources[exact])
            width[local[exact]] = height[local[exact]] = SOURCE_SIDE
            # near copies: a step t along a random direction, some pHash bits flipped, a smaller image
            near, near_src = copies[~exact], source_vectors[~exact]
            if len(near):
                w = np.stack([self._noise(r, r + 1)[0] for r in near.tolist()])
                w = normalise_rows(w)
                t = COPY_DISTANCE[0] + (COPY_DISTANCE[1] - COPY_DISTANCE[0]) * _unit(self._hash(near, _T))
                out[near - lo] = normalise_rows(near_src + t[:, None] * w).astype(np.float16)
                n_flip = (self._hash(near, _NFLIP) % np.uint64(MAX_FLIPPED_BITS + 1)).astype(np.int64)
                bit_keys = self._hash(near[:, None] * 64 + np.arange(64)[None, :], _FLIP)
                bit_order = np.argsort(bit_keys, axis=1)
                flips = np.zeros(len(near), dtype=np.uint64)
                for k in range(MAX_FLIPPED_BITS):
                    on = n_flip > k
                    flips[on] |= np.uint64(1) << bit_order[on, k].astype(np.uint64)
                phash[near - lo] = self._phash(sources[~exact]) ^ flips
                width[near - lo] = self._side(near, _WIDTH, *COPY_SIDE)
                height[near - lo] = self._side(near, _HEIGHT, *COPY_SIDE)

        captions, caption_group = self._captions(part, rows, plan)
        meta = pa.table(
            {
                "key": [f"{r:09d}" for r in rows.tolist()],
                "caption": captions,
                "url": [f"http://example.invalid/{r}.jpg" for r in rows.tolist()],
                "sha256": sha.tolist(),
                "width": pa.array(width, pa.int32()),
                "height": pa.array(height, pa.int32()),
                "shard": [self.partition_name(part)] * (hi - lo),
                "phash": pa.array(phash, pa.uint64()),
            },
            schema=METADATA_SCHEMA.with_metadata({"embed_model": "synthetic", "semantic": "true"}),
        )
        truth = pa.table(
            {
                "row_id": pa.array(rows, pa.int64()),
                "image_group": pa.array(image_group, pa.int64()),
                "caption_group": pa.array(caption_group, pa.int64()),
            },
            schema=TRUTH_SCHEMA,
        )
        return out, meta, truth

    def _captions(self, part: int, rows: np.ndarray, plan: Plan) -> tuple[list[str], np.ndarray]:
        rng = np.random.default_rng([self.seed, 0xCA, part])
        words = np.array([f"w{i:05d}" for i in range(VOCABULARY)], dtype=object)
        drawn = words[rng.integers(0, VOCABULARY, (len(rows), CAPTION_WORDS))]
        captions = np.array([" ".join(row) for row in drawn], dtype=object)
        group = np.full(len(rows), -1, dtype=np.int64)
        stock = _unit(self._hash(rows, _STOCK)) < STOCK_FRACTION
        stock_id = (self._hash(rows[stock], _STOCK_ID) % np.uint64(STOCK_CAPTIONS)).astype(np.int64)
        captions[stock] = [f"a repeated stock caption {i}" for i in stock_id.tolist()]
        group[stock] = self.n_memorized + stock_id
        lo, hi = np.searchsorted(plan.memorized_rows, [rows[0], rows[-1] + 1]) if len(rows) else (0, 0)
        local = plan.memorized_rows[lo:hi] - rows[0]
        ids = plan.memorized_caption[lo:hi]
        variant = plan.memorized_variant[lo:hi]
        for i, j, v in zip(local.tolist(), ids.tolist(), variant.tolist(), strict=True):
            text = plan.memorized_texts[j]
            captions[i] = (text.capitalize() + " - Stock Photo") if v else text
        group[local] = ids
        return captions.tolist(), group

    # -- the folder ----------------------------------------------------------------------------------

    def matches(self, folder: str | Path) -> bool:
        """The folder holds this data set, complete (its parameters file is written last)."""
        try:
            written = json.loads((Path(folder) / PARAMS_NAME).read_text())
        except (OSError, ValueError):
            return False
        return written.get("params") == self.params()

    def write_partition(self, folder: Path, part: int, plan: Plan) -> None:
        vectors, meta, truth = self.generate(part, plan)
        name = self.partition_name(part)
        path = embedding_path(folder, IMG_EMB, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            np.save(f, vectors)
        tmp.replace(path)
        metadata_path(folder, name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_table(metadata_path(folder, name), meta)
        atomic_write_table(truth_path(folder, name), truth)

    def write(self, folder: str | Path, workers: int = 1) -> dict:
        """Write the folder (replacing an earlier one of ours, never other files); return its parameters."""
        folder = Path(folder)
        started = time.monotonic()
        if folder.exists():
            foreign = [p.name for p in folder.iterdir() if p.name not in OURS and not p.name.startswith(".")]
            if foreign:
                raise FileExistsError(f"{folder} holds other files ({foreign[:5]}): not replacing it")
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        plan = self.plan()
        if workers > 1 and self.partitions > 1:
            with ProcessPoolExecutor(min(workers, self.partitions)) as pool:
                list(pool.map(_write_one, [(self, folder, p, plan) for p in range(self.partitions)]))
        else:
            for part in range(self.partitions):
                self.write_partition(folder, part, plan)
        info = {
            "params": self.params(),
            "partitions": [self.partition_name(p) for p in range(self.partitions)],
            "clusters": self.clusters,
            "near_copies": int((~plan.copy_exact).sum()),
            "exact_copies": int(plan.copy_exact.sum()),
            "image_groups": len(plan.sources),
            "memorized_captions": self.n_memorized,
            "memorized_counts": plan.memorized_counts,
            "stock_captions": STOCK_CAPTIONS,
            "seconds": round(time.monotonic() - started, 1),
        }
        atomic_write_json(folder / PARAMS_NAME, info)
        return info

    def ensure(self, folder: str | Path, workers: int = 1) -> dict:
        """The folder's parameters file, after writing the folder unless it already holds this data set."""
        if not self.matches(folder):
            self.write(folder, workers)
        return json.loads((Path(folder) / PARAMS_NAME).read_text())


def _write_one(args: tuple[SyntheticLaion, Path, int, Plan]) -> None:
    data, folder, part, plan = args
    data.write_partition(folder, part, plan)


def truth_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / TRUTH / f"{TRUTH}_{name}.parquet"


def read_truth(folder: str | Path, columns: list[str]) -> pa.Table:
    """Every partition's truth, concatenated in row order (columns as asked)."""
    names = json.loads((Path(folder) / PARAMS_NAME).read_text())["partitions"]
    return pa.concat_tables([pq.read_table(truth_path(folder, name), columns=columns) for name in names])


def write_embedding_folder(folder: Path, n: int, seed: int, dim: int = 512) -> dict:
    """A LAION-layout folder of ``n`` synthetic rows (kept for the benchmarks that build bundles)."""
    return SyntheticLaion(rows=n, dim=dim, seed=seed).ensure(folder, workers=min(8, os.cpu_count() or 1))


def cosine_profile(data: SyntheticLaion, sample: int = 2_000) -> dict:
    """Cosines of the first partition's rows (for the docs): within a cluster, across clusters, planted."""
    plan = data.plan()
    vectors, _, truth = data.generate(0, plan)
    x = normalise_rows(vectors[:sample].astype(np.float32))
    groups = truth.column("image_group").to_numpy()[:sample]
    copy = np.isin(np.arange(sample), plan.copy_rows)
    cluster = data.cluster_of(np.arange(sample))
    sims = x @ x.T
    iu = np.triu_indices(sample, 1)
    plain = ~copy[iu[0]] & ~copy[iu[1]]
    same = (cluster[iu[0]] == cluster[iu[1]]) & plain
    other = (cluster[iu[0]] != cluster[iu[1]]) & plain
    planted = (groups[iu[0]] >= 0) & (groups[iu[0]] == groups[iu[1]])
    out = {
        "same_cluster": np.percentile(sims[iu][same], [1, 50, 99]).round(3).tolist() if same.any() else None,
        "same_cluster_max": round(float(sims[iu][same].max()), 3) if same.any() else None,
        "other_cluster": np.percentile(sims[iu][other], [1, 50, 99]).round(3).tolist(),
        "planted_pairs_in_sample": int(planted.sum()),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part-rows", type=int, default=100_000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--profile", action="store_true", help="also print cosine percentiles")
    args = parser.parse_args()
    data = SyntheticLaion(args.rows, args.dim, args.seed, args.part_rows)
    info = data.ensure(args.out, args.workers)
    if args.profile:
        info["cosines"] = cosine_profile(data)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
