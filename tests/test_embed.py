"""Embed stage: each part alone, then on a real local Ray with the tiny model: bad inputs, resume, crashes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_clip_models import write_tiny_sscd
from test_ingest import bad_samples, odd_but_valid_samples
from test_phash import textured_photo

from fixtures.shard_factory import encode, random_photo, sample, write_shard
from pipeline.core.config import EmbedConfig, IngestConfig
from pipeline.core.ray_runtime import cluster_gpus
from pipeline.embed.actor import EmbedActor
from pipeline.embed.clip_models import ModelLoadError, load_clip
from pipeline.embed.embed import PartitionWriter, Progress, plan_compute, run_embed
from pipeline.embed.phash import phash_images
from pipeline.embed.prepare import NO_ERROR, PIXELS, DecodePlan, prepare_batch, read_rows
from pipeline.ingest.ingest import run_ingest
from pipeline.io.decode import decode_image
from pipeline.io.embeddings import (
    EMBEDDING_KINDS,
    IMG_EMB,
    METADATA_SCHEMA,
    SSCD_EMB,
    TEXT_EMB,
    list_partitions,
    load_embeddings,
    load_metadata,
)
from pipeline.io.partitions import PartitionAssembler
from pipeline.io.shards import list_shards

REPO = Path(__file__).resolve().parent.parent
PEER_SHARDS = ("image1", "image2", "image3", "image4")
DEMO_SHARDS = ("00005", "00006")


def build_shards(folder: Path, peer_dir: Path | None) -> Path:
    """Demo-like shards with planted duplicates, the bad inputs of ingest's tests, and the peer shards."""
    write_shard(folder, 0, odd_but_valid_samples())
    write_shard(folder, 1, bad_samples())
    samples = [sample(f"0000002{i:02d}", encode(random_photo(20 + i, (64, 64)))) for i in range(4)]
    with tarfile.open(write_shard(folder, 2, samples)) as archive:
        cut = next(m for m in archive.getmembers() if m.name == "000000202.jpg")
    write_shard(folder, 2, samples, truncate_to=cut.offset_data + cut.size // 2)  # inside the third image
    write_shard(folder, 3, [])
    (folder / "00004.tar").write_bytes(b"")
    planted = encode(textured_photo(99), quality=90)  # the same photo and caption in both demo shards
    for shard in (5, 6):
        rows = [
            sample(f"{shard:05d}{i:04d}", encode(textured_photo(shard * 100 + i)), f"photo {i}")
            for i in range(15)
        ]
        rows.append(sample(f"{shard:05d}0015", planted, "a planted duplicate"))
        write_shard(folder, shard, rows)
    if peer_dir is not None:
        for name in PEER_SHARDS:
            shutil.copy(peer_dir / f"{name}.tar", folder / f"{name}.tar")
    return folder


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory) -> dict:
    """One ingest and one embed (tiny model + a tiny SSCD) of the same shards, shared by the Ray tests.

    The peer shards (clip-retrieval's) and the zero-byte tar have no _stats.json: both stages are
    told to read them anyway (``require_stats=False``), the opt-in for shards of other tools.
    """
    root = tmp_path_factory.mktemp("embed")
    peer = REPO.parent / "shared" / "data" / "peer_samples" / "clip-retrieval"
    shards = build_shards(root / "shards", peer if peer.is_dir() else None)
    cfg = EmbedConfig(
        shards=str(shards),
        out=str(root / "out"),
        batch_size=8,
        decode_batch_size=8,
        sscd_checkpoint=str(write_tiny_sscd(root / "sscd.pt")),
        sscd_image_size=64,
        require_stats=False,
    )
    ingest = run_ingest(IngestConfig(shards=str(shards), out=str(root / "ingest"), require_stats=False))
    return {"cfg": cfg, "root": root, "ingest": ingest, "summary": run_embed(cfg), "peer": peer.is_dir()}


def read_outputs(out: str | Path) -> dict[str, dict]:
    return {
        p.name: {"meta": p.metadata(), **{kind: np.asarray(p.embeddings(kind)) for kind in EMBEDDING_KINDS}}
        for p in list_partitions(out)
    }


