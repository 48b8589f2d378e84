"""Typed configuration for every job.

One frozen dataclass per concern, gathered in :class:`PipelineConfig`. Values come from, in rising
precedence: the defaults below, a YAML file (``--config``, sections named like the fields of
:class:`PipelineConfig`), and command-line flags (see :mod:`pipeline.core.cli`). Field metadata carries
the flag's help text, so the dataclasses are the single place an option is described.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def option(default: Any, help: str, required: bool = False, fingerprint: bool = True) -> Any:
    """A dataclass field with its command-line help.

    ``required`` fields must be set by YAML or flag. ``fingerprint=False`` marks a field that does
    not change a stage's output (a folder, whose content enters as a signature instead; a batch
    size; a worker count): :func:`result_options` leaves it out, so changing it never redoes work.
    """
    return field(default=default, metadata={"help": help, "required": required, "fingerprint": fingerprint})


@dataclass(frozen=True)
class RayConfig:
    """How a job reaches Ray. With no address it starts a local Ray sized for a small machine."""

    address: str | None = option(
        None, "Ray cluster to join (else RAY_ADDRESS, else a local Ray started in-process)"
    )
    num_cpus: int | None = option(None, "CPUs of a local Ray (default: all cores of this machine)")
    object_store_mb: int = option(1024, "object store of a local Ray, in MiB (capped so tests fit)")
    progress_bars: bool = option(
        False,
        "Ray Data's per-operator progress (bars on a terminal, logged lines otherwise); off by default: "
        "each stage prints its own progress line",
    )
    verbose: bool = option(
        False,
        "Ray's own console output too (also --verbose): its INFO logs, Ray Data's progress and "
        "'execution finished' lines, and the workers' stdout/stderr forwarded to this console",
    )


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset download of a URL list into webdataset shards."""

    url_list: str = option("", "URL list: parquet, csv, tsv, jsonl or txt file (or a folder of them)", True)
    out: str = option(
        "", "output folder for NNNNN.tar / .parquet / _stats.json shards", True, fingerprint=False
    )
    input_format: str | None = option(None, "input format (default: from the file suffix)")
    url_col: str | None = option(None, "URL column (default: detected, e.g. url or URL)")
    caption_col: str | None = option(None, "caption column (default: detected, e.g. caption or TEXT)")
    image_size: int = option(512, "target image size for img2dataset's resizer")
    resize_mode: str = option(
        "keep_ratio", "img2dataset resize mode: no, border, keep_ratio, keep_ratio_largest, center_crop"
    )
    resize_only_if_bigger: bool = option(True, "never upscale small images")
    encode_format: str = option("jpg", "image format in the shards: jpg, png or webp")
    encode_quality: int = option(95, "JPEG/WebP quality (PNG: compression level 0-9) of re-encoded images")
    skip_reencode: bool = option(
        False, "store the downloaded bytes as-is when no resize is needed and the format already matches"
    )
    extra_columns: str | None = option(
        None, "comma-separated input columns kept in the shards (default: all JSON-storable ones; '': none)"
    )
    number_sample_per_shard: int = option(10_000, "samples per output shard")
    processes_count: int = option(
        1, "download processes (multiprocessing distributor only)", fingerprint=False
    )
    thread_count: int = option(16, "download threads per process", fingerprint=False)
    timeout: int = option(10, "seconds before a URL counts as timed out")
    retries: int = option(0, "retries per URL")
    distributor: str = option(
        "multiprocessing",
        "img2dataset distributor: multiprocessing, or ray (a task per shard; needs Ray)",
        fingerprint=False,
    )
    incremental_mode: str = option(
        "incremental", "incremental (resume), overwrite or extend", fingerprint=False
    )
    img2dataset_console: bool = option(
        False,
        "img2dataset's own output (progress bars, per-worker stats) on the console instead of "
        "OUT/.download/img2dataset.log; --verbose turns it on too",
        fingerprint=False,
    )


#: Options shared by the two stages that read shards (ingest, embed).
REQUIRE_STATS_HELP = (
    "read a shard only once its NNNNN_stats.json exists (img2dataset writes it last); shards without "
    "one are reported as incomplete and left for a later run. --no-require-stats also reads shards "
    "written by other tools, which have no stats file (e.g. clip-retrieval's tars); a shard with a "
    "stats file is still checked against its count either way"
)
MAX_MEMBER_BYTES = 64 * 1024 * 1024
MAX_MEMBER_BYTES_HELP = (
    "tar members larger than this are never read into memory: their sample is rejected as "
    "member_too_large (sparse members always are, as sparse_member)"
)


