"""Vectorised MinHash equals datasketch bit for bit; banding, Jaccard and union-find are exact."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.hashfunc import sha1_hash32

from pipeline.dedup.caption import bucket_pairs, pair_jaccard
from pipeline.dedup.minhash import (
    SCHEMES,
    MinHasher,
    band_hashes,
    char_shingles,
    lsh_params,
    permutations,
    sha1_hash32_many,
    shingle_hashes,
)
from pipeline.dedup.union_find import component_sizes, connected_components

TEXTS = [
    "a red car parked on the street",
    "a red car parked on the stret",
    "héllo wörld — ünïcode",
    "日本語のキャプション、東京の夜景",
    "emoji 😀😀 party 🎉",
    "ab",
    "x",
    "",
    "aaaaaaaaaaaaaaaaaaaa",  # one distinct shingle repeated
    "abcde",  # exactly one window of 5
    "abcd",  # shorter than 5: the whole text is the one shingle
]


def plain_shingles(text: str, k: int) -> list[str]:
    """How a datasketch user shingles: every k-character window, or the whole text if shorter."""
    if not text:
        return []
    return [text[i : i + k] for i in range(max(len(text) - k + 1, 1))]


def plain_minhash(text: str, k: int, num_perm: int, seed: int, scheme: str) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    for s in plain_shingles(text, k):
        m.update(s.encode("utf-8"))
    return m


def test_sha1_hash32_many_equals_datasketch_hashfunc():
    rng = np.random.default_rng(0)
    buffer = rng.integers(0, 256, 5000, dtype=np.uint8)
    lengths = np.r_[np.arange(56), rng.integers(0, 56, 500)]
    starts = rng.integers(0, len(buffer) - 56, len(lengths))
    got = sha1_hash32_many(buffer, starts, lengths)
    want = [sha1_hash32(buffer[s : s + n].tobytes()) for s, n in zip(starts, lengths, strict=False)]
    assert got.dtype == np.uint32
    assert got.tolist() == want
    with pytest.raises(ValueError, match="55 bytes"):
        sha1_hash32_many(buffer, np.array([0]), np.array([56]))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_char_shingles_are_python_slices(k):
    sh = char_shingles(TEXTS, k)
    for i, text in enumerate(TEXTS):
        got = [
            sh.buffer[s : s + n].tobytes().decode("utf-8")
            for s, n in zip(
                sh.starts[sh.offsets[i] : sh.offsets[i + 1]],
                sh.lengths[sh.offsets[i] : sh.offsets[i + 1]],
                strict=False,
            )
        ]
        assert got == plain_shingles(text, k), text


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("k", "num_perm", "seed"), [(3, 128, 1), (5, 64, 7), (1, 16, 42)])
def test_signatures_equal_datasketch_minhash(scheme, k, num_perm, seed):
    sig = MinHasher(num_perm=num_perm, seed=seed, shingle_size=k, scheme=scheme).signatures(TEXTS)
    assert sig.shape == (len(TEXTS), num_perm) and sig.dtype == np.uint32
    for text, row in zip(TEXTS, sig, strict=False):
        want = plain_minhash(text, k, num_perm, seed, scheme).hashvalues
        assert np.array_equal(row.astype(np.uint64), want.astype(np.uint64)), text


def test_permutations_are_datasketchs():
    for scheme in SCHEMES:
        a, b = permutations(32, 5, scheme)
        want = MinHash(num_perm=32, seed=5, scheme=scheme).permutations
        assert np.array_equal(a.astype(np.uint64), np.asarray(want[0]).astype(np.uint64))
        assert np.array_equal(b.astype(np.uint64), np.asarray(want[1]).astype(np.uint64))
    with pytest.raises(ValueError, match="unknown MinHash scheme"):
        permutations(8, 1, "affine16")


def test_shingle_hashing_is_exact_across_lengths_and_blocks():
    # Same leading bytes, different lengths; multi-byte shingles up to 52 bytes (13 4-byte words).
    texts = ["aaaa", "aaa", "aa", "a", "ééééé", "éééé", "😀" * 13, "x" * 40]
    for k in (1, 2, 4, 13):
        sh = char_shingles(texts, k)
        got = shingle_hashes(sh)
        want = [
            sha1_hash32(sh.buffer[s : s + n].tobytes()) for s, n in zip(sh.starts, sh.lengths, strict=False)
        ]
        assert got.tolist() == want


def test_lsh_params_are_datasketchs():
    for threshold, num_perm in [(0.7, 128), (0.8, 128), (0.5, 64), (0.9, 256)]:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert lsh_params(threshold, num_perm) == (lsh.b, lsh.r)


def test_candidate_pairs_equal_datasketch_lsh_query():
    from fixtures.planted_captions import generate
    from pipeline.dedup.text_normalize import normalize_captions

    texts = sorted(set(normalize_captions(generate(600, seed=5).captions).to_pylist()) - {""})
    threshold, num_perm, k = 0.6, 64, 3
    bands, rows = lsh_params(threshold, num_perm)
    sig = MinHasher(num_perm=num_perm, seed=1, shingle_size=k).signatures(texts)
    ours = {tuple(p) for p in bucket_pairs(band_hashes(sig, bands, rows), window=10_000).tolist()}

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sketches = [plain_minhash(t, k, num_perm, 1, "affine32") for t in texts]
    for i, m in enumerate(sketches):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if j != i}
    assert len(theirs) > 50
    assert ours == theirs


def test_bucket_window_bounds_pairs_but_keeps_buckets_connected():
    keys = np.zeros((100, 1), dtype=np.uint64)  # one bucket of 100 rows
    assert len(bucket_pairs(keys, window=200)) == 100 * 99 // 2
    pairs = bucket_pairs(keys, window=3)
    assert len(pairs) == 99 + 98 + 97
    assert (connected_components(100, pairs) == 0).all()


def test_pair_jaccard_is_exact_on_sets():
    rng = np.random.default_rng(1)
    sets = [rng.integers(0, 40, rng.integers(0, 30)).astype(np.uint32) for _ in range(200)]
    tokens = np.concatenate(sets)
    offsets = np.r_[0, np.cumsum([len(s) for s in sets])]
    pairs = rng.integers(0, 200, (3000, 2))
    got = pair_jaccard(tokens, offsets, pairs)
    for (u, v), x in zip(pairs.tolist(), got, strict=False):
        a, b = set(sets[u].tolist()), set(sets[v].tolist())
        assert x == pytest.approx(len(a & b) / len(a | b) if a | b else 0.0)


def test_connected_components_labels_are_smallest_member():
    labels = connected_components(7, np.array([[5, 3], [3, 1], [6, 4], [2, 2]]))
    assert labels.tolist() == [0, 1, 2, 1, 4, 1, 4]
    assert component_sizes(labels).tolist() == [1, 3, 1, 3, 2, 3, 2]
    # Edge order does not matter.
    edges = np.array([[5, 3], [3, 1], [6, 4]])
    for perm in itertools.permutations(range(3)):
        assert connected_components(7, edges[list(perm)][:, ::-1]).tolist() == labels.tolist()
    assert connected_components(3, np.zeros((0, 2))).tolist() == [0, 1, 2]
    assert connected_components(0, np.zeros((0, 2))).tolist() == []
    with pytest.raises(ValueError, match="endpoints"):
        connected_components(2, np.array([[0, 2]]))
