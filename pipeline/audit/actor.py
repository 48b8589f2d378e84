"""The Ray actor that generates a prompt's samples (AMG off and on), matches them and applies the criteria."""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from pipeline.amg import AMGConfig, AMGStableDiffusionPipeline, AntiMemorizationGuidance, MemorizationDetector
from pipeline.amg.sampling import sample_text2img
from pipeline.audit.criteria import carlini_flag
from pipeline.audit.identity import sample_seed
from pipeline.audit.matching import open_matcher
from pipeline.audit.prescreen import wen_prescreen


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a :class:`GeneratorActor` needs (plain values: it travels to the actor)."""

    model_dir: str
    bundle: str
    bundle_root: str  # the root hash the driver checked: every actor opens that bundle or fails
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
    match_rows: str = "all"


def _png(image) -> bytes:
    """A ``(3, H, W)`` tensor in [−1, 1] as PNG bytes."""

    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class GeneratorActor:
    """Loads the text-to-image pipeline, the bundle index and the detectors once; audits one prompt per call.

    Used as a Ray actor by :func:`run_audit` (``ray.remote(GeneratorActor)``) and directly in tests.
    """

    def __init__(self, spec: WorkerSpec, device: str = "cpu"):

        if spec.torch_threads:
            torch.set_num_threads(int(spec.torch_threads))
        self.spec = spec
        self.device = device
        self.pipe = AMGStableDiffusionPipeline.from_pretrained(spec.model_dir).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.matcher = open_matcher(
            spec.bundle,
            spec.similarity,
            spec.sscd_checkpoint,
            device,
            pixel_size=size,
            expect=spec.bundle_root,
            match_rows=spec.match_rows,
        )
        backend, index, captions = self.matcher.backend, self.matcher.index, self.matcher.captions
        self.detector = MemorizationDetector(backend, index, AMGConfig(**spec.detection))
        self.amg = AntiMemorizationGuidance(
            MemorizationDetector(backend, index, AMGConfig(**spec.amg_on), captions=captions)
        )

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
