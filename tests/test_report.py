"""The audit report: self-contained HTML that renders offline in headless Chromium, with a working sort."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.audit import report as report_module
from pipeline.audit.aggregate import aggregate, mark_identical
from pipeline.audit.report import MAX_UNFLAGGED_SHOWN, render_report
from pipeline.audit.store import RunStore, partition_name
from pipeline.core.config import AuditConfig
from pipeline.core.html import histogram_svg, thumbnail_png

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
]


def chromium() -> str | None:
    """A working Chromium, or None (Ubuntu's snap wrapper, for one, is on PATH but runs nothing here)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            try:
                if (
                    subprocess.run(
                        [path, "--version"], check=False, capture_output=True, timeout=60
                    ).returncode
                    == 0
                ):
                    return path
            except (OSError, subprocess.TimeoutExpired):
                pass
    return None


def _png(colour: tuple[int, int, int], size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(
        np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def example() -> tuple[dict, list[dict], list[dict], dict, dict]:
    """Three prompts: 'cat' memorized without AMG and not with it, 'wheel' only a clique, 'dog' clean."""
    summary = {
        "off": {
            "frac_memorized": 0.5,
            "n_memorized": 3,
            "n_samples": 6,
            "n_prompts": 3,
            "n_prompts_flagged": 2,
            "top5pct": 0.93,
            "top1": 0.95,
            "n_prompts_clique": 2,
        },
        "on": {
            "frac_memorized": 0.0,
            "n_memorized": 0,
            "n_samples": 6,
            "n_prompts": 3,
            "n_prompts_flagged": 0,
            "top5pct": 0.31,
            "top1": 0.32,
            "n_prompts_clique": 0,
        },
        "criteria": {
            "memorized_threshold": 0.5,
            "memorized_rule": "similarity above 0.5",
            "carlini_rule": "clique of 2 within 0.15",
        },
        "provenance": {
            "run_id": "abc123",
            "similarity": "sscd",
            "model": "m",
            "bundle": "b",
            "bundle_checksum": "f" * 64,
            "config": {"seed": 0},
        },
    }
    prompts, samples, images = [], [], {}
    for pid, text, sims_off, sims_on, clique in (
        ("p1", "a tabby cat <b>looking</b> straight", [0.95, 0.91], [0.30, 0.32], True),
        ("p2", "a colour wheel", [0.40, 0.45], [0.2, 0.25], True),
        ("p3", "a dog on a beach", [0.10, 0.12], [0.11, 0.09], False),
    ):
        row = {
            "prompt_id": pid,
            "prompt": text,
            "wen_score": {"p1": 3.2, "p2": 1.1, "p3": 0.4}[pid],
            "matched_key": f"k{pid}",
            "matched_caption": text,
        }
        for mode, sims in (("off", sims_off), ("on", sims_on)):
            mem = [s > 0.5 for s in sims]
            row.update(
                {
                    f"{mode}_frac_memorized": float(np.mean(mem)),
                    f"{mode}_max_similarity": max(sims),
                    f"{mode}_largest_clique": 2 if clique and mode == "off" else 1,
                    f"{mode}_flagged": bool(any(mem) or (clique and mode == "off")),
                }
            )
            for k, s in enumerate(sims):
                samples.append(
                    {
                        "prompt_id": pid,
                        "amg_mode": mode,
                        "sample_index": k,
                        "similarity": s,
                        "memorized": s > 0.5,
                    }
                )
                images[(pid, mode, k)] = thumbnail_png(
                    _png((200, 80, 40) if mode == "off" else (40, 80, 200), seed=k), 96
                )
        prompts.append(row)
    training = {"kp1": thumbnail_png(_png((200, 80, 40), size=256), 96)}
    return summary, prompts, samples, images, training


def test_report_is_self_contained_and_escapes_text():
    html = render_report(*example())
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    # training image + 2 flagged prompts x 4 samples + the unflagged 'dog' x 4 samples
    assert html.count("data:image/png;base64,") == 1 + 3 * 4
    assert "&lt;b&gt;looking&lt;/b&gt;" in html and "<b>looking</b>" not in html
    assert "<svg" in html and 'id="prompts"' in html


def test_thumbnail_shrinks_large_images_only():
    big = thumbnail_png(_png((10, 20, 30), size=300), 96)
    small = thumbnail_png(_png((10, 20, 30), size=32), 96)
    assert Image.open(io.BytesIO(big)).size == (96, 96)
    assert Image.open(io.BytesIO(small)).size == (32, 32)


def test_histogram_counts_every_value():
    svg = histogram_svg({"off": [0.1, 0.9, 0.95], "on": [0.2]}, 0.5, "sscd", bins=10)
    counts = [int(n) for n in re.findall(r": (\d+) in \[", svg)]
    assert sum(counts) == 4 and "threshold 0.5" in svg
    assert "No samples" in histogram_svg({"off": []}, None, "x")


def _run_chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        pytest.skip(
            "no working chromium on PATH (make test installs Debian's chromium where it runs as root)"
        )
    profile = tmp_path / "profile"
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_report_renders_in_headless_chromium_offline(tmp_path: Path):
    page = tmp_path / "report.html"
    page.write_text(render_report(*example()), encoding="utf-8")
    shot = tmp_path / "report.png"
    # No network at all: every request but the file itself would fail (and the page makes none).
    done = _run_chromium(
        [
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            f"--screenshot={shot}",
            "--window-size=1280,1600",
            page.as_uri(),
        ],
        tmp_path,
    )
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        arr = np.asarray(im.convert("RGB"))
    # Rendered content, not a blank page: the red (AMG off) and blue (AMG on) thumbnails are there.
    reds = ((arr[..., 0] > 150) & (arr[..., 2] < 100)).sum()
    blues = ((arr[..., 2] > 150) & (arr[..., 0] < 100)).sum()
    assert reds > 2000 and blues > 2000, (reds, blues)


@pytest.mark.slow
def test_report_table_sorts_on_click_in_chromium(tmp_path: Path):
    html = render_report(*example())
    # Click the "Wen score" header once (ascending), as a user would, then dump the DOM.
    click = (
        "<script>document.querySelectorAll('#prompts th')[2].click();"
        "document.body.setAttribute('data-order', Array.from(document.querySelectorAll('#prompts tbody tr'))"
        ".map(function(r){return r.cells[0].textContent;}).join(','));</script></body>"
    )
    page = tmp_path / "sorted.html"
    page.write_text(html.replace("</body>", click), encoding="utf-8")
    done = _run_chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert 'data-order="p3,p2,p1"' in done.stdout, done.stdout[-500:] + done.stderr[-1000:]


# --- The gallery's two sections, the cap on unflagged prompts, the "AMG changed nothing" marker ---------


def _section(html: str, start: str, end: str) -> str:
    return html[html.index(start) : html.index(end, html.index(start))]


def _blocks(section: str) -> dict[str, str]:
    """A gallery section's prompt blocks by prompt id."""
    return {
        m.group(1): m.group(0)
        for m in re.finditer(
            r'<div class="prompt" id="p-([^"]+)">.*?(?=<div class="prompt"|$)', section, re.S
        )
    }


def test_gallery_shows_flagged_prompts_then_those_not_flagged():
    html = render_report(*example())
    flagged = _section(html, 'id="flagged"', 'id="unflagged"')
    clean = _section(html, 'id="unflagged"', "<h2>Provenance")
    assert set(_blocks(flagged)) == {"p1", "p2"} and set(_blocks(clean)) == {"p3"}
    assert "Flagged prompts (2)" in flagged and "Prompts not flagged (1 of 1 shown)" in clean
    assert "nearest training image" in clean and "AMG on — not flagged" in clean
    assert clean.count("data:image/png;base64,") == 4  # p3's 2 seeds x 2 modes


def test_gallery_caps_the_prompts_not_flagged():
    summary, _, _, _, _ = example()
    prompts, samples, images = [], [], {}
    for i in range(MAX_UNFLAGGED_SHOWN + 6):
        pid = f"g{i:02d}"
        sim = 0.01 * i  # the highest similarities come first
        prompts.append(
            {"prompt_id": pid, "prompt": f"generic {i}", "off_flagged": False, "on_flagged": False}
            | {"off_max_similarity": sim, "on_max_similarity": sim}
        )
        for mode in ("off", "on"):
            samples.append({"prompt_id": pid, "amg_mode": mode, "sample_index": 0, "similarity": sim})
            images[(pid, mode, 0)] = _png((90, 90, 90), seed=i)
    html = render_report(summary, prompts, samples, images, {})
    clean = _blocks(_section(html, 'id="unflagged"', "<h2>Provenance"))
    assert f"Prompts not flagged ({MAX_UNFLAGGED_SHOWN} of {MAX_UNFLAGGED_SHOWN + 6} shown)" in html
    assert len(clean) == MAX_UNFLAGGED_SHOWN and "g29" in clean and "g05" not in clean
    assert html.count("data:image/png;base64,") == 2 * MAX_UNFLAGGED_SHOWN
    three = render_report(summary, prompts, samples, images, {}, max_unflagged=3)
    assert list(_blocks(_section(three, 'id="unflagged"', "<h2>Provenance"))) == ["g29", "g28", "g27"]
    assert "Prompts not flagged (3 of 30 shown)" in three and "No prompt is flagged." in three


def _image(value: int, changed: bool = False, compress_level: int = 6) -> bytes:
    arr = np.full((8, 8, 3), value, np.uint8)
    if changed:
        arr[3, 4, 1] ^= 1  # one bit of one pixel
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _partition(pid: str, mode: str, sims: list[float], pngs: list[bytes]) -> dict:
    rows = [
        {
            "prompt_id": pid,
            "sample_index": k,
            "seed": 100 + k,
            "amg_mode": mode,
            "similarity": s,
            "similarity_kind": "sscd",
            "matched_row": 0,
            "matched_key": f"key-{pid}",
            "matched_caption": None,
            "matched_caption_count": 1,
            "memorized": s > 0.5,
            "in_clique": False,
            "amg_fired": mode == "on" or None,
            "amg_fired_steps": None,
            "seconds": 0.1,
        }
        for k, s in enumerate(sims)
    ]
    clique = {"clique": [], "required": 2, "median_distance": None, "flagged": False}
    return {"rows": rows, "images": pngs, "clique": clique}


def _audit_run(tmp_path: Path, generic: int = 1) -> tuple[AuditConfig, RunStore, dict, list[dict]]:
    """A run folder as the runner leaves it: 'planted' copied without AMG, changed with it; 'generic'
    prompts not copied, where AMG leaves seed 0 bit-identical (re-encoded: other PNG bytes, same pixels)
    and changes one bit of seed 1."""
    listing = tmp_path / "prompts.txt"
    listing.write_text("x\n")
    cfg = AuditConfig(bundle=str(tmp_path / "no-bundle"), prompts=str(listing), out=str(tmp_path / "out"))
    store = RunStore(tmp_path / "out", "run1")
    markers: dict = {}

    def commit(name, marker):
        markers[name] = marker

    work = {"planted": ([0.93, 0.97], [0.2, 0.25], [_image(10), _image(20)], [_image(30), _image(40)])}
    for i in range(generic):
        off = [_image(100 + i), _image(150 + i)]
        on = [_image(100 + i, compress_level=1), _image(150 + i, changed=True)]
        work[f"generic{i}"] = ([0.1, 0.2 + 0.01 * i], [0.1, 0.2 + 0.01 * i], off, on)
    for pid, (sims_off, sims_on, off, on) in work.items():
        result = {
            "prompt_id": pid,
            "wen": {"wen_score": 1.0, "skipped": False},
            "modes": {"off": _partition(pid, "off", sims_off, off), "on": _partition(pid, "on", sims_on, on)},
        }
        store.write(result, commit)
    prompts = [{"prompt_id": pid, "prompt": f"a prompt {pid}", "occurrences": 1} for pid in work]
    return cfg, store, markers, prompts


def _aggregate(cfg, store, markers, prompts, modes=("off", "on")) -> dict:
    identity = {"detection": {"memorized_threshold": 0.5}, "descriptor_checksum": None, "amg_on": {}}
    return aggregate(cfg, store, markers, prompts, modes, identity, Path("model"), "b" * 64, "m" * 64)


def test_amg_on_samples_are_marked_identical_to_amg_off_by_their_pixels(tmp_path: Path):
    cfg, store, markers, prompts = _audit_run(tmp_path)
    summary = _aggregate(cfg, store, markers, prompts)
    out = store.out
    # results.parquet: identical_to_off on AMG-on rows only; the re-encoded seed 0 is identical.
    rows = pq.read_table(out / "results.parquet").to_pylist()
    marks = {(r["prompt_id"], r["amg_mode"], r["sample_index"]): r["identical_to_off"] for r in rows}
    assert marks == {
        ("planted", "off", 0): None,
        ("planted", "off", 1): None,
        ("planted", "on", 0): False,
        ("planted", "on", 1): False,
        ("generic0", "off", 0): None,
        ("generic0", "off", 1): None,
        ("generic0", "on", 0): True,
        ("generic0", "on", 1): False,
    }
    assert all(len(r["pixel_sha256"]) == 64 for r in rows)
    prompt_rows = {p["prompt_id"]: p for p in pq.read_table(out / "prompts.parquet").to_pylist()}
    assert prompt_rows["planted"]["on_n_identical_to_off"] == 0
    assert prompt_rows["generic0"]["on_n_identical_to_off"] == 1
    assert prompt_rows["planted"]["off_flagged"] and not prompt_rows["generic0"]["off_flagged"]
    on = summary["on"]
    assert (on["n_compared_to_off"], on["n_identical_to_off"], on["frac_identical_to_off"]) == (4, 1, 0.25)
    assert "frac_identical_to_off" not in summary["off"]

    html = (out / "report.html").read_text()
    assert "Identical to AMG off: <b>25.0%</b> of samples (1 of 4)" in html
    flagged = _blocks(_section(html, 'id="flagged"', 'id="unflagged"'))
    clean = _blocks(_section(html, 'id="unflagged"', "<h2>Provenance"))
    assert set(flagged) == {"planted"} and set(clean) == {"generic0"}
    assert "0 of 2 samples unchanged by AMG" in flagged["planted"]
    assert "1 of 2 samples unchanged by AMG" in clean["generic0"]
    # The AMG-on strip of 'generic0': seed 0 marked identical, seed 1 (one bit apart) changed.
    on_strip = clean["generic0"].split("AMG on —", 1)[1]
    assert re.findall(r'class="(same|changed)"', on_strip) == ["same", "changed"]
    assert re.findall(r'class="(same|changed)"', flagged["planted"]) == ["changed", "changed"]
    # Both prompts' images are in the page, for the unflagged one as well (no training images here).
    assert html.count("data:image/png;base64,") == 2 * 2 * 2


def test_identity_is_left_out_when_only_one_mode_ran(tmp_path: Path):
    cfg, store, markers, prompts = _audit_run(tmp_path)
    summary = _aggregate(cfg, store, markers, prompts, modes=("on",))
    assert summary["on"]["frac_identical_to_off"] is None and summary["on"]["n_compared_to_off"] == 0
    rows = pq.read_table(store.out / "results.parquet").to_pylist()
    assert rows and all(r["identical_to_off"] is None for r in rows)
    html = (store.out / "report.html").read_text()
    assert "unchanged by AMG" not in html and "Identical to AMG off" not in html
    assert 'class="same"' not in html and 'class="changed"' not in html
    off_only = _aggregate(
        cfg, store, {k: v for k, v in markers.items() if k.endswith("/off")}, prompts, ("off",)
    )
    assert "on" not in off_only and "unchanged by AMG" not in (store.out / "report.html").read_text()
    assert json.dumps(off_only)  # still plain JSON


def test_partitions_without_pixel_hashes_are_compared_from_their_images(tmp_path: Path):
    store = _audit_run(tmp_path)[1]
    per_mode = {m: store.read_rows("generic0", m) for m in ("off", "on")}
    for rows in per_mode.values():  # as written before the column existed
        for r in rows:
            r.pop("pixel_sha256")
    mark_identical(store, per_mode)
    assert [r["identical_to_off"] for r in per_mode["on"]] == [True, False]
    assert [r["identical_to_off"] for r in per_mode["off"]] == [None, None]
    (store.out / per_mode["off"][1]["image"]).unlink()  # a missing image: unknown, not "changed"
    for rows in per_mode.values():
        for r in rows:
            r["pixel_sha256"] = None
    mark_identical(store, per_mode)
    assert [r["identical_to_off"] for r in per_mode["on"]] == [True, None]


def test_the_report_writer_inlines_images_of_capped_unflagged_prompts_only(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(report_module, "MAX_UNFLAGGED_SHOWN", 2)
    cfg, store, markers, prompts = _audit_run(tmp_path, generic=5)
    _aggregate(cfg, store, markers, prompts)
    html = (store.out / "report.html").read_text()
    clean = _blocks(_section(html, 'id="unflagged"', "<h2>Provenance"))
    assert "Prompts not flagged (2 of 5 shown)" in html and list(clean) == ["generic4", "generic3"]
    assert html.count("data:image/png;base64,") == (1 + 2) * 2 * 2  # 'planted' and 2 others, 2 seeds x 2
    assert partition_name("generic0", "on") in markers
