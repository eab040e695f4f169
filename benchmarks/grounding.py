"""Grounding throughput: `Grounder` (matmul per query chunk + torch.topk) vs SPRec's evaluate.py
approach (torch.cdist against the whole catalogue, then argsort(argsort(dist)) per row), on the
same embeddings, in one run.

Titles are synthetic; item and query embeddings come from the dependency-free HashEmbedder so the
kNN step is timed on its own (embedding is timed separately, plus MiniLM on a few hundred titles).
The reference is slow, so it runs on a subset of the queries and rates are per query.

    .venv/bin/python benchmarks/grounding.py --items 10000 100000 --queries 2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sprec_ray.eval.embedders import HashEmbedder, MiniLMEmbedder
from sprec_ray.eval.grounding import Grounder

_ADJ = ("Silent", "Crimson", "Hidden", "Last", "Golden", "Broken", "Secret", "Winter", "Lost", "Burning",
        "Distant", "Paper", "Glass", "Wild", "Midnight", "Iron", "Scarlet", "Hollow", "Bright", "Quiet")
_NOUN = ("Harbor", "Garden", "Kingdom", "Letters", "River", "Crown", "Orchard", "Lighthouse", "Library",
         "Forest", "Promise", "Station", "Storm", "Mirror", "Road", "Clockmaker", "Queen", "Thief")


def synthetic_titles(n: int, rng: np.random.Generator) -> list[str]:
    a = rng.integers(0, len(_ADJ), (n, 2))
    b = rng.integers(0, len(_NOUN), (n, 2))
    return [f"The {_ADJ[a[i, 0]]} {_NOUN[b[i, 0]]} of the {_ADJ[a[i, 1]]} {_NOUN[b[i, 1]]} (Saga, #{i})"
            for i in range(n)]


def misspell(title: str, rng: np.random.Generator) -> str:
    """Drop one character and swap two neighbours: a typical near-miss generation."""
    chars = list(title)
    del chars[int(rng.integers(len(chars)))]
    j = int(rng.integers(len(chars) - 1))
    chars[j], chars[j + 1] = chars[j + 1], chars[j]
    return "".join(chars)


def reference_topk(queries: torch.Tensor, items: torch.Tensor, k: int) -> tuple[np.ndarray, float]:
    """SPRec evaluate.py: per prediction, L2 cdist to every item, rank = argsort(argsort(dist)),
    R_u = {i : rank_u(i) < k}; ids returned in rank order. Returns ids and elapsed seconds."""
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    start = time.perf_counter()
    for u in range(queries.shape[0]):
        dist = torch.cdist(queries[u : u + 1], items, p=2)
        rank = torch.argsort(torch.argsort(dist, dim=-1), dim=-1)[0]
        chosen = torch.nonzero(rank < k).flatten()
        out[u] = chosen[torch.argsort(rank[chosen])].cpu().numpy()
    return out, time.perf_counter() - start


def agreement(ours: np.ndarray, ref: np.ndarray, q: np.ndarray, items: np.ndarray, tol: float) -> dict:
    """Rows with identical top-k lists; other rows must differ only among near-tied items."""
    same = (ours == ref).all(axis=1)
    tie_only = 0
    for u in np.flatnonzero(~same):
        s_ours = np.sort(items[ours[u]] @ q[u])[::-1]
        s_ref = np.sort(items[ref[u]] @ q[u])[::-1]
        tie_only += bool(np.allclose(s_ours, s_ref, atol=tol))
    n = len(ours)
    return {"rows": n, "identical": int(same.sum()), "differ_only_in_ties": tie_only,
            "real_mismatches": int(n - same.sum() - tie_only)}


def bench_size(n_items: int, n_queries: int, n_ref: int, k: int, embedder: HashEmbedder,
               rng: np.random.Generator, device: str) -> dict:
    titles = synthetic_titles(n_items, rng)
    t0 = time.perf_counter()
    item_emb = embedder.encode(titles)
    embed_items_s = time.perf_counter() - t0
    source = rng.integers(0, n_items, n_queries)
    query_titles = [misspell(titles[i], rng) for i in source]
    t0 = time.perf_counter()
    query_emb = embedder.encode(query_titles)
    embed_queries_s = time.perf_counter() - t0

    grounder = Grounder(titles, embedder, item_embeddings=item_emb, device=device)
    grounder.knn(query_emb[:64], k)  # warm-up (thread pool, allocator)
    t0 = time.perf_counter()
    ids, _ = grounder.knn(query_emb, k)
    knn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grounder.ground(query_titles, k)
    ground_s = time.perf_counter() - t0

    q_t, items_t = torch.from_numpy(query_emb[:n_ref]).to(device), torch.from_numpy(item_emb).to(device)
    reference_topk(q_t[:4], items_t, k)  # warm-up
    ref_ids, ref_s = reference_topk(q_t, items_t, k)
    return {
        "items": n_items, "queries": n_queries, "ref_queries": n_ref, "k": k,
        "hash_embed_items_per_s": n_items / embed_items_s,
        "hash_embed_queries_per_s": n_queries / embed_queries_s,
        "knn_queries_per_s": n_queries / knn_s,
        "ground_end_to_end_queries_per_s": n_queries / ground_s,
        "reference_queries_per_s": n_ref / ref_s,
        "knn_speedup_vs_reference": (n_queries / knn_s) / (n_ref / ref_s),
        # sanity, not speed: how often a misspelled title grounds back to the title it came from
        "top1_is_source_title": float((ids[:, 0] == source).mean()),
        "agreement_with_reference": agreement(ids[:n_ref], ref_ids, query_emb, item_emb, tol=1e-5),
    }


def minilm_rate(n_titles: int, rng: np.random.Generator) -> dict:
    try:
        emb = MiniLMEmbedder()
    except ImportError as err:
        return {"skipped": str(err)}
    titles = synthetic_titles(n_titles, rng)
    emb.encode(titles[:16])  # warm-up
    t0 = time.perf_counter()
    emb.encode(titles)
    return {"titles": n_titles, "titles_per_s": n_titles / (time.perf_counter() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--ref-queries", type=int, default=100, help="queries timed with the slow reference")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--minilm-titles", type=int, default=300, help="0 skips the MiniLM timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for both kNN implementations")
    parser.add_argument("--out", default="bench_out/grounding.json")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    embedder = HashEmbedder()
    rows = []
    for n_items in args.items:
        print(f"[grounding] {n_items} items, {args.queries} queries ...", flush=True)
        rows.append(bench_size(n_items, args.queries, min(args.ref_queries, args.queries), args.k, embedder, rng,
                               args.device))
    minilm = minilm_rate(args.minilm_titles, rng) if args.minilm_titles else {"skipped": "--minilm-titles 0"}

    print()
    print("| items | queries (ref) | hash embed items/s | kNN queries/s | ground() queries/s "
          "| reference queries/s | kNN speedup | identical top-k (ties) | top-1 = source |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a = r["agreement_with_reference"]
        print(f"| {r['items']:,} | {r['queries']:,} ({r['ref_queries']}) | {r['hash_embed_items_per_s']:,.0f} "
              f"| {r['knn_queries_per_s']:,.0f} | {r['ground_end_to_end_queries_per_s']:,.0f} "
              f"| {r['reference_queries_per_s']:,.1f} | {r['knn_speedup_vs_reference']:,.0f}x "
              f"| {a['identical']}/{a['rows']} (+{a['differ_only_in_ties']} ties, {a['real_mismatches']} wrong) "
              f"| {r['top1_is_source_title']:.3f} |")
    if "titles_per_s" in minilm:
        print(f"\nMiniLM-L6 embedding: {minilm['titles_per_s']:,.0f} titles/s ({minilm['titles']} titles)")
    else:
        print(f"\nMiniLM-L6 embedding skipped: {minilm['skipped']}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance

    out.write_text(json.dumps({
        **provenance(), "benchmark": "grounding", "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": args.device, "k": args.k, "sizes": rows, "minilm": minilm,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
