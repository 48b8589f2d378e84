"""The demo: every stage of the pipeline, end to end, on the demo dataset and offline models.

Steps, each resumable (a re-run finds the previous outputs and skips their work):

1. write the demo dataset (real photographs with planted duplicates; :mod:`demo.data`);
2. serve it on 127.0.0.1 and download it with img2dataset into webdataset shards;
3. ingest the shards (every row accounted for);
4. build the artifact bundle (:func:`pipeline.bundle.build.build_bundle`), with copy descriptors from the
   offline SSCD stand-in (:mod:`demo.memorizing.descriptors`) indexed beside the CLIP embeddings;
5. the memorizing text-to-image model (``cfg.amg.model_dir``: the committed weights, trained with
   :func:`demo.memorizing.training.train_memorizing_models` when missing);
6. audit it (:func:`pipeline.audit.runner.run_audit`) with and without AMG on the demo's duplicated captions
   plus some non-duplicated training captions, against the bundle, by SSCD similarity.

Everything lands under ``cfg.demo.out`` (``demo-output/`` by default); the audit's ``summary.json`` and
``report.html`` are in ``audit/``, which is the audit's alone: the AMG evaluation (paper-style tables,
ablations; ``jobs/evaluate_amg.py``, about 10 minutes more on 2 cores, so not a demo step) goes to
``amg_eval/`` (``--out demo-output/amg_eval``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from demo.data import DONE_DIR, TRUTH, download_demo, make_demo_data
from demo.memorizing.layout import TEXT2IMG_DIR
from pipeline.audit.runner import run_audit
from pipeline.bundle.build import build_bundle
from pipeline.core.config import PipelineConfig
from pipeline.core.stage import FunctionStage, run_stage, seconds_since
from pipeline.core.storage import atomic_write_bytes, atomic_write_json, sha256_file
from pipeline.ingest.ingest import run_ingest
from pipeline.io.prompts import prompt_id

log = logging.getLogger(__name__)

SHARDS = "shards"
INGEST = "ingest"
BUNDLE = "bundle"
AUDIT = "audit"
SSCD_STAND_IN = "sscd_stand_in.torchscript.pt"
AUDIT_PROMPTS = "audit_prompts.jsonl"
DEDUP_REPORT = "dedup_report.html"  # the bundle's duplicate report (pipeline.dedup.report), when written
#: Non-duplicated training captions added to the audit's prompt list, beside every duplicated one.
AUDIT_UNIQUE_PROMPTS = 4
#: y_N (G_dup) needs its caption this often among a row's neighbours. The authors' 21 of 1000 is for
#: LAION; the demo's 119 rows repeat each verbatim caption 12 times.
DEMO_DUPLICATE_CAPTION_MIN_COUNT = 5


def write_audit_prompts(
    demo_dir: Path, path: Path, unique: int = AUDIT_UNIQUE_PROMPTS, model_dir: Path | None = None
) -> Path:
    """The demo audit's prompt list (JSONL, with each prompt's demo kind): every verbatim-duplicated
    caption, then the first ``unique`` captions of non-duplicated training pictures; with
    ``model_dir``, each cut to what that model's text encoder reads (:func:`fit_prompts`).

    A stage: kept while the dataset's ground truth and the model's tokenizer files are unchanged.
    """
    tokenizer = None if model_dir is None else model_dir / TEXT2IMG_DIR / "tokenizer"
    inputs = {
        "truth": sha256_file(demo_dir / TRUTH),
        "tokenizer": None
        if tokenizer is None
        else {f.name: sha256_file(f) for f in sorted(tokenizer.iterdir())},
        "unique": unique,
        "path": str(path),
    }

    def write() -> dict[str, Any]:
        import pyarrow.parquet as pq

        rows = [r for r in pq.read_table(demo_dir / TRUTH).to_pylist() if r["expect_ok"]]
        duplicated = list(dict.fromkeys(r["caption"] for r in rows if r["demo_kind"] == "verbatim"))
        single = list(dict.fromkeys(r["caption"] for r in rows if r["demo_kind"] == "unique"))[:unique]
        if model_dir is not None:
            duplicated, single = fit_prompts(duplicated, model_dir), fit_prompts(single, model_dir)
        lines = [json.dumps({"prompt": c, "demo_kind": "verbatim"}) for c in duplicated]
        lines += [json.dumps({"prompt": c, "demo_kind": "unique"}) for c in single]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
        return {"prompts": len(lines)}

    run_stage(FunctionStage("audit_prompts", inputs, [path], write), demo_dir / DONE_DIR)
    return path


def fit_prompts(prompts: list[str], model_dir: Path) -> list[str]:
    """``prompts``, each cut at its last whole word that the model's text encoder still reads.

    The demo model's CLIP tokenizer and text encoder take 32 tokens, start and end included
    (``model_max_length``; the model files are not to be retrained for the demo's sake). One demo
    caption is longer (the astronaut's, 35 tokens): the pipeline would cut it to 32 tokens
    mid-word and say so in a warning per batch. Cut here, with the model's own tokenizer, the prompt
    list, the report and the audit show the text the model is conditioned on. The model was trained
    on the caption cut by the tokenizer, which keeps one more (partial) word, and still reproduces
    the picture for the cut prompt (SSCD similarity 0.99 without AMG, 0.30 with it, measured).
    """
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / TEXT2IMG_DIR / "tokenizer")
    limit = tokenizer.model_max_length

    def fits(text: str) -> bool:  # an explicit max_length counts one token past the limit, silently
        return len(tokenizer(text, truncation=True, max_length=limit + 1)["input_ids"]) <= limit

    fitted = []
    for prompt in prompts:
        words = prompt.split()
        while len(words) > 1 and not fits(" ".join(words)):
            words.pop()
        fitted.append(" ".join(words).rstrip(",;:"))
    cut = sum(a != b for a, b in zip(prompts, fitted, strict=True))
    if cut:
        log.info(
            "demo: %d audit prompt(s) cut at a word boundary to the %d tokens the demo model reads",
            cut,
            limit,
        )
    return fitted


def memorizing_model(cfg: PipelineConfig) -> Path:
    """The memorizing demo model folder: ``cfg.amg.model_dir`` (trained first when it holds no model)."""

    a = cfg.amg
    model_dir = Path(a.model_dir)
    if not (model_dir / TEXT2IMG_DIR / "model_index.json").is_file():
        from demo.memorizing.training import train_from_config  # torch and diffusers: only to train

        log.info("demo: no memorizing model in %s; training one (a few minutes)", model_dir)
        train_from_config(a, demo_dir=cfg.demo.out)
    return model_dir


def demo_bundle(cfg: PipelineConfig) -> dict[str, Any]:
    """Build ``bundle/`` from the demo shards, with the SSCD stand-in's copy descriptors indexed too."""

    out = Path(cfg.demo.out)
    sscd = out / SSCD_STAND_IN
    if not sscd.is_file():
        from demo.memorizing.descriptors import save_stand_in_sscd  # torch: only to make the file

        # SSCD is released as TorchScript, so its stand-in is scripted like it and loaded the same way;
        # torch 2.9+ deprecates torch.jit.script with a FutureWarning that has no alternative here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
            save_stand_in_sscd(sscd)
    bundle_cfg = dataclasses.replace(
        cfg,
        bundle=dataclasses.replace(
            cfg.bundle,
            shards=str(out / SHARDS),
            out=str(out / BUNDLE),
            duplicate_caption_min_count=DEMO_DUPLICATE_CAPTION_MIN_COUNT,
        ),
        embed=dataclasses.replace(cfg.embed, sscd_checkpoint=str(sscd)),
    )
    return build_bundle(bundle_cfg)


def demo_audit(cfg: PipelineConfig, model_dir: Path) -> dict[str, Any]:
    """Audit the memorizing model with AMG off and on; returns the audit summary plus the demo's check."""

    out = Path(cfg.demo.out)
    prompts = write_audit_prompts(out, out / AUDIT_PROMPTS, model_dir=model_dir)
    audit_cfg = dataclasses.replace(
        cfg.audit,
        bundle=str(out / BUNDLE),
        prompts=str(prompts),
        out=str(out / AUDIT),
        model=str(model_dir),
        amg="both",
        similarity="sscd",
        dry_run=False,
    )
    summary = run_audit(audit_cfg, cfg.ray)
    listed = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    duplicated = {prompt_id(p["prompt"]) for p in listed if p["demo_kind"] == "verbatim"}
    off, on = set(summary["off"]["flagged_prompts"]), set(summary["on"]["flagged_prompts"])
    summary["demo_check"] = {
        "duplicated_prompts": len(duplicated),
        "duplicated_flagged_without_amg": len(duplicated & off),
        "flagged_without_amg": len(off),
        "flagged_with_amg": len(on),
        "passed": duplicated <= off and not on,
    }
    return summary


def run_demo(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the demo's steps in order; needs a Ray session. Returns (and writes) the demo summary."""
    started = time.monotonic()
    out = Path(cfg.demo.out)
    steps: dict[str, Any] = {}
    steps["data"] = make_demo_data(cfg.demo)
    # The demo serves byte-identical files, so keep their bytes (and sha256) as served.
    download = dataclasses.replace(
        cfg.download,
        skip_reencode=True,
        timeout=5,
        img2dataset_console=cfg.download.img2dataset_console or cfg.ray.verbose,
    )
    steps["download"] = download_demo(out, download, cfg.demo.samples_per_shard)
    ingest_cfg = dataclasses.replace(cfg.ingest, shards=str(out / SHARDS), out=str(out / INGEST))
    steps["ingest"] = run_ingest(ingest_cfg)
    steps["bundle"] = demo_bundle(cfg)
    model_dir = memorizing_model(cfg)
    steps["audit"] = audit = demo_audit(cfg, model_dir)
    dedup_report = out / BUNDLE / DEDUP_REPORT
    summary = {
        "job": "demo",
        "out": str(out),
        "urls": steps["download"]["urls"],
        "downloaded": steps["download"]["successes"],
        "rows_seen": steps["ingest"]["rows_seen"],
        "ok": steps["ingest"]["ok"],
        "rejected": steps["ingest"]["rejected"],
        "bundle_rows": steps["bundle"]["rows"],
        "audit_run_id": audit["run_id"],
        "audit_frac_memorized": {m: audit[m]["frac_memorized"] for m in ("off", "on")},
        "audit_prompts_flagged": {m: audit[m]["n_prompts_flagged"] for m in ("off", "on")},
        "audit_check_passed": audit["demo_check"]["passed"],
        "report": audit["report"],
        "dedup_report": str(dedup_report) if dedup_report.is_file() else None,
        "up_to_date": steps["data"]["skipped"]
        and steps["download"]["up_to_date"]
        and steps["ingest"]["shards_processed"] == 0
        and not steps["bundle"]["steps_run"]
        and steps["audit"]["prompts_audited_now"] == 0,
        "seconds": seconds_since(started),
    }
    atomic_write_json(out / "demo_summary.json", {**summary, "steps": steps})
    return summary
