"""Memorization audit: generate for every prompt, match each sample against the training set, flag, report.

Runner (:func:`run_audit`, behind ``jobs/audit.py``):

1. **Prompts.** :func:`pipeline.io.prompts.read_prompts` reads the list (any published layout; an unknown
   one is a :class:`~pipeline.io.prompts.PromptListError`). ``dry_run`` stops here and writes
   ``prompts.parquet``.
2. **Run id.** :func:`run_identity` fingerprints what decides a sample: the model's files, the bundle's
   manifest, and every audit setting that changes a generation or a flag. Not the prompt list: a longer
   list under the same run id only adds prompts. Work lives under ``OUT/runs/<run_id>/``.
3. **Work.** One work item per prompt, covering the AMG modes asked for (``off``, ``on``) that have
   no done marker yet. Sample ``k`` of a prompt is seeded with :func:`sample_seed` (a hash of the run
   seed, the prompt id and ``k``; one ``torch.Generator`` per sample), the same seed with and without
   AMG, so results depend neither on batching nor on which actor or how many actors ran it.
4. **Generation.** A Ray actor pool of :class:`GeneratorActor` (one per GPU with ``num_gpus=1``, else
   CPU actors sized by :func:`~pipeline.core.ray_runtime.cpu_actor_pool_size`) loads the pipeline and the
   detector once. Per prompt: Wen's score (the pre-screen; prompts below ``wen_threshold`` are not
   generated), then per mode the samples, in batches, each matched to its nearest training image
   through the bundle (:class:`~pipeline.amg.MemorizationDetector` with the configured similarity;
   AMG's own detector is the same backend and index, so AMG and the audit agree on what a copy is),
   then Carlini's clique criterion over the prompt's generations (:mod:`pipeline.audit.criteria`).
5. **Writer.** The driver writes each (prompt, mode) partition, its images and then its done marker;
   an interrupted run resumes from the markers, and finished prompts are never generated again.
6. **Outputs.** ``results.parquet`` (one row per sample), ``prompts.parquet`` (one row per prompt),
   ``summary.json`` (per mode: memorized fraction, Top-5%, Top-1, counts; provenance) and the
   self-contained ``report.html`` (:mod:`pipeline.audit.report`), over the prompts of the current list.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
import yaml
from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError

from pipeline.amg import AMGConfig
from pipeline.audit.identity import resolve_model_dir, run_identity, tree_checksum
from pipeline.audit.layout import (
    AGGREGATE_VERSION,
    AMG_CHOICES,
    AUDIT_SCHEMA_VERSION,
    PROMPTS,
    REPORT,
    RESULTS,
    RUNS,
    SIMILARITIES,
    SUMMARY,
)
from pipeline.audit.store import RunStore, partition_name
from pipeline.bundle.reader import bundle_root_hash
from pipeline.core.config import AuditConfig, RayConfig, to_dict
from pipeline.core.ray_runtime import cluster_gpus, cpu_actor_pool_size, ray_session
from pipeline.core.stage import (
    Commit,
    FunctionStage,
    PartitionedStage,
    PartitionRun,
    run_partitioned,
    run_stage,
    seconds_since,
)
from pipeline.core.storage import (
    atomic_write_json,
    atomic_write_table,
    fingerprint,
    sha256_file,
)
from pipeline.io.prompts import read_prompts

if TYPE_CHECKING:  # imported for real only when there is something to generate (torch, diffusers)
    from pipeline.audit.actor import GeneratorActor

log = logging.getLogger(__name__)


def amg_configs(cfg: AuditConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(AMG 'on' config, detection config) as plain dicts.

    Both come from :meth:`AMGConfig.preset` for ``cfg.mode`` and ``cfg.similarity``; ``amg_overrides``
    (YAML: field -> value, or ``{paper: {...}, reference: {...}}``) changes the 'on' config. Detection
    uses the same backend and the same memorization threshold (``memorized_threshold`` overrides both).
    """

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
    if cfg.max_attempts < 1 or cfg.prompt_timeout_s < 0:
        raise ValueError(
            "audit.max_attempts must be at least 1 and audit.prompt_timeout_s at least 0 (0: none)"
        )
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
        "seconds": seconds_since(started),
    }


