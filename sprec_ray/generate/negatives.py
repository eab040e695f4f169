"""Self-play negatives: the previous round's predictions, grounded to catalogue items, K per prompt.

Per example, in this order, until K distinct negatives are found:
1. the model's own completions (n samples or beams): `parse_response`, then the grounder's top item
   (exact title match, else the nearest title by embedding). A prediction equal to the target is
   dropped (SPRec keeps it and trains a zero-gradient pair, seeds-spec §6.3).
2. the grounder's next neighbours of those completions, round-robin over completions (near misses,
   i.e. hard negatives);
3. popularity-weighted random items, weight = training popularity + 1 (so unseen items can appear).

History items: a *predicted* history item is kept as a negative, as in SPRec: recommending an item the
user already consumed is a real mistake the model should unlearn (counted in `in_history`). Items
added by steps 2 and 3 are not the model's choice, so they skip history items, which would be false
negatives (the user did like them); history is used by step 3 only if nothing else is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..data.catalogue import Catalogue
from ..data.prompts import parse_response
from ..data.records import Example


class GrounderLike(Protocol):
    def ground(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def exact_ids(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class NegativeStats:
    """Counts per round; every completion lands in exactly one of unparsed / exact / grounded."""

    rows: int = 0
    completions: int = 0
    unparsed: int = 0  # no title text after parse_response
    exact: int = 0  # parsed text is a catalogue title
    grounded: int = 0  # mapped to the nearest title by embedding
    equal_to_positive: int = 0  # model predictions equal to the target: dropped
    duplicates: int = 0  # model predictions already taken for the same row (n > 1)
    model: int = 0  # negatives taken from the model's own predictions
    in_history: int = 0  # ... of which are history items (kept, see module docstring)
    neighbours: int = 0  # filled from the grounder's next neighbours
    topped_up: int = 0  # filled with popularity-weighted random items


def _check_inputs(examples: Sequence[Example], completions: Sequence[Sequence[str]], num_items: int, k: int) -> None:
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completion lists")
    if not 1 <= k < num_items:
        raise ValueError(f"k={k} negatives need 1 <= k < catalogue size {num_items}")
    for e, texts in zip(examples, completions, strict=True):
        if not 0 <= e.target < num_items:
            raise ValueError(f"row {e.row_id}: target id {e.target} is outside the catalogue 0..{num_items - 1}")
        bad = [h for h in e.history if not 0 <= h < num_items]
        if bad:
            raise ValueError(f"row {e.row_id}: history ids {bad} are outside the catalogue 0..{num_items - 1}")
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise ValueError(f"row {e.row_id}: completions must be a list of str, got {texts!r}")


def build_negatives(examples: Sequence[Example], completions: Sequence[Sequence[str]], catalogue: Catalogue,
                    grounder: GrounderLike, k: int, seed: int) -> tuple[list[list[int]], NegativeStats]:
    """K distinct negative item ids per example (never the target), plus counts of where they came from."""
    num_items = len(catalogue)
    _check_inputs(examples, completions, num_items, k)
    stats = NegativeStats(rows=len(examples))
    parsed = [[parse_response(t) for t in texts] for texts in completions]
    flat = [(i, text) for i, texts in enumerate(parsed) for text in texts]
    stats.completions = len(flat)
    texts = [text for _, text in flat if text]
    max_hist = max((len(e.history) for e in examples), default=0)
    depth = min(num_items, 2 * k + 1 + max_hist)  # enough neighbours to skip target, history and taken
    if texts:
        ids, _ = grounder.ground(texts, depth)
        exact = grounder.exact_ids(texts)
    else:
        ids, exact = np.zeros((0, depth), dtype=np.int64), np.zeros(0, dtype=np.int64)
    stats.unparsed = len(flat) - len(texts)
    stats.exact = int((exact >= 0).sum())
    stats.grounded = len(texts) - stats.exact
    rows_of: list[list[np.ndarray]] = [[] for _ in examples]  # grounded neighbour lists per example
    j = 0
    for i, text in flat:
        if text:
            rows_of[i].append(ids[j])
            j += 1
    weights = np.asarray(catalogue.popularity, dtype=np.float64) + 1.0
    negatives = [_negatives_for(e, rows_of[i], k, weights, seed, stats) for i, e in enumerate(examples)]
    return negatives, stats


def _negatives_for(example: Example, grounded: list[np.ndarray], k: int, weights: np.ndarray, seed: int,
                   stats: NegativeStats) -> list[int]:
    history = set(example.history)
    chosen: list[int] = []
    taken = {example.target}
    for row in grounded:  # 1. the model's predictions
        item = int(row[0])
        if item == example.target:
            stats.equal_to_positive += 1
        elif item in taken:
            stats.duplicates += 1
        elif len(chosen) < k:
            chosen.append(item)
            taken.add(item)
            stats.model += 1
            stats.in_history += item in history
    for pos in range(1, grounded[0].shape[0] if grounded else 0):  # 2. next neighbours, round-robin
        if len(chosen) >= k:
            break
        for row in grounded:
            item = int(row[pos])
            if len(chosen) < k and item >= 0 and item not in taken and item not in history:
                chosen.append(item)
                taken.add(item)
                stats.neighbours += 1
    if len(chosen) < k:  # 3. popularity-weighted top-up, seeded per row so order and sharding don't matter
        rng = np.random.default_rng([seed, example.row_id])
        for pool in (_pool(weights.size, taken | history), _pool(weights.size, taken)):
            need = k - len(chosen)
            if need <= 0 or pool.size == 0:
                continue
            p = weights[pool] / weights[pool].sum()
            picks = rng.choice(pool, size=min(need, pool.size), replace=False, p=p)
            chosen.extend(int(x) for x in picks)
            taken.update(int(x) for x in picks)
            stats.topped_up += len(picks)
    return chosen


def _pool(num_items: int, excluded: set[int]) -> np.ndarray:
    mask = np.ones(num_items, dtype=bool)
    mask[list(excluded)] = False
    return np.flatnonzero(mask)
