"""Self-play negatives: parse -> classify by grounding -> K rejected texts per prompt, with the counts reported."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from sprec_ray.data.catalogue import Catalogue
from sprec_ray.data.prompts import render_prompt, render_response
from sprec_ray.data.records import Example
from sprec_ray.data.sharding import PromptBuilder, write_examples_parquet
from sprec_ray.eval.embedders import HashEmbedder
from sprec_ray.eval.grounding import Grounder
from sprec_ray.generate.negatives import NegativeStats, RowNegatives, build_negatives


@pytest.fixture(scope="module")
def catalogue(tiny_data) -> Catalogue:
    return tiny_data.catalogue


@pytest.fixture(scope="module")
def grounder(catalogue) -> Grounder:
    return Grounder(catalogue.titles, HashEmbedder())


def quoted(catalogue: Catalogue, item: int) -> str:
    return render_response(catalogue.titles[item]) + "\n"


def typo_of(catalogue: Catalogue, grounder: Grounder, item: int) -> str:
    """A misspelling of the title of `item` that is no catalogue title but grounds back to `item`."""
    title = catalogue.titles[item]
    typo = title.replace("a", "e", 1) if "a" in title else title + "s"
    assert typo != title and catalogue.id_of(typo) is None
    assert int(grounder.ground([typo], 1)[0][0, 0]) == item
    return typo


def check_kept(examples, negatives, k):
    for e, negs in zip(examples, negatives, strict=True):
        assert len(negs.texts) == len(negs.ids) == k, f"row {e.row_id}: {negs}"
        assert len(set(negs.texts)) == k and all(negs.texts)
        assert e.target not in negs.ids
        assert all(isinstance(x, int) for x in negs.ids)


def test_exact_predictions_become_the_negatives(catalogue, grounder):
    ex = [Example(0, (1, 2, 3), 10), Example(1, (4, 5), 11)]
    completions = [[quoted(catalogue, 20)], [quoted(catalogue, 21)]]
    for source in ("generated", "grounded"):
        negs, stats = build_negatives(ex, completions, catalogue, grounder, k=1, seed=0, source=source)
        assert [n.ids for n in negs] == [(20,), (21,)]
        assert [n.texts for n in negs] == [(catalogue.titles[20],), (catalogue.titles[21],)]
        assert (stats.exact, stats.new_text, stats.unparsed, stats.topped_up, stats.rows_kept) == (2, 0, 0, 0, 2)


def test_generated_text_is_kept_verbatim_grounded_text_becomes_the_nearest_item(catalogue, grounder):
    typo = typo_of(catalogue, grounder, 30)
    row = [Example(0, (1,), 2)]
    negs, stats = build_negatives(row, [[f'  "{typo}" and more\n']], catalogue, grounder, k=1, seed=0)
    assert negs == [RowNegatives((typo,), (-1,))]
    assert (stats.exact, stats.new_text, stats.negatives) == (0, 1, 1)
    negs, stats = build_negatives(row, [[f'"{typo}"']], catalogue, grounder, k=1, seed=0, source="grounded")
    assert negs == [RowNegatives((catalogue.titles[30],), (30,))]
    assert (stats.exact, stats.new_text) == (0, 1)


def test_generated_negatives_reach_the_dpo_dataset_verbatim(catalogue, grounder, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sprec_ray.train.batching import Encoder, encode_pair_batch

    typo = typo_of(catalogue, grounder, 30)
    ex = [Example(7, (1, 2), 40), Example(8, (3,), 41), Example(9, (4,), 42)]
    completions = [[f'"{typo}"'], [quoted(catalogue, 41)], [quoted(catalogue, 50)]]  # row 8 equals its target
    negs, stats = build_negatives(ex, completions, catalogue, grounder, k=1, seed=0)
    assert negs[1].dropped and stats.rows_dropped == 1
    kept = [(e, n) for e, n in zip(ex, negs, strict=True) if not n.dropped]
    write_examples_parquet([e for e, _ in kept], tmp_path, 1, [n.ids for _, n in kept], [n.texts for _, n in kept])
    table = pq.read_table(tmp_path / "part-00000.parquet")
    assert table.column("rejected_text").to_pylist() == [[typo], [catalogue.titles[50]]]
    assert table.column("negatives").to_pylist() == [[-1], [50]]
    built = PromptBuilder(catalogue.titles, "books")(table).to_pydict()
    assert built["rejected"] == [[f'"{typo}"'], [render_response(catalogue.titles[50])]]
    assert built["response"] == [render_response(catalogue.titles[40]), render_response(catalogue.titles[42])]
    assert built["prompt"][0] == render_prompt([catalogue.titles[1], catalogue.titles[2]])
    # ... and tokenise exactly like a positive with that text would: text tokens then EOS
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = encode_pair_batch(built, Encoder(tok, 384, 48), 1)
    assert rows[0].rejected[0] == (*tok(f'"{typo}"', add_special_tokens=False)["input_ids"], tok.eos_token_id)
    assert [r.row_id for r in rows] == [7, 9]


@pytest.mark.parametrize("source", ["generated", "grounded"])
def test_prediction_equal_to_the_positive_is_dropped_by_default(catalogue, grounder, source):
    ex = [Example(0, (1, 2), 40), Example(1, (1, 2), 41)]
    near_miss = typo_of(catalogue, grounder, 41)  # not the title, but grounds to the target: also equal
    negs, stats = build_negatives(ex, [[quoted(catalogue, 40)], [f'"{near_miss}"']], catalogue, grounder, k=1,
                                  seed=0, source=source)
    assert all(n.dropped for n in negs)
    assert (stats.equal_to_positive, stats.rows_dropped, stats.rows_kept, stats.negatives) == (2, 2, 0, 0)
    # S-DPO: the equal completion is skipped, the row keeps its other sample and a random fill
    negs, stats = build_negatives(ex[:1], [[quoted(catalogue, 40), quoted(catalogue, 60)]], catalogue, grounder,
                                  k=2, seed=0, source=source)
    check_kept(ex[:1], negs, 2)
    assert negs[0].ids[0] == 60
    assert (stats.equal_to_positive, stats.exact, stats.topped_up, stats.replaced_equal) == (1, 1, 1, 0)


@pytest.mark.parametrize("source", ["generated", "grounded"])
def test_prediction_equal_to_the_positive_becomes_a_popular_random_item_if_configured(catalogue, grounder, source):
    pop = np.zeros(len(catalogue), dtype=np.int64)
    pop[70], pop[3] = 10_000, 10_000  # 3 is in the history: never drawn however popular
    skewed = Catalogue(catalogue.titles, catalogue.genres, catalogue.counted_genres, pop)
    ex = [Example(i, (3, 4), 40) for i in range(50)]
    negs, stats = build_negatives(ex, [[quoted(catalogue, 40)]] * 50, skewed, grounder, k=1, seed=0,
                                  source=source, on_equal="popular_random")
    check_kept(ex, negs, 1)
    assert (stats.equal_to_positive, stats.replaced_equal, stats.topped_up, stats.rows_kept) == (50, 50, 0, 50)
    picks = [n.ids[0] for n in negs]
    assert picks.count(70) >= 45 and 3 not in picks and 4 not in picks
    assert all(n.texts == (catalogue.titles[n.ids[0]],) for n in negs)
    # the top 10: items 3 and 70, then the ties at popularity 0 in id order
    assert stats.top_popular == sum(x in {3, 70, *range(8)} for x in picks) >= 45


def test_unparsed_rows_are_dropped_short_rows_topped_up_by_popularity_outside_history(catalogue, grounder):
    pop = np.zeros(len(catalogue), dtype=np.int64)
    pop[70], pop[3] = 1000, 1000
    skewed = Catalogue(catalogue.titles, catalogue.genres, catalogue.counted_genres, pop)
    hist = tuple(range(10))
    ex = [Example(i, hist, 50) for i in range(300)]
    completions = [[quoted(catalogue, 60)] if i % 2 else ["", '""'] for i in range(300)]
    negs, stats = build_negatives(ex, completions, skewed, grounder, k=3, seed=5)
    assert all(n.dropped for n in negs[::2])
    kept = negs[1::2]
    check_kept(ex[1::2], kept, 3)
    assert (stats.unparsed, stats.rows_dropped, stats.exact, stats.topped_up) == (300, 150, 150, 300)
    assert all(n.ids[0] == 60 for n in kept) and not any(set(n.ids) & set(hist) for n in kept)
    counts = np.bincount([x for n in kept for x in n.ids[1:]], minlength=len(catalogue))
    # weight = popularity + 1: item 70 (weight 1001 vs 1) is in almost every row, the rest share ~150 draws
    assert counts[70] >= 145
    others = np.delete(counts, [70, 60, 50, *hist])
    assert others.max() < 20 and (others > 0).sum() > 30


def test_predicted_history_item_is_kept_and_counted(catalogue, grounder):
    e = Example(0, (7, 8, 9), 60)
    negs, stats = build_negatives([e], [[quoted(catalogue, 8)]], catalogue, grounder, k=1, seed=0)
    assert negs[0].ids == (8,)
    assert stats.in_history == 1


def test_sdpo_takes_k_distinct_sampled_completions(catalogue, grounder):
    e = Example(0, (1,), 2)
    typo = typo_of(catalogue, grounder, 33)
    texts = [quoted(catalogue, 33), f'"{typo}"', quoted(catalogue, 33), quoted(catalogue, 2), f' "{typo}" ', "\"\"",
             quoted(catalogue, 34), quoted(catalogue, 35)]
    negs, stats = build_negatives([e], [texts], catalogue, grounder, k=3, seed=0)
    # distinct texts: the typo is a different text from title 33, though it grounds to the same item
    assert negs[0] == RowNegatives((catalogue.titles[33], typo, catalogue.titles[34]), (33, -1, 34))
    assert (stats.duplicates, stats.equal_to_positive, stats.unparsed, stats.surplus) == (2, 1, 1, 1)
    assert (stats.exact, stats.new_text, stats.topped_up, stats.completions) == (2, 1, 0, 8)
    # grounded: distinct items, so the typo repeats item 33 and one more sample is used instead
    negs, stats = build_negatives([e], [texts], catalogue, grounder, k=3, seed=0, source="grounded")
    assert negs[0].ids == (33, 34, 35)
    assert (stats.duplicates, stats.surplus) == (3, 0)


@pytest.mark.parametrize("source", ["generated", "grounded"])
@pytest.mark.parametrize("on_equal", ["drop", "popular_random"])
@pytest.mark.parametrize("k", [1, 3])
def test_statistics_add_up(catalogue, grounder, tiny_data, source, on_equal, k):
    rows = list(tiny_data.train[:60])
    rng = np.random.default_rng(k)
    completions = []
    for e in rows:
        pool = ["", quoted(catalogue, e.target), quoted(catalogue, e.history[0]), quoted(catalogue, 3),
                f'"{catalogue.titles[int(rng.integers(len(catalogue)))]} II"', quoted(catalogue, int(rng.integers(len(catalogue))))]
        completions.append([pool[i] for i in rng.integers(len(pool), size=4)])
    negs, s = build_negatives(rows, completions, catalogue, grounder, k=k, seed=1, source=source, on_equal=on_equal)
    assert s.completions == sum(map(len, completions)) == 240
    assert s.unparsed + s.equal_to_positive + s.duplicates + s.surplus + s.exact + s.new_text == s.completions
    assert s.rows_kept + s.rows_dropped == s.rows == 60
    assert s.negatives == s.exact + s.new_text + s.replaced_equal + s.topped_up == k * s.rows_kept
    assert s.rows_dropped == sum(n.dropped for n in negs) and (on_equal == "drop" or s.replaced_equal > 0)
    check_kept([e for e, n in zip(rows, negs, strict=True) if not n.dropped], [n for n in negs if not n.dropped], k)
    # the top-10 count, recomputed: the item a negative stands for (nearest item for new text)
    top = set(np.argsort(-catalogue.popularity, kind="stable")[:10].tolist())
    items = [i if i >= 0 else int(grounder.ground([t], 1)[0][0, 0]) for n in negs for t, i in zip(n.texts, n.ids, strict=True)]
    assert len(items) == s.negatives and s.top_popular == sum(i in top for i in items) > 0
    assert s.metrics()["top_popular_share"] == pytest.approx(s.top_popular / s.negatives)
    assert (source == "grounded") == all(i >= 0 for n in negs for i in n.ids)
    assert sum(i < 0 for n in negs for i in n.ids) == (s.new_text if source == "generated" else 0)


def test_deterministic_and_independent_of_row_order(catalogue, grounder, tiny_data):
    rows = list(tiny_data.train[:40])
    completions = [[quoted(catalogue, (i * 7) % len(catalogue))] for i in range(40)]
    negs, stats = build_negatives(rows, completions, catalogue, grounder, k=3, seed=11)
    again, _ = build_negatives(rows, completions, catalogue, grounder, k=3, seed=11)
    assert negs == again
    order = list(reversed(range(40)))
    flipped, _ = build_negatives([rows[i] for i in order], [completions[i] for i in order], catalogue, grounder,
                                 k=3, seed=11)
    assert [flipped[order.index(i)] for i in range(40)] == negs
    other, _ = build_negatives(rows, completions, catalogue, grounder, k=3, seed=12)
    assert other != negs  # the top-ups follow the seed
    assert isinstance(stats, NegativeStats)
    assert all(isinstance(v, int) for v in dataclasses.asdict(stats).values())


def test_bad_input_names_the_row(catalogue, grounder, tmp_path):
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
    with pytest.raises(ValueError, match="negative source 'model'"):
        build_negatives([Example(3, (1,), 2)], [["x"]], catalogue, grounder, 1, 0, source="model")  # type: ignore[arg-type]
    ex = [Example(5, (1,), 2)]
    with pytest.raises(ValueError, match=r"row 5: negative ids \[-1\] need rejected texts"):
        write_examples_parquet(ex, tmp_path, 1, [[-1]])
    with pytest.raises(ValueError, match="row 5: 2 rejected texts for 1 negative ids"):
        write_examples_parquet(ex, tmp_path, 1, [[-1]], [["a", "b"]])
    with pytest.raises(ValueError, match="row 5: rejected texts must be non-empty strings"):
        write_examples_parquet(ex, tmp_path, 1, [[-1]], [[""]])


def test_several_titles_give_the_first_and_an_unclosed_quote_gives_no_negative(catalogue, grounder):
    ex = [Example(0, (1,), 2), Example(1, (1,), 2)]
    first, second = catalogue.titles[40], catalogue.titles[41]
    completions = [[f'"{first}", "{second}"\n'], [f'"{first} and then it ran out of tok']]
    negs, stats = build_negatives(ex, completions, catalogue, grounder, k=1, seed=0)
    assert negs[0] == RowNegatives((first,), (40,))
    assert negs[1].dropped
    assert (stats.exact, stats.unparsed, stats.rows_dropped, stats.several_titles) == (1, 1, 1, 1)
