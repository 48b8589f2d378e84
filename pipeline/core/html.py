"""Pieces of the self-contained HTML reports (the audit's ``report.html``, the ``dedup_report.html``).

A report is one file: inline CSS, a tiny sort script, inline SVG charts and base64 images, so it
opens offline in any browser. Everything here is generic (no pipeline imports beyond ``core``):

* :func:`thumbnail` / :func:`thumbnail_png`: small re-encoded images to inline;
* :func:`img_tag`: an ``<img>`` with a ``data:`` URI (PNG or JPEG, sniffed), or a grey placeholder;
* :func:`histogram_svg`, :func:`bar_chart_svg`: inline SVG charts, thresholds drawn in;
* :func:`fmt`, :func:`sort_value`, :func:`td`, :func:`table_html`: tables whose rows the sort script
  (:data:`SORT_SCRIPT`, active on every ``table.sortable``) orders by number or text;
* :func:`key_value_table`: a provenance table;
* :func:`html_page`: the page skeleton with :data:`BASE_CSS`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

#: Series colours of the charts when the caller gives none, in order.
PALETTE = ("#2b7bb9", "#d9534f", "#5cb85c", "#f0ad4e", "#8e6bbf", "#777777")

BASE_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:#666;font-size:13px}
.cards{display:flex;gap:16px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:220px}
.card h3{margin:0 0 6px;font-size:15px} .big{font-size:26px;font-weight:600}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4;cursor:pointer;user-select:none;vertical-align:bottom}
.scroll{overflow-x:auto} td.text{min-width:260px} th.asc:after{content:" \\25B2"}
th.desc:after{content:" \\25BC"} td.num{text-align:right;font-variant-numeric:tabular-nums}
.prov td:first-child{color:#666;white-space:nowrap}
.prov td{font-family:monospace;font-size:12px;word-break:break-all}
.pair{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap;margin:8px 0 22px}
.col{display:flex;flex-direction:column;gap:4px} .col .lab{font-size:12px;color:#555}
.strip{display:flex;gap:4px;flex-wrap:wrap} figure{margin:0;text-align:center;font-size:11px;color:#444}
figure img{display:block;image-rendering:pixelated;border:3px solid transparent}
"""

SORT_SCRIPT = """
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


def html_page(title: str, body: str, css: str = "", script: str = SORT_SCRIPT) -> str:
    """A whole self-contained page: :data:`BASE_CSS` + ``css`` inline, ``body``, then ``script``."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{BASE_CSS}{css}</style></head><body>{body}"
        f"<script>{script}</script></body></html>\n"
    )


def thumbnail(data: bytes, size: int, fmt: str = "PNG", quality: int = 80) -> bytes:
    """``fmt`` (PNG or JPEG) bytes of an image no larger than ``size`` on its longer side (smaller ones
    keep their size)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if max(im.size) > size:
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if fmt.upper() in ("JPEG", "JPG"):
            im.save(buf, format="JPEG", quality=quality, optimize=True)
        else:
            im.save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def thumbnail_png(data: bytes, size: int) -> bytes:
    """PNG bytes of an image no larger than ``size`` on its longer side (smaller ones are kept as is)."""
    return thumbnail(data, size, "PNG")


def img_tag(data: bytes | None, size: int, alt: str, placeholder: str = "no image") -> str:
    """An inline ``<img>`` of PNG or JPEG bytes shown at ``size`` CSS pixels, or a grey placeholder box."""
    if not data:
        return (
            f'<div style="width:{size}px;height:{size}px;background:#eee;font-size:11px">'
            f"{html.escape(placeholder)}</div>"
        )
    mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:{mime};base64,{b64}" width="{size}" height="{size}" alt="{html.escape(alt)}">'


def fmt(value: Any, digits: int = 3) -> str:
    """A cell's text: floats to ``digits`` decimals, booleans as yes/no, missing values as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def sort_value(value: Any) -> str:
    """A cell's ``data-v`` for :data:`SORT_SCRIPT`: numbers as numbers, missing values first."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-1e99"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def td(value: Any, digits: int | None = None, css: str | None = None) -> str:
    """A sortable table cell; numbers are right-aligned unless ``css`` says otherwise."""
    if css is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        css = "num"
    text = fmt(value, digits) if digits is not None else fmt(value)
    cls = f' class="{css}"' if css else ""
    return f'<td{cls} data-v="{html.escape(sort_value(value))}">{html.escape(text)}</td>'


def table_html(table_id: str, headers: Sequence[str], rows: Sequence[str], sortable: bool = True) -> str:
    """A scrollable table (sorted on a header click when ``sortable``); ``rows`` are ``<tr>`` strings."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    cls = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{cls} id="{html.escape(table_id)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def key_value_table(items: Iterable[tuple[str, Any]]) -> str:
    """A two-column ``table.prov`` (provenance: names in grey, values in monospace); values that are not
    strings are shown as JSON."""

    def text(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)

    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(text(v))}</td></tr>" for k, v in items
    )
    return f'<table class="prov">{rows}</table>'


