"""Downloads with the real img2dataset from a real HTTP server on 127.0.0.1: every URL is accounted for.

The server misbehaves like real image hosts (404s, a path slower than the client's timeout, an HTML
error page sent with status 200), and counts requests, so a resumed run can be shown to fetch nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo.http_server import LocalHTTPServer, serve_directory
from fixtures.shard_factory import encode, random_photo
from pipeline.core.config import DownloadConfig
from pipeline.download.downloader import (
    CONSOLE_LOG,
    DONE_DIR,
    error_kind,
    inspect_url_list,
    run_download,
    validate,
)
from pipeline.io.shards import READ_DOWNLOAD_FAILED, list_shards, read_shard

HTML_PAGE = b"<!DOCTYPE html><html><body><h1>Image not found</h1></body></html>"


def make_images(folder: Path, count: int, prefix: str = "photo") -> list[str]:
    """``count`` small real images (JPEG, and one PNG) in ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        fmt, ext = ("PNG", "png") if i == count - 1 else ("JPEG", "jpg")
        name = f"{prefix}_{i}.{ext}"
        (folder / name).write_bytes(encode(random_photo(100 + i, size=(96, 72)), fmt))
        names.append(name)
    return names


def shard_rows(out: Path) -> list[dict[str, Any]]:
    """img2dataset's parquet rows of every shard in ``out``."""
    return [row for shard in list_shards(out) for row in pq.read_table(shard.parquet).to_pylist()]


def read_all(out: Path) -> list[dict[str, Any]]:
    """What the ingest reader sees: one raw row per sample or failed URL, over every shard."""
    return [row for shard in list_shards(out) for row in read_shard(shard)]


def download(url_list: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"timeout": 1, "thread_count": 4, **overrides}
    cfg = DownloadConfig(url_list=str(url_list), out=str(out), **settings)
    return run_download(cfg)


@dataclass(frozen=True)
class Scenario:
    server: LocalHTTPServer
    rows: list[dict[str, Any]]  # the URL list's rows
    expected: dict[str, str]  # url -> "success" or the expected failure kind
    served: Path
    url_list: Path
    out: Path
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    """A parquet URL list of good images, 404s, a timeout and an HTML page, downloaded once."""
    root = tmp_path_factory.mktemp("download")
    served = root / "served"
    good = make_images(served, 5)
    (served / "slow.jpg").write_bytes(encode(random_photo(1)))
    with LocalHTTPServer(
        served, slow_paths={"slow.jpg"}, slow_seconds=4, canned={"page.jpg": (200, HTML_PAGE)}
    ) as server:
        expected = {server.url(name): "success" for name in good}
        expected |= {server.url("gone_1.jpg"): "http_404", server.url("gone_2.jpg"): "http_404"}
        expected |= {server.url("slow.jpg"): "timeout", server.url("page.jpg"): "not_an_image"}
        rows = [
            {
                "url": url,
                "caption": f"caption {i}, with a comma",
                "row_id": i,
                "tags": [i, i + 1],
                "blob": b"x",
            }
            for i, url in enumerate(expected)
        ]
        url_list = root / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), url_list)
        out = root / "shards"
        summary = download(url_list, out, number_sample_per_shard=4)
        yield Scenario(server, rows, expected, served, url_list, out, summary)


@pytest.mark.slow
def test_summary_counts_successes_and_failures_by_kind(scenario: Scenario):
    s = scenario.summary
    assert (s["urls"], s["successes"], s["failures"]) == (9, 5, 4)
    assert s["failures_by_kind"] == {"http_404": 2, "not_an_image": 1, "timeout": 1}
    assert (s["failed_to_download"], s["failed_to_resize"]) == (3, 1)
    assert (s["shards"], s["shards_downloaded"], s["shards_skipped"], s["incomplete_shards"]) == (3, 3, 0, [])
    assert (s["input_format"], s["url_col"], s["caption_col"]) == ("parquet", "url", "caption")
    assert sorted(p.name for p in scenario.out.iterdir()) == sorted(
        [".download"] + [f"{n:05d}{ext}" for n in range(3) for ext in (".tar", ".parquet", "_stats.json")]
    )