class AuditStage(PartitionedStage):
    """One partition per (prompt, AMG mode), under ``runs/<run_id>/``; ``finish`` aggregates them all.

    The fingerprint is the run identity (:func:`~pipeline.audit.identity.run_identity`): model and
    bundle content and every setting that changes a sample or a flag. The prompt list is not part
    of it, so a longer list under the same run id only adds partitions.
    """

    name = "audit"

    def __init__(
        self,
        cfg: AuditConfig,
        ray_cfg: RayConfig | None,
        prompts: list[dict[str, Any]],
        actor_cls: type[GeneratorActor] | None = None,
    ):
        self.cfg = cfg
        self.actor_cls = actor_cls
        self.ray_cfg = ray_cfg or RayConfig()
        self.prompts = prompts
        self.modes = AMG_CHOICES[cfg.amg]
        out = Path(cfg.out)
        self.model_dir = resolve_model_dir(cfg.model)
        cache = out / ".cache" / "checksums.json"
        # File list, sizes and root hash now; every file's sha256 only when there is work (prepare).
        self.bundle_sum = bundle_root_hash(cfg.bundle, verify=False)
        self.model_sum = tree_checksum(self.model_dir, cache)
        descriptor_sum = tree_checksum(cfg.sscd_checkpoint, cache) if cfg.sscd_checkpoint else None
        self.amg_on, self.detection = amg_configs(cfg)
        self.identity = run_identity(
            cfg, self.model_sum, self.bundle_sum, self.amg_on, self.detection, descriptor_sum
        )
        run_id = fingerprint(self.identity)
        self.store = RunStore(out, run_id)
        self.generation = Generation()

    def fingerprint(self) -> dict[str, Any]:
        return self.identity

    def partitions(self) -> dict[str, Any]:
        return {partition_name(p["prompt_id"], m): None for p in self.prompts for m in self.modes}

    def is_done(self, name: str, marker: dict[str, Any] | None, signature: Any) -> bool:
        prompt_id = name.split("/", 1)[0]
        return super().is_done(name, marker, signature) or self.store.prescreen_skipped(prompt_id)

    def select(self, todo: list[str]) -> list[str]:
        """At most ``max_prompts`` prompts' partitions (staged runs); all of them by default."""
        prompts = _prompt_ids(todo)
        chosen = set(prompts[: self.cfg.max_prompts] if self.cfg.max_prompts is not None else prompts)
        return [name for name in todo if name.split("/", 1)[0] in chosen]

    def prepare(self, todo: list[str]) -> None:
        """Before generating: every bundle file's sha256 (``verify_bundle``; it reads the whole bundle),
        then the run folder with its ``run.json`` (what the run id stands for)."""
        if self.cfg.verify_bundle:
            bundle_root_hash(self.cfg.bundle, verify=True)
        if not (self.store.root / "run.json").is_file():
            atomic_write_json(
                self.store.root / "run.json",
                {
                    "run_id": self.store.run_id,
                    **self.identity,
                    "model": str(self.model_dir),
                    "bundle": str(self.cfg.bundle),
                },
            )

    def compute(self, todo: list[str], commit: Commit) -> None:
        by_id = {p["prompt_id"]: p for p in self.prompts}
        modes: dict[str, list[str]] = {}
        for name in todo:
            prompt_id, mode = name.split("/", 1)
            modes.setdefault(prompt_id, []).append(mode)
        work = [(by_id[pid], prompt_modes) for pid, prompt_modes in modes.items()]
        log.info(
            "audit run %s: %d prompts to audit now (modes %s)",
            self.store.run_id,
            len(work),
            ",".join(self.modes),
        )
        with ray_session(self.ray_cfg):
            self.generation = _generate_all(
                self.cfg,
                self.store,
                self.model_dir,
                self.bundle_sum,
                self.amg_on,
                self.detection,
                work,
                commit,
                self.actor_cls,
            )

    def finish(self, run: PartitionRun) -> dict[str, Any]:
        summary = run_stage(self.aggregation(run), Path(self.cfg.out) / RUNS)
        for key in ("skipped", "seconds"):  # the aggregation's own; the audit's come from run_audit
            summary.pop(key, None)
        # Given-up prompts' partitions are deferred: pending for the next run, like those left by a limit.
        pending = _prompt_ids([*run.pending, *run.deferred])
        summary.update(
            prompts_total=len(self.prompts),
            prompts_audited_now=len(_prompt_ids(run.processed)),
            samples_generated_now=self.generation.generated,
            prompts_pending=len(pending),
            prompts_retried=self.generation.retried,
            prompts_given_up=self.generation.given_up,
            complete=not pending,
        )
        return summary

    def aggregation(self, run: PartitionRun) -> FunctionStage:
        """The step that collects the finished partitions into the outputs, summary and report.

        A stage of its own, so that a re-run with nothing new reuses its outputs instead of reading
        every partition and drawing the report again. It depends on the run, every option (the
        summary's provenance shows them), the prompt list and what each listed prompt has: its
        partitions' markers and its Wen pre-screen record.
        """
        prompt_ids = [p["prompt_id"] for p in self.prompts]
        inputs = {
            "schema": AUDIT_SCHEMA_VERSION,
            "aggregate": AGGREGATE_VERSION,
            "run": self.identity,
            "config": to_dict(self.cfg),
            "model_dir": str(self.model_dir),
            "prompts": self.prompts,
            "prompts_checksum": sha256_file(self.cfg.prompts),
            "partitions": run.markers,
            "wen": {pid: self.store.wen(pid) for pid in prompt_ids},
        }
        out = Path(self.cfg.out)

        def collect() -> dict[str, Any]:
            # Imported here: the report reads training images through the bundle's models (torch).
            from pipeline.audit.aggregate import aggregate

            return aggregate(
                self.cfg,
                self.store,
                run.markers,
                self.prompts,
                self.modes,
                self.identity,
                self.model_dir,
                self.bundle_sum,
                self.model_sum,
            )

        return FunctionStage("aggregate", inputs, [out / RESULTS, out / PROMPTS, out / REPORT], collect)


