"""The stage contract: skip when done under the same fingerprint, recompute otherwise, marker last."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.config import (
    CaptionDedupConfig,
    CellsConfig,
    ImageDedupConfig,
    IndexConfig,
    result_options,
)
from pipeline.core.stage import (
    Commit,
    FunctionStage,
    PartitionedStage,
    PartitionRun,
    run_partitioned,
    run_stage,
)
from pipeline.core.storage import atomic_write_bytes


def counting_stage(tmp_path: Path, fingerprint: Any, calls: list[str], fail: bool = False) -> FunctionStage:
    out = tmp_path / "out.txt"

    def work() -> dict[str, Any]:
        calls.append("computed")
        atomic_write_bytes(out, b"result")
        if fail:
            raise RuntimeError("killed after writing its output, before finishing")
        return {"rows": 3}

    return FunctionStage("demo_step", fingerprint, [out], work)


def test_a_finished_stage_is_skipped_and_returns_its_saved_summary(tmp_path: Path):
    calls: list[str] = []
    first = run_stage(counting_stage(tmp_path, {"threshold": 0.7}, calls), tmp_path / "markers")
    again = run_stage(counting_stage(tmp_path, {"threshold": 0.7}, calls), tmp_path / "markers")
    assert calls == ["computed"]
    assert first["rows"] == again["rows"] == 3
    assert first["skipped"] is False and again["skipped"] is True
    assert json.loads((tmp_path / "markers" / "demo_step.done.json").read_text())["summary"]["rows"] == 3


def test_a_changed_fingerprint_or_a_missing_output_recomputes(tmp_path: Path):
    calls: list[str] = []
    run_stage(counting_stage(tmp_path, {"threshold": 0.7}, calls), tmp_path / "markers")
    run_stage(counting_stage(tmp_path, {"threshold": 0.8}, calls), tmp_path / "markers")
    assert calls == ["computed", "computed"]
    (tmp_path / "out.txt").unlink()
    run_stage(counting_stage(tmp_path, {"threshold": 0.8}, calls), tmp_path / "markers")
    assert calls == ["computed"] * 3


def test_a_stage_that_dies_leaves_no_marker_and_runs_again(tmp_path: Path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(counting_stage(tmp_path, "fp", calls, fail=True), tmp_path / "markers")
    assert (tmp_path / "out.txt").exists() and not (tmp_path / "markers" / "demo_step.done.json").exists()
    run_stage(counting_stage(tmp_path, "fp", calls), tmp_path / "markers")
    assert calls == ["computed", "computed"]


class Letters(PartitionedStage):
    """One partition per input file; the output of partition ``x`` is the upper-cased input."""

    name = "letters"

    def __init__(
        self,
        inputs: Path,
        out: Path,
        forget: str | None = None,
        first_only: bool = False,
        defer: dict[str, str] | None = None,
    ):
        self.inputs, self.out, self.forget, self.first_only = inputs, out, forget, first_only
        self.defer = defer or {}
        self.computed: list[str] = []

    def fingerprint(self) -> Any:
        return {"case": "upper"}

    def partitions(self) -> dict[str, Any]:
        return {p.stem: p.read_text() for p in sorted(self.inputs.iterdir())}

    def select(self, todo: list[str]) -> list[str]:
        return todo[:1] if self.first_only else todo

    def compute(self, todo: list[str], commit: Commit) -> None:
        for name in todo:
            self.computed.append(name)
            atomic_write_bytes(self.out / name, (self.inputs / f"{name}.txt").read_text().upper().encode())
            if name in self.defer:
                commit.defer(name, self.defer[name])
            elif name != self.forget:
                commit(name, {"chars": len((self.inputs / f"{name}.txt").read_text())})

    def finish(self, run: PartitionRun) -> dict[str, Any]:
        return {
            "chars": sum(m["chars"] for m in run.markers.values()),
            "processed": run.processed,
            "pending": run.pending,
            "deferred": run.deferred,
        }


def letter_inputs(tmp_path: Path, texts: dict[str, str]) -> Path:
    """``tmp_path/in/NAME.txt`` holding each text: a :class:`Letters` stage's input folder."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, text in texts.items():
        (inputs / f"{name}.txt").write_text(text)
    return inputs


def test_only_partitions_without_a_matching_marker_are_computed(tmp_path: Path):
    inputs = letter_inputs(tmp_path, {"a": "one", "b": "two", "c": "three"})
    stage = Letters(inputs, tmp_path / "out")
    assert run_partitioned(stage, tmp_path / "done") == {
        "chars": 11,
        "processed": ["a", "b", "c"],
        "pending": [],
        "deferred": {},
    }
    (inputs / "b.txt").write_text("TWO!")  # a changed input: its partition only
    stage = Letters(inputs, tmp_path / "out")
    assert run_partitioned(stage, tmp_path / "done")["chars"] == 12
    assert stage.computed == ["b"]
    assert (tmp_path / "out" / "b").read_text() == "TWO!"


