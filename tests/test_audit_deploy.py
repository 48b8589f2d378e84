"""The schedule examples in deploy/: valid YAML of the right kinds, and audit flags the job accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from pipeline.core.cli import build_parser, parse_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _audit_args(command: str) -> list[str]:
    """The arguments after ``jobs/audit.py`` in a shell command line."""
    words = shlex.split(command.replace("\\%", "%"))
    start = next(i for i, w in enumerate(words) if w.endswith("jobs/audit.py"))
    return words[start + 1 :]


def _check(args: list[str]) -> None:
    cfg = parse_config(build_parser("audit", main="audit", extra=("ray",)), args).audit
    assert cfg.bundle and cfg.model and cfg.prompts and cfg.out
    assert cfg.amg == "both" and cfg.mode in ("paper", "reference")


def test_crontab_example_submits_the_audit():
    lines = [
        line
        for line in (DEPLOY / "crontab.example").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5])
    assert "ray job submit" in fields[5] and "--submission-id" in fields[5]
    _check(_audit_args(fields[5].split(">>")[0]))


def test_kubernetes_cronjob_submits_the_audit_once_at_a_time():
    doc = yaml.safe_load((DEPLOY / "cronjob.yaml").read_text())
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(doc["spec"]["schedule"].split()) == 5
    container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    assert command.startswith("ray job submit")
    _check(_audit_args(command))


def test_kuberay_rayjob_runs_the_audit_on_gpu_workers():
    doc = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _check(_audit_args(spec["entrypoint"]))