# --- parts without Ray ---------------------------------------------------------------------------


def test_assembler_writes_each_shard_once_when_complete():
    written: dict[str, pa.Table | None] = {}
    assembler = PartitionAssembler(lambda name, rows: written.setdefault(name, rows))

    def rows(shard: str, keys: list[int], total: int) -> pa.Table:
        return pa.table({"shard": [shard] * len(keys), "shard_rows": [total] * len(keys), "k": keys})

    assert assembler.add(pa.concat_tables([rows("a", [0], 3), rows("b", [0], 2)])) == []
    assert assembler.add(pa.concat_tables([rows("b", [1], 2), rows("a", [1], 3)])) == ["b"]
    assert assembler.add(rows("a", [2], 3)) == ["a"]
    assert sorted(written["a"].column("k").to_pylist()) == [0, 1, 2]
    assert assembler.finish_empty(["a", "b", "empty"]) == ["empty"] and written["empty"] is None
    assembler.add(rows("c", [0], 2))
    with pytest.raises(RuntimeError, match="expected more"):
        assembler.finish_empty(["c"])
    with pytest.raises(RuntimeError, match="only 1 expected"):
        assembler.add(rows("d", [0, 0], 1))  # a duplicated row (say, a retried task) is never written


def test_mapper_decodes_once_and_keeps_rejected_rows_in_place(tmp_path: Path):
    shards = {s.name: s for s in list_shards(build_shards(tmp_path, None))}
    batch = pa.Table.from_pylist(read_rows({"shard": "00001"}, shards))
    plan = DecodePlan(max_pixels=89_478_485, clip_preprocess=_tiny_preprocess(), sscd_image_size=32)
    out = prepare_batch(batch, plan)
    ok = out["error"] == NO_ERROR
    assert out["row"].tolist() == list(range(8)) and out["shard_rows"].tolist() == [8] * 8
    assert ok.sum() == 3 and {e.split(":")[0] for e in out["error"][~ok]} == {
        "truncated_image",
        "empty_file",
        "not_an_image",
        "decompression_bomb",
        "download_failed",
    }
    assert out[PIXELS].shape == (8, 64, 64, 3) and out[PIXELS].dtype == np.uint8
    assert not out[PIXELS][~ok].any() and (out["phash"][~ok] == 0).all()
    assert out["sscd_pixels"].shape == (8, 32, 32, 3)
    images = [row for row in batch.to_pylist() if row["read_error"] is None]
    decoded = [decode_image(row["image"], plan.max_pixels) for row in images]
    assert out["phash"][ok].tolist() == phash_images([d.image for d in decoded if d.ok]).tolist()


def test_reader_applies_the_member_cap(tmp_path: Path):
    shards = {s.name: s for s in list_shards(build_shards(tmp_path, None))}
    capped = read_rows({"shard": "00000"}, shards, max_member_bytes=8)  # below every file
    assert [r["row"] for r in capped] == list(range(8))
    assert all(r["read_error"].startswith("member_too_large") for r in capped)
    assert all(r["read_error"] is None for r in read_rows({"shard": "00000"}, shards))


def test_actor_embeds_decoded_rows_and_passes_rejected_ones_through(tmp_path: Path):
    shards = {s.name: s for s in list_shards(build_shards(tmp_path, None))}
    batch = prepare_batch(
        pa.Table.from_pylist(read_rows({"shard": "00001"}, shards)),
        DecodePlan(max_pixels=89_478_485, clip_preprocess=_tiny_preprocess()),
    )
    actor = EmbedActor(EmbedConfig(shards="x", out=str(tmp_path / "out"), batch_size=4), precision="auto")
    out = actor(batch)
    ok = out["error"] == NO_ERROR
    assert PIXELS not in out and SSCD_EMB not in out
    for kind in (IMG_EMB, TEXT_EMB):
        assert out[kind].shape == (8, 64) and out[kind].dtype == np.float16
        assert np.allclose(np.linalg.norm(out[kind][ok].astype(np.float32), axis=1), 1, atol=1e-3)
        assert not out[kind][~ok].any()


def _tiny_preprocess() -> dict:
    from pipeline.embed.clip_models import clip_spec

    return clip_spec(EmbedConfig(shards="x", out="x")).preprocess


