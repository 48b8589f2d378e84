"""The model stage of embedding: a Ray Data actor that runs open_clip (and SSCD) on decoded batches.

Kept apart from the stage (:mod:`pipeline.embed.embed`) because importing torch and open_clip takes
seconds: the stage imports this module only when a shard is to be embedded, and the Ray workers that
run the actors import it for themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import EmbedConfig, result_options
from pipeline.core.storage import fingerprint, unique_tmp_path
from pipeline.embed.clip_models import load_clip, load_sscd
from pipeline.embed.prepare import NO_ERROR, PIXELS, POISON_BATCH, ROW_COLUMNS, SSCD_PIXELS
from pipeline.io.embeddings import IMG_EMB, SSCD_EMB, TEXT_EMB

log = logging.getLogger(__name__)

#: The attempt ledger's folder under the output folder; a dot-folder, which a bundle's file list skips.
ATTEMPTS_DIR = ".attempts"


class BatchAttempts:
    """How often each model batch was started: the ledger that keeps a batch from killing workers forever.

    Ray Data restarts a dead model actor and retries its task without limit, with the same input, so
    a batch that crashes its worker (a segfault in a kernel, an out-of-memory kill) would be retried
    forever. :meth:`start` counts an attempt in ``<folder>/<sha1 of the batch>.json`` before any model
    work, and :meth:`finish` removes the entry once the batch is done; an entry that already counts
    ``limit`` attempts means the batch killed its worker that many times, and it is given up.

    The entry is written to a unique temporary name and renamed, so a killed process never leaves half
    a count; it is not fsynced (it must only outlive the process, not a power loss), which keeps disk
    flushes off the model's hot path. A folder that cannot be written (an output folder the worker's
    node does not share) disables the ledger with a warning; the run itself goes on.

    Args:
        folder (`Path`): the ledger's folder (``OUT/.attempts``); the output folder must be shared by
            the workers' nodes for counts to add up across nodes.
        limit (`int`): attempts after which a batch is given up.
        salt (`str`): the result options' fingerprint: a batch under other options is another batch.
    """

    def __init__(self, folder: Path, limit: int, salt: str):
        self.folder = folder
        self.limit = limit
        self.salt = salt
        self.enabled = True

    def entry(self, batch: dict[str, np.ndarray]) -> Path:
        """The batch's ledger file: a hash of its rows' shard, row number, key and image sha256."""
        digest = hashlib.sha1(self.salt.encode(), usedforsecurity=False)
        for column in ("shard", "row", "key", "sha256"):
            digest.update(json.dumps([str(value) for value in batch[column]]).encode())
        return self.folder / f"{digest.hexdigest()}.json"

    def start(self, batch: dict[str, np.ndarray]) -> Path | None:
        """Count an attempt at ``batch``; its entry, or None when it has used up its attempts."""
        path = self.entry(batch)
        try:
            count = int(json.loads(path.read_text())["attempts"])
        except FileNotFoundError:
            count = 0
        except (OSError, ValueError, KeyError, TypeError):
            count = 0  # an unreadable entry counts as none: at worst a batch gets its attempts again
        if count >= self.limit:
            return None
        if self.enabled:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = unique_tmp_path(path)
                tmp.write_text(json.dumps({"attempts": count + 1}))
                os.replace(tmp, path)
            except OSError as exc:
                self.enabled = False
                log.warning("embed: no batch attempt ledger (%s): a crashing batch is not bounded", exc)
        return path

    def finish(self, path: Path) -> None:
        """The batch is done: forget its attempts."""
        if self.enabled:
            path.unlink(missing_ok=True)


class EmbedActor:
    """Model stage: image and caption embeddings (and SSCD descriptors) for the decoded rows of a batch.

    The device is chosen here, not on the driver: Ray hides GPUs from actors that did not ask for one.

    Args:
        cfg (`EmbedConfig`): model, batch size and SSCD options.
        precision (`str`): see :func:`~pipeline.embed.identity.resolve_precision` (fp32 on CPU regardless).
    """

    def __init__(self, cfg: EmbedConfig, precision: str):

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = load_clip(cfg, device, precision)
        self.sscd = (
            load_sscd(cfg.sscd_checkpoint, cfg.sscd_image_size, device) if cfg.sscd_checkpoint else None
        )
        self.batch_size = cfg.batch_size
        self.attempts = BatchAttempts(
            Path(cfg.out) / ATTEMPTS_DIR, cfg.max_batch_attempts, fingerprint(result_options(cfg))
        )
        log.info("embed actor: %s on %s (%s)", self.clip.name, device, self.clip.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed the ok rows of ``batch``; rejected rows pass through with zero vectors.

        A batch that already killed its worker ``max_batch_attempts`` times (see
        :class:`BatchAttempts`) gets no model work: its ok rows are rejected as ``poison_batch``.
        """
        ok = batch["error"] == NO_ERROR
        entry = None
        if ok.any():  # a batch of rejected rows only gets no model work: nothing to count
            entry = self.attempts.start(batch)
            if entry is None:
                return self._given_up(batch, ok)
        out = self.embed(batch)
        if entry is not None:
            self.attempts.finish(entry)
        return out

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model work: the row columns, and the embeddings of the ok rows (zeros for the others)."""
        ok = batch["error"] == NO_ERROR
        out = {name: batch[name] for name in ROW_COLUMNS}
        captions = [str(caption) for caption in batch["caption"][ok]]
        out[IMG_EMB] = _scatter(self.clip.encode_images(batch[PIXELS][ok], self.batch_size), ok)
        out[TEXT_EMB] = _scatter(self.clip.encode_texts(captions, self.batch_size), ok)
        if self.sscd is not None:
            out[SSCD_EMB] = _scatter(self.sscd.encode(batch[SSCD_PIXELS][ok], self.batch_size), ok)
        return out

    def _given_up(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`embed`'s output without the model: the ok rows rejected as ``poison_batch`` (rows
        rejected before keep their reason), every embedding zero."""
        reason = f"{POISON_BATCH}: its model worker died {self.attempts.limit} times on this batch"
        log.warning(
            "embed: giving up a batch of %d rows (shards %s, keys %s...): %s",
            len(ok),
            sorted({str(s) for s in batch["shard"]}),
            [str(k) for k in batch["key"][:3]],
            reason,
        )
        errors = [reason if good else str(e) for e, good in zip(batch["error"], ok, strict=True)]
        out = {name: batch[name] for name in ROW_COLUMNS} | {"error": np.array(errors, dtype=object)}
        dims = {IMG_EMB: self.clip.dim, TEXT_EMB: self.clip.dim}
        if self.sscd is not None:
            dims[SSCD_EMB] = self.sscd.dim
        return out | {kind: np.zeros((len(ok), dim), dtype=np.float16) for kind, dim in dims.items()}


def _scatter(rows: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Embeddings of the ``ok`` rows placed back among all rows; rejected rows get zeros."""
    full = np.zeros((len(ok), rows.shape[1]), dtype=rows.dtype)
    full[ok] = rows
    return full