@pytest.mark.slow
def test_every_failed_url_is_in_the_shard_parquet_with_its_error(scenario: Scenario):
    by_url = {row["url"]: row for row in shard_rows(scenario.out)}
    assert set(by_url) == set(scenario.expected)
    for url, kind in scenario.expected.items():
        row = by_url[url]
        if kind == "success":
            assert row["status"] == "success" and row["error_message"] is None
            name = url.rsplit("/", 1)[1]
            assert row["sha256"] == hashlib.sha256((scenario.served / name).read_bytes()).hexdigest()
            assert (row["original_width"], row["original_height"]) == (96, 72)
        else:
            assert row["status"] != "success"
            assert row["error_message"] and error_kind(row["error_message"]) == kind
    statuses = Counter(row["status"] for row in by_url.values())
    assert statuses == {"success": 5, "failed_to_download": 3, "failed_to_resize": 1}


@pytest.mark.slow
def test_other_plain_columns_are_kept(scenario: Scenario):
    row = shard_rows(scenario.out)[0]
    assert "row_id" in row and "tags" in row
    assert "blob" not in row  # bytes cannot go into the samples' JSON, so it is left out
    by_url = {r["url"]: r for r in shard_rows(scenario.out)}
    for source in scenario.rows:
        assert by_url[source["url"]]["row_id"] == source["row_id"]
        assert by_url[source["url"]]["caption"] == source["caption"]


@pytest.mark.slow
def test_the_shard_reader_accounts_for_every_input_url(scenario: Scenario):
    rows = read_all(scenario.out)
    samples = [r for r in rows if r["read_error"] is None]
    failed = [r for r in rows if r["read_error"] is not None]
    assert len(samples) + len(failed) == len(scenario.rows)
    assert {r["url"] for r in rows} == set(scenario.expected)
    assert all(scenario.expected[r["url"]] == "success" and r["image"] for r in samples)
    assert all(r["read_error"].startswith(READ_DOWNLOAD_FAILED) for r in failed)
    captions = {r["url"]: r["caption"] for r in scenario.rows}
    assert all(r["caption"] == captions[r["url"]] for r in rows)


@pytest.mark.slow
def test_a_rerun_downloads_nothing(scenario: Scenario):
    requests_before = scenario.server.request_count()
    files_before = {p.name: p.stat().st_mtime_ns for p in scenario.out.iterdir()}
    again = download(scenario.url_list, scenario.out, number_sample_per_shard=4)
    assert scenario.server.request_count() == requests_before
    assert {p.name: p.stat().st_mtime_ns for p in scenario.out.iterdir()} == files_before
    assert (again["shards_downloaded"], again["shards_skipped"], again["up_to_date"]) == (0, 3, True)
    skip = ("shards_downloaded", "shards_skipped", "seconds", "up_to_date")
    assert {k: v for k, v in again.items() if k not in skip} == {
        k: v for k, v in scenario.summary.items() if k not in skip
    }