@dataclass(frozen=True)
class IngestConfig:
    """Reading img2dataset shards, decoding every image, accounting for every row."""

    shards: str = option(
        "",
        "folder of img2dataset output (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json)",
        True,
        fingerprint=False,
    )
    out: str = option("", "output folder for samples.parquet and per-shard parts", True, fingerprint=False)
    decode_batch_size: int = option(64, "images per decode batch", fingerprint=False)
    max_image_pixels: int = option(
        89_478_485, "images with more pixels are rejected as decompression bombs (Pillow's default)"
    )
    read_num_cpus: float = option(0.5, "CPUs reserved per shard read task", fingerprint=False)
    require_stats: bool = option(True, REQUIRE_STATS_HELP)
    max_member_bytes: int = option(MAX_MEMBER_BYTES, MAX_MEMBER_BYTES_HELP)


@dataclass(frozen=True)
class EmbedConfig:
    """open_clip image and caption embeddings in clip-retrieval's (LAION's) layout."""

    shards: str = option("", "folder of img2dataset shards", True, fingerprint=False)
    out: str = option("", "output folder: img_emb/, text_emb/, metadata/", True, fingerprint=False)
    model: str = option("tiny", "open_clip architecture name, or 'tiny' (offline, random, non-semantic)")
    pretrained: str | None = option(None, "open_clip pretrained tag (fetched from the hub on clusters)")
    checkpoint: str | None = option(None, "local open_clip checkpoint file instead of a pretrained tag")
    batch_size: int = option(
        64, "images per model batch (batches are padded to this size)", fingerprint=False
    )
    precision: str = option("auto", "precision on GPU: auto (fp16), fp16, bf16 or fp32; CPU is always fp32")
    num_actors: int | None = option(
        None, "model actors (default: one per GPU, else all CPUs but one)", fingerprint=False
    )
    decode_batch_size: int = option(64, "images per decode/preprocess batch", fingerprint=False)
    decode_num_cpus: float = option(
        0.5,
        "CPUs per read+decode task; below 1 so Ray keeps decoding out of the model actors (overlap)",
        fingerprint=False,
    )
    max_image_pixels: int = option(
        89_478_485, "images with more pixels are rejected as decompression bombs (Pillow's default)"
    )
    require_stats: bool = option(True, REQUIRE_STATS_HELP)
    max_member_bytes: int = option(MAX_MEMBER_BYTES, MAX_MEMBER_BYTES_HELP)
    sscd_checkpoint: str | None = option(None, "SSCD TorchScript file: also write sscd_emb/ copy descriptors")
    sscd_image_size: int = option(320, "side of the square SSCD input (SSCD's 'skew 320' resize)")
    log_every_s: float = option(10.0, "seconds between progress log lines (images/s, ETA)", fingerprint=False)
    max_batch_attempts: int = option(
        3,
        "a model batch whose worker died this many times is given up: its rows are rejected as "
        "poison_batch instead of being retried forever",
        fingerprint=False,
    )


@dataclass(frozen=True)
class CaptionDedupConfig:
    """Near-duplicate captions: normalisation, exact hashing, MinHash LSH, Jaccard verification."""

    input: str = option(
        "",
        "parquet file or folder of parquet files with captions (LAION metadata works)",
        True,
        fingerprint=False,
    )
    out: str = option("", "output folder for caption_duplicates.parquet", True, fingerprint=False)
    report: bool = option(
        True, "also write dedup_report.html (caption groups, removable rows)", fingerprint=False
    )
    caption_col: str | None = option(None, "caption column (default: detected: caption, TEXT or text)")
    key_col: str | None = option(None, "key column (default: key, else the row number)")
    threshold: float = option(0.7, "Jaccard similarity of shingle sets at which two captions are duplicates")
    shingle_size: int = option(3, "characters per shingle (character n-grams of the normalised caption)")
    num_perm: int = option(128, "MinHash permutations (datasketch's num_perm)")
    seed: int = option(1, "MinHash seed (datasketch's seed; same seed, same signatures)")
    minhash_scheme: str = option(
        "affine32", "datasketch permutation scheme: affine32 (datasketch 2.x) or legacy"
    )
    fp_weight: float = option(0.5, "LSH false-positive weight for datasketch's (bands, rows) choice")
    fn_weight: float = option(0.5, "LSH false-negative weight for datasketch's (bands, rows) choice")
    word_guard: bool = option(
        True, "reject pairs where a word is replaced by a different word (not a one-letter typo)"
    )
    bucket_window: int = option(64, "LSH bucket members each caption is paired with (bounds huge buckets)")
    ray_min_rows: int = option(
        500_000,
        "inputs with fewer rows run in-process without starting Ray; larger ones on Ray tasks",
        fingerprint=False,
    )
    batch_size: int = option(50_000, "captions per Ray task (normalisation, MinHash)", fingerprint=False)


