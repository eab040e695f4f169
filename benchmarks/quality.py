"""Does self-play debias? SFT vs SFT+DPO(random) vs SPRec rounds vs SPRec+S-DPO on real data.

All variants share one warm-start SFT adapter (selfplay.init_adapter), so the comparison isolates
the preference step. Writes a Markdown table, JSON and a plot to --out.

    python benchmarks/quality.py                                   # Goodreads sample, SmolLM2, CPU
    # the table in benchmarks/RESULTS.md (~1.8 h on 2 CPU cores):
    python benchmarks/quality.py --train 512 --round-rows 64 --valid 100 --rounds 3 data.max_history=5 sft.epochs=2
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("NDCG@5", "HR@5", "DivRatio@5", "ORRatio@5", "MGU@5", "DGU@5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="bundled", help="SPRec-format dir (default: the shipped data/goodreads sample)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train", type=int, default=256, help="rows for the warm-start SFT")
    parser.add_argument("--round-rows", type=int, default=64, help="rows sampled per self-play round")
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sdpo-rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench_out" / "quality"))
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every variant")
    args = parser.parse_args()

    from sprec_ray.config import load_config
    from sprec_ray.report import metrics_table, plot_rounds
    from sprec_ray.selfplay import run_selfplay

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"data.path={args.data}", f"model.name={args.model}", f"data.train_samples={args.train}",
              f"data.valid_samples={args.valid}", f"selfplay.round_samples={args.round_rows}", f"seed={args.seed}",
              *args.overrides]
    variants = [
        ("sft", ["selfplay.rounds=0"]),
        ("dpo_random", ["selfplay.method=dpo_random", "selfplay.rounds=1"]),
        ("sprec", [f"selfplay.rounds={args.rounds}"]),
        ("sprec_sdpo", [f"selfplay.rounds={args.sdpo_rounds}", "dpo.loss=sdpo", "dpo.num_negatives=3",
                        "generation.decoding=sample", "generation.n=3"]),
    ]
    rows: list[tuple[str, dict[str, float]]] = []
    timings: dict[str, float] = {}
    warm_start = ""
    for name, extra in variants:
        run_dir = out / name
        overrides = [*common, f"output_dir={run_dir}", f"name={name}", *extra]
        if warm_start:
            overrides.append(f"selfplay.init_adapter={warm_start}")
        results = run_selfplay(load_config(REPO / "configs" / "default.yaml", overrides), resume=run_dir.exists())
        # from the manifests, so a resumed variant reports the time its phases took, not the resume
        timings[name] = sum(json.loads(m.read_text())["seconds"] for m in (run_dir / "manifests").glob("*.json"))
        if name == "sft":
            warm_start = json.loads((run_dir / "final.json").read_text())["adapter"]
            rows.append(("SFT only", results[0][1]))
        else:
            rows += [(f"{name} {label}", m) for label, m in results[1:]]

    table = metrics_table(rows, 5)
    plot_rounds(rows, 5, out / "quality_at5.png")
    header = (f"seed {args.seed}; model {args.model}; warm-start SFT on {args.train} rows, {args.round_rows} rows per "
              f"round, {args.valid} validation rows; {platform.machine()} CPU x{__import__('os').cpu_count()}; "
              f"run time {sum(timings.values()) / 60:.1f} min")
    (out / "quality.md").write_text(f"{header}\n\n{table}\n")
    (out / "quality.json").write_text(json.dumps({"args": vars(args), "timings_s": timings,
                                                  "rows": [{"variant": k, **{m: v.get(m) for m in KEYS}} for k, v in rows]},
                                                 indent=2))
    print(header)
    print(table)


if __name__ == "__main__":
    main()
