"""Encoded images of samples read back from a folder of img2dataset (webdataset) shards, by shard and key.

Embedding folders and bundles hold vectors, not pictures; reports (the audit's training images, the
dedup report's thumbnails) read the pictures back from the shards the rows came from. A row names
its shard (the metadata's ``shard`` column, e.g. ``00000`` for ``00000.tar``) and its ``key``.

Tars are read with :func:`pipeline.io.shards.iter_tar_samples` (streamed, members capped in size);
:meth:`ShardImages.read` reads each needed tar once and keeps only the wanted images, and
:meth:`ShardImages.image` keeps one whole shard at a time for callers that go shard by shard.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from pipeline.io.shards import DEFAULT_MAX_MEMBER_BYTES, IMAGE_EXTENSIONS, iter_tar_samples

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
