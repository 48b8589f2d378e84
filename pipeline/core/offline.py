"""Offline by default: nothing at run time may reach a model hub or phone home.

Jobs and tests call :func:`apply_offline_defaults` before anything else; users opt back in per
variable (e.g. ``HF_HUB_OFFLINE=0`` to download weights from the Hugging Face Hub). Ray workers do not
run this code, so runtime_env.yaml and deploy/rayjob.yaml repeat these values literally
(tests/test_architecture.py keeps them equal).
"""

import os

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",  # huggingface_hub: no downloads, no metadata requests
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations (via img2dataset): no version check at import
    "RAY_USAGE_STATS_ENABLED": "0",
    "WANDB_MODE": "disabled",
}


def apply_offline_defaults() -> None:
    """Set each of OFFLINE_ENV in os.environ unless the user has set it already."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
