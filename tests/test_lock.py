"""One writer per output folder: the lease lock on ``OUT/.lock`` and the jobs that take it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import lock as lock_mod
from pipeline.core.lock import LOCK_NAME, OutputLockedError, OutputLockLostError, output_lock
from pipeline.core.storage import host_name

REPO = Path(__file__).resolve().parent.parent


def _stale_lock(
    folder: Path, *, age_s: float = 600.0, lease_s: float = 60.0, holder: str = "deadhost:4242:feed"
) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    beat = time.time() - age_s
    raw = json.dumps(
        {
            "holder": holder,
            "host": holder.split(":")[0],
            "pid": 4242,
            "job": "embed",
            "started": "2020-01-01T00:00:00+00:00",
            "heartbeat": "2020-01-01T00:00:00+00:00",
            "heartbeat_unix": beat,
            "lease_s": lease_s,
        }
    ).encode()
    (folder / LOCK_NAME).write_bytes(raw)
    return raw


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------
# Holding, refusing, releasing
# ------------------------------------------------------------------------------------------------


def test_lock_file_names_holder_job_and_times(tmp_path: Path):
    out = tmp_path / "new" / "out"  # created when missing
    with output_lock(out, job="ingest") as held:
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["holder"] == held.holder
        assert info["host"] == host_name() and info["pid"] == os.getpid()
        assert held.holder.startswith(f"{host_name()}:{os.getpid()}:")
        assert info["job"] == "ingest" and info["lease_s"] == 60.0
        assert info["started"] and info["heartbeat"] and abs(info["heartbeat_unix"] - time.time()) < 30
        (out / "result.json").write_text("{}")
    assert not (out / LOCK_NAME).exists()
    assert _leftovers(out) == []


def test_second_lock_is_refused_naming_the_holder(tmp_path: Path):
    with output_lock(tmp_path, job="audit") as held:
        with pytest.raises(OutputLockedError) as err, output_lock(tmp_path, job="audit"):
            pytest.fail("a second writer got the lock")
        message = str(err.value)
        assert held.holder in message and "audit" in message and str(tmp_path) in message
        assert "started" in message and "remove" in message and str(tmp_path / LOCK_NAME) in message
        assert "\n" not in message  # one line in the job's log
        assert isinstance(err.value, RuntimeError)
        assert (tmp_path / LOCK_NAME).exists()  # the refused run left the holder's lock alone
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_released_on_exception(tmp_path: Path):
    with pytest.raises(KeyError), output_lock(tmp_path, job="embed"):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with output_lock(tmp_path, job="embed"):  # and can be taken again
        pass


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path, caplog):
    with pytest.raises(OutputLockLostError, match="other:1:abc"), output_lock(tmp_path, job="embed"):
        _stale_lock(tmp_path, age_s=0, holder="other:1:abc")  # someone took it over meanwhile
    assert json.loads((tmp_path / LOCK_NAME).read_text())["holder"] == "other:1:abc"


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="output folder"), output_lock("", job="x"):
        pass
    with pytest.raises(ValueError, match="lease"), output_lock(tmp_path, job="x", lease_s=0):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises((NotADirectoryError, FileExistsError)), output_lock(tmp_path / "file", job="x"):
        pass


# ------------------------------------------------------------------------------------------------
# Lease: heartbeat and stale takeover
# ------------------------------------------------------------------------------------------------


def test_heartbeat_keeps_a_long_run_locked(tmp_path: Path):
    """A run that holds the lock for several leases stays the holder: its heartbeat renews it."""
    with output_lock(tmp_path, job="audit", lease_s=1.5) as held:
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat_unix"]
        time.sleep(2.0)  # longer than the lease: without heartbeats the lock would now be stale
        now = json.loads((tmp_path / LOCK_NAME).read_text())
        assert now["holder"] == held.holder and now["heartbeat_unix"] > first
        second = output_lock(tmp_path, job="audit", lease_s=1.5)
        with pytest.raises(OutputLockedError, match=held.holder), second:
            pass
    assert _leftovers(tmp_path) == []


def test_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog):
    _stale_lock(tmp_path, age_s=120, lease_s=60)
    caplog.set_level(logging.WARNING, logger="pipeline.core.lock")
    with output_lock(tmp_path, job="embed") as held:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["holder"] == held.holder
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "deadhost:4242:feed" in warning and "stale" in warning and "embed" in warning
    assert _leftovers(tmp_path) == []


def test_fresh_lock_of_another_host_is_respected(tmp_path: Path):
    _stale_lock(tmp_path, age_s=5, lease_s=60, holder="otherhost:7:beef")
    with pytest.raises(OutputLockedError, match="otherhost:7:beef"), output_lock(tmp_path, job="embed"):
        pass
    assert json.loads((tmp_path / LOCK_NAME).read_text())["holder"] == "otherhost:7:beef"


def test_unreadable_lock_is_held_until_its_lease_runs_out(tmp_path: Path):
    """An empty lock file is one being created (or a crash between create and write)."""
    path = tmp_path / LOCK_NAME
    path.write_bytes(b"")
    with pytest.raises(OutputLockedError, match="unreadable"), output_lock(tmp_path, job="embed"):
        pass
    old = time.time() - 120
    os.utime(path, (old, old))
    with output_lock(tmp_path, job="embed", lease_s=60):
        pass


def test_two_threads_racing_for_a_stale_lock_exactly_one_wins(tmp_path: Path):
    for round_ in range(25):
        folder = tmp_path / str(round_)
        _stale_lock(folder)
        barrier = threading.Barrier(2)
        both_tried = threading.Barrier(2, timeout=30)
        results: list[str] = []

        def contend(
            results: list[str] = results, barrier=barrier, both_tried=both_tried, folder=folder
        ) -> None:
            barrier.wait()
            try:
                with output_lock(folder, job="embed"):
                    results.append("won")
                    both_tried.wait()  # hold it until the other one has had its go
            except OutputLockedError:
                results.append("refused")
                both_tried.wait()

        threads = [threading.Thread(target=contend) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == ["refused", "won"], f"round {round_}: {results}"
        assert _leftovers(folder) == []


def test_takeover_never_removes_a_lock_that_just_became_fresh(tmp_path: Path, monkeypatch):
    """B judged the lock stale, but A took it over first: B moves A's fresh lock aside, sees it is not
    the stale file it judged, puts it back and is refused. A keeps the lock."""
    stale = _stale_lock(tmp_path)
    real_read = lock_mod._read_lock
    stale_snapshot = real_read(tmp_path / LOCK_NAME)
    with output_lock(tmp_path, job="embed") as a:
        fresh = (tmp_path / LOCK_NAME).read_bytes()
        assert fresh != stale
        calls = iter([stale_snapshot])  # B's first look sees the stale lock of before
        monkeypatch.setattr(lock_mod, "_read_lock", lambda path: next(calls, None) or real_read(path))
        with pytest.raises(OutputLockedError, match=a.holder), output_lock(tmp_path, job="embed"):
            pytest.fail("B took over a live lock")
        monkeypatch.setattr(lock_mod, "_read_lock", real_read)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["holder"] == a.holder
    assert _leftovers(tmp_path) == []


def test_vanished_lock_file_is_recreated_by_the_heartbeat(tmp_path: Path):
    """img2dataset's overwrite mode deletes and re-creates the output folder under a running download."""
    with output_lock(tmp_path, job="download", lease_s=0.3) as held:
        (tmp_path / LOCK_NAME).unlink()
        deadline, holder = time.monotonic() + 10, None
        while holder is None and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                holder = json.loads((tmp_path / LOCK_NAME).read_text())["holder"]
            except (OSError, ValueError):
                continue
        assert holder == held.holder
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------
# Jobs: every job that writes an output folder takes the lock; a second run is refused
# ------------------------------------------------------------------------------------------------

