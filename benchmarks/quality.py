"""Does self-play debias? SFT-only rounds vs SFT + DPO with random negatives vs SPRec, over seeds.

Every run starts from the shipped SFT warm start (adapters/smollm2-goodreads-sft, trained by
configs/warmstart.yaml), as SPRec starts its rounds from a separately trained SFT model, and runs
the same rounds: each round samples --round-rows train rows, trains SFT on their real next items,
then (except sft_only) DPO on them. Every round's adapter (round 0: the warm start) is scored on the
400 validation rows. Variants:
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

Each finished run leaves a small JSON, benchmarks/results/quality_runs/seed<S>_<variant>_<rounds>x<rows>.json
(every round's metrics, the negatives of every round, its time): commit them as they finish. A rerun
skips finished runs and resumes an interrupted one (its run directory under --out); --report-only
rebuilds quality.md, quality.json and the plots from the committed JSONs, without Ray: per scale the
final round per seed (quality_seeds_2x128.png, quality_seeds_3x512.png) and, where every round was
scored, the trend over rounds (quality_rounds_3x512.png). Runs of 2 x 128 rows scored only their
final adapter.

    python benchmarks/quality.py --seeds 0 1 2 --variants sprec_generated dpo_random          # 3 rounds x 512 rows
    python benchmarks/quality.py --seeds 0 --variants sft_only sprec_sdpo
    python benchmarks/quality.py --seeds 0 1 2 --variants sft_only dpo_random sprec_generated --rounds 2 --round-rows 128
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


def mean_sd(values: list[float | None], signs: bool = False) -> str:
    """mean ± sd; with `signs`, how many values were above / below zero (paired differences)."""
    found = [v for v in values if v is not None and not math.isnan(v)]
    if not found:
        return "-"
    text = f"{found[0]:.4g}" if len(found) == 1 else f"{statistics.mean(found):.4g} ± {statistics.stdev(found):.2g}"
    if signs and len(found) > 1:
        text += f" ({sum(v > 0 for v in found)}+ {sum(v < 0 for v in found)}−)"
    return text


def table(groups: list[tuple[str, list[dict]]], keys: tuple[str, ...], signs: bool = False) -> list[str]:
    """Markdown lines: one row per label, each metric as mean ± sd over that label's results."""
    lines = ["| run | n | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for label, found in groups:
        lines.append(f"| {label} | {len(found)} | "
                     + " | ".join(mean_sd([m.get(k) for m in found], signs) for k in keys) + " |")
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


def round_plot(groups: list[tuple[str, list[list[dict]]]], keys: tuple[str, ...], path: Path) -> None:
    """One panel per metric: each arm's mean over seeds per round (0 = the warm start), sd as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, math.ceil(len(keys) / 2), figsize=(3.2 * math.ceil(len(keys) / 2), 6.4), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for label, per_run in groups:
            by_round: dict[int, list[float]] = {}
            for rounds in per_run:
                for m in rounds:
                    if m.get(key) is not None:
                        by_round.setdefault(m["round"], []).append(m[key])
            xs = sorted(by_round)
            ax.errorbar(xs, [statistics.mean(by_round[x]) for x in xs], capsize=3, marker="o", label=label,
                        yerr=[statistics.stdev(by_round[x]) if len(by_round[x]) > 1 else 0.0 for x in xs])
        ax.set_title(key, fontsize="small")
        ax.set_xlabel("round", fontsize="small")
    axes.flat[0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scale_of(run: dict) -> str:
    """Rounds x rows per round: the runs of one table."""
    return f"{run['rounds']}x{run['round_rows']}"


def run_one(args: argparse.Namespace, seed: int, variant: str, warm_start: Path) -> None:
    """One run to its final adapter, then its small result JSON (skipped when that JSON exists)."""
    from provenance import provenance

    from sprec_ray.config import load_config
    from sprec_ray.selfplay import run_selfplay

    scale = scale_of(vars(args))
    result = Path(args.results) / f"seed{seed}_{variant}_{scale}.json"
    if result.exists():
        return
    run_dir = Path(args.out) / scale / f"seed{seed}" / variant
    overrides = [f"seed={seed}", f"output_dir={run_dir}", f"name=quality-{variant}", f"selfplay.rounds={args.rounds}",
                 f"selfplay.round_samples={args.round_rows}", "data.train_samples=0", f"data.valid_samples={args.valid}",
                 f"selfplay.init_adapter={warm_start}", "eval.every_round=true", *variant_overrides(variant, args),
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
        "per_round": [{"round": m["round"], **{k: finite(m.get(k)) for k in KEYS}} for m in rounds],
        "negatives": {n: {k: finite(v) for k, v in m.items()} for n, m in negatives.items()}, "dpo": dpo,
        "seconds": sum(m["seconds"] for m in manifests.values()), "wall_s_this_sitting": time.time() - started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2))
    print(f"wrote {result}", flush=True)


def scale_report(scale: str, runs: list[dict], warm_row: dict, warm: dict, warm_start: Path, config: str) -> str:
    """The tables (and plots) of the runs of one scale."""
    seeds = sorted({r["seed"] for r in runs})
    order = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    groups = [("SFT warm start", [warm_row])] + [(v, [r["final"] for r in runs if r["variant"] == v]) for v in order]
    neg_groups = [(f"{v} {n.split('_')[0]}", [r["negatives"][n] for r in runs if r["variant"] == v and n in r["negatives"]])
                  for v in order for n in sorted({n for r in runs for n in r["negatives"]})]
    per_seed = "\n\n".join(f"#### seed {s}\n\n" + "\n".join(table(
        [("SFT warm start", [warm_row])] + [(v, [r["final"] for r in runs if r["seed"] == s and r["variant"] == v])
                                            for v in order if any(r["seed"] == s and r["variant"] == v for r in runs)],
        KEYS)) for s in seeds)
    dpo_keys = ("final_chosen_logratio", "final_rejected_logratio", "final_loss")
    dpo_groups = [(f"{v} {n.split('_')[0]}", [r["dpo"][n] for r in runs if r["variant"] == v and n in r["dpo"]])
                  for v in order for n in sorted({n for r in runs for n in r["dpo"]})]
    first = runs[0]
    text = (f"## {first['rounds']} rounds of {first['round_rows']} rows\n\n"
            f"Seeds {seeds}; every run from the shipped warm start ({warm_start.relative_to(REPO)}, "
            f"{warm['training']['steps']:.0f} SFT steps on the whole train split); settings of {Path(config).name}; "
            f"{warm_row['n_rows']:.0f} validation rows. Machine: {first['machine']}. "
            f"Run time {sum(r['seconds'] for r in runs) / 3600:.1f} h over {len(runs)} runs.\n\n"
            "### Final round, mean ± sd over seeds\n\n" + "\n".join(table(groups, KEYS))
            + "\n\n### Paired differences, same seed (mean ± sd over the seeds both arms ran; seeds above / below 0)\n\n"
            + "\n".join(table(paired(runs, KEYS[:-1]), KEYS[:-1], signs=True)))
    per_round = [(v, [r["per_round"] for r in runs if r["variant"] == v and r.get("per_round")]) for v in order]
    per_round = [(v, found) for v, found in per_round if found]
    if per_round:
        rows = [(f"{v} r{k}", [m for rounds in found for m in rounds if m["round"] == k])
                for v, found in per_round for k in sorted({m["round"] for rounds in found for m in rounds})]
        text += "\n\n### Every round's adapter, mean ± sd over seeds (r0 = the warm start)\n\n" + "\n".join(table(rows, KEYS))
        round_plot(per_round, KEYS[:8], RESULTS / f"quality_rounds_{scale}.png")
    plot(groups, KEYS[:8], RESULTS / f"quality_seeds_{scale}.png")
    return (text + "\n\n### Negatives per round\n\n" + "\n".join(table([g for g in neg_groups if g[1]], NEGATIVE_KEYS))
            + "\n\n### DPO stages: log-ratios against the reference at the last step (nats per response)\n\n"
            + "\n".join(table([(label, found) for label, found in dpo_groups if found], dpo_keys))
            + f"\n\n### Per seed\n\n{per_seed}\n")


def report(args: argparse.Namespace, warm_start: Path) -> str:
    """quality.md, quality.json and the plots from the result JSONs and the warm start's manifest."""
    warm = json.loads((warm_start / "manifest.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("seed*_*.json"))]
    if not runs:
        raise SystemExit(f"no finished runs in {args.results}")
    warm_row = {k: finite(v) for k, v in warm["validation"]["metrics"].items()}
    scales = sorted({scale_of(r) for r in runs}, key=lambda sc: tuple(int(x) for x in sc.split("x")))
    text = "\n".join(scale_report(sc, [r for r in runs if scale_of(r) == sc], warm_row, warm, warm_start, args.config)
                     for sc in scales)
    (RESULTS / "quality.md").write_text(text)
    from provenance import provenance

    (RESULTS / "quality.json").write_text(json.dumps({
        **provenance(), "scales": scales, "seeds": sorted({r["seed"] for r in runs}),
        "warm_start": {"adapter": str(warm_start.relative_to(REPO)), **warm_row}, "runs": runs}, indent=2))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--warm-start", default=str(REPO / "adapters" / "smollm2-goodreads-sft"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:3]))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-rows", type=int, default=512, help="train rows sampled per round (SPRec: 2,048)")
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
