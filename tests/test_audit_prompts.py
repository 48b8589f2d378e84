"""Audit job, before any generation: --dry-run, prompt-list errors, seeds, run identity, config checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.audit.identity import run_identity, sample_seed, tree_checksum
from pipeline.audit.runner import check_config, run_audit
from pipeline.bundle.reader import check_model_file
from pipeline.core.config import AuditConfig, result_options
from pipeline.core.storage import fingerprint, sha256_file
from pipeline.io.prompts import PromptListError, prompt_id

REPO = Path(__file__).resolve().parent.parent


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/audit.py", *args],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_dry_run_reads_a_published_list_and_writes_prompts_parquet(shared_data: Path, tmp_path: Path):
    src = shared_data / "memorized_prompts" / "memorized_laion_prompts.csv"
    done = _job("--prompts", str(src), "--out", str(tmp_path / "out"), "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] and summary["prompts"] == 500 and summary["job"] == "audit"
    table = pq.read_table(tmp_path / "out" / "prompts.parquet")
    assert table.num_rows == 500 and table.column_names[:2] == ["prompt_id", "prompt"]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["prompt_id"] == prompt_id(first["prompt"]) and json.loads(first["extra"])["type"] in (
        "VM",
        "TM",
    )


def test_dry_run_of_every_shared_list(shared_data: Path, tmp_path: Path):
    for src in sorted((shared_data / "memorized_prompts").iterdir()):
        if src.suffix == ".md":
            continue
        summary = run_audit(AuditConfig(prompts=str(src), out=str(tmp_path / src.stem), dry_run=True))
        assert summary["prompts"] > 80, src.name


@pytest.mark.slow
def test_unknown_layouts_fail_with_a_clear_message(tmp_path: Path):
    sheet = tmp_path / "prompts.xlsx"
    sheet.write_bytes(b"PK\x03\x04 not really a spreadsheet")
    done = _job("--prompts", str(sheet), "--out", str(tmp_path / "out"), "--dry-run")
    assert done.returncode == 2
    assert "unknown prompt-list layout 'prompts.xlsx'" in done.stderr and ".jsonl" in done.stderr
    assert not (tmp_path / "out" / "prompts.parquet").exists()
    table = tmp_path / "list.csv"
    table.write_text("id;url\n1;http://x\n")
    with pytest.raises(PromptListError, match="no prompt column found; columns are: id, url"):
        run_audit(AuditConfig(prompts=str(table), out=str(tmp_path / "o2"), dry_run=True))


@pytest.mark.slow
def test_bundle_and_model_are_required_without_dry_run(tmp_path: Path):
    done = _job("--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--bundle and --model required" in done.stderr
    with pytest.raises(ValueError, match="--amg must be off, on or both"):
        check_config(AuditConfig(prompts="p", out="o", amg="sometimes", dry_run=True))
    with pytest.raises(ValueError, match="--similarity must be one of sscd, clip, nl2"):
        check_config(AuditConfig(prompts="p", out="o", similarity="dino", dry_run=True))


def test_sample_seeds_are_stable_distinct_and_independent_of_order():
    seeds = {(p, k): sample_seed(0, p, k) for p in ("a", "b") for k in range(100)}
    assert len(set(seeds.values())) == 200 and all(0 <= s < 2**63 for s in seeds.values())
    assert sample_seed(0, "a", 3) == seeds[("a", 3)]
    assert sample_seed(1, "a", 3) != seeds[("a", 3)]
    # A fixed value: the seed of a sample is part of the audit's contract (results name it).
    assert sample_seed(0, "0123456789abcdef", 0) == int.from_bytes(
        __import__("hashlib").sha256(b"0:0123456789abcdef:0").digest()[:8], "big"
    ) & (2**63 - 1)


def test_run_identity_covers_generation_settings_but_not_the_prompt_list_or_batching():
    base = AuditConfig(prompts="a.txt", out="o", bundle="b", model="m")

    def run_id(cfg: AuditConfig, model: str = "m1", bundle: str = "b1") -> str:
        return fingerprint(run_identity(cfg, model, bundle, {"c3": 1.0}, {"t": 0.5}, None))

    same = [
        dataclasses.replace(base, prompts="longer.txt"),
        dataclasses.replace(base, batch_size=1),
        dataclasses.replace(base, amg="off"),
        dataclasses.replace(base, num_actors=3),
        dataclasses.replace(base, max_prompts=2),
        dataclasses.replace(base, out="elsewhere"),
    ]
    assert {run_id(c) for c in same} == {run_id(base)}
    changed = [
        dataclasses.replace(base, seed=1),
        dataclasses.replace(base, samples_per_prompt=8),
        dataclasses.replace(base, mode="reference"),
        dataclasses.replace(base, match_rows="duplicated"),
        dataclasses.replace(base, num_inference_steps=20),
        dataclasses.replace(base, tile_threshold=0.1),
        dataclasses.replace(base, similarity="clip"),
    ]
    ids = {run_id(c) for c in changed} | {run_id(base, model="m2"), run_id(base, bundle="b2")}
    assert len(ids) == len(changed) + 2 and run_id(base) not in ids
    assert {"prompts", "batch_size", "amg", "num_actors", "max_prompts", "out"}.isdisjoint(
        result_options(base)
    )


def test_tree_checksum_follows_content_and_caches_by_size_and_mtime(tmp_path: Path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "w.bin").write_bytes(b"\x00" * 100)
    cache = tmp_path / "cache.json"
    first = tree_checksum(model, cache)
    assert tree_checksum(model, cache) == first and cache.is_file()
    (model / "unet" / "w.bin").write_bytes(b"\x01" * 100)
    assert tree_checksum(model, cache) != first


def test_a_model_file_named_by_a_bundle_is_loaded_only_with_its_recorded_sha256(tmp_path: Path):
    model = tmp_path / "sscd.pt"
    model.write_bytes(b"weights")
    assert check_model_file(str(model), sha256_file(model), "SSCD model", "b") == sha256_file(model)
    assert check_model_file(None, None, "CLIP checkpoint", "b") is None  # a hub model: no file named
    with pytest.raises(ValueError, match="without its sha256"):
        check_model_file(str(model), None, "SSCD model", "b")
    model.write_bytes(b"other weights, same path")
    with pytest.raises(ValueError, match="is not the SSCD model"):
        check_model_file(str(model), hashlib.sha256(b"weights").hexdigest(), "SSCD model", "b")
