"""Embed's reader and mapper: shard rows -> decoded, pHashed, model-sized uint8 pictures.

* reader (:func:`read_rows`): one Ray task per shard yields its raw rows, numbered in shard order;
* mapper (:func:`prepare_batch`): CPU tasks decode each image once and derive everything pixel-based
  from it: sha256, size, the pHash, the model's resized/cropped uint8 input (and SSCD's).

This module imports neither torch nor open_clip: Ray's decode workers import it, and each of their
processes would otherwise pay seconds and hundreds of MB for libraries it never uses. The model side
is :mod:`pipeline.embed.embed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.embed.phash import SIDE, grayscale_thumbnail, phash_thumbnails
from pipeline.io.decode import decode_image
from pipeline.io.shards import DEFAULT_MAX_MEMBER_BYTES, Shard, read_shard

NO_ERROR = ""
#: Rejection reason of the rows of a batch that killed its model worker ``max_batch_attempts`` times.
POISON_BATCH = "poison_batch"


PIXELS = "pixels"


SSCD_PIXELS = "sscd_pixels"


#: Columns every row carries from the mapper to the writer, besides the pixels and embeddings. ``error`` is
#: the rejection reason with its detail, or :data:`NO_ERROR` (not null: Ray turns an all-null block's
#: column into floats on its way through numpy batches).
ROW_COLUMNS = (
    "key",
    "shard",
    "shard_rows",
    "row",
    "caption",
    "url",
    "sha256",
    "width",
    "height",
    "phash",
    "error",
)


@dataclass(frozen=True)
class DecodePlan:
    """What the decode tasks need to know about the models, derived on the driver without loading them.

    Attributes:
        max_pixels (`int`): decompression-bomb limit for :func:`~pipeline.io.decode.decode_image`.
        clip_preprocess (`dict`): the model's open_clip ``PreprocessCfg`` (from
            :func:`~pipeline.embed.clip_models.clip_spec`).
        sscd_image_size (`int`, *optional*): side of the SSCD input; None when no SSCD model is used.
    """

    max_pixels: int
    clip_preprocess: dict[str, Any]
    sscd_image_size: int | None = None


def read_rows(
    item: dict[str, Any], shards: dict[str, Shard], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> list[dict[str, Any]]:
    """Reader: the raw rows of the shard named in ``item``, each with its position ``row`` in the shard.

    Tar members over ``max_member_bytes`` are not read (their rows are rejected, ``member_too_large``).
    """
    rows = read_shard(shards[item["shard"]], max_member_bytes)
    for index, row in enumerate(rows):
        row["row"] = index
    return rows


def fit_to_model(image: Image.Image, preprocess: dict[str, Any]) -> Image.Image:
    """open_clip's eval geometry (resize, center crop) done with PIL alone, for the decode tasks.

    It equals the geometric steps of open_clip's own transform (torchvision on PIL images) for the
    modes :func:`~pipeline.embed.clip_models.clip_spec` accepts: ``shortest`` (the short side to the square
    size, then a center crop) and ``squash``; the tests check it against open_clip's transform.
    """
    height, width = preprocess["size"]
    resample = (
        Image.Resampling.BILINEAR if preprocess["interpolation"] == "bilinear" else Image.Resampling.BICUBIC
    )
    if preprocess["resize_mode"] == "squash":
        return image.resize((width, height), resample) if image.size != (width, height) else image
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = height, int(height * long / short)  # torchvision's rounding
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left, top = round((new_w - width) / 2.0), round((new_h - height) / 2.0)
    return image.crop((left, top, left + width, top + height))


def prepare_batch(batch: pa.Table, plan: DecodePlan) -> dict[str, np.ndarray]:
    """Mapper: decode each image once; pHash it and resize it to the model inputs as uint8 pictures.

    Rejected rows keep their place with ``error`` set and all-zero pixels, so the model actor can pass
    them through and the writer can count them.
    """
    height, width = plan.clip_preprocess["size"]
    n = batch.num_rows
    pixels = np.zeros((n, height, width, 3), dtype=np.uint8)
    thumbnails = np.zeros((n, SIDE, SIDE), dtype=np.float32)
    sscd_side = plan.sscd_image_size
    sscd_pixels = np.zeros((n, sscd_side, sscd_side, 3), dtype=np.uint8) if sscd_side else None
    columns: dict[str, list[Any]] = {name: [] for name in ROW_COLUMNS if name != "phash"}
    for i, row in enumerate(batch.to_pylist()):
        decoded = None if row["read_error"] else decode_image(row["image"], plan.max_pixels)
        error = row["read_error"] or decoded.error
        for name in ("key", "shard", "shard_rows", "row", "caption", "url"):
            columns[name].append(row[name])
        columns["sha256"].append(decoded.sha256 if decoded else "")
        columns["width"].append(decoded.width if decoded else 0)
        columns["height"].append(decoded.height if decoded else 0)
        columns["error"].append(error or NO_ERROR)
        if error is None:
            pixels[i] = np.asarray(fit_to_model(decoded.image, plan.clip_preprocess))
            thumbnails[i] = grayscale_thumbnail(decoded.image)
            if sscd_pixels is not None:
                sscd_pixels[i] = np.asarray(
                    decoded.image.resize((sscd_side, sscd_side), Image.Resampling.BILINEAR)
                )
    ok = np.array([e == NO_ERROR for e in columns["error"]], dtype=bool)
    out: dict[str, np.ndarray] = {name: np.array(values, dtype=object) for name, values in columns.items()}
    for name in ("shard_rows", "row", "width", "height"):
        out[name] = np.asarray(columns[name], dtype=np.int64)
    out["phash"] = np.where(ok, phash_thumbnails(thumbnails), np.uint64(0))
    out[PIXELS] = pixels
    if sscd_pixels is not None:
        out[SSCD_PIXELS] = sscd_pixels
    return out