def test_compute_plan_gpu_and_cpu_paths():
    cfg = EmbedConfig(shards="x", out="x")
    gpu = plan_compute(cfg, gpus=4, cpu_pool_size=15)
    assert (gpu.actors, gpu.num_gpus, gpu.precision, gpu.device) == (4, 1, "fp16", "cuda")
    assert gpu.remote_args() == {"num_gpus": 1}
    cpu = plan_compute(cfg, gpus=0, cpu_pool_size=1)
    assert (cpu.actors, cpu.num_gpus, cpu.precision, cpu.device) == (1, None, "fp32", "cpu")
    assert cpu.remote_args() == {}  # num_gpus left out, never 0 (ray#45201)
    chosen = dataclasses.replace(cfg, num_actors=8, precision="bf16")
    assert plan_compute(chosen, gpus=2, cpu_pool_size=15).actors == 2  # never more GPU actors than GPUs
    assert plan_compute(chosen, gpus=2, cpu_pool_size=15).precision == "bf16"
    assert plan_compute(chosen, gpus=0, cpu_pool_size=15).actors == 8


def test_progress_reports_rate_and_eta(caplog):
    now = [0.0]
    progress = Progress(partitions=4, every_s=10, clock=lambda: now[0])
    batch = pa.table(
        {"shard": ["a"] * 10, "shard_rows": [20] * 10, "error": [NO_ERROR] * 8 + ["empty_file: x"] * 2}
    )
    now[0] = 5.0
    with caplog.at_level("INFO", logger="pipeline.embed.embed"):
        progress.update(batch, completed=0)
        assert not caplog.records  # not due yet
        now[0] = 10.0
        progress.update(batch, completed=1)
    assert progress.embedded == 16 and progress.images_per_second() == pytest.approx(1.6)
    assert progress.eta_s() == pytest.approx(30.0)  # 4 partitions of ~20 rows, 20 rows in 10 s
    assert caplog.messages == ["embed: 20 rows, 1/4 partitions, 1.6 img/s, ETA 00:00:30"]


def test_reader_accepts_laion_style_folders(tmp_path: Path):
    """LAION's release: unpadded partition names, its own metadata columns, no markers."""
    rng = np.random.default_rng(0)
    for i in (0, 1, 2, 10):
        emb = rng.normal(size=(3, 8)).astype(np.float16)
        (tmp_path / "img_emb").mkdir(exist_ok=True)
        np.save(tmp_path / "img_emb" / f"img_emb_{i}.npy", emb)
        (tmp_path / "metadata").mkdir(exist_ok=True)
        laion = {
            "image_path": ["x"] * 3,
            "caption": [f"c{i}"] * 3,
            "NSFW": ["UNLIKELY"] * 3,
            "url": ["u"] * 3,
            "similarity": [0.3] * 3,
            "width": [10, 20, 30],
            "height": [1, 2, 3],
        }
        pq.write_table(pa.table(laion), tmp_path / "metadata" / f"metadata_{i}.parquet")
    parts = list_partitions(tmp_path)
    assert [p.name for p in parts] == ["0", "1", "2", "10"]
    assert parts[0].num_rows() == 3 and not parts[0].has(TEXT_EMB)
    table = load_metadata(tmp_path)
    assert table.schema == METADATA_SCHEMA and table.num_rows == 12
    assert table.column("phash").null_count == 12 and table.column("width").to_pylist()[:3] == [10, 20, 30]
    assert load_embeddings(tmp_path).shape == (12, 8)
    assert parts[0].metadata().column_names[0] == "image_path"  # the file's own columns when none asked
    with pytest.raises(FileNotFoundError, match="text_emb"):
        load_embeddings(tmp_path, TEXT_EMB)
    np.save(tmp_path / "img_emb" / "img_emb_2.npy", np.zeros((2, 8), np.float16))
    with pytest.raises(ValueError, match="not row-aligned"):
        parts[2].num_rows()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "1.done.json").write_text("{}")
    assert [p.name for p in list_partitions(tmp_path)] == ["1"]  # markers present: only finished ones


