"""pHash: the properties duplicate finding relies on, the bit layout, and the vectorised batch path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
from PIL import Image

from fixtures.shard_factory import encode
from pipeline.embed.phash import grayscale_thumbnail, hamming_distance, phash_images, phash_thumbnails

# Duplicate finding usually calls two images the same picture at distance <= 8 or 10 (of 64 bits).
NEAR = 4
FAR = 16


def textured_photo(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """Coarse and fine colour texture: low-frequency structure like a photograph's, unlike a flat gradient."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    fine = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    return Image.blend(coarse, fine, 0.35)


def reference_phash(image: Image.Image) -> int:
    """One image at a time, bit by bit: the definition the vectorised code must match."""
    pixels = grayscale_thumbnail(image).astype(np.float64)
    coeffs = scipy.fft.dctn(pixels, type=2)[1:9, 1:9].flatten()
    median = np.median(coeffs)
    return sum(1 << (63 - i) for i, c in enumerate(coeffs) if c > median)


def one(image: Image.Image) -> np.uint64:
    return phash_images([image])[0]


def test_identical_pixels_give_identical_hashes():
    photo = textured_photo(0)
    same_pixels = Image.open(io.BytesIO(encode(photo, "PNG")))
    assert phash_images([photo, same_pixels, photo.copy()]).tolist() == [one(photo)] * 3
    assert one(photo) == one(photo.convert("RGBA"))  # mode does not matter, pixels do


@pytest.mark.parametrize("seed", range(6))
def test_reencoding_and_resizing_flip_few_bits(seed: int):
    photo = textured_photo(seed)
    variants = [
        Image.open(io.BytesIO(encode(photo, quality=70))),
        photo.resize((120, 90), Image.Resampling.BILINEAR),
        photo.resize((240, 180), Image.Resampling.BICUBIC),
    ]
    assert max(int(hamming_distance(one(photo), one(v))) for v in variants) <= NEAR


def test_different_photos_are_far_apart():
    hashes = phash_images([textured_photo(seed) for seed in range(12)])
    distances = hamming_distance(hashes[:, None], hashes[None, :])[np.triu_indices(12, 1)]
    assert distances.min() >= FAR
    assert distances.mean() > 24  # about half the bits differ, as for unrelated images


def test_real_photographs(shared_data: Path):
    photos = [
        Image.open(p).convert("RGB") for p in sorted((shared_data / "peer_samples/img2dataset").glob("*.jpg"))
    ]
    hashes = phash_images(photos)
    distances = hamming_distance(hashes[:, None], hashes[None, :])[np.triu_indices(len(photos), 1)]
    assert distances.min() >= FAR
    for photo, digest in zip(photos, hashes, strict=True):
        recoded = Image.open(io.BytesIO(encode(photo, quality=60)))
        smaller = photo.resize((photo.width * 4 // 5, photo.height * 4 // 5))
        assert hamming_distance(digest, one(recoded)) <= NEAR
        assert hamming_distance(digest, one(smaller)) <= NEAR


def test_batch_matches_the_one_at_a_time_definition():
    images = [textured_photo(seed, (40 + 17 * seed, 90 - 5 * seed)) for seed in range(8)]
    images.append(Image.new("RGB", (10, 10), (255, 0, 0)))  # flat: every coefficient 0, hash 0
    hashes = phash_images(images)
    assert hashes.dtype == np.uint64
    assert [int(h) for h in hashes] == [reference_phash(image) for image in images]
    assert hashes[-1] == 0
    assert (hashes.view(np.int64).view(np.uint64) == hashes).all()  # int64 stores keep every bit


def test_hamming_distance_broadcasts_and_counts_bits():
    a = np.array([0, 0xFFFFFFFFFFFFFFFF, 0b1011], dtype=np.uint64)
    assert hamming_distance(a, np.uint64(0)).tolist() == [0, 64, 3]
    assert hamming_distance(a[:, None], a[None, :]).shape == (3, 3)


def test_empty_and_malformed_inputs():
    assert phash_images([]).shape == (0,)
    with pytest.raises(ValueError, match="32, 32"):
        phash_thumbnails(np.zeros((2, 16, 16)))
