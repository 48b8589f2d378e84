"""The audit report: self-contained HTML that renders offline in headless Chromium, with a working sort."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.audit.report import render_report
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
    assert html.count("data:image/png;base64,") == 1 + 2 * 4  # training image + 2 flagged prompts x 4 samples
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
