"""Log-prob ranking of candidate lists with SmolLM2 + the shipped SFT warm start, on Goodreads.

Two parts, one process, one engine (the transformers backend a CPU generation actor runs):
1. Cost, side by side per validation row (alternating order): one greedy generation of the row's
   prompt (batch 1, generation.max_new_tokens), against scoring its --candidates candidates as one
   prefix-shared sequence, and as one full forward per candidate (all in one batch). Rankings of the
   two layouts are compared.
2. Quality on every validation row (400): its candidate list is the target plus --candidates - 1
   sampled items outside the history (data/candidates.py, seed 0), ranked by log p('"Title"' + EOS
   | the generate prompt) summed and length-normalised; rank_HR@1/5/10 and rank_NDCG@5/10, and
   the time of the pass. A random ranking would give HR@k = k / candidates.

    python benchmarks/rank_scoring.py                     # ~15 min on the 2-core reference machine
    python benchmarks/rank_scoring.py --timing-rows 8 --quality-rows 64

Writes benchmarks/results/rank_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=str(REPO / "adapters" / "smollm2-goodreads-sft"))
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--timing-rows", type=int, default=16)
    ap.add_argument("--quality-rows", type=int, default=0, help="0 = every validation row")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rank_scoring.json")
    args = ap.parse_args()

    import torch
    from provenance import provenance

    from sprec_ray.config import load_config
    from sprec_ray.data.candidates import candidates_of
    from sprec_ray.data.prepared import prepare_dataset
    from sprec_ray.data.prompts import render_prompt
    from sprec_ray.eval.candidates import rank_metrics, ranked
    from sprec_ray.generate.backends import Decoding
    from sprec_ray.generate.factory import make_backend
    from sprec_ray.generate.scoring import answer_scores, candidate_rows, candidate_token_logprobs
    from sprec_ray.manifest import machine_name
    from sprec_ray.models.base import CONVERT_CACHE, resolve_base_model
    from sprec_ray.runtime import apply_default_env

    apply_default_env()
    cfg = load_config(REPO / "configs" / "default.yaml", ["data.train_samples=0", "data.valid_samples=0"])
    with tempfile.TemporaryDirectory(prefix="rank_scoring_") as tmp:  # JSON, no sampling: no Ray needed
        data = prepare_dataset(cfg.data, Path(tmp) / "prepared", Path(tmp))
        rows = data.head("valid", data.counts["valid"])
    titles, n_items = data.catalogue.titles, len(data.catalogue)
    base = resolve_base_model(cfg.model.name, CONVERT_CACHE)
    backend = make_backend(cfg.generation, base, cfg.lora.r, cfg.seed)
    adapter = str(Path(args.adapter).resolve())
    lists = [candidates_of(e, n_items, args.candidates, 0) for e in rows]
    prompts = [render_prompt([titles[i] for i in e.history], cfg.data.item_noun) for e in rows]
    names = [[titles[c] for c in cands] for cands in lists]
    greedy = Decoding("greedy", 1, max_new_tokens=cfg.generation.max_new_tokens)
    backend.generate(prompts[:1], adapter, 1, decoding=greedy)  # merge the adapter, warm the kernels
    print(f"{machine_name()}; torch threads {torch.get_num_threads()}; {len(rows)} validation rows", flush=True)

    timing = {"generate": 0.0, "shared": 0.0, "separate": 0.0}
    same = 0
    pad = backend.tokenizer.pad_token_id
    for i in range(args.timing_rows):
        scored = {}
        order = ("generate", "shared", "separate") if i % 2 == 0 else ("separate", "shared", "generate")
        for what in order:
            t0 = time.perf_counter()
            if what == "generate":
                backend.generate(prompts[i:i + 1], adapter, 1, decoding=greedy)
            else:
                batch = candidate_rows(backend.tokenizer, prompts[i:i + 1], names[i:i + 1])
                with torch.inference_mode():
                    lps = candidate_token_logprobs(backend.model, batch, pad, backend.model.dtype, what)[0]
                scored[what] = ranked(answer_scores(lps, "sum"))
            timing[what] += time.perf_counter() - t0
        same += scored["shared"] == scored["separate"]
        print(f"timing row {i + 1}/{args.timing_rows}: " + ", ".join(f"{k} {v / (i + 1):.2f}s" for k, v in timing.items()),
              flush=True)
    per_row = {k: v / args.timing_rows for k, v in timing.items()}

    n = args.quality_rows or len(rows)
    t0 = time.perf_counter()
    token_lps = []
    for s in range(0, n, 8):  # chunks: a progress line, and the pool's shard size
        token_lps += backend.candidate_logprobs(prompts[s:s + 8], names[s:s + 8], adapter, 1)
        done = min(s + 8, n)
        rate = done / (time.perf_counter() - t0)
        print(f"quality: {done}/{n} rows, {rate:.2f} rows/s, ETA {(n - done) / rate:.0f}s", flush=True)
    quality_s = time.perf_counter() - t0
    quality = {norm: rank_metrics([answer_scores(t, norm) for t in token_lps], lists[:n], [e.target for e in rows[:n]],
                                  (1, 5, 10)) for norm in ("sum", "mean")}
    result = {
        **provenance(), "torch_threads": torch.get_num_threads(), "adapter": str(Path(args.adapter).name),
        "candidates": args.candidates, "timing_rows": args.timing_rows,
        "per_row_s": {k: round(v, 3) for k, v in per_row.items()},
        "shared_over_generate": round(per_row["shared"] / per_row["generate"], 3),
        "separate_over_shared": round(per_row["separate"] / per_row["shared"], 2),
        "identical_rankings": f"{same}/{args.timing_rows}",
        "quality_rows": n, "quality_s": round(quality_s, 1),
        "quality": {norm: {k: round(v, 4) for k, v in m.items()} for norm, m in quality.items()},
        "random_HR@k": {k: round(k / args.candidates, 4) for k in (1, 5, 10)},
    }
    backend.close()
    print(f"\n| per row ({args.candidates} candidates) | s |\n|---|---:|")
    for k, v in per_row.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\nscoring / one greedy generation: {result['shared_over_generate']}x; one row per candidate / shared: "
          f"{result['separate_over_shared']}x; identical rankings {result['identical_rankings']}")
    print("\n| norm | rank_HR@1 | rank_HR@5 | rank_HR@10 | rank_NDCG@5 | rank_NDCG@10 |\n|---|---:|---:|---:|---:|---:|")
    for norm, m in result["quality"].items():
        print(f"| {norm} | {m['rank_HR@1']} | {m['rank_HR@5']} | {m['rank_HR@10']} | {m['rank_NDCG@5']} | {m['rank_NDCG@10']} |")
    print(f"({n} rows in {quality_s:.0f}s; random ranking HR@k = k/{args.candidates})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
