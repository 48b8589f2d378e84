"""64-bit perceptual hashes (pHash) of decoded images, for duplicate finding that needs no model weights.

The hash follows phash.org's DCT hash: the picture is reduced to 32x32 grayscale, a 2-D DCT-II
(unnormalised, as in imagehash) is taken, and the 8x8 lowest frequencies *next to* the DC term
(rows and columns 1..8) are compared with their median. Leaving the DC row and column out keeps the
hash free of the overall-brightness bias: every one of the 64 bits carries structure, none is a
near-constant "DC above median" bit. Re-encoding or mildly resizing an image flips few bits; different
photographs differ in about half of them.

Bit layout: coefficient (r, c) of the 8x8 block, row-major, is bit ``63 - (8 * r + c)``, so the
first coefficient is the most significant bit and ``int.to_bytes(8, "big")`` gives the 8 bytes a
FAISS binary index expects. Hashes are ``uint64``; ``hashes.view(np.int64)`` gives the same bits for
stores without unsigned integers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
from PIL import Image

HASH_BITS = 64
SIDE = 32
_BLOCK = slice(1, 9)  # the 8 lowest non-DC frequencies along each axis


def grayscale_thumbnail(image: Image.Image) -> np.ndarray:
    """The 32x32 grayscale float array a hash is computed from (Lanczos, so small details average out)."""
    small = image.convert("L").resize((SIDE, SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(small, dtype=np.float32)


def phash_thumbnails(thumbnails: np.ndarray) -> np.ndarray:
    """pHash of a batch of 32x32 grayscale thumbnails, vectorised over the batch.

    Args:
        thumbnails (`np.ndarray` of shape `(N, 32, 32)`): as made by :func:`grayscale_thumbnail`.

    Returns:
        `np.ndarray` of shape `(N,)` and dtype `uint64`.
    """
    if thumbnails.ndim != 3 or thumbnails.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"expected thumbnails of shape (N, {SIDE}, {SIDE}), got {thumbnails.shape}")
    pixels = thumbnails.astype(np.float64)
    coeffs = scipy.fft.dct(scipy.fft.dct(pixels, axis=1), axis=2)[:, _BLOCK, _BLOCK].reshape(len(pixels), -1)
    bits = coeffs > np.median(coeffs, axis=1, keepdims=True)
    return np.packbits(bits, axis=1, bitorder="big").view(">u8")[:, 0].astype(np.uint64)


def phash_images(images: Sequence[Image.Image]) -> np.ndarray:
    """pHash of each image (any size or mode), as ``uint64``; an empty sequence gives an empty array."""
    if not images:
        return np.zeros(0, dtype=np.uint64)
    return phash_thumbnails(np.stack([grayscale_thumbnail(image) for image in images]))


def hamming_distance(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Number of differing bits between hashes; broadcasts like any numpy binary operation."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
