"""The candidate task's item lists (S-DPO / LLaRA): the target hidden among other items.

A row's candidates are the ones its source gives (S-DPO JSON `itemList`), else `num_candidates`
items: the target plus items outside the user's history drawn uniformly, in a shuffled order. The
draw is seeded by (run seed, row id, target), so train prompts built on Ray workers, evaluation and
the negatives all see the same list for a row, on every re-run, without storing it.
"""

from __future__ import annotations

import numpy as np

from .records import Example


def sample_candidates(example: Example, num_items: int, num_candidates: int, seed: int) -> tuple[int, ...]:
    """`num_candidates` distinct ids: the target and items neither the target nor in the history."""
    excluded = {example.target, *example.history}
    free = num_items - len(excluded)
    if num_candidates - 1 > free:
        raise ValueError(f"row {example.row_id}: {free} catalogue items lie outside the history and target, too few "
                         f"for data.num_candidates={num_candidates}")
    rng = np.random.default_rng([seed, example.row_id, example.target])
    if free < 4 * num_candidates:  # a small catalogue: draw from the explicit pool
        pool = np.setdiff1d(np.arange(num_items), np.fromiter(excluded, np.int64))
        picks = [int(x) for x in rng.choice(pool, num_candidates - 1, replace=False)]
    else:  # rejection sampling costs ~num_candidates draws, not a pass over a large catalogue
        picks, seen = [], set(excluded)
        while len(picks) < num_candidates - 1:
            for x in rng.integers(num_items, size=2 * num_candidates).tolist():
                if x not in seen and len(picks) < num_candidates - 1:
                    seen.add(x)
                    picks.append(x)
    listed = [*picks, example.target]
    rng.shuffle(listed)
    return tuple(listed)


def candidates_of(example: Example, num_items: int, num_candidates: int, seed: int) -> tuple[int, ...]:
    """The row's given candidates, or a seeded sample of `num_candidates` (see sample_candidates)."""
    if example.candidates:
        return example.candidates
    return sample_candidates(example, num_items, num_candidates, seed)
