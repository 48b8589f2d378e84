"""Embedding throughput: end-to-end images/s of the embed stage against the model-only ceiling.

    python benchmarks/embed_throughput.py --model tiny --images 2048
    python benchmarks/embed_throughput.py --model ViT-B-32 --images 256 --batch-size 32
    python benchmarks/embed_throughput.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --shards DIR

Both figures come from one run on one machine, with the same model and batch size:

* end-to-end: ``run_embed`` on img2dataset shards (synthetic 256 px JPEGs with captions, unless
  ``--shards`` is given) in a local Ray (or the cluster in RAY_ADDRESS): read, decode, pHash, resize,
  model, write; also when its first results reached the driver (actor start, model load, and the
  first input block: results come back a block, about a shard, at a time);
* model-only ceiling: the same model in this process on preprocessed uint8 tensors, images and
  captions, no I/O; on CPU once with one thread (what one CPU actor gets) and once with every core;
* decode-only: the CPU stage (decode, pHash, resize) on one core in this process, no model.

Prints a Markdown table (for BENCHMARKS.md) and, with ``--json``, writes the raw figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # fixtures.shard_factory: img2dataset-style shards

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from fixtures.shard_factory import encode, sample, write_shard
from pipeline.core.config import EmbedConfig, RayConfig
from pipeline.core.ray_runtime import ray_session
from pipeline.embed.clip_models import clip_spec, load_clip
from pipeline.embed.embed import run_embed
from pipeline.embed.prepare import DecodePlan, prepare_batch, read_rows
from pipeline.io.shards import list_shards

SIDE = 256


def synthetic_photo(seed: int) -> Image.Image:
    """A textured 256 px picture (coarse and fine colour noise, upsampled): JPEG-sized like a photo."""
    rng = np.random.default_rng(seed)
    layers = [
        Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)).resize(
            (SIDE, SIDE), Image.Resampling.BICUBIC
        )
        for cells in (6, 48)
    ]
    return Image.blend(layers[0], layers[1], 0.35)


def build_shards(folder: Path, images: int, per_shard: int) -> None:
    """img2dataset-style shards of ``images`` JPEGs (quality 90) with short captions."""
    for shard in range(0, images, per_shard):
        rows = [
            sample(f"{i:09d}", encode(synthetic_photo(i), quality=90), f"a synthetic photograph number {i}")
            for i in range(shard, min(images, shard + per_shard))
        ]
        write_shard(folder, shard // per_shard, rows)


def model_ceiling(cfg: EmbedConfig, images: int, threads: int | None) -> dict[str, float]:
    """Images/s of the model alone on preprocessed uint8 inputs (and captions), after one warm-up batch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        clip = load_clip(cfg, device, cfg.precision)
        height, width = clip.spec.preprocess["size"]
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (images, height, width, 3), dtype=np.uint8)
        captions = [f"a synthetic photograph number {i}" for i in range(images)]
        clip.encode_images(pixels[: cfg.batch_size], cfg.batch_size)  # warm-up
        clip.encode_texts(captions[: cfg.batch_size], cfg.batch_size)
        timings = {}
        for label, work in (
            ("images", lambda: clip.encode_images(pixels, cfg.batch_size)),
            ("captions", lambda: clip.encode_texts(captions, cfg.batch_size)),
        ):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            work()
            if device == "cuda":
                torch.cuda.synchronize()
            timings[label] = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return {
        "device": device,
        "threads": threads or previous,
        "image_only_per_s": images / timings["images"],
        "images_and_captions_per_s": images / (timings["images"] + timings["captions"]),
    }


def decode_only(cfg: EmbedConfig, images: int) -> float:
    """Rows/s of the CPU stage (decode, pHash, resize to the model input) on one core, no model."""
    shards = {s.name: s for s in list_shards(cfg.shards)}
    rows: list[dict[str, Any]] = []
    for name in shards:
        rows.extend(read_rows({"shard": name}, shards))
        if len(rows) >= images:
            break
    plan = DecodePlan(max_pixels=cfg.max_image_pixels, clip_preprocess=clip_spec(cfg).preprocess)
    step = cfg.decode_batch_size
    batches = [pa.Table.from_pylist(rows[i : i + step]) for i in range(0, min(images, len(rows)), step)]
    started = time.perf_counter()
    for batch in batches:
        prepare_batch(batch, plan)
    return sum(b.num_rows for b in batches) / (time.perf_counter() - started)


def end_to_end(cfg: EmbedConfig) -> dict[str, Any]:
    """One ``run_embed``: images/s over the whole run (start-up included) and the start-up itself."""
    summary = run_embed(cfg)
    return {
        "embedded": summary["embedded"],
        "seconds": summary["seconds"],
        "first_batch_s": summary["first_batch_s"],
        "per_s": summary["images_per_second"],
        "device": summary["device"],
        "precision": summary["precision"],
        "actors": summary["actors"],
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews every figure
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="open_clip architecture, or tiny")
    parser.add_argument("--pretrained", default=None, help="pretrained tag (default: random weights)")
    parser.add_argument("--images", type=int, default=1024, help="synthetic images (ignored with --shards)")
    parser.add_argument("--per-shard", type=int, default=256, help="synthetic images per shard")
    parser.add_argument("--shards", default=None, help="benchmark these img2dataset shards instead")
    parser.add_argument("--batch-size", type=int, default=64, help="model batch size")
    parser.add_argument("--precision", default="auto", help="auto, fp16, bf16 or fp32 (GPU only)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        shards = Path(args.shards) if args.shards else Path(tmp) / "shards"
        if not args.shards:
            build_shards(shards, args.images, args.per_shard)
        cfg = EmbedConfig(
            shards=str(shards),
            out=str(Path(tmp) / "out"),
            model=args.model,
            pretrained=args.pretrained,
            batch_size=args.batch_size,
            precision=args.precision,
            log_every_s=30.0,
        )
        with ray_session(RayConfig(progress_bars=False)):
            e2e = end_to_end(cfg)
        decode_per_s = decode_only(cfg, min(e2e["embedded"], 1024))
    # On CPU the ceiling is measured twice: with one CPU actor's share (one thread) and with every core.
    thread_counts = (None,) if torch.cuda.is_available() else (1, None)
    ceiling_images = min(e2e["embedded"], 4096)  # a rate: more images only take longer
    ceilings = [model_ceiling(cfg, ceiling_images, threads) for threads in thread_counts]

    result = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "model": args.model,
        "pretrained": args.pretrained,
        "batch_size": args.batch_size,
        "end_to_end": e2e,
        "model_only": ceilings,
        "decode_only_per_core_per_s": decode_per_s,
    }
    print(json.dumps(result, indent=2))
    print()
    print("| model | device | images | e2e img/s (1st result at s) | model-only img/s | decode img/s/core |")
    print("| --- | --- | --- | --- | --- | --- |")
    model_only = ", ".join(
        f"{c['images_and_captions_per_s']:.0f} ({c['threads']} thr; images alone {c['image_only_per_s']:.0f})"
        for c in ceilings
    )
    print(
        f"| {args.model} | {e2e['device']} {e2e['precision']} x{e2e['actors']} | {e2e['embedded']} | "
        f"{e2e['per_s']:.1f} ({e2e['first_batch_s']:.0f}) | {model_only} | {decode_per_s:.0f} |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
