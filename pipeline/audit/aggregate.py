"""From partitions to prompts.parquet rows and summary.json blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.audit.criteria import criteria
from pipeline.audit.layout import PROMPTS, PROMPTS_SCHEMA, REPORT, RESULTS, RESULTS_SCHEMA
from pipeline.audit.report import write_report
from pipeline.audit.store import RunStore, partition_name, pixel_sha256
from pipeline.core.config import AuditConfig, to_dict
from pipeline.core.storage import atomic_write_table, sha256_file


def _quantile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def mark_identical(store: RunStore, per_mode: dict[str, list[dict[str, Any]]]) -> None:
    """Set ``identical_to_off`` on a prompt's rows, in place: on an AMG-on row, whether its decoded pixels
    equal those of the AMG-off sample of the same index and seed; None on AMG-off rows, and
    where that sample or either image is missing (only one mode in the outputs).

    Compares the rows' ``pixel_sha256``; a row without one (a partition written before the column) gets
    it from its image file first.
    """
    for rows in per_mode.values():
        for r in rows:
            r["identical_to_off"] = None
            if r.get("pixel_sha256") is None and r.get("image"):
                path = store.out / r["image"]
                r["pixel_sha256"] = pixel_sha256(path.read_bytes()) if path.is_file() else None
    off = {(r["sample_index"], r["seed"]): r["pixel_sha256"] for r in per_mode.get("off", [])}
    for r in per_mode.get("on", []):
        a, b = off.get((r["sample_index"], r["seed"])), r["pixel_sha256"]
        r["identical_to_off"] = None if a is None or b is None else a == b


def prompt_row(
    prompt: dict[str, Any],
    wen: dict[str, Any] | None,
    per_mode: dict[str, list[dict[str, Any]]],
    cliques: dict[str, dict[str, Any]],
    modes: Sequence[str],
) -> dict[str, Any]:
    """One row of ``prompts.parquet``: the prompt, its Wen score and, per AMG mode, aggregates and flags.

    A prompt is flagged in a mode when one of its samples matches a training image above the threshold
    (the bundle criterion: a confirmed copy). A Carlini clique (near-identical generations, the criterion
    that needs no training data) is reported beside it as ``clique_flagged``: in Carlini et al. it selects
    candidates, which count as extracted only once matched to a training image, and that match is what
    the bundle answers. ``flagged`` is the AMG-off verdict when AMG off ran, else AMG on's.
    ``on_n_identical_to_off`` counts the AMG-on samples that :func:`mark_identical` found bit-identical to
    their AMG-off sample (None when no sample could be compared).
    """
    row: dict[str, Any] = {k: prompt.get(k) for k in ("prompt_id", "prompt", "occurrences", "extra")}
    row["wen_score"] = None if wen is None else wen.get("wen_score")
    row["prescreen_skipped"] = bool(wen and wen.get("skipped"))
    row["audited"] = bool(per_mode)
    best: dict[str, Any] | None = None
    for mode in modes:
        rows = per_mode.get(mode)
        if not rows:
            continue
        sims = [r["similarity"] for r in rows]
        clique = cliques.get(mode, {})
        n_mem = sum(bool(r["memorized"]) for r in rows)
        clique_flagged = bool(clique.get("flagged"))
        row.update(
            {
                f"{mode}_n_samples": len(rows),
                f"{mode}_n_memorized": n_mem,
                f"{mode}_frac_memorized": n_mem / len(rows),
                f"{mode}_max_similarity": max(sims),
                f"{mode}_mean_similarity": float(np.mean(sims)),
                f"{mode}_largest_clique": len(clique.get("clique", [])),
                f"{mode}_clique_required": clique.get("required"),
                f"{mode}_clique_flagged": clique_flagged,
                f"{mode}_median_tiled_l2": None
                if clique.get("median_distance") is None or math.isnan(clique["median_distance"])
                else clique["median_distance"],
                f"{mode}_flagged": n_mem > 0,
                f"{mode}_seconds": float(sum(r["seconds"] for r in rows)),
            }
        )
        top = max(rows, key=lambda r: r["similarity"])
        if best is None:  # the first mode (off when it ran) names the matched training image
            best = top
    if best is not None:
        row.update(
            matched_key=best["matched_key"],
            matched_caption=best["matched_caption"],
            matched_similarity=best["similarity"],
        )
    first = next((m for m in modes if per_mode.get(m)), None)
    row["flagged"] = bool(first and row.get(f"{first}_flagged"))
    compared = [
        r["identical_to_off"] for r in per_mode.get("on", []) if r.get("identical_to_off") is not None
    ]
    row["on_n_identical_to_off"] = sum(compared) if compared else None
    return row


def mode_summary(rows: list[dict[str, Any]], prompt_rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """``summary.json``'s block for one AMG mode.

    The AMG-on block also says how many of its samples are bit-identical to the AMG-off sample of the
    same seed: ``n_compared_to_off`` (samples with an AMG-off counterpart), ``n_identical_to_off`` and
    ``frac_identical_to_off`` (of those compared; None when none was, e.g. only AMG on was asked for).
    """
    sims = [r["similarity"] for r in rows]
    audited = [p for p in prompt_rows if p.get(f"{mode}_n_samples")]
    block = {
        "n_samples": len(rows),
        "n_memorized": sum(bool(r["memorized"]) for r in rows),
        "frac_memorized": (sum(bool(r["memorized"]) for r in rows) / len(rows)) if rows else 0.0,
        "top5pct": _quantile(sims, 95),
        "top1": max(sims) if sims else None,
        "mean_similarity": float(np.mean(sims)) if sims else None,
        "n_prompts": len(audited),
        "n_prompts_flagged": sum(bool(p.get(f"{mode}_flagged")) for p in audited),
        "n_prompts_memorized": sum(bool(p.get(f"{mode}_n_memorized")) for p in audited),
        "n_prompts_clique": sum(bool(p.get(f"{mode}_clique_flagged")) for p in audited),
        "flagged_prompts": [p["prompt_id"] for p in audited if p.get(f"{mode}_flagged")],
        "seconds_per_sample": (sum(r["seconds"] for r in rows) / len(rows)) if rows else None,
    }
    if mode == "on":
        compared = [r["identical_to_off"] for r in rows if r.get("identical_to_off") is not None]
        block.update(
            n_compared_to_off=len(compared),
            n_identical_to_off=sum(compared),
            frac_identical_to_off=sum(compared) / len(compared) if compared else None,
        )
    return block


def aggregate(
    cfg: AuditConfig,
    store: RunStore,
    markers: dict[str, dict[str, Any]],
    prompts: list[dict[str, Any]],
    modes: Sequence[str],
    identity: dict[str, Any],
    model_dir: Path,
    bundle_sum: str,
    model_sum: str,
) -> dict[str, Any]:
    """Collect the finished partitions of the listed prompts into the output tables, summary and report."""
    out = store.out
    results: list[dict[str, Any]] = []
    prompt_rows: list[dict[str, Any]] = []
    for p in prompts:
        pid = p["prompt_id"]
        wen = store.wen(pid)
        per_mode, cliques = {}, {}
        for mode in modes:
            marker = markers.get(partition_name(pid, mode))
            if marker is None:
                continue
            per_mode[mode] = store.read_rows(pid, mode)
            cliques[mode] = marker["clique"]
            results += per_mode[mode]
        mark_identical(store, per_mode)
        prompt_rows.append(prompt_row(p, wen, per_mode, cliques, modes))
    atomic_write_table(out / RESULTS, pa.Table.from_pylist(results, schema=RESULTS_SCHEMA))
    atomic_write_table(out / PROMPTS, pa.Table.from_pylist(prompt_rows, schema=PROMPTS_SCHEMA))
    detection = identity["detection"]
    summary: dict[str, Any] = {
        "job": "audit",
        "run_id": store.run_id,
        "out": str(out),
        "report": str(out / REPORT),
        "criteria": criteria(cfg, detection),
        "provenance": {
            "run_id": store.run_id,
            "model": str(cfg.model),
            "model_dir": str(model_dir),
            "model_checksum": model_sum,
            "bundle": str(cfg.bundle),
            "bundle_checksum": bundle_sum,
            "prompts": str(cfg.prompts),
            "prompts_checksum": sha256_file(cfg.prompts),
            "similarity": cfg.similarity,
            "descriptor": cfg.sscd_checkpoint or "(the bundle's)",
            "descriptor_checksum": identity["descriptor_checksum"],
            "config": to_dict(cfg),
            "amg_on_config": identity["amg_on"],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "prompts": {
            "listed": len(prompts),
            "audited": sum(bool(r["audited"]) for r in prompt_rows),
            "prescreen_skipped": sum(bool(r["prescreen_skipped"]) for r in prompt_rows),
            "wen_scored": sum(r["wen_score"] is not None for r in prompt_rows),
        },
    }
    for mode in modes:
        summary[mode] = mode_summary([r for r in results if r["amg_mode"] == mode], prompt_rows, mode)
    write_report(cfg, store, summary, prompt_rows, results)
    return summary
