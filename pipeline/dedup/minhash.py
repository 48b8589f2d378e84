"""Vectorised MinHash that reproduces datasketch's signatures, and LSH banding over them.

datasketch (``datasketch.MinHash``) hashes each token with ``sha1_hash32`` (the first four bytes of
the token's SHA-1 digest, read little-endian) and then applies ``num_perm`` random permutations
whose parameters come from ``np.random.RandomState(seed)``:

* ``affine32`` (datasketch >= 2.0 default): ``h = fmix32(sha1_hash32(token))``, then
  ``(a * h + b) mod 2**32`` with odd ``a``;
* ``legacy`` (datasketch < 2.0): ``((a * h + b) mod 2**64) mod (2**61 - 1)``, masked to 32 bits.

This module does the same arithmetic for a whole batch of texts at once: every character shingle
of the batch is cut out of one flat UTF-8 buffer, distinct shingles are hashed once with a
numpy SHA-1 (no per-shingle Python call), the permutations are applied to a (shingles x
permutations) block, and ``np.minimum.reduceat`` takes each text's minimum. For the same seed,
``num_perm`` and scheme the signatures are bit-for-bit those of ``MinHash.update`` fed with
``text[i:i + k].encode("utf-8")`` for every window (tested against datasketch itself).

Banding follows ``datasketch.MinHashLSH``: the (bands, rows) pair is datasketch's own
``_optimal_param(threshold, num_perm, fp_weight, fn_weight)``; each band's ``rows`` values are
folded into one uint64 bucket key (datasketch uses the raw bytes; a 64-bit fold can only add
candidates by collision, never lose one, and candidates are verified with the true Jaccard).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MERSENNE_PRIME = np.uint64((1 << 61) - 1)
MAX_HASH32 = np.uint64((1 << 32) - 1)
SCHEMES = ("affine32", "legacy")

# Tokens permuted at once: a few MiB per array, so each permutation pass stays in cache.
_BLOCK_TOKENS = 1 << 19
# Messages hashed per SHA-1 step; small enough that the working arrays stay in cache.
_SHA1_CHUNK = 1 << 16


# ----------------------------------------------------------------------------------------------
# SHA-1 over many short messages (each fits one 64-byte block), in numpy.
# ----------------------------------------------------------------------------------------------

_SHA1_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)
_SHA1_K = (0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xCA62C1D6)
_MAX_ONE_BLOCK = 55  # message bytes that leave room for the 0x80 pad byte and the 8-byte length


def _rotl(x: np.ndarray, n: int) -> np.ndarray:
    return (x << np.uint32(n)) | (x >> np.uint32(32 - n))


def _sha1_words(w: np.ndarray) -> np.ndarray:
    """First digest word (h0) of SHA-1 for each row of ``w``: (n, 16) big-endian uint32 blocks."""
    w = [np.ascontiguousarray(w[:, i]) for i in range(16)]
    n = w[0].shape[0]
    a, b, c, d, e = (np.full(n, v, dtype=np.uint32) for v in _SHA1_INIT)
    for t in range(80):
        if t >= 16:
            x = w[(t - 3) % 16] ^ w[(t - 8) % 16]
            x ^= w[(t - 14) % 16]
            x ^= w[t % 16]
            w[t % 16] = _rotl(x, 1)
        if t < 20:
            f = (b & c) | (~b & d)
        elif t < 40 or t >= 60:
            f = b ^ c ^ d
        else:
            f = (b & c) | (b & d) | (c & d)
        temp = _rotl(a, 5)
        temp += f
        temp += e
        temp += np.uint32(_SHA1_K[t // 20])
        temp += w[t % 16]
        e, d, c, b, a = d, c, _rotl(b, 30), a, temp
    return a + np.uint32(_SHA1_INIT[0])


def sha1_hash32_many(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``datasketch.hashfunc.sha1_hash32`` of every ``buffer[starts[i]:starts[i] + lengths[i]]``.

    Vectorised over messages; each must be at most 55 bytes (one SHA-1 block). Returns uint32.
    """
    buffer = np.asarray(buffer, dtype=np.uint8)
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(starts)
    out = np.empty(n, dtype=np.uint32)
    if n == 0:
        return out
    if int(lengths.max()) > _MAX_ONE_BLOCK:
        raise ValueError(f"messages longer than {_MAX_ONE_BLOCK} bytes are not supported")
    for lo in range(0, n, _SHA1_CHUNK):
        s, ln = starts[lo : lo + _SHA1_CHUNK], lengths[lo : lo + _SHA1_CHUNK]
        m = len(s)
        block = np.zeros((m, 64), dtype=np.uint8)
        width = int(ln.max())
        block[:, :width] = _message_bytes(buffer, s, ln, width)
        rows = np.arange(m)
        block[rows, ln] = 0x80
        bits = ln * 8
        block[:, 62] = bits >> 8
        block[:, 63] = bits & 0xFF
        words = block.view(">u4").astype(np.uint32)
        out[lo : lo + m] = _sha1_words(words)
    # sha1_hash32 reads the digest's first four bytes little-endian: byte-swap h0.
    return out.byteswap()


