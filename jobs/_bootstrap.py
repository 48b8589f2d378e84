"""Shared start-up for the scripts in jobs/: import path, offline defaults, logging, summary line.

Jobs run as ``python jobs/NAME.py`` from a checkout (locally or under ``ray job submit
--working-dir .``), so the repository root is put on ``sys.path`` when the package is not installed.
"""

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Offline by default: nothing at run time may reach a model hub or phone home.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_name, _value)


def run_job(main: Callable[[list[str] | None], dict]) -> None:
    """Run a job's ``main`` and print its summary as the last stdout line; errors exit non-zero."""
    from pipeline.core.cli import emit_summary

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = main(None)
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("job").error("%s", exc)
        sys.exit(2)
    emit_summary(summary)
