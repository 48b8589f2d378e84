"""The demo dataset: deterministic, planted relationships as recorded, and it survives download + ingest."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from demo import data as demo_data
from demo.data import (
    DONE_DIR,
    IMAGES_DIR,
    STOCK_SUFFIXES,
    TEMPLATE_CAPTION,
    TRUTH,
    URLS,
    URLS_RELATIVE,
    download_demo,
    make_demo_data,
    write_url_list,
)
from pipeline.core.config import DemoConfig, DownloadConfig, IngestConfig
from pipeline.ingest.ingest import run_ingest


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pd.DataFrame]:
    """The default demo dataset, made once: (folder, summary, truth)."""
    out = tmp_path_factory.mktemp("demo")
    summary = make_demo_data(DemoConfig(out=str(out)))
    return out, summary, pq.read_table(out / TRUTH).to_pandas()


def signature(path: Path, side: int = 16) -> np.ndarray:
    """Brightness-independent look of an image: a tiny gray thumbnail, centred and unit-length."""
    pixels = np.asarray(Image.open(path).convert("L").resize((side, side), Image.Resampling.BOX), np.float64)
    flat = pixels.ravel() - pixels.mean()
    return flat / (np.linalg.norm(flat) + 1e-9)


def file_tree(folder: Path) -> dict[str, bytes]:
    """The dataset's files (not the step's done marker, which records where and when it ran)."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and DONE_DIR not in p.relative_to(folder).parts
    )
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_same_seed_gives_byte_identical_files(demo, tmp_path: Path):
    out, _, _ = demo
    make_demo_data(DemoConfig(out=str(tmp_path / "again")))
    assert file_tree(tmp_path / "again") == file_tree(out)
    make_demo_data(DemoConfig(out=str(tmp_path / "other"), seed=1))
    assert (tmp_path / "other" / TRUTH).read_bytes() != (out / TRUTH).read_bytes()


def test_a_rerun_keeps_the_dataset_unless_a_file_or_an_option_changed(tmp_path: Path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), image_size=32)
    assert make_demo_data(cfg)["skipped"] is False
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.is_file()}
    again = make_demo_data(cfg)
    assert again["skipped"] is True and again["rows"] > 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    (tmp_path / "demo" / TRUTH).unlink()
    assert make_demo_data(cfg)["skipped"] is False and (tmp_path / "demo" / TRUTH).is_file()
    assert make_demo_data(dataclasses.replace(cfg, seed=1))["skipped"] is False


def test_planted_counts(demo):
    out, summary, truth = demo
    cfg = DemoConfig()
    unique = (
        len(demo_data.VERBATIM_PHOTOS)
        - cfg.verbatim_images
        + len(demo_data.NEAR_DUPLICATE_PHOTOS)
        - cfg.near_duplicate_bases
        + len(demo_data.TEMPLATE_PHOTOS)
        - cfg.template_images
        + len(demo_data.UNIQUE_PHOTOS)
    )
    expected = {
        "verbatim": cfg.verbatim_images * cfg.verbatim_copies,
        "near_duplicate": cfg.near_duplicate_bases * 5,
        "template": cfg.template_images,
        "hard_negative": 5,
        "broken": 4,
        "unique": unique,
    }
    assert summary["kinds"] == expected == dict(Counter(truth["demo_kind"]))
    assert 120 <= len(truth) <= 200 and summary["rows"] == len(truth)
    assert summary["distinct_images"] >= 40
    assert summary["expect_ok"] == int(truth["expect_ok"].sum()) == len(truth) - 4
    assert (truth["url"] == [f"{i:04d}.jpg" for i in range(len(truth))]).all()
    relative = pq.read_table(out / URLS_RELATIVE).to_pandas()
    assert list(relative.columns) == ["url", "caption", "demo_kind", "demo_group"]
    assert relative.equals(truth[relative.columns])


def test_counts_follow_the_config(tmp_path: Path):
    cfg = DemoConfig(
        out=str(tmp_path),
        verbatim_images=2,
        verbatim_copies=3,
        near_duplicate_bases=2,
        template_images=3,
        image_size=64,
    )
    kinds = make_demo_data(cfg)["kinds"]
    assert (kinds["verbatim"], kinds["near_duplicate"], kinds["template"]) == (6, 10, 3)
    assert Image.open(next((tmp_path / IMAGES_DIR).iterdir())).size == (64, 64)
    with pytest.raises(ValueError, match="template_images"):
        make_demo_data(dataclasses.replace(cfg, template_images=99))


def test_every_served_file_matches_its_row(demo):
    out, _, truth = demo
    files = {p.name: p.read_bytes() for p in (out / IMAGES_DIR).iterdir()}
    for row in truth.itertuples():
        if row.variant == "missing_file":
            assert row.url not in files and row.sha256 is None
            continue
        data = files[row.url]
        assert hashlib.sha256(data).hexdigest() == row.sha256
        if row.variant == "html_page":
            assert data.lstrip().lower().startswith((b"<!doctype html", b"<html"))
        else:
            image = Image.open(io.BytesIO(data))
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256))
    assert len(files) == len(truth) - 2


def test_verbatim_copies_are_byte_identical_with_identical_captions(demo):
    _, _, truth = demo
    verbatim = truth[truth["demo_kind"] == "verbatim"]
    groups = verbatim.groupby("demo_group")
    assert len(groups) == DemoConfig().verbatim_images
    for _, rows in groups:
        assert rows["sha256"].nunique() == 1 and rows["caption"].nunique() == 1
        assert rows["url"].is_unique and len(rows) == DemoConfig().verbatim_copies
    assert verbatim.drop_duplicates("demo_group")["sha256"].is_unique
    others = truth[truth["demo_kind"] != "verbatim"]
    assert not set(verbatim["sha256"]) & set(others["sha256"].dropna())