@dataclass(frozen=True)
class CellsConfig:
    """The k-means cells image dedup and the index share (pipeline/index/cells.py)."""

    rows_per_cell: int = option(1000, "rows per k-means cell on average (cells = N / this)")
    top: int = option(
        6,
        "most cells a row is assigned to, nearest first (the further ones only within --cells-margin): "
        "duplicates across a cell boundary are found",
    )
    margin: float = option(
        0.03,
        "a row joins a further cell only when its cosine to that centroid is within this of its nearest "
        "one's (rows near a boundary; a centroid close to every row would otherwise collect them all)",
    )
    train_per_cell: int = option(64, "k-means training rows per cell (a seeded sample)")
    iterations: int = option(10, "k-means iterations")
    seed: int = option(0, "seed of the training sample and of k-means")
    ray_min_rows: int = option(
        200_000,
        "from this many rows the cells, image dedup and index run as Ray tasks (fewer: in this process)",
        fingerprint=False,
    )
    bucket_rows: int = option(
        100_000,
        "rows each reduce task of image dedup's cell shuffle takes (bounds its memory)",
        fingerprint=False,
    )


@dataclass(frozen=True)
class ImageDedupConfig:
    """Image duplicates: exact (sha256), pixel-level (pHash Hamming) and semantic (CLIP cosine) passes."""

    embeddings: str = option(
        "",
        "embedding folder in LAION layout (img_emb/, metadata/ with sha256, phash)",
        True,
        fingerprint=False,
    )
    out: str = option(
        "", "output folder for image_duplicates.parquet and image_dedup_summary.json", True, fingerprint=False
    )
    shards: str | None = option(
        None,
        "folder of the img2dataset shards the embeddings were made from: thumbnails in dedup_report.html "
        "(without it the report shows the groups without pictures)",
        fingerprint=False,
    )
    report: bool = option(
        True, "also write dedup_report.html (groups, thresholds, borderline pairs)", fingerprint=False
    )
    exact: bool = option(True, "exact pass: identical sha256 of the image bytes")
    phash: bool = option(
        True, "pixel-level pass: pHash Hamming distance (FAISS binary range search per cell)"
    )
    phash_max_distance: int = option(
        12,
        "largest Hamming distance (of 64 bits) between duplicate pHashes, compared within k-means cells "
        "(measured: BENCHMARKS.md)",
    )
    phash_confirm_cosine: float = option(
        0.8,
        "a pHash pair also needs this embedding cosine (semantic embeddings only; -1: off): random "
        "64-bit hashes within 12 bits are one in 4 million, which at 1M images is a chance partner "
        "for every fifth image",
    )
    semantic: str = option(
        "auto", "semantic pass: auto (only for embeddings of a semantic model, never random weights), on, off"
    )
    semantic_threshold: float = option(
        0.95, "cosine of L2-normalised image embeddings at or above which two images are duplicates"
    )
    semantic_k: int = option(32, "most semantic partners kept per image (the closest)")
    linkage: str = option(
        "verified",
        "groups: verified (every member is checked against its group's representative by one of the "
        "passes' tests; members that fail form groups of their own, so weak links cannot chain) or "
        "single (plain connected components)",
    )
    block_rows: int = option(
        2048, "rows per block of a cell's similarity product (bounds memory)", fingerprint=False
    )
    use_gpu: bool = option(
        True,
        "on a cluster with GPUs, the cells' similarity products run on them (torch; same pairs)",
        fingerprint=False,
    )


