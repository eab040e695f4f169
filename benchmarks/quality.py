"""Does self-play debias? SFT-only rounds vs SFT + DPO with random negatives vs SPRec, over seeds.

Every run starts from the shipped SFT warm start (adapters/smollm2-goodreads-sft, trained by
configs/warmstart.yaml), as SPRec starts its rounds from a separately trained SFT model, and runs
the same rounds: each round samples --round-rows train rows, trains SFT on their real next items,
then (except sft_only) DPO on them. Only the final adapter is scored, on the 400 validation rows; the
warm start was scored on the same rows when it was trained (its manifest). Variants:
  sft_only         SFT-only rounds: the control, so the preference step's own share shows
  dpo_random       SFT + DPO whose negatives are random catalogue items
  sprec_generated  SPRec: the negative is the model's own greedy answer text (dpo.negative_source=generated)
  sprec_grounded   SPRec with the catalogue item nearest to that text as the negative
  sprec_high_lr    SPRec at a higher DPO learning rate (--high-lr), to show how sensitive it is
  dpo_random_high_lr  random negatives at that learning rate: sprec_high_lr's control
  sprec_sdpo       SPRec + S-DPO, K=3 distinct sampled answers
The settings come from --config (configs/default.yaml: SPRec's round lr 2e-5 with warm-up, DPO
batch 8). The seeds vary the rows sampled per round, random negatives and the training order. Rounds
sample from the whole train split, whose popularity ORRatio counts, as the warm start's scoring did.

Each finished run leaves a small JSON in benchmarks/results/quality_runs/ (final metrics, the
negatives of every round, its time): commit them as they finish. A rerun skips finished runs and
resumes an interrupted one (its run directory under --out); --report-only rebuilds quality.md,
quality.json and the plot from the committed JSONs, without Ray.

    python benchmarks/quality.py --seeds 0 1 2 --rounds 2 --round-rows 128
    python benchmarks/quality.py --seeds 0 --variants sprec_grounded sprec_high_lr dpo_random_high_lr --rounds 2 --round-rows 128
    python benchmarks/quality.py --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
KEYS = ("NDCG@5", "HR@5", "DivRatio@5", "ORRatio@5", "DGU@5", "DivRatio@1", "ORRatio@1", "top10_share@1",
        "exact_share", "distinct_answers", "n_unparsed")
NEGATIVE_KEYS = ("rows_kept", "rows_dropped", "unparsed", "several_titles", "exact", "new_text", "in_history",
                 "equal_to_positive", "top_popular_share")
VARIANTS = ("sft_only", "dpo_random", "sprec_generated", "sprec_grounded", "sprec_high_lr", "dpo_random_high_lr",
            "sprec_sdpo")


def variant_overrides(name: str, args: argparse.Namespace) -> list[str]:
    return {
        "sft_only": ["selfplay.method=sft_only"],
        "dpo_random": ["selfplay.method=dpo_random"],
        "sprec_generated": ["dpo.negative_source=generated"],
        "sprec_grounded": ["dpo.negative_source=grounded"],
        "sprec_high_lr": ["dpo.negative_source=generated", f"dpo.lr={args.high_lr}"],
        "dpo_random_high_lr": ["selfplay.method=dpo_random", f"dpo.lr={args.high_lr}"],
        "sprec_sdpo": ["dpo.loss=sdpo", "dpo.num_negatives=3", "generation.decoding=sample", "generation.n=3"],
    }[name]


def finite(value: float | None) -> float | None:
    """NaN (e.g. DGU when nothing was recommended) as None, so the JSON stays valid."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def mean_sd(values: list[float | None]) -> str:
    found = [v for v in values if v is not None and not math.isnan(v)]
    if not found:
        return "-"
    if len(found) == 1:
        return f"{found[0]:.4g}"
    return f"{statistics.mean(found):.4g} ± {statistics.stdev(found):.2g}"