def _finite(values: Any) -> np.ndarray:
    if isinstance(values, (list, tuple)):
        values = [np.nan if x is None else x for x in values]
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


#: Plot margins of the charts (left, right, upper, lower), in pixels.
LEFT, RIGHT, UPPER, LOWER = 44, 12, 26, 34


def _svg_open(width: int, height: int, aria: str) -> str:
    """The ``<svg>`` element and the plot area's frame."""
    pw, ph = width - LEFT - RIGHT, height - UPPER - LOWER
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(aria)}">'
        f'<rect x="{LEFT}" y="{UPPER}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>'
    )


def _svg_close(width: int, height: int, label: str, top: float, legend: str, percent: bool = False) -> str:
    """Y ticks up to ``top`` (whole counts, or shares as percentages), the x-axis label, the legend, and
    the closing tag."""
    pw, ph = width - LEFT - RIGHT, height - UPPER - LOWER
    if percent:
        digits = 0 if top >= 0.2 else 1
        marks = [(top * j / 2, f"{100 * top * j / 2:.{digits}f}%") for j in range(3)]
    else:
        marks = [(c, f"{c:.0f}") for c in sorted({round(top * j / 2) for j in range(3)})]
    ticks = "".join(
        f'<text x="{LEFT - 6}" y="{UPPER + ph - c / top * ph + 4:.1f}" font-size="11" '
        f'text-anchor="end">{text}</text>'
        for c, text in marks
    )
    return (
        f'{ticks}<text x="{LEFT + pw / 2:.1f}" y="{height - 4}" font-size="12" text-anchor="middle">'
        f"{html.escape(label)}</text>{legend}</svg>"
    )


def _legend(
    series: Mapping[str, Any], sizes: Mapping[str, int], colours: Mapping[str, str], names: Mapping[str, str]
) -> str:
    """One swatch and name (with its count) per series, along the top."""
    parts, x = [], LEFT
    for k in series:
        name = f"{names.get(k, k)} (n={sizes[k]})"
        parts.append(
            f'<rect x="{x}" y="6" width="12" height="12" fill="{colours.get(k, "#777")}" '
            f'fill-opacity="0.55"/><text x="{x + 16}" y="16" font-size="12">{html.escape(name)}</text>'
        )
        x += 30 + 7 * len(name)
    return "".join(parts)


def _series_style(
    keys: Sequence[str], colours: Mapping[str, str] | None, names: Mapping[str, str] | None
) -> tuple[Mapping[str, str], Mapping[str, str]]:
    return colours or {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}, names or {}


