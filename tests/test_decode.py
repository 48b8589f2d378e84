"""Decoding rules: unusual-but-valid images are converted faithfully, corrupt ones rejected with a reason."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fixtures.shard_factory import encode, random_photo
from pipeline.io.decode import decode_image, reason_of

MAX = 89_478_485


def rgb(decoded) -> np.ndarray:
    assert decoded.ok, decoded.error
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image).astype(int)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of side x side zeros, a few hundred KB on disk."""
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def test_plain_jpeg_is_decoded():
    photo = random_photo(1)
    out = rgb(decode_image(encode(photo, quality=95), MAX))
    assert out.shape == (40, 48, 3)
    assert np.abs(out - np.asarray(photo).astype(int)).mean() < 4


def test_grayscale_becomes_gray_rgb():
    gray = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (10, 1)), "L")
    out = rgb(decode_image(encode(gray, "PNG"), MAX))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[0, :, 0].tolist() == list(range(0, 250, 5))


def test_cmyk_jpeg_keeps_its_colours():
    red = Image.new("RGB", (16, 16), (220, 30, 30))
    decoded = decode_image(encode(red.convert("CMYK"), quality=100), MAX)
    out = rgb(decoded)
    assert np.abs(out.reshape(-1, 3).mean(0) - [220, 30, 30]).max() < 12


def test_palette_png_with_transparency_composites_on_white():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 200, 10] + [0, 0, 0] * 255)
    pal.paste(1, (0, 0, 4, 8))  # left half: index 1, declared transparent
    pal.info["transparency"] = 1
    out = rgb(decode_image(encode(pal, "PNG", transparency=1), MAX))
    assert out[:, :4].min() == 255  # transparent -> white, not black
    assert out[:, 4:].reshape(-1, 3).tolist()[0] == [10, 200, 10]


def test_rgba_png_composites_on_white():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., :3] = (0, 0, 255)
    arr[:2, :, 3] = 255  # top half opaque blue, bottom half fully transparent
    out = rgb(decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG"), MAX))
    assert out[:2].reshape(-1, 3).tolist()[0] == [0, 0, 255]
    assert out[2:].min() == 255


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = rgb(decode_image(encode(image, "PNG"), MAX))
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]


def test_png_bytes_under_a_jpg_name_are_recognised_by_content():
    decoded = decode_image(encode(random_photo(2), "PNG"), MAX)
    assert decoded.ok and decoded.format == "PNG"


def test_one_pixel_image():
    decoded = decode_image(encode(Image.new("RGB", (1, 1), (5, 6, 7)), "PNG"), MAX)
    assert (decoded.width, decoded.height) == (1, 1)
    assert rgb(decoded).tolist() == [[[5, 6, 7]]]


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    decoded = decode_image(encode(wide, exif=exif), MAX)
    assert (decoded.width, decoded.height) == (10, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not_an_image"),
        (b"\x00\x01garbage that is no image format at all", "not_an_image"),
        (None, "missing_image"),
    ],
)
def test_corrupt_inputs_are_rejected_with_a_reason(data, reason):
    decoded = decode_image(data, MAX)
    assert not decoded.ok and decoded.image is None
    assert reason_of(decoded.error) == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_rejected(fmt):
    data = encode(random_photo(3, (64, 64)), fmt)
    decoded = decode_image(data[: len(data) // 2], MAX)
    assert reason_of(decoded.error) in {"truncated_image", "decode_error"}
    if fmt == "JPEG":
        assert reason_of(decoded.error) == "truncated_image"


def test_decompression_bomb_is_rejected_before_decoding():
    data = bomb_png(20_000)  # 400 Mpx: Pillow itself refuses above 2x its default limit
    assert len(data) < 1_000_000
    decoded = decode_image(data, MAX)
    assert reason_of(decoded.error) == "decompression_bomb"
    small_limit = decode_image(encode(random_photo(4, (100, 100)), "PNG"), max_pixels=5_000)
    assert reason_of(small_limit.error) == "decompression_bomb"
    assert small_limit.sha256  # the bytes were still fingerprinted
