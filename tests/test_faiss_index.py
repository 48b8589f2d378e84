"""FAISS index: choice from N and a memory budget, recall against brute force, mmap loading, index stage."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import IndexConfig
from pipeline.core.storage import atomic_write_bytes, atomic_write_table
from pipeline.index.build import DUP_INDEX_NAME, INDEX_NAME, INFO_NAME, ROWS_NAME, run_build_index
from pipeline.index.faiss_index import (
    build_index,
    default_nlist,
    exact_search,
    index_description,
    load_index,
    plan_index,
    save_index,
    search_params,
    set_search_params,
    tie_aware_recall,
    tune_search,
)
from pipeline.io.embeddings import METADATA_SCHEMA, embedding_path, metadata_path, normalize

REPO = Path(__file__).resolve().parent.parent


def clustered(n: int, d: int, seed: int = 0, clusters: int = 100) -> np.ndarray:
    """L2-normalised float32 vectors around random centres (embeddings are clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d)) * 0.7
    return normalize(x.astype(np.float16))


def brute_force_recall(index: faiss.Index, x: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    true_scores, _ = exact_search(x, queries, k)
    _, found = index.search(queries, k)
    return tie_aware_recall(x, queries, found, true_scores, k)


# ----------------------------------------------------------------------------------------------
# Choice.
# ----------------------------------------------------------------------------------------------


def test_auto_choice_follows_n_and_the_memory_budget():
    assert plan_index(50_000, 512).kind == "flat"
    # Above flat_max_n, while the full vectors fit: IVF-Flat (over the shared cells, lists on disk).
    assert plan_index(500_000, 512, memory_budget_mb=4096).kind == "ivf_flat"
    assert plan_index(3_000_000, 512, memory_budget_mb=8192).kind == "ivf_flat"
    assert plan_index(3_000_000, 512, memory_budget_mb=4096).kind == "ivf_pq"
    # LAION scale: only PQ codes fit; the largest code that fits the budget is chosen.
    laion = plan_index(2_000_000_000, 768, memory_budget_mb=100_000)
    assert laion.kind == "ivf_pq" and laion.factory == "IVF262144_HNSW32,PQ32x8"
    assert laion.estimated_bytes <= 100_000 * 2**20
    assert plan_index(2_000_000_000, 768, memory_budget_mb=200_000).pq_m == 96
    # A flat index that does not fit the budget is not chosen even for small N.
    assert plan_index(90_000, 512, memory_budget_mb=100).kind != "flat"


def test_forced_kinds_nlist_and_errors():
    assert plan_index(20_000, 64, kind="ivf_pq").factory == "IVF512,PQ32x8"
    assert plan_index(20_000, 64, kind="ivf_pq", pq_m=8, opq=True).factory == "OPQ8,IVF512,PQ8x8"
    assert plan_index(20_000, 64, kind="hnsw", hnsw_m=16).factory == "HNSW16,Flat"
    assert plan_index(1_000, 64, kind="ivf_flat", nlist=4096).nlist == 25  # at most N/39 lists
    assert default_nlist(1_000_000) == 16_384 and default_nlist(250_000) == 2048
    with pytest.raises(ValueError, match="unknown index kind"):
        plan_index(10, 8, kind="lsh")
    with pytest.raises(ValueError, match="must divide"):
        plan_index(20_000, 64, kind="ivf_pq", pq_m=7)
    with pytest.raises(ValueError, match="fits memory_budget_mb"):
        plan_index(10**10, 768, memory_budget_mb=1)


# ----------------------------------------------------------------------------------------------
# Recall against brute force, and tuning.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_recall_at_10_against_brute_force(kind):
    data = clustered(20_300, 64, seed=1)
    x, queries = data[:20_000], data[20_000:]
    plan = plan_index(len(x), x.shape[1], kind=kind)
    index = build_index(x, plan, seed=0)
    check = tune_search(index, x, k=10, sample=300, target_recall=0.95)
    assert check["target_reached"] and check["recall_at_k"] >= 0.95
    # Held-out queries (not indexed rows) reach the same recall with the tuned settings.
    assert brute_force_recall(index, x, queries) >= 0.95
    if kind == "flat":
        assert check["param"] is None and check["recall_at_k"] == 1.0
    else:
        assert check["param"] in ("nprobe", "ef_search") and check["tried"][-1]["value"] == check["value"]


@pytest.fixture()
def one_thread():
    """PQ training runs 256-centroid k-means in 4-dimensional subspaces; on a busy 2-core machine
    OpenMP's second thread makes that several times slower, so this test trains on one."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def test_ivf_pq_is_built_and_its_recall_is_measured(one_thread):
    x = clustered(4_000, 32, seed=2)
    plan = plan_index(len(x), 32, kind="ivf_pq", pq_m=8, nlist=32)
    index = build_index(x, plan, train_size=4_000)
    check = tune_search(index, x, k=10, sample=200, target_recall=0.99)
    assert 0.3 < check["recall_at_k"] <= 1.0  # PQ codes are lossy; the self-check says by how much
    assert search_params(index)["nprobe"] == check["value"]


def test_recall_is_tie_aware_for_identical_vectors():
    # 12 identical vectors (a byte-identical image): any 10 of them are the right answer.
    x = normalize(np.vstack([np.ones((12, 8)), np.eye(8)]).astype(np.float32))
    q = x[:1]
    true_scores, _ = exact_search(x, q, 10)
    other_ten = np.arange(2, 12)[None, :]
    assert tie_aware_recall(x, q, other_ten, true_scores, 10) == 1.0
    wrong = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 12, 13]])
    assert tie_aware_recall(x, q, wrong, true_scores, 10) == 0.8


# ----------------------------------------------------------------------------------------------
# Saving and memory-mapped loading.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_mmap_loading_gives_the_same_answers(tmp_path, kind):
    x = clustered(5_000, 32, seed=3)
    index = build_index(x, plan_index(len(x), 32, kind=kind))
    tune_search(index, x, sample=100)
    save_index(index, tmp_path / "i.index")
    assert not list(tmp_path.glob(".*"))  # the temporary name is gone
    mapped = load_index(tmp_path / "i.index", mmap=True)
    loaded = load_index(tmp_path / "i.index", mmap=False)
    queries = x[:50]
    for other in (mapped, loaded):
        assert np.array_equal(other.search(queries, 5)[1], index.search(queries, 5)[1])
        assert index_description(other) == index_description(index)


def test_mmap_keeps_the_vectors_out_of_the_heap(tmp_path):
    """The mmap load maps the index file into the address space instead of copying it to the heap.

    Checked through /proc/self/maps (which files are mapped, and how big the mapping is), not through
    RSS growth: how much the heap grows on a copy depends on what the process freed before.
    """
    x = clustered(100_000, 128, seed=4)  # 51 MB of float32
    index = faiss.IndexFlatIP(128)
    index.add(x)
    path = tmp_path / "big.index"
    save_index(index, path)
    del index
    loaded = load_index(path, mmap=False)
    assert _mapped_bytes(path) == 0  # read into the heap and closed
    mapped = load_index(path, mmap=True)
    assert _mapped_bytes(path) >= 100_000 * 128 * 4  # the whole vector block is a file mapping
    assert mapped.ntotal == loaded.ntotal == 100_000
    assert np.array_equal(mapped.search(x[:20], 3)[1], loaded.search(x[:20], 3)[1])


def _mapped_bytes(path) -> int:
    """Bytes of address space mapped from ``path`` in this process."""
    total = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            total += hi - lo
    return total


def test_missing_index_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index file"):
        load_index(tmp_path / "nope.index")


# ----------------------------------------------------------------------------------------------
# The index stage over an embedding folder.
# ----------------------------------------------------------------------------------------------


def write_embedding_folder(folder: Path, parts: list[np.ndarray]) -> list[str]:
    """A LAION-layout folder (img_emb + metadata per partition), float16 like the embed stage's."""
    keys = []
    for p, x in enumerate(parts):
        name = f"{p:05d}"
        buf = io.BytesIO()
        np.save(buf, x.astype(np.float16))
        atomic_write_bytes(embedding_path(folder, "img_emb", name), buf.getvalue())
        part_keys = [f"{name}{i:04d}" for i in range(len(x))]
        keys += part_keys
        n = len(x)
        table = pa.table(
            {
                "key": part_keys,
                "caption": [f"caption {k}" for k in part_keys],
                "url": [""] * n,
                "sha256": [""] * n,
                "width": pa.array([64] * n, pa.int32()),
                "height": pa.array([64] * n, pa.int32()),
                "shard": [name] * n,
                "phash": pa.array([0] * n, pa.uint64()),
            },
            schema=METADATA_SCHEMA,
        )
        atomic_write_table(metadata_path(folder, name), table)
    return keys


def test_index_stage_writes_index_rows_info_and_duplicates_subindex(tmp_path):
    x = clustered(3_000, 32, seed=5)
    keys = write_embedding_folder(tmp_path / "emb", [x[:1_000], x[1_000:]])
    dup_rows = np.array([5, 6, 1_500, 2_999])
    atomic_write_table(tmp_path / "dups.parquet", pa.table({"row_id": pa.array(dup_rows, pa.int64())}))
    cfg = IndexConfig(
        embeddings=str(tmp_path / "emb"),
        out=str(tmp_path / "index"),
        kind="hnsw",
        duplicates=str(tmp_path / "dups.parquet"),
    )
    summary = run_build_index(cfg)
    assert summary["kind"] == "hnsw" and summary["rows"] == 3_000 and summary["recall_at_k"] >= 0.95
    out = tmp_path / "index"
    info = json.loads((out / INFO_NAME).read_text())
    assert info["self_check"]["target_reached"] and info["plan"]["factory"] == "HNSW32,Flat"
    rows = pq.read_table(out / ROWS_NAME)
    assert rows.column("key").to_pylist() == keys
    assert rows.column("row_id").to_pylist() == list(range(3_000))
    assert rows.column("partition_row").to_pylist()[1_000] == 0
    index = load_index(out / INDEX_NAME)
    assert index.ntotal == 3_000 and search_params(index)["ef_search"] == info["index"]["ef_search"]
    # Stored float16 vectors, normalised again, are what the index holds.
    stored = normalize(np.load(tmp_path / "emb" / "img_emb" / "img_emb_00001.npy"))
    assert index.search(stored[:3], 1)[1][:, 0].tolist() == [1_000, 1_001, 1_002]
    sub = load_index(out / DUP_INDEX_NAME)
    assert sub.ntotal == 4
    _, ids = sub.search(stored[500:501], 1)
    assert ids[0, 0] == 1_500  # ids of the sub-index are bundle row ids
    # A re-run with the same options is a no-op; a changed option rebuilds.
    mtime = (out / INDEX_NAME).stat().st_mtime_ns
    assert run_build_index(cfg)["skipped"] is True
    assert (out / INDEX_NAME).stat().st_mtime_ns == mtime
    again = run_build_index(IndexConfig(embeddings=cfg.embeddings, out=cfg.out, kind="flat"))
    assert again["skipped"] is False and again["kind"] == "flat"


def test_ivf_over_cells_is_built_from_parts_with_its_lists_on_disk(tmp_path):
    """ivf_flat: the cells' centroids as quantizer, one part per partition merged into image.ivfdata;
    the folder can be moved, the answers stay those of exact search, the self-check streams its truth."""
    import shutil

    from pipeline.core.config import CellsConfig

    x = clustered(12_000, 32, seed=7)
    write_embedding_folder(tmp_path / "emb", [x[:5_000], x[5_000:9_000], x[9_000:]])
    cfg = IndexConfig(embeddings=str(tmp_path / "emb"), out=str(tmp_path / "index"), kind="ivf_flat")
    summary = run_build_index(cfg, cells=CellsConfig(rows_per_cell=300))
    assert summary["kind"] == "ivf_flat" and summary["factory"] == "IVF40,Flat" and summary["rows"] == 12_000
    assert summary["recall_at_k"] >= 0.95
    out = tmp_path / "index"
    assert (out / "image.ivfdata").stat().st_size >= 12_000 * 32 * 4  # the vectors live in the lists file
    assert not list(out.glob(".*"))  # the parts are merged and removed
    info = json.loads((out / INFO_NAME).read_text())
    assert info["self_check"]["target_reached"] and info["plan"]["nlist"] == 40
    shutil.move(str(out), str(tmp_path / "moved"))
    index = load_index(tmp_path / "moved" / INDEX_NAME)
    assert index.ntotal == 12_000 and search_params(index)["nlist"] == 40
    set_search_params(index, nprobe=info["index"]["nprobe"])
    queries = clustered(12_200, 32, seed=7)[12_000:]  # same centres, rows not indexed
    assert brute_force_recall(index, x, queries) >= 0.95
    # Row ids follow partition order across parts.
    assert index.search(x[9_000:9_003], 1)[1][:, 0].tolist() == [9_000, 9_001, 9_002]


@pytest.mark.slow
def test_build_index_job_cli(tmp_path, ray_local):
    x = clustered(500, 16, seed=6)
    write_embedding_folder(tmp_path / "emb", [x])
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import build_index
    finally:
        sys.path.remove(str(REPO / "jobs"))
    summary = build_index.main(
        ["--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--kind", "ivf_flat"]
    )
    assert (
        summary["job"] == "build_index" and summary["kind"] == "ivf_flat" and summary["recall_at_k"] >= 0.95
    )


def test_on_disk_merge_writes_every_list_of_every_part_in_faiss_layout(tmp_path):
    """The merge written list range by list range (here a few lists at a time) answers exactly as the
    same IVF built in memory over all rows."""
    from pipeline.core.storage import atomic_write_array
    from pipeline.index.cells import CENTROIDS, assign_path, nearest_cells
    from pipeline.index.ivf_cells import add_partition, empty_index, merge_parts

    x = clustered(3_000, 16, seed=9)
    write_embedding_folder(tmp_path / "emb", [x[:1_000], x[1_000:]])
    centroids = x[::100]  # 30 cells
    atomic_write_array(tmp_path / "cells" / CENTROIDS, centroids)
    stored = normalize(x.astype(np.float16))  # as the partitions hold them, read back
    for name, rows in (("00000", stored[:1_000]), ("00001", stored[1_000:])):
        atomic_write_array(assign_path(tmp_path / "cells", name), nearest_cells(rows, centroids, 1, 0.0))
    names = [
        add_partition(
            str(tmp_path / "emb"), name, start, str(tmp_path / "cells"), str(tmp_path / "parts"), "img_emb"
        )
        for name, start in (("00000", 0), ("00001", 1_000))
    ]
    ntotal = merge_parts(
        str(tmp_path / "cells"), str(tmp_path / "parts"), names, str(tmp_path / "m.index"), 2_000
    )
    merged = load_index(tmp_path / "m.index")
    reference = empty_index(centroids)
    reference.add_with_ids(stored, np.arange(3_000))
    assert ntotal == merged.ntotal == 3_000
    for nprobe in (1, 4):
        set_search_params(merged, nprobe=nprobe)
        set_search_params(reference, nprobe=nprobe)
        found, expected = merged.search(x[::37], 8), reference.search(x[::37], 8)
        assert np.array_equal(found[1], expected[1]) and np.allclose(found[0], expected[0])
