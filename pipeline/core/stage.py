"""The stage contract, and the one runner that makes every stage resumable.

A stage declares what it is and what its output depends on; :func:`run_stage` and
:func:`run_partitioned` do the rest, the same way for every stage:

* ``name``: the done marker's name and the log prefix;
* ``fingerprint()``: everything that changes the output (result options, schema version, inputs),
  cheap to compute: it decides whether there is any work;
* ``outputs()``: the files that must exist for the stage to count as done;
* ``compute()``: the work; it writes each output atomically (:mod:`pipeline.core.storage`) and
  returns the summary.

The runner skips a stage whose marker carries the current fingerprint and whose outputs all exist,
else runs ``compute()`` and writes the marker last, so a marker always means complete outputs.
Partitioned stages (ingest, embed, the audit) declare ``partitions()`` (name -> signature of that
partition's input) instead of one output set: only partitions without a matching marker are
computed (after ``prepare()``, which loads what only work needs), each committed as soon as its
files are written, and ``finish()`` builds the summary from every partition's marker. A partition
whose input cannot be trusted this run (a shard that changed while it was read) is deferred instead
(``commit.defer(name, reason)``): it gets no marker, any older marker of it is removed, and the next
run computes it again.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.core.storage import DoneMarkers, fingerprint

log = logging.getLogger(__name__)


class Commit(Protocol):
    """What ``PartitionedStage.compute`` reports each partition's outcome through."""

    def __call__(self, name: str, info: dict[str, Any]) -> None:
        """Record a finished partition (its files are already written): its done marker."""

    def defer(self, name: str, reason: str) -> None:
        """Leave a computed partition unfinished this run, with the reason (logged and summarised)."""


def seconds_since(started: float) -> float:
    """Wall time since ``started`` (a ``time.monotonic()`` reading), as summaries report it."""
    return round(time.monotonic() - started, 3)


class Stage(ABC):
    """One step whose outputs are a function of its fingerprint."""

    name: str

    @abstractmethod
    def fingerprint(self) -> Any:
        """JSON-able description of everything the outputs depend on."""

    @abstractmethod
    def outputs(self) -> list[Path]:
        """Files that must exist for a finished stage to be reused."""

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """Do the work, write every output atomically, return the summary."""


@dataclass(frozen=True)
class FunctionStage(Stage):
    """A stage assembled from values: for steps of a larger job (the bundle's) that need no class."""

    name: str
    inputs_fingerprint: Any
    output_files: list[Path]
    work: Callable[[], dict[str, Any]]

    def fingerprint(self) -> Any:
        return self.inputs_fingerprint

    def outputs(self) -> list[Path]:
        return self.output_files

    def compute(self) -> dict[str, Any]:
        return self.work()


def run_stage(stage: Stage, marker_dir: str | Path) -> dict[str, Any]:
    """Reuse ``stage``'s saved summary when it is done under the current fingerprint, else compute it.

    The returned summary has ``skipped`` (True when nothing was computed) and, for a computed stage,
    ``seconds`` unless the stage reported its own.
    """
    markers = DoneMarkers(marker_dir, fingerprint(stage.fingerprint()))
    marker = markers.read(stage.name)
    if marker is not None and all(path.exists() for path in stage.outputs()):
        log.info("%s: up to date", stage.name)
        return {**marker.get("summary", {}), "skipped": True}
    started = time.monotonic()
    summary = stage.compute()
    summary = {"seconds": seconds_since(started), **summary, "skipped": False}
    markers.write(stage.name, {"summary": summary})
    return summary


@dataclass(frozen=True)
class PartitionRun:
    """What one run of a partitioned stage found and did."""

    markers: dict[str, dict[str, Any]]  # every finished partition's marker, in the stage's order
    processed: list[str]  # computed and committed in this run
    pending: list[str]  # still to compute (left by a ``limit``)
    deferred: dict[str, str] = field(default_factory=dict)  # computed, not committed: name -> reason


class PartitionedStage(ABC):
    """A stage made of independent partitions (shards, prompts), each with its own done marker."""

    name: str

    @abstractmethod
    def fingerprint(self) -> Any:
        """JSON-able description of the options every partition's output depends on."""

    @abstractmethod
    def partitions(self) -> Mapping[str, Any]:
        """Partition name -> JSON-able signature of its input (a changed input is recomputed)."""

    @abstractmethod
    def compute(self, todo: list[str], commit: Commit) -> None:
        """Compute the ``todo`` partitions; write each one's files atomically, then ``commit`` it
        (or ``commit.defer`` it, with a reason, when its result cannot be trusted this run)."""

    @abstractmethod
    def finish(self, run: PartitionRun) -> dict[str, Any]:
        """The summary, from every partition's marker."""

    def is_done(self, name: str, marker: dict[str, Any] | None, signature: Any) -> bool:
        """Whether partition ``name`` can be reused: a marker under the same input signature."""
        return marker is not None and marker.get("source") == signature

    def select(self, todo: list[str]) -> list[str]:
        """The partitions to compute in this run (all of ``todo``; a stage may stage its work)."""
        return todo

    def prepare(self, todo: list[str]) -> None:  # noqa: B027 (an optional hook: most stages need none)
        """Get ready to compute ``todo`` (non-empty): load what only work needs, check what can fail.

        Called before any partition's marker or file is touched, and never when every partition is
        up to date, so a slow or failing preparation (a model to load, weights to fetch, a bundle to
        verify) neither slows a re-run with nothing to do nor costs a finished partition.
        """

    def remove(self, name: str) -> None:
        """Delete the files of partition ``name``, whose input is gone or was made under another
        fingerprint. Stages whose folder must equal their current input (ingest, embed) override it;
        by default stale partitions are kept (the audit keeps prompts dropped from a list)."""
        raise NotImplementedError