LOCKED_JOBS = [
    "ingest",
    "embed",
    "dedup_images",
    "dedup_captions",
    "build_index",
    "build_artifacts",
    "apply_dedup",
    "audit",
    "download",
    "demo",
    "make_demo_data",
    "evaluate_amg",
]


@pytest.mark.parametrize("job", LOCKED_JOBS)
def test_every_writing_job_takes_the_output_lock(job: str):
    source = (REPO / "jobs" / f"{job}.py").read_text()
    assert "from pipeline.core.lock import output_lock" in source
    assert f'job="{job}"' in source


def _caption_input(tmp_path: Path) -> Path:
    path = tmp_path / "meta.parquet"
    pq.write_table(
        pa.table({"key": ["a", "b", "c"], "TEXT": ["a red car", "a red car", "a blue boat"]}), path
    )
    return path


def _run_caption_job(source: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "dedup_captions.py"),
        "--input",
        str(source),
        "--out",
        str(out),
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_second_job_on_a_locked_out_is_refused(tmp_path: Path):
    """A real second process: the job exits 3 with one clear line naming the holder, writes nothing,
    and leaves the holder's lock in place; once released, the same command succeeds."""
    source, out = _caption_input(tmp_path), tmp_path / "out"
    with output_lock(out, job="dedup_captions") as held:
        proc = _run_caption_job(source, out)
        assert proc.returncode == 3, proc.stderr
        assert held.holder in proc.stderr and "dedup_captions" in proc.stderr and str(out) in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        assert json.loads((out / LOCK_NAME).read_text())["holder"] == held.holder
    proc = _run_caption_job(source, out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rows"] == 3
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_job_takes_over_the_lock_of_a_killed_run(tmp_path: Path):
    source, out = _caption_input(tmp_path), tmp_path / "out"
    _stale_lock(out, holder="killed-node:99:dead")
    proc = _run_caption_job(source, out)
    assert proc.returncode == 0, proc.stderr
    assert "killed-node:99:dead" in proc.stderr and "stale" in proc.stderr
    assert not (out / LOCK_NAME).exists()


def test_failed_run_leaves_no_folder_it_created(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError), output_lock(out, job="audit"):
        raise FileNotFoundError("no bundle")  # e.g. a job refused on its inputs, before writing anything
    assert not out.exists()
    (tmp_path / "kept").mkdir()
    with output_lock(tmp_path / "kept", job="audit"):
        pass
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays


def test_a_fresh_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path, caplog):
    """A killed run (SIGKILL: no release) on this machine: its pid is gone, so no need to wait the lease."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # a pid that has just exited
    _stale_lock(tmp_path, age_s=1, lease_s=600, holder=f"{host_name()}:{pid}:dead")
    lock = json.loads((tmp_path / LOCK_NAME).read_text())
    (tmp_path / LOCK_NAME).write_text(json.dumps({**lock, "pid": pid}))
    caplog.set_level(logging.WARNING, logger="pipeline.core.lock")
    with output_lock(tmp_path, job="embed") as held:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["holder"] == held.holder
    # A live process of this host keeps its lock for its lease.
    _stale_lock(tmp_path, age_s=1, lease_s=600, holder=f"{host_name()}:{os.getppid()}:alive")
    lock = json.loads((tmp_path / LOCK_NAME).read_text())
    (tmp_path / LOCK_NAME).write_text(json.dumps({**lock, "pid": os.getppid()}))
    with pytest.raises(OutputLockedError, match="alive"), output_lock(tmp_path, job="embed"):
        pass
