"""Memorization audit: generate for every prompt, match each sample against the training set, flag, report.

Runner (:func:`run_audit`, behind ``jobs/audit.py``):

1. **Prompts.** :func:`pipeline.prompts.read_prompts` reads the list (any published layout; an unknown
   one is a :class:`~pipeline.prompts.PromptListError`). ``dry_run`` stops here and writes
   ``prompts.parquet``.
2. **Run id.** :func:`run_identity` fingerprints what decides a sample: the model's files, the bundle's
   manifest, and every audit setting that changes a generation or a flag. Not the prompt list: a longer
   list under the same run id only adds prompts. Work lives under ``OUT/runs/<run_id>/``.
3. **Work.** One work item per prompt, covering the AMG modes asked for (``off``, ``on``) that have
   no done marker yet. Sample ``k`` of a prompt is seeded with :func:`sample_seed` (a hash of the run
   seed, the prompt id and ``k``; one ``torch.Generator`` per sample), the same seed with and without
   AMG, so results depend neither on batching nor on which actor or how many actors ran it.
4. **Generation.** A Ray actor pool of :class:`GeneratorActor` (one per GPU with ``num_gpus=1``, else
   CPU actors sized by :func:`~pipeline.ray_runtime.cpu_actor_pool_size`) loads the pipeline and the
   detector once. Per prompt: Wen's score (the pre-screen; prompts below ``wen_threshold`` are not
   generated), then per mode the samples, in batches, each matched to its nearest training image
   through the bundle (:class:`~pipeline.amg.MemorizationDetector` with the configured similarity;
   AMG's own detector is the same backend and index, so AMG and the audit agree on what a copy is),
   then Carlini's clique criterion over the prompt's generations (:mod:`pipeline.extraction`).
5. **Writer.** The driver writes each (prompt, mode) partition, its images and then its done marker;
   an interrupted run resumes from the markers, and finished prompts are never generated again.
6. **Outputs.** ``results.parquet`` (one row per sample), ``prompts.parquet`` (one row per prompt),
   ``summary.json`` (per mode: memorized fraction, Top-5%, Top-1, counts; provenance) and the
   self-contained ``report.html`` (:mod:`pipeline.report`), over the prompts of the current list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AuditConfig, RayConfig, to_dict
from pipeline.prompts import read_prompts
from pipeline.ray_runtime import ray_session
from pipeline.storage import (
    DoneMarkers,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    fingerprint,
    sha256_file,
)

log = logging.getLogger(__name__)

AUDIT_SCHEMA_VERSION = 1
AMG_CHOICES = {"off": ("off",), "on": ("on",), "both": ("off", "on")}
SIMILARITIES = ("sscd", "clip", "nl2")
RESULTS = "results.parquet"
PROMPTS = "prompts.parquet"
SUMMARY = "summary.json"
REPORT = "report.html"
RUNS = "runs"
PARTS = "parts"
IMAGES = "images"
WEN = "wen"

#: One row per generated sample.
RESULTS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("amg_mode", pa.string()),
        ("similarity", pa.float64()),
        ("similarity_kind", pa.string()),
        ("matched_row", pa.int64()),
        ("matched_key", pa.string()),
        ("matched_caption", pa.string()),
        ("matched_caption_count", pa.int32()),
        ("memorized", pa.bool_()),
        ("in_clique", pa.bool_()),
        ("amg_fired", pa.bool_()),
        ("amg_fired_steps", pa.int32()),
        ("seconds", pa.float64()),
        ("image", pa.string()),
    ]
)

#: Per-mode columns of ``prompts.parquet`` (``off_...`` and ``on_...``).
MODE_COLUMNS = (
    ("n_samples", pa.int32()),
    ("n_memorized", pa.int32()),
    ("frac_memorized", pa.float64()),
    ("max_similarity", pa.float64()),
    ("mean_similarity", pa.float64()),
    ("largest_clique", pa.int32()),
    ("clique_required", pa.int32()),
    ("clique_flagged", pa.bool_()),
    ("median_tiled_l2", pa.float64()),
    ("flagged", pa.bool_()),
    ("seconds", pa.float64()),
)

PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("occurrences", pa.int32()),
        ("extra", pa.string()),
        ("wen_score", pa.float64()),
        ("prescreen_skipped", pa.bool_()),
        ("audited", pa.bool_()),
    ]
    + [(f"{m}_{name}", kind) for m in ("off", "on") for name, kind in MODE_COLUMNS]
    + [
        ("matched_key", pa.string()),
        ("matched_caption", pa.string()),
        ("matched_similarity", pa.float64()),
        ("flagged", pa.bool_()),
    ]
)


# ----------------------------------------------------------------------------- seeds and identity
def sample_seed(run_seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of a prompt: 63 bits of SHA-256 of (run seed, prompt id, index)."""
    digest = hashlib.sha256(f"{int(run_seed)}:{prompt_id}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def resolve_model_dir(path: str | Path) -> Path:
    """The diffusers pipeline folder of ``path``: itself (``model_index.json``), or its ``text2img/``
    (a folder written by ``jobs/train_memorizing_model.py``)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    if (path / "text2img" / "model_index.json").is_file():
        return path / "text2img"
    raise FileNotFoundError(
        f"model {path} is not a diffusers pipeline folder (no model_index.json, nor text2img/model_index.json)"
    )


def tree_checksum(folder: str | Path, cache: Path | None = None) -> str:
    """SHA-256 over the relative paths and SHA-256s of every file under ``folder`` (hidden files skipped).

    ``cache`` (a JSON file) remembers each file's hash by (path, size, mtime), so a scheduled re-run does
    not re-read gigabytes of unchanged weights.
    """
    folder = Path(folder).resolve()
    if folder.is_file():
        files = [folder]
        base = folder.parent
    else:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        base = folder
    known: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    digest = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        key = str(f)
        entry = known.get(key)
        if not entry or entry[:2] != [st.st_size, st.st_mtime_ns]:
            entry = [st.st_size, st.st_mtime_ns, sha256_file(f)]
            known[key] = entry
            changed = True
        digest.update(f"{f.relative_to(base).as_posix()}\0{entry[2]}\n".encode())
    if cache is not None and changed:
        atomic_write_json(cache, known)
    return digest.hexdigest()


#: Settings that do not change any sample, flag or aggregate: left out of the run id.
RUN_ID_EXCLUDED = (
    "bundle",
    "prompts",
    "out",
    "model",
    "prompt_column",
    "amg",
    "batch_size",
    "num_actors",
    "max_prompts",
    "thumbnail_size",
    "dry_run",
    "sscd_checkpoint",
    "amg_overrides",
)


def run_identity(
    cfg: AuditConfig,
    model_checksum: str,
    bundle_checksum: str,
    amg_on: dict[str, Any],
    detection: dict[str, Any],
    descriptor_checksum: str | None,
) -> dict[str, Any]:
    """What the run id fingerprints: model and bundle content, descriptor, and the audit settings that
    decide a sample or a flag (the AMG constants included). The prompt list and the AMG selection are
    not part of it: a longer list, or ``--amg both`` after ``--amg off``, adds to the same run."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in RUN_ID_EXCLUDED}
    return {
        "schema": AUDIT_SCHEMA_VERSION,
        "model_checksum": model_checksum,
        "bundle_checksum": bundle_checksum,
        "descriptor_checksum": descriptor_checksum,
        "settings": settings,
        "amg_on": amg_on,
        "detection": detection,
    }


# ----------------------------------------------------------------------------- similarity through the bundle
@dataclass
class Matcher:
    """The audit's similarity: a backend, the bundle's index over that backend's vectors, and image access.

    Attributes:
        backend: a :class:`~pipeline.amg.SimilarityBackend` making query vectors like the bundle's.
        index: the bundle's :class:`~pipeline.neighbours.NeighbourIndex` over them.
        descriptor (`str`): what makes the vectors, for the provenance.
        descriptor_checksum (`str`, *optional*): checksum of the descriptor model file.
        training_image (`Callable[[int], bytes | None]`): encoded image of a training row, for the report.
    """

    backend: Any
    index: Any
    descriptor: str
    descriptor_checksum: str | None
    training_image: Callable[[int], bytes | None]


def bundle_checksum(bundle: str | Path) -> str:
    """The bundle's version: SHA-256 of its ``manifest.json`` (which lists every file's SHA-256)."""
    manifest = Path(bundle) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"bundle {bundle} has no manifest.json (build it with jobs/build_artifacts.py)"
        )
    return sha256_file(manifest)


