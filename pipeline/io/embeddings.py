"""Reading (and naming) embedding folders in clip-retrieval's layout, ours or LAION's released ones.

Layout, one partition ``{i}`` per input shard, row-aligned across the three folders::

    img_emb/img_emb_{i}.npy        float16 (N, D), L2-normalised image embeddings
    text_emb/text_emb_{i}.npy      float16 (N, D), L2-normalised caption embeddings (optional)
    sscd_emb/sscd_emb_{i}.npy      float16 (N, D'), SSCD copy-detection descriptors (optional, ours)
    metadata/metadata_{i}.parquet  N rows: key, caption, url, sha256, width, height, shard, phash
    done/{i}.done.json             written last by our embed stage (absent in LAION's release)

LAION's released folders name partitions ``0, 1, ...`` (ours use the shard name, e.g. ``00000``)
and their metadata has other columns; :meth:`Partition.metadata` fills the columns a file lacks with
nulls, so later stages read both alike. Where a ``done/`` folder exists, only partitions with a marker
are listed: the others may be half-written by a run that was killed; and markers from two different
runs (another model, other options) are refused rather than mixed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import files_signature

IMG_EMB = "img_emb"
TEXT_EMB = "text_emb"
SSCD_EMB = "sscd_emb"
EMBEDDING_KINDS = (IMG_EMB, TEXT_EMB, SSCD_EMB)
METADATA = "metadata"
DONE = "done"

#: Columns of our metadata files, in order. ``phash`` is a 64-bit pHash (see :mod:`pipeline.embed.phash`).
METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("shard", pa.string()),
        ("phash", pa.uint64()),
    ]
)

_IMG_NAME = re.compile(rf"^{IMG_EMB}_(?P<name>.+)\.npy$")


def embedding_path(folder: str | Path, kind: str, name: str) -> Path:
    """``folder/{kind}/{kind}_{name}.npy`` for kind in :data:`EMBEDDING_KINDS`."""
    return Path(folder) / kind / f"{kind}_{name}.npy"


def metadata_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / METADATA / f"{METADATA}_{name}.parquet"


def _natural_key(name: str) -> list[int | str]:
    """Order ``2`` before ``10`` (LAION's unpadded names) and keep zero-padded names in order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Partition:
    """One partition of an embedding folder: its embedding files and metadata, row-aligned."""

    folder: Path
    name: str

    def path(self, kind: str) -> Path:
        return embedding_path(self.folder, kind, self.name)

    def has(self, kind: str) -> bool:
        return self.path(kind).is_file()

    def embeddings(self, kind: str = IMG_EMB, mmap: bool = True) -> np.ndarray:
        """The ``(N, D)`` array of ``kind``, memory-mapped by default (nothing is read until used)."""
        return np.load(self.path(kind), mmap_mode="r" if mmap else None)

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The metadata rows; requested columns come typed as ours, those the file lacks as nulls.

        Args:
            columns (`Sequence[str]`, *optional*): columns to return, in this order; default: the file's own.
        """
        path = metadata_path(self.folder, self.name)
        if columns is None:
            return pq.read_table(path)
        present = set(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in columns if c in present])
        arrays = []
        for column in columns:
            ours = METADATA_SCHEMA.field(column).type if column in METADATA_SCHEMA.names else None
            if column in present:
                arrays.append(table.column(column) if ours is None else table.column(column).cast(ours))
            else:
                arrays.append(pa.nulls(table.num_rows, ours or pa.string()))
        return pa.table(arrays, names=list(columns))

    def num_rows(self) -> int:
        """Rows of the partition, after checking that every file present has that many.

        Raises:
            ValueError: the files are not row-aligned.
        """
        counts = {METADATA: pq.ParquetFile(metadata_path(self.folder, self.name)).metadata.num_rows}
        for kind in EMBEDDING_KINDS:
            if self.has(kind):
                counts[kind] = self.embeddings(kind).shape[0]
        if len(set(counts.values())) != 1:
            raise ValueError(f"partition {self.name} of {self.folder} is not row-aligned: {counts}")
        return counts[METADATA]


def list_partitions(folder: str | Path) -> list[Partition]:
    """Partitions that have image embeddings and metadata, in natural name order.

    Raises:
        FileNotFoundError: ``folder`` has no ``img_emb/`` subfolder.
    """
    folder = Path(folder)
    img_dir = folder / IMG_EMB
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{folder} is not an embedding folder (no {IMG_EMB}/)")
    done_dir = folder / DONE
    names = []
    runs: dict[str, list[str]] = {}
    for path in img_dir.iterdir():
        match = _IMG_NAME.match(path.name)
        if match is None or not metadata_path(folder, match["name"]).is_file():
            continue
        if done_dir.is_dir():
            marker = _read_marker(done_dir / f"{match['name']}.done.json")
            if marker is None:
                continue
            runs.setdefault(str(marker.get("config_fingerprint")), []).append(match["name"])
        names.append(match["name"])
    if len(runs) > 1:
        detail = "; ".join(
            f"{fp}: {sorted(parts, key=_natural_key)[:3]}" for fp, parts in sorted(runs.items())
        )
        raise ValueError(
            f"{folder} holds partitions embedded under different options or models ({detail}); "
            f"run the embed stage on it again to finish the interrupted run"
        )
    return [Partition(folder, name) for name in sorted(names, key=_natural_key)]


def partition_starts(partitions: Sequence[Partition]) -> list[int]:
    """Row id of each partition's first row, then the total: rows of partition i are
    ``starts[i]..starts[i + 1]`` (row ids number a folder's rows in partition order)."""
    return np.cumsum([0, *(p.num_rows() for p in partitions)]).tolist()


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def load_embeddings(folder: str | Path, kind: str = IMG_EMB) -> np.ndarray:
    """Every partition's ``kind`` embeddings concatenated in partition order (read into memory).

    Raises:
        FileNotFoundError: no partitions, or some partition lacks ``kind`` (rows would not line up).
    """
    partitions = list_partitions(folder)
    missing = [p.name for p in partitions if not p.has(kind)]
    if not partitions or missing:
        raise FileNotFoundError(f"{folder}: no {kind} for partitions {missing or 'at all'}")
    return np.concatenate([p.embeddings(kind) for p in partitions])


def load_metadata(
    folder: str | Path, columns: Sequence[str] | None = tuple(METADATA_SCHEMA.names)
) -> pa.Table:
    """Every partition's metadata concatenated in partition order, row-aligned with :func:`load_embeddings`.

    Args:
        columns (`Sequence[str]`, *optional*): as in :meth:`Partition.metadata`; default: ours.
    """
    tables = [p.metadata(columns) for p in list_partitions(folder)]
    if not tables:
        raise FileNotFoundError(f"no partitions in {folder}")
    return pa.concat_tables(tables, promote_options="permissive")


def normalize(vectors: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Rows as L2-normalised float32 (C order), converted chunk by chunk; all-zero rows stay zero."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {vectors.shape}")
    out = np.empty(vectors.shape, dtype=np.float32)
    for lo in range(0, len(vectors), chunk):
        block = np.asarray(vectors[lo : lo + chunk], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, np.where(norms > 0, norms, 1.0), out=out[lo : lo + chunk])
    return out


def load_unit_embeddings(folder: str | Path, kind: str = IMG_EMB) -> np.ndarray:
    """Every partition's ``kind`` embeddings as one L2-normalised float32 matrix (row-id order).

    Converted partition by partition from the memory-mapped (float16) files, so peak memory is the
    float32 result plus one chunk.
    """
    partitions = list_partitions(folder)
    missing = [p.name for p in partitions if not p.has(kind)]
    if not partitions or missing:
        raise FileNotFoundError(f"{folder}: no {kind} for partitions {missing or 'at all'}")
    arrays = [p.embeddings(kind) for p in partitions]
    dims = {a.shape[1] for a in arrays if a.ndim == 2}
    if len(dims) != 1:
        raise ValueError(f"{folder}: partitions disagree on the {kind} dimension: {sorted(dims)}")
    out = np.empty((sum(len(a) for a in arrays), dims.pop()), dtype=np.float32)
    row = 0
    for array in arrays:
        out[row : row + len(array)] = normalize(array)
        row += len(array)
    return out


class EmbeddingRows:
    """Unit float32 embeddings of chosen rows: from an in-memory matrix, or read from the partitions
    of an embedding folder (only the rows asked for, each call through its own short-lived maps, so
    a process that reads rows from everywhere does not keep the whole folder mapped)."""

    def __init__(
        self, folder: str | Path | None = None, vectors: np.ndarray | None = None, kind: str = IMG_EMB
    ):
        self.vectors = vectors
        self.kind = kind
        if vectors is not None:
            self.n, self.dim = vectors.shape
            return
        self.partitions = list_partitions(folder)
        self.starts = np.asarray(partition_starts(self.partitions))
        self.n = int(self.starts[-1])
        self.dim = int(self.partitions[0].embeddings(kind).shape[1]) if self.partitions else 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self.vectors is not None:
            return np.ascontiguousarray(self.vectors[rows], dtype=np.float32)
        out = np.empty((len(rows), self.dim), np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(which).tolist():
            sel = which == part
            out[sel] = self.partitions[part].embeddings(self.kind)[rows[sel] - self.starts[part]]
        return normalize(out)


def unit_blocks(
    folder: str | Path, kind: str = IMG_EMB, rows: int = 16_384
) -> Iterator[tuple[int, np.ndarray]]:
    """Every row of the folder as ``(first row id, unit float32 block)``, ``rows`` at a time.

    Each block is read through its own short-lived memory map, so a scan of the whole folder leaves
    only one block's pages mapped in the process (its RSS does not grow with the folder).
    """
    first = 0
    for partition in list_partitions(folder):
        n = partition.num_rows()
        for lo in range(0, n, rows):
            block = normalize(partition.embeddings(kind)[lo : lo + rows])
            yield first + lo, block
        first += n


def is_semantic(folder: str | Path) -> bool:
    """False when the embed stage labelled the embeddings as random-weight (``semantic=false``).

    Folders without the label (LAION's released embeddings, other tools) count as semantic.
    """
    for partition in list_partitions(folder):
        labels = pq.read_schema(metadata_path(folder, partition.name)).metadata or {}
        if labels.get(b"semantic", b"").decode().lower() == "false":
            return False
    return True


def embedding_model(folder: str | Path) -> str | None:
    """The ``embed_model`` label of the folder's metadata, if the embed stage wrote one."""
    for partition in list_partitions(folder):
        labels = pq.read_schema(metadata_path(folder, partition.name)).metadata or {}
        if b"embed_model" in labels:
            return labels[b"embed_model"].decode()
    return None


def folder_signature(folder: str | Path) -> list[list[Any]]:
    """Sizes and mtimes of every partition's files: a changed input is never taken as done."""
    paths = [
        path for p in list_partitions(folder) for path in (p.path(IMG_EMB), metadata_path(folder, p.name))
    ]
    return files_signature(paths)
