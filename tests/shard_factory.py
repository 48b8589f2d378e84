"""Builds img2dataset-style shards (NNNNN.tar + .parquet + _stats.json) for tests, bad inputs included."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass
class FakeSample:
    """One sample to put in a shard; ``files`` maps extension -> bytes (None: leave the file out)."""

    key: str
    files: dict[str, bytes]
    status: str = "success"
    error_message: str | None = None
    url: str = ""
    caption: str = ""
    in_tar: bool = True
    extra: dict = field(default_factory=dict)


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def random_photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth random RGB picture (gradients + blobs), so JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        channels.append(127 + 100 * np.sin(3 * a * xx + 3 * b * yy + 6 * c))
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), "RGB")


def sample(key: str, image_bytes: bytes | None, caption: str | None = "a caption", ext: str = "jpg",
           url: str | None = None, json_bytes: bytes | None = None) -> FakeSample:
    """A successful img2dataset sample: image, .txt caption and .json metadata."""
    url = url if url is not None else f"http://127.0.0.1/{key}.{ext}"
    files: dict[str, bytes] = {}
    if image_bytes is not None:
        files[ext] = image_bytes
    if caption is not None:
        files["txt"] = caption.encode("utf-8")
    files["json"] = json_bytes if json_bytes is not None else json.dumps({"url": url, "key": key}).encode()
    return FakeSample(key=key, files=files, url=url, caption=caption or "")


def write_shard(folder: Path, shard_id: int, samples: list[FakeSample], *, with_parquet: bool = True,
                truncate_to: int | None = None) -> Path:
    """Write ``folder/NNNNN.tar`` (+ parquet + stats) like img2dataset; optionally cut the tar short."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard_id:05d}"
    tar_path = folder / f"{name}.tar"
    with tarfile.open(tar_path, "w") as archive:
        for s in samples:
            if not (s.in_tar and s.status == "success"):
                continue
            for ext, data in s.files.items():
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    if truncate_to is not None:
        with open(tar_path, "r+b") as fh:
            fh.truncate(truncate_to)
    if with_parquet:
        table = pa.table({
            "url": [s.url for s in samples],
            "caption": [s.caption for s in samples],
            "key": [s.key for s in samples],
            "status": [s.status for s in samples],
            "error_message": [s.error_message for s in samples],
        })
        pq.write_table(table, folder / f"{name}.parquet")
        stats = {"count": len(samples), "successes": sum(s.status == "success" for s in samples)}
        (folder / f"{name}_stats.json").write_text(json.dumps(stats))
    return tar_path
