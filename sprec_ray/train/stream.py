"""A large stage's rows, streamed from the Parquet shards on storage straight to each Ray Train worker.

The driver never reads the rows: it cuts the concatenated shards (in file-name order) into one
contiguous range per rank from the files' metadata alone, `rows // world` rows each; the last
`rows % world` rows of the split are left out, so every rank plans the same number of steps (the
ZeRO all-reduce waits otherwise). Each worker reads its range in windows of
`train.stream_window_rows` rows, builds the prompts (`PromptBuilder`), tokenises them, and plans
the window's micro-batches on their own (shuffle + length bucketing, `plan_epoch`). A window holds a
whole number of optimizer steps, so step i names its window and nothing else: a fit resumed mid-stage
reads from that window on and sees the same rows in the same order as one that never stopped.

Why not `ray.train`'s `datasets=` / `streaming_split`: its coordinator hands blocks to whichever
rank asks next, so which rank trains on a row is not reproducible, and neither is a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.sharding import PromptShards
from .batching import group_steps, plan_epoch

ID_COLUMNS = ("row_id", "history", "target", "candidates")
READ_BATCH = 4096  # rows per Parquet read: bounds a reader's memory between windows


@dataclass(frozen=True)
class Span:
    """Rows [start, stop) of one Parquet file."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class RankStream:
    """One rank's share of a streamed stage: what a worker needs to read, build and tokenise it."""

    spans: tuple[Span, ...]
    rows: int
    window: int  # rows per window, a multiple of batch_size x grad_accum
    titles: Any  # ObjectRef of the catalogue titles, put once for every rank
    shards: PromptShards  # prompt settings (its titles are dropped: the ref above carries them)
    columns: tuple[str, ...]  # what the phase reads of a built prompt row


def split_rows(files: Sequence[str], world: int) -> tuple[list[tuple[Span, ...]], int]:
    """Each rank's spans of the files' concatenation, `rows // world` rows each, and the row count."""
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    offsets = np.r_[0, np.cumsum(counts)]
    per = int(offsets[-1]) // world
    ranks = []
    for rank in range(world):
        lo, hi = rank * per, (rank + 1) * per
        ranks.append(tuple(Span(f, int(max(lo, a) - a), int(min(hi, b) - a))
                           for f, a, b in zip(files, offsets[:-1], offsets[1:], strict=True) if a < hi and b > lo))
    return ranks, int(offsets[-1])


def _file_batches(path: str, start: int, stop: int) -> Iterator[pa.RecordBatch]:
    """Rows [start, stop) of one file, read row group by row group in READ_BATCH-row batches."""
    f = pq.ParquetFile(path)
    first = 0
    for group in range(f.metadata.num_row_groups):
        size = f.metadata.row_group(group).num_rows
        if first + size > start and first < stop:
            at = first
            for batch in f.iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=list(ID_COLUMNS)):
                lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
                if lo < hi:
                    yield batch.slice(lo, hi - lo)
                at += batch.num_rows
        first += size


class SpanReader:
    """Reads rows [offset, offset + count) of a rank's spans; sequential reads continue one open
    stream, any other offset (a resume, a new epoch) opens a new one at that row."""

    def __init__(self, spans: Sequence[Span]):
        self.spans = tuple(spans)
        self._position, self._batches, self._left = -1, iter(()), None
        self.rows_read = 0

    def _seek(self, offset: int) -> None:
        def batches() -> Iterator[pa.RecordBatch]:
            before = 0
            for span in self.spans:
                size = span.stop - span.start
                if before + size > offset:
                    yield from _file_batches(span.path, span.start + max(0, offset - before), span.stop)
                before += size

        self._position, self._batches, self._left = offset, batches(), None

    def read(self, offset: int, count: int) -> pa.Table:
        if offset != self._position:
            self._seek(offset)
        parts, need = [], count
        while need > 0:
            batch = self._left if self._left is not None else next(self._batches, None)
            if batch is None:
                break
            parts.append(batch.slice(0, need))
            self._left = batch.slice(need) if batch.num_rows > need else None
            need -= min(need, batch.num_rows)
        table = pa.Table.from_batches(parts) if parts else pa.table({})
        self._position += table.num_rows
        self.rows_read += table.num_rows
        return table


def window_seed(seed: int, window: int) -> int:
    """The shuffle seed of one window; window 0 keeps `seed`, so a stream of one window plans exactly
    what the in-memory path plans for the same rows."""
    return seed if window == 0 else int(np.random.SeedSequence([seed, window]).generate_state(1)[0])


class StreamPlan:
    """`loop.StepPlan` for a streamed share: step i -> its micro-batches, as indices into `rows`, the
    tokenised rows of the step's window (read and tokenised by `load` when its first step comes)."""

    def __init__(self, stream: RankStream, load: Callable[[pa.Table], list[Any]], batch_size: int, grad_accum: int,
                 epochs: int, max_steps: int, seed: int):
        import ray

        self.stream, self.load, self.seed = stream, load, seed
        self.builder = stream.shards.builder(ray.get(stream.titles))
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.reader = SpanReader(stream.spans)
        self.window_steps = stream.window // (batch_size * grad_accum)
        full, rest = divmod(stream.rows, stream.window)
        self.per_epoch = full * self.window_steps + math.ceil(math.ceil(rest / batch_size) / grad_accum)
        total = self.per_epoch * epochs
        self.total = min(total, max_steps) if max_steps > 0 else total
        self._key: tuple[int, int] | None = None
        self.rows: list[Any] = []
        self._steps: list[list[list[int]]] = []

    def step(self, index: int) -> list[list[int]]:
        epoch, within = divmod(index, self.per_epoch)
        window, k = divmod(within, self.window_steps)
        if self._key != (epoch, window):
            table = self.reader.read(window * self.stream.window, self.stream.window)
            self.rows = self.load(self.builder(table).select(list(self.stream.columns)))
            lengths = [r.length for r in self.rows]
            self._steps = group_steps(plan_epoch(lengths, self.batch_size, window_seed(self.seed, window), epoch),
                                      self.grad_accum)
            self._key = (epoch, window)
        return self._steps[k]
