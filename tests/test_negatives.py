"""Self-play negatives: parse -> ground -> K distinct ids per prompt, with the counts reported."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sprec_ray.data.catalogue import Catalogue
from sprec_ray.data.prompts import render_response
from sprec_ray.data.records import Example
from sprec_ray.eval.embedders import HashEmbedder
from sprec_ray.eval.grounding import Grounder
from sprec_ray.generate.negatives import NegativeStats, build_negatives


@pytest.fixture(scope="module")
def catalogue(tiny_data) -> Catalogue:
    return tiny_data.catalogue


@pytest.fixture(scope="module")
def grounder(catalogue) -> Grounder:
    return Grounder(catalogue.titles, HashEmbedder())


def quoted(catalogue: Catalogue, item: int) -> str:
    return render_response(catalogue.titles[item]) + "\n"


def check_invariants(examples, negatives, k):
    for e, negs in zip(examples, negatives, strict=True):
        assert len(negs) == k, f"row {e.row_id}: {negs}"
        assert len(set(negs)) == k
        assert e.target not in negs
        assert all(isinstance(x, int) for x in negs)


def test_exact_predictions_become_the_negatives(catalogue, grounder):
    ex = [Example(0, (1, 2, 3), 10), Example(1, (4, 5), 11)]
    completions = [[quoted(catalogue, 20)], [quoted(catalogue, 21)]]
    negs, stats = build_negatives(ex, completions, catalogue, grounder, k=1, seed=0)
    assert negs == [[20], [21]]
    assert (stats.exact, stats.grounded, stats.unparsed, stats.model, stats.topped_up) == (2, 0, 0, 2, 0)


def test_misspelt_prediction_is_grounded_by_embedding(catalogue, grounder):
    title = catalogue.titles[30]
    typo = title.replace("a", "e", 1)
    assert typo != title and catalogue.id_of(typo) is None
    negs, stats = build_negatives([Example(0, (1,), 2)], [[f'"{typo}"']], catalogue, grounder, k=1, seed=0)
    assert negs == [[30]]
    assert (stats.exact, stats.grounded) == (0, 1)


def test_prediction_equal_to_target_is_dropped_and_replaced_by_a_neighbour(catalogue, grounder):
    e = Example(0, (1, 2), 40)
    negs, stats = build_negatives([e], [[quoted(catalogue, 40)]], catalogue, grounder, k=2, seed=0)
    check_invariants([e], negs, 2)
    assert stats.equal_to_positive == 1 and stats.model == 0 and stats.neighbours == 2
    # the neighbours are the grounder's next-nearest titles to the target's, in order
    ids, _ = grounder.ground([catalogue.titles[40]], 10)
    expected = [int(i) for i in ids[0, 1:] if i not in (1, 2, 40)][:2]
    assert negs[0] == expected


def test_unparsed_rows_are_topped_up_by_popularity_outside_history(catalogue, grounder):
    pop = np.zeros(len(catalogue), dtype=np.int64)
    pop[70], pop[3] = 1000, 1000  # 3 is in the history: never drawn however popular
    skewed = Catalogue(catalogue.titles, catalogue.genres, catalogue.counted_genres, pop)
    hist = tuple(range(10))
    ex = [Example(i, hist, 50) for i in range(300)]
    negs, stats = build_negatives(ex, [[""] for _ in ex], skewed, grounder, k=3, seed=5)
    check_invariants(ex, negs, 3)
    assert stats.unparsed == 300 and stats.topped_up == 900 and stats.neighbours == 0
    assert not any(set(n) & set(hist) for n in negs)
    counts = np.bincount([x for n in negs for x in n], minlength=len(catalogue))
    # weight = popularity + 1: item 70 (weight 1001 vs 1) is in almost every row, the rest share ~600 draws
    assert counts[70] >= 290
    others = np.delete(counts, [70, 50, *hist])
    assert others.max() < 40 and (others > 0).sum() > 50


def test_predicted_history_item_is_kept_and_counted(catalogue, grounder):
    e = Example(0, (7, 8, 9), 60)
    negs, stats = build_negatives([e], [[quoted(catalogue, 8)]], catalogue, grounder, k=1, seed=0)
    assert negs == [[8]]
    assert stats.in_history == 1


def test_n_samples_give_distinct_negatives_and_duplicates_are_counted(catalogue, grounder):
    e = Example(0, (1,), 2)
    texts = [quoted(catalogue, 33), quoted(catalogue, 33), quoted(catalogue, 2), quoted(catalogue, 34), "\"\""]
    negs, stats = build_negatives([e], [texts], catalogue, grounder, k=3, seed=0)
    check_invariants([e], negs, 3)
    assert negs[0][:2] == [33, 34]
    assert (stats.duplicates, stats.equal_to_positive, stats.model, stats.neighbours) == (1, 1, 2, 1)
    assert stats.completions == 5 and (stats.exact, stats.grounded, stats.unparsed) == (4, 0, 1)


def test_deterministic_and_independent_of_row_order(catalogue, grounder, tiny_data):
    rows = list(tiny_data.train[:40])
    completions = [[""] if i % 3 == 0 else [quoted(catalogue, (i * 7) % len(catalogue))] for i in range(40)]
    negs, stats = build_negatives(rows, completions, catalogue, grounder, k=3, seed=11)
    again, _ = build_negatives(rows, completions, catalogue, grounder, k=3, seed=11)
    assert negs == again
    check_invariants(rows, negs, 3)
    order = list(reversed(range(40)))
    flipped, _ = build_negatives([rows[i] for i in order], [completions[i] for i in order], catalogue, grounder,
                                 k=3, seed=11)
    assert [flipped[order.index(i)] for i in range(40)] == negs
    other, _ = build_negatives(rows, completions, catalogue, grounder, k=3, seed=12)
    assert other != negs  # the top-ups follow the seed
    assert isinstance(stats, NegativeStats)
    assert all(isinstance(v, int) for v in dataclasses.asdict(stats).values())


def test_bad_input_names_the_row(catalogue, grounder):
    with pytest.raises(ValueError, match="2 examples but 1 completion lists"):
        build_negatives([Example(0, (1,), 2), Example(1, (1,), 2)], [["x"]], catalogue, grounder, 1, 0)
    with pytest.raises(ValueError, match="row 9: target id 999"):
        build_negatives([Example(9, (1,), 999)], [["x"]], catalogue, grounder, 1, 0)
    with pytest.raises(ValueError, match="row 4: history ids \\[-1\\]"):
        build_negatives([Example(4, (-1,), 2)], [["x"]], catalogue, grounder, 1, 0)
    with pytest.raises(ValueError, match="k=84 negatives"):
        build_negatives([Example(0, (1,), 2)], [["x"]], catalogue, grounder, len(catalogue), 0)
    with pytest.raises(ValueError, match="row 3: completions must be a list of str"):
        build_negatives([Example(3, (1,), 2)], ["just a string"], catalogue, grounder, 1, 0)