# --- the stage on Ray ----------------------------------------------------------------------------


@pytest.mark.slow
def test_counts_match_ingest_and_every_row_is_accounted_for(run):
    summary, ingest = run["summary"], run["ingest"]
    assert summary["rows_seen"] == ingest["rows_seen"] == summary["embedded"] + summary["skipped"]
    assert (
        summary["embedded"] == ingest["ok"] and summary["skipped_by_reason"] == ingest["rejected_by_reason"]
    )
    samples = pq.read_table(run["root"] / "ingest" / "samples.parquet").to_pandas()
    ok = samples[samples["status"] == "ok"].set_index(["shard", "key"])
    for name, counts in summary["per_partition"].items():
        ingested = ingest["per_shard"][name]
        assert (counts["rows_seen"], counts["embedded"]) == (ingested["rows_seen"], ingested["ok"]), name
        assert counts["skipped_by_reason"] == ingested["rejected_by_reason"], name
        marker = json.loads((Path(run["cfg"].out) / "done" / f"{name}.done.json").read_text())
        assert marker["rows_seen"] == marker["embedded"] + marker["skipped"] == counts["rows_seen"]
    meta = load_metadata(run["cfg"].out).to_pandas().set_index(["shard", "key"])
    assert sorted(meta.index) == sorted(ok.index)
    joined = meta.join(ok, rsuffix="_ingest")
    for column in ("sha256", "width", "height", "url", "caption"):
        assert (joined[column] == joined[f"{column}_ingest"]).all(), column
    assert summary["partitions"] == len(ingest["per_shard"]) == summary["partitions_processed"]
    for stage in (summary, ingest):
        assert stage["shards_incomplete"] == stage["shards_changed_during_read"] == []
        assert stage["shards_stats_mismatch"] == {}


@pytest.mark.slow
def test_outputs_are_row_aligned_unit_norm_float16(run):
    out = Path(run["cfg"].out)
    for name in ("00000", "00003", "00004", "image1") if run["peer"] else ("00000", "00003", "00004"):
        assert (out / "img_emb" / f"img_emb_{name}.npy").is_file()  # deterministic names, empty shards too
    for part in list_partitions(out):
        rows = part.num_rows()  # raises unless every file has the metadata's row count
        meta = part.metadata()
        assert meta.schema.equals(METADATA_SCHEMA) and meta.column("shard").to_pylist() == [part.name] * rows
        for kind, dim in ((IMG_EMB, 64), (TEXT_EMB, 64), (SSCD_EMB, 16)):
            emb = np.load(part.path(kind))
            assert emb.dtype == np.float16 and emb.shape == (rows, dim), (part.name, kind)
            assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-3), (
                part.name,
                kind,
            )
    first = pq.read_table(out / "metadata" / "metadata_00000.parquet")
    assert first.column("key").to_pylist() == [f"00000000{i}" for i in range(8)]  # shard order
    assert first.schema.metadata[b"embed_model"] == b"tiny-random-seed0"
    assert first.schema.metadata[b"semantic"] == b"false"
    summary = run["summary"]
    device = "cuda" if cluster_gpus() else "cpu"
    assert (summary["model"], summary["semantic"], summary["device"]) == ("tiny-random-seed0", False, device)
    assert summary["images_per_second"] > 0 and summary["embedded_this_run"] == summary["embedded"]


@pytest.mark.slow
def test_planted_duplicates_share_hashes_and_embeddings(run):
    outputs = read_outputs(run["cfg"].out)
    a, b = (outputs[name] for name in DEMO_SHARDS)
    for kind in (*EMBEDDING_KINDS, "sha256", "phash"):
        first = a[kind][-1] if kind in EMBEDDING_KINDS else a["meta"].column(kind)[-1].as_py()
        second = b[kind][-1] if kind in EMBEDDING_KINDS else b["meta"].column(kind)[-1].as_py()
        assert np.array_equal(first, second), kind
    assert not np.array_equal(a[IMG_EMB][0], b[IMG_EMB][0])