#: Largest bundle the nl2 similarity decodes into RAM (pixels of every training image).
NL2_MAX_ROWS = 200_000


class TrainingImages:
    """Encoded training images of bundle rows, read back from the img2dataset shards the bundle was built
    from (the bundle holds embeddings, not pictures). Shards are found where the manifest says, or in
    ``shards`` when given; a missing shard folder gives None for every row."""

    def __init__(self, bundle, shards: str | Path | None = None):
        from pipeline.embeddings_io import load_metadata

        self.folder = Path(shards or bundle.manifest.get("config", {}).get("bundle", {}).get("shards") or "")
        meta = load_metadata(bundle.path / "embeddings", ["key", "shard"])
        self.keys = meta.column("key").to_pylist()
        self.shards = meta.column("shard").to_pylist()
        self._cache: dict[str, dict[str, bytes]] = {}

    def _shard(self, name: str) -> dict[str, bytes]:
        if name not in self._cache:
            from pipeline.shards import IMAGE_EXTENSIONS, iter_tar_samples

            found: dict[str, bytes] = {}
            tar = self.folder / f"{name}.tar"
            if tar.is_file():
                for sample in iter_tar_samples(tar):
                    data = next((sample.files[e] for e in IMAGE_EXTENSIONS if e in sample.files), None)
                    if data:
                        found[sample.key] = data
            else:
                log.warning("training images: shard %s not found (bundle built from %s)", tar, self.folder)
            self._cache = {name: found}  # one shard at a time: rows are asked for shard by shard
        return self._cache[name]

    def __call__(self, row_id: int) -> bytes | None:
        row_id = int(row_id)
        if not 0 <= row_id < len(self.keys) or not self.shards[row_id]:
            return None
        return self._shard(str(self.shards[row_id])).get(str(self.keys[row_id]))

    def pixels(self, size: int) -> np.ndarray:
        """Every row's image at ``size``×``size`` as ``(N, 3, size, size)`` float32 in [−1, 1] (row order)."""
        from PIL import Image

        from pipeline.decode import decode_image

        out = np.zeros((len(self.keys), 3, size, size), dtype=np.float32)
        order = sorted(range(len(self.keys)), key=lambda i: (str(self.shards[i]), i))
        for i in order:
            decoded = decode_image(self(i), 89_478_485)
            if decoded.image is None:
                raise FileNotFoundError(
                    f"training image of bundle row {i} (key {self.keys[i]}) not found in "
                    f"{self.folder}; nl2 needs the shards the bundle was built from"
                )
            arr = np.asarray(decoded.image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
            out[i] = arr.transpose(2, 0, 1) / 127.5 - 1
        return out


class PixelIndex:
    """A :class:`~pipeline.neighbours.NeighbourIndex` over training pixels, for the nl2 similarity:
    exact L2 search (FAISS flat) over every bundle row's image at one size; captions, duplicate
    captions and row metadata are the bundle's."""

    def __init__(self, bundle, pixels: np.ndarray):
        import faiss

        self.bundle = bundle
        self._vectors = np.ascontiguousarray(pixels.reshape(len(pixels), -1).astype(np.float32))
        self._vectors = (self._vectors + 1) / 2  # NormalizedL2Backend's vectors: pixels in [0, 1]
        self._index = faiss.IndexFlatL2(self._vectors.shape[1])
        self._index.add(self._vectors)

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(np.ascontiguousarray(queries, dtype=np.float32), min(int(k), len(self)))

    def embeddings(self, row_ids: np.ndarray) -> np.ndarray:
        return self._vectors[np.asarray(row_ids, dtype=np.int64)]

    def duplicate_caption(self, row_id: int):
        return self.bundle.duplicate_caption(row_id)

    def row(self, row_id: int) -> dict:
        return self.bundle.row(row_id)


def _embed_config(manifest: dict[str, Any]):
    from pipeline.config import EmbedConfig

    known = {f.name for f in dataclasses.fields(EmbedConfig)}
    return EmbedConfig(**{k: v for k, v in manifest.get("config", {}).get("embed", {}).items() if k in known})


def open_matcher(
    bundle: str | Path,
    similarity: str,
    sscd_checkpoint: str | None = None,
    device: str = "cpu",
    pixel_size: int = 32,
) -> Matcher:
    """The backend and bundle index for ``similarity``, so that queries are made like the bundle's vectors.

    * ``sscd``: the bundle's ``sscd_emb`` index and the SSCD TorchScript file it was embedded with (the
      manifest's path, or ``sscd_checkpoint``, which must have the manifest's sha256);
    * ``clip``: the bundle's ``img_emb`` index and the open_clip model of its manifest;
    * ``nl2``: Carlini's normalised L2 over every training image at ``pixel_size`` (read from the
      bundle's shards; small bundles only), with the bundle's captions and duplicate counts.
    """
    from pipeline.amg import NormalizedL2Backend, OpenClipBackend, SSCDBackend
    from pipeline.bundle import open_bundle
    from pipeline.embeddings_io import IMG_EMB, SSCD_EMB

    if similarity == "sscd":
        index = open_bundle(bundle, verify=False, kind=SSCD_EMB)
        model = index.manifest.get("indexes", {}).get(SSCD_EMB, {}).get("model", {})
        path = sscd_checkpoint or model.get("checkpoint")
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"the SSCD model the bundle was embedded with ({model.get('checkpoint')}) is not here; "
                f"pass --sscd-checkpoint FILE (sha256 {model.get('sha256')})"
            )
        digest = sha256_file(path)
        if model.get("sha256") and digest != model["sha256"]:
            raise ValueError(
                f"--sscd-checkpoint {path} is not the model the bundle's SSCD descriptors were made "
                f"with (sha256 {digest[:12]}..., bundle {model['sha256'][:12]}...)"
            )
        backend = SSCDBackend.from_file(path, image_size=int(model.get("image_size") or 320), device=device)
        descriptor = f"SSCD {path}"
    elif similarity == "clip":
        from pipeline.clip_models import load_clip

        index = open_bundle(bundle, verify=False, kind=IMG_EMB)
        loaded = load_clip(_embed_config(index.manifest), device)
        backend = OpenClipBackend.from_loaded_clip(loaded).to(device)
        digest = None
        descriptor = f"open_clip {loaded.spec.name}"
    elif similarity == "nl2":
        base = open_bundle(bundle, verify=False, kind=IMG_EMB)
        if len(base) > NL2_MAX_ROWS:
            raise ValueError(
                f"nl2 compares pixels with every training image in RAM; the bundle has {len(base)} "
                f"rows (at most {NL2_MAX_ROWS}): use --similarity sscd or clip"
            )
        images = TrainingImages(base)
        index = PixelIndex(base, images.pixels(pixel_size))
        backend = NormalizedL2Backend(image_size=pixel_size)
        digest = None
        descriptor = f"pixels at {pixel_size}x{pixel_size}"
        return Matcher(backend, index, descriptor, digest, images)
    else:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    return Matcher(backend, index, descriptor, digest, TrainingImages(index))


