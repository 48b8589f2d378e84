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

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.audit.layout import REPORT
from pipeline.audit.matching import training_image_reader
from pipeline.audit.store import RunStore
from pipeline.core.config import AuditConfig
from pipeline.core.storage import atomic_write_bytes

MODE_COLOURS = {"off": "#d9534f", "on": "#2b7bb9"}
MODE_LABELS = {"off": "AMG off", "on": "AMG on"}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:13px}
.cards{display:flex;gap:16px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:220px}
.card h3{margin:0 0 6px;font-size:15px} .big{font-size:26px;font-weight:600}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4;cursor:pointer;user-select:none;vertical-align:bottom}
.scroll{overflow-x:auto} td.text{min-width:260px} th.asc:after{content:" \\25B2"}
th.desc:after{content:" \\25BC"} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.flag td{background:#fff3f2} .yes{color:#c9302c;font-weight:600} .no{color:#3c763d}
.prov td:first-child{color:#666;white-space:nowrap}
.prov td{font-family:monospace;font-size:12px;word-break:break-all}
.pair{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap;margin:8px 0 22px}
.col{display:flex;flex-direction:column;gap:4px} .col .lab{font-size:12px;color:#555}
.strip{display:flex;gap:4px;flex-wrap:wrap} figure{margin:0;text-align:center;font-size:11px;color:#444}
figure img{display:block;image-rendering:pixelated;border:3px solid transparent}
figure.mem img{border-color:#d9534f} figure.ok img{border-color:#5cb85c}
.prompt{font-weight:600;margin:14px 0 2px}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = !th.classList.contains('asc');
    table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
      var nx = parseFloat(x), ny = parseFloat(y), r;
      if (!isNaN(nx) && !isNaN(ny)) r = nx - ny; else r = String(x).localeCompare(String(y));
      return asc ? r : -r;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def thumbnail_png(data: bytes, size: int) -> bytes:
    """PNG bytes of an image no larger than ``size`` on its longer side (smaller ones are kept as is)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if max(im.size) > size:
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def _img(data: bytes | None, size: int, alt: str) -> str:
    if not data:
        return f'<div style="width:{size}px;height:{size}px;background:#eee;font-size:11px">no image</div>'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" width="{size}" height="{size}" alt="{html.escape(alt)}">'


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _sort_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-1e99"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def histogram_svg(
    values: Mapping[str, Sequence[float]],
    threshold: float | None,
    label: str,
    bins: int = 30,
    width: int = 640,
    height: int = 240,
) -> str:
    """An inline SVG histogram, one translucent bar series per key of ``values`` (AMG mode)."""
    finite = {
        k: [float(x) for x in v if x is not None and math.isfinite(float(x))] for k, v in values.items()
    }
    everything = [x for v in finite.values() for x in v] + ([threshold] if threshold is not None else [])
    if not any(finite.values()):
        return '<p class="sub">No samples.</p>'
    lo, hi = min(everything), max(everything)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    step = (hi - lo) / bins
    counts = {k: [0] * bins for k in finite}
    for k, v in finite.items():
        for x in v:
            counts[k][min(bins - 1, int((x - lo) / step))] += 1
    top = max(max(c) for c in counts.values()) or 1
    left, right, upper, lower = 44, 12, 26, 34
    pw, ph = width - left - right, height - upper - lower

    def sx(x: float) -> float:
        return left + (x - lo) / (hi - lo) * pw

    def sy(c: float) -> float:
        return upper + ph - c / top * ph

    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(label)} histogram">'
        ),
        f'<rect x="{left}" y="{upper}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for k, c in counts.items():
        colour = MODE_COLOURS.get(k, "#777")
        for i, n in enumerate(c):
            if n:
                x0, x1 = sx(lo + i * step), sx(lo + (i + 1) * step)
                parts.append(
                    f'<rect x="{x0:.1f}" y="{sy(n):.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
                    f'height="{ph + upper - sy(n):.1f}" fill="{colour}" fill-opacity="0.55">'
                    f"<title>{html.escape(MODE_LABELS.get(k, k))}: {n} in [{lo + i * step:.3f}, "
                    f"{lo + (i + 1) * step:.3f})</title></rect>"
                )
    for j in range(6):  # x ticks
        x = lo + j * (hi - lo) / 5
        parts.append(
            f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{upper + ph}" y2="{upper + ph + 4}" stroke="#666"/>'
            f'<text x="{sx(x):.1f}" y="{upper + ph + 16}" font-size="11" text-anchor="middle">{x:.2f}</text>'
        )
    parts.extend(  # y ticks, whole counts
        f'<text x="{left - 6}" y="{sy(c) + 4:.1f}" font-size="11" text-anchor="end">{c:.0f}</text>'
        for c in sorted({round(top * j / 2) for j in range(3)})
    )
    if threshold is not None:
        parts.append(
            f'<line x1="{sx(threshold):.1f}" x2="{sx(threshold):.1f}" y1="{upper}" y2="{upper + ph}" '
            f'stroke="#000" stroke-dasharray="4 3"/><text x="{sx(threshold) + 4:.1f}" y="{upper + 12}" '
            f'font-size="11">threshold {threshold:g}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 4}" font-size="12" text-anchor="middle">'
        f"{html.escape(label)}</text>"
    )
    x = left
    for k in counts:  # legend, top
        colour = MODE_COLOURS.get(k, "#777")
        name = f"{MODE_LABELS.get(k, k)} (n={len(finite[k])})"
        parts.append(
            f'<rect x="{x}" y="6" width="12" height="12" fill="{colour}" fill-opacity="0.55"/>'
            f'<text x="{x + 16}" y="16" font-size="12">{html.escape(name)}</text>'
        )
        x += 30 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


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
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    rows = []
    for p in prompts:
        cells = []
        for col, _, digits in columns:
            v = p.get(col)
            css = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            if col == "prompt":
                css = ' class="text"'
            if isinstance(v, bool):
                css = ' class="yes"' if v else ' class="no"'
            text = _fmt(v, digits) if digits is not None else _fmt(v)
            cells.append(f'<td{css} data-v="{html.escape(_sort_value(v))}">{html.escape(text)}</td>')
        flagged = any(p.get(f"{m}_flagged") for m in modes)
        rows.append(f"<tr{' class=flag' if flagged else ''}>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table class="sortable" id="prompts"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


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
            f"<div>Top-5%: {_fmt(s.get('top5pct'))} · Top-1: {_fmt(s.get('top1'))}</div>"
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
    rows = [
        f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(prov[key]))}</td></tr>"
        for key in keys
        if key in prov
    ]
    if "config" in prov:
        cfg = json.dumps(prov["config"], sort_keys=True)
        rows.append(f"<tr><td>config</td><td>{html.escape(cfg)}</td></tr>")
    return f'<table class="prov">{"".join(rows)}</table>'


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
        training = _img(training_images.get(key) if key else None, size, f"training {key}")
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
                    f"{_img(sample_images.get((pid, m, r['sample_index'])), size, 'sample')}"
                    f"<figcaption>{_fmt(r.get('similarity'))}</figcaption></figure>"
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
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title} {html.escape(run_id)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style></head><body>"
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
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


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
