"""Ranking, diversity, genre-fairness and popularity metrics of grounded recommendation lists.

Definitions follow SPRec's `eval/evaluate.py` (docs/method.md#metrics) with ONE denominator convention
instead of SPRec's mix of |T| (NDCG, HR, GH) and |T'| (DivRatio, ORRatio, GP):

* Every metric is over **all N rows** passed in. A row whose prediction could not be parsed or
  grounded (``valid[u] == False``) counts as a miss for NDCG/HR and contributes **no recommended
  items**: its K slots are empty, so DivRatio, ORRatio and the PopShares are divided by K*N and the
  PopShares of one K sum to n_grounded / n_rows, not 1.
* ``n_rows`` (N), ``n_grounded`` (valid rows) and ``n_unparsed`` (N - n_grounded) are emitted so a
  reader can convert to SPRec's per-grounded-row figures (multiply by n_rows / n_grounded).

With R_u = the first K ids of row u (valid rows only), r_u = 0-based position of the target in
row u (or "no hit"), G = catalogue.counted_genres and G_i = the counted genres of item i:

    NDCG@K     = (1/N) sum_u 1[r_u < K] / log2(r_u + 2)          (one relevant item: IDCG = 1)
    HR@K       = (1/N) sum_u 1[r_u < K]
    DivRatio@K = |union_u R_u| / (K N)                  DivCount@K = |union_u R_u|
    ORRatio@K  = (sum of the 3 largest c_i) / (K N),     c_i = #{u : i in R_u}
    GP_g       = sum_u sum_{i in R_u, g in G_i} 1/|G_i|,  normalised to sum 1 (genre mass of the recs)
    GH_g       = the same over every history item of every row (valid or not), normalised
    MGU@K      = (1/|G|) sum_g |GP_g - GH_g|
    DGU@K      = max_g (GP_g - GH_g) - min_g (GP_g - GH_g)
    PopShare{g}@K = #{top-K slots holding an item of popularity group g} / (K N)
    HistPopShare{g} = share of history items in popularity group g (reference for PopShare)

Items with no counted genre add no genre mass (as in SPRec). When the recommendations (or the
histories) carry no counted-genre mass at all, GP (or GH) is undefined and MGU/DGU are NaN.
Popularity groups are `catalogue.popularity_groups(5)` (0 = least popular).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from sprec_ray.data.catalogue import Catalogue

NUM_POP_GROUPS = 5
OVERREC_TOP = 3  # ORRatio: share of slots taken by the 3 most-recommended items (SPRec)


def _checked(ranked: np.ndarray, targets: Sequence[int], histories: Sequence[Sequence[int]], n_items: int,
             ks: Sequence[int], valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """ranking_metrics' inputs as arrays, each shape and id checked: a clear error names the bad argument."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D [rows, k] array of item ids, got shape {ranked.shape}")
    n_rows, k_max = ranked.shape
    if n_rows == 0:
        raise ValueError("ranking_metrics got no rows: nothing to evaluate")
    if not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must hold integer item ids, got dtype {ranked.dtype}")
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks is empty: give at least one cut-off K")
    for k in ks:
        if k < 1 or k > k_max:
            raise ValueError(f"K={k} is outside 1..{k_max}: the ranked lists have only {k_max} items")
    targets_arr = np.asarray(targets, dtype=np.int64)
    if targets_arr.shape != (n_rows,):
        raise ValueError(f"targets has shape {targets_arr.shape}, expected ({n_rows},) to match ranked")
    _check_ids(targets_arr, n_items, "targets")
    if len(histories) != n_rows:
        raise ValueError(f"histories has {len(histories)} rows, expected {n_rows} to match ranked")
    if valid is None:
        valid = np.ones(n_rows, dtype=bool)
    valid = np.asarray(valid)
    if valid.shape != (n_rows,) or valid.dtype != np.bool_:
        raise ValueError(f"valid must be a bool array of shape ({n_rows},), got {valid.dtype} {valid.shape}")
    return ranked, targets_arr, valid, ks