@dataclass(frozen=True)
class IndexConfig:
    """The similarity index over image embeddings that AMG and the audits search."""

    embeddings: str = option(
        "", "embedding folder in LAION layout (img_emb/ + metadata/)", True, fingerprint=False
    )
    out: str = option(
        "", "output folder for image.index, index_rows.parquet and index_info.json", True, fingerprint=False
    )
    kind: str = option("auto", "index type: auto (from N and memory_budget_mb), flat, hnsw, ivf_flat, ivf_pq")
    memory_budget_mb: int = option(4096, "memory the index may take when searched (RAM or mmap page cache)")
    flat_max_n: int = option(100_000, "auto: exact flat index up to this many vectors")
    hnsw_m: int = option(32, "HNSW links per node")
    ef_construction: int = option(80, "HNSW build depth")
    nlist: int | None = option(
        None,
        "IVF lists of ivf_pq (default: 4*sqrt(N) below 1M vectors, 2^16 above; power of two); ivf_flat "
        "uses the shared k-means cells (--cells-rows-per-cell)",
    )
    pq_m: int | None = option(
        None, "PQ bytes per vector for ivf_pq (default: the largest that fits the budget)"
    )
    opq: bool = option(False, "ivf_pq: OPQ rotation before PQ (autofaiss does; its training is slow on CPU)")
    train_size: int = option(131_072, "most vectors IVF/PQ/OPQ training sees (a seeded sample)")
    target_recall: float = option(
        0.95, "nprobe/efSearch are raised until the self-check recall@k reaches this"
    )
    recall_sample: int = option(
        1_000, "queries (a seeded sample of the indexed rows) for the recall self-check"
    )
    recall_k: int = option(10, "k of the recall@k self-check against exact search")
    duplicates: str | None = option(
        None,
        "image_duplicates.parquet: also write dup_image.index over the images in duplicate groups",
        fingerprint=False,
    )
    use_gpu: bool = option(
        True, "build (and self-check) on GPU when FAISS sees one; saved for CPU", fingerprint=False
    )
    seed: int = option(0, "seed of sampling and training")


@dataclass(frozen=True)
class BundleConfig:
    """The versioned artifact bundle AMG and the audits open: ingest -> embed -> dedup -> index -> tables."""

    shards: str = option(
        "",
        "folder of img2dataset shards (or --embeddings; with both, thumbnails come from here)",
        fingerprint=False,
    )
    embeddings: str = option(
        "",
        "build from this LAION-layout embedding folder (img_emb/, metadata/, optional text_emb/), e.g. "
        "LAION's released ViT-L/14 embeddings, without ingest or embed; --embed-model/--embed-pretrained "
        "name the model that made them",
        fingerprint=False,
    )
    out: str = option(
        "",
        "bundle folder (manifest.json, samples.parquet, embeddings/, tables, index)",
        True,
        fingerprint=False,
    )
    duplicate_caption_k: int = option(
        1000, "training images Bundle.duplicate_caption_near counts captions among (authors: 1000)"
    )
    duplicate_caption_min_count: int = option(
        21,
        "y_N needs its caption at least this often among the k neighbours (21: the authors' 'more than 20')",
    )
    verify_checksums: bool = option(
        True, "check every file's sha256 against the manifest after building", fingerprint=False
    )


