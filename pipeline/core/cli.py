"""Command-line front end shared by every job in ``jobs/``.

A job names its main config section (its fields become ``--field-name`` flags) and any extra
sections (their fields become ``--section-field-name``). Every job also takes ``--config FILE``.
Only flags given on the command line override the YAML file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.core.config import (
    PipelineConfig,
    field_types,
    load_config,
    scalar_type,
    section_types,
    with_overrides,
)

#: Options every job takes under a shorter name as well (``--verbose`` for ``--ray-verbose``).
SHORT_FLAGS = {("ray", "verbose"): "--verbose"}


def _flag(section: str, name: str, main: str) -> str:
    stem = name if section == main else f"{section}_{name}"
    return "--" + stem.replace("_", "-")


def build_parser(description: str, main: str, extra: Sequence[str] = ("ray",)) -> argparse.ArgumentParser:
    """Parser with ``--config`` plus one flag per field of the ``main`` and ``extra`` sections."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", help="YAML file with config sections (ray, download, ingest, ...)")
    sections = section_types()
    defaults = PipelineConfig()
    for section in (main, *extra):
        group = parser.add_argument_group(f"{section} options")
        hints = field_types(sections[section])
        for f in dataclasses.fields(sections[section]):
            kind = scalar_type(hints[f.name])
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                "default": argparse.SUPPRESS,
                "help": (
                    f"{f.metadata.get('help', '')} (default: {getattr(getattr(defaults, section), f.name)!r})"
                ),
            }
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = kind
                kwargs["metavar"] = f.name.upper()
            flags = [_flag(section, f.name, main)]
            if (section, f.name) in SHORT_FLAGS and SHORT_FLAGS[section, f.name] not in flags:
                flags.append(SHORT_FLAGS[section, f.name])
            group.add_argument(*flags, **kwargs)
    parser.set_defaults(_main_section=main)
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> PipelineConfig:
    """Parse ``argv`` into a :class:`PipelineConfig`; missing required options exit with a clear error."""
    args = vars(parser.parse_args(argv))
    main = args.pop("_main_section")
    try:
        cfg = load_config(args.pop("config", None))
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in args.items():
        section, name = dest.split(".", 1)
        overrides.setdefault(section, {})[name] = value
    cfg = with_overrides(cfg, overrides)
    # Only the main section's paths are the user's to give; a job fills in its other sections' paths.
    for f in dataclasses.fields(section_types()[main]):
        if f.metadata.get("required") and getattr(getattr(cfg, main), f.name) in ("", None):
            parser.error(f"{_flag(main, f.name, main)} is required (or set {main}.{f.name} in --config)")
    return cfg


def emit_summary(summary: dict[str, Any]) -> None:
    """Print a job's one-line JSON summary; by contract it is the last line on stdout."""
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
