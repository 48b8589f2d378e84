"""One writer per output folder: an exclusive lock with a lease on ``OUT/.lock``.

Every job that writes an output folder holds :func:`output_lock` on it for the whole run. The lock
file is created atomically (``O_CREAT | O_EXCL``) and holds JSON: the holder id (host, PID and a
random token), the job, when it started, its last heartbeat and its lease. A daemon thread renews the
heartbeat every ``lease_s / 3`` seconds. A second run on the same folder finds a heartbeat younger
than the lease and stops with :class:`OutputLockedError`, naming the holder. A lock whose heartbeat
is older than its lease belongs to a run that was killed (or whose node was lost): it is taken over
with a warning. Taking over moves the stale file aside under a unique name, checks that the moved
file is the stale one (not a lock another taker has just created, which it then puts back), and
only then creates a new lock with ``O_EXCL``, so two takers cannot both win.

Staleness compares the holder's recorded wall-clock heartbeat with this machine's clock, so hosts
sharing a volume need clocks that agree to well within a lease (NTP does). The lock file's name starts
with a dot, so bundle manifests, caption inputs and tree checksums skip it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.storage import atomic_write_bytes, fsync_dir, host_name, unique_tmp_path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
DEFAULT_LEASE_S = 60.0
_MAX_ATTEMPTS = 20


class OutputLockedError(RuntimeError):
    """Another run holds the output folder (its lease has not run out)."""


class OutputLockLostError(OutputLockedError):
    """The lock was taken from this run while it held it (its heartbeat stalled for a whole lease)."""


@dataclass(frozen=True)
class _Snapshot:
    """One read of a lock file: its bytes and identity (to recognise it later) and its content."""

    raw: bytes
    ino: int
    dev: int
    mtime: float
    info: dict[str, Any] | None  # None: unreadable (being created, or cut off)

    def same_file(self, other: _Snapshot | None) -> bool:
        return other is not None and (self.ino, self.dev, self.raw) == (other.ino, other.dev, other.raw)

    @property
    def holder(self) -> str:
        return str(self.info.get("holder", "?")) if self.info else "unknown (lock file unreadable)"

    def lease(self, default: float) -> float:
        try:
            return float(self.info["lease_s"]) if self.info else default
        except (KeyError, TypeError, ValueError):
            return default

    def age(self, now: float) -> float:
        """Seconds since the last heartbeat (since the file was written when its content is unreadable)."""
        try:
            return now - float(self.info["heartbeat_unix"]) if self.info else now - self.mtime
        except (KeyError, TypeError, ValueError):
            return now - self.mtime

    def holder_died_here(self) -> bool:
        """Whether the holder ran on this host and its process is gone (a killed run): no need to wait
        for its lease. A reused pid only makes us wait for the lease, never take a live lock."""
        info = self.info or {}
        try:
            pid = int(info["pid"])
        except (KeyError, TypeError, ValueError):
            return False
        if info.get("host") != host_name() or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def describe(self, now: float, default_lease: float) -> str:
        info = self.info or {}
        return (
            f"holder {self.holder}, job {info.get('job', '?')}, started {info.get('started', '?')}, "
            f"last heartbeat {self.age(now):.0f}s ago, lease {self.lease(default_lease):.0f}s"
        )


def _read_lock(path: Path) -> _Snapshot | None:
    """The lock file as it is now, or None when there is none."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read(1 << 16)
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    return _Snapshot(raw, st.st_ino, st.st_dev, st.st_mtime, info if isinstance(info, dict) else None)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class OutputLock:
    """The lock on one output folder; use it through :func:`output_lock`."""

    def __init__(self, folder: str | Path, job: str, lease_s: float = DEFAULT_LEASE_S):
        if not str(folder):
            raise ValueError("no output folder to lock")
        if not lease_s > 0:
            raise ValueError(f"the lock's lease must be positive; got {lease_s}")
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.job = job
        self.lease_s = float(lease_s)
        self.holder = f"{host_name()}:{os.getpid()}:{secrets.token_hex(8)}"
        self.started = _iso(time.time())
        self.lost: str | None = None  # who took the lock from us, if anyone did
        self._made_folder = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- content ------------------------------------------------------------------------------

    def _content(self) -> bytes:
        now = time.time()
        info = {
            "holder": self.holder,
            "host": host_name(),
            "pid": os.getpid(),
            "job": self.job,
            "folder": str(self.folder.resolve()),
            "started": self.started,
            "heartbeat": _iso(now),
            "heartbeat_unix": now,
            "lease_s": self.lease_s,
        }
        return (json.dumps(info, indent=2) + "\n").encode()

    def _ours(self, snap: _Snapshot | None) -> bool:
        return snap is not None and snap.info is not None and snap.info.get("holder") == self.holder

    # -- acquire ------------------------------------------------------------------------------

    def acquire(self) -> None:
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(_MAX_ATTEMPTS):
            if self._create():
                self._thread = threading.Thread(
                    target=self._beat, name=f"lock-heartbeat:{self.path}", daemon=True
                )
                self._thread.start()
                return
            snap = _read_lock(self.path)
            if snap is None:  # released between our create and our read: try again
                continue
            now = time.time()
            if snap.age(now) <= snap.lease(self.lease_s) and not snap.holder_died_here():
                holder = snap.describe(now, self.lease_s)
                raise OutputLockedError(
                    f"output folder {self.folder} is in use by another run ({holder}). "
                    f"Wait for that run to finish; if that process is gone, remove {self.path} "
                    "(it is also taken over automatically once its heartbeat is older than its lease)"
                )
            self._take_over(snap, now)
        raise OutputLockedError(
            f"could not lock output folder {self.folder}: other runs kept taking and releasing {self.path}; "
            "make sure only one run writes this folder"
        )

    def _create(self) -> bool:
        """Create the lock file with our content, atomically; False when one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._content())
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        fsync_dir(self.folder)
        return True

    def _take_over(self, stale: _Snapshot, now: float) -> None:
        """Move the stale lock out of the way, unless it is no longer the file we judged stale."""
        aside = unique_tmp_path(self.path, "stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another taker moved it first
            return
        try:
            moved = _read_lock(aside)
            if stale.same_file(moved):
                log.warning(
                    "output folder %s: taking over the stale lock of %s; that run is presumed dead",
                    self.folder,
                    stale.describe(now, self.lease_s),
                )
                return
            # We moved a lock that changed since we judged it (a live holder's heartbeat, or another
            # taker's new lock): put it back. If yet another run created a lock meanwhile, the holder we
            # moved finds out at its next heartbeat and stops with OutputLockLostError.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                log.error(
                    "output folder %s: a lock moved aside could not be put back (%s)", self.folder, self.path
                )
            except OSError:  # no hard links on this filesystem
                if not self.path.exists():
                    os.rename(aside, self.path)
        finally:
            aside.unlink(missing_ok=True)

    # -- heartbeat ----------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._refresh()
            except Exception as exc:  # a full disk, a flaky mount: keep trying until the lease decides
                log.warning("output folder %s: could not renew the lock's heartbeat: %s", self.folder, exc)
            if self.lost:
                return

    def _refresh(self) -> None:
        snap = _read_lock(self.path)
        if snap is None:
            # The lock file vanished (img2dataset's overwrite mode deletes and re-creates its output
            # folder). Re-create it once the folder is back, unless another run got there first.
            if not self.folder.is_dir():
                return
            if self._create():
                log.warning("output folder %s: the lock file vanished; re-created it", self.folder)
                return
            snap = _read_lock(self.path)
            if snap is None:
                return
        if not self._ours(snap):
            self.lost = snap.describe(time.time(), self.lease_s)
            log.error(
                "output folder %s: this run (%s) lost its lock to %s; its outputs may mix both runs",
                self.folder,
                self.holder,
                self.lost,
            )
            return
        if not self._stop.is_set():
            atomic_write_bytes(self.path, self._content())

    # -- release ------------------------------------------------------------------------------

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.lease_s, 5.0))
        snap = _read_lock(self.path)
        if self._ours(snap):
            self.path.unlink(missing_ok=True)
            fsync_dir(self.folder)
            if self._made_folder:  # a run that failed before writing anything leaves no empty folder
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
        elif snap is not None and not self.lost:
            self.lost = snap.describe(time.time(), self.lease_s)
            log.error("output folder %s: the lock is now held by %s; leaving it", self.folder, self.lost)


@contextmanager
def output_lock(folder: str | Path, job: str, lease_s: float = DEFAULT_LEASE_S) -> Iterator[OutputLock]:
    """Hold the exclusive lock on ``folder`` (created when missing) for the ``with`` block.

    Raises:
        OutputLockedError: another run holds the folder; the message names it and says what to do.
        OutputLockLostError: (on leaving the block) another run took the lock over while this one held
            it, which happens only when this run's heartbeat stalled for a whole lease.
    """
    lock = OutputLock(folder, job, lease_s)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
    if lock.lost:
        raise OutputLockLostError(
            f"output folder {lock.folder}: the lock of this {job} run ({lock.holder}) was taken over by "
            f"another run ({lock.lost}) while it ran; its outputs may mix both runs: re-run it alone"
        )