def test_select_stages_the_work_and_reports_what_is_pending(tmp_path: Path):
    inputs = letter_inputs(tmp_path, {name: name for name in "xyz"})
    summary = run_partitioned(Letters(inputs, tmp_path / "out", first_only=True), tmp_path / "done")
    assert summary == {"chars": 1, "processed": ["x"], "pending": ["y", "z"], "deferred": {}}
    summary = run_partitioned(Letters(inputs, tmp_path / "out"), tmp_path / "done")
    assert summary == {"chars": 3, "processed": ["y", "z"], "pending": [], "deferred": {}}


def test_a_partition_computed_but_never_committed_is_an_error(tmp_path: Path):
    inputs = letter_inputs(tmp_path, {"a": "a"})
    with pytest.raises(RuntimeError, match=r"\['a'\].*never committed"):
        run_partitioned(Letters(inputs, tmp_path / "out", forget="a"), tmp_path / "done")


def test_a_deferred_partition_is_left_unfinished_with_its_reason(tmp_path: Path, caplog):
    """Deferring (say, an input that changed while it was read) is no error; the next run computes it."""
    inputs = letter_inputs(tmp_path, {"a": "one", "b": "two", "c": "three"})
    stage = Letters(inputs, tmp_path / "out", defer={"b": "changed_during_read: grew"})
    with caplog.at_level("WARNING", logger="pipeline.core.stage"):
        summary = run_partitioned(stage, tmp_path / "done")
    assert summary == {
        "chars": 8,
        "processed": ["a", "c"],
        "pending": [],
        "deferred": {"b": "changed_during_read: grew"},
    }
    assert not (tmp_path / "done" / "b.done.json").exists()
    assert any("b" in m and "changed_during_read: grew" in m for m in caplog.messages)
    stage = Letters(inputs, tmp_path / "out")
    assert run_partitioned(stage, tmp_path / "done")["chars"] == 11
    assert stage.computed == ["b"]


def test_deferring_a_recomputed_partition_drops_its_old_marker(tmp_path: Path):
    """The old marker described files this run may already have overwritten: it must not survive."""
    inputs = letter_inputs(tmp_path, {name: name for name in "ab"})
    run_partitioned(Letters(inputs, tmp_path / "out"), tmp_path / "done")
    assert (tmp_path / "done" / "b.done.json").exists()
    (inputs / "b.txt").write_text("bb")
    stage = Letters(inputs, tmp_path / "out", defer={"b": "stats_mismatch: 2 rows read, 3 expected"})
    summary = run_partitioned(stage, tmp_path / "done")
    assert stage.computed == ["b"] and summary["processed"] == [] and summary["chars"] == 1
    assert summary["deferred"] == {"b": "stats_mismatch: 2 rows read, 3 expected"}
    assert not (tmp_path / "done" / "b.done.json").exists()


@pytest.mark.parametrize(
    ("cfg", "neutral", "result"),
    [
        (
            ImageDedupConfig(),
            {"embeddings", "out", "block_rows", "use_gpu", "shards", "report"},
            {"phash_max_distance", "linkage"},
        ),
        (IndexConfig(), {"embeddings", "out", "use_gpu", "duplicates"}, {"kind", "target_recall"}),
        (CellsConfig(), {"ray_min_rows", "bucket_rows"}, {"rows_per_cell", "top"}),
        (
            CaptionDedupConfig(),
            {"input", "out", "batch_size", "ray_min_rows", "report"},
            {"threshold", "num_perm"},
        ),
    ],
)
def test_result_options_leave_out_exactly_the_fields_marked_result_neutral(cfg, neutral, result):
    options = result_options(cfg)
    assert set(options) == {f.name for f in dataclasses.fields(cfg)} - neutral
    assert result <= set(options)


class PurgingLetters(Letters):
    """Letters whose output folder must equal its current input (as ingest's and embed's)."""

    def remove(self, name: str) -> None:
        (self.out / name).unlink(missing_ok=True)


def test_partitions_whose_input_is_gone_are_removed_with_their_marker(tmp_path: Path):
    inputs = letter_inputs(tmp_path, {name: name for name in "abc"})
    run_partitioned(PurgingLetters(inputs, tmp_path / "out"), tmp_path / "done")
    (inputs / "b.txt").unlink()  # a takedown
    summary = run_partitioned(PurgingLetters(inputs, tmp_path / "out"), tmp_path / "done")
    assert summary["chars"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "c"]
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["a.done.json", "c.done.json"]
    # A stage that keeps stale partitions (the audit keeps prompts dropped from a list) keeps them.
    (inputs / "c.txt").unlink()
    run_partitioned(Letters(inputs, tmp_path / "out"), tmp_path / "done")
    assert (tmp_path / "out" / "c").exists() and (tmp_path / "done" / "c.done.json").exists()


def test_a_partition_being_recomputed_has_no_marker_while_its_files_are_rewritten(tmp_path: Path):
    inputs = letter_inputs(tmp_path, {"a": "one"})
    run_partitioned(Letters(inputs, tmp_path / "out"), tmp_path / "done")
    (inputs / "a.txt").write_text("two")

    class Killed(Letters):
        def compute(self, todo: list[str], commit: Commit) -> None:
            atomic_write_bytes(self.out / "a", b"TW")  # half of the new output, then the process dies
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_partitioned(Killed(inputs, tmp_path / "out"), tmp_path / "done")
    assert not (tmp_path / "done" / "a.done.json").exists()  # no reader trusts the torn file
