"""The audit on a real local Ray when actors die or prompts hang (issue 12, item 6).

Faults are injected through the runner's ``actor_cls`` (a :class:`GeneratorActor` subclass defined
inside the test, so Ray pickles it by value). World: ``test_audit_run``'s bundle and tiny model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import test_audit_run
from test_audit_run import PROMPTS, config, prompt_file

from pipeline.audit.actor import GeneratorActor
from pipeline.audit.runner import run_audit
from pipeline.io.prompts import prompt_id

pytestmark = pytest.mark.slow  # a local Ray, a bundle build, actors killed and replaced

world = test_audit_run.world  # the fixture: a bundle of 10 pictures and a tiny Stable Diffusion model


def audit_config(world, out: Path, prompts: Path, **changes):
    """One sample per prompt and mode, 3 steps: the smallest audit that still runs both AMG modes."""
    return dataclasses.replace(config(world, out, prompts), samples_per_prompt=1, batch_size=1, **changes)


def sample_keys(out: Path) -> set[tuple[str, str, int]]:
    rows = pq.read_table(out / "results.parquet").to_pylist()
    return {(r["prompt_id"], r["amg_mode"], r["sample_index"]) for r in rows}


@pytest.mark.timeout(300)
def test_an_actor_killed_mid_audit_is_replaced_and_its_prompt_retried(world, tmp_path: Path):
    fault = tmp_path / "actor-killed"

    class DiesOnce(GeneratorActor):
        """Kills its own process (``os._exit``: a real worker death) at its first prompt, once per test."""

        def audit_prompt(self, *args, **kwargs):
            try:  # O_EXCL: only the first actor to get here, across processes
                os.close(os.open(fault, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(1)
            except FileExistsError:
                pass
            return super().audit_prompt(*args, **kwargs)

    out = tmp_path / "audit"
    prompts = prompt_file(tmp_path / "p.txt", PROMPTS[:3])
    summary = run_audit(audit_config(world, out, prompts), actor_cls=DiesOnce)

    assert fault.exists()  # an actor did die mid-audit
    assert summary["complete"] and summary["prompts_given_up"] == {}
    [(retried, reasons)] = summary["prompts_retried"].items()
    assert retried in {prompt_id(p) for p in PROMPTS[:3]}
    assert len(reasons) == 1 and reasons[0].startswith("actor died"), reasons
    assert summary["prompts_audited_now"] == 3 and summary["samples_generated_now"] == 3 * 2
    assert sample_keys(out) == {(prompt_id(p), m, 0) for p in PROMPTS[:3] for m in ("off", "on")}


@pytest.mark.timeout(300)
def test_a_hanging_prompt_times_out_is_given_up_and_the_next_run_finishes_it(world, tmp_path: Path):
    hangs_on = PROMPTS[1]

    class Hangs(GeneratorActor):
        def audit_prompt(self, pid, prompt, *args, **kwargs):
            if prompt == hangs_on:
                time.sleep(3600)
            return super().audit_prompt(pid, prompt, *args, **kwargs)

    out = tmp_path / "audit"
    prompts = prompt_file(tmp_path / "p.txt", PROMPTS[:3])
    cfg = audit_config(world, out, prompts, prompt_timeout_s=8, max_attempts=2)
    started = time.monotonic()
    first = run_audit(cfg, actor_cls=Hangs)
    hung = prompt_id(hangs_on)

    assert time.monotonic() - started < 240  # two timeouts of 8 s, not an hour of sleep
    assert not first["complete"] and first["prompts_pending"] == 1
    assert first["prompts_given_up"] == {hung: "timed out after 8s"}
    assert first["prompts_retried"] == {hung: ["timed out after 8s"]}
    assert first["prompts_audited_now"] == 2
    others = {(prompt_id(p), m, 0) for p in (PROMPTS[0], PROMPTS[2]) for m in ("off", "on")}
    assert sample_keys(out) == others
    parts = out / "runs" / first["run_id"] / "parts" / hung
    assert not list(parts.glob("*.done.json"))  # deferred: no marker, pending for the next run

    second = run_audit(cfg)  # the ordinary actor: only the given-up prompt is generated
    assert second["run_id"] == first["run_id"] and second["complete"]
    assert second["prompts_audited_now"] == 1 and second["samples_generated_now"] == 2
    assert second["prompts_retried"] == {} and second["prompts_given_up"] == {}
    assert sample_keys(out) == others | {(hung, m, 0) for m in ("off", "on")}