def _prompt_ids(partitions: list[str]) -> list[str]:
    """The prompt ids of (prompt, mode) partition names, in order, once each."""
    return list(dict.fromkeys(name.split("/", 1)[0] for name in partitions))


def run_audit(
    cfg: AuditConfig, ray_cfg: RayConfig | None = None, *, actor_cls: type[GeneratorActor] | None = None
) -> dict[str, Any]:
    """Audit ``cfg.model`` on ``cfg.prompts`` against ``cfg.bundle``; return the summary (``summary.json``).

    Everything is checked before Ray is touched. Ray is used only when there is something to generate:
    the session already up, else one joined or started from ``ray_cfg`` for the generation alone (see
    :func:`pipeline.core.ray_runtime.ray_session`); a re-run of a finished audit only re-aggregates.

    Args:
        cfg (`AuditConfig`): the audit's options.
        ray_cfg (`RayConfig`, *optional*): how to reach Ray.
        actor_cls (`type`, *optional*): the generator actor class (a subclass of
            :class:`~pipeline.audit.actor.GeneratorActor`, the default);
            tests pass one that dies or hangs to prove retries and timeouts.

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
    stage = AuditStage(cfg, ray_cfg, prompts_table.to_pylist(), actor_cls)
    summary = run_partitioned(stage, stage.store.markers_dir)
    summary["seconds"] = seconds_since(started)
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
        "prompts_retried",
        "prompts_given_up",
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


#: What a lost actor looks like to the driver: the actor process or its node died (``ActorDiedError``),
#: it cannot be reached (``ActorUnavailableError``; both are ``RayActorError``s), its worker crashed,
#: or its finished result was lost with its node before the driver fetched it.
ACTOR_LOST = (RayActorError, WorkerCrashedError, ObjectLostError)


@dataclass
class Generation:
    """What :func:`_generate_all` did: samples generated, and the prompts retried or given up (with why)."""

    generated: int = 0
    retried: dict[str, list[str]] = field(default_factory=dict)  # prompt id -> reason of each retry
    given_up: dict[str, str] = field(default_factory=dict)  # prompt id -> reason of its last attempt


@dataclass
class _InFlight:
    """One prompt on one actor. ``started`` is None until the actor is ready (a new actor first loads
    its models, which the prompt's timeout does not count); ``ready`` is that actor's ping."""

    actor: Any
    item: tuple[dict[str, Any], list[str]]
    attempt: int
    started: float | None
    ready: Any = None


def _generate_all(
    cfg: AuditConfig,
    store: RunStore,
    model_dir: Path,
    bundle_root: str,
    amg_on: dict[str, Any],
    detection: dict[str, Any],
    todo: list[tuple[dict[str, Any], list[str]]],
    commit: Commit,
    actor_cls: type[GeneratorActor] | None,
) -> Generation:
    """Run the work on actors, one prompt in flight per actor; the driver writes each result as it arrives.

    An actor that dies (its process, or its node) is replaced and its prompt queued again; so is one
    whose prompt runs longer than ``cfg.prompt_timeout_s`` (killed first). After ``cfg.max_attempts``
    failed attempts a prompt is given up for this run: its partitions are deferred (no marker; the
    next run computes them) and the other prompts go on. An actor that fails in its constructor (a
    wrong bundle, a missing model) or a prompt that raises is an error, not a fault: it stops the run.
    """

    from pipeline.audit.actor import GeneratorActor, WorkerSpec  # torch and diffusers: only for work

    n, options, device, threads = _plan_actors(cfg, len(todo))
    spec = WorkerSpec(
        model_dir=str(model_dir.resolve()),
        bundle=str(Path(cfg.bundle).resolve()),
        bundle_root=bundle_root,
        similarity=cfg.similarity,
        match_rows=cfg.match_rows,
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
    # No Ray-level max_restarts / max_task_retries: Ray would re-run a prompt on a restarted actor
    # without our knowing, so it could neither be counted against max_attempts nor reported, and
    # a retry would not be told apart from a hang by the timeout. The loop below replaces a lost actor
    # with a fresh one (scheduled on any live node) and requeues the prompt itself, once per failure.
    remote_cls = ray.remote(actor_cls or GeneratorActor).options(**options)
    timeout = cfg.prompt_timeout_s if cfg.prompt_timeout_s and cfg.prompt_timeout_s > 0 else None
    outcome = Generation()
    queue = deque((item, 1) for item in todo)
    idle: list[tuple[Any, bool]] = []  # (actor, new): actors waiting for a prompt; started on demand
    running: dict[Any, _InFlight] = {}  # prompt ref -> its slot
    starting: dict[Any, Any] = {}  # a new actor's ping ref -> its prompt ref
    done = 0
    t0 = time.monotonic()

    def submit(actor: Any, new: bool, item: tuple[dict[str, Any], list[str]], attempt: int) -> None:
        prompt, modes = item
        slot = _InFlight(actor, item, attempt, started=None if new else time.monotonic())
        ref = actor.audit_prompt.remote(
            prompt["prompt_id"], prompt["prompt"], modes, wen=store.wen(prompt["prompt_id"])
        )
        if new:  # actor tasks run in order: the ping answers once the constructor is done
            slot.ready = actor.ping.remote()
            starting[slot.ready] = ref
        running[ref] = slot

    def failed(slot: _InFlight, reason: str) -> None:
        """A lost or killed actor: drop it (a new one starts when a prompt needs it); requeue its
        prompt, or give the prompt up."""
        ray.kill(slot.actor)  # a dead actor is already gone; an unreachable or hung one must go
        prompt, modes = slot.item
        pid = prompt["prompt_id"]
        if slot.attempt >= cfg.max_attempts:
            outcome.given_up[pid] = reason
            for mode in modes:
                commit.defer(partition_name(pid, mode), f"given up after {slot.attempt} attempts: {reason}")
            log.warning("audit: prompt %s given up after %d attempts: %s", pid, slot.attempt, reason)
            return
        outcome.retried.setdefault(pid, []).append(reason)
        queue.append((slot.item, slot.attempt + 1))
        log.warning("audit: prompt %s, attempt %d failed (%s); queued again", pid, slot.attempt, reason)

    try:
        while queue or running:
            while queue and (idle or len(running) < n):
                actor, new = idle.pop() if idle else (remote_cls.remote(spec, device), True)
                item, attempt = queue.popleft()
                submit(actor, new, item, attempt)
            now = time.monotonic()
            deadlines = [s.started + timeout for s in running.values() if timeout and s.started is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=wait_s)
            for ref in ready:
                if ref in starting:  # a new actor is up: its prompt's clock starts now
                    slot = running.get(starting.pop(ref))
                    if slot is not None:
                        slot.started, slot.ready = time.monotonic(), None
                    continue
                slot = running.pop(ref)
                if slot.ready is not None:
                    starting.pop(slot.ready, None)
                try:
                    result = ray.get(ref)
                except ACTOR_LOST as err:
                    if isinstance(err, RayActorError) and err.actor_init_failed:
                        raise  # the constructor failed: a configuration error, the same on any actor
                    cause = type(err).__name__
                    if isinstance(err, RayActorError) and err.preempted:
                        cause += ", node preempted"
                    failed(slot, f"actor died ({cause})")
                    continue
                store.write(result, commit)
                idle.append((slot.actor, False))
                done += 1
                outcome.generated += sum(len(part["rows"]) for part in result["modes"].values())
                log.info(
                    "audit: %d/%d prompts (%s), %.1fs",
                    done,
                    len(todo),
                    result["prompt_id"],
                    time.monotonic() - t0,
                )
            now = time.monotonic()
            for ref, slot in list(running.items()):
                if timeout and slot.started is not None and now - slot.started >= timeout:
                    del running[ref]
                    failed(slot, f"timed out after {timeout:g}s")
    finally:
        for actor in [slot.actor for slot in running.values()] + [actor for actor, _ in idle]:
            ray.kill(actor)
    return outcome
