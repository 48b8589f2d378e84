"""Shared fixtures: one real local Ray for the whole session, offline environment, shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_name, _value)
os.environ.pop("RAY_ADDRESS", None)  # never attach tests to a developer's cluster

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs, small object store) shared by every test that needs one."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.ray_runtime import configure_data_context

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False)
    configure_data_context(RayConfig(progress_bars=False))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that read it skip cleanly where it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present beside this checkout")
    return path
