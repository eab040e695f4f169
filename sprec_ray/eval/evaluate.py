"""Generated completions -> parsed titles -> grounded top-K lists -> ranking metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.catalogue import Catalogue
from ..data.prompts import names_several_titles, parse_response
from ..data.records import Example
from .candidates import candidate_metrics
from .metrics import ranking_metrics


def evaluate_completions(completions: Sequence[Sequence[str]], rows: Sequence[Example], catalogue: Catalogue,
                         grounder, ks: Sequence[int], candidates: Sequence[Sequence[int]] | None = None,
                         ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics over `rows` from the first completion of each, plus one prediction record per row.
    With `candidates` (the candidate task's list per row) the cand_ metrics are added too."""
    if len(completions) != len(rows):
        raise ValueError(f"{len(completions)} completions for {len(rows)} rows")
    texts = [parse_response(c[0], catalogue) if c else "" for c in completions]
    valid = np.array([bool(t) for t in texts])
    ids, scores = grounder.ground(texts, k=max(ks))
    metrics = ranking_metrics(ids, [e.target for e in rows], [e.history for e in rows], catalogue, ks, valid=valid)
    metrics.update(answer_stats(texts, ids[:, 0], valid, catalogue))
    metrics["n_several_titles"] = float(sum(names_several_titles(c[0], catalogue) for c in completions if c))
    predictions = [{"row_id": e.row_id, "target": e.target, "generated": c[0] if c else "", "parsed": t,
                    "top": ids[i, : max(ks)].tolist()}
                   for i, (e, c, t) in enumerate(zip(rows, completions, texts, strict=True))]
    if candidates is not None:
        extra, named = candidate_metrics([c[0] if c else "" for c in completions], candidates,
                                         [e.target for e in rows], catalogue.titles)
        metrics.update(extra)
        for p, cands, names in zip(predictions, candidates, named, strict=True):
            p.update(candidates=list(cands), named=names)
    return metrics, predictions


def answer_stats(texts: Sequence[str], top1: np.ndarray, valid: np.ndarray, catalogue: Catalogue) -> dict[str, float]:
    """What the warm start's popularity bias looks like: the share of rows whose top-1 item is a top-10
    training item, the share of answers that are exact catalogue titles, and how many distinct answers."""
    n = max(len(texts), 1)
    head = catalogue.most_popular()
    return {"top10_share@1": sum(int(i) in head for i in top1[valid]) / n,
            "exact_share": sum(t in catalogue for t in texts) / n,
            "distinct_answers": float(len({t for t in texts if t}))}
