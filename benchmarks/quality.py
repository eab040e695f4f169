"""Does self-play debias? SFT vs SFT+DPO(random negatives) vs SPRec with generated / grounded negatives.

One warm-start SFT adapter (trained and scored once, with the first seed) is shared by every variant
and seed (selfplay.init_adapter; the variants score only their final adapter, eval.every_round=false),
so the comparison isolates the preference step; the seeds vary the rows sampled per round, the
random negatives, sampling and the training order. Variants:
  sft               the warm start alone
  dpo_random        SFT + DPO with uniform random negatives (--random-rounds rounds)
  sprec_generated   SPRec, the rejected response is the model's own title text (dpo.negative_source=generated)
  sprec_grounded    SPRec, the rejected response is the nearest catalogue item to it (negative_source=grounded)
  sprec_sdpo        optional: SPRec + S-DPO, K=3 distinct sampled completions (generated)
Validation rows do not depend on the seed (only the training rows do), so every seed and variant is
scored on the same rows. Writes a per-seed table, a mean +- sd table over seeds, JSON and a plot of
every seed's value to --out; rerunning with the same --out resumes finished runs, and --report-only
rebuilds the tables from the run directories without Ray. --every-round also scores the variants'
intermediate rounds (and the warm start again in each run) to show the per-round trajectory.

--task candidates runs every variant in the candidate task (data.task=candidates: choose among
data.num_candidates listed items; negatives among the candidates, random or the model's own wrong
picks, so sprec_grounded equals sprec_generated) and adds HR@1 / ValidRatio to the tables.
--eval-data FILE scores each run's final adapter (and the warm start) on that SPRec or S-DPO JSON
file, as `sprec-ray eval --data` does, instead of reporting the per-round validation rows; results
and predictions go to <out>/eval_data/.

    python benchmarks/quality.py                                   # Goodreads sample, SmolLM2, CPU
    python benchmarks/quality.py --seeds 0 1 2 --train 512 --round-rows 64 --valid 100 --rounds 2 \\
        data.max_history=5 sft.epochs=2
    python benchmarks/quality.py --config configs/tiny.yaml --model tiny --train 48 --round-rows 16 \\
        --valid 12 --rounds 1 --seeds 0 1 --out bench_out/quality_smoke generation.backend=hf   # plumbing only
    python benchmarks/quality.py --task candidates --seeds 0 1 2 model.max_prompt_len=768 generation.max_model_len=1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("NDCG@5", "HR@5", "DivRatio@5", "ORRatio@5", "MGU@5", "DGU@5", "DivRatio@1", "ORRatio@1")
CANDIDATE_KEYS = ("cand_HR@1", "cand_ValidRatio")
NEGATIVE_KEYS = ("rows_kept", "rows_dropped", "exact", "new_text", "in_history", "equal_to_positive", "top_popular_share")
CANDIDATE_NEGATIVE_KEYS = ("own_wrong", "equal_to_positive", "no_candidate", "several_candidates", "random_fill")
VARIANTS = ("sft", "dpo_random", "sprec_generated", "sprec_grounded", "sprec_sdpo")


def variant_overrides(name: str, args: argparse.Namespace) -> list[str]:
    return {
        "sft": ["selfplay.rounds=0"],
        "dpo_random": ["selfplay.method=dpo_random", f"selfplay.rounds={args.random_rounds}"],
        "sprec_generated": [f"selfplay.rounds={args.rounds}", "dpo.negative_source=generated"],
        "sprec_grounded": [f"selfplay.rounds={args.rounds}", "dpo.negative_source=grounded"],
        "sprec_sdpo": [f"selfplay.rounds={args.sdpo_rounds}", "dpo.loss=sdpo", "dpo.num_negatives=3",
                       "generation.decoding=sample", "generation.n=3", "dpo.negative_source=generated"],
    }[name]


def finite(value: float | None) -> float | None:
    """NaN (e.g. MGU when nothing was recommended) as None, so the JSON stays valid."""
    return None if value is None or math.isnan(value) else value


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(runs: list[tuple[str, list[dict[str, float]]]], keys: tuple[str, ...]) -> list[str]:
    """Markdown lines: one row per run label, each metric as mean ± sd over that label's results."""
    lines = ["| run | seeds | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for label, found in runs:
        lines.append(f"| {label} | {len(found)} | " + " | ".join(mean_sd([m.get(k, math.nan) for m in found]) for k in keys) + " |")
    return lines


def plot_seeds(runs: list[tuple[str, list[dict[str, float]]]], keys: tuple[str, ...], path: Path) -> None:
    """One panel per metric: each seed's value as a dot, the mean +- sd as a bar, per run label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 4), squeeze=False)
    x = list(range(len(runs)))
    for ax, key in zip(axes[0], keys, strict=True):
        values = [[m[key] for m in found if m.get(key) is not None and not math.isnan(m[key])] for _, found in runs]
        means = [statistics.mean(v) if v else math.nan for v in values]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(x, means, yerr=sds, capsize=4, color="lightsteelblue")
        for i, v in enumerate(values):
            ax.plot([i] * len(v), v, "k.", alpha=0.7)
        ax.set_title(key)
        ax.set_xticks(x, [label for label, _ in runs], rotation=35, ha="right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_all(args: argparse.Namespace, out: Path) -> None:
    """The warm start once (first seed), then every variant for every seed from it; finished runs resume."""
    from sprec_ray.config import load_config
    from sprec_ray.run_eval import evaluate_run
    from sprec_ray.selfplay import run_selfplay

    common = [f"data.path={args.data}", f"model.name={args.model}", f"data.train_samples={args.train}",
              f"data.valid_samples={args.valid}", f"selfplay.round_samples={args.round_rows}", f"data.task={args.task}",
              *args.overrides]

    def run(name: str, seed: int, extra: list[str]) -> Path:
        run_dir = out / f"seed{seed}" / name
        overrides = [*common, f"seed={seed}", f"output_dir={run_dir}", f"name={name}", *variant_overrides(name, args), *extra]
        run_selfplay(load_config(args.config, overrides), resume=run_dir.exists())
        if args.eval_data:  # the final adapter on the file, in place of the per-round validation rows
            evaluate_run(run_dir, data=args.eval_data, out=out / "eval_data" / f"seed{seed}_{name}.json")
        return run_dir

    sft_dir = run("sft", args.seeds[0], [])
    warm_start = str(sft_dir / json.loads((sft_dir / "final.json").read_text())["adapter"])
    # valid rows do not depend on the seed, so the warm start's scores are the sft run's and each
    # variant scores only its final adapter (unless --every-round asks for the trajectory)
    extra = [f"selfplay.init_adapter={warm_start}"] + ([] if args.every_round else ["eval.every_round=false"])
    for seed in args.seeds:
        for name in args.variants:
            run(name, seed, extra)


def scores(out: Path, seed: int, name: str, eval_data: str | None) -> list[tuple[str, dict[str, float]]]:
    """A run's (label, metrics) rows: per evaluated round from metrics.json, or its final adapter on --eval-data."""
    if eval_data:
        return [("final", json.loads((out / "eval_data" / f"seed{seed}_{name}.json").read_text()))]
    return [(r["label"], r) for r in json.loads((out / f"seed{seed}" / name / "metrics.json").read_text())["rounds"]]


def run_seconds(run_dir: Path) -> float:
    """From the manifests, so a resumed run reports the time its phases took, not the resume."""
    return sum(json.loads(m.read_text())["seconds"] for m in (run_dir / "manifests").glob("*.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--data", default="bundled", help="SPRec-format dir (default: the shipped data/goodreads sample)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train", type=int, default=256, help="rows for the warm-start SFT")
    parser.add_argument("--round-rows", type=int, default=64, help="rows sampled per self-play round")
    parser.add_argument("--valid", type=int, default=400, help="sampled validation rows (the bundled sample has 400)")
    parser.add_argument("--eval-data", default=None, help="score final adapters on this SPRec / S-DPO JSON file instead")
    parser.add_argument("--task", choices=("generate", "candidates"), default="generate")
    parser.add_argument("--rounds", type=int, default=2, help="SPRec rounds (both negative sources)")
    parser.add_argument("--random-rounds", type=int, default=1, help="rounds of SFT + DPO with random negatives")
    parser.add_argument("--sdpo-rounds", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:4]),
                        help="preference variants to compare with the warm start")
    parser.add_argument("--every-round", action="store_true",
                        help="score every round's adapter in the variant runs too (one more evaluation per round)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from the runs under --out")
    parser.add_argument("--out", default=str(REPO / "bench_out" / "quality"))
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every variant")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = KEYS + (CANDIDATE_KEYS if args.task == "candidates" else ())
    negative_keys = CANDIDATE_NEGATIVE_KEYS if args.task == "candidates" else NEGATIVE_KEYS
    if not args.report_only:
        run_all(args, out)
    elif not (out / f"seed{args.seeds[0]}" / "sft" / "metrics.json").exists():
        parser.error(f"--report-only: no finished warm-start run {out / f'seed{args.seeds[0]}' / 'sft'}")
    # the tables are read back from the run directories, so --report-only rebuilds them without Ray
    sft_results = scores(out, args.seeds[0], "sft", args.eval_data)
    timings = {"sft": run_seconds(out / f"seed{args.seeds[0]}" / "sft")}
    per_seed: dict[int, list[tuple[str, dict[str, float]]]] = {}
    negatives: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        warm, rows = sft_results[0][1], []
        for name in args.variants:
            run_dir = out / f"seed{seed}" / name
            results = scores(out, seed, name, args.eval_data)
            if len(results) > 1 and results[0][0] == "r0 (SFT)":  # --every-round: the warm start on this run's rows
                warm, results = results[0][1], results[1:]
            timings[f"seed{seed}/{name}"] = run_seconds(run_dir)
            rows += [(f"{name} {label}", m) for label, m in results]
            for manifest in sorted((run_dir / "manifests").glob("r*_negatives.json")):
                stats = json.loads(manifest.read_text())["metrics"]
                negatives.setdefault(f"{name} {manifest.name.split('_')[0]}", []).append(stats)
        per_seed[seed] = [("SFT (warm start)", warm), *rows]

    labels = list(dict.fromkeys(label for rows in per_seed.values() for label, _ in rows))
    runs = [(label, [m for rows in per_seed.values() for lab, m in rows if lab == label]) for label in labels]
    summary = table(runs, keys)
    plot_seeds(runs, ("NDCG@5", "HR@5", "DivRatio@5", "ORRatio@5", "DGU@5", "DivRatio@1", "ORRatio@1")
               + (CANDIDATE_KEYS if args.task == "candidates" else ()), out / "quality_seeds.png")
    neg_table = table(list(negatives.items()), negative_keys)
    evaluated = (f"final adapters scored on {args.eval_data} ({sft_results[0][1]['n_rows']} rows)" if args.eval_data
                 else f"{args.valid} validation rows")
    header = (f"seeds {args.seeds}; model {args.model}; {args.task} task; warm-start SFT on {args.train} rows "
              f"(seed {args.seeds[0]}, shared), {args.round_rows} rows per round, {evaluated}; "
              f"{platform.machine()} CPU x{os.cpu_count()}; run time {sum(timings.values()) / 60:.1f} min")
    seed_tables = "\n\n".join(f"### seed {seed}\n\n" + "\n".join(table([(label, [m]) for label, m in rows], keys))
                                for seed, rows in per_seed.items())
    text = (f"{header}\n\n## mean ± sd over seeds\n\n" + "\n".join(summary) + "\n\n## negatives per round (mean ± sd)\n\n"
            + "\n".join(neg_table) + f"\n\n## per seed\n\n{seed_tables}\n")
    (out / "quality.md").write_text(text)
    (out / "quality.json").write_text(json.dumps({
        "seeds": args.seeds, "args": vars(args), "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        "timings_s": timings,
        "rows": [{"seed": seed, "variant": label, **{k: finite(m.get(k)) for k in keys}}
                 for seed, rows in per_seed.items() for label, m in rows],
        "negatives": {label: [{k: finite(s.get(k)) for k in negative_keys} for s in stats] for label, stats in negatives.items()},
    }, indent=2))
    print(text)


if __name__ == "__main__":
    main()
