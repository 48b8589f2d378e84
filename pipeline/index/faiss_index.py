"""FAISS indexes over L2-normalised embeddings: choice, training, tuning, recall self-check, mmap I/O.

Every index here is an inner-product index over L2-normalised float32 vectors, so a score is the
cosine similarity (higher is more similar) and row ids are positions in the indexed matrix.

Choice (:func:`plan_index`), after the FAISS guidelines and autofaiss's rules (see BENCHMARKS.md):

============  ===========================================  ===============================================
kind          FAISS factory                                chosen by ``auto`` when
============  ===========================================  ===============================================
``flat``      ``Flat``                                     N <= ``flat_max_n`` and 4*d*N bytes fit the budget
``ivf_flat``  ``IVF{nlist},Flat``                          (4*d + 8)*N bytes fit
``ivf_pq``    ``[OPQ{m},]IVF{nlist}[_HNSW32],PQ{m}x8``     otherwise: largest m (bytes per vector) that fits
``hnsw``      ``HNSW{M},Flat``                             never (only when asked for)
============  ===========================================  ===============================================

The index stage builds ``ivf_flat`` over the shared k-means cells, in parallel and with its lists on
disk (:mod:`pipeline.index.ivf_cells`); the other kinds are built here, in one process holding every
vector. ``nlist`` of ``ivf_pq`` defaults to ~4*sqrt(N) (a power of two) below a million vectors and
to 2^14..2^18 above, as autofaiss does. IVF k-means and PQ/OPQ training run on a seeded sample of at
most ``train_size`` vectors (k-means on GPU when FAISS sees one). OPQ is optional (``opq``) and off
by default: training it on 32k x 512 vectors had not finished after ten minutes on the project's
2-core machine. After building, :func:`tune_recall` raises ``nprobe`` (IVF) or ``efSearch`` (HNSW)
until recall@k against exact search on a seeded sample of the indexed rows (leave-one-out: each
query's own row is taken out of both answers) reaches the target; the measured recall is what the
manifest records.

Recall is tie-aware: a returned row counts as a true neighbour when its exact similarity to the query
is at least the k-th best exact similarity (minus 1e-5). Byte-identical images have identical
embeddings, and an index may return any k of a group of equal vectors; plain id overlap would count
that as a miss.

Saved indexes load memory-mapped (:func:`load_index`): flat codes, HNSW storage and IVF lists stay in
the page cache instead of the process's heap, so an index larger than RAM can be searched. An index
whose lists live in a ``.ivfdata`` file beside it (``ivf_flat``) is opened with that file found in
the index's own folder, wherever it was copied.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.lazy import faiss
from pipeline.core.ray_runtime import gpu_count
from pipeline.core.storage import publish_tmp, unique_tmp_path

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")
#: PQ code sizes (bytes per vector) tried for ``ivf_pq``, largest first (each must divide d).
PQ_M_CHOICES = (256, 128, 96, 64, 48, 32, 24, 16, 8, 4)
#: k-means iterations of IVF training (FAISS's default is 25; 10 loses little and halves training).
KMEANS_ITERATIONS = 10
#: Tolerance of the tie-aware recall (float32 inner products of unit vectors).
TIE_EPS = 1e-5
#: Suffix of the inverted-list data file beside an index whose lists are on disk (``image.ivfdata``).
ONDISK_SUFFIX = ".ivfdata"
#: FAISS GPU k-selection limit (faiss/gpu/utils/DeviceDefs.cuh).
GPU_MAX_K = 2048


@dataclass(frozen=True)
class IndexPlan:
    """Which index to build and why.

    Attributes:
        kind (`str`): one of :data:`KINDS`.
        factory (`str`): the ``faiss.index_factory`` string.
        n (`int`): vectors to index.
        d (`int`): their dimension.
        nlist (`int`, *optional*): IVF lists.
        pq_m (`int`, *optional*): PQ bytes per vector.
        hnsw_m (`int`, *optional*): HNSW links per node.
        estimated_bytes (`int`): memory the built index takes (codes, ids, graph, centroids).
        reason (`str`): why this kind was chosen.
    """

    kind: str
    factory: str
    n: int
    d: int
    nlist: int | None
    pq_m: int | None
    hnsw_m: int | None
    estimated_bytes: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_nlist(n: int) -> int:
    """IVF list count for N vectors: ~4*sqrt(N) below 1M (a power of two), then 2^14, 2^16, 2^18."""
    if n >= 100_000_000:
        nlist = 1 << 18
    elif n >= 10_000_000:
        nlist = 1 << 16
    elif n >= 1_000_000:
        nlist = 1 << 14
    else:
        nlist = 1 << max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return clamp_nlist(nlist, n)


def clamp_nlist(nlist: int, n: int) -> int:
    """At most N/39 lists: k-means wants 39 training points per centroid (FAISS warns below)."""
    return max(1, min(nlist, n // 39 if n >= 39 else 1))


def estimate_bytes(kind: str, n: int, d: int, *, hnsw_m: int = 32, nlist: int = 1, pq_m: int = 0) -> int:
    """Memory of a built index: codes, ids (8 bytes per vector in IVF lists), graph links, centroids."""
    if kind == "flat":
        return 4 * d * n
    if kind == "hnsw":
        return (4 * d + 8 * hnsw_m) * n
    if kind == "ivf_flat":
        return (4 * d + 8) * n + 4 * d * nlist
    if kind == "ivf_pq":
        return (pq_m + 8) * n + 4 * d * nlist + 4 * d * d + 4 * 256 * d
    raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")


def _pq_m_choices(d: int) -> list[int]:
    return [m for m in PQ_M_CHOICES if 2 * m <= d and d % m == 0]


def plan_index(
    n: int,
    d: int,
    *,
    kind: str = "auto",
    memory_budget_mb: int = 4096,
    flat_max_n: int = 100_000,
    hnsw_m: int = 32,
    nlist: int | None = None,
    pq_m: int | None = None,
    opq: bool = False,
) -> IndexPlan:
    """Choose the index for ``n`` vectors of dimension ``d`` (see the module docstring's table).

    Raises:
        ValueError: unknown ``kind``, or nothing fits the budget (even the smallest PQ code).
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
    if n <= 0:
        raise ValueError("cannot build an index over zero vectors")
    budget = memory_budget_mb * 1024 * 1024
    lists = clamp_nlist(nlist, n) if nlist else default_nlist(n)
    ivf_suffix = "_HNSW32" if lists >= 65_536 else ""

    def make(k: str, reason: str, m: int | None = None) -> IndexPlan:
        if k == "flat":
            return IndexPlan(k, "Flat", n, d, None, None, None, estimate_bytes(k, n, d), reason)
        if k == "hnsw":
            size = estimate_bytes(k, n, d, hnsw_m=hnsw_m)
            return IndexPlan(k, f"HNSW{hnsw_m},Flat", n, d, None, None, hnsw_m, size, reason)
        if k == "ivf_flat":
            size = estimate_bytes(k, n, d, nlist=lists)
            return IndexPlan(k, f"IVF{lists}{ivf_suffix},Flat", n, d, lists, None, None, size, reason)
        assert m is not None
        size = estimate_bytes(k, n, d, nlist=lists, pq_m=m)
        factory = f"{f'OPQ{m},' if opq else ''}IVF{lists}{ivf_suffix},PQ{m}x8"
        return IndexPlan(k, factory, n, d, lists, m, None, size, reason)

    choices = _pq_m_choices(d)
    if kind == "ivf_pq" or kind == "auto":
        fitting = [m for m in choices if estimate_bytes("ivf_pq", n, d, nlist=lists, pq_m=m) <= budget]
    if kind != "auto":
        if kind == "ivf_pq":
            if pq_m is not None:
                if pq_m not in choices:
                    raise ValueError(f"pq_m={pq_m} must divide d={d}; choose one of {choices}")
                m = pq_m
            elif fitting:
                m = fitting[0]
            elif choices:
                m = choices[-1]
            else:
                raise ValueError(f"no PQ code size divides d={d}")
            return make(kind, "forced by configuration", m)
        return make(kind, "forced by configuration")
    mb = memory_budget_mb
    if n <= flat_max_n and estimate_bytes("flat", n, d) <= budget:
        return make("flat", f"N={n} <= flat_max_n={flat_max_n} and fits {mb} MiB: exact search")
    if estimate_bytes("ivf_flat", n, d, nlist=lists) <= budget:
        return make("ivf_flat", f"full vectors fit {mb} MiB in IVF lists (nlist={lists})")
    if pq_m is not None:
        if pq_m not in choices:
            raise ValueError(f"pq_m={pq_m} must divide d={d}; choose one of {choices}")
        return make("ivf_pq", f"full vectors exceed {mb} MiB; PQ{pq_m} as configured", pq_m)
    if not fitting:
        need = estimate_bytes("ivf_pq", n, d, nlist=lists, pq_m=choices[-1]) if choices else 0
        raise ValueError(
            f"no index over N={n}, d={d} fits memory_budget_mb={mb}: the smallest (PQ{choices[-1:]}) "
            f"needs {need / 2**20:.0f} MiB"
        )
    return make(
        "ivf_pq", f"full vectors exceed {mb} MiB; PQ{fitting[0]} is the largest code that fits", fitting[0]
    )


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of row numbers, sorted (sequential reads of memory-mapped inputs)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index: faiss.Index) -> Any:
    sub = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    sub = faiss.downcast_index(sub)
    return sub.hnsw if hasattr(sub, "hnsw") else None


