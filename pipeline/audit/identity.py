"""What decides a sample: per-sample seeds, model and bundle checksums, and the run id built from them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.audit.layout import AUDIT_SCHEMA_VERSION
from pipeline.core.config import AuditConfig, result_options
from pipeline.core.storage import atomic_write_json, sha256_file


def sample_seed(run_seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of a prompt: 63 bits of SHA-256 of (run seed, prompt id, index)."""
    digest = hashlib.sha256(f"{int(run_seed)}:{prompt_id}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def resolve_model_dir(path: str | Path) -> Path:
    """The diffusers pipeline folder of ``path``: itself (``model_index.json``), or its ``text2img/``
    (a folder written by ``jobs/train_memorizing_model.py``)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    if (path / "text2img" / "model_index.json").is_file():
        return path / "text2img"
    raise FileNotFoundError(
        f"model {path} is not a diffusers pipeline folder "
        "(no model_index.json, nor text2img/model_index.json)"
    )


def tree_checksum(folder: str | Path, cache: Path | None = None) -> str:
    """SHA-256 over the relative paths and SHA-256s of every file under ``folder`` (hidden files skipped).

    ``cache`` (a JSON file) remembers each file's hash by (path, size, mtime), so a scheduled re-run does
    not re-read gigabytes of unchanged weights.
    """
    folder = Path(folder).resolve()
    if folder.is_file():
        files = [folder]
        base = folder.parent
    else:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        base = folder
    known: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    digest = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        key = str(f)
        entry = known.get(key)
        if not entry or entry[:2] != [st.st_size, st.st_mtime_ns]:
            entry = [st.st_size, st.st_mtime_ns, sha256_file(f)]
            known[key] = entry
            changed = True
        digest.update(f"{f.relative_to(base).as_posix()}\0{entry[2]}\n".encode())
    if cache is not None and changed:
        atomic_write_json(cache, known)
    return digest.hexdigest()


def run_identity(
    cfg: AuditConfig,
    model_checksum: str,
    bundle_checksum: str,
    amg_on: dict[str, Any],
    detection: dict[str, Any],
    descriptor_checksum: str | None,
) -> dict[str, Any]:
    """What the run id fingerprints: model and bundle content, descriptor, and the audit settings that
    decide a sample or a flag (the AMG constants included). The prompt list and the AMG selection are
    not part of it: a longer list, or ``--amg both`` after ``--amg off``, adds to the same run."""
    settings = result_options(cfg)  # settings that change no sample, flag or aggregate are left out
    return {
        "schema": AUDIT_SCHEMA_VERSION,
        "model_checksum": model_checksum,
        "bundle_checksum": bundle_checksum,  # the bundle's root hash
        "descriptor_checksum": descriptor_checksum,
        "settings": settings,
        "amg_on": amg_on,
        "detection": detection,
    }
