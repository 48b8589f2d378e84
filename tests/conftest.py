"""Shared fixtures: one real local Ray for the whole session, offline environment, shared data."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.core.offline import apply_offline_defaults

apply_offline_defaults()
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("RAY_ADDRESS", None)  # never attach tests to a developer's cluster

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# Fixtures that start Ray: a test using one, directly or through its own fixtures, is slow.
RAY_FIXTURES = {"ray_local", "ray_head"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that starts Ray without the `slow` marker, so `make test-fast` stays fast."""
    unmarked = [
        item.nodeid
        for item in items
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests start Ray (fixtures " + ", ".join(sorted(RAY_FIXTURES)) + ") but are not marked "
            "@pytest.mark.slow:\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs, small object store) shared by every test that needs one."""
    import ray

    from pipeline.core.config import RayConfig
    from pipeline.core.ray_runtime import configure_data_context

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False)
    configure_data_context(RayConfig(progress_bars=False))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second OpenMP thread, which spin-waits on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that read it skip cleanly where it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present beside this checkout")
    return path


BIN = Path(sys.executable).parent


def run_script(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from the repository root, as a user runs a job; output captured.

    Without ``env``, this environment less ``RAY_ADDRESS``: a job starts its own local Ray.
    """
    env = env if env is not None else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``make demo`` once per session, into a fresh folder, as a user runs it (a subprocess with its
    own local Ray): ``{"out": folder, "summary": its JSON line, "lines": every console line}``."""
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    done = run_script("jobs/demo.py", "--out", str(out), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines() + done.stdout.splitlines()
    return {"out": out, "summary": json.loads(done.stdout.strip().splitlines()[-1]), "lines": lines}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (401 under token auth) means the dashboard is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


def submit_job(
    address: str, env: dict[str, str], entrypoint: list[str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``entrypoint`` from the repository root, with runtime_env.yaml.

    A fresh head's dashboard answers before its job agent is up ("No available agent to submit
    job"); that answer is retried for up to a minute, any other outcome is returned as it is.
    """
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--runtime-env",
        "runtime_env.yaml",
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            return done
        time.sleep(2)


@pytest.fixture()
def ray_head(tmp_path: Path):
    """`ray start --head --block` in its own process group; stopping it leaves other Ray sessions alone.

    Yields ``(dashboard address, environment)``; submit with ``ray job submit --address ADDRESS`` under
    that environment (token authentication, the head's own temp dir).
    """
    # Its own short temp dir (socket paths are length-limited), so it leaves no ray_current_cluster
    # file in /tmp/ray for a later local ray.init() to trip over.
    ray_tmp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_TMPDIR": ray_tmp,
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    # The child gets its own copy of the descriptor, so ours can close once it has started.
    with open(tmp_path / "head.log", "w") as head_log:
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={free_port()}",
                "--num-cpus=2",
                f"--dashboard-port={dashboard}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                "--object-store-memory=300000000",
                "--disable-usage-stats",
                # Ports of its own: a session's local Ray (ray_local) may hold the defaults, and a
                # head whose dashboard agent cannot bind never accepts a job ("No available agent").
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ],
            env=env,
            stdout=head_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(f"{address}/api/version", 90)
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
