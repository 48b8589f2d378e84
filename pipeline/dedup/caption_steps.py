"""The pure steps of the caption dedup, shared by the in-process path (:mod:`pipeline.dedup.caption`)
and the partitioned one (:mod:`pipeline.dedup.caption_partitioned`): MinHash sketches of a chunk of
texts, LSH bucket windows, candidate pairs, and their verification (exact Jaccard of shingle sets,
the word guard). What each rule means and why: the module docstring of :mod:`pipeline.dedup.caption`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import csr_matrix

from pipeline.core.config import CaptionDedupConfig
from pipeline.dedup.minhash import SCHEMES, MinHasher, band_hashes, char_shingles, shingle_hashes

# Longer "words" are unsegmented text (no spaces between words), exempt from the word guard.
UNSEGMENTED_WORD = 20
# Candidate pairs verified per vectorised Jaccard step (bounds its memory to ~100 MB).
_VERIFY_CHUNK_TOKENS = 4_000_000


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

    band_keys: np.ndarray  # (n, bands) uint64
    tokens: np.ndarray  # uint32 shingle hashes, text i owns tokens[offsets[i]:offsets[i + 1]]
    offsets: np.ndarray  # int64


def sketch_chunk(texts: pa.Array, hasher: MinHasher, bands: int, rows: int) -> ChunkSketch:
    """Shingle, hash, MinHash and band one chunk of (non-empty, distinct) normalised captions."""
    sh = char_shingles(texts, hasher.shingle_size)
    tokens = shingle_hashes(sh)
    sig = hasher.signatures_from_hashes(tokens, sh.offsets, transposed=True)
    return ChunkSketch(band_hashes(sig, bands, rows, transposed=True), tokens, sh.offsets)


@functools.lru_cache(maxsize=256)
def _window_pairs(size: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j), i < j <= i + window, within a bucket of ``size`` sorted members."""
    if size - 1 <= window:
        return np.triu_indices(size, k=1)
    i = np.concatenate([np.arange(size - d) for d in range(1, window + 1)])
    j = i + np.repeat(np.arange(1, window + 1), [size - d for d in range(1, window + 1)])
    return i, j


def window_pairs(keys: Sequence[np.ndarray], ids: np.ndarray, window: int) -> np.ndarray:
    """Pairs (lo, hi) of ``ids`` that share a bucket: equal values in every array of ``keys``.

    Within a bucket, members sorted by id, each is paired with its next ``window`` members. Ids must
    be distinct within a bucket. Not de-duplicated (see :func:`unique_pairs`).
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.lexsort((ids, *reversed(keys)))  # lexsort's last key is the primary one
    boundary = np.zeros(n, dtype=bool)
    boundary[0] = True
    for key in keys:
        sk = np.asarray(key)[order]
        boundary[1:] |= sk[1:] != sk[:-1]
    starts = np.flatnonzero(boundary)
    sizes = np.diff(np.r_[starts, n])
    multi = sizes > 1
    starts, sizes = starts[multi], sizes[multi]
    sorted_ids = ids[order]
    out: list[np.ndarray] = []
    for size in np.unique(sizes):
        # Buckets of this size side by side, then the same within-bucket positions in each.
        members = sorted_ids[starts[sizes == size][:, None] + np.arange(size)[None, :]]
        i, j = _window_pairs(int(size), window)
        if size > 2048:  # bound the memory of one very large bucket group
            out.extend(np.stack([row[i], row[j]], axis=1) for row in members)
        else:
            out.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def bucket_pairs(band_keys: np.ndarray, window: int) -> np.ndarray:
    """Candidate pairs (i < j) of rows that share a bucket key in any column of ``band_keys``.

    Within a bucket (rows sorted by index) each row is paired with its next ``window`` rows.
    """
    band_keys = np.asarray(band_keys)
    ids = np.arange(band_keys.shape[0], dtype=np.int64)
    out = [window_pairs([col], ids, window) for col in band_keys.T]
    return unique_pairs(np.concatenate(out)) if out else np.zeros((0, 2), dtype=np.int64)


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Distinct unordered pairs as (lo, hi) rows, sorted; any int64 ids."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return pairs
    lo, hi = pairs.min(axis=1), pairs.max(axis=1)
    order = np.lexsort((hi, lo))
    lo, hi = lo[order], hi[order]
    new = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    return np.stack([lo[new], hi[new]], axis=1)


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
