"""Random access to images in webdataset tars (the kNN service's /image route): the bytes stored, one
header scan per shard, bounded memory, the stream reader's refusals kept."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from fixtures.shard_factory import encode, random_photo, sample, write_shard
from pipeline.io.images import ShardImages, TarImageIndex


def _shards(folder: Path, count: int = 3, per_shard: int = 5) -> dict[tuple[str, str], bytes]:
    stored = {}
    for shard in range(count):
        photos = [
            sample(f"{shard:04d}{i:05d}", encode(random_photo(10 * shard + i))) for i in range(per_shard)
        ]
        write_shard(folder, shard, photos)
        stored |= {(f"{shard:05d}", s.key): s.files["jpg"] for s in photos}
    return stored


def test_each_image_is_the_bytes_stored_and_the_stream_reader_agrees(tmp_path: Path):
    stored = _shards(tmp_path)
    index = TarImageIndex(tmp_path)
    for (shard, key), data in reversed(list(stored.items())):  # any order, not the tar's
        assert index.image(shard, key) == data
    assert ShardImages(tmp_path).read(stored) == stored
    assert index.image("00000", "no-such-key") is None
    assert index.image("00009", "000000000") is None  # no such shard
    assert index.image("../00000", "000000000") is None  # shard names are names, never paths


def test_offsets_of_the_most_recent_shards_only(tmp_path: Path):
    stored = _shards(tmp_path, count=3)
    index = TarImageIndex(tmp_path, max_shards=2)
    for shard, key in stored:
        index.image(shard, key)
    assert list(index._offsets) == ["00001", "00002"]  # the oldest shard's offsets were dropped
    first = next(iter(stored))
    assert index.image(*first) == stored[first]  # and are scanned again when asked for


def test_oversized_members_are_not_indexed_and_a_repeated_key_keeps_the_first(tmp_path: Path):
    big, small, again = encode(random_photo(1, (200, 200))), encode(random_photo(2)), encode(random_photo(3))
    with tarfile.open(tmp_path / "00000.tar", "w") as archive:
        for name, data in (("big.jpg", big), ("small.jpg", small), ("small.png", again)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    index = TarImageIndex(tmp_path, max_member_bytes=len(big) - 1)
    assert index.image("00000", "big") is None
    assert index.image("00000", "small") == small


def test_a_truncated_tar_serves_what_precedes_the_break(tmp_path: Path):
    photos = [sample(f"k{i}", encode(random_photo(i))) for i in range(4)]
    tar = write_shard(tmp_path, 0, photos)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    index = TarImageIndex(tmp_path)
    assert index.image("00000", "k0") == photos[0].files["jpg"]
    assert index.image("00000", "k3") is None
