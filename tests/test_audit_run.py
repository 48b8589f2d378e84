"""The audit on a real local Ray against a real bundle: outputs, resume, incremental lists, run ids,
an interrupted job, and `ray job submit` of the job to a `ray start --head` cluster.

World: a bundle built from 10 small pictures (SSCD stand-in descriptors indexed), and a tiny random
Stable Diffusion pipeline (32×32 images, 3 DDIM steps).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_script, submit_job
from PIL import Image

from demo.memorizing.components import tiny_sd_components
from demo.memorizing.descriptors import save_stand_in_sscd
from fixtures.shard_factory import encode, random_photo, sample, write_shard
from pipeline.amg import AMGConfig, MemorizationDetector
from pipeline.amg.pipelines import AMGStableDiffusionPipeline
from pipeline.audit.layout import PROMPTS_SCHEMA, RESULTS_SCHEMA
from pipeline.audit.matching import open_matcher
from pipeline.audit.runner import run_audit
from pipeline.bundle.build import build_bundle
from pipeline.bundle.layout import BundleChecksumError, BundleContentError
from pipeline.bundle.reader import open_bundle
from pipeline.core.config import AuditConfig, BundleConfig, EmbedConfig, PipelineConfig
from pipeline.io.prompts import prompt_id

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "a red bicycle", "an oft repeated caption", "a bowl of fruit"]
SAMPLES = 2

pytestmark = pytest.mark.slow  # a local Ray for the bundle, jobs as subprocesses, a `ray start` head


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit_world")
    samples = [sample(f"{i:09d}", encode(random_photo(i)), caption=f"picture number {i}") for i in range(8)]
    samples += [
        sample(f"{i:09d}", encode(random_photo(99)), caption="an oft repeated caption") for i in (8, 9)
    ]
    write_shard(root / "shards", 0, samples)
    sscd = save_stand_in_sscd(root / "sscd.pt")
    cfg = dataclasses.replace(
        PipelineConfig(),
        bundle=BundleConfig(
            shards=str(root / "shards"),
            out=str(root / "bundle"),
            duplicate_caption_k=10,
            duplicate_caption_min_count=2,
        ),
        embed=EmbedConfig(sscd_checkpoint=str(sscd), log_every_s=600),
    )
    summary = build_bundle(cfg)
    assert "sscd_index" in summary["steps_run"]
    model = root / "model"
    AMGStableDiffusionPipeline(**tiny_sd_components(seed=0)).save_pretrained(model / "text2img")
    return {"root": root, "bundle": root / "bundle", "model": model, "sscd": sscd}


def prompt_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(p + "\n" for p in prompts))
    return path


def config(world, out: Path, prompts: Path, **changes) -> AuditConfig:
    return AuditConfig(
        bundle=str(world["bundle"]),
        prompts=str(prompts),
        out=str(out),
        model=str(world["model"]),
        samples_per_prompt=SAMPLES,
        num_inference_steps=3,
        batch_size=2,
        **changes,
    )


def part_files(out: Path, run_id: str) -> dict[str, int]:
    """mtime (ns) of every partition file and image of a run."""
    root = out / "runs" / run_id
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".parquet", ".png")
    }


def test_bundle_searches_sscd_descriptors(world):
    bundle = open_bundle(world["bundle"], kind="sscd_emb")
    model = bundle.manifest["indexes"]["sscd_emb"]["model"]
    assert model["checkpoint"] == str(world["sscd"]) and model["image_size"] == 320
    assert len(bundle) == 10 and bundle.dim != open_bundle(world["bundle"]).dim
    scores, ids = bundle.search_embeddings(bundle.embeddings(np.arange(3)), 1)
    assert ids[:, 0].tolist() == [0, 1, 2] and (scores[:, 0] > 0.999).all()


def test_matchers_make_queries_like_the_bundle_for_each_similarity(world):
    images = open_matcher(world["bundle"], "sscd").training_image
    pictures = [Image.open(io.BytesIO(images(i))).convert("RGB") for i in (0, 8)]
    batch = torch.stack(
        [torch.from_numpy(np.asarray(p.resize((32, 32)), dtype=np.float32)) for p in pictures]
    )
    batch = batch.permute(0, 3, 1, 2) / 127.5 - 1
    for similarity, expected in (("sscd", 0.5), ("clip", 0.9), ("nl2", -1.4), ("l2", -0.01)):
        matcher = open_matcher(world["bundle"], similarity, pixel_size=32)
        assert matcher.backend.dim == matcher.index.dim and matcher.backend.name == similarity
        cfg = AMGConfig.preset("paper" if similarity == "l2" else "reference", similarity)
        found = MemorizationDetector(matcher.backend, matcher.index, cfg).detect(batch)
        # A training picture (at the generator's 32 px) finds itself, or its byte-identical twin (rows 8, 9).
        assert found.row_ids[0] == 0 and int(found.row_ids[1]) in (8, 9), similarity
        assert (found.sigma > expected).all(), (similarity, found.sigma)
    with pytest.raises(ValueError, match="not the model the bundle's SSCD descriptors were made with"):
        other = world["root"] / "other.pt"
        save_stand_in_sscd(other, sizes=(4, 8))
        open_matcher(world["bundle"], "sscd", sscd_checkpoint=str(other))


def test_the_audit_refuses_a_tampered_bundle_and_actors_check_the_root_hash(world, tmp_path: Path):
    """The driver checks every file (sha256 by default) before anything runs; actors pin its root hash."""
    copy = tmp_path / "bundle"
    shutil.copytree(world["bundle"], copy)
    table = copy / "caption_dedup_table.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 check sees it
    table.write_bytes(bytes(data))
    prompts = prompt_file(tmp_path / "p.txt", PROMPTS[:1])
    cfg = dataclasses.replace(config(world, tmp_path / "audit", prompts), bundle=str(copy))
    with pytest.raises(BundleChecksumError, match=r"caption_dedup_table\.parquet \(sha256"):
        run_audit(cfg)
    assert not (tmp_path / "audit" / "runs").exists()  # refused before any generation
    (copy / "index" / "unlisted.bin").write_bytes(b"x")
    with pytest.raises(BundleContentError, match="unlisted"):
        run_audit(dataclasses.replace(cfg, verify_bundle=False))
    # An actor opening the bundle later gets the driver's root hash and refuses any other bundle.
    root = open_bundle(world["bundle"], verify=False).root_hash
    assert open_matcher(world["bundle"], "sscd", expect=root).index.root_hash == root
    with pytest.raises(BundleChecksumError, match=f"expected {'f' * 64}"):
        open_matcher(world["bundle"], "sscd", expect="f" * 64)


def test_audit_outputs_resume_and_incremental_lists(world, tmp_path: Path):
    out = tmp_path / "audit"
    three = prompt_file(tmp_path / "three.txt", PROMPTS[:3])

    # 1. Stopped after 2 of 3 prompts (the runner's own stop, as a killed run leaves it).
    first = run_audit(config(world, out, three, max_prompts=2))
    assert not first["complete"] and first["prompts_pending"] == 1
    assert first["samples_generated_now"] == 2 * SAMPLES * 2
    run_id = first["run_id"]
    before = part_files(out, run_id)
    assert len([f for f in before if f.endswith(".parquet")]) == 4 and len(before) == 4 + 2 * SAMPLES * 2

    # 2. Resumed: only the third prompt is generated; finished files are not touched.
    second = run_audit(config(world, out, three))
    assert second["run_id"] == run_id and second["complete"]
    assert second["prompts_audited_now"] == 1 and second["samples_generated_now"] == SAMPLES * 2
    after = part_files(out, run_id)
    assert {k: after[k] for k in before} == before and len(after) == len(before) * 3 // 2

    # 3. Outputs: one row per sample, one per prompt, both AMG modes in the summary, the report.
    results = pq.read_table(out / "results.parquet")
    assert results.schema.equals(RESULTS_SCHEMA) and results.num_rows == 3 * SAMPLES * 2
    rows = results.to_pylist()
    assert {(r["prompt_id"], r["amg_mode"], r["sample_index"]) for r in rows} == {
        (prompt_id(p), m, k) for p in PROMPTS[:3] for m in ("off", "on") for k in range(SAMPLES)
    }
    assert all((out / r["image"]).is_file() and r["similarity_kind"] == "sscd" for r in rows)
    assert all(r["matched_key"] in {f"{i:09d}" for i in range(10)} for r in rows)
    # Every AMG-on sample is compared with the AMG-off sample of its seed (pixels; null on AMG-off rows).
    assert all((r["identical_to_off"] is None) == (r["amg_mode"] == "off") for r in rows)
    prompts = pq.read_table(out / "prompts.parquet")
    assert prompts.schema.equals(PROMPTS_SCHEMA) and prompts.num_rows == 3
    assert all(
        p["audited"] and p["wen_score"] > 0 and p["off_n_samples"] == SAMPLES for p in prompts.to_pylist()
    )
    summary = json.loads((out / "summary.json").read_text())
    for mode in ("off", "on"):
        block = summary[mode]
        assert block["n_samples"] == 3 * SAMPLES and 0 <= block["frac_memorized"] <= 1
        assert block["top1"] >= block["top5pct"] and block["n_prompts"] == 3
    identical = sum(bool(r["identical_to_off"]) for r in rows)
    assert (
        summary["on"]["n_compared_to_off"] == 3 * SAMPLES and summary["on"]["n_identical_to_off"] == identical
    )
    prov = summary["provenance"]
    assert prov["bundle_checksum"] == json.loads((world["bundle"] / "manifest.json").read_text())["root_hash"]
    assert (
        prov["prompts_checksum"]
        and prov["model_checksum"]
        and prov["config"]["samples_per_prompt"] == SAMPLES
    )
    html = (out / "report.html").read_text()
    assert (
        "a red bicycle" in html
        and "<svg" in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )

    # 4. Nothing to do: no generation (and no Ray actors).
    third = run_audit(config(world, out, three))
    assert third["samples_generated_now"] == 0 and part_files(out, run_id) == after

    # 5. A longer list: same run id, only the new prompt is generated.
    four = prompt_file(tmp_path / "four.txt", PROMPTS)
    longer = run_audit(config(world, out, four))
    assert longer["run_id"] == run_id and longer["samples_generated_now"] == SAMPLES * 2
    assert pq.read_table(out / "results.parquet").num_rows == 4 * SAMPLES * 2

    # 6. Only AMG off asked for: reuses the same partitions; summary has no 'on' block.
    off_only = run_audit(config(world, out, four, amg="off"))
    assert off_only["run_id"] == run_id and off_only["samples_generated_now"] == 0 and "on" not in off_only


def test_changed_config_or_model_starts_a_new_run(world, tmp_path: Path):
    out = tmp_path / "audit"
    one = prompt_file(tmp_path / "one.txt", PROMPTS[:1])
    base = run_audit(config(world, out, one, amg="off"))
    reseeded = run_audit(config(world, out, one, amg="off", seed=1))
    assert reseeded["run_id"] != base["run_id"] and reseeded["samples_generated_now"] == SAMPLES
    a = pq.read_table(out / "runs" / base["run_id"] / "parts" / prompt_id(PROMPTS[0]) / "off.parquet")
    b = pq.read_table(out / "runs" / reseeded["run_id"] / "parts" / prompt_id(PROMPTS[0]) / "off.parquet")
    assert a.column("seed").to_pylist() != b.column("seed").to_pylist()
    # The model's files changed (a retrained model): a new run id as well.
    model = tmp_path / "model"
    AMGStableDiffusionPipeline(**tiny_sd_components(seed=1)).save_pretrained(model / "text2img")
    retrained = run_audit(dataclasses.replace(config(world, out, one, amg="off"), model=str(model)))
    assert retrained["run_id"] not in (base["run_id"], reseeded["run_id"])


def test_wen_prescreen_skips_prompts_below_the_threshold(world, tmp_path: Path):
    out = tmp_path / "audit"
    two = prompt_file(tmp_path / "two.txt", PROMPTS[:2])
    summary = run_audit(config(world, out, two, amg="off", wen_threshold=1e9))
    assert summary["samples_generated_now"] == 0 and summary["complete"]
    prompts = pq.read_table(out / "prompts.parquet").to_pylist()
    assert all(p["prescreen_skipped"] and not p["audited"] and p["wen_score"] > 0 for p in prompts)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["prompts"]["prescreen_skipped"] == 2 and saved["off"]["n_samples"] == 0


def _job_args(world, out: Path, prompts: Path) -> list[str]:
    return [
        "jobs/audit.py",
        "--bundle",
        str(world["bundle"]),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model",
        str(world["model"]),
        "--samples-per-prompt",
        str(SAMPLES),
        "--num-inference-steps",
        "3",
        "--amg",
        "both",
        "--mode",
        "reference",
        "--seed",
        "0",
    ]


def test_killed_job_resumes_without_regenerating_finished_prompts(world, tmp_path: Path):
    out = tmp_path / "audit"
    prompts = prompt_file(tmp_path / "many.txt", [f"prompt number {i}" for i in range(6)])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(
        [sys.executable, *_job_args(world, out, prompts), "--ray-num-cpus", "2"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(out.glob("runs/*/parts/*/on.done.json"))) < 2:
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver, its local Ray and the actor: a hard stop
        job.wait(timeout=60)
    done = {p.parent.name for p in out.glob("runs/*/parts/*/on.done.json")}
    assert 2 <= len(done) < 6, "the job finished or never started before the kill"
    run_id = next(out.glob("runs/*")).name
    before = {k: v for k, v in part_files(out, run_id).items() if k.split("/")[1] in done}
    resumed = run_script(*_job_args(world, out, prompts))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["run_id"] == run_id and summary["complete"]
    assert summary["prompts_audited_now"] <= 6 - len(done)
    after = part_files(out, run_id)
    assert {k: after[k] for k in before} == before
    assert pq.read_table(out / "results.parquet").num_rows == 6 * SAMPLES * 2


def test_ray_job_submit_runs_the_audit_on_a_real_cluster(world, ray_head, tmp_path: Path):
    address, env = ray_head
    out = tmp_path / "audit"
    prompts = prompt_file(tmp_path / "p.txt", PROMPTS[:2])
    done = submit_job(address, env, ["python", *_job_args(world, out, prompts)], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [
        line
        for line in done.stdout.splitlines()
        if line.startswith('{"bundle_checksum"') or (line.startswith('{"') and '"job": "audit"' in line)
    ]
    assert lines, done.stdout[-3000:]
    summary = json.loads(lines[-1])
    assert summary["complete"] and summary["samples_generated_now"] == 2 * SAMPLES * 2
    assert (out / "report.html").is_file() and pq.read_table(
        out / "results.parquet"
    ).num_rows == 2 * SAMPLES * 2
