"""Caption duplicates: normalise -> exact hash -> MinHash LSH -> Jaccard verification -> union-find.

Works on any parquet with a caption column (LAION metadata with only ``URL``/``TEXT`` is enough; no
images are needed). Output ``caption_duplicates.parquet`` has one row per input row, in input
order (files sorted by name, rows in file order):

=====================  ========  ===========================================================
column                 type      meaning
=====================  ========  ===========================================================
key                    input's   the key column (default ``key``), else the row number
group_id               int64     row number (0-based, input order) of the group's first row
group_size             int64     rows in the group; 1 for a caption with no duplicate
normalized_caption     string    the caption after :mod:`pipeline.dedup.text_normalize`
=====================  ========  ===========================================================

So ``group_id == row number`` marks the row to keep, and ``group_size > 1`` the duplicated rows.
Every input row is in the output; a singleton is its own group of size 1.

Stages:

1. **Normalise** every caption (:func:`pipeline.dedup.text_normalize.normalize_captions`).
2. **Exact pass**: rows whose normalised captions are equal form one node (an Arrow hash table on
   the whole string, so there are no hash collisions). Null and empty captions are never grouped,
   not even with each other: each is a group of its own, counted as ``empty_captions``.
3. **MinHash** (:mod:`pipeline.dedup.minhash`, datasketch-identical signatures) over the character
   ``shingle_size``-grams of each *distinct* normalised caption only.
4. **LSH banding** with datasketch's (bands, rows) for ``threshold``/``num_perm``. Within each band,
   captions sharing a bucket become candidate pairs; a bucket is sorted by node id and each member
   is paired with its next ``bucket_window`` members (all pairs for buckets up to
   ``bucket_window + 1`` members; larger buckets are linked as a chain of overlapping windows so
   they cost linear, not quadratic, pairs).
5. **Verification** of each distinct candidate pair: the exact Jaccard similarity of the two shingle
   sets (sets of the 32-bit shingle hashes MinHash sees; rows of a sparse binary matrix, so the
   intersections are computed in C) must be >= ``threshold``; and, with ``word_guard``, the pair
   must not *replace a word by a different word*: words present on one side only must each be a
   typo (one insertion, deletion, substitution or swap of neighbours in a word of four letters or
   more, letters only) of a word on the other side, or be on one side only (an inserted or dropped
   word). Thus "a red car parked on the street" and "a blue car parked on the street" stay apart,
   while "a red car parked on the stret" joins "a red car parked on the street", and "tomb raider
   legend" joins "tomb raider legend psp". Spacing-only differences ("t shirt" / "tshirt") pass,
   and "words" over 20 characters (unsegmented scripts such as Chinese or Japanese) are left to the
   Jaccard test alone.
   The guard is the only per-pair Python step and runs only on pairs that passed the Jaccard test.
6. **Union-find** (:func:`pipeline.dedup.union_find.connected_components`) over verified pairs.

Why these defaults (character 3-grams, threshold 0.7, word guard on): measured on the planted data
of :mod:`fixtures.planted_captions` (see BENCHMARKS.md). Word shingles cannot tell a typo from a
changed word at all (both change one word of the set); longer character shingles make a one-letter
typo in a short caption cost as much as a changed word. Character 3-grams separate them best, but
no Jaccard threshold alone keeps one-word hard negatives apart while still joining typo variants
of short captions: the word guard does that.

Ray: with at least ``ray_min_rows`` input rows (and a Ray session up), stages 1, 3, 4 and 5 run as
Ray tasks: normalisation and MinHash over row chunks of ``batch_size``; banding partitioned by
band groups (each task reads only its bands' bucket keys from every chunk); verification over
chunks of candidate pairs (each task gathers only the shingle sets its pairs touch). The driver
keeps the keys and normalised captions, runs the exact pass (Arrow's C++ hash table) and the
union-find over verified pairs, which are few. Below ``ray_min_rows`` the same chunked stages run
in-process, which is faster for small inputs (no Ray start-up, no serialisation); both paths give
identical output.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import csr_matrix

from pipeline.core.config import CaptionDedupConfig, RayConfig, result_options
from pipeline.core.ray_runtime import ray_session
from pipeline.core.stage import Stage, run_stage, seconds_since
from pipeline.core.storage import atomic_write_json, atomic_write_table, files_signature
from pipeline.dedup.minhash import SCHEMES, MinHasher, band_hashes, char_shingles, lsh_params, shingle_hashes
from pipeline.dedup.report import REPORT_NAME, write_dedup_report
from pipeline.dedup.text_normalize import normalize_captions
from pipeline.dedup.union_find import component_sizes, connected_components

log = logging.getLogger(__name__)

#: Version of caption_duplicates.parquet; part of the fingerprint, so a new version recomputes.
SCHEMA_VERSION = 1
OUTPUT_NAME = "caption_duplicates.parquet"
SUMMARY_NAME = "caption_dedup_summary.json"
CAPTION_COLUMNS = ("caption", "TEXT", "text")
KEY_COLUMN = "key"

# Longer "words" are unsegmented text (no spaces between words), exempt from the word guard.
UNSEGMENTED_WORD = 20
# Candidate pairs verified per vectorised Jaccard step (bounds its memory to ~100 MB).
_VERIFY_CHUNK_TOKENS = 4_000_000


# ----------------------------------------------------------------------------------------------
# Input.
# ----------------------------------------------------------------------------------------------


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet file itself, or every ``*.parquet`` under a folder (recursive, sorted, no hidden)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"caption input {path} does not exist")
    files = sorted(
        p
        for p in path.rglob("*.parquet")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return files


def detect_caption_column(names: list[str], requested: str | None = None, where: str = "input") -> str:
    """``requested`` if present, else the first of :data:`CAPTION_COLUMNS` present; clear error otherwise."""
    if requested:
        if requested not in names:
            raise ValueError(f"caption column {requested!r} not in {where}; columns are: {', '.join(names)}")
        return requested
    for name in CAPTION_COLUMNS:
        if name in names:
            return name
    raise ValueError(
        f"no caption column in {where}: looked for {', '.join(CAPTION_COLUMNS)}; "
        f"columns are: {', '.join(names)} (name one with --caption-col)"
    )


def read_captions(
    path: str | Path, caption_col: str | None = None, key_col: str | None = None
) -> tuple[pa.ChunkedArray, pa.ChunkedArray, dict[str, Any]]:
    """(keys, captions, info) from a parquet file or folder, reading only those two columns.

    Keys are ``key_col`` if given (it must exist), else ``key`` when every file has it, else the
    row number (int64).
    """
    files = parquet_files(path)
    schemas = [pq.read_schema(f) for f in files]
    first_names = list(schemas[0].names)
    caption = detect_caption_column(first_names, caption_col, where=str(files[0]))
    for f, schema in zip(files, schemas, strict=False):
        detect_caption_column(list(schema.names), caption, where=str(f))
    if key_col:
        for f, schema in zip(files, schemas, strict=False):
            if key_col not in schema.names:
                raise ValueError(f"key column {key_col!r} not in {f}; columns are: {', '.join(schema.names)}")
        key = key_col
    else:
        key = KEY_COLUMN if all(KEY_COLUMN in s.names for s in schemas) else None
    columns = [caption] + ([key] if key and key != caption else [])
    tables = [pq.read_table(f, columns=columns) for f in files]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    captions = table.column(caption)
    keys = (
        table.column(key) if key else pa.chunked_array([pa.array(np.arange(table.num_rows, dtype=np.int64))])
    )
    info = {"files": len(files), "caption_col": caption, "key_col": key or "(row number)"}
    return keys, captions, info


# ----------------------------------------------------------------------------------------------
# Stage functions (pure; used in-process and inside Ray tasks).
# ----------------------------------------------------------------------------------------------


def _gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


@dataclass
class ChunkSketch:
    """MinHash output of one chunk of distinct captions: band keys and shingle-hash sets."""

    band_keys: list[np.ndarray]  # per band group: (n, bands_in_group) uint64
    tokens: np.ndarray  # uint32 shingle hashes, text i owns tokens[offsets[i]:offsets[i + 1]]
    offsets: np.ndarray  # int64


def sketch_chunk(texts: pa.Array, hasher: MinHasher, bands: int, rows: int, band_groups: int) -> ChunkSketch:
    """Shingle, hash, MinHash and band one chunk of (non-empty, distinct) normalised captions."""
    sh = char_shingles(texts, hasher.shingle_size)
    tokens = shingle_hashes(sh)
    sig = hasher.signatures_from_hashes(tokens, sh.offsets, transposed=True)
    keys = band_hashes(sig, bands, rows, transposed=True)
    groups = np.array_split(np.arange(bands), band_groups)
    return ChunkSketch([keys[:, g] for g in groups], tokens, sh.offsets)


@functools.lru_cache(maxsize=256)
def _window_pairs(size: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j), i < j <= i + window, within a bucket of ``size`` sorted members."""
    if size - 1 <= window:
        return np.triu_indices(size, k=1)
    i = np.concatenate([np.arange(size - d) for d in range(1, window + 1)])
    j = i + np.repeat(np.arange(1, window + 1), [size - d for d in range(1, window + 1)])
    return i, j