# ----------------------------------------------------------------------------------------------
# Character shingles of a batch of texts.
# ----------------------------------------------------------------------------------------------


@dataclass
class Shingles:
    """Every character k-gram of a batch: its bytes in ``buffer`` and the text it belongs to.

    ``offsets`` (len n_texts + 1) delimits each text's shingles; a non-empty text shorter than k
    characters has exactly one shingle (the whole text); an empty text has none.
    """

    buffer: np.ndarray  # uint8, all texts' UTF-8 bytes back to back
    starts: np.ndarray  # int64 byte start of each shingle
    lengths: np.ndarray  # int64 byte length of each shingle
    offsets: np.ndarray  # int64, shingles of text i are [offsets[i], offsets[i + 1])

    @property
    def num_texts(self) -> int:
        return len(self.offsets) - 1


def _string_buffers(texts: pa.Array | pa.ChunkedArray | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes, int64 byte offsets) of a string array; nulls read as empty strings."""
    if isinstance(texts, list):
        texts = pa.array(texts, type=pa.large_string())
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    texts = pc.fill_null(texts.cast(pa.large_string()), "")
    if texts.offset:
        texts = pa.concat_arrays([texts])  # re-base a sliced array
    _, offsets_buf, data_buf = texts.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=len(texts) + 1)
    data = (
        np.frombuffer(data_buf, dtype=np.uint8, count=int(offsets[-1]))
        if data_buf is not None
        else np.zeros(0, np.uint8)
    )
    return data[int(offsets[0]) :], offsets - offsets[0]


def char_shingles(texts: pa.Array | pa.ChunkedArray | list[str], k: int) -> Shingles:
    """All windows of ``k`` Unicode characters (code points) of each text, without a Python loop."""
    if k < 1:
        raise ValueError("shingle size must be at least 1")
    data, byte_off = _string_buffers(texts)
    n = len(byte_off) - 1
    ascii_only = not bool((data >= 0x80).any())
    if ascii_only:  # one byte per character
        char_pos, char_off = None, byte_off
    else:
        # Character starts are the bytes that are not UTF-8 continuation bytes (0b10xxxxxx).
        char_pos = np.flatnonzero((data & 0xC0) != 0x80).astype(np.int64)
        # Character offsets of each text; a sentinel at the end closes the last character.
        char_off = np.searchsorted(char_pos, byte_off).astype(np.int64)
        char_pos = np.append(char_pos, np.int64(len(data)))
    nchars = np.diff(char_off)
    counts = np.where(nchars >= k, nchars - k + 1, np.minimum(nchars, 1))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    # Window j of text i starts at character char_off[i] + j and stops at most at its end.
    first_char = np.arange(total, dtype=np.int64)
    first_char += np.repeat(char_off[:-1] - offsets[:-1], counts)
    last_char = np.minimum(first_char + k, np.repeat(char_off[1:], counts))
    if ascii_only:
        return Shingles(buffer=data, starts=first_char, lengths=last_char - first_char, offsets=offsets)
    starts = char_pos[first_char]
    lengths = char_pos[last_char] - starts
    return Shingles(buffer=data, starts=starts, lengths=lengths, offsets=offsets)


def _message_bytes(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8 rows: each message's bytes, zero-padded."""
    col = np.arange(width, dtype=np.int64)
    pos = starts[:, None] + col[None, :]
    np.minimum(pos, max(len(buffer) - 1, 0), out=pos)
    rows = buffer[pos] if len(buffer) else np.zeros(pos.shape, np.uint8)
    rows[col[None, :] >= lengths[:, None]] = 0
    return rows


