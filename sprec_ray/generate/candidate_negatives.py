"""S-DPO negatives in the candidate task: K distinct non-target candidates per row.

Without completions (`selfplay.method: dpo_random`) all K are drawn at random among the row's
non-target candidates. With the model's own completions (`sprec`, self-play inside the candidate
setting) each completion is read as the metrics read it (`eval.candidates.read_answer`): one that
names exactly one candidate, a wrong one, gives that candidate as a negative. A completion that
names the target, no candidate or several gives none, and the row is filled up with random wrong
candidates, so no row is dropped: a correct answer is no mistake to push down, but the row keeps
its positive and an S-DPO row needs exactly K negatives. A completion repeating a negative already
taken, or beyond K, is skipped. Negatives are catalogue items, so they are written as their titles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..data.records import Example
from ..eval.candidates import read_answer


@dataclass
class CandidateNegativeStats:
    """Every completion lands in one of own_wrong / equal_to_positive / no_candidate /
    several_candidates / duplicates / surplus; negatives == own_wrong + random_fill == K * rows."""

    rows: int = 0
    completions: int = 0
    own_wrong: int = 0  # the model's own wrong choice, taken as a negative
    equal_to_positive: int = 0  # named the target alone
    no_candidate: int = 0
    several_candidates: int = 0
    duplicates: int = 0
    surplus: int = 0
    random_fill: int = 0
    negatives: int = 0

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def candidate_negatives(rows: Sequence[Example], candidates: Sequence[Sequence[int]],
                        completions: Sequence[Sequence[str]] | None, titles: Sequence[str], k: int,
                        seed: int) -> tuple[list[list[int]], CandidateNegativeStats]:
    """Per row (same order) its K negative ids, and the counts."""
    if len(candidates) != len(rows) or (completions is not None and len(completions) != len(rows)):
        raise ValueError(f"{len(rows)} rows, {len(candidates)} candidate lists, "
                         f"{len(completions) if completions is not None else 'no'} completion lists")
    stats = CandidateNegativeStats(rows=len(rows))
    out = []
    for i, (e, cands) in enumerate(zip(rows, candidates, strict=True)):
        wrong = [c for c in dict.fromkeys(cands) if c != e.target]
        if len(wrong) < k:
            raise ValueError(f"row {e.row_id}: {len(wrong)} non-target candidates, fewer than dpo.num_negatives={k}")
        picks: list[int] = []
        for text in completions[i] if completions is not None else ():
            stats.completions += 1
            named = [cands[j] for j in read_answer(text, [titles[c] for c in cands])[0]]
            if len(named) != 1:
                stats.no_candidate += not named
                stats.several_candidates += len(named) > 1
            elif named[0] == e.target:
                stats.equal_to_positive += 1
            elif named[0] in picks:
                stats.duplicates += 1
            elif len(picks) >= k:
                stats.surplus += 1
            else:
                picks.append(named[0])
        stats.own_wrong += len(picks)
        # seeded per row, so row order and sharding don't change the draw
        rng = np.random.default_rng([seed, e.row_id])
        rest = [c for c in wrong if c not in picks]
        fill = [int(x) for x in rng.choice(rest, k - len(picks), replace=False)] if len(picks) < k else []
        stats.random_fill += len(fill)
        out.append(picks + fill)
    stats.negatives = stats.own_wrong + stats.random_fill
    return out, stats
