"""A process killed at every file-then-marker boundary of ingest and embed.

At each point the downstream readers see only complete partitions (row-aligned, from one run),
and a re-run finishes with exactly the outputs of an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures.shard_factory import encode, random_photo, sample, write_shard
from pipeline.core.config import EmbedConfig, IngestConfig
from pipeline.core.storage import DoneMarkers
from pipeline.embed.embed import run_embed
from pipeline.ingest.ingest import run_ingest
from pipeline.io.embeddings import EMBEDDING_KINDS, list_partitions, load_metadata, load_unit_embeddings

pytestmark = pytest.mark.slow  # a local Ray
SHARDS = 3


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs (not an Exception, so nothing catches it)."""


@pytest.fixture(scope="module")
def clean(ray_local, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    for s in range(SHARDS):
        rows = [
            sample(f"{s}{i:04d}", encode(random_photo(10 * s + i)), caption=f"photo {s}.{i}")
            for i in range(4)
        ]
        write_shard(root / "shards", s, rows)
    run_ingest(IngestConfig(shards=str(root / "shards"), out=str(root / "ingest")))
    run_embed(embed_config(root, root / "embed"))
    return {"root": root, "ingest": root / "ingest", "embed": root / "embed"}


def embed_config(root: Path, out: Path) -> EmbedConfig:
    return EmbedConfig(shards=str(root / "shards"), out=str(out), batch_size=4, decode_batch_size=4)


def kill_before_marker(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """The process dies after the k-th finished partition's files are written, before its marker."""
    calls = {"n": 0}
    write = DoneMarkers.write

    def dying_write(self: DoneMarkers, name: str, info: dict) -> None:
        calls["n"] += 1
        if calls["n"] == k:
            raise Killed(name)
        write(self, name, info)

    monkeypatch.setattr(DoneMarkers, "write", dying_write)


@pytest.mark.parametrize("k", range(1, SHARDS + 1))
def test_embed_killed_before_its_kth_marker(clean, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int):
    out = tmp_path / "embed"
    with monkeypatch.context() as patch:
        kill_before_marker(patch, k)
        with pytest.raises(Killed):
            run_embed(embed_config(clean["root"], out))
    parts = list_partitions(out)  # what every later stage reads at this point
    assert len(parts) == k - 1
    if parts:
        rows = sum(p.num_rows() for p in parts)
        assert load_metadata(out).num_rows == len(load_unit_embeddings(out)) == rows
    summary = run_embed(embed_config(clean["root"], out))
    assert summary["partitions_processed"] == SHARDS - (k - 1)
    expected, actual = list_partitions(clean["embed"]), list_partitions(out)
    assert [p.name for p in actual] == [p.name for p in expected]
    for want, got in zip(expected, actual, strict=True):
        assert got.metadata().equals(want.metadata())
        for kind in EMBEDDING_KINDS:
            if want.has(kind):
                assert np.array_equal(got.embeddings(kind), want.embeddings(kind)), (got.name, kind)


@pytest.mark.parametrize("k", range(1, SHARDS + 1))
def test_ingest_killed_before_its_kth_marker(clean, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int):
    cfg = IngestConfig(shards=str(clean["root"] / "shards"), out=str(tmp_path / "ingest"))
    with monkeypatch.context() as patch:
        kill_before_marker(patch, k)
        with pytest.raises(Killed):
            run_ingest(cfg)
    assert not (tmp_path / "ingest" / "samples.parquet").exists()  # merged only once every shard is done
    assert len(list((tmp_path / "ingest" / "parts").glob("*.done.json"))) == k - 1
    summary = run_ingest(cfg)
    assert summary["shards_processed"] == SHARDS - (k - 1)
    samples = pq.read_table(tmp_path / "ingest" / "samples.parquet")
    assert samples.equals(pq.read_table(clean["ingest"] / "samples.parquet"))