def bucket_pairs(band_keys: np.ndarray, window: int) -> np.ndarray:
    """Candidate pairs (i < j) of rows that share a bucket key in any column of ``band_keys``.

    Within a bucket (rows sorted by index) each row is paired with its next ``window`` rows.
    """
    band_keys = np.asarray(band_keys)
    n = band_keys.shape[0]
    out: list[np.ndarray] = []
    ids = np.arange(n, dtype=np.int64)
    for col in band_keys.T:
        order = np.lexsort((ids, col))
        sk = col[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        sizes = np.diff(np.r_[starts, n])
        multi = sizes > 1
        starts, sizes = starts[multi], sizes[multi]
        for size in np.unique(sizes):
            # Buckets of this size side by side, then the same within-bucket positions in each.
            members = order[starts[sizes == size][:, None] + np.arange(size)[None, :]]
            i, j = _window_pairs(int(size), window)
            if size > 2048:  # bound the memory of one very large bucket group
                out.extend(np.stack([row[i], row[j]], axis=1) for row in members)
            else:
                out.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return unique_pairs(np.concatenate(out))


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Distinct unordered pairs as (lo, hi) rows, sorted."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return pairs
    lo, hi = pairs.min(axis=1), pairs.max(axis=1)
    packed = np.sort((lo.astype(np.uint64) << np.uint64(32)) | hi.astype(np.uint64))
    packed = packed[np.r_[True, packed[1:] != packed[:-1]]]
    return np.stack(
        [(packed >> np.uint64(32)).astype(np.int64), (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)], 1
    )


def pair_jaccard(tokens: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the token *sets* of each pair of texts (float64), vectorised.

    The texts become rows of a binary sparse matrix over token values (duplicates summed away,
    indices sorted); a pair's intersection is the sum of the element-wise product of its two rows,
    which scipy computes by merging sorted index lists in C.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out = np.zeros(len(pairs), dtype=np.float64)
    if len(pairs) == 0:
        return out
    n = len(offsets) - 1
    sets = csr_matrix(
        (np.ones(len(tokens), np.float32), np.asarray(tokens, dtype=np.int64), np.asarray(offsets, np.int64)),
        shape=(n, 1 << 32),
    )
    sets.sum_duplicates()
    sets.data[:] = 1.0
    sizes = np.diff(sets.indptr)
    step = max(1, _VERIFY_CHUNK_TOKENS // max(1, int(sizes.mean()) if n else 1))
    for lo in range(0, len(pairs), step):
        a, b = pairs[lo : lo + step, 0], pairs[lo : lo + step, 1]
        inter = np.asarray(sets[a].multiply(sets[b]).sum(axis=1), dtype=np.float64).ravel()
        union = sizes[a] + sizes[b] - inter
        np.divide(inter, union, out=out[lo : lo + step], where=union > 0)
    return out


def _typo_of(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are one edit apart (Damerau) and read as a typo, not a new word:
    letters only, and the longer word has four letters or more."""
    la, lb = len(a), len(b)
    if la < lb:
        a, b, la, lb = b, a, lb, la
    if la < 4 or la - lb > 1 or not (a.isalpha() and b.isalpha()):
        return False
    i = 0
    while i < lb and a[i] == b[i]:
        i += 1
    if la != lb:  # one insertion / deletion
        return a[i + 1 :] == b[i:]
    if i == la:
        return False  # equal words are not on one side only
    if a[i + 1 :] == b[i + 1 :]:  # one substitution
        return True
    return i + 1 < la and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]


def replaces_a_word(a: str, b: str) -> bool:
    """The word guard: does one caption replace some word of the other by a different word?

    Words on one side only are matched against the other side's by :func:`_typo_of`. A word left
    unmatched on *both* sides is a substitution (a different colour, object, number...). Only
    insertions or deletions (unmatched words on one side) and typos do not count.

    A "word" longer than :data:`UNSEGMENTED_WORD` characters is taken for unsegmented text (Chinese,
    Japanese, Thai... are written without spaces): such words are left to the Jaccard test alone.
    """
    if a == b:
        return False
    sa, sb = set(a.split(" ")), set(b.split(" "))
    da = sa - sb
    if not da:
        return False
    db = sb - sa
    if not db:
        return False
    if any(len(w) > UNSEGMENTED_WORD for w in da) or any(len(w) > UNSEGMENTED_WORD for w in db):
        da = {w for w in da if len(w) <= UNSEGMENTED_WORD}
        db = {w for w in db if len(w) <= UNSEGMENTED_WORD}
        if not da or not db:
            return False
    if len(da) == 1 and len(db) == 1:  # the common case: one word against one word
        return not _typo_of(next(iter(da)), next(iter(db)))
    if a.replace(" ", "") == b.replace(" ", ""):
        return False
    if len(da) * len(db) > 256:
        return True
    matched_b: set[str] = set()
    unmatched_a = False
    for w in da:
        hit = False
        for v in db:
            if _typo_of(w, v):
                matched_b.add(v)
                hit = True
        unmatched_a = unmatched_a or not hit
    return unmatched_a and len(matched_b) < len(db)


def gather_sets(
    chunks: tuple[tuple[np.ndarray, np.ndarray], ...], chunk_starts: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of the global ``rows`` (sorted), read from per-chunk (tokens, offsets) pairs.

    Chunk c holds global rows ``chunk_starts[c]`` onwards.
    """
    which = np.searchsorted(chunk_starts, rows, side="right") - 1
    parts, lengths = [], []
    for c in np.unique(which):
        tokens, offsets = chunks[c]
        local = rows[which == c] - chunk_starts[c]
        counts = offsets[local + 1] - offsets[local]
        parts.append(tokens[_gather_ranges(offsets[local], counts)])
        lengths.append(counts)
    if not parts:
        return np.zeros(0, np.uint32), np.zeros(1, np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return np.concatenate(parts), offsets


@dataclass
class Verdicts:
    keep: np.ndarray  # bool per pair
    below_threshold: int = 0
    word_substitutions: int = 0


def verify_pairs(
    pairs: np.ndarray,
    tokens: np.ndarray,
    offsets: np.ndarray,
    texts: pa.Array | None,
    threshold: float,
    word_guard: bool,
) -> Verdicts:
    """Which candidate pairs are duplicates: Jaccard >= threshold, then (optionally) the word guard."""
    jac = pair_jaccard(tokens, offsets, pairs)
    keep = jac >= threshold - 1e-12
    verdicts = Verdicts(keep=keep, below_threshold=int((~keep).sum()))
    if word_guard and keep.any():
        idx = np.flatnonzero(keep)
        a = pc.take(texts, pa.array(pairs[idx, 0])).to_pylist()
        b = pc.take(texts, pa.array(pairs[idx, 1])).to_pylist()
        bad = np.fromiter(
            (replaces_a_word(x, y) for x, y in zip(a, b, strict=False)), dtype=bool, count=len(idx)
        )
        keep[idx[bad]] = False
        verdicts.word_substitutions = int(bad.sum())
    return verdicts


# ----------------------------------------------------------------------------------------------
# Ray tasks.
# ----------------------------------------------------------------------------------------------


def _ray_tasks():
    import ray

    @ray.remote(num_cpus=1)
    def normalize_task(texts: pa.Array) -> pa.Array:
        return normalize_captions(texts)

    @ray.remote(num_cpus=1)
    def sketch_task(texts: pa.Array, hasher: MinHasher, bands: int, rows: int, band_groups: int):
        s = sketch_chunk(texts, hasher, bands, rows, band_groups)
        return (*s.band_keys, (s.tokens, s.offsets))

    @ray.remote(num_cpus=1)
    def band_group_task(window: int, *chunk_keys: np.ndarray) -> np.ndarray:
        # Chunks are consecutive node ranges, so stacking them gives global node ids.
        return bucket_pairs(np.concatenate(chunk_keys), window)

    @ray.remote(num_cpus=1)
    def verify_task(pairs, texts, threshold, word_guard, chunk_starts, *token_chunks):
        # Only the texts this task's pairs touch: their token sets, gathered into one small CSR.
        rows = np.unique(pairs)
        tokens, offsets = gather_sets(token_chunks, np.asarray(chunk_starts), rows)
        local = np.searchsorted(rows, pairs)
        v = verify_pairs(local, tokens, offsets, texts.take(pa.array(rows)), threshold, word_guard)
        return v.keep, v.below_threshold, v.word_substitutions

    return normalize_task, sketch_task, band_group_task, verify_task


# ----------------------------------------------------------------------------------------------
# The whole stage.
# ----------------------------------------------------------------------------------------------


@dataclass
class CaptionDedupResult:
    table: pa.Table  # key, group_id, group_size, normalized_caption (input order)
    stats: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = None  # group_id per row, as numpy


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, size)
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def check_config(cfg: CaptionDedupConfig) -> None:
    """Clear errors for option values the stage cannot run with."""
    if not 0.0 < cfg.threshold <= 1.0:
        raise ValueError(f"caption_dedup.threshold must be in (0, 1], got {cfg.threshold}")
    if not 1 <= cfg.shingle_size <= 13:
        raise ValueError(f"caption_dedup.shingle_size must be 1..13 characters, got {cfg.shingle_size}")
    if cfg.num_perm < 2:
        raise ValueError(f"caption_dedup.num_perm must be at least 2, got {cfg.num_perm}")
    if cfg.minhash_scheme not in SCHEMES:
        raise ValueError(
            f"caption_dedup.minhash_scheme must be one of {', '.join(SCHEMES)}, got {cfg.minhash_scheme!r}"
        )
    if cfg.bucket_window < 1 or cfg.batch_size < 1:
        raise ValueError("caption_dedup.bucket_window and caption_dedup.batch_size must be at least 1")


def find_caption_duplicates(
    captions: pa.Array | pa.ChunkedArray | list[str | None],
    cfg: CaptionDedupConfig | None = None,
    keys: pa.Array | pa.ChunkedArray | None = None,
    use_ray: bool | None = None,
) -> CaptionDedupResult:
    """Group duplicate captions. ``use_ray=None`` decides by ``cfg.ray_min_rows`` (and whether Ray is up)."""
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 3)
        return now

    cfg = cfg or CaptionDedupConfig()
    check_config(cfg)
    if isinstance(captions, list):
        captions = pa.array(captions, type=pa.string())
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks() if captions.num_chunks != 1 else captions.chunk(0)
    n = len(captions)
    if keys is None:
        keys = pa.array(np.arange(n, dtype=np.int64))
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} captions")
    if use_ray is None:
        import ray

        use_ray = n >= cfg.ray_min_rows and ray.is_initialized()
    if use_ray:
        normalize_task, sketch_task, band_group_task, verify_task = _ray_tasks()
        import ray

        cpus = _cluster_cpus()

    bands, rows = lsh_params(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
    hasher = MinHasher(
        num_perm=cfg.num_perm, seed=cfg.seed, shingle_size=cfg.shingle_size, scheme=cfg.minhash_scheme
    )

    # 1. Normalise.
    t = time.monotonic()
    if use_ray and n:
        refs = [normalize_task.remote(captions.slice(lo, hi - lo)) for lo, hi in _chunks(n, cfg.batch_size)]
        normalized = pa.concat_arrays(ray.get(refs))
    else:
        normalized = normalize_captions(captions) if n else pa.array([], pa.string())
    t = lap("normalize", t)

    # 2. Exact pass: distinct non-empty normalised captions are the nodes.
    empty = pc.fill_null(pc.equal(pc.utf8_length(normalized), 0), True).to_numpy(zero_copy_only=False)
    nonempty_rows = np.flatnonzero(~empty)
    encoded = pc.dictionary_encode(normalized.take(pa.array(nonempty_rows))) if len(nonempty_rows) else None
    if encoded is not None:
        node_of_row = encoded.indices.to_numpy().astype(np.int64)
        texts = encoded.dictionary
    else:
        node_of_row = np.zeros(0, np.int64)
        texts = pa.array([], pa.string())
    n_nodes = len(texts)
    t = lap("exact", t)

    # 3-4. MinHash and LSH banding over distinct captions.
    band_groups = 1
    if use_ray and n_nodes:
        chunks = _chunks(n_nodes, cfg.batch_size)
        band_groups = max(1, min(bands, cpus))
        texts_ref = ray.put(texts)
        sketches = [
            sketch_task.options(num_returns=band_groups + 1).remote(
                texts.slice(lo, hi - lo), hasher, bands, rows, band_groups
            )
            for lo, hi in chunks
        ]
        pair_refs = [
            band_group_task.remote(cfg.bucket_window, *[s[g] for s in sketches]) for g in range(band_groups)
        ]
        candidates = (
            unique_pairs(np.concatenate(ray.get(pair_refs))) if pair_refs else np.zeros((0, 2), np.int64)
        )
        token_refs = [s[band_groups] for s in sketches]
        starts = [lo for lo, _ in chunks]
        t = lap("minhash_lsh", t)
        parts = np.array_split(candidates, max(1, min(len(candidates) // 5000 + 1, 4 * cpus)))
        results = ray.get(
            [
                verify_task.remote(p, texts_ref, cfg.threshold, cfg.word_guard, starts, *token_refs)
                for p in parts
                if len(p)
            ]
        )
        keep = np.concatenate([r[0] for r in results]) if results else np.zeros(0, bool)
        below = sum(r[1] for r in results)
        substitutions = sum(r[2] for r in results)
    elif n_nodes:
        # Same chunking as on Ray, so memory stays bounded by batch_size: a chunk's signatures are
        # dropped once its band keys exist.
        sketches_local = [
            sketch_chunk(texts.slice(lo, hi - lo), hasher, bands, rows, 1)
            for lo, hi in _chunks(n_nodes, cfg.batch_size)
        ]
        keys_all = np.concatenate([sk.band_keys[0] for sk in sketches_local])
        candidates = bucket_pairs(keys_all, cfg.bucket_window)
        del keys_all
        t = lap("minhash_lsh", t)
        if len(sketches_local) == 1:
            tokens, offsets = sketches_local[0].tokens, sketches_local[0].offsets
        else:
            starts = np.array([lo for lo, _ in _chunks(n_nodes, cfg.batch_size)])
            tokens, offsets = gather_sets(
                tuple((sk.tokens, sk.offsets) for sk in sketches_local), starts, np.arange(n_nodes)
            )
        v = verify_pairs(candidates, tokens, offsets, texts, cfg.threshold, cfg.word_guard)
        keep, below, substitutions = v.keep, v.below_threshold, v.word_substitutions
    else:
        candidates, keep, below, substitutions = np.zeros((0, 2), np.int64), np.zeros(0, bool), 0, 0
        t = lap("minhash_lsh", t)
    verified = candidates[keep]
    t = lap("verify", t)

    # 5. Union-find over nodes, then back to rows; empty rows stay alone.
    node_label = connected_components(n_nodes, verified)
    row_label = np.arange(n, dtype=np.int64)  # empty rows: their own group
    if len(nonempty_rows):
        # Group id = first row (input order) of each node component.
        first_row_of_node = np.full(n_nodes, n, dtype=np.int64)
        np.minimum.at(first_row_of_node, node_of_row, nonempty_rows)
        first_row_of_comp = np.full(n_nodes, n, dtype=np.int64)
        np.minimum.at(first_row_of_comp, node_label, first_row_of_node)
        row_label[nonempty_rows] = first_row_of_comp[node_label[node_of_row]]
    sizes = component_sizes(row_label)
    t = lap("union_find", t)

    table = pa.table(
        {
            "key": keys,
            "group_id": pa.array(row_label, pa.int64()),
            "group_size": pa.array(sizes, pa.int64()),
            "normalized_caption": normalized.cast(pa.string()),
        }
    )
    n_groups = len(np.unique(row_label)) if n else 0
    dup_rows = int((sizes > 1).sum())
    stats = {
        "rows": n,
        "empty_captions": int(empty.sum()),
        "distinct_normalized": n_nodes,
        "exact_duplicate_rows": int(len(nonempty_rows) - n_nodes),
        "candidate_pairs": len(candidates),
        "verified_pairs": len(verified),
        "rejected_below_threshold": int(below),
        "rejected_word_substitution": int(substitutions),
        "groups": n_groups,
        "duplicate_groups": len(np.unique(row_label[sizes > 1])),
        "rows_in_duplicate_groups": dup_rows,
        "removable_rows": n - n_groups,
        "lsh_bands": bands,
        "lsh_rows": rows,
        "mode": "ray" if use_ray else "in-process",
        "seconds": seconds_since(t_start),
        "stage_seconds": timings,
    }
    return CaptionDedupResult(table=table, stats=stats, labels=row_label)


class CaptionDedupStage(Stage):
    """Parquet captions -> ``caption_duplicates.parquet``, ``caption_dedup_summary.json`` and (unless
    ``cfg.report`` is off) ``dedup_report.html`` (:mod:`pipeline.dedup.report`)."""

    name = "caption_dedup"

    def __init__(
        self, cfg: CaptionDedupConfig, ray_cfg: RayConfig | None = None, use_ray: bool | None = None
    ):
        self.cfg = cfg
        self.ray_cfg = ray_cfg
        self.use_ray = use_ray
        self.out = Path(cfg.out)

    def fingerprint(self) -> dict[str, Any]:
        """Result options and the input files' names, sizes and mtimes."""
        root = Path(self.cfg.input)
        files = parquet_files(root)
        return {
            "schema": SCHEMA_VERSION,
            "options": result_options(self.cfg),
            "input": files_signature(files, root if root.is_dir() else root.parent),
        }

    def outputs(self) -> list[Path]:
        return [self.out / OUTPUT_NAME] + ([self.out / REPORT_NAME] if self.cfg.report else [])

    def compute(self) -> dict[str, Any]:
        started = time.monotonic()
        cfg = self.cfg
        keys, captions, info = read_captions(cfg.input, cfg.caption_col, cfg.key_col)
        log.info(
            "caption dedup: %d rows from %d file(s), caption column %s",
            len(captions),
            info["files"],
            info["caption_col"],
        )
        use_ray = len(captions) >= cfg.ray_min_rows if self.use_ray is None else self.use_ray
        if use_ray:
            with ray_session(self.ray_cfg or RayConfig()):
                result = find_caption_duplicates(captions, cfg, keys=keys, use_ray=True)
        else:
            result = find_caption_duplicates(captions, cfg, keys=keys, use_ray=False)
        atomic_write_table(self.out / OUTPUT_NAME, result.table)
        summary = {
            "job": "dedup_captions",
            "output": str(self.out / OUTPUT_NAME),
            **info,
            **result.stats,
            "threshold": cfg.threshold,
            "num_perm": cfg.num_perm,
            "shingle_size": cfg.shingle_size,
            "seconds": seconds_since(started),
        }
        if cfg.report:
            write_dedup_report(
                self.out / REPORT_NAME,
                caption_duplicates=result.table,
                caption_summary=result.stats,
                caption_cfg=cfg,
                captions=captions,
                title="Caption duplicates",
            )
            summary["report"] = str(self.out / REPORT_NAME)
        atomic_write_json(self.out / SUMMARY_NAME, summary)
        return summary


def run_caption_dedup(
    cfg: CaptionDedupConfig, ray_cfg: RayConfig | None = None, use_ray: bool | None = None
) -> dict[str, Any]:
    """Read ``cfg.input``, find duplicate captions, write ``caption_duplicates.parquet`` + summary.

    With ``use_ray=None`` the input size decides: at least ``cfg.ray_min_rows`` rows run on Ray
    (joining or starting it through :func:`pipeline.core.ray_runtime.ray_session` with ``ray_cfg``),
    fewer run in-process without starting Ray at all. A re-run with the same options over unchanged
    input files returns the saved summary (``skipped: true``).
    """
    return run_stage(CaptionDedupStage(cfg, ray_cfg, use_ray), cfg.out)