def table(groups: list[tuple[str, list[dict]]], keys: tuple[str, ...]) -> list[str]:
    """Markdown lines: one row per label, each metric as mean ± sd over that label's results."""
    lines = ["| run | n | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for label, found in groups:
        lines.append(f"| {label} | {len(found)} | " + " | ".join(mean_sd([m.get(k) for m in found]) for k in keys) + " |")
    return lines


PAIRS = (("dpo_random", "sft_only"), ("sprec_generated", "sft_only"), ("sprec_generated", "dpo_random"),
         ("sprec_grounded", "sprec_generated"), ("sprec_high_lr", "sprec_generated"),
         ("sprec_high_lr", "dpo_random_high_lr"))


def paired(runs: list[dict], keys: tuple[str, ...]) -> list[tuple[str, list[dict]]]:
    """Per-seed differences (a - b) for the pairs both ran on the same seed: seeds share the rows
    sampled per round, so a paired difference is less noisy than the difference of two means."""
    by = {(r["seed"], r["variant"]): r["final"] for r in runs}
    groups = []
    for a, b in PAIRS:
        seeds = sorted(s for s, v in by if v == a and (s, b) in by)
        diffs = [{k: None if by[s, a].get(k) is None or by[s, b].get(k) is None else by[s, a][k] - by[s, b][k]
                  for k in keys} for s in seeds]
        if diffs:
            groups.append((f"{a} - {b}", diffs))
    return groups


def plot(groups: list[tuple[str, list[dict]]], keys: tuple[str, ...], path: Path) -> None:
    """One panel per metric: every seed as a dot, the mean ± sd as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(2.8 * len(keys), 4), squeeze=False)
    x = list(range(len(groups)))
    for ax, key in zip(axes[0], keys, strict=True):
        values = [[m[key] for m in found if m.get(key) is not None] for _, found in groups]
        ax.bar(x, [statistics.mean(v) if v else math.nan for v in values],
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values], capsize=4, color="lightsteelblue")
        for i, v in enumerate(values):
            ax.plot([i] * len(v), v, "k.", alpha=0.7)
        ax.set_title(key, fontsize="small")
        ax.set_xticks(x, [label for label, _ in groups], rotation=40, ha="right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_one(args: argparse.Namespace, seed: int, variant: str, warm_start: Path) -> None:
    """One run to its final adapter, then its small result JSON (skipped when that JSON exists)."""
    from provenance import provenance

    from sprec_ray.config import load_config
    from sprec_ray.selfplay import run_selfplay

    result = Path(args.results) / f"seed{seed}_{variant}.json"
    if result.exists():
        return
    run_dir = Path(args.out) / f"seed{seed}" / variant
    overrides = [f"seed={seed}", f"output_dir={run_dir}", f"name=quality-{variant}", f"selfplay.rounds={args.rounds}",
                 f"selfplay.round_samples={args.round_rows}", "data.train_samples=0", f"data.valid_samples={args.valid}",
                 f"selfplay.init_adapter={warm_start}", "eval.every_round=false", *variant_overrides(variant, args),
                 *args.overrides]
    started = time.time()
    run_selfplay(load_config(args.config, overrides), resume=run_dir.exists())
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    manifests = {p.stem: json.loads(p.read_text()) for p in (run_dir / "manifests").glob("*.json")}
    negatives = {n: manifests[n]["metrics"] for n in sorted(manifests) if n.endswith("_negatives")}
    dpo = {n: {k: v for k, v in manifests[n]["metrics"].items() if "logratio" in k or k in ("steps", "pairs", "final_loss")}
           for n in sorted(manifests) if n.endswith("_dpo")}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({
        **provenance(), "seed": seed, "variant": variant, "rounds": args.rounds, "round_rows": args.round_rows,
        "overrides": overrides, "label": rounds[-1]["label"],
        "final": {k: finite(v) for k, v in rounds[-1].items() if k not in ("label", "round")},
        "negatives": {n: {k: finite(v) for k, v in m.items()} for n, m in negatives.items()}, "dpo": dpo,
        "seconds": sum(m["seconds"] for m in manifests.values()), "wall_s_this_sitting": time.time() - started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2))
    print(f"wrote {result}", flush=True)


def report(args: argparse.Namespace, warm_start: Path) -> str:
    """quality.md, quality.json and the plot from the result JSONs and the warm start's manifest."""
    warm = json.loads((warm_start / "manifest.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("seed*_*.json"))]
    if not runs:
        raise SystemExit(f"no finished runs in {args.results}")
    seeds = sorted({r["seed"] for r in runs})
    order = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    warm_row = {k: finite(v) for k, v in warm["validation"]["metrics"].items()}
    groups = [("SFT warm start", [warm_row])] + [(v, [r["final"] for r in runs if r["variant"] == v]) for v in order]
    rounds = sorted({n for r in runs for n in r["negatives"]})
    neg_groups = [(f"{v} {n.split('_')[0]}", [r["negatives"][n] for r in runs if r["variant"] == v and n in r["negatives"]])
                  for v in order for n in rounds]
    neg_groups = [(label, found) for label, found in neg_groups if found]
    per_seed = "\n\n".join(f"### seed {s}\n\n" + "\n".join(table(
        [("SFT warm start", [warm_row])] + [(v, [r["final"] for r in runs if r["seed"] == s and r["variant"] == v])
                                            for v in order if any(r["seed"] == s and r["variant"] == v for r in runs)],
        KEYS)) for s in seeds)
    dpo_keys = ("final_chosen_logratio", "final_rejected_logratio", "final_loss")
    dpo_groups = [(f"{v} {n.split('_')[0]}", [r["dpo"][n] for r in runs if r["variant"] == v and n in r["dpo"]])
                  for v in order for n in sorted({n for r in runs for n in r["dpo"]})]
    first = runs[0]
    header = (f"Seeds {seeds}; every run from the shipped warm start ({warm_start.relative_to(REPO)}, "
              f"{warm['training']['steps']:.0f} SFT steps on the whole train split); "
              f"{first['rounds']} rounds of {first['round_rows']} rows, settings of {Path(args.config).name}; "
              f"{warm_row['n_rows']:.0f} validation rows. "
              f"Machine: {first['machine']}. Run time {sum(r['seconds'] for r in runs) / 3600:.1f} h over {len(runs)} runs.")
    text = (f"{header}\n\n## Final round, mean ± sd over seeds\n\n" + "\n".join(table(groups, KEYS))
            + "\n\n## Paired differences, same seed (mean ± sd over the seeds both arms ran)\n\n"
            + "\n".join(table(paired(runs, KEYS[:-1]), KEYS[:-1]))
            + "\n\n## Negatives per round\n\n" + "\n".join(table(neg_groups, NEGATIVE_KEYS))
            + "\n\n## DPO stages: log-ratios against the reference at the last step (nats per response)\n\n"
            + "\n".join(table([(label, found) for label, found in dpo_groups if found], dpo_keys))
            + f"\n\n## Per seed\n\n{per_seed}\n")
    (RESULTS / "quality.md").write_text(text)
    from provenance import provenance

    (RESULTS / "quality.json").write_text(json.dumps({
        **provenance(), "seeds": seeds, "variants": order, "warm_start": {"adapter": str(warm_start.relative_to(REPO)), **warm_row},
        "runs": runs}, indent=2))
    plot(groups, KEYS[:8], RESULTS / "quality_seeds.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--warm-start", default=str(REPO / "adapters" / "smollm2-goodreads-sft"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:3]))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-rows", type=int, default=128, help="train rows sampled per round (SPRec: 2,048)")
    parser.add_argument("--valid", type=int, default=0, help="validation rows (0 = all 400, as the warm start was scored)")
    parser.add_argument("--high-lr", type=float, default=1e-4, help="DPO learning rate of sprec_high_lr")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from --results, no Ray")
    parser.add_argument("--out", default=str(REPO / "bench_out" / "quality"), help="run directories (large, not committed)")
    parser.add_argument("--results", default=str(RESULTS / "quality_runs"), help="one small JSON per finished run")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = parser.parse_args()

    warm_start = Path(args.warm_start).resolve()
    if not args.report_only:
        for seed in args.seeds:
            for variant in args.variants:
                run_one(args, seed, variant, warm_start)
    print(report(args, warm_start))


if __name__ == "__main__":
    main()
