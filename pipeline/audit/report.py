"""The audit's ``report.html``: one self-contained file (inline CSS, script, SVG and base64 PNG images).

Nothing in the page is fetched: it opens from a file, offline, in any browser. Sections:

* the run: verdict per AMG mode (memorized fraction, Top-5%, Top-1, flagged prompts) and provenance;
* a histogram (inline SVG) of every sample's similarity to its nearest training image, one colour
  per AMG mode, with the memorization threshold drawn in;
* a sortable table of every prompt (click a column header; a tiny inline script sorts the rows);
* for each flagged prompt: the matched training image beside the samples generated without and with
  AMG (same seeds, so each column is one seed), each captioned with its similarity.

:func:`render_report` builds the HTML from plain rows; :func:`thumbnail_png` makes the inline images.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.audit.layout import REPORT
from pipeline.audit.matching import training_image_reader
from pipeline.audit.store import RunStore
from pipeline.core.config import AuditConfig
from pipeline.core.html import (
    fmt,
    histogram_svg,
    html_page,
    img_tag,
    key_value_table,
    table_html,
    td,
    thumbnail_png,
)
from pipeline.core.storage import atomic_write_bytes

MODE_COLOURS = {"off": "#d9534f", "on": "#2b7bb9"}
MODE_LABELS = {"off": "AMG off", "on": "AMG on"}

_CSS = """
tr.flag td{background:#fff3f2} .yes{color:#c9302c;font-weight:600} .no{color:#3c763d}
figure.mem img{border-color:#d9534f} figure.ok img{border-color:#5cb85c}
.prompt{font-weight:600;margin:14px 0 2px}
"""


#: (column of prompts.parquet, header, decimals) of the prompt table; ``{m}`` is the AMG mode.
PROMPT_COLUMNS = (
    ("prompt", "prompt", None),
    ("wen_score", "Wen score", 3),
    ("{m}_frac_memorized", "{M} memorized", 2),
    ("{m}_max_similarity", "{M} max sim.", 3),
    ("{m}_largest_clique", "{M} clique", None),
    ("{m}_flagged", "{M} flagged", None),
)


def _prompt_table(prompts: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> str:
    columns = [("prompt_id", "id", None)]
    for col, head, digits in PROMPT_COLUMNS:
        if "{m}" in col:
            columns += [(col.format(m=m), head.format(M=MODE_LABELS.get(m, m)), digits) for m in modes]
        else:
            columns.append((col, head, digits))
    columns.append(("matched_key", "matched training key", None))
    rows = []
    for p in prompts:
        cells = []
        for col, _, digits in columns:
            v = p.get(col)
            css = "text" if col == "prompt" else None
            if isinstance(v, bool):
                css = "yes" if v else "no"
            cells.append(td(v, digits, css))
        flagged = any(p.get(f"{m}_flagged") for m in modes)
        rows.append(f"<tr{' class=flag' if flagged else ''}>{''.join(cells)}</tr>")
    return table_html("prompts", [h for _, h, _ in columns], rows)


def _cards(summary: Mapping[str, Any], modes: Sequence[str]) -> str:
    cards = []
    for m in modes:
        s = summary.get(m) or {}
        cards.append(
            f'<div class="card" id="card-{m}">'
            f'<h3 style="color:{MODE_COLOURS.get(m, "#333")}">{MODE_LABELS.get(m, m)}</h3>'
            f'<div class="big">{100 * s.get("frac_memorized", 0):.1f}% memorized</div>'
            f"<div>{s.get('n_memorized', 0)} of {s.get('n_samples', 0)} samples; "
            f"<b>{s.get('n_prompts_flagged', 0)}</b> of {s.get('n_prompts', 0)} prompts flagged</div>"
            f"<div>Top-5%: {fmt(s.get('top5pct'))} · Top-1: {fmt(s.get('top1'))}</div>"
            f"<div>Carlini cliques: {s.get('n_prompts_clique', 0)} prompts</div></div>"
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _provenance(summary: Mapping[str, Any]) -> str:
    prov = summary.get("provenance", {})
    keys = (
        "run_id",
        "model",
        "model_checksum",
        "bundle",
        "bundle_checksum",
        "prompts",
        "prompts_checksum",
        "similarity",
        "descriptor",
        "created",
    )
    rows = [(key, str(prov[key])) for key in keys if key in prov]
    if "config" in prov:
        rows.append(("config", json.dumps(prov["config"], sort_keys=True)))
    return key_value_table(rows)


def _gallery(
    flagged: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    modes: Sequence[str],
    sample_images: Mapping[tuple[str, str, int], bytes],
    training_images: Mapping[str, bytes],
    size: int,
) -> str:
    if not flagged:
        return '<p class="sub">No prompt is flagged.</p>'
    by_prompt: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    out = []
    for p in flagged:
        pid = p["prompt_id"]
        rows = sorted(by_prompt.get(pid, []), key=lambda r: (r["amg_mode"], r["sample_index"]))
        key = p.get("matched_key")
        training = img_tag(training_images.get(key) if key else None, size, f"training {key}")
        label = f"<figcaption>key {html.escape(str(key))}</figcaption>"
        cols = [
            '<div class="col"><span class="lab">matched training image</span>'
            f"<figure>{training}{label}</figure></div>"
        ]
        for m in modes:
            strip = []
            for r in (r for r in rows if r["amg_mode"] == m):
                css = "mem" if r.get("memorized") else "ok"
                strip.append(
                    f'<figure class="{css}">'
                    f"{img_tag(sample_images.get((pid, m, r['sample_index'])), size, 'sample')}"
                    f"<figcaption>{fmt(r.get('similarity'))}</figcaption></figure>"
                )
            verdict = "flagged" if p.get(f"{m}_flagged") else "not flagged"
            cols.append(
                f'<div class="col"><span class="lab">{MODE_LABELS.get(m, m)} — {verdict}</span>'
                f'<div class="strip">{"".join(strip) or "<span class=sub>not generated</span>"}</div></div>'
            )
        caption = p.get("matched_caption")
        out.append(
            f'<div class="prompt" id="p-{html.escape(pid)}">{html.escape(p["prompt"])}</div>'
            f'<div class="sub">{html.escape(pid)}'
            f"{' · training caption: ' + html.escape(caption) if caption else ''}</div>"
            f'<div class="pair">{"".join(cols)}</div>'
        )
    return "".join(out)


def render_report(
    summary: Mapping[str, Any],
    prompts: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    sample_images: Mapping[tuple[str, str, int], bytes],
    training_images: Mapping[str, bytes],
    thumbnail_size: int = 96,
) -> str:
    """The report's HTML.

    Args:
        summary (`Mapping`): ``summary.json``'s content (``off``/``on`` verdicts, ``provenance``,
            ``criteria``).
        prompts (`Sequence[Mapping]`): rows of ``prompts.parquet``.
        samples (`Sequence[Mapping]`): rows of ``results.parquet``.
        sample_images (`Mapping`): PNG bytes per ``(prompt_id, amg_mode, sample_index)`` (flagged
            prompts' at least).
        training_images (`Mapping`): PNG bytes per matched training key.
        thumbnail_size (`int`, *optional*, defaults to 96): displayed side of every image, in CSS pixels.
    """
    modes = [m for m in ("off", "on") if summary.get(m)]
    threshold = summary.get("criteria", {}).get("memorized_threshold")
    similarity = summary.get("provenance", {}).get("similarity", "similarity")
    hist = histogram_svg(
        {m: [s["similarity"] for s in samples if s["amg_mode"] == m] for m in modes},
        threshold,
        f"{similarity} similarity to the nearest training image",
        colours=MODE_COLOURS,
        names=MODE_LABELS,
    )
    flagged = [p for p in prompts if any(p.get(f"{m}_flagged") for m in modes)]
    criteria = summary.get("criteria", {})
    crit = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
        for k, v in criteria.items()
        if k.endswith("_rule")
    )
    run_id = summary.get("provenance", {}).get("run_id", "")
    title = "Memorization audit"
    body = (
        f'<h1>{title}</h1><div class="sub">run {html.escape(run_id)} · {len(prompts)} prompts · '
        f"{len(samples)} samples · {html.escape(str(summary.get('provenance', {}).get('created', '')))}</div>"
        f'{_cards(summary, modes)}<ul class="sub">{crit}</ul>'
        f"<h2>Similarity to the nearest training image</h2>{hist}"
        f'<h2>Prompts</h2><p class="sub">Click a column header to sort.</p>{_prompt_table(prompts, modes)}'
        f"<h2>Flagged prompts ({len(flagged)})</h2>"
        '<p class="sub">Each column of a strip is one seed, shared by '
        f"AMG off and on; red frame: memorized (similarity above the threshold), green: not.</p>"
        f"{_gallery(flagged, samples, modes, sample_images, training_images, thumbnail_size)}"
        f"<h2>Provenance</h2>{_provenance(summary)}"
    )
    return html_page(f"{title} {run_id}", body, _CSS)


def write_report(
    cfg: AuditConfig,
    store: RunStore,
    summary: dict[str, Any],
    prompt_rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
) -> Path:
    """``report.html``: images of flagged prompts and their matched training images, inlined."""

    modes = [m for m in ("off", "on") if m in summary]
    flagged = {p["prompt_id"] for p in prompt_rows if any(p.get(f"{m}_flagged") for m in modes)}
    size = cfg.thumbnail_size
    sample_images = {}
    for r in results:
        if r["prompt_id"] in flagged:
            path = store.out / r["image"]
            if path.is_file():
                sample_images[(r["prompt_id"], r["amg_mode"], r["sample_index"])] = thumbnail_png(
                    path.read_bytes(), size
                )
    training_images: dict[str, bytes] = {}
    wanted = {p["matched_key"]: p for p in prompt_rows if p["prompt_id"] in flagged and p.get("matched_key")}
    if wanted:
        rows_by_key = {r["matched_key"]: r["matched_row"] for r in results if r["matched_key"] in wanted}
        fetch = training_image_reader(cfg, expect=summary["provenance"]["bundle_checksum"])
        for key, row_id in rows_by_key.items():
            data = fetch(int(row_id)) if fetch else None
            if data:
                training_images[key] = thumbnail_png(data, size)
    html_text = render_report(summary, prompt_rows, results, sample_images, training_images, size)
    path = store.out / REPORT
    atomic_write_bytes(path, html_text.encode("utf-8"))
    return path
