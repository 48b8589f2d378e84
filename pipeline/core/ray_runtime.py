"""The one place that decides how a job talks to Ray.

With an address (the config's, or ``RAY_ADDRESS`` as set by ``ray job submit``) a job joins that
cluster and asks for nothing else. Without one it starts a local Ray with a capped object store and
no dashboard, so a laptop or a 2-core CI box is not swamped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import ray
import ray.data

from pipeline.core.config import RayConfig

log = logging.getLogger(__name__)


def local_cpu_count(cfg: RayConfig) -> int:
    return cfg.num_cpus or os.cpu_count() or 1


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Connect to (or start) Ray for the duration of a job; reuse a session that is already up."""
    if ray.is_initialized():
        configure_data_context(cfg)
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",  # never attach to a stale `ray start` left on this machine
            num_cpus=local_cpu_count(cfg),
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    try:
        configure_data_context(cfg)
        yield
    finally:
        # Disconnect before the job prints its summary, so no worker log line lands after it.
        ray.shutdown()


def configure_data_context(cfg: RayConfig) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    ctx.verbose_stats_logs = False
    ctx.print_on_execution_start = False


def cluster_gpus() -> int:
    """GPUs the whole cluster offers; decided on the driver because actors see only their own."""
    return int(ray.cluster_resources().get("GPU", 0))


def cpu_actor_pool_size(cpus_per_actor: float = 1.0) -> int:
    """Largest CPU actor pool that still leaves a core for read and decode tasks (ray#44687)."""
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
    simply runs here. The task reads its inputs from the (shared) filesystem and returns its result
    to the driver, which writes the outputs.
    """
    if not ray.is_initialized() or gpu_count() > 0 or cluster_gpus() == 0:
        return fn(*args)
    log.info("running %s in a Ray task with one GPU", getattr(fn, "__name__", fn))
    return ray.get(ray.remote(num_gpus=1)(fn).remote(*args))