@pytest.mark.slow
def test_clip_retrieval_peer_shards_embed_with_empty_captions(run):
    if not run["peer"]:
        pytest.skip("../shared/data is not present beside this checkout")
    outputs = read_outputs(run["cfg"].out)
    assert [outputs[name]["meta"].num_rows for name in PEER_SHARDS] == [4, 3, 2, 2]
    empty_caption = outputs["image1"][TEXT_EMB][0]
    originals = outputs["image1"]["meta"].to_pylist()
    for name in ("image3", "image4"):
        for i, row in enumerate(outputs[name]["meta"].to_pylist()):
            assert row["caption"] == "" and row["url"] == ""
            j = next(k for k, orig in enumerate(originals) if orig["key"] == row["key"])
            assert (row["sha256"], row["phash"]) == (originals[j]["sha256"], originals[j]["phash"])
            for kind in EMBEDDING_KINDS:
                assert np.array_equal(outputs[name][kind][i], outputs["image1"][kind][j]), (name, kind)
            assert np.array_equal(outputs[name][TEXT_EMB][i], empty_caption)


def _load_job():
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("embed_job", REPO / "jobs" / "embed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_second_run_through_the_job_is_a_no_op(run, capsys):
    out = Path(run["cfg"].out)
    mtimes = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "embed_summary.json"
    }
    cfg = run["cfg"]
    argv = [
        "--shards",
        cfg.shards,
        "--out",
        cfg.out,
        "--batch-size",
        "8",
        "--sscd-checkpoint",
        cfg.sscd_checkpoint,
        "--sscd-image-size",
        "64",
        "--no-require-stats",
        "--no-ray-progress-bars",
    ]
    summary = _load_job().main(argv)
    assert summary["partitions_processed"] == 0 and summary["partitions_skipped"] == summary["partitions"]
    assert summary["embedded_this_run"] == 0  # no model work: no actor, no batch
    assert "per_partition" not in summary
    same = ("rows_seen", "embedded", "skipped", "model", "semantic", "dim", "precision")
    assert {k: summary[k] for k in same} == {k: run["summary"][k] for k in same}  # read from the markers
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


@pytest.mark.slow
def test_a_model_option_that_cannot_work_costs_no_finished_partition(run, tmp_path: Path):
    """A typo in the model name changes the fingerprint, so every partition is to be redone; the model
    is checked before any of them is touched, and the right name afterwards finds them all still done."""
    out = tmp_path / "out"
    shutil.copytree(run["cfg"].out, out)
    cfg = dataclasses.replace(run["cfg"], out=str(out))
    markers = {p.name: p.read_bytes() for p in (out / "done").iterdir()}
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-23'"):
        run_embed(dataclasses.replace(cfg, model="ViT-B-23"))
    assert {p.name: p.read_bytes() for p in (out / "done").iterdir()} == markers
    again = run_embed(cfg)
    assert again["partitions_processed"] == 0 and again["embedded"] == run["summary"]["embedded"]


