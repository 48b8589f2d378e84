"""Run many independent calls as Ray tasks, or in this process when the input is small.

Partitioned stages (the cells, image dedup, the index) split their work into calls that read their
inputs from files and write their outputs to files, returning only small summaries. :func:`run_tasks`
submits them as Ray tasks (joining or starting the job's Ray session on first need), keeps at most
``max_in_flight`` of them pending so the object store and the driver hold only summaries, and logs
progress; with ``inline=True`` the same calls run here one after another, which is faster for inputs
too small to pay for Ray's start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.core.ray_runtime import ensure_ray

log = logging.getLogger(__name__)


def run_tasks(
    fn: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    *,
    inline: bool,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    fresh_worker: bool = False,
    label: str = "",
    max_in_flight: int = 64,
    log_every_s: float = 30.0,
) -> list[Any]:
    """``[fn(*args) for args in calls]``, as Ray tasks unless ``inline``; results in call order.

    ``fresh_worker`` runs each call in a worker process that exits after it, so the memory a large
    one-off task touched (and the allocator keeps) is returned instead of staying with a pooled worker.
    A failed task fails the whole call (Ray retries tasks lost to a dead worker by itself).
    """
    label = label or getattr(fn, "__name__", "task")
    if inline or not calls:
        return [fn(*args) for args in calls]
    ensure_ray()
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_calls=1 if fresh_worker else 0)(fn)
    results: list[Any] = [None] * len(calls)
    pending: dict[Any, int] = {}
    submitted = done = 0
    started = last_log = time.monotonic()
    while done < len(calls):
        while submitted < len(calls) and len(pending) < max_in_flight:
            pending[remote.remote(*calls[submitted])] = submitted
            submitted += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)
            done += 1
        if time.monotonic() - last_log >= log_every_s:
            last_log = time.monotonic()
            log.info("%s: %d/%d tasks done (%.0f s)", label, done, len(calls), last_log - started)
    return results