@dataclass(frozen=True)
class ApplyDedupConfig:
    """Acting on duplicates: keep-list / drop-list and, optionally, filtered shards (jobs/apply_dedup.py)."""

    bundle: str = option(
        "",
        "bundle folder (jobs/build_artifacts.py): takes its duplicate tables, its embedding metadata and "
        "(unless --shards is given) the shards it was built from",
        fingerprint=False,
    )
    shards: str = option(
        "", "folder of the img2dataset shards the duplicate tables describe", fingerprint=False
    )
    image_duplicates: str = option("", "image_duplicates.parquet (jobs/dedup_images.py)", fingerprint=False)
    caption_duplicates: str = option(
        "", "caption_duplicates.parquet (jobs/dedup_captions.py); used with --captions", fingerprint=False
    )
    embeddings: str = option(
        "",
        "embedding folder the tables were computed from: its metadata names the embedded rows and gives "
        "url/width/height (without it every image is decoded to tell)",
        fingerprint=False,
    )
    out: str = option(
        "",
        "output folder: keep_list.parquet, drop_list.parquet, shards/ (with --filter-shards)",
        True,
        fingerprint=False,
    )
    images: bool = option(True, "act on image duplicate groups (image_duplicates.parquet)")
    captions: bool = option(
        False,
        "also act on caption duplicate groups; they are joined with the image groups into connected "
        "components over keys, and each component keeps one row",
    )
    policy: str = option(
        "largest",
        "row a group keeps: largest (most pixels, width*height), earliest (smallest key) or score "
        "(highest --score-column); ties go to the smallest key",
    )
    score_column: str | None = option(
        None,
        "score policy: numeric column of the shard parquet (else the embedding metadata), e.g. aesthetic",
    )
    filter_shards: bool = option(
        False, "also write OUT/shards/: a copy of every shard (same names) that holds only the kept rows"
    )
    require_stats: bool = option(True, REQUIRE_STATS_HELP)
    max_member_bytes: int = option(MAX_MEMBER_BYTES, MAX_MEMBER_BYTES_HELP)
    max_image_pixels: int = option(
        89_478_485, "without --embeddings: images with more pixels count as rejected, as ingest rejects them"
    )


@dataclass(frozen=True)
class AuditConfig:
    """Memorization audit of a text-to-image model: generate per prompt, match with the bundle, flag, report.

    ``bundle`` and ``model`` are required except with ``dry_run`` (which only reads the prompt list).
    """

    bundle: str = option(
        "", "artifact bundle folder (jobs/build_artifacts.py) to match generations against", fingerprint=False
    )
    prompts: str = option(
        "", "prompt list: .txt, .json, .jsonl, .csv, .tsv or .parquet", True, fingerprint=False
    )
    out: str = option(
        "",
        "output folder: results.parquet, prompts.parquet, summary.json, report.html",
        True,
        fingerprint=False,
    )
    model: str = option(
        "", "diffusers text-to-image pipeline folder (StableDiffusionPipeline layout)", fingerprint=False
    )
    prompt_column: str | None = option(
        None, "prompt column of a tabular prompt list (default: detected)", fingerprint=False
    )
    samples_per_prompt: int = option(
        4, "generations per prompt and AMG mode (seeds derived from the prompt id)"
    )
    amg: str = option(
        "both", "generate without AMG (off), with it (on), or both, paired by seed", fingerprint=False
    )
    mode: str = option("paper", "AMG constants: paper or reference (pipeline.amg.AMGConfig.preset)")
    similarity: str = option("sscd", "similarity of the detection and of AMG: sscd, clip, nl2 or l2")
    match_rows: str = option(
        "all", "training rows the detection and AMG search: all, or duplicated (byte-identical copies only)"
    )
    memorized_threshold: float | None = option(
        None, "similarity above which a sample is memorized (default: the AMG preset's; SSCD 0.5)"
    )
    sscd_checkpoint: str | None = option(
        None, "SSCD TorchScript file (default: the one the bundle was embedded with)", fingerprint=False
    )
    amg_overrides: str | None = option(
        None, "YAML file of AMGConfig field changes for the 'on' mode", fingerprint=False
    )
    seed: int = option(0, "run seed; a sample's seed is a hash of (seed, prompt id, sample index)")
    num_inference_steps: int = option(50, "sampling steps (the model's own scheduler)")
    guidance_scale: float = option(7.5, "classifier-free guidance scale")
    batch_size: int = option(4, "samples per pipeline call (results do not depend on it)", fingerprint=False)
    tile_grid: int = option(4, "Carlini criterion: tiles per side (4: 16 tiles, 128 px at 512 px)")
    tile_threshold: float = option(
        0.15,
        "Carlini criterion: two generations are near-identical when their largest tile RMS distance "
        "is below this",
    )
    clique_size: int = option(
        10,
        "Carlini criterion: flag a prompt when this many generations are pairwise near-identical "
        "(capped at N)",
    )
    wen_steps: int = option(1, "Wen score: sampling steps averaged (from the first)")
    wen_samples: int = option(4, "Wen score: seeds averaged (the prompt's first sample seeds)")
    wen_threshold: float = option(
        0.0, "pre-screen: prompts whose Wen score is below this are not generated (0: audit every prompt)"
    )
    num_actors: int | None = option(
        None, "generator actors (default: one per GPU, else all CPUs but one)", fingerprint=False
    )
    max_prompts: int | None = option(
        None, "stop after this many prompts are finished (testing, staged runs)", fingerprint=False
    )
    thumbnail_size: int = option(96, "side of the report's image thumbnails, in pixels", fingerprint=False)
    prompt_timeout_s: float = option(
        1800.0,
        "seconds a prompt may run on a ready actor before that actor is killed and the prompt retried "
        "(0: no limit)",
        fingerprint=False,
    )
    max_attempts: int = option(
        3,
        "attempts per prompt (a lost actor or node, a timeout); after the last, its partitions are "
        "left for the next run and the summary names it",
        fingerprint=False,
    )
    verify_bundle: bool = option(
        True,
        "check every bundle file's sha256 once before generating (reads the whole bundle; the file "
        "list, sizes and root hash are always checked, by the driver and by every actor)",
        fingerprint=False,
    )
    dry_run: bool = option(False, "only read the prompt list and write prompts.parquet", fingerprint=False)


