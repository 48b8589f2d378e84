"""Names and schemas of the audit's outputs: results.parquet, prompts.parquet, the run folder."""

from __future__ import annotations

import pyarrow as pa

AUDIT_SCHEMA_VERSION = 1


#: Version of what the aggregation writes from the partitions (results/prompts columns, summary fields,
#: the report). Not part of the run identity: a change re-aggregates a run without generating again.
AGGREGATE_VERSION = 2


AMG_CHOICES = {"off": ("off",), "on": ("on",), "both": ("off", "on")}


SIMILARITIES = ("sscd", "clip", "nl2", "l2")


RESULTS = "results.parquet"


PROMPTS = "prompts.parquet"


SUMMARY = "summary.json"


REPORT = "report.html"


RUNS = "runs"


PARTS = "parts"


IMAGES = "images"


WEN = "wen"


#: One row per generated sample, as a (prompt, mode) partition holds it. ``pixel_sha256``: SHA-256 of the
#: sample's decoded pixels (:func:`pipeline.audit.store.pixel_sha256`); null in partitions written before it.
PART_SCHEMA = pa.schema(
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
        ("pixel_sha256", pa.string()),
    ]
)


#: ``results.parquet``: the partitions' rows and, on an AMG-on row, ``identical_to_off``: whether its
#: pixels equal those of the AMG-off sample of the same seed (null on AMG-off rows and where that
#: sample is not in the run's outputs, e.g. only AMG on was asked for).
RESULTS_SCHEMA = PART_SCHEMA.append(pa.field("identical_to_off", pa.bool_()))


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
        # AMG-on samples whose pixels equal the AMG-off sample of the same seed; null unless both ran.
        ("on_n_identical_to_off", pa.int32()),
    ]
)