@pytest.mark.slow
def test_resume_after_a_killed_driver_and_a_killed_actor_gives_identical_outputs(run, tmp_path: Path):
    """A killed job left two partitions unmarked (one half-written); this run also loses its actor process."""
    out = tmp_path / "out"
    shutil.copytree(run["cfg"].out, out)
    for name in DEMO_SHARDS:
        (out / "done" / f"{name}.done.json").unlink()
    (out / "img_emb" / "img_emb_00005.npy").write_bytes(b"\x93NUMPY half written")
    (out / "metadata" / ".metadata_00006.parquet.tmp-4242").write_bytes(b"left by a killed writer")
    kept = {p: p.stat().st_mtime_ns for p in (out / "done").iterdir()}
    fault = tmp_path / "actor-killed"

    class ActorKilledOnce(EmbedActor):
        """Kills its own process (``os._exit``: a real worker death) at its second batch, once per run."""

        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2:
                try:  # O_EXCL: only the first actor to get here, across processes and restarts
                    os.close(os.open(fault, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    os._exit(1)
                except FileExistsError:
                    pass
            return super().__call__(batch)

    summary = run_embed(dataclasses.replace(run["cfg"], out=str(out)), actor_cls=ActorKilledOnce)

    assert fault.exists()  # the actor process did exit mid-run (os._exit), and Ray restarted it
    assert summary["partitions_processed"] == 2 and summary["embedded_this_run"] == 32
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished partitions were not redone
    expected, actual = read_outputs(run["cfg"].out), read_outputs(out)
    assert actual.keys() == expected.keys()
    for name, files in expected.items():
        assert actual[name]["meta"].equals(files["meta"]), name
        for kind in EMBEDDING_KINDS:
            assert np.array_equal(actual[name][kind], files[kind]), (name, kind)
    assert {k: summary[k] for k in ("rows_seen", "embedded", "skipped_by_reason")} == {
        k: run["summary"][k] for k in ("rows_seen", "embedded", "skipped_by_reason")
    }


@pytest.mark.slow
def test_only_complete_unchanged_fully_counted_shards_are_embedded(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Issue 12, item 3, on embed's side: the same shards ingest leaves for later get no partition."""
    folder = tmp_path / "shards"

    def photos(shard: int, n: int) -> list:
        return [sample(f"{shard:05d}{i:04d}", encode(random_photo(shard * 100 + i))) for i in range(n)]

    write_shard(folder, 0, photos(0, 2))
    write_shard(folder, 1, photos(1, 2), with_stats=False)  # still downloading
    write_shard(folder, 2, photos(2, 2))
    (folder / "00002_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    write_shard(folder, 3, photos(3, 2))
    original = PartitionWriter.__call__

    def grows_while_read(self, name, rows):
        if name == "00003":  # img2dataset rewrote the shard after the reader's pass
            write_shard(folder, 3, photos(3, 3))
        return original(self, name, rows)

    monkeypatch.setattr(PartitionWriter, "__call__", grows_while_read)
    out = tmp_path / "out"
    summary = run_embed(EmbedConfig(shards=str(folder), out=str(out), batch_size=8, decode_batch_size=8))

    assert summary["shards_incomplete"] == ["00001"]
    assert summary["shards_changed_during_read"] == ["00003"]
    assert summary["shards_stats_mismatch"] == {"00002": {"rows_seen": 2, "stats_count": 3}}
    assert list(summary["per_partition"]) == ["00000"] and summary["partitions"] == 1
    assert (summary["partitions_processed"], summary["partitions_skipped"]) == (1, 0)
    assert summary["embedded"] == 2
    assert sorted(p.name for p in (out / "done").iterdir()) == ["00000.done.json"]
    assert [p.name for p in list_partitions(out)] == ["00000"]  # later stages see only the finished one


@pytest.mark.slow
def test_unfetchable_pretrained_weights_stop_the_run_before_any_output(ray_local, tmp_path: Path):
    build_shards(tmp_path / "shards", None)
    cfg = EmbedConfig(
        shards=str(tmp_path / "shards"),
        out=str(tmp_path / "out"),
        model="ViT-B-32",
        pretrained="laion2b_s34b_b79k",
    )
    with pytest.raises(ModelLoadError, match="refusing to fall back to random weights"):
        run_embed(cfg)
    assert not (tmp_path / "out" / "img_emb").exists()


@pytest.mark.slow
@pytest.mark.gpu
def test_gpu_actor_pool_embeds_in_half_precision(run):
    """With a GPU in the cluster the module's run went to one fp16 GPU actor; it agrees with fp32 on CPU."""
    if cluster_gpus() == 0:
        pytest.skip("the Ray cluster has no GPU")
    summary = run["summary"]
    assert (summary["device"], summary["precision"], summary["actors"]) == ("cuda", "fp16", cluster_gpus())
    shards = {s.name: s for s in list_shards(run["cfg"].shards)}
    batch = prepare_batch(
        pa.Table.from_pylist(read_rows({"shard": "00005"}, shards)),
        DecodePlan(max_pixels=run["cfg"].max_image_pixels, clip_preprocess=_tiny_preprocess()),
    )
    on_cpu = load_clip(run["cfg"], "cpu").encode_images(batch[PIXELS], 8).astype(np.float32)
    on_gpu = np.load(Path(run["cfg"].out) / "img_emb" / "img_emb_00005.npy").astype(np.float32)
    assert (on_cpu * on_gpu).sum(axis=1).min() > 0.99