@pytest.mark.slow
def test_a_lost_shard_or_a_changed_list_brings_img2dataset_back(
    scenario: Scenario, tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    """The done marker vouches for the shards it lists: one deleted is downloaded again, and a URL list
    rewritten since is handed to img2dataset again (whose incremental mode keeps finished shards).
    img2dataset's own console output goes to a log file, not to the job's console."""
    out = tmp_path / "shards"
    shutil.copytree(scenario.out, out)
    for suffix in (".tar", ".parquet", "_stats.json"):
        (out / f"00001{suffix}").unlink()
    requests_before = scenario.server.request_count()
    capfd.readouterr()
    again = download(scenario.url_list, out, number_sample_per_shard=4)
    assert (again["up_to_date"], again["shards_downloaded"], again["successes"]) == (False, 1, 5)
    assert scenario.server.request_count() > requests_before
    console = capfd.readouterr()
    assert "Downloading starting now" not in console.out + console.err
    assert "Downloading starting now" in (out / DONE_DIR / CONSOLE_LOG).read_text()
    assert download(scenario.url_list, out, number_sample_per_shard=4)["up_to_date"] is True
    os.utime(scenario.url_list)  # rewritten: same name, new mtime
    touched = download(scenario.url_list, out, number_sample_per_shard=4)
    assert (touched["up_to_date"], touched["shards_downloaded"]) == (False, 0)


@pytest.fixture
def real_photos(request: pytest.FixtureRequest) -> list[Path]:
    """img2dataset's own test photographs from ../shared (via ``shared_data``), or none where it is absent."""
    try:
        shared: Path = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        return []
    return sorted((shared / "peer_samples" / "img2dataset").glob("*.jpg"))


@pytest.mark.slow
def test_csv_with_laion_column_names_and_real_photographs(tmp_path: Path, real_photos: list[Path]):
    """LAION's URL/TEXT header in a CSV; real photographs (where present) arrive byte-for-byte."""
    served = tmp_path / "served"
    names = make_images(served, 2)
    for photo in real_photos:
        (served / photo.name).write_bytes(photo.read_bytes())
        names.append(photo.name)
    with LocalHTTPServer(served) as server:
        urls = [server.url(n) for n in [*names, "missing.jpg"]]
        captions = ['A "quoted", comma-separated caption'] + [f"caption {i}" for i in range(1, len(urls))]
        lines = ["URL,TEXT,similarity"] + [
            f'{u},"{c.replace(chr(34), chr(34) * 2)}",{i / 100}'
            for i, (u, c) in enumerate(zip(urls, captions, strict=False))
        ]
        (tmp_path / "laion.csv").write_text("\n".join(lines) + "\n")
        summary = download(tmp_path / "laion.csv", tmp_path / "out", skip_reencode=True)
    assert (summary["input_format"], summary["url_col"], summary["caption_col"]) == ("csv", "URL", "TEXT")
    assert (summary["successes"], summary["failures_by_kind"]) == (len(names), {"http_404": 1})
    rows = read_all(tmp_path / "out")
    assert {r["url"]: r["caption"] for r in rows} == dict(zip(urls, captions, strict=False))
    stored = {r["url"].rsplit("/", 1)[1]: r["image"] for r in rows if r["read_error"] is None}
    # No resize is needed, so JPEGs are stored as downloaded; the PNG is re-encoded to the shards' JPEG.
    assert {n: b for n, b in stored.items() if n.endswith(".jpg")} == {
        n: (served / n).read_bytes() for n in names if n.endswith(".jpg")
    }
    assert [b[:2] for n, b in stored.items() if n.endswith(".png")] == [b"\xff\xd8"]
    assert sorted(r["similarity"] for r in shard_rows(tmp_path / "out")) == [
        i / 100 for i in range(len(urls))
    ]


@pytest.mark.slow
def test_jsonl_with_image_url_column(tmp_path: Path):
    names = make_images(tmp_path / "served", 2)
    with LocalHTTPServer(tmp_path / "served", canned={"error.jpg": (200, HTML_PAGE)}) as server:
        urls = [server.url(n) for n in names] + [server.url("error.jpg")]
        # "width" is a column img2dataset writes itself, so it is not kept from the input.
        records = [{"image_url": u, "text": f"jsonl caption {i}", "width": 5} for i, u in enumerate(urls)]
        (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = download(tmp_path / "urls.jsonl", tmp_path / "out")
    assert (summary["input_format"], summary["url_col"], summary["caption_col"]) == (
        "jsonl",
        "image_url",
        "text",
    )
    assert (summary["urls"], summary["successes"], summary["failures_by_kind"]) == (3, 2, {"not_an_image": 1})
    assert {r["url"]: r["caption"] for r in read_all(tmp_path / "out")} == {
        r["image_url"]: r["text"] for r in records
    }


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_laion_metadata_offline_fails_every_row_cleanly(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
):
    """Real LAION rows (public URLs) with every request sent to a closed local proxy port.

    The proxy guarantees that no request leaves this machine, wherever the test runs; each URL
    fails at once with "connection refused" and must still be accounted for.
    """
    table = pq.read_table(shared_data / "peer_samples" / "img2dataset" / "test_1000.parquet").slice(0, 20)
    pq.write_table(table, tmp_path / "laion.parquet")
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    summary = download(tmp_path / "laion.parquet", tmp_path / "out", thread_count=8)
    assert time.monotonic() - started < 60
    assert (summary["url_col"], summary["caption_col"]) == ("URL", "TEXT")
    assert (summary["urls"], summary["successes"], summary["failures"]) == (20, 0, 20)
    assert summary["failures_by_kind"] == {"connection_refused": 20}
    rows = read_all(tmp_path / "out")
    assert len(rows) == 20 and all(r["read_error"].startswith(READ_DOWNLOAD_FAILED) for r in rows)
    assert {r["url"]: r["caption"] for r in rows} == dict(
        zip(table.column("URL").to_pylist(), table.column("TEXT").to_pylist(), strict=False)
    )


def test_column_detection_and_clear_errors(tmp_path: Path):
    def layout(name: str, text: str, **cfg: Any):
        path = tmp_path / name
        path.write_text(text)
        return inspect_url_list(DownloadConfig(url_list=str(path), out=str(tmp_path / "out"), **cfg))

    found = layout("a.tsv", "Image_URL\tAlt\tscore\nhttp://x/1.jpg\thello\t1\n")
    assert (found.input_format, found.url_col, found.caption_col, found.extra_columns) == (
        "tsv",
        "Image_URL",
        "Alt",
        ("score",),
    )
    assert layout("b.csv", "link,words\nhttp://x/1.jpg,hi\n", caption_col="words").caption_col == "words"
    assert layout("c.csv", "url,TEXT,keep,drop\nhttp://x,hi,1,2\n", extra_columns="keep").extra_columns == (
        "keep",
    )
    with pytest.raises(ValueError, match=r"no URL column found.*columns: address, words"):
        layout("d.csv", "address,words\nhttp://x/1.jpg,hi\n")
    with pytest.raises(ValueError, match=r"several url columns \(url, URL\)"):
        layout("e.csv", "url,URL\nhttp://x,http://y\n")
    with pytest.raises(ValueError, match=r"url column 'href' is not in"):
        layout("f.csv", "url,caption\nhttp://x,hi\n", url_col="href")
    with pytest.raises(ValueError, match=r"cannot rename"):
        layout("g.csv", "url,link,caption\nhttp://x,http://y,hi\n", url_col="link")
    with pytest.raises(ValueError, match=r"cannot tell the format"):
        layout("h.dat", "http://x\n")
    plain = layout("i.txt", "http://x/1.jpg\nhttp://x/2.jpg\n")
    assert (plain.input_format, plain.url_col, plain.caption_col, plain.extra_columns) == (
        "txt",
        "url",
        None,
        (),
    )
    with pytest.raises(ValueError, match=r"no columns to choose"):
        layout("j.txt", "http://x\n", caption_col="caption")


def test_folder_inputs_and_bad_configs(tmp_path: Path):
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"URL": [f"http://x/{i}.jpg"], "TEXT": ["t"]}), parts / f"part-{i}.parquet")
    found = inspect_url_list(DownloadConfig(url_list=str(parts), out=str(tmp_path / "out")))
    assert (found.input_format, found.url_col, found.caption_col) == ("parquet", "URL", "TEXT")
    (parts / "notes.csv").write_text("url\nhttp://x\n")
    with pytest.raises(ValueError, match=r"several formats"):
        inspect_url_list(DownloadConfig(url_list=str(parts), out=str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError):
        inspect_url_list(DownloadConfig(url_list=str(tmp_path / "absent.parquet"), out=str(tmp_path / "out")))

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    base = DownloadConfig(url_list=str(parts), out=str(out))
    with pytest.raises(ValueError, match=r"manifest.json"):
        validate(base)
    for change, message in (
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"encode_format": "png"}, "compression level"),
        ({"timeout": 0}, "timeout"),
        ({"incremental_mode": "resume"}, "incremental_mode"),
        ({"input_format": "xml"}, "input_format"),
    ):
        with pytest.raises(ValueError, match=message):
            validate(DownloadConfig(url_list=str(parts), out=str(tmp_path / "fresh"), **change))


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("HTTP Error 404: File not found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("timed out", "timeout"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns"),
        ("<urlopen error [Errno -3] Temporary failure in name resolution>", "dns"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("Image decoding error", "not_an_image"),
        ("something new", "other"),
    ],
)
def test_error_kinds(message: str, kind: str):
    assert error_kind(message) == kind