def histogram_svg(
    values: Mapping[str, Sequence[float] | np.ndarray],
    threshold: float | None,
    label: str,
    bins: int = 30,
    width: int = 640,
    height: int = 240,
    *,
    colours: Mapping[str, str] | None = None,
    names: Mapping[str, str] | None = None,
    integer: bool = False,
    threshold_label: str | None = None,
    share: bool = False,
) -> str:
    """An inline SVG histogram, one translucent bar series per key of ``values``.

    Args:
        values (`Mapping`): series name -> values (lists or arrays; None and NaN are left out).
        threshold (`float`, *optional*): drawn as a dashed line, labelled ``threshold_label``.
        integer (`bool`): whole-number values (Hamming distances): one bin per integer, and the
            threshold line drawn between ``threshold`` and the next integer.
        colours, names (`Mapping`, *optional*): colour and legend name per series (default: the
            :data:`PALETTE` in order, the key).
        share (`bool`): bar heights are each series' share of its own values (series of very
            different sizes stay comparable), the y axis in percent.
    """
    colours, names = _series_style(list(values), colours, names)
    finite = {k: _finite(v) for k, v in values.items()}
    if not any(len(v) for v in finite.values()):
        return '<p class="sub">No samples.</p>'
    extra = [threshold] if threshold is not None else []
    lo = float(min([v.min() for v in finite.values() if len(v)] + extra))
    hi = float(max([v.max() for v in finite.values() if len(v)] + extra))
    if integer:
        lo, hi = math.floor(lo) - 0.5, math.ceil(hi) + 0.5
        bins = int(hi - lo)
    else:
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.02 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    step = (hi - lo) / bins
    counts = {
        k: np.bincount(np.minimum(bins - 1, ((v - lo) / step).astype(np.int64)), minlength=bins)
        for k, v in finite.items()
    }
    heights = {k: c / max(1, c.sum()) if share else c for k, c in counts.items()}
    top = max(float(h.max()) for h in heights.values()) or 1
    pw, ph = width - LEFT - RIGHT, height - UPPER - LOWER

    def sx(x: float) -> float:
        return LEFT + (x - lo) / (hi - lo) * pw

    def sy(c: float) -> float:
        return UPPER + ph - c / top * ph

    parts = [_svg_open(width, height, f"{label} histogram")]
    for k, c in counts.items():
        for i in np.flatnonzero(c).tolist():
            n, y = int(c[i]), sy(float(heights[k][i]))
            x0, x1 = sx(lo + i * step), sx(lo + (i + 1) * step)
            span = f"{lo + i + 0.5:g}" if integer else f"[{lo + i * step:.3f}, {lo + (i + 1) * step:.3f})"
            parts.append(
                f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
                f'height="{ph + UPPER - y:.1f}" fill="{colours.get(k, "#777")}" fill-opacity="0.55">'
                f"<title>{html.escape(names.get(k, k))}: {n} in {span}</title></rect>"
            )
    if integer:
        every = max(1, math.ceil(bins / 12))
        ticks = [(float(x), f"{x:.0f}") for x in np.arange(lo + 0.5, hi, every)]
    else:
        ticks = [(lo + j * (hi - lo) / 5, f"{lo + j * (hi - lo) / 5:.2f}") for j in range(6)]
    parts.extend(
        f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{UPPER + ph}" y2="{UPPER + ph + 4}" stroke="#666"/>'
        f'<text x="{sx(x):.1f}" y="{UPPER + ph + 16}" font-size="11" text-anchor="middle">{text}</text>'
        for x, text in ticks
    )
    if threshold is not None:
        at = threshold + 0.5 if integer else threshold
        text = threshold_label or f"threshold {threshold:g}"
        right_half = sx(at) > LEFT + 0.6 * pw  # label on the line's left, inside the plot
        anchor = f'x="{sx(at) - 4:.1f}" text-anchor="end"' if right_half else f'x="{sx(at) + 4:.1f}"'
        parts.append(
            f'<line class="threshold" x1="{sx(at):.1f}" x2="{sx(at):.1f}" y1="{UPPER}" y2="{UPPER + ph}" '
            f'stroke="#000" stroke-dasharray="4 3"/><text {anchor} y="{UPPER + 12}" '
            f'font-size="11">{html.escape(text)}</text>'
        )
    legend = _legend(counts, {k: len(v) for k, v in finite.items()}, colours, names)
    parts.append(_svg_close(width, height, label, top, legend, percent=share))
    return "".join(parts)


def bar_chart_svg(
    labels: Sequence[str],
    series: Mapping[str, Sequence[int]],
    label: str,
    width: int = 640,
    height: int = 240,
    *,
    colours: Mapping[str, str] | None = None,
    names: Mapping[str, str] | None = None,
) -> str:
    """An inline SVG bar chart of counts per category (``labels``), the series' bars side by side."""
    colours, names = _series_style(list(series), colours, names)
    if not labels or not any(sum(v) for v in series.values()):
        return '<p class="sub">Nothing to show.</p>'
    top = max(max(v) for v in series.values()) or 1
    pw, ph = width - LEFT - RIGHT, height - UPPER - LOWER
    slot = pw / len(labels)
    bar = max(1.0, (slot - 4) / max(1, len(series)))
    parts = [_svg_open(width, height, f"{label} bar chart")]
    for s, (k, counts) in enumerate(series.items()):
        for i, n in enumerate(counts):
            if n:
                h = n / top * ph
                parts.append(
                    f'<rect x="{LEFT + i * slot + 2 + s * bar:.1f}" y="{UPPER + ph - h:.1f}" '
                    f'width="{bar:.1f}" height="{h:.1f}" fill="{colours.get(k, "#777")}" fill-opacity="0.7">'
                    f"<title>{html.escape(names.get(k, k))}: {n} at {html.escape(labels[i])}</title></rect>"
                )
    widest = 6.5 * max(len(x) for x in labels) + 8  # pixels of the longest label at font-size 11
    every = max(1, math.ceil(widest / slot))
    parts.extend(
        f'<text x="{LEFT + (i + 0.5) * slot:.1f}" y="{UPPER + ph + 16}" font-size="11" '
        f'text-anchor="middle">{html.escape(labels[i])}</text>'
        for i in range(0, len(labels), every)
    )
    legend = _legend(series, {k: int(sum(v)) for k, v in series.items()}, colours, names)
    parts.append(_svg_close(width, height, label, top, legend))
    return "".join(parts)
