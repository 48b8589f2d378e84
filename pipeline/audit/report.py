"""The audit's ``report.html``: one self-contained file (inline CSS, script, SVG and base64 PNG images).

Nothing in the page is fetched: it opens from a file, offline, in any browser. Sections:

* the run: verdict per AMG mode (memorized fraction, Top-5%, Top-1, flagged prompts) and provenance;
* a histogram (inline SVG) of every sample's similarity to its nearest training image, one colour
  per AMG mode, with the memorization threshold drawn in;
* a sortable table of every prompt (click a column header; a tiny inline script sorts the rows);
* for each flagged prompt: the matched training image beside the samples generated without and with
  AMG (same seeds, so each column is one seed), each captioned with its similarity;
* the same strips for up to :data:`MAX_UNFLAGGED_SHOWN` prompts that no mode flagged (highest
  similarity first), so that prompts AMG should leave alone are seen beside those it must change.

When both modes ran, every AMG-on sample is marked ``= off`` when its pixels are bit-identical to the
AMG-off sample of the same seed (``identical_to_off`` in ``results.parquet``), else ``≠ off``; each
prompt says how many of its samples AMG left unchanged, and the AMG-on card the fraction over the run.

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
.same{color:#3c763d;font-weight:600} .changed{color:#8a6d3b;font-weight:600}
"""

#: At most this many prompts that no mode flagged get a gallery strip (those with the highest similarity
#: first): enough to see what AMG does to prompts it should leave alone, small for thousands of prompts.
MAX_UNFLAGGED_SHOWN = 24


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
    if "off" in modes and "on" in modes:
        columns.append(("on_n_identical_to_off", "AMG on samples = off", None))
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
            f"<div>Carlini cliques: {s.get('n_prompts_clique', 0)} prompts</div>"
            f"{_identical_line(s)}</div>"
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _identical_line(block: Mapping[str, Any]) -> str:
    """The AMG-on card's line: the fraction of its samples bit-identical to AMG off (nothing when no
    sample could be compared, e.g. only AMG on ran)."""
    frac = block.get("frac_identical_to_off")
    if frac is None:
        return ""
    return (
        f'<div class="identical">Identical to AMG off: <b>{100 * frac:.1f}%</b> of samples '
        f"({block.get('n_identical_to_off', 0)} of {block.get('n_compared_to_off', 0)})</div>"
    )


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


def gallery_prompts(
    prompts: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    modes: Sequence[str],
    max_unflagged: int = MAX_UNFLAGGED_SHOWN,
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]], int]:
    """The gallery's prompts: (every flagged prompt, the unflagged prompts shown, how many unflagged
    prompts have samples). Shown are at most ``max_unflagged`` of those, highest similarity first (in any
    mode; ties in list order); prompts without samples (the Wen pre-screen left them out) are not."""
    generated = {s["prompt_id"] for s in samples}
    flagged = [p for p in prompts if any(p.get(f"{m}_flagged") for m in modes)]
    ids = {p["prompt_id"] for p in flagged}
    clean = [p for p in prompts if p["prompt_id"] not in ids and p["prompt_id"] in generated]

    def top(p: Mapping[str, Any]) -> float:
        sims = [p.get(f"{m}_max_similarity") for m in modes]
        return max((float(v) for v in sims if v is not None), default=float("-inf"))

    shown = sorted(clean, key=top, reverse=True)[: max(0, max_unflagged)]
    return flagged, shown, len(clean)


def _sample_figure(r: Mapping[str, Any], image: bytes | None, size: int) -> str:
    """One sample: its thumbnail framed red (memorized) or green, its similarity and, on an AMG-on
    sample, whether it is bit-identical to the AMG-off sample of its seed."""
    css = "mem" if r.get("memorized") else "ok"
    same = r.get("identical_to_off") if r.get("amg_mode") == "on" else None
    mark = ""
    if same is True:
        mark = ' <span class="same" title="bit-identical to the AMG-off sample of this seed">= off</span>'
    elif same is False:
        mark = ' <span class="changed" title="differs from the AMG-off sample of this seed">≠ off</span>'
    return (
        f'<figure class="{css}">{img_tag(image, size, "sample")}'
        f"<figcaption>{fmt(r.get('similarity'))}{mark}</figcaption></figure>"
    )


