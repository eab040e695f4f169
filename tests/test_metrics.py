"""Metrics against hand-computed values (arithmetic in the comments) and a per-row reference loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sprec_ray.data.catalogue import Catalogue
from sprec_ray.eval.metrics import ranking_metrics


def small_catalogue() -> Catalogue:
    # counted genres a, b. Item 3 has only an uncounted genre, item 5 none at all.
    genres = (("a",), ("b",), ("a", "b"), ("c",), ("a",), ())
    # popularity_groups(5) over 6 items: stable order by popularity = 1,3,4,2,5,0 and
    # group = rank*5//6 = 0,0,1,2,3,4  ->  item 1:g0, 3:g0, 4:g1, 2:g2, 5:g3, 0:g4
    popularity = np.array([10, 0, 5, 1, 3, 7])
    return Catalogue(tuple(f"t{i}" for i in range(6)), genres, ("a", "b"), popularity)


def test_hand_computed_values():
    cat = small_catalogue()
    ranked = np.array([[0, 1, 2], [2, 0, 4], [0, 3, 5], [1, 2, 3]])
    targets = [0, 4, 1, 1]  # row 0: rank 0; row 1: rank 2; row 2: miss; row 3: invalid -> miss
    histories = [[3, 4], [1], [2, 5], [0, 1]]
    valid = np.array([True, True, True, False])
    m = ranking_metrics(ranked, targets, histories, cat, ks=(1, 3), valid=valid)

    assert (m["n_rows"], m["n_grounded"], m["n_unparsed"]) == (4, 3, 1)
    # K=1: only row 0 hits, at rank 0 -> 1/log2(2) = 1; divided by all N=4 rows
    assert m["NDCG@1"] == pytest.approx(0.25)
    assert m["HR@1"] == pytest.approx(0.25)
    # K=3: row 0 -> 1, row 1 (rank 2) -> 1/log2(4) = 0.5; (1 + 0.5) / 4
    assert m["NDCG@3"] == pytest.approx(0.375)
    assert m["HR@3"] == pytest.approx(0.5)
    # top-1 of valid rows: 0, 2, 0 -> 2 distinct / (1*4 slots)
    assert m["DivCount@1"] == 2
    assert m["DivRatio@1"] == pytest.approx(0.5)
    # top-3 of valid rows cover all 6 items -> 6 / (3*4)
    assert m["DivRatio@3"] == pytest.approx(0.5)
    # counts@1: item0 2, item2 1 -> top-3 sum 3 / 4
    assert m["ORRatio@1"] == pytest.approx(0.75)
    # counts@3: 0:3, 2:2, then 1 -> (3+2+1) / 12
    assert m["ORRatio@3"] == pytest.approx(0.5)
    # GH: history items 3,4,1,2,5,0,1 -> a = 1 (4) + .5 (2) + 1 (0) = 2.5, b = 1 + .5 + 1 = 2.5 -> (.5, .5)
    # GP@1: items 0,2,0 -> a = 1 + .5 + 1 = 2.5, b = .5 -> (5/6, 1/6); diff (1/3, -1/3)
    assert m["MGU@1"] == pytest.approx(1 / 3)
    assert m["DGU@1"] == pytest.approx(2 / 3)
    # GP@3: a = 3 (item0 x3) + 1 (item2 x2 at .5) + 1 (item4) = 5, b = 1 (item1) + 1 (item2) = 2 -> (5/7, 2/7)
    # diff (3/14, -3/14): MGU = 3/14, DGU = 6/14
    assert m["MGU@3"] == pytest.approx(3 / 14)
    assert m["DGU@3"] == pytest.approx(3 / 7)
    # top-1 groups: item0 g4, item2 g2, item0 g4 -> g4 2/4, g2 1/4
    assert [m[f"PopShare{g}@1"] for g in range(5)] == pytest.approx([0, 0, 0.25, 0, 0.5])
    # top-3 slots: g0 items 1,3 (2), g1 item4 (1), g2 item2 x2, g3 item5 (1), g4 item0 x3; over 12 slots
    assert [m[f"PopShare{g}@3"] for g in range(5)] == pytest.approx([2 / 12, 1 / 12, 2 / 12, 1 / 12, 3 / 12])
    # shares of one K sum to n_grounded / n_rows (the invalid row's slots are empty)
    assert sum(m[f"PopShare{g}@3"] for g in range(5)) == pytest.approx(3 / 4)
    # history groups 3:g0 4:g1 1:g0 2:g2 5:g3 0:g4 1:g0 -> (3,1,1,1,1)/7
    assert [m[f"HistPopShare{g}"] for g in range(5)] == pytest.approx([3 / 7, 1 / 7, 1 / 7, 1 / 7, 1 / 7])


def test_target_at_rank_0_and_rank_3():
    cat = Catalogue(tuple(f"t{i}" for i in range(10)), tuple(("a",) for _ in range(10)), ("a",),
                    np.arange(10))
    ranked = np.array([[4, 1, 2, 3, 0], [7, 8, 9, 5, 6]])
    m = ranking_metrics(ranked, [4, 5], [[0], [1]], cat, ks=(1, 3, 5))
    assert m["HR@1"] == pytest.approx(0.5) and m["NDCG@1"] == pytest.approx(0.5)  # row 0 only
    assert m["HR@3"] == pytest.approx(0.5) and m["NDCG@3"] == pytest.approx(0.5)  # rank 3 is not < 3
    # row 1 at rank 3: 1/log2(3+2) = 0.4307; (1 + 0.4307) / 2
    assert m["HR@5"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)


def test_no_counted_genre_in_recommendations_gives_nan_fairness():
    cat = small_catalogue()
    # items 3 and 5 carry no counted genre: GP has no mass, so MGU/DGU are undefined
    m = ranking_metrics(np.array([[3, 5], [5, 3]]), [3, 0], [[0], [1]], cat, ks=(2,))
    assert math.isnan(m["MGU@2"]) and math.isnan(m["DGU@2"])
    assert m["HR@2"] == pytest.approx(0.5)
    assert m["DivRatio@2"] == pytest.approx(2 / 4)


def test_all_rows_invalid():
    cat = small_catalogue()
    m = ranking_metrics(np.zeros((2, 2), dtype=np.int64) - 1, [0, 1], [[0], [1]], cat, ks=(1, 2),
                        valid=np.array([False, False]))
    assert m["n_grounded"] == 0 and m["HR@2"] == 0 and m["DivRatio@2"] == 0 and m["ORRatio@2"] == 0
    assert math.isnan(m["MGU@2"])


def test_errors_are_clear():
    cat = small_catalogue()
    ranked = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="K=5 is outside 1..2"):
        ranking_metrics(ranked, [0, 1], [[0], [1]], cat, ks=(1, 5))
    with pytest.raises(ValueError, match="no rows"):
        ranking_metrics(np.zeros((0, 5), dtype=np.int64), [], [], cat)
    with pytest.raises(ValueError, match="2-D"):
        ranking_metrics(np.array([0, 1]), [0, 1], [[0], [1]], cat)
    with pytest.raises(ValueError, match="targets has shape"):
        ranking_metrics(ranked, [0], [[0], [1]], cat, ks=(1,))
    with pytest.raises(ValueError, match="histories has 1 rows"):
        ranking_metrics(ranked, [0, 1], [[0]], cat, ks=(1,))
    with pytest.raises(ValueError, match="item id 9 at index"):
        ranking_metrics(np.array([[0, 1], [2, 9]]), [0, 1], [[0], [1]], cat, ks=(1,))
    with pytest.raises(ValueError, match="ranked row 1 lists the same item twice"):
        ranking_metrics(np.array([[0, 1], [2, 2]]), [0, 1], [[0], [1]], cat, ks=(1,))
    with pytest.raises(ValueError, match="histories"):
        ranking_metrics(ranked, [0, 1], [[0], [-1]], cat, ks=(1,))
    with pytest.raises(ValueError, match="valid must be a bool"):
        ranking_metrics(ranked, [0, 1], [[0], [1]], cat, ks=(1,), valid=np.array([1, 0]))
    # an invalid row may hold anything (e.g. -1 padding): it is never read
    ranking_metrics(np.array([[0, 1], [-1, -1]]), [0, 1], [[0], [1]], cat, ks=(1,),
                    valid=np.array([True, False]))


def _reference(ranked, targets, histories, cat, k, valid):
    """Straightforward per-row loops of the module-docstring formulas."""
    n = len(targets)
    ndcg = hr = 0.0
    counts: dict[int, int] = {}
    gp = dict.fromkeys(cat.counted_genres, 0.0)
    gh = dict.fromkeys(cat.counted_genres, 0.0)
    for u in range(n):
        for h in histories[u]:
            g = cat.counted_genres_of(h)
            for x in g:
                gh[x] += 1 / len(g)
        if not valid[u]:
            continue
        row = list(ranked[u][:k])
        if targets[u] in row:
            r = row.index(targets[u])
            ndcg += 1 / math.log2(r + 2)
            hr += 1
        for i in row:
            counts[i] = counts.get(i, 0) + 1
            g = cat.counted_genres_of(i)
            for x in g:
                gp[x] += 1 / len(g)
    sp, sh = sum(gp.values()), sum(gh.values())
    diff = [gp[g] / sp - gh[g] / sh for g in cat.counted_genres]
    return {
        "NDCG": ndcg / n, "HR": hr / n, "DivRatio": len(counts) / (k * n),
        "ORRatio": sum(sorted(counts.values())[-3:]) / (k * n),
        "MGU": sum(abs(d) for d in diff) / len(diff), "DGU": max(diff) - min(diff),
    }


def test_matches_per_row_reference_on_random_data():
    rng = np.random.default_rng(0)
    n_items, n_rows = 50, 200
    names = ("a", "b", "c", "d", "x")
    genres = tuple(tuple(rng.choice(names, size=rng.integers(0, 4), replace=False)) for _ in range(n_items))
    cat = Catalogue(tuple(f"t{i}" for i in range(n_items)), genres, ("a", "b", "c", "d"),
                    rng.integers(0, 100, n_items))
    ranked = np.stack([rng.permutation(n_items)[:10] for _ in range(n_rows)])
    targets = [int(rng.integers(n_items)) for _ in range(n_rows)]
    # make about a third of the rows hit somewhere in the top 10
    for u in range(0, n_rows, 3):
        targets[u] = int(ranked[u, u % 10])
    histories = [list(rng.integers(0, n_items, rng.integers(1, 8))) for _ in range(n_rows)]
    valid = rng.random(n_rows) > 0.1
    m = ranking_metrics(ranked, targets, histories, cat, ks=(1, 5, 10), valid=valid)
    for k in (1, 5, 10):
        ref = _reference(ranked, targets, histories, cat, k, valid)
        for name, value in ref.items():
            assert m[f"{name}@{k}"] == pytest.approx(value, abs=1e-12), (name, k)


def test_evaluation_reads_the_first_title_and_counts_an_unclosed_quote_as_unparsed(tiny_data):
    from sprec_ray.data.records import Example
    from sprec_ray.eval.embedders import HashEmbedder
    from sprec_ray.eval.evaluate import evaluate_completions
    from sprec_ray.eval.grounding import Grounder

    catalogue = tiny_data.catalogue
    head = min(catalogue.most_popular())
    tail = next(i for i in range(len(catalogue)) if i not in catalogue.most_popular())
    rows = [Example(0, (tail,), head), Example(1, (head,), tail)]
    completions = [[f'"{catalogue.titles[head]}", "{catalogue.titles[tail]}"'], [f'"{catalogue.titles[tail]}']]
    metrics, predictions = evaluate_completions(completions, rows, catalogue, Grounder(catalogue.titles, HashEmbedder()), (1,))
    assert [p["parsed"] for p in predictions] == [catalogue.titles[head], ""]
    assert (metrics["HR@1"], metrics["n_unparsed"]) == (0.5, 1)  # the unclosed answer is a miss, though it names the target
    assert (metrics["exact_share"], metrics["distinct_answers"], metrics["top10_share@1"]) == (0.5, 1.0, 0.5)
    assert metrics["n_several_titles"] == 1