def build_index(
    vectors: np.ndarray,
    plan: IndexPlan,
    *,
    train_size: int = 131_072,
    seed: int = 0,
    ef_construction: int = 80,
    use_gpu: bool = True,
    add_batch: int = 65_536,
) -> faiss.Index:
    """Build ``plan`` over normalised float32 ``vectors``: train on a seeded sample, then add all rows.

    With a GPU (and ``use_gpu``), IVF k-means runs on it; the index itself stays a CPU index, ready
    to save and to memory-map.
    """
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] != plan.d:
        raise ValueError(f"expected float32 (N, {plan.d}) vectors, got {vectors.dtype} {vectors.shape}")
    index = faiss.index_factory(plan.d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _ivf_of(index)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = seed
        ivf_pq = faiss.downcast_index(ivf)
        if isinstance(ivf_pq, faiss.IndexIVFPQ):
            # Polysemous code training (on by default) only serves Hamming pre-filtering, which is not
            # used here, and it dominates training time (seconds for a few thousand vectors).
            ivf_pq.do_polysemous_training = False
        if gpu_count(use_gpu):
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.efConstruction = ef_construction
    if not index.is_trained:
        rows = _sample_rows(len(vectors), min(len(vectors), train_size), seed)
        started = time.monotonic()
        index.train(np.ascontiguousarray(vectors[rows]))
        log.info(
            "index %s: trained on %d vectors in %.1fs", plan.factory, len(rows), time.monotonic() - started
        )
    if ivf is not None:
        ivf.clustering_index = None
    for lo in range(0, len(vectors), add_batch):
        index.add(np.ascontiguousarray(vectors[lo : lo + add_batch]))
    return index


def set_search_params(index: faiss.Index, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set IVF ``nprobe`` and HNSW ``efSearch`` wherever they live (pre-transforms, quantizers)."""
    ivf = _ivf_of(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    hnsw = _hnsw_of(index)
    if ef_search is not None and hnsw is not None:
        hnsw.efSearch = int(ef_search)


def wide_search(index: faiss.Index, k: int, lists_per_k: float = 8.0) -> Any:
    """Search parameters for a large ``k`` (G_dup's 1,000): an IVF index probes enough lists to hold
    ``lists_per_k`` times k rows on average, at least its tuned ``nprobe`` (which was tuned for k = 10);
    None (the index's own settings) for other kinds."""
    ivf = _ivf_of(index)
    if ivf is None:
        return None
    rows_per_list = max(1.0, ivf.ntotal / max(1, ivf.nlist))
    nprobe = max(int(ivf.nprobe), int(np.ceil(lists_per_k * k / rows_per_list)))
    return faiss.SearchParametersIVF(nprobe=int(min(nprobe, ivf.nlist)))


def search_params(index: faiss.Index) -> dict[str, int]:
    """The index's current ``nprobe``/``nlist`` (IVF) and ``efSearch`` (HNSW)."""
    params: dict[str, int] = {}
    ivf = _ivf_of(index)
    if ivf is not None:
        params.update(nprobe=int(ivf.nprobe), nlist=int(ivf.nlist))
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        params["ef_search"] = int(hnsw.efSearch)
    return params


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, use_gpu: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product k-NN of ``queries`` among ``vectors`` (the ground truth)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    if gpu_count(use_gpu) and k <= GPU_MAX_K:
        flat = faiss.index_cpu_to_all_gpus(flat)
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(vectors)))


def tie_aware_recall(
    vectors: np.ndarray | Callable[[np.ndarray], np.ndarray],
    queries: np.ndarray,
    found: np.ndarray,
    true_scores: np.ndarray,
    k: int,
) -> float:
    """Mean fraction of the k returned rows whose exact similarity reaches the k-th best exact one.

    Args:
        vectors: the indexed (normalised) vectors, or a function giving those of some row ids
            (:class:`~pipeline.io.embeddings.EmbeddingRows`), to score the returned rows exactly.
        queries (`np.ndarray`): the queries, ``(Q, d)``.
        found (`np.ndarray`): returned row ids, ``(Q, >=k)``; -1 marks a missing result.
        true_scores (`np.ndarray`): exact top-k similarities, ``(Q, >=k)``, best first.
        k (`int`): the k of recall@k (capped at the number of vectors).
    """
    fetch = vectors if callable(vectors) else vectors.__getitem__
    k = min(k, found.shape[1], true_scores.shape[1])
    if k == 0 or len(queries) == 0:
        return 1.0
    hits = 0
    kth = true_scores[:, k - 1]
    for q in range(len(queries)):
        ids = found[q, :k]
        ids = np.unique(ids[ids >= 0])
        if len(ids) == 0:
            continue
        scores = fetch(ids) @ queries[q]
        hits += min(k, int((scores >= kth[q] - TIE_EPS).sum()))
    return hits / (k * len(queries))


def _drop_self(ids: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query row's own id from its (k+1)-result list (else the last result): k remain."""
    q, width = ids.shape
    is_self = ids == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), width - 1)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(q), drop] = False
    return ids[keep].reshape(q, width - 1), scores[keep].reshape(q, width - 1)