def _prompt_strips(
    p: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    modes: Sequence[str],
    sample_images: Mapping[tuple[str, str, int], bytes],
    training_images: Mapping[str, bytes],
    size: int,
    training_label: str,
) -> str:
    """A prompt's block: its text, then the training image beside one strip of samples per mode."""
    pid = p["prompt_id"]
    rows = sorted(rows, key=lambda r: (r["amg_mode"], r["sample_index"]))
    key = p.get("matched_key")
    training = img_tag(training_images.get(key) if key else None, size, f"training {key}")
    label = f"<figcaption>key {html.escape(str(key))}</figcaption>"
    cols = [
        f'<div class="col"><span class="lab">{training_label}</span><figure>{training}{label}</figure></div>'
    ]
    for m in modes:
        strip = [
            _sample_figure(r, sample_images.get((pid, m, r["sample_index"])), size)
            for r in rows
            if r["amg_mode"] == m
        ]
        verdict = "flagged" if p.get(f"{m}_flagged") else "not flagged"
        cols.append(
            f'<div class="col"><span class="lab">{MODE_LABELS.get(m, m)} — {verdict}</span>'
            f'<div class="strip">{"".join(strip) or "<span class=sub>not generated</span>"}</div></div>'
        )
    compared = [
        r["identical_to_off"] for r in rows if r["amg_mode"] == "on" and r.get("identical_to_off") is not None
    ]
    unchanged = (
        f' · <span class="unchanged">{sum(compared)} of {len(compared)} samples unchanged by AMG</span>'
        if compared
        else ""
    )
    caption = p.get("matched_caption")
    return (
        f'<div class="prompt" id="p-{html.escape(pid)}">{html.escape(p["prompt"])}</div>'
        f'<div class="sub">{html.escape(pid)}'
        f"{' · training caption: ' + html.escape(caption) if caption else ''}{unchanged}</div>"
        f'<div class="pair">{"".join(cols)}</div>'
    )


def _gallery(
    chosen: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    modes: Sequence[str],
    sample_images: Mapping[tuple[str, str, int], bytes],
    training_images: Mapping[str, bytes],
    size: int,
    training_label: str,
) -> str:
    by_prompt: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    return "".join(
        _prompt_strips(
            p, by_prompt.get(p["prompt_id"], []), modes, sample_images, training_images, size, training_label
        )
        for p in chosen
    )