# ----------------------------------------------------------------------------- Wen pre-screen
def wen_prescreen(
    pipe, prompt: str, seeds: Sequence[int], num_inference_steps: int, guidance_scale: float, steps: int = 1
) -> tuple[float, list[list[float]]]:
    """Wen et al.'s score of ``prompt``: mean over the first ``steps`` sampling steps and the ``seeds`` of
    ‖ε(x_t, c) − ε(x_t, ∅)‖₂, following the CFG trajectory the full generation takes from the same seeds.

    Costs ``steps`` UNet passes (batched over seeds, both CFG branches), against the full sampling's
    ``num_inference_steps`` and the detector. Returns the score and the norms, ``(steps, seeds)``.
    """
    import torch

    from pipeline.extraction import wen_norms, wen_score

    device = pipe._execution_device
    n = len(seeds)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, device, n, True)
        states = torch.cat([uncond, cond])
        h = w = pipe.unet.config.sample_size * pipe.vae_scale_factor
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, h, w, cond.dtype, device, generators)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the pipeline's stays untouched
        scheduler.set_timesteps(num_inference_steps, device=device)
        norms = []
        for t in scheduler.timesteps[: max(1, int(steps))]:
            x = torch.cat([latents] * 2)
            if hasattr(scheduler, "scale_model_input"):
                x = scheduler.scale_model_input(x, t)
            eps_u, eps_c = pipe.unet(x, t, encoder_hidden_states=states, return_dict=False)[0].chunk(2)
            norms.append(wen_norms(eps_c, eps_u))
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return wen_score(norms), [n_.tolist() for n_ in norms]


