"""The filter bubble watched where it forms: over the last serve.stats_window `/recommend` answers of
each adapter, DivRatio@k and ORRatio@k, the share of top-1 items among the 10 most popular training
items, and the share of answers that are not catalogue titles.

The figures are the offline ones, computed by the offline code: `concentration_metrics` (the part
of eval/metrics.py's `ranking_metrics` that needs no target) and `answer_stats` (eval/evaluate.py),
so a window of served answers scores as `sprec-ray eval` scores the same answers. A served answer
maps to an evaluated row as follows: `source: "model"` is a grounded row, a popularity fallback is
an unparsed one (its slots count, empty); a row counts at @k when its request asked for k or more.

`LiveStats` has no Ray in it; `StatsGauges` publishes a snapshot as Ray Serve metrics, which Ray's
metrics agent exports to Prometheus (`ray_sprec_live_divratio{adapter,round,k}`, ...).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.catalogue import Catalogue
from ..eval.evaluate import answer_stats
from ..eval.metrics import concentration_metrics


@dataclass(frozen=True)
class Served:
    """What one /recommend answer adds to the window."""

    items: tuple[int, ...]  # item ids, best first
    grounded: bool  # source "model"; False for a popularity fallback (an unparsed row offline)
    answer: str  # the model's first parsed answer ("" when it named nothing)
    k: int  # what the request asked for


def served_of(body: dict[str, Any], k: int) -> Served:
    generated = body.get("generated") or [""]
    return Served(tuple(int(it["id"]) for it in body["items"]), body["source"] == "model", generated[0], k)


def adapter_key(adapter: dict[str, Any]) -> str:
    """How /stats and the metrics' `adapter` tag name an adapter: its sha256's first 12 hex digits."""
    return (adapter.get("sha256") or "base-model")[:12]


def window_metrics(served: Sequence[Served], catalogue: Catalogue, ks: Sequence[int]) -> dict[str, float]:
    """The offline metrics of a window of served answers."""
    out: dict[str, float] = {"responses": len(served)}
    if not served:
        return out
    for k in ks:
        rows = [s for s in served if s.k >= k]
        if not rows:
            continue
        valid = np.array([s.grounded and len(s.items) >= k for s in rows])
        ranked = np.array([s.items[:k] if ok else (0,) * k for s, ok in zip(rows, valid, strict=True)], dtype=np.int64)
        got = concentration_metrics(ranked, catalogue, k, valid)
        for name in ("DivCount", "DivRatio", "ORRatio"):
            out[f"{name}@{k}"] = got[f"{name}@{k}"]
        out[f"rows@{k}"] = len(rows)
    valid = np.array([s.grounded and bool(s.items) for s in served])
    top1 = np.array([s.items[0] if ok else 0 for s, ok in zip(served, valid, strict=True)], dtype=np.int64)
    answers = answer_stats([s.answer for s in served], top1, valid, catalogue)
    out["top10_share@1"] = answers["top10_share@1"]
    out["not_in_catalogue_share"] = 1.0 - answers["exact_share"]
    out["distinct_answers"] = answers["distinct_answers"]
    out["popularity_fallback_share"] = float((~np.array([s.grounded for s in served])).mean())
    return out


class LiveStats:
    """One sliding window of served answers per adapter."""

    def __init__(self, catalogue: Catalogue, ks: Sequence[int], window: int) -> None:
        self.catalogue = catalogue
        self.ks = tuple(int(k) for k in ks)
        self.window = window
        self.windows: dict[str, deque[Served]] = {}
        self.adapters: dict[str, dict[str, Any]] = {}
        self.totals: Counter[str] = Counter()

    def add(self, body: dict[str, Any], k: int) -> None:
        key = adapter_key(body["adapter"])
        self.adapters.setdefault(key, dict(body["adapter"]))
        self.windows.setdefault(key, deque(maxlen=self.window)).append(served_of(body, k))
        self.totals[key] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"window": self.window, "ks": list(self.ks), "endpoint": "/recommend", "adapters": {
            key: {**self.adapters[key], "responses_total": self.totals[key],
                  "metrics": window_metrics(list(served), self.catalogue, self.ks)}
            for key, served in self.windows.items()}}


# Prometheus names: Ray prefixes "ray_"; the metric key's "@k" becomes the tag k.
GAUGES = {"DivRatio": "sprec_live_divratio", "ORRatio": "sprec_live_orratio",
          "top10_share": "sprec_live_top10_share", "not_in_catalogue_share": "sprec_live_not_in_catalogue_share",
          "responses": "sprec_live_window_responses"}


class StatsGauges:
    """A /stats snapshot as Ray Serve gauges, tagged by adapter, round and k."""

    def __init__(self) -> None:
        from ray.serve.metrics import Gauge

        self.gauges = {name: Gauge(metric, description=f"{name} over the last serve.stats_window /recommend answers",
                                   tag_keys=("adapter", "round", "k")) for name, metric in GAUGES.items()}

    def publish(self, snapshot: dict[str, Any]) -> None:
        for key, entry in snapshot["adapters"].items():
            tags = {"adapter": key, "round": str(entry.get("round"))}
            for name, value in entry["metrics"].items():
                metric, _, k = name.partition("@")
                if metric in self.gauges:
                    self.gauges[metric].set(float(value), tags={**tags, "k": k or "all"})
