"""The candidate task without Ray: prompt, candidate lists, HR@1 / ValidRatio by hand, negatives, eval files."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from sprec_ray.data.candidates import candidates_of, sample_candidates
from sprec_ray.data.catalogue import catalogue_from_titles
from sprec_ray.data.prompts import render_candidate_prompt
from sprec_ray.data.readers import read_eval_file
from sprec_ray.data.records import DataError, Example
from sprec_ray.data.sharding import PromptBuilder
from sprec_ray.eval.candidates import candidate_metrics, rank_metrics, ranked, read_answer
from sprec_ray.eval.embedders import HashEmbedder
from sprec_ray.eval.evaluate import evaluate_completions
from sprec_ray.eval.grounding import Grounder
from sprec_ray.generate.candidate_negatives import candidate_negatives

TITLES = ("Dune", "Ghost", "The Ghost Ship", "Emma", "Ulysses", "Beloved", "Middlemarch", "Persuasion")


def test_candidate_prompt_is_the_alpaca_frame_with_history_then_candidates():
    prompt = render_candidate_prompt(["Dune", "Emma"], ["Ghost", "Ulysses", "Beloved"])
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nGiven a list of books the "
        "user recently enjoyed, choose the one item from the 3 candidate books that the user will enjoy next. "
        "Answer with its title.\n\n### Input:\nThe user has enjoyed the following books before: \"Dune\", \"Emma\"\n"
        "Candidates: \"Ghost\", \"Ulysses\", \"Beloved\"\n\n### Response:\n")
    # the counterfactual (CFT) drops the history and keeps the candidates
    counterfactual = render_candidate_prompt([], ["Ghost", "Ulysses", "Beloved"])
    assert "enjoyed the following" not in counterfactual and 'Candidates: "Ghost", "Ulysses", "Beloved"' in counterfactual


@pytest.mark.parametrize("num_items", [60, 100_000])  # the explicit-pool and the rejection-sampling paths
def test_sampled_candidates_hold_the_target_and_no_history_and_repeat_per_row(num_items):
    rows = [Example(r, tuple(range(r, r + 10)), r + 10) for r in range(30)]
    for e in rows:
        cands = sample_candidates(e, num_items, 20, seed=7)
        assert len(cands) == len(set(cands)) == 20 and e.target in cands
        assert not set(cands) & set(e.history) and all(0 <= c < num_items for c in cands)
        assert sample_candidates(e, num_items, 20, seed=7) == cands  # the same list in every stage and re-run
    positions = {sample_candidates(e, num_items, 20, 7).index(e.target) for e in rows}
    assert len(positions) > 5  # shuffled, not always in one place
    assert [sample_candidates(e, num_items, 20, 8) for e in rows] != [sample_candidates(e, num_items, 20, 7) for e in rows]


def test_given_candidates_are_used_and_too_small_a_catalogue_names_the_row():
    given = Example(4, (0, 1), 5, candidates=(6, 5, 7))
    assert candidates_of(given, 100, 20, 0) == (6, 5, 7)
    assert candidates_of(Example(4, (0, 1), 5), 100, 20, 0) == sample_candidates(Example(4, (0, 1), 5), 100, 20, 0)
    with pytest.raises(ValueError, match=r"row 9: 17 catalogue items .* data.num_candidates=20"):
        sample_candidates(Example(9, (0, 1), 2), 20, 20, 0)


def test_hr1_and_valid_ratio_by_hand():
    cands = [0, 1, 2, 3, 4]  # Dune, Ghost, The Ghost Ship, Emma, Ulysses
    answers = [
        '"Dune"',                      # target Dune: hit, valid
        '"Ghost", "Emma"',             # target Ghost: first title hits, but two candidates named -> not valid
        '"Emma"\n',                    # target Dune: a wrong candidate -> miss, valid
        '"The Ghost Ship"',            # target Ghost: exact match, so "Ghost" is not named -> miss, valid
        '"Solaris"',                   # names no candidate -> miss, not valid
        "",                            # empty -> miss, not valid
        "  ulysses  ",                 # unquoted, normalised (case, spaces) -> hit, valid
        'My pick: "Dune" or "Emma"',   # first title Dune hits; two named -> not valid
    ]
    targets = [0, 1, 0, 1, 3, 3, 4, 0]
    metrics, named = candidate_metrics(answers, [cands] * 8, targets, TITLES)
    # hits: rows 0, 1, 6, 7 -> 4/8; valid: rows 0, 2, 3, 6 -> 4/8; none: rows 4, 5; several: rows 1, 7
    assert metrics == {"cand_HR@1": 0.5, "cand_ValidRatio": 0.5, "cand_n_none": 2.0, "cand_n_multiple": 2.0}
    assert named == [[0], [1, 3], [3], [2], [], [], [4], [0, 3]]
    assert read_answer('"Ghost", "Dune"', ["Dune", "Ghost"]) == ([0, 1], 1)  # named in candidate order, first by position


def test_logprob_ranking_metrics_by_hand():
    assert ranked([-3.0, -1.0, -2.0, -1.0]) == [1, 3, 2, 0]  # ties keep list order
    scores = [[-1.0, -5.0, -3.0], [-4.0, -2.0, -0.5], [-1.0, -1.0, -9.0], [-2.0, -1.0]]
    candidates = [[7, 8, 9], [7, 8, 9], [3, 4, 5], [1, 2]]
    targets = [7, 8, 4, 6]  # ranks 0, 1, 1 (tie with the first), and a list without its target
    m = rank_metrics(scores, candidates, targets, (1, 2))
    assert m["rank_HR@1"] == pytest.approx(1 / 4) and m["rank_HR@2"] == pytest.approx(3 / 4)
    assert m["rank_NDCG@1"] == pytest.approx(1 / 4)
    assert m["rank_NDCG@2"] == pytest.approx((1 + 2 / math.log2(3)) / 4)
    with pytest.raises(ValueError, match="2 scores for 3 candidates"):
        rank_metrics([[0.0, 1.0]], [[1, 2, 3]], [1], (1,))


def test_candidate_metrics_sit_beside_the_grounded_ones():
    catalogue = catalogue_from_titles(TITLES, [("a",)] * len(TITLES))
    rows = [Example(0, (5,), 0), Example(1, (6,), 3)]
    metrics, predictions = evaluate_completions([['"Dune"'], ['"Dune", "Emma"']], rows, catalogue,
                                                Grounder(TITLES, HashEmbedder()), (1,), candidates=[[0, 1, 3], [0, 3, 4]])
    assert metrics["HR@1"] == 0.5 and metrics["cand_HR@1"] == 0.5 and metrics["cand_ValidRatio"] == 0.5
    assert predictions[1]["candidates"] == [0, 3, 4] and predictions[1]["named"] == [0, 3]
    plain, _ = evaluate_completions([['"Dune"']], rows[:1], catalogue, Grounder(TITLES, HashEmbedder()), (1,))
    assert not any(k.startswith("cand_") for k in plain)


def test_self_play_negatives_are_the_models_wrong_candidates_else_random_wrong_ones():
    rows = [Example(r, (7,), 0) for r in range(4)]
    cands = [[0, 1, 2, 3, 4]] * 4
    completions = [['"Emma"', '"Emma"', '"Ulysses"'],  # own wrong picks, the repeat skipped
                   ['"Dune"'],                         # the target: nothing of its own
                   ['"Solaris"', '"Ghost", "Emma"'],   # no candidate, two candidates
                   []]
    negatives, stats = candidate_negatives(rows, cands, completions, TITLES, 2, seed=3)
    assert negatives[0] == [3, 4]
    for ids in negatives[1:]:
        assert len(set(ids)) == 2 and set(ids) <= {1, 2, 3, 4}  # distinct, never the target, from the list
    assert (stats.own_wrong, stats.duplicates, stats.equal_to_positive, stats.no_candidate,
            stats.several_candidates, stats.random_fill, stats.negatives) == (2, 1, 1, 1, 1, 6, 8)
    assert candidate_negatives(rows, cands, completions, TITLES, 2, seed=3)[0] == negatives  # seeded per row
    random_only, stats = candidate_negatives(rows, cands, None, TITLES, 3, seed=3)  # selfplay.method: dpo_random
    assert all(len(set(n)) == 3 and set(n) <= {1, 2, 3, 4} for n in random_only) and stats.random_fill == 12
    with pytest.raises(ValueError, match=r"row 0: 2 non-target candidates, fewer than dpo.num_negatives=3"):
        candidate_negatives(rows[:1], [[0, 1, 2]], None, TITLES, 3, seed=0)


def test_prompt_builder_renders_the_candidate_prompt_with_given_or_sampled_lists():
    batch = pa.table({"row_id": [0, 1], "history": [[5], [6, 7]], "target": [0, 3], "candidates": [[1, 0, 2], []]})
    built = PromptBuilder(TITLES, "books", counterfactual=True, candidates=(4, 11))(batch).to_pydict()
    sampled = [TITLES[c] for c in sample_candidates(Example(1, (6, 7), 3), len(TITLES), 4, 11)]
    assert built["prompt"] == [render_candidate_prompt(["Beloved"], ["Ghost", "Dune", "The Ghost Ship"]),
                               render_candidate_prompt(["Middlemarch", "Persuasion"], sampled)]
    assert built["cf_prompt"][1] == render_candidate_prompt([], sampled) and built["response"] == ['"Dune"', '"Emma"']


def test_eval_files_in_either_format_and_unknown_titles_name_the_row(tmp_path):
    catalogue = catalogue_from_titles(TITLES)
    sdpo = tmp_path / "sdpo.json"
    sdpo.write_text(json.dumps([{"historyList": "Dune::Emma", "itemList": ["Ghost", "Ulysses"], "trueSelection": "Ghost"}]))
    assert read_eval_file(sdpo, catalogue, 10) == [Example(0, (0, 3), 1, (1, 4))]
    sprec = tmp_path / "sprec.jsonl"
    rows = [{"input": 'Read: "Dune", "Emma", "Beloved"', "output": '"Ulysses"\n'},
            {"input": 'Read: "Dune"', "output": '"Solaris"\n'}]
    sprec.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"sprec.jsonl: row 1: unknown target title in 'output': 'Solaris'"):
        read_eval_file(sprec, catalogue, 2)
    sprec.write_text(json.dumps(rows[0]))
    assert read_eval_file(sprec, catalogue, 2) == [Example(0, (3, 5), 4)]  # history cut to the last 2
    (tmp_path / "other.json").write_text(json.dumps([{"user": 1}]))
    with pytest.raises(DataError, match="neither SPRec fields"):
        read_eval_file(tmp_path / "other.json", catalogue, 10)