def tune_search(
    index: faiss.Index,
    vectors: np.ndarray,
    *,
    k: int = 10,
    sample: int = 1_000,
    target_recall: float = 0.95,
    seed: int = 0,
    use_gpu: bool = True,
) -> dict[str, Any]:
    """:func:`tune_recall` with its ground truth from ``vectors`` held in memory (a seeded sample)."""
    rows = _sample_rows(len(vectors), min(sample, len(vectors)), seed + 1)
    queries = np.ascontiguousarray(vectors[rows])
    k = max(1, min(k, len(vectors) - 1))
    started = time.monotonic()
    true_scores, true_ids = exact_search(vectors, queries, k + 1, use_gpu)
    truth = GroundTruth(rows, queries, true_ids, true_scores, time.monotonic() - started)
    return tune_recall(index, truth, vectors, k=k, target_recall=target_recall)


@dataclass
class GroundTruth:
    """Exact top-(k+1) neighbours of sampled indexed rows, for the recall self-check."""

    rows: np.ndarray
    queries: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    seconds: float


def streamed_ground_truth(
    blocks: Iterable[tuple[int, np.ndarray]], rows: np.ndarray, queries: np.ndarray, k: int
) -> GroundTruth:
    """Exact top-``k`` of ``queries`` over vectors that arrive block by block as ``(first row id, unit
    vectors)``: only one block and the running top-k are in memory, never the whole matrix."""
    started = time.monotonic()
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for first, block in blocks:
        scores = queries @ block.T
        if scores.shape[1] > k:  # the block's own top k first: linear, where sorting it all is not
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, ids = np.take_along_axis(scores, part, axis=1), first + part
        else:
            ids = np.broadcast_to(np.arange(first, first + len(block)), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        keep = np.lexsort((ids, -scores), axis=-1)[:, :k]  # best first; ties: the smaller row id
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    return GroundTruth(rows, queries, best_ids, best_scores, time.monotonic() - started)


def tune_recall(
    index: faiss.Index,
    truth: GroundTruth,
    vectors: np.ndarray | Callable[[np.ndarray], np.ndarray],
    *,
    k: int = 10,
    target_recall: float = 0.95,
) -> dict[str, Any]:
    """Raise ``nprobe``/``efSearch`` until recall@k of ``truth``'s queries reaches the target.

    Each sampled row queries the index for k+1 neighbours and its own id is taken out of both the
    exact and the approximate answer (leave-one-out): a query that is itself indexed would otherwise
    get one right answer for free and overstate the recall that new queries see. ``vectors`` scores
    the returned rows exactly (an array, or a function of row ids).

    The index keeps the first setting that reaches ``target_recall`` (or, if none does, the one with
    the best recall). Returns the self-check: sample size, k, recall, seconds per query, every setting
    tried, and whether the target was reached.
    """
    rows, queries = truth.rows, truth.queries
    _, true_scores = _drop_self(truth.ids, truth.scores, rows)
    ivf, hnsw = _ivf_of(index), _hnsw_of(index)
    if ivf is not None:
        name = "nprobe"
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v < ivf.nlist]
        values.append(int(min(ivf.nlist, 4096)))
        values = sorted(set(values))
    elif hnsw is not None:
        name = "ef_search"
        values = sorted({max(k, 16), 32, 64, 128, 256, 512, 1024})
    else:
        name, values = None, [None]
    tried = []
    best: dict[str, Any] | None = None
    for value in values:
        if name == "nprobe":
            set_search_params(index, nprobe=value)
        elif name == "ef_search":
            set_search_params(index, ef_search=value)
        started = time.monotonic()
        scores, found = index.search(queries, k + 1)
        seconds = time.monotonic() - started
        found, _ = _drop_self(found, scores, rows)
        recall = tie_aware_recall(vectors, queries, found, true_scores, k)
        entry = {
            "value": value,
            "recall": round(recall, 5),
            "ms_per_query": round(1000 * seconds / len(queries), 4),
        }
        tried.append(entry)
        if best is None or recall > best["recall"] + 1e-9:
            best = entry
        if recall >= target_recall:
            best = entry
            break
    assert best is not None
    if name == "nprobe":
        set_search_params(index, nprobe=best["value"])
    elif name == "ef_search":
        set_search_params(index, ef_search=best["value"])
    check = {
        "queries": len(rows),
        "k": k,
        "method": "leave-one-out: sampled indexed rows, their own id removed from both answers",
        "recall_at_k": best["recall"],
        "target_recall": target_recall,
        "target_reached": best["recall"] >= target_recall,
        "ms_per_query": best["ms_per_query"],
        "exact_ms_per_query": round(1000 * truth.seconds / max(1, len(rows)), 4),
        "param": name,
        "value": best["value"],
        "tried": tried,
    }
    if not check["target_reached"]:
        log.warning("index recall@%d %.3f stays below the target %.3f", k, best["recall"], target_recall)
    return check


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write ``index`` atomically and durably (a unique temporary name, fsync, rename, fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp_path(path)
    try:
        faiss.write_index(index, str(tmp))
        publish_tmp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_index(path: str | Path, mmap: bool = True) -> faiss.Index:
    """Read an index; with ``mmap`` its codes, vectors and lists are memory-mapped, read-only.

    ``IO_FLAG_MMAP_IFC`` maps flat codes (Flat, HNSW storage) and IVF lists in place; the OS pages
    them in on search and may drop them again, so the process heap holds only the small parts.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no index file {path}")
    if Path(path).with_suffix(ONDISK_SUFFIX).is_file():  # lists on disk already: find them beside the index
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)


def index_description(index: faiss.Index) -> dict[str, Any]:
    """Type, size and search settings of a built or loaded index, for manifests."""
    name = type(faiss.downcast_index(index)).__name__
    if name == "IndexFlat":  # what index_factory("Flat") builds; it reads back as IndexFlatIP/L2
        name = "IndexFlatIP" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "IndexFlatL2"
    return {
        "class": name,
        "ntotal": int(index.ntotal),
        "d": int(index.d),
        "metric": "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2",
        **search_params(index),
    }
