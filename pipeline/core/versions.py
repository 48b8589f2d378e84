"""Installed library versions, for fingerprints and provenance (read from package metadata: no import)."""

from __future__ import annotations

from importlib import metadata


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a PyPI name, e.g. ``open_clip_torch``), or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