@dataclass(frozen=True)
class ServeConfig:
    """The clip-retrieval-compatible kNN service over bundles (jobs/serve_knn.py, pipeline/serve)."""

    bundle: str = option("", "bundle folder to serve; several: comma-separated", True, fingerprint=False)
    indice_name: str | None = option(
        None,
        "name clients pass as indice_name; several bundles: comma-separated, one per bundle "
        "(default: each bundle folder's name)",
        fingerprint=False,
    )
    host: str = option(
        "127.0.0.1", "address the HTTP proxy listens on (0.0.0.0: every interface)", fingerprint=False
    )
    port: int = option(1234, "HTTP port", fingerprint=False)
    public_url: str | None = option(
        None,
        "base URL clients reach the service at, used in result urls (default: http://HOST:PORT)",
        fingerprint=False,
    )
    min_replicas: int = option(1, "replicas kept running", fingerprint=False)
    max_replicas: int = option(
        1, "replicas the load may scale up to (autoscaling when above min)", fingerprint=False
    )
    replica_num_cpus: float = option(1.0, "CPUs each replica reserves", fingerprint=False)
    replica_num_gpus: float = option(
        0.0, "GPUs each replica reserves (for text and image queries)", fingerprint=False
    )
    max_batch_size: int = option(32, "searches batched into one FAISS call per replica", fingerprint=False)
    batch_wait_s: float = option(0.002, "how long a search waits for others to batch with", fingerprint=False)
    max_results: int = option(
        10_000, "largest num_images / num_result_ids a request may ask", fingerprint=False
    )
    max_image_bytes: int = option(
        16 * 1024 * 1024, "largest query image accepted, in bytes", fingerprint=False
    )
    max_image_pixels: int = option(40_000_000, "largest query image accepted, in pixels", fingerprint=False)
    include_images: bool = option(
        False,
        "add each result's image as base64 (`image`), as clip back does with image_path",
        fingerprint=False,
    )
    cache_dir: str = option(
        "~/.cache/amg-dedup/knn",
        "folder for the per-bundle row cache (derived once per bundle)",
        fingerprint=False,
    )


@dataclass(frozen=True)
class DemoConfig:
    """The demo dataset: real photographs with planted duplicates, served over local HTTP."""

    out: str = option("demo-output", "folder for every demo artifact", True, fingerprint=False)
    seed: int = option(0, "seed of every random choice in the demo dataset")
    image_size: int = option(256, "side of the square demo images, in pixels")
    verbatim_images: int = option(4, "images repeated byte-identically with an identical caption")
    verbatim_copies: int = option(12, "copies of each verbatim-duplicated image+caption pair")
    near_duplicate_bases: int = option(6, "photographs that get re-encoded/resized/cropped copies")
    template_images: int = option(8, "different images sharing one template caption")
    samples_per_shard: int = option(64, "samples per downloaded shard")


