"""Candidate-task metrics, S-DPO's HR@1 and ValidRatio, with exact title matching.

Titles are compared after normalisation: inner whitespace collapsed, ends stripped, case folded.
* The answer *names* a candidate when the candidate's quoted title, '"Title"', occurs in the
  answer; an answer with no quote character names the candidate equal to its first line. Unlike
  S-DPO's substring test (`title in answer`, docs/method.md#candidate-task-metrics), naming "Ghost" does not name
  "The Ghost Ship". Candidates with equal normalised titles count as one name. The one ambiguity
  left: a title quoted inside another ('"It"' in '"A Child Called "It""') names both.
* The answer's *first title* is the quoted title that opens at its first quote character (the
  first line when it has no quote).

    cand_HR@1          = (1/N) #{rows whose first title is the target's}
    cand_ValidRatio    = (1/N) #{rows whose answer names exactly one candidate}
    cand_n_none        = rows naming no candidate (not valid; an empty answer is one)
    cand_n_multiple    = rows naming two or more candidates (not valid)

All over the N rows evaluated. S-DPO's HitRatio@1 also requires a valid answer; here HR@1 reads
the answer's first title as the grounded metrics do, so '"Target", "Other"' is a hit but not valid.
The keys carry a `cand_` prefix, apart from the grounded full-catalogue NDCG/HR/DivRatio.

Log-prob ranking (eval.candidate_scoring=logprob) needs no parsing: every candidate gets a score,
the list is sorted by it (ties keep list order), and the target's rank r (0-based) gives

    rank_HR@k   = (1/N) #{rows with r < k}
    rank_NDCG@k = (1/N) sum over rows with r < k of 1 / log2(r + 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def read_answer(answer: str, titles: Sequence[str]) -> tuple[list[int], int | None]:
    """Positions in `titles` of the candidates the answer names (one per distinct normalised title,
    in candidate order), and the position of its first title when that is a candidate, else None."""
    text = _norm(answer)
    first_quote = text.find('"')
    line = _norm(answer.strip().split("\n")[0]) if first_quote < 0 else ""
    named: list[int] = []
    first: int | None = None
    seen: set[str] = set()
    for i, title in enumerate(titles):
        key = _norm(title)
        if not key or key in seen:
            continue
        quoted = f'"{key}"'
        if (quoted in text) if first_quote >= 0 else key == line:
            seen.add(key)
            named.append(i)
            if first is None and (first_quote < 0 or text.startswith(quoted, first_quote)):
                first = i
    return named, first


def candidate_metrics(answers: Sequence[str], candidates: Sequence[Sequence[int]], targets: Sequence[int],
                      titles: Sequence[str]) -> tuple[dict[str, float], list[list[int]]]:
    """The metrics above over the rows, and per row the ids of the candidates its answer names."""
    if not len(answers) == len(candidates) == len(targets):
        raise ValueError(f"{len(answers)} answers, {len(candidates)} candidate lists and {len(targets)} targets")
    hits = valid = none = multiple = 0
    named_ids: list[list[int]] = []
    for answer, cands, target in zip(answers, candidates, targets, strict=True):
        named, first = read_answer(answer, [titles[c] for c in cands])
        named_ids.append([cands[i] for i in named])
        hits += first is not None and cands[first] == target
        valid += len(named) == 1
        none += not named
        multiple += len(named) > 1
    n = max(len(answers), 1)
    return ({"cand_HR@1": hits / n, "cand_ValidRatio": valid / n, "cand_n_none": float(none),
             "cand_n_multiple": float(multiple)}, named_ids)


def ranked(scores: Sequence[float]) -> list[int]:
    """Positions by descending score; equal scores keep list order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def rank_metrics(scores: Sequence[Sequence[float]], candidates: Sequence[Sequence[int]], targets: Sequence[int],
                 ks: Sequence[int]) -> dict[str, float]:
    """rank_HR@k and rank_NDCG@k over the rows; a row whose list lacks its target is a miss."""
    if not len(scores) == len(candidates) == len(targets):
        raise ValueError(f"{len(scores)} score lists, {len(candidates)} candidate lists and {len(targets)} targets")
    totals = {f"rank_{m}@{k}": 0.0 for k in ks for m in ("HR", "NDCG")}
    for row_scores, cands, target in zip(scores, candidates, targets, strict=True):
        if len(row_scores) != len(cands):
            raise ValueError(f"{len(row_scores)} scores for {len(cands)} candidates")
        order = [cands[i] for i in ranked(row_scores)]
        if target not in order:
            continue
        r = order.index(target)
        for k in ks:
            if r < k:
                totals[f"rank_HR@{k}"] += 1.0
                totals[f"rank_NDCG@{k}"] += 1.0 / math.log2(r + 2)
    n = max(len(scores), 1)
    return {key: value / n for key, value in totals.items()}
