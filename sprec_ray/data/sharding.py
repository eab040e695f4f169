"""Examples -> sharded Parquet of ids -> prompt rows (`PromptBuilder`), built where the fit decides.

The Parquet files hold ids; titles are attached by `PromptBuilder`: in the driver for a small stage,
on each Ray Train worker as it streams its share for a large one (train/stream.py). The one text
column is `rejected_text`: a DPO negative the model generated may be no catalogue title, so it
travels as text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .candidates import candidates_of
from .prompts import render_response, render_task_prompt
from .records import Example


def write_examples_parquet(examples: Sequence[Example], out_dir: str | Path, num_shards: int,
                           negatives: Sequence[Sequence[int]] | None = None,
                           rejected_texts: Sequence[Sequence[str]] | None = None) -> list[Path]:
    """One Parquet file per shard; `negatives[i]` (DPO rejected item ids, -1 = not a catalogue item)
    and `rejected_texts[i]` (the rejected titles, which `PromptBuilder` then uses) go with examples[i]."""
    _check_negatives(examples, negatives, rejected_texts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, idx in enumerate(np.array_split(np.arange(len(examples)), max(1, num_shards))):
        rows = [examples[i] for i in idx]
        table = pa.table({
            "row_id": pa.array([e.row_id for e in rows], pa.int64()),
            "history": pa.array([list(e.history) for e in rows], pa.list_(pa.int64())),
            "target": pa.array([e.target for e in rows], pa.int64()),
            "candidates": pa.array([list(e.candidates) for e in rows], pa.list_(pa.int64())),
            "negatives": pa.array([list(negatives[i]) if negatives is not None else [] for i in idx], pa.list_(pa.int64())),
        })
        if rejected_texts is not None:
            table = table.append_column("rejected_text", pa.array([list(rejected_texts[i]) for i in idx],
                                                                  pa.list_(pa.string())))
        path = out_dir / f"part-{shard:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def _check_negatives(examples: Sequence[Example], negatives: Sequence[Sequence[int]] | None,
                     rejected_texts: Sequence[Sequence[str]] | None) -> None:
    for name, lists in (("negative", negatives), ("rejected text", rejected_texts)):
        if lists is not None and len(lists) != len(examples):
            raise ValueError(f"{len(lists)} {name} lists for {len(examples)} examples")
    for i, e in enumerate(examples):
        texts = rejected_texts[i] if rejected_texts is not None else None
        if texts is not None and (isinstance(texts, str) or not all(isinstance(t, str) and t for t in texts)):
            raise ValueError(f"row {e.row_id}: rejected texts must be non-empty strings, got {texts!r}")
        if negatives is None:
            continue
        if texts is not None and len(texts) != len(negatives[i]):
            raise ValueError(f"row {e.row_id}: {len(texts)} rejected texts for {len(negatives[i])} negative ids")
        if texts is None and any(n < 0 for n in negatives[i]):
            raise ValueError(f"row {e.row_id}: negative ids {list(negatives[i])} need rejected texts (id -1 has no title)")


class PromptBuilder:
    """Adds prompt / response (/ cf_prompt, rejected) columns to a pyarrow batch of id rows.
    `candidates` = (data.num_candidates, seed) renders the candidate task's prompts instead."""

    def __init__(self, titles: Sequence[str], item_noun: str, counterfactual: bool = False,
                 candidates: tuple[int, int] | None = None):
        self.titles = list(titles)
        self.item_noun = item_noun
        self.counterfactual = counterfactual
        self.candidates = candidates

    def __call__(self, batch: pa.Table) -> pa.Table:
        titles = self.titles
        targets = batch.column("target").to_pylist()
        histories = [[titles[i] for i in h] for h in batch.column("history").to_pylist()]
        task, lists = "generate", [[]] * len(targets)
        if self.candidates is not None:
            given = batch.column("candidates").to_pylist() if "candidates" in batch.column_names else [[]] * len(targets)
            ids = zip(batch.column("row_id").to_pylist(), batch.column("history").to_pylist(), targets, given, strict=True)
            task, lists = "candidates", [[titles[c] for c in candidates_of(Example(r, tuple(h), t, tuple(g)), len(titles),
                                                                           *self.candidates)] for r, h, t, g in ids]
        prompts = [render_task_prompt(task, h, c, self.item_noun) for h, c in zip(histories, lists, strict=True)]
        cf_prompts = [render_task_prompt(task, [], c, self.item_noun) for c in lists]
        batch = batch.append_column("prompt", pa.array(prompts))
        batch = batch.append_column("response", pa.array([render_response(titles[t]) for t in targets]))
        if self.counterfactual:
            batch = batch.append_column("cf_prompt", pa.array(cf_prompts))
        if "rejected_text" in batch.column_names:
            rejected = [[render_response(t) for t in texts] for texts in batch.column("rejected_text").to_pylist()]
            batch = batch.append_column("rejected", pa.array(rejected, pa.list_(pa.string())))
        elif "negatives" in batch.column_names:
            rejected = [[render_response(titles[i]) for i in negs] for negs in batch.column("negatives").to_pylist()]
            batch = batch.append_column("rejected", pa.array(rejected, pa.list_(pa.string())))
        return batch


@dataclass(frozen=True)
class PromptShards:
    """A stage's rows as id shards on storage plus what turns them into prompts. The fit decides
    where the prompts are built: here for a small set, on each Ray Train worker as it streams its
    share for a large one (train.stream_rows, train/stream.py)."""

    directory: str  # Parquet shards of id rows (write_examples_parquet / the prepared split)
    titles: Sequence[str]
    item_noun: str
    counterfactual: bool = False
    candidates: tuple[int, int] | None = None

    def builder(self, titles: Sequence[str] | None = None) -> PromptBuilder:
        return PromptBuilder(self.titles if titles is None else titles, self.item_noun, self.counterfactual, self.candidates)

    def files(self) -> list[str]:
        return sorted(str(f) for f in Path(self.directory).glob("*.parquet"))

    def table(self) -> pa.Table:
        """Every prompt row, built in this process: a round's few hundred rows take milliseconds."""
        return self.builder()(pq.read_table(self.directory))