@dataclass(frozen=True)
class AMGJobConfig:
    """Anti-Memorization Guidance: training the memorizing models, evaluating AMG on them.

    The guidance constants themselves are :class:`pipeline.amg.config.AMGConfig` presets; λ_t is
    calibrated per model into ``model_dir/amg_thresholds.json`` (:mod:`demo.memorizing.evaluation`).
    """

    model_dir: str = option("models/amg-memorizing", "folder of the memorizing models (written by training)")
    classifier_dir: str = option(
        "models/fashion-classifier", "the evaluation's Fashion-MNIST classifier (trained when missing)"
    )
    bundle: str = option(
        "demo-output/fashion/bundle", "bundle of the text-to-image model's training set (built when missing)"
    )
    out: str = option("demo-output/amg_eval", "evaluation output: summary.json, table.md, samples")
    seed: int = option(0, "seed of every random choice (data split, training and sampling)")
    generic_per_class: int = option(500, "Fashion-MNIST pictures per class in the generator's training set")
    vae_steps: int = option(1000, "autoencoder training steps")
    unet_steps: int = option(6000, "text-to-image UNet training steps")
    unet_width: int = option(32, "text-to-image UNet channels at full resolution (doubled below)")
    pixel_steps: int = option(8000, "pixel DDPM training steps")
    pixel_width: int = option(16, "pixel UNet channels at full resolution (doubled below)")
    batch_size: int = option(64, "training batch size")
    learning_rate: float = option(1e-3, "peak learning rate (AdamW, cosine decay)")
    num_inference_steps: int = option(50, "DDIM steps when evaluating")
    samples_per_prompt: int = option(16, "images per planted prompt (seeds 0..n-1) when evaluating")
    guidance_scale: float = option(7.5, "classifier-free guidance scale s0")
    sscd_checkpoint: str | None = option(
        None, "SSCD TorchScript file the bundle was embedded with (default: the demo's offline stand-in)"
    )


@dataclass(frozen=True)
class PipelineConfig:
    """Every section a job may read; a YAML config file holds any subset of them."""

    ray: RayConfig = field(default_factory=RayConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    caption_dedup: CaptionDedupConfig = field(default_factory=CaptionDedupConfig)
    cells: CellsConfig = field(default_factory=CellsConfig)
    image_dedup: ImageDedupConfig = field(default_factory=ImageDedupConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    apply_dedup: ApplyDedupConfig = field(default_factory=ApplyDedupConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    amg: AMGJobConfig = field(default_factory=AMGJobConfig)


def section_types() -> dict[str, type]:
    """Section name -> its dataclass, as declared on :class:`PipelineConfig`."""
    hints = typing.get_type_hints(PipelineConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(PipelineConfig)}


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    return typing.get_type_hints(cls)


def scalar_type(annotation: Any) -> type:
    """The concrete type behind ``X | None`` (or ``X`` itself)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation!r}")
        return args[0]
    return annotation


def _coerce(section: str, name: str, annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    kind = scalar_type(annotation)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"config {section}.{name}: expected true/false, got {value!r}")
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(f"config {section}.{name}: expected a number, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {section}.{name}: cannot read {value!r} as {kind.__name__}") from exc


def with_overrides(cfg: PipelineConfig, overrides: dict[str, dict[str, Any]]) -> PipelineConfig:
    """Return ``cfg`` with ``{section: {field: value}}`` applied; unknown names are an error."""
    sections = section_types()
    updated = {}
    for section, values in overrides.items():
        if section not in sections:
            raise ValueError(f"unknown config section {section!r}; known: {', '.join(sorted(sections))}")
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
        hints = field_types(sections[section])
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} in section {section!r}; known: {', '.join(hints)}"
            )
        coerced = {k: _coerce(section, k, hints[k], v) for k, v in values.items()}
        updated[section] = dataclasses.replace(getattr(cfg, section), **coerced)
    return dataclasses.replace(cfg, **updated)


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Defaults, overlaid with the YAML file at ``path`` when one is given."""
    cfg = PipelineConfig()
    if path is None:
        return cfg
    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return with_overrides(cfg, data)


def result_options(cfg: Any) -> dict[str, Any]:
    """The fields of a config section that change a stage's output (see :func:`option`)."""
    return {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("fingerprint", True)
    }


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of any config dataclass, for manifests, summaries and fingerprints."""
    return dataclasses.asdict(cfg)