def ranking_metrics(
    ranked: np.ndarray,
    targets: Sequence[int],
    histories: Sequence[Sequence[int]],
    catalogue: Catalogue,
    ks: Sequence[int] = (1, 5, 10),
    valid: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics for every K in `ks`; see the module docstring for the exact definitions.

    ranked: [N, Kmax] int catalogue ids, best first (only the valid rows are read).
    valid: [N] bool, False for rows whose prediction could not be parsed (counted as misses).
    """
    n_items = len(catalogue)
    ranked, targets_arr, valid, ks = _checked(ranked, targets, histories, n_items, ks, valid)
    n_rows, k_max = ranked.shape

    rec = ranked[valid].astype(np.int64, copy=False)  # [n_grounded, Kmax]
    _check_ids(rec, n_items, "ranked (valid rows)")
    _check_no_duplicates(rec, np.flatnonzero(valid))
    n_grounded = int(valid.sum())

    # position of the target in each valid row; k_max means "not in the list"
    hits = rec == targets_arr[valid, None]
    rank = np.where(hits.any(axis=1), hits.argmax(axis=1), k_max)

    hist_ids = _flatten(histories, n_items)
    weights, has_genre = _genre_weights(catalogue)
    gh = _normalised(weights[hist_ids].sum(axis=0))
    groups = catalogue.popularity_groups(NUM_POP_GROUPS)

    out: dict[str, float] = {"n_rows": n_rows, "n_grounded": n_grounded, "n_unparsed": n_rows - n_grounded}
    for k in ks:
        in_top = rank < k
        out[f"NDCG@{k}"] = float((1.0 / np.log2(rank[in_top] + 2.0)).sum() / n_rows)
        out[f"HR@{k}"] = float(in_top.sum() / n_rows)
        counts = _concentration(rec[:, :k], n_rows, n_items, groups, k, out)
        gp = _normalised(counts @ weights)
        diff = gp - gh
        out[f"MGU@{k}"] = float(np.abs(diff).mean()) if diff.size else float("nan")
        out[f"DGU@{k}"] = float(diff.max() - diff.min()) if diff.size else float("nan")
    hist_pop = np.bincount(groups[hist_ids], minlength=NUM_POP_GROUPS)
    for g in range(NUM_POP_GROUPS):
        out[f"HistPopShare{g}"] = float(hist_pop[g] / max(len(hist_ids), 1))
    out["genre_coverage"] = float(has_genre.mean()) if n_items else 0.0
    return out


def concentration_metrics(ranked: np.ndarray, catalogue: Catalogue, k: int,
                          valid: np.ndarray | None = None) -> dict[str, float]:
    """DivCount@k, DivRatio@k, ORRatio@k and PopShare{g}@k of recommendation lists alone (no targets):
    the same definitions and denominator (k * all rows) as `ranking_metrics`, for the live service.

    ranked: [N, >=k] int catalogue ids, best first (only the valid rows are read).
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or ranked.shape[0] == 0 or ranked.shape[1] < k or k < 1:
        raise ValueError(f"ranked must be a non-empty [rows, >= k] array for k={k}, got shape {ranked.shape}")
    valid = np.ones(len(ranked), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rec = ranked[valid, :k].astype(np.int64, copy=False)
    _check_ids(rec, len(catalogue), "ranked (valid rows)")
    _check_no_duplicates(rec, np.flatnonzero(valid))
    out: dict[str, float] = {}
    _concentration(rec, len(ranked), len(catalogue), catalogue.popularity_groups(NUM_POP_GROUPS), k, out)
    return out


def _concentration(top_k: np.ndarray, n_rows: int, n_items: int, groups: np.ndarray, k: int,
                   out: dict[str, float]) -> np.ndarray:
    """Writes the @k concentration metrics of the valid rows' top-k ids into `out`; returns c_i."""
    slots = k * n_rows
    top = top_k.ravel()
    counts = np.bincount(top, minlength=n_items)
    distinct = int(np.count_nonzero(counts))
    out[f"DivCount@{k}"] = distinct
    out[f"DivRatio@{k}"] = distinct / slots
    top3 = np.partition(counts, -OVERREC_TOP)[-OVERREC_TOP:] if n_items >= OVERREC_TOP else counts
    out[f"ORRatio@{k}"] = float(top3.sum() / slots)
    pop = np.bincount(groups[top], minlength=NUM_POP_GROUPS)
    for g in range(NUM_POP_GROUPS):
        out[f"PopShare{g}@{k}"] = float(pop[g] / slots)
    return counts


def _check_ids(ids: np.ndarray, n_items: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= n_items):
        bad = np.argwhere((ids < 0) | (ids >= n_items))[0]
        raise ValueError(
            f"{what}: item id {int(ids[tuple(bad)])} at index {tuple(int(b) for b in bad)} "
            f"is outside the catalogue (0..{n_items - 1})"
        )


def _check_no_duplicates(rec: np.ndarray, row_ids: np.ndarray) -> None:
    # a list that repeats an item would count it twice in c_i and the genre/popularity mass
    if rec.shape[1] < 2 or rec.shape[0] == 0:
        return
    srt = np.sort(rec, axis=1)
    dup_rows = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
    if dup_rows.size:
        raise ValueError(f"ranked row {int(row_ids[dup_rows[0]])} lists the same item twice "
                         f"({dup_rows.size} such rows)")


def _flatten(histories: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    parts = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    _check_ids(flat, n_items, "histories (flattened)")
    return flat


def _normalised(mass: np.ndarray) -> np.ndarray:
    total = mass.sum()
    return mass / total if total > 0 else np.full_like(mass, np.nan, dtype=np.float64)


def _genre_weights(catalogue: Catalogue) -> tuple[np.ndarray, np.ndarray]:
    """[n_items, |G|] float64 with 1/|G_i| on each counted genre of item i, and a has-genre mask."""
    return _genre_weights_cached(catalogue)


@lru_cache(maxsize=4)
def _genre_weights_cached(catalogue: Catalogue) -> tuple[np.ndarray, np.ndarray]:
    # built once per catalogue (the genre lists are Python tuples, so this one pass is unavoidable)
    column = {g: j for j, g in enumerate(catalogue.counted_genres)}
    rows: list[int] = []
    cols: list[int] = []
    for item_id, genres in enumerate(catalogue.genres):
        for j in {column[g] for g in genres if g in column}:
            rows.append(item_id)
            cols.append(j)
    n_items = len(catalogue)
    weights = np.zeros((n_items, len(column)), dtype=np.float64)
    weights[rows, cols] = 1.0
    per_item = weights.sum(axis=1)
    has_genre = per_item > 0
    weights[has_genre] /= per_item[has_genre, None]
    weights.setflags(write=False)
    has_genre.setflags(write=False)
    return weights, has_genre
