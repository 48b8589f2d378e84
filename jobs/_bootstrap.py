"""Shared start-up for the scripts in jobs/: import path, offline defaults, logging, summary line.

Jobs run as ``python jobs/NAME.py`` from a checkout (locally or under ``ray job submit
--working-dir .``), so the repository root is put on ``sys.path`` when the package is not installed.
"""

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

STARTED = time.monotonic()  # this module is each job's first import: the job's wall time counts from here

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Imported only now: a checkout run as `python jobs/NAME.py` finds the package through ROOT.
from pipeline.core.offline import apply_offline_defaults  # noqa: E402 (needs ROOT on sys.path first)

apply_offline_defaults()


EXIT_LOCKED = 3  # another run holds the output folder: see pipeline.core.lock


def run_job(main: Callable[[list[str] | None], dict]) -> None:
    """Run a job's ``main`` and print its summary as the last stdout line; errors exit non-zero.

    Bad input (a missing file, an invalid option) exits 2 and a locked output folder exits 3, each
    with a one-line message and no traceback. A summary with ``up_to_date`` true (the job found every
    output current for its inputs and settings and computed nothing) is announced as such first.
    """
    from pipeline.core.cli import emit_summary
    from pipeline.core.lock import OutputLockedError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # FAISS's loader reports at INFO each CPU-feature build it tries and misses: seven lines of noise.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        summary = main(None)
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("job").error("%s", exc)
        sys.exit(2)
    except OutputLockedError as exc:  # another run writes the same --out (or took it over from this one)
        logging.getLogger("job").error("%s", exc)
        sys.exit(EXIT_LOCKED)
    if summary.get("up_to_date"):
        logging.getLogger("job").info(
            "%s: nothing to do, every output is up to date for these inputs and settings (%.1f s%s)",
            summary.get("job", "job"),
            time.monotonic() - STARTED,
            ", Ray not started" if summary.get("ray_started") is False else "",
        )
    emit_summary(summary)
