"""A round's rejected responses, by the run's method and task, and the file that carries them to DPO.

  candidate task      K non-target candidates per row: the model's own wrong picks, else random ones
                      (generate/candidate_negatives.py)
  selfplay dpo_random K uniform random catalogue items other than the target (the control)
  selfplay sprec      the model's own answers, parsed and classified by grounding (generate/negatives.py);
                      a generated text longer than model.max_response_len tokens drops its row

`<run>/r<N>/negatives.parquet` holds, per round row, the negative ids (-1 = generated text that is no
catalogue title) and the rejected texts; an empty list means the row was dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import RunConfig
from ..data.catalogue import Catalogue
from ..data.prompts import render_response
from ..data.records import Example
from .negatives import GrounderLike

SCHEMA = pa.schema([("row_id", pa.int64()), ("negatives", pa.list_(pa.int64())), ("rejected_text", pa.list_(pa.string()))])
Negatives = tuple[list[list[int]], list[list[str]], dict[str, float]]


def round_negatives(cfg: RunConfig, round_id: int, rows: Sequence[Example], completions: list[list[str]] | None,
                    catalogue: Catalogue, grounder: Callable[[], GrounderLike],
                    candidates: Callable[[Example], tuple[int, ...]], tokenizer_dir: Path) -> Negatives:
    """(ids, texts, stats) per row of `rows`; `completions` are the model's answers (None for dpo_random)."""
    k, seed, titles = cfg.dpo.num_negatives, cfg.seed + round_id, catalogue.titles
    if cfg.data.task == "candidates":
        from .candidate_negatives import candidate_negatives

        ids, stats = candidate_negatives(rows, [candidates(e) for e in rows], completions, titles, k, seed)
        return ids, [[titles[i] for i in n] for n in ids], stats.metrics()
    if cfg.selfplay.method == "dpo_random":
        ids = random_negatives(rows, len(titles), k, seed)
        return ids, [[titles[i] for i in n] for n in ids], {"random": float(len(rows) * k)}
    from .negatives import build_negatives

    if completions is None:
        raise ValueError(f"round {round_id}: self-play negatives need the model's completions")
    negatives, neg_stats = build_negatives(rows, completions, catalogue, grounder(), k, seed, cfg.dpo.negative_source,
                                           cfg.dpo.on_equal_positive)
    ids, texts = [list(n.ids) for n in negatives], [list(n.texts) for n in negatives]
    too_long = drop_over_long(ids, texts, tokenizer_dir, cfg.model.max_response_len)
    return ids, texts, {**neg_stats.metrics(), "rows_too_long": float(too_long)}


def random_negatives(rows: Sequence[Example], num_items: int, k: int, seed: int) -> list[list[int]]:
    """The 'SFT then DPO with random negatives' baseline: K uniform items != the target."""
    rng = np.random.default_rng(seed)
    out = []
    for e in rows:
        picks: list[int] = []
        while len(picks) < k:
            item = int(rng.integers(num_items))
            if item != e.target and item not in picks:
                picks.append(item)
        out.append(picks)
    return out


def drop_over_long(ids: list[list[int]], texts: list[list[str]], tokenizer_dir: Path, max_response_len: int) -> int:
    """Drop (in place) rows with a generated text longer than max_response_len once tokenised:
    decoded bytes can re-tokenise into more tokens than were sampled, and responses are never cut."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    limit = max_response_len - 1  # EOS is appended in training
    dropped = 0
    for i, row in enumerate(texts):
        if row and any(len(tokenizer(render_response(t), add_special_tokens=False)["input_ids"]) > limit for t in row):
            ids[i], texts[i] = [], []
            dropped += 1
    return dropped


def write_negatives(path: Path, rows: Sequence[Example], ids: list[list[int]], texts: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"row_id": [e.row_id for e in rows], "negatives": ids, "rejected_text": texts}, schema=SCHEMA), path)


def read_negatives(path: str | Path) -> dict[int, tuple[list[int], list[str]]]:
    """row_id -> (ids, texts) for the rows that kept a negative."""
    table = pq.read_table(path).to_pydict()
    return {row: (ids, texts) for row, ids, texts in
            zip(table["row_id"], table["negatives"], table["rejected_text"], strict=True) if texts}