def test_near_duplicates_differ_in_bytes_but_look_like_their_original(demo):
    out, _, truth = demo
    ok = truth[truth["expect_ok"]].drop_duplicates("sha256")
    originals = ok[ok["variant"] == "original"]
    looks = {row.url: signature(out / IMAGES_DIR / row.url) for row in ok.itertuples()}
    copies = ok[(ok["demo_kind"] == "near_duplicate") & (ok["variant"] != "original")]
    assert len(copies) == DemoConfig().near_duplicate_bases * 4
    for copy in copies.itertuples():
        own = originals[originals["demo_group"] == copy.demo_group].iloc[0]
        assert copy.sha256 != own.sha256
        similarity = {o.url: float(looks[o.url] @ looks[copy.url]) for o in originals.itertuples()}
        best = max(similarity, key=similarity.get)
        runner_up = sorted(similarity.values())[-2]
        assert best == own.url, f"{copy.variant} of {copy.source} looks most like {best}"
        assert similarity[best] > 0.6 and similarity[best] - runner_up > 0.15


def test_no_unplanned_duplicates(demo):
    """Pictures of different groups neither share bytes nor look alike."""
    out, _, truth = demo
    ok = truth[truth["expect_ok"]].drop_duplicates("sha256")
    looks = [(row.demo_group, signature(out / IMAGES_DIR / row.url)) for row in ok.itertuples()]
    for (group_a, a), (group_b, b) in combinations(looks, 2):
        if group_a != group_b:
            assert float(a @ b) < 0.9, (group_a, group_b)


def test_captions_are_planted_as_recorded(demo):
    _, _, truth = demo
    own = truth[truth["caption_relation"] == "unique"]
    assert own["caption"].is_unique
    templates = truth[truth["caption_relation"] == "template"]
    assert (templates["caption"] == TEMPLATE_CAPTION).all() and templates["sha256"].is_unique
    assert len(templates) == DemoConfig().template_images

    def normalise(caption: str) -> str:
        for suffix in STOCK_SUFFIXES:
            caption = caption.removesuffix(suffix)
        return re.sub(r"[^\w\s]", "", caption).lower()

    for _, rows in truth[truth["caption_relation"].str.startswith("variant_")].groupby("demo_group"):
        source = rows[rows["caption_relation"] == "variant_source"]["caption"].iloc[0]
        variants = rows[rows["caption_relation"] != "variant_source"]["caption"]
        assert len(variants) == 4 and source not in set(variants) and variants.is_unique
        assert {normalise(v) for v in variants} == {normalise(source)}
    exact = truth[(truth["demo_kind"] == "near_duplicate") & (truth["caption_relation"] == "exact_duplicate")]
    assert len(exact) and all(
        len(g) == 5 and g["caption"].nunique() == 1 for _, g in exact.groupby("demo_group")
    )

    for _, rows in truth[truth["demo_kind"] == "hard_negative"].groupby("demo_group"):
        assert rows["sha256"].is_unique
        for a, b in combinations(rows["caption"].str.split(), 2):
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=False)) == 1


def test_write_url_list_prefixes_the_base_url(demo, tmp_path: Path):
    out, _, truth = demo
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / URLS_RELATIVE).write_bytes((out / URLS_RELATIVE).read_bytes())
    path = write_url_list(folder, "http://127.0.0.1:8123/")
    urls = pq.read_table(path).column("url").to_pylist()
    assert urls == [f"http://127.0.0.1:8123/{name}" for name in truth["url"]]


@pytest.mark.slow
def test_demo_downloads_and_ingests_with_every_row_accounted(tmp_path: Path, ray_local):
    """make -> download_demo (img2dataset on Ray, local HTTP) -> ingest on Ray: nothing is lost."""
    demo_dir = tmp_path / "demo"
    made = make_demo_data(DemoConfig(out=str(demo_dir)))
    truth = pq.read_table(demo_dir / TRUTH).to_pandas()
    download = DownloadConfig(timeout=5, distributor="ray", skip_reencode=True)
    summary = download_demo(demo_dir, download, samples_per_shard=DemoConfig().samples_per_shard)
    assert (summary["urls"], summary["successes"]) == (made["rows"], made["expect_ok"])
    assert summary["failures_by_kind"] == {"http_404": 2, "not_an_image": 2}
    assert summary["shards"] == -(-made["rows"] // DemoConfig().samples_per_shard)
    assert pq.read_table(demo_dir / URLS).column("url").to_pylist()[0].startswith("http://127.0.0.1:")

    ingest = run_ingest(IngestConfig(shards=str(demo_dir / "shards"), out=str(tmp_path / "ingest")))
    assert (ingest["rows_seen"], ingest["ok"], ingest["rejected"]) == (len(truth), made["expect_ok"], 4)
    assert ingest["rejected_by_reason"] == {"download_failed": 4}
    samples = pq.read_table(tmp_path / "ingest" / "samples.parquet").to_pandas()
    samples["url"] = samples["url"].str.rsplit("/", n=1).str[1]
    joined = samples.merge(truth, on="url", suffixes=("", "_truth"), validate="one_to_one")
    assert len(joined) == len(truth)
    assert ((joined["status"] == "ok") == joined["expect_ok"]).all()
    assert (joined["caption"] == joined["caption_truth"]).all()
    good = joined[joined["expect_ok"]]
    assert (good["sha256"] == good["sha256_truth"]).all()  # skip_reencode: the served bytes, unchanged
