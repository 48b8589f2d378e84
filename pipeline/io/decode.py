"""Image bytes -> RGB picture, or a rejection with a reason; never an exception.

Formats are recognised by content, not by file extension (img2dataset and other tools store PNG
bytes under ``.jpg``). Valid but unusual images are converted so that their colours survive:
alpha is composited on white, 16-bit samples are scaled to 8 bits rather than clipped, CMYK and
palette images go through Pillow's own conversions, and EXIF orientation is applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Rejection reasons: the part of ``error`` before the colon, used for per-reason counts.
EMPTY_FILE = "empty_file"
MISSING_IMAGE = "missing_image"
NOT_AN_IMAGE = "not_an_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TRUNCATED_IMAGE = "truncated_image"
DECODE_ERROR = "decode_error"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class Decoded:
    """Outcome of decoding one image: ``image`` is RGB when ``error`` is None."""

    image: Image.Image | None
    width: int
    height: int
    format: str
    sha256: str
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def reason_of(error: str | None) -> str | None:
    """The reason code of an error string such as ``"truncated_image: ..."``."""
    return None if error is None else error.split(":", 1)[0]


def _looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))


def _failure_reason(exc: Exception) -> str:
    """Pillow reports cut-off files as OSError/EOFError mentioning truncation; all else is a decode error."""
    return TRUNCATED_IMAGE if isinstance(exc, EOFError) or "truncat" in str(exc).lower() else DECODE_ERROR


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or losing transparency to black."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        samples = np.asarray(image).astype(np.float64)
        if mode == "I" and samples.max(initial=0) <= 255 and samples.min(initial=0) >= 0:
            scaled = samples
        else:
            scaled = samples / 257.0  # 65535 -> 255: the full 16-bit range onto 8 bits
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        samples = np.asarray(image).astype(np.float64)
        if samples.max(initial=0) <= 1.0:
            samples = samples * 255.0
        return Image.fromarray(np.clip(np.rint(samples), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def decode_image(data: bytes | None, max_pixels: int) -> Decoded:
    """Decode ``data`` to RGB, or say why it cannot be used.

    Args:
        data (`bytes` or `None`): the encoded image, or None when the sample has no image file.
        max_pixels (`int`): images with more pixels are rejected as decompression bombs before
            their pixels are decoded.
    """
    if data is None:
        return Decoded(None, 0, 0, "", "", f"{MISSING_IMAGE}: sample has no image file")
    digest = hashlib.sha256(data).hexdigest()

    def reject(reason: str, detail: str, fmt: str = "", width: int = 0, height: int = 0) -> Decoded:
        return Decoded(None, width, height, fmt, digest, f"{reason}: {detail}")

    if len(data) == 0:
        return reject(EMPTY_FILE, "zero bytes")
    if _looks_like_html(data):
        return reject(NOT_AN_IMAGE, "HTML page (an error page saved as an image?)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return reject(DECOMPRESSION_BOMB, str(exc))
        except UnidentifiedImageError:
            return reject(NOT_AN_IMAGE, f"unrecognised image data ({len(data)} bytes)")
        except Exception as exc:
            return reject(_failure_reason(exc), f"{type(exc).__name__}: {exc}")
        fmt = image.format or ""
        width, height = image.size
        if width * height > max_pixels:
            return reject(
                DECOMPRESSION_BOMB, f"{width}x{height} exceeds {max_pixels} pixels", fmt, width, height
            )
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return reject(DECOMPRESSION_BOMB, str(exc), fmt, width, height)
        except Exception as exc:
            return reject(_failure_reason(exc), f"{type(exc).__name__}: {exc}", fmt, width, height)
        with contextlib.suppress(Exception):
            image = ImageOps.exif_transpose(image) or image
        try:
            rgb = to_rgb(image)
        except Exception as exc:
            return reject(DECODE_ERROR, f"cannot convert mode {image.mode} to RGB: {exc}", fmt, width, height)
    return Decoded(rgb, rgb.width, rgb.height, fmt, digest, None)