def _unique_messages(sh: Shingles) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first occurrence of each distinct shingle, inverse map), exact on the bytes.

    Bytes are compared four at a time: the (length, first 4 bytes) pair is factorised with a hash
    table (``pandas.factorize``, linear time), then each (code so far, next 4 bytes) pair, so any
    shingle width is exact without a sort.
    """
    import pandas as pd

    n = len(sh.starts)
    n_words = max(1, -(-int(sh.lengths.max()) // 4))
    # words[p]: the 4 buffer bytes from position p, little-endian (zero past the end).
    size = len(sh.buffer)
    padded = np.zeros(size + 4 * n_words + 8, dtype=np.uint8)
    padded[:size] = sh.buffer
    words = np.empty(size + 4 * n_words + 4, dtype=np.uint32)
    for o in range(4):
        dst = words[o::4]
        dst[:] = padded[o : o + 4 * len(dst)].view("<u4")
    masks = np.array([(1 << (8 * m)) - 1 for m in range(5)], dtype=np.uint64)
    codes = sh.lengths.astype(np.uint64)
    for i in range(n_words):
        word = words[sh.starts + 4 * i].astype(np.uint64)
        word &= masks[np.clip(sh.lengths - 4 * i, 0, 4)]
        codes, _ = pd.factorize((codes.astype(np.uint64) << np.uint64(32)) | word, sort=False)
    # Codes are numbered in order of first appearance: a code is new where it beats every earlier one.
    running = np.maximum.accumulate(codes)
    first = np.flatnonzero(np.r_[True, running[1:] > running[:-1]]) if n else np.zeros(0, np.int64)
    return first, codes.astype(np.int64)


def shingle_hashes(sh: Shingles) -> np.ndarray:
    """``sha1_hash32`` of every shingle (uint32), each distinct shingle hashed once."""
    if len(sh.starts) == 0:
        return np.zeros(0, dtype=np.uint32)
    if int(sh.lengths.max()) > _MAX_ONE_BLOCK:
        raise ValueError("shingles longer than 55 UTF-8 bytes: use a smaller shingle size")
    rep, inverse = _unique_messages(sh)
    return sha1_hash32_many(sh.buffer, sh.starts[rep], sh.lengths[rep])[inverse]


# ----------------------------------------------------------------------------------------------
# Permutations and signatures.
# ----------------------------------------------------------------------------------------------


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, as datasketch applies it before affine32 permutations."""
    h = h.astype(np.uint32, copy=True)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


@functools.lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int, scheme: str = "affine32") -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) permutation parameters ``datasketch.MinHash(num_perm, seed, scheme=...)`` draws."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown MinHash scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        ab = np.array(
            [
                (
                    gen.randint(1, MERSENNE_PRIME, dtype=np.uint64),
                    gen.randint(0, MERSENNE_PRIME, dtype=np.uint64),
                )
                for _ in range(num_perm)
            ],
            dtype=np.uint64,
        ).T
        a, b = ab[0], ab[1]
    else:
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


