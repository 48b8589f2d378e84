"""Embed on a real local Ray when a batch kills its model worker every time (issue 12, item 6).

Ray Data restarts a dead model actor and retries its task without limit, so before the attempt
ledger such a batch was retried forever and the run never ended.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fixtures.shard_factory import encode, random_photo, sample, write_shard
from pipeline.core.config import EmbedConfig
from pipeline.embed.actor import ATTEMPTS_DIR, EmbedActor
from pipeline.embed.clip_models import clip_spec
from pipeline.embed.embed import partition_counts, run_embed
from pipeline.embed.prepare import NO_ERROR, DecodePlan, prepare_batch, read_rows
from pipeline.io.embeddings import IMG_EMB, TEXT_EMB, list_partitions
from pipeline.io.shards import list_shards

ROWS = 4  # per shard, and the model batch size: each shard is one model batch
POISON = "000010002"  # a key of shard 00001


def test_the_actor_counts_attempts_and_gives_up_a_batch_that_used_them_up(tmp_path: Path):
    """No Ray: a finished batch leaves no ledger entry; one whose entry says it killed its worker
    ``max_batch_attempts`` times gets no model work, and its ok rows count as ``poison_batch``."""
    photos = [sample(f"0000000{i:02d}", encode(random_photo(i))) for i in range(3)]
    write_shard(tmp_path / "shards", 0, [*photos, sample("000000003", b"not an image at all")])
    cfg = EmbedConfig(shards=str(tmp_path / "shards"), out=str(tmp_path / "out"), batch_size=4)
    shards = {s.name: s for s in list_shards(cfg.shards)}
    batch = prepare_batch(
        pa.Table.from_pylist(read_rows({"shard": "00000"}, shards)),
        DecodePlan(max_pixels=cfg.max_image_pixels, clip_preprocess=clip_spec(cfg).preprocess),
    )
    actor = EmbedActor(cfg, precision="auto")
    ledger = tmp_path / "out" / ATTEMPTS_DIR

    embedded = actor(batch)
    assert partition_counts(pa.table({"error": embedded["error"]}))["embedded"] == 3
    assert not list(ledger.iterdir())  # counted before the model work, forgotten after it

    actor.attempts.entry(batch).write_text('{"attempts": 3}')  # three workers died on it
    given_up = actor(batch)
    counts = partition_counts(pa.table({"error": given_up["error"]}))
    assert counts["embedded"] == 0 and counts["skipped"] == 4
    assert counts["skipped_by_reason"] == {"not_an_image": 1, "poison_batch": 3}
    assert given_up["error"][0].startswith("poison_batch: its model worker died 3 times")
    for kind in (IMG_EMB, TEXT_EMB):
        assert given_up[kind].shape == embedded[kind].shape and not given_up[kind].any()
    assert (embedded["error"] != NO_ERROR).sum() == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_batch_that_always_kills_its_worker_is_given_up_as_poison_batch_rows(ray_local, tmp_path: Path):
    shards = tmp_path / "shards"
    for shard in range(3):
        photos = [sample(f"{shard:05d}{i:04d}", encode(random_photo(shard * 10 + i))) for i in range(ROWS)]
        write_shard(shards, shard, photos)
    crashes = tmp_path / "crashes"
    crashes.mkdir()

    class DiesOnPoison(EmbedActor):
        """Its model work kills its process (a real worker death) whenever the batch holds the poison key."""

        def embed(self, batch):
            if POISON in {str(key) for key in batch["key"]}:
                (crashes / secrets.token_hex(8)).touch()
                os._exit(1)
            return super().embed(batch)

    out = tmp_path / "out"
    cfg = EmbedConfig(
        shards=str(shards),
        out=str(out),
        batch_size=ROWS,
        decode_batch_size=ROWS,
        num_actors=1,
        max_batch_attempts=2,
        log_every_s=600,
    )
    summary = run_embed(cfg, actor_cls=DiesOnPoison)

    assert len(list(crashes.iterdir())) == 2  # the worker died max_batch_attempts times, then no more
    per = summary["per_partition"]
    assert per["00001"] == {
        "rows_seen": ROWS,
        "embedded": 0,
        "skipped": ROWS,
        "skipped_by_reason": {"poison_batch": ROWS},
    }
    for name in ("00000", "00002"):
        assert per[name] == {"rows_seen": ROWS, "embedded": ROWS, "skipped": 0, "skipped_by_reason": {}}
    assert summary["skipped_by_reason"] == {"poison_batch": ROWS}
    assert summary["rows_seen"] == summary["embedded"] + summary["skipped"] == 3 * ROWS
    parts = {p.name: p for p in list_partitions(out)}
    assert sorted(parts) == ["00000", "00001", "00002"]  # every shard got its done marker
    assert len(parts["00001"].metadata()) == 0
    assert np.asarray(parts["00001"].embeddings(IMG_EMB)).shape[0] == 0
    assert len(parts["00002"].metadata()) == ROWS
    # Batches that succeeded left no ledger entry; the given-up one keeps its count (a dot-folder,
    # which a bundle's file list skips).
    assert len(list((out / ATTEMPTS_DIR).iterdir())) == 1
