"""The driver-side writer pattern of the shard-parallel stages: write a partition once all its rows arrived.

Ray Data hands batches back to the driver in no fixed order, and one input shard's rows may be spread
over many batches (and one batch may hold rows of several shards). Every row therefore carries the
name of its shard (``shard``) and how many rows that shard has in total (``shard_rows``, set by the
reader). :class:`PartitionAssembler` buffers rows per shard and calls the stage's write callback the
moment a shard's count is reached, so finished partitions land on disk (and get their done marker)
while the rest of the run is still streaming. Shards that yield no rows at all are written after the
stream ends (:meth:`PartitionAssembler.finish_empty`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

#: ``write(shard, rows)``: ``rows`` holds every row of the shard (any order), or None for an empty shard.
WriteCallback = Callable[[str, "pa.Table | None"], Any]


class PartitionAssembler:
    """Buffers rows per shard and writes each shard exactly once, when its last row arrived.

    Args:
        write (`Callable[[str, pa.Table | None], Any]`): called once per shard with all its rows, or
            with None for a shard that produced no rows.
    """

    def __init__(self, write: WriteCallback):
        self._write = write
        self.pending: dict[str, list[pa.Table]] = defaultdict(list)
        self.received: Counter[str] = Counter()
        self.expected: dict[str, int] = {}
        self.finished: list[str] = []

    def add(self, batch: pa.Table) -> list[str]:
        """Take a batch of rows (with ``shard`` and ``shard_rows`` columns); return the shards completed."""
        completed = []
        for shard, expected in shard_sizes(batch).items():
            self.expected.setdefault(shard, expected)
        for shard in dict.fromkeys(batch.column("shard").to_pylist()):
            rows = batch.filter(pc.equal(batch.column("shard"), shard))
            self.pending[shard].append(rows)
            self.received[shard] += rows.num_rows
            if self.received[shard] > self.expected[shard]:
                received, expected = self.received[shard], self.expected[shard]
                raise RuntimeError(f"shard {shard}: {received} rows arrived, only {expected} expected")
            if self.received[shard] == self.expected[shard]:
                self._complete(shard, pa.concat_tables(self.pending.pop(shard)))
                completed.append(shard)
        return completed

    def finish_empty(self, todo: Iterable[str]) -> list[str]:
        """After the stream: write the shards of ``todo`` that produced no rows; fail on incomplete ones."""
        written = []
        for shard in todo:
            if shard in self.finished:
                continue
            if self.received[shard]:
                raise RuntimeError(f"shard {shard}: {self.received[shard]} rows arrived, expected more")
            self._complete(shard, None)
            written.append(shard)
        return written

    def _complete(self, shard: str, rows: pa.Table | None) -> None:
        self._write(shard, rows)
        self.finished.append(shard)


def shard_sizes(batch: pa.Table) -> dict[str, int]:
    """``{shard: shard_rows}`` for the shards in ``batch`` (all rows of a shard carry the same count)."""
    seen: dict[str, int] = {}
    for shard, count in zip(
        batch.column("shard").to_pylist(), batch.column("shard_rows").to_pylist(), strict=False
    ):
        seen.setdefault(shard, count)
    return seen