@dataclass(frozen=True)
class MinHasher:
    """Batch MinHash over character shingles, equal to datasketch's for the same parameters."""

    num_perm: int = 128
    seed: int = 1
    shingle_size: int = 3
    scheme: str = "affine32"

    def signatures_from_hashes(
        self, hashes: np.ndarray, offsets: np.ndarray, transposed: bool = False
    ) -> np.ndarray:
        """(n, num_perm) uint32 signatures; text i owns ``hashes[offsets[i]:offsets[i + 1]]``.

        ``transposed=True`` returns the (num_perm, n) layout instead (what :func:`band_hashes`
        reads fastest), saving a copy.

        A text with no token gets datasketch's empty signature (all 2**32 - 1). The loop runs over
        permutations, each one vectorised over every token of a block of texts (1-D, contiguous,
        cache-sized: several times faster than a 2-D tokens x permutations broadcast).
        """
        a, b = permutations(self.num_perm, self.seed, self.scheme)
        offsets = np.asarray(offsets, dtype=np.int64)
        n = len(offsets) - 1
        sig = np.full((self.num_perm, n), np.uint32(MAX_HASH32), dtype=np.uint32)
        counts = np.diff(offsets)
        tokens = _fmix32(hashes) if self.scheme == "affine32" else np.asarray(hashes, dtype=np.uint64)
        lo = 0
        while lo < n:
            hi = int(np.searchsorted(offsets, offsets[lo] + _BLOCK_TOKENS, side="right")) - 1
            hi = min(max(hi, lo + 1), n)
            t0, t1 = int(offsets[lo]), int(offsets[hi])
            nonempty = np.flatnonzero(counts[lo:hi] > 0)
            if t1 > t0:
                h = tokens[t0:t1]
                starts = offsets[lo:hi][nonempty] - t0
                cols = lo + nonempty
                phv = np.empty_like(h)
                for j in range(self.num_perm):
                    np.multiply(h, a[j], out=phv)
                    phv += b[j]
                    if self.scheme == "legacy":
                        phv %= MERSENNE_PRIME
                        phv &= MAX_HASH32
                    sig[j, cols] = np.minimum.reduceat(phv, starts)
            lo = hi
        return sig if transposed else np.ascontiguousarray(sig.T)

    def signatures(self, texts: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
        """(n, num_perm) uint32 signatures of the character ``shingle_size``-grams of each text."""
        sh = char_shingles(texts, self.shingle_size)
        return self.signatures_from_hashes(shingle_hashes(sh), sh.offsets)


# ----------------------------------------------------------------------------------------------
# LSH banding.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def lsh_params(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) exactly as ``datasketch.MinHashLSH(threshold, num_perm, weights)`` picks them."""
    from datasketch.lsh import _optimal_param

    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    b, r = _optimal_param(threshold, num_perm, fp_weight, fn_weight)
    return int(b), int(r)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 that spreads every input bit."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def band_hashes(signatures: np.ndarray, bands: int, rows: int, transposed: bool = False) -> np.ndarray:
    """(n, bands) uint64 bucket keys: band j hashes ``signatures[:, j*rows:(j+1)*rows]``.

    Each band's values are combined with fixed odd 64-bit multipliers, the band number is mixed
    in (one key never means the same bucket in two bands) and splitmix64 spreads the result.
    Equal slices always get equal keys; different slices collide with negligible probability, and
    a collision only adds a candidate pair, which verification then rejects.
    """
    sig = np.asarray(signatures)
    sig = sig if transposed else sig.T  # (num_perm, n): each permutation's values contiguous
    if bands * rows > sig.shape[0]:
        raise ValueError(
            f"{bands} bands x {rows} rows needs {bands * rows} permutations, have {sig.shape[0]}"
        )
    n = sig.shape[1]
    mult = np.random.RandomState(0x5EED).randint(0, 1 << 62, size=rows, dtype=np.uint64) * np.uint64(
        2
    ) + np.uint64(1)
    out = np.empty((n, bands), dtype=np.uint64)
    for j in range(bands):
        acc = np.full(n, np.uint64((j * 0x9E3779B97F4A7C15) % (1 << 64)), dtype=np.uint64)
        for i in range(rows):
            acc += sig[j * rows + i].astype(np.uint64) * mult[i]
        out[:, j] = _mix64(acc)
    return out