@pytest.mark.slow
def test_http_server_files_canned_pages_slow_paths_and_counts(tmp_path: Path):
    (tmp_path / "a b.jpg").write_bytes(b"image bytes")
    with LocalHTTPServer(
        tmp_path,
        slow_paths={"slow.jpg"},
        slow_seconds=30,
        canned={"/page.jpg": (200, HTML_PAGE), "teapot": (418, b"no")},
    ) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url("a b.jpg"), timeout=5) as response:
            assert response.read() == b"image bytes"
        with urllib.request.urlopen(f"{server.base_url}/page.jpg?size=large", timeout=5) as response:
            assert (response.status, response.read()) == (200, HTML_PAGE)
            assert response.headers["Content-Type"].startswith("text/html")
        for path, code in (("missing.jpg", 404), ("teapot", 418)):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(server.url(path), timeout=5)
            assert error.value.code == code
        with pytest.raises(OSError, match="timed out"):
            urllib.request.urlopen(server.url("slow.jpg"), timeout=0.5)
        started = time.monotonic()
    assert time.monotonic() - started < 5  # the 30 s slow request is woken, not waited for
    assert (server.request_count(), server.request_count("a b.jpg"), server.request_count("page.jpg")) == (
        5,
        1,
        1,
    )
    with serve_directory(tmp_path) as base_url, urllib.request.urlopen(f"{base_url}/a%20b.jpg") as response:
        assert response.read() == b"image bytes"
    with pytest.raises(FileNotFoundError):
        LocalHTTPServer(tmp_path / "absent")