# ----------------------------------------------------------------------------- the actor
@dataclass(frozen=True)
class WorkerSpec:
    """Everything a :class:`GeneratorActor` needs (plain values: it travels to the actor)."""

    model_dir: str
    bundle: str
    similarity: str
    sscd_checkpoint: str | None
    amg_on: dict[str, Any]
    detection: dict[str, Any]
    samples_per_prompt: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    batch_size: int
    tile_grid: int
    tile_threshold: float
    clique_size: int
    wen_steps: int
    wen_samples: int
    wen_threshold: float
    torch_threads: int | None = None


def _png(image) -> bytes:
    """A ``(3, H, W)`` tensor in [−1, 1] as PNG bytes."""
    from PIL import Image

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class GeneratorActor:
    """Loads the text-to-image pipeline, the bundle index and the detectors once; audits one prompt per call.

    Used as a Ray actor by :func:`run_audit` (``ray.remote(GeneratorActor)``) and directly in tests.
    """

    def __init__(self, spec: WorkerSpec, device: str = "cpu"):
        import torch

        from pipeline.amg import (
            AMGConfig,
            AMGStableDiffusionPipeline,
            AntiMemorizationGuidance,
            MemorizationDetector,
        )

        if spec.torch_threads:
            torch.set_num_threads(int(spec.torch_threads))
        self.spec = spec
        self.device = device
        self.pipe = AMGStableDiffusionPipeline.from_pretrained(spec.model_dir).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.matcher = open_matcher(
            spec.bundle, spec.similarity, spec.sscd_checkpoint, device, pixel_size=size
        )
        backend, index = self.matcher.backend, self.matcher.index
        self.detector = MemorizationDetector(backend, index, AMGConfig(**spec.detection))
        self.amg = AntiMemorizationGuidance(MemorizationDetector(backend, index, AMGConfig(**spec.amg_on)))

    def ping(self) -> str:
        return f"{os.getpid()}:{self.device}"

    def audit_prompt(
        self,
        prompt_id: str,
        prompt: str,
        modes: Sequence[str],
        need_wen: bool = True,
        wen: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Wen's score, then (unless pre-screened out) every sample of ``modes`` with its match and flags."""
        spec = self.spec
        seeds = [sample_seed(spec.seed, prompt_id, k) for k in range(spec.samples_per_prompt)]
        if wen is None:
            t0 = time.monotonic()
            score, norms = wen_prescreen(
                self.pipe,
                prompt,
                seeds[: max(1, spec.wen_samples)],
                spec.num_inference_steps,
                spec.guidance_scale,
                spec.wen_steps,
            )
            wen = {
                "wen_score": score,
                "wen_norms": norms,
                "seconds": time.monotonic() - t0,
                "skipped": bool(spec.wen_threshold > 0 and score < spec.wen_threshold),
            }
        result: dict[str, Any] = {"prompt_id": prompt_id, "wen": wen, "modes": {}}
        if wen["skipped"]:
            return result
        for mode in modes:
            result["modes"][mode] = self._generate(prompt_id, prompt, seeds, mode)
        return result

    def _generate(self, prompt_id: str, prompt: str, seeds: list[int], mode: str) -> dict[str, Any]:
        import torch

        from pipeline.amg.evaluation import sample_text2img
        from pipeline.extraction import carlini_flag

        spec = self.spec
        amg = self.amg if mode == "on" else None
        images, rows, pngs = [], [], []
        for start in range(0, len(seeds), spec.batch_size):
            chunk = seeds[start : start + spec.batch_size]
            t0 = time.monotonic()
            batch, traces = sample_text2img(
                self.pipe, [prompt], chunk, amg, spec.num_inference_steps, spec.guidance_scale
            )
            det = self.detector.detect(batch)
            seconds = (time.monotonic() - t0) / len(chunk)
            trace = traces[0]
            fired = trace.any_fired() if trace is not None else [None] * len(chunk)
            for j, seed in enumerate(chunk):
                row_id = int(det.row_ids[j])
                meta = self.matcher.index.row(row_id)
                dup = det.captions[j]
                fired_steps = None
                if trace is not None:
                    fired_steps = sum(bool(s.spe[j] or s.dup[j] or s.sim[j]) for s in trace.steps)
                rows.append(
                    {
                        "prompt_id": prompt_id,
                        "sample_index": start + j,
                        "seed": int(seed),
                        "amg_mode": mode,
                        "similarity": float(det.sigma[j]),
                        "similarity_kind": spec.similarity,
                        "matched_row": row_id,
                        "matched_key": str(meta.get("key")),
                        "matched_caption": meta.get("caption"),
                        "matched_caption_count": int(dup.count),
                        "memorized": bool(self.detector.memorized(det.sigma[j : j + 1])[0]),
                        "amg_fired": fired[j],
                        "amg_fired_steps": fired_steps,
                        "seconds": seconds,
                    }
                )
            images.append(batch.cpu())
            pngs += [_png(img) for img in batch]
        stack = torch.cat(images)
        clique = carlini_flag(stack, spec.tile_grid, spec.tile_threshold, spec.clique_size)
        members = set(clique.clique) if len(clique.clique) >= 2 else set()
        for i, row in enumerate(rows):
            row["in_clique"] = i in members
        return {"rows": rows, "images": pngs, "clique": dataclasses.asdict(clique)}


# ----------------------------------------------------------------------------- writer and reader
class RunStore:
    """``OUT/runs/<run_id>/``: per-prompt partitions (``parts/<prompt_id>/<mode>.parquet``), their done
    markers, Wen scores and images (``images/<prompt_id>/<mode>_<k>.png``)."""

    def __init__(self, out: Path, run_id: str):
        self.out = out
        self.run_id = run_id
        self.root = out / RUNS / run_id

    def markers(self, prompt_id: str) -> DoneMarkers:
        return DoneMarkers(self.root / PARTS / prompt_id, self.run_id)

    def part_path(self, prompt_id: str, mode: str) -> Path:
        return self.root / PARTS / prompt_id / f"{mode}.parquet"

    def image_rel(self, prompt_id: str, mode: str, k: int) -> str:
        return f"{RUNS}/{self.run_id}/{IMAGES}/{prompt_id}/{mode}_{k}.png"

    def wen(self, prompt_id: str) -> dict[str, Any] | None:
        return self.markers(prompt_id).read(WEN)

    def done(self, prompt_id: str, mode: str) -> dict[str, Any] | None:
        return self.markers(prompt_id).read(mode)

    def todo_modes(self, prompt_id: str, modes: Sequence[str]) -> list[str]:
        """Modes of ``prompt_id`` still to generate (none once the pre-screen skipped the prompt)."""
        wen = self.wen(prompt_id)
        if wen is not None and wen.get("skipped"):
            return []
        return [m for m in modes if self.done(prompt_id, m) is None]

    def write(self, result: dict[str, Any]) -> None:
        """Images, then partition files, then done markers: a marker always means complete files."""
        pid = result["prompt_id"]
        markers = self.markers(pid)
        if markers.read(WEN) is None:
            markers.write(WEN, result["wen"])
        for mode, part in result["modes"].items():
            rows = []
            for row, png in zip(part["rows"], part["images"]):
                rel = self.image_rel(pid, mode, row["sample_index"])
                atomic_write_bytes(self.out / rel, png)
                rows.append({**row, "run_id": self.run_id, "image": rel})
            atomic_write_table(self.part_path(pid, mode), pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
            markers.write(
                mode,
                {
                    "samples": len(rows),
                    "clique": part["clique"],
                    "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                },
            )

    def read_rows(self, prompt_id: str, mode: str) -> list[dict[str, Any]]:
        return pq.read_table(self.part_path(prompt_id, mode)).to_pylist()


# ----------------------------------------------------------------------------- aggregation
def _quantile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def prompt_row(
    prompt: dict[str, Any],
    wen: dict[str, Any] | None,
    per_mode: dict[str, list[dict[str, Any]]],
    cliques: dict[str, dict[str, Any]],
    modes: Sequence[str],
) -> dict[str, Any]:
    """One row of ``prompts.parquet``: the prompt, its Wen score and, per AMG mode, aggregates and flags.

    A prompt is flagged in a mode when one of its samples matches a training image above the threshold
    (the bundle criterion: a confirmed copy). A Carlini clique (near-identical generations, the criterion
    that needs no training data) is reported beside it as ``clique_flagged``: in Carlini et al. it selects
    candidates, which count as extracted only once matched to a training image, and that match is what
    the bundle answers. ``flagged`` is the AMG-off verdict when AMG off ran, else AMG on's.
    """
    row: dict[str, Any] = {k: prompt.get(k) for k in ("prompt_id", "prompt", "occurrences", "extra")}
    row["wen_score"] = None if wen is None else wen.get("wen_score")
    row["prescreen_skipped"] = bool(wen and wen.get("skipped"))
    row["audited"] = bool(per_mode)
    best: dict[str, Any] | None = None
    for mode in modes:
        rows = per_mode.get(mode)
        if not rows:
            continue
        sims = [r["similarity"] for r in rows]
        clique = cliques.get(mode, {})
        n_mem = sum(bool(r["memorized"]) for r in rows)
        clique_flagged = bool(clique.get("flagged"))
        row.update(
            {
                f"{mode}_n_samples": len(rows),
                f"{mode}_n_memorized": n_mem,
                f"{mode}_frac_memorized": n_mem / len(rows),
                f"{mode}_max_similarity": max(sims),
                f"{mode}_mean_similarity": float(np.mean(sims)),
                f"{mode}_largest_clique": len(clique.get("clique", [])),
                f"{mode}_clique_required": clique.get("required"),
                f"{mode}_clique_flagged": clique_flagged,
                f"{mode}_median_tiled_l2": None
                if clique.get("median_distance") is None or math.isnan(clique["median_distance"])
                else clique["median_distance"],
                f"{mode}_flagged": n_mem > 0,
                f"{mode}_seconds": float(sum(r["seconds"] for r in rows)),
            }
        )
        top = max(rows, key=lambda r: r["similarity"])
        if best is None:  # the first mode (off when it ran) names the matched training image
            best = top
    if best is not None:
        row.update(
            matched_key=best["matched_key"],
            matched_caption=best["matched_caption"],
            matched_similarity=best["similarity"],
        )
    first = next((m for m in modes if per_mode.get(m)), None)
    row["flagged"] = bool(first and row.get(f"{first}_flagged"))
    return row


def mode_summary(rows: list[dict[str, Any]], prompt_rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """``summary.json``'s block for one AMG mode."""
    sims = [r["similarity"] for r in rows]
    audited = [p for p in prompt_rows if p.get(f"{mode}_n_samples")]
    return {
        "n_samples": len(rows),
        "n_memorized": sum(bool(r["memorized"]) for r in rows),
        "frac_memorized": (sum(bool(r["memorized"]) for r in rows) / len(rows)) if rows else 0.0,
        "top5pct": _quantile(sims, 95),
        "top1": max(sims) if sims else None,
        "mean_similarity": float(np.mean(sims)) if sims else None,
        "n_prompts": len(audited),
        "n_prompts_flagged": sum(bool(p.get(f"{mode}_flagged")) for p in audited),
        "n_prompts_memorized": sum(bool(p.get(f"{mode}_n_memorized")) for p in audited),
        "n_prompts_clique": sum(bool(p.get(f"{mode}_clique_flagged")) for p in audited),
        "flagged_prompts": [p["prompt_id"] for p in audited if p.get(f"{mode}_flagged")],
        "seconds_per_sample": (sum(r["seconds"] for r in rows) / len(rows)) if rows else None,
    }


# ----------------------------------------------------------------------------- runner
def amg_configs(cfg: AuditConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(AMG 'on' config, detection config) as plain dicts.

    Both come from :meth:`AMGConfig.preset` for ``cfg.mode`` and ``cfg.similarity``; ``amg_overrides``
    (YAML: field -> value, or ``{paper: {...}, reference: {...}}``) changes the 'on' config. Detection
    uses the same backend and the same memorization threshold (``memorized_threshold`` overrides both).
    """
    import yaml

    from pipeline.amg import AMGConfig

    overrides: dict[str, Any] = {}
    if cfg.amg_overrides:
        data = yaml.safe_load(Path(cfg.amg_overrides).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{cfg.amg_overrides}: expected a mapping of AMGConfig fields")
        overrides = dict(data.get(cfg.mode, {})) if set(data) <= {"paper", "reference"} else data
    if cfg.memorized_threshold is not None:
        overrides["memorized_threshold"] = cfg.memorized_threshold
    on = AMGConfig.preset(cfg.mode, cfg.similarity, **overrides)
    detection = AMGConfig.preset(
        cfg.mode,
        cfg.similarity,
        memorized_threshold=on.memorized_threshold,
        nl2_k=on.nl2_k,
        nl2_alpha=on.nl2_alpha,
    )
    return on.to_dict(), detection.to_dict()


def check_config(cfg: AuditConfig) -> None:
    """Clear errors for settings that cannot work, before anything starts."""
    if cfg.amg not in AMG_CHOICES:
        raise ValueError(f"--amg must be off, on or both, got {cfg.amg!r}")
    if cfg.mode not in ("paper", "reference"):
        raise ValueError(f"--mode must be paper or reference, got {cfg.mode!r}")
    if cfg.similarity not in SIMILARITIES:
        raise ValueError(f"--similarity must be one of {', '.join(SIMILARITIES)}, got {cfg.similarity!r}")
    if cfg.samples_per_prompt < 1 or cfg.batch_size < 1 or cfg.num_inference_steps < 1:
        raise ValueError("--samples-per-prompt, --batch-size and --num-inference-steps must be at least 1")
    if cfg.wen_steps < 1 or cfg.wen_samples < 1 or cfg.tile_grid < 1 or cfg.clique_size < 2:
        raise ValueError(
            "--wen-steps, --wen-samples and --tile-grid must be at least 1, --clique-size at least 2"
        )
    if not cfg.dry_run:
        missing = [flag for flag, value in (("--bundle", cfg.bundle), ("--model", cfg.model)) if not value]
        if missing:
            raise ValueError(f"{' and '.join(missing)} required (only --dry-run runs without them)")


def _plan_actors(cfg: AuditConfig, work: int) -> tuple[int, dict[str, Any], str, int | None]:
    """(actors, Ray options, device, torch threads per actor): one actor per GPU, else a CPU pool."""
    from pipeline.ray_runtime import cluster_gpus, cpu_actor_pool_size

    gpus = cluster_gpus()
    if gpus > 0:
        n = min(cfg.num_actors or gpus, gpus, work)
        return max(1, n), {"num_gpus": 1}, "cuda", None
    n = max(1, min(cfg.num_actors or cpu_actor_pool_size(), work))
    # One torch thread per actor, the one CPU it reserves: small diffusion models gain nothing from
    # intra-op threads, and on a loaded 2-core machine two threads ran the demo model 6-30x slower
    # (2.5 s instead of 15-45 s for a prompt's 8 samples; OpenMP workers contending for the cores).
    return n, {"num_cpus": 1}, "cpu", 1


def _write_prompts_only(cfg: AuditConfig, table: pa.Table, started: float) -> dict[str, Any]:
    out = Path(cfg.out)
    atomic_write_table(out / PROMPTS, table)
    return {
        "job": "audit",
        "dry_run": True,
        "out": str(out),
        "prompts": table.num_rows,
        "prompt_lines": int(sum(table.column("occurrences").to_pylist())),
        "prompts_checksum": sha256_file(cfg.prompts),
        "seconds": round(time.monotonic() - started, 3),
    }


def run_audit(cfg: AuditConfig, ray_cfg: RayConfig | None = None) -> dict[str, Any]:
    """Audit ``cfg.model`` on ``cfg.prompts`` against ``cfg.bundle``; return the summary (also in ``summary.json``).

    Everything is checked before Ray is touched. Ray is used only when there is something to generate:
    the session already up, else one joined or started from ``ray_cfg`` for the generation alone (see
    :func:`pipeline.ray_runtime.ray_session`); a re-run of a finished audit only re-aggregates.

    Raises:
        PromptListError: the prompt list cannot be read (unknown layout, no prompt column, no prompts).
        FileNotFoundError: the model or the bundle is missing.
        ValueError: an impossible setting.
    """
    started = time.monotonic()
    check_config(cfg)
    out = Path(cfg.out)
    prompts_table = read_prompts(cfg.prompts, cfg.prompt_column)
    if cfg.dry_run:
        return _write_prompts_only(cfg, prompts_table, started)
    modes = AMG_CHOICES[cfg.amg]
    model_dir = resolve_model_dir(cfg.model)
    cache = out / ".cache" / "checksums.json"
    bundle_sum = bundle_checksum(cfg.bundle)
    model_sum = tree_checksum(model_dir, cache)
    descriptor_sum = tree_checksum(cfg.sscd_checkpoint, cache) if cfg.sscd_checkpoint else None
    amg_on, detection = amg_configs(cfg)
    identity = run_identity(cfg, model_sum, bundle_sum, amg_on, detection, descriptor_sum)
    run_id = fingerprint(identity)
    store = RunStore(out, run_id)
    if not (store.root / "run.json").is_file():
        atomic_write_json(
            store.root / "run.json",
            {"run_id": run_id, **identity, "model": str(model_dir), "bundle": str(cfg.bundle)},
        )
    prompts = prompts_table.to_pylist()
    todo = [(p, store.todo_modes(p["prompt_id"], modes)) for p in prompts]
    todo = [(p, m) for p, m in todo if m]
    limited = todo[: cfg.max_prompts] if cfg.max_prompts is not None else todo
    log.info(
        "audit run %s: %d prompts, %d finished, %d to audit now (modes %s)",
        run_id,
        len(prompts),
        len(prompts) - len(todo),
        len(limited),
        ",".join(modes),
    )
    generated = 0
    if limited:
        with ray_session(ray_cfg or RayConfig()):
            generated = _generate_all(cfg, store, model_dir, amg_on, detection, limited)
    summary = aggregate(cfg, store, prompts, modes, identity, model_dir, bundle_sum, model_sum)
    summary.update(
        prompts_total=len(prompts),
        prompts_audited_now=len(limited),
        samples_generated_now=generated,
        prompts_pending=len(todo) - len(limited),
        complete=len(todo) == len(limited),
        seconds=round(time.monotonic() - started, 3),
    )
    atomic_write_json(out / SUMMARY, summary)
    return job_summary(summary)


def job_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The job's one-line summary: ``summary.json`` without the criteria texts and the full provenance."""
    keep = (
        "job",
        "run_id",
        "out",
        "report",
        "complete",
        "prompts_total",
        "prompts_audited_now",
        "samples_generated_now",
        "prompts_pending",
        "seconds",
    )
    short = {k: summary[k] for k in keep if k in summary}
    prov = summary.get("provenance", {})
    short.update(
        bundle_checksum=prov.get("bundle_checksum"),
        model_checksum=prov.get("model_checksum"),
        prompts_checksum=prov.get("prompts_checksum"),
    )
    for mode in ("off", "on"):
        if mode in summary:
            short[mode] = {k: v for k, v in summary[mode].items() if k != "seconds_per_sample"}
    return short


def _generate_all(
    cfg: AuditConfig,
    store: RunStore,
    model_dir: Path,
    amg_on: dict[str, Any],
    detection: dict[str, Any],
    todo: list[tuple[dict[str, Any], list[str]]],
) -> int:
    """Run the work on an actor pool; the driver writes each prompt's result as it arrives."""
    import ray
    from ray.util import ActorPool

    n, options, device, threads = _plan_actors(cfg, len(todo))
    spec = WorkerSpec(
        model_dir=str(model_dir.resolve()),
        bundle=str(Path(cfg.bundle).resolve()),
        similarity=cfg.similarity,
        sscd_checkpoint=str(Path(cfg.sscd_checkpoint).resolve()) if cfg.sscd_checkpoint else None,
        amg_on=amg_on,
        detection=detection,
        samples_per_prompt=cfg.samples_per_prompt,
        seed=cfg.seed,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        batch_size=cfg.batch_size,
        tile_grid=cfg.tile_grid,
        tile_threshold=cfg.tile_threshold,
        clique_size=cfg.clique_size,
        wen_steps=cfg.wen_steps,
        wen_samples=cfg.wen_samples,
        wen_threshold=cfg.wen_threshold,
        torch_threads=threads,
    )
    log.info("audit: %d %s actor(s)%s", n, device, f", {threads} torch thread(s) each" if threads else "")
    actor_cls = ray.remote(GeneratorActor).options(**options)
    actors = [actor_cls.remote(spec, device) for _ in range(n)]
    pool = ActorPool(actors)
    generated = 0
    done = 0
    t0 = time.monotonic()

    def submit(actor, item):
        prompt, modes = item
        return actor.audit_prompt.remote(
            prompt["prompt_id"], prompt["prompt"], modes, wen=store.wen(prompt["prompt_id"])
        )

    try:
        for result in pool.map_unordered(submit, todo):
            store.write(result)
            done += 1
            generated += sum(len(part["rows"]) for part in result["modes"].values())
            log.info(
                "audit: %d/%d prompts (%s), %.1fs",
                done,
                len(todo),
                result["prompt_id"],
                time.monotonic() - t0,
            )
    finally:
        for actor in actors:
            ray.kill(actor)
    return generated


def aggregate(
    cfg: AuditConfig,
    store: RunStore,
    prompts: list[dict[str, Any]],
    modes: Sequence[str],
    identity: dict[str, Any],
    model_dir: Path,
    bundle_sum: str,
    model_sum: str,
) -> dict[str, Any]:
    """Collect the finished partitions of the listed prompts into the output tables, summary and report."""
    out = store.out
    results: list[dict[str, Any]] = []
    prompt_rows: list[dict[str, Any]] = []
    for p in prompts:
        pid = p["prompt_id"]
        wen = store.wen(pid)
        per_mode, cliques = {}, {}
        for mode in modes:
            marker = store.done(pid, mode)
            if marker is None:
                continue
            per_mode[mode] = store.read_rows(pid, mode)
            cliques[mode] = marker["clique"]
            results += per_mode[mode]
        prompt_rows.append(prompt_row(p, wen, per_mode, cliques, modes))
    atomic_write_table(out / RESULTS, pa.Table.from_pylist(results, schema=RESULTS_SCHEMA))
    atomic_write_table(out / PROMPTS, pa.Table.from_pylist(prompt_rows, schema=PROMPTS_SCHEMA))
    detection = identity["detection"]
    summary: dict[str, Any] = {
        "job": "audit",
        "run_id": store.run_id,
        "out": str(out),
        "report": str(out / REPORT),
        "criteria": criteria(cfg, detection),
        "provenance": {
            "run_id": store.run_id,
            "model": str(cfg.model),
            "model_dir": str(model_dir),
            "model_checksum": model_sum,
            "bundle": str(cfg.bundle),
            "bundle_checksum": bundle_sum,
            "prompts": str(cfg.prompts),
            "prompts_checksum": sha256_file(cfg.prompts),
            "similarity": cfg.similarity,
            "descriptor": cfg.sscd_checkpoint or "(the bundle's)",
            "descriptor_checksum": identity["descriptor_checksum"],
            "config": to_dict(cfg),
            "amg_on_config": identity["amg_on"],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "prompts": {
            "listed": len(prompts),
            "audited": sum(bool(r["audited"]) for r in prompt_rows),
            "prescreen_skipped": sum(bool(r["prescreen_skipped"]) for r in prompt_rows),
            "wen_scored": sum(r["wen_score"] is not None for r in prompt_rows),
        },
    }
    for mode in modes:
        summary[mode] = mode_summary([r for r in results if r["amg_mode"] == mode], prompt_rows, mode)
    write_report(cfg, store, summary, prompt_rows, results)
    return summary


def criteria(cfg: AuditConfig, detection: dict[str, Any]) -> dict[str, Any]:
    """The flags' definitions and constants, as recorded in ``summary.json`` and shown in the report."""
    required = max(2, min(cfg.clique_size, cfg.samples_per_prompt))
    return {
        "memorized_threshold": detection["memorized_threshold"],
        "tile_grid": cfg.tile_grid,
        "tile_threshold": cfg.tile_threshold,
        "clique_size": cfg.clique_size,
        "clique_required": required,
        "wen_steps": cfg.wen_steps,
        "wen_samples": cfg.wen_samples,
        "wen_threshold": cfg.wen_threshold,
        "memorized_rule": f"a sample is memorized when its {cfg.similarity} similarity to the nearest training "
        f"image in the bundle exceeds {detection['memorized_threshold']}",
        "carlini_rule": f"a prompt's generations hold a Carlini clique when at least {required} of them are "
        f"pairwise within {cfg.tile_threshold} tiled L2 (largest per-tile RMS pixel difference "
        f"on a {cfg.tile_grid}x{cfg.tile_grid} grid, pixels in [0, 1])",
        "flag_rule": "a prompt is flagged in a mode when one of its samples is memorized; a Carlini clique is "
        "reported beside it (candidates without training data, confirmed by the bundle match)",
        "wen_rule": f"Wen score: mean of |eps(x_t, c) - eps(x_t, 0)|_2 over the first {cfg.wen_steps} step(s) and "
        f"{cfg.wen_samples} seed(s); prompts below {cfg.wen_threshold} are not generated"
        + (" (pre-screen off)" if cfg.wen_threshold <= 0 else ""),
    }


def write_report(
    cfg: AuditConfig,
    store: RunStore,
    summary: dict[str, Any],
    prompt_rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
) -> Path:
    """``report.html``: images of flagged prompts and their matched training images, inlined."""
    from pipeline.report import render_report, thumbnail_png

    modes = [m for m in ("off", "on") if m in summary]
    flagged = {p["prompt_id"] for p in prompt_rows if any(p.get(f"{m}_flagged") for m in modes)}
    size = cfg.thumbnail_size
    sample_images = {}
    for r in results:
        if r["prompt_id"] in flagged:
            path = store.out / r["image"]
            if path.is_file():
                sample_images[(r["prompt_id"], r["amg_mode"], r["sample_index"])] = thumbnail_png(
                    path.read_bytes(), size
                )
    training_images: dict[str, bytes] = {}
    wanted = {p["matched_key"]: p for p in prompt_rows if p["prompt_id"] in flagged and p.get("matched_key")}
    if wanted:
        rows_by_key = {r["matched_key"]: r["matched_row"] for r in results if r["matched_key"] in wanted}
        fetch = training_image_reader(cfg)
        for key, row_id in rows_by_key.items():
            data = fetch(int(row_id)) if fetch else None
            if data:
                training_images[key] = thumbnail_png(data, size)
    html_text = render_report(summary, prompt_rows, results, sample_images, training_images, size)
    path = store.out / REPORT
    atomic_write_bytes(path, html_text.encode("utf-8"))
    return path


def training_image_reader(cfg: AuditConfig) -> Callable[[int], bytes | None] | None:
    """Encoded bytes of a bundle row's training image (for the report), or None when they cannot be read."""
    from pipeline.bundle import open_bundle

    try:
        return TrainingImages(open_bundle(cfg.bundle, verify=False))
    except (OSError, ValueError, RuntimeError) as exc:  # the report still renders, with placeholders
        log.warning("no training images for the report: %s", exc)
        return None
