"""The one place that decides how a job talks to Ray.

With an address (the config's, or ``RAY_ADDRESS`` as set by ``ray job submit``) a job joins that
cluster and asks for nothing else. Without one it starts a local Ray with a capped object store and
no dashboard, so a laptop or a 2-core CI box is not swamped.

Jobs open their session lazily (``ray_session(cfg, lazy=True)``): Ray is started or joined only when
something first needs it, so a job whose outputs are all up to date finishes without it (a local
Ray costs seconds to start). The first need is an explicit :meth:`RaySession.ensure`, an eager
``ray_session`` opened inside (the caption dedup and the audit open one around their Ray work), a
helper below that must ask the cluster, or any Ray call that would otherwise start a default Ray
(``ray.data.from_items``, ``ray.remote(...).remote``, ``ray.get``: see :func:`_route_auto_init`).
Questions a local Ray not yet started can answer from this machine (its CPUs and GPUs) are answered
without starting it.

The console stays quiet unless ``cfg.verbose``: Ray logs at WARNING, Ray Data prints neither
progress nor "execution finished" lines, and workers' stdout/stderr stay in the Ray session's log
files instead of being forwarded (task and actor errors still reach the driver as exceptions).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

from pipeline.core.config import RayConfig
from pipeline.core.lazy import faiss

log = logging.getLogger(__name__)


def local_cpu_count(cfg: RayConfig) -> int:
    return cfg.num_cpus or os.cpu_count() or 1


#: ``ray.init`` as Ray defines it, before :func:`_route_auto_init` stands in for it.
_RAY_INIT = ray.init


class RaySession:
    """A job's Ray, started (local) or joined (address) on first need; see the module docstring.

    Attributes:
        cfg (`RayConfig`): how to reach or size Ray.
        address (`str`, *optional*): the cluster to join; None for a local Ray started here.
        started (`bool`): whether this session started or joined Ray (the job summaries' ``ray_started``).
    """

    def __init__(self, cfg: RayConfig):
        self.cfg = cfg
        self.address = cfg.address or os.environ.get("RAY_ADDRESS") or None
        self.started = False

    @property
    def local(self) -> bool:
        """A local Ray, started by this process on this machine (not yet, or already)."""
        return self.address is None

    def ensure(self) -> None:
        """Start or join Ray now, unless it is up already."""
        if ray.is_initialized():
            return
        configure_data_context(self.cfg)
        _connect(self)
        self.started = True


#: The job's outermost session while it is open (started or not): inner sessions use it.
_open: RaySession | None = None


@contextmanager
def ray_session(cfg: RayConfig, *, lazy: bool = False) -> Iterator[RaySession]:
    """Ray for the duration of a block: now (``lazy=False``), or on first need (``lazy=True``, jobs).

    A session opened inside another one (or inside a Ray already up) starts nothing of its own: an
    eager one makes the outer session start now, and the outer session shuts Ray down. Ray is shut
    down on leaving the block only by the session that started it, before the job prints its summary,
    so no worker log line lands after that.
    """
    global _open
    if _open is not None:
        if not lazy:
            _open.ensure()
        yield _open
        return
    if ray.is_initialized():  # a session of the caller's (tests, notebooks): use it, leave it up
        configure_data_context(cfg)
        yield RaySession(cfg)
        return
    session = _open = RaySession(cfg)
    restore = _route_auto_init(session)
    try:
        if not lazy:
            session.ensure()
        yield session
    finally:
        _open = None
        restore()
        if ray.is_initialized():  # down on entry: this session started it (or a call that went around it)
            session.started = True
            ray.shutdown()


def ensure_ray() -> None:
    """Start or join the open session's Ray now (nothing when Ray is up or no session is open)."""
    if _open is not None:
        _open.ensure()


def _route_auto_init(session: RaySession) -> Callable[[], None]:
    """Make Ray's auto-start start ``session``'s Ray; returns the function that undoes it.

    Ray starts a default Ray (all cores, an object store of 30% of memory, a dashboard, attached to
    any ``ray start`` left on the machine) when a Ray call is made before ``ray.init``: its
    auto-init hook calls ``ray.init()`` with no arguments. Library code running inside a lazy session
    makes such calls (``ray.data.from_items`` in ingest and embed) without asking for a session
    first, so while this session is open and not started, an argument-less ``ray.init()`` starts this
    session's Ray instead. A call with arguments is Ray's own, unchanged.
    """

    @functools.wraps(_RAY_INIT)
    def init(*args: Any, **kwargs: Any) -> Any:
        if args or kwargs or ray.is_initialized():
            return _RAY_INIT(*args, **kwargs)
        session.ensure()
        return None

    ray.init = init

    def restore() -> None:
        if ray.init is init:
            ray.init = _RAY_INIT

    return restore


def _connect(session: RaySession) -> None:
    cfg = session.cfg
    quiet = {
        "logging_level": logging.INFO if cfg.verbose else logging.WARNING,
        # Workers' prints and warnings (library notices, per-batch chatter) stay in the session's log
        # files: a failing task or actor still raises on the driver with the worker's traceback.
        "log_to_driver": cfg.verbose,
    }
    if session.address:
        log.info("joining Ray cluster at %s", session.address)
        _RAY_INIT(address=session.address, **quiet)
        return
    gpus = local_gpu_count()
    with _quiet_token_auth_notice():
        _RAY_INIT(
            address="local",  # never attach to a stale `ray start` left on this machine
            num_cpus=local_cpu_count(cfg),
            # What cluster_gpus() answered before Ray started, so the two can never disagree.
            **({} if gpus is None else {"num_gpus": gpus}),
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            **quiet,
        )
    resources = ray.cluster_resources()
    log.info(
        "started a local Ray: %d CPUs, %d GPUs%s",
        int(resources.get("CPU", 0)),
        int(resources.get("GPU", 0)),
        "" if cfg.verbose else f"; worker output in {_worker_logs()} (--verbose shows it here)",
    )


@contextmanager
def _quiet_token_auth_notice() -> Iterator[None]:
    """Drop Ray's "Token authentication is enabled for this Ray cluster" notice while a local Ray starts.

    Ray (2.60, as pinned) turns token authentication on for every new local cluster when
    ``RAY_AUTH_MODE`` is unset, and logs that WARNING on each start. The default is what a job wants, so
    it is kept: a local Ray listens on this machine's ports, and the token (``~/.ray/auth_token``) keeps
    other users and hosts from running code on it. Saying so explicitly (``RAY_AUTH_MODE=token``) is
    what would silence the notice at its cause, but Ray reads the mode into its config when it is
    imported and refreshes it only from a private helper: set later, in the driver, the driver stays in
    "disabled" mode while the workers it starts are in "token" mode, and it cannot connect to its own
    cluster (tried with Ray 2.60). So the notice alone is filtered, for this call only; a
    ``RAY_AUTH_MODE`` the user sets is respected as before (Ray prints nothing then).
    """
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _DropMessages("Token authentication is enabled for this Ray cluster")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class _DropMessages(logging.Filter):
    """Drops the log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _worker_logs() -> str:
    """The Ray session's log folder (workers' stdout/stderr), where Ray can say; else its usual path."""
    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:  # a private attribute: Ray may move it
        return "/tmp/ray/session_latest/logs"


def configure_data_context(cfg: RayConfig) -> None:
    """Ray Data's console for this process: quiet, or everything with ``cfg.verbose``.

    Set when the session's Ray starts (Ray Data runs on nothing else) or, for a Ray already up, when
    the session opens; ray.data is imported only then: half a second that a job with nothing to do
    does not pay.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars or cfg.verbose
    ctx.verbose_stats_logs = False
    ctx.print_on_execution_start = cfg.verbose
    # Ray Data's console handler prints its INFO lines ("Running Dataset", "execution finished in
    # 0.35 seconds", the per-operator progress logged when stderr is no terminal); its log file in the
    # Ray session keeps them all. Quiet, the console shows its warnings, less the one that advises
    # turning progress bars on, which this job turned off on purpose (--verbose turns them on).
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() != "console":
            continue
        handler.setLevel(logging.INFO if cfg.verbose or cfg.progress_bars else logging.WARNING)
        for old in [f for f in handler.filters if isinstance(f, _DropMessages)]:
            handler.removeFilter(old)
        if not ctx.enable_progress_bars:
            handler.addFilter(_DropMessages("Progress bars disabled"))