def render_report(
    summary: Mapping[str, Any],
    prompts: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    sample_images: Mapping[tuple[str, str, int], bytes],
    training_images: Mapping[str, bytes],
    thumbnail_size: int = 96,
    max_unflagged: int = MAX_UNFLAGGED_SHOWN,
) -> str:
    """The report's HTML.

    Args:
        summary (`Mapping`): ``summary.json``'s content (``off``/``on`` verdicts, ``provenance``,
            ``criteria``).
        prompts (`Sequence[Mapping]`): rows of ``prompts.parquet``.
        samples (`Sequence[Mapping]`): rows of ``results.parquet`` (``identical_to_off`` marks the
            AMG-on samples; a row without it is not marked).
        sample_images (`Mapping`): PNG bytes per ``(prompt_id, amg_mode, sample_index)`` (those of the
            gallery's prompts, :func:`gallery_prompts`, at least).
        training_images (`Mapping`): PNG bytes per matched training key.
        thumbnail_size (`int`, *optional*, defaults to 96): displayed side of every image, in CSS pixels.
        max_unflagged (`int`, *optional*, defaults to :data:`MAX_UNFLAGGED_SHOWN`): at most this many
            unflagged prompts in the gallery.
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
    flagged, shown, n_clean = gallery_prompts(prompts, samples, modes, max_unflagged)
    criteria = summary.get("criteria", {})
    crit = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
        for k, v in criteria.items()
        if k.endswith("_rule")
    )
    run_id = summary.get("provenance", {}).get("run_id", "")
    title = "Memorization audit"
    legend = (
        "Each column of a strip is one seed, shared by AMG off and on; red frame: memorized (similarity "
        "above the threshold), green: not."
    )
    if "off" in modes and "on" in modes:
        legend += (
            " Under an AMG-on sample, <b>= off</b>: its pixels are bit-identical to the AMG-off sample "
            "of the same seed (AMG changed nothing); <b>≠ off</b>: they differ."
        )
    matched, nearest = "matched training image", "nearest training image"
    if n_clean:
        clean_note = (
            f"Prompts that no AMG mode flagged, the highest similarity first: {len(shown)} of {n_clean} "
            f"shown (at most {max_unflagged}; the prompt table lists them all)."
        )
    else:
        clean_note = "No prompt with samples is left unflagged."
    body = (
        f'<h1>{title}</h1><div class="sub">run {html.escape(run_id)} · {len(prompts)} prompts · '
        f"{len(samples)} samples · {html.escape(str(summary.get('provenance', {}).get('created', '')))}</div>"
        f'{_cards(summary, modes)}<ul class="sub">{crit}</ul>'
        f"<h2>Similarity to the nearest training image</h2>{hist}"
        f'<h2>Prompts</h2><p class="sub">Click a column header to sort.</p>{_prompt_table(prompts, modes)}'
        f'<h2 id="flagged">Flagged prompts ({len(flagged)})</h2>'
        f'<p class="sub">{legend}</p>'
        f"{_gallery(flagged, samples, modes, sample_images, training_images, thumbnail_size, matched)}"
        f"{'' if flagged else '<p class=sub>No prompt is flagged.</p>'}"
        f'<h2 id="unflagged">Prompts not flagged ({len(shown)} of {n_clean} shown)</h2>'
        f'<p class="sub">{clean_note}</p>'
        f"{_gallery(shown, samples, modes, sample_images, training_images, thumbnail_size, nearest)}"
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
    """``report.html``: images of the gallery's prompts (:func:`gallery_prompts`: the flagged ones and at
    most :data:`MAX_UNFLAGGED_SHOWN` others) and their matched training images, inlined."""

    modes = [m for m in ("off", "on") if m in summary]
    cap = MAX_UNFLAGGED_SHOWN  # read now: a test may lower it
    flagged, shown, _ = gallery_prompts(prompt_rows, results, modes, cap)
    chosen = {p["prompt_id"] for p in [*flagged, *shown]}
    size = cfg.thumbnail_size
    sample_images = {}
    for r in results:
        if r["prompt_id"] in chosen:
            path = store.out / r["image"]
            if path.is_file():
                sample_images[(r["prompt_id"], r["amg_mode"], r["sample_index"])] = thumbnail_png(
                    path.read_bytes(), size
                )
    training_images: dict[str, bytes] = {}
    wanted = {p["matched_key"]: p for p in prompt_rows if p["prompt_id"] in chosen and p.get("matched_key")}
    if wanted:
        rows_by_key = {r["matched_key"]: r["matched_row"] for r in results if r["matched_key"] in wanted}
        fetch = training_image_reader(cfg, expect=summary["provenance"]["bundle_checksum"])
        for key, row_id in rows_by_key.items():
            data = fetch(int(row_id)) if fetch else None
            if data:
                training_images[key] = thumbnail_png(data, size)
    html_text = render_report(summary, prompt_rows, results, sample_images, training_images, size, cap)
    path = store.out / REPORT
    atomic_write_bytes(path, html_text.encode("utf-8"))
    return path