def pending_partitions(stage: PartitionedStage, markers: DoneMarkers) -> tuple[dict[str, Any], list[str]]:
    """(all partitions with their signatures, the names still to compute), in the stage's order."""
    partitions = dict(stage.partitions())
    todo = [name for name, sig in partitions.items() if not stage.is_done(name, markers.read(name), sig)]
    return partitions, todo


class _Ledger:
    """The :class:`Commit` handed to ``compute``: writes markers, records deferrals."""

    def __init__(self, stage: PartitionedStage, markers: DoneMarkers, partitions: dict[str, Any]):
        self.stage = stage
        self.markers = markers
        self.partitions = partitions
        self.deferred: dict[str, str] = {}

    def __call__(self, name: str, info: dict[str, Any]) -> None:
        self.deferred.pop(name, None)
        self.markers.write(name, {**info, "source": self.partitions[name]})

    def defer(self, name: str, reason: str) -> None:
        if name not in self.partitions:
            raise KeyError(f"{self.stage.name}: no partition {name!r} to defer")
        # An older marker describes files this run may already have overwritten: it must go.
        self.markers.path(name).unlink(missing_ok=True)
        self.deferred[name] = reason
        log.warning(
            "%s: partition %s not marked done, left for a later run: %s", self.stage.name, name, reason
        )


def purge_stale(stage: PartitionedStage, markers: DoneMarkers, partitions: dict[str, Any]) -> list[str]:
    """Remove partitions that are not the stage's current output: marker first, then the files.

    Stale means a marker (in the marker folder, not nested) whose partition is no longer an input,
    or that was written under another fingerprint. Stages that keep stale partitions (``remove``
    not overridden) are left alone.
    """
    if type(stage).remove is PartitionedStage.remove:
        return []
    stale = []
    for path in sorted(markers.folder.glob("*.done.json")):
        name = path.name.removesuffix(".done.json")
        if name in partitions and markers.read(name) is not None:
            continue
        stale.append(name)
        path.unlink(missing_ok=True)
        stage.remove(name)
        log.warning(
            "%s: removed partition %s (its input is gone or it was made under other options)",
            stage.name,
            name,
        )
    return stale


def run_partitioned(stage: PartitionedStage, marker_dir: str | Path) -> dict[str, Any]:
    """Compute the partitions of ``stage`` that are not done (those it selects), then summarise all.

    Deferred partitions (``commit.defer``) have no marker afterwards and are left out of
    ``PartitionRun.markers`` and ``processed``; they are listed, with their reasons, in ``deferred``.

    Raises:
        RuntimeError: a partition to compute was neither committed nor deferred by ``compute`` (its
            work was lost).
    """
    markers = DoneMarkers(marker_dir, fingerprint(stage.fingerprint()))
    partitions, todo = pending_partitions(stage, markers)
    now = stage.select(todo)
    log.info(
        "%s: %d partitions, %d done, %d to compute now",
        stage.name,
        len(partitions),
        len(partitions) - len(todo),
        len(now),
    )

    if now:
        stage.prepare(now)
    # The marker folder exists before any partition file does: a reader that finds partition files
    # and a marker folder trusts only marked partitions (without one it would take a released folder).
    markers.folder.mkdir(parents=True, exist_ok=True)
    for name in now:  # from here on these files may be rewritten: no marker may vouch for them
        markers.path(name).unlink(missing_ok=True)
    ledger = _Ledger(stage, markers, partitions)
    if now:
        stage.compute(now, ledger)
    purge_stale(stage, markers, partitions)
    deferred = dict(ledger.deferred)
    done = {
        name: marker
        for name in partitions
        if name not in deferred and (marker := markers.read(name)) is not None
    }
    lost = [
        name
        for name in now
        if name not in deferred and not stage.is_done(name, done.get(name), partitions[name])
    ]
    if lost:
        raise RuntimeError(f"{stage.name}: partitions {lost[:5]} were computed but never committed")
    chosen = set(now)
    return stage.finish(
        PartitionRun(
            markers=done,
            processed=[n for n in now if n not in deferred],
            pending=[n for n in todo if n not in chosen],
            deferred=deferred,
        )
    )