def local_gpu_count() -> int | None:
    """GPUs a local Ray started now would offer (Ray's own detection), or None where it cannot tell.

    Asked without starting Ray, so a job with nothing to do (the embed stage plans its actors in
    its constructor) need not start one to learn there is no GPU.
    """
    try:
        from ray._private import accelerators  # private: Ray's detection, as ray.init runs it

        manager = accelerators.get_accelerator_manager_for_resource("GPU")
        count = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return int(count if visible is None else min(count, len(visible)))
    except Exception as exc:  # any failure of a private API: start Ray and ask it instead
        log.debug("cannot count local GPUs without Ray (%s)", exc)
        return None


def _pending_local() -> RaySession | None:
    """The open session when it is a local Ray not started yet (its resources are this machine's)."""
    if _open is not None and _open.local and not ray.is_initialized():
        return _open
    return None


def cluster_gpus() -> int:
    """GPUs the whole cluster offers; decided on the driver because actors see only their own.

    A local Ray not started yet is not started to answer: it will offer :func:`local_gpu_count`.
    """
    if _pending_local() is not None and (gpus := local_gpu_count()) is not None:
        return gpus
    ensure_ray()
    return int(ray.cluster_resources().get("GPU", 0))


def cpu_actor_pool_size(cpus_per_actor: float = 1.0) -> int:
    """Largest CPU actor pool that still leaves a core for read and decode tasks (ray#44687)."""
    pending = _pending_local()
    if pending is not None:
        total: float = local_cpu_count(pending.cfg)
    else:
        ensure_ray()
        total = ray.cluster_resources().get("CPU", 1)
    return max(1, int((total - 1) // cpus_per_actor))


def gpu_count(use_gpu: bool = True) -> int:
    """GPUs FAISS can use here (0 for a CPU-only build or when ``use_gpu`` is off)."""
    if not use_gpu:
        return 0
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def on_gpu_worker(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a Ray task holding one GPU when the cluster has GPUs this process cannot see.

    On a machine whose own FAISS sees a GPU, or a cluster without GPUs, or with no Ray session, it
    simply runs here; so it does in a job's local Ray (started or not yet), which would run the task
    on this machine, in this environment, with the GPUs this process sees already (and a job that
    finds its outputs up to date inside ``fn`` need not start Ray for it). The task reads its inputs
    from the (shared) filesystem and returns its result to the driver, which writes the outputs.
    """
    if _open is not None and _open.local:
        return fn(*args)
    ensure_ray()
    if not ray.is_initialized() or gpu_count() > 0 or cluster_gpus() == 0:
        return fn(*args)
    log.info("running %s in a Ray task with one GPU", getattr(fn, "__name__", fn))
    return ray.get(ray.remote(num_gpus=1)(fn).remote(*args))
