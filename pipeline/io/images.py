"""Encoded images of samples read back from a folder of img2dataset (webdataset) shards, by shard and key.

Embedding folders and bundles hold vectors, not pictures; reports (the audit's training images, the
dedup report's thumbnails) read the pictures back from the shards the rows came from. A row names
its shard (the metadata's ``shard`` column, e.g. ``00000`` for ``00000.tar``) and its ``key``.

Tars are read with :func:`pipeline.io.shards.iter_tar_samples` (streamed, members capped in size);
:meth:`ShardImages.read` reads each needed tar once and keeps only the wanted images, and
:meth:`ShardImages.image` keeps one whole shard at a time for callers that go shard by shard.
:class:`TarImageIndex` serves single images in random order (the kNN service): it reads a tar's
headers once, keeps each image member's offset, and then reads only the bytes asked for.
"""

from __future__ import annotations

import logging
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from pipeline.io.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    IMAGE_EXTENSIONS,
    iter_tar_samples,
    member_problem,
    split_member_name,
)

log = logging.getLogger(__name__)


class ShardImages:
    """Image bytes of samples in the shards of ``folder``, found by (shard name, key).

    A missing tar gives no image (and one warning); a sample without an image file, or a rejected
    one (broken tar, member over ``max_member_bytes``), gives none either.
    """

    def __init__(self, folder: str | Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.folder = Path(folder)
        self.max_member_bytes = max_member_bytes
        self._cached: tuple[str, dict[str, bytes]] | None = None
        self.tars_read = 0

    def tar(self, shard: str) -> Path:
        return self.folder / f"{shard}.tar"

    def _scan(self, shard: str, keys: set[str] | None) -> dict[str, bytes]:
        """Images of ``keys`` (every image when None) in one shard's tar; stops once all are found."""
        found: dict[str, bytes] = {}
        tar = self.tar(shard)
        if not tar.is_file():
            log.warning("images: shard %s not found in %s", tar.name, self.folder)
            return found
        self.tars_read += 1
        for sample in iter_tar_samples(tar, self.max_member_bytes):
            if keys is not None and sample.key not in keys:
                continue
            data = next((sample.files[e] for e in IMAGE_EXTENSIONS if e in sample.files), None)
            if data:
                found[sample.key] = data
            if keys is not None and len(found) == len(keys):
                break
        return found

    def image(self, shard: str, key: str) -> bytes | None:
        """One sample's image; the whole shard is kept until another shard is asked for."""
        if self._cached is None or self._cached[0] != shard:
            self._cached = (shard, self._scan(shard, None))
        return self._cached[1].get(key)

    def read(
        self, wanted: Iterable[tuple[str, str]], max_tars: int | None = None
    ) -> dict[tuple[str, str], bytes]:
        """Images of every wanted ``(shard, key)``, reading each tar once and keeping only those.

        ``max_tars`` bounds the tars read: the shards holding the most wanted images are read first,
        the rest are left out (their images are absent from the result).
        """
        by_shard: dict[str, set[str]] = {}
        for shard, key in wanted:
            by_shard.setdefault(str(shard), set()).add(str(key))
        order = sorted(by_shard, key=lambda s: (-len(by_shard[s]), s))
        if max_tars is not None and len(order) > max_tars:
            log.info("images: reading %d of the %d shards that hold wanted images", max_tars, len(order))
            order = order[:max_tars]
        out: dict[tuple[str, str], bytes] = {}
        for shard in sorted(order):
            for key, data in self._scan(shard, by_shard[shard]).items():
                out[(shard, key)] = data
        return out


class TarImageIndex:
    """Random access to sample images in a folder of webdataset tars: one header scan per shard, then
    one read of the image's own bytes per request.

    A shard's offsets (key -> position and size of its image member) are kept for the ``max_shards``
    shards asked for most recently (a few hundred kB for a 10,000-sample shard), so memory is bounded
    whatever the folder's size. Members that :func:`pipeline.io.shards.iter_tar_samples` would refuse
    (sparse, over ``max_member_bytes``) are not indexed; of a key met twice the first is kept, as
    there. Safe to share between threads.
    """

    def __init__(
        self, folder: str | Path, max_shards: int = 64, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    ):
        self.folder = Path(folder)
        self.max_shards = max_shards
        self.max_member_bytes = max_member_bytes
        self._offsets: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def _scan(self, shard: str) -> dict[str, tuple[int, int]]:
        offsets: dict[str, tuple[int, int]] = {}
        tar = self.folder / f"{shard}.tar"
        try:
            with tarfile.open(tar, mode="r:") as archive:
                for member in archive:  # headers only: a seekable tar skips over the data
                    key, ext = split_member_name(member.name)
                    if not member.isfile() or ext not in IMAGE_EXTENSIONS or key in offsets:
                        continue
                    if member_problem(member, self.max_member_bytes) is None:
                        offsets[key] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError) as exc:  # a broken tail keeps what was indexed before it
            log.warning("images: shard %s read up to a problem: %s", tar, exc)
        return offsets

    def _shard(self, shard: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            if shard in self._offsets:
                self._offsets.move_to_end(shard)
                return self._offsets[shard]
        offsets = self._scan(shard)  # outside the lock: other shards' requests go on meanwhile
        with self._lock:
            self._offsets[shard] = offsets
            while len(self._offsets) > self.max_shards:
                self._offsets.popitem(last=False)
        return offsets

    def image(self, shard: str, key: str) -> bytes | None:
        """The encoded image of sample ``key`` in ``shard``, or None when the shard has none for it."""
        if "/" in shard or shard.startswith("."):
            return None  # shard names come from the bundle's metadata; never a path elsewhere
        entry = self._shard(shard).get(key)
        if entry is None:
            return None
        offset, size = entry
        with (self.folder / f"{shard}.tar").open("rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        return data if len(data) == size else None
