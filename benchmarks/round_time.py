"""Wall time of one self-play round split by phase, and how much of it is orchestration.

A round is one generation pass (evaluate the previous adapter + this round's negatives, one adapter
switch) and one training fit (SFT then DPO in one worker group). Runs the real driver (warm-start SFT
+ 1 round) and reads the per-phase manifests:
  generation (vLLM pool), SFT compute, DPO compute, evaluation, and orchestration overhead =
  actor start-up + adapter hand-off + (training phase wall - step compute - DPO reference pass:
  Ray Train worker start-up, DeepSpeed init, checkpoint I/O) + Ray Data prompt building.

    python benchmarks/round_time.py                      # tiny model, CPU
    python benchmarks/round_time.py --model smollm2      # SmolLM2-135M on CPU
    python benchmarks/round_time.py --gpu                # on a GPU node (Ray Train + vLLM on GPU)
    python benchmarks/round_time.py --run-dir bench_out/quality/sprec --round 2   # an existing run

Writes benchmarks/results/round_time.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_or_read(args: argparse.Namespace) -> tuple[Path, int, float | None]:
    """The run to split and its round: --run-dir's, or a one-round run started here (then also its
    whole wall time, warm start included)."""
    from sprec_ray.config import load_config

    total: float | None = None
    if args.run_dir:
        run_dir, r = Path(args.run_dir), args.round
        run_cfg = load_config(run_dir / "config.yaml")
        args.model, args.backend = run_cfg.model.name, run_cfg.generation.backend
    else:
        from sprec_ray.selfplay import run_selfplay

        run_dir, r = REPO / "bench_out" / f"round_time_{Path(args.model).name}", 1
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"output_dir={run_dir}", f"model.name={args.model}", f"generation.backend={args.backend}",
                     f"data.train_samples={args.rows}", f"data.valid_samples={args.valid}", "selfplay.rounds=1",
                     f"selfplay.round_samples={args.rows}", "eval.embedder=hash"]
        if args.model == "tiny":  # greedy, the random tiny model writes no title: sampled text gives DPO pairs
            overrides += ["generation.decoding=sample", "generation.temperature=2.0"]
        if args.gpu:
            overrides += ["train.use_gpu=true", "generation.gpus_per_actor=1", "model.dtype=bfloat16"]
        started = time.perf_counter()
        run_selfplay(load_config(REPO / "configs" / "tiny.yaml", overrides))
        total = time.perf_counter() - started
    return run_dir, r, total


def split_round(run_dir: Path, r: int) -> tuple[dict[str, float], float, float, float | None]:
    """Round r's seconds by part (from its phase manifests), the round's total, the generation
    pool's start-up and the round's DPO pairs."""

    def manifest(phase: str) -> dict:
        return json.loads((run_dir / "manifests" / f"{phase}.json").read_text())

    gen, sft, dpo, ev = (manifest(f"r{r}_{p}") for p in ("negatives", "sft", "dpo", "eval"))
    startup = manifest("r0_eval")["metrics"]["actor_startup_s"]  # the pool starts once per run (keep_alive)
    rows = {
        "generation (vLLM pool, train prompts)": gen["metrics"]["generate_s"],
        "negatives: grounding + building": gen["seconds"] - gen["metrics"]["generate_s"] - gen["metrics"]["adapter_switch_s"],
        "SFT compute (optimizer steps)": sft["metrics"]["compute_s"],
        "DPO compute (optimizer steps)": dpo["metrics"].get("compute_s", 0.0),
        "DPO reference pass (no-grad log-probs)": dpo["metrics"].get("reference_s", 0.0),
        "evaluation (generate + ground + metrics)": ev["seconds"] - ev["metrics"]["adapter_switch_s"],
        "overhead: adapter hand-off (switch + probe)": gen["metrics"]["adapter_switch_s"] + ev["metrics"]["adapter_switch_s"],
        "overhead: Ray Train start-up, data prep, model load, checkpoint I/O":
            sft["seconds"] - sft["metrics"]["compute_s"] + dpo["seconds"] - dpo["metrics"].get("compute_s", 0.0)
            - dpo["metrics"].get("reference_s", 0.0),
    }
    return rows, sum(m["seconds"] for m in (gen, sft, dpo, ev)), startup, dpo["metrics"].get("pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a local HF checkpoint dir")
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--rows", type=int, default=64, help="train rows in the round")
    parser.add_argument("--valid", type=int, default=32)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--run-dir", help="read the manifests of this finished run instead of running one")
    parser.add_argument("--round", type=int, default=1, help="which round of --run-dir to split")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "round_time.json"))
    args = parser.parse_args()

    run_dir, r, total = _run_or_read(args)
    rows, round_s, startup, pairs = split_round(run_dir, r)
    overhead = sum(v for k, v in rows.items() if k.startswith("overhead"))
    print(f"\nSelf-play round {r} of {run_dir.name}, model={args.model}, backend={args.backend}, {args.rows} train rows, "
          f"{args.valid} valid rows ({platform.machine()}, {'GPU' if args.gpu else 'CPU'})\n")
    print("| part | seconds | share of round |\n|---|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} | {seconds / round_s:.0%} |")
    print(f"| **round total** | {round_s:.1f} | 100% |")
    print(f"\norchestration overhead: {overhead:.1f}s = {overhead / round_s:.0%} of the round; "
          f"vLLM actor start-up (once per run): {startup:.1f}s"
          + (f"; whole run incl. warm start: {total:.1f}s" if total is not None else ""))
    if pairs == 0:
        print("note: this round had no DPO pairs (every self-play prediction dropped), so no DPO stage ran")
    from provenance import provenance

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance(), "model": args.model, "backend": args.backend, "rows": args.rows, "gpu": args.gpu,
                               "parts_s": rows, "round_s": round_s, "overhead_s": overhead,
                               "overhead_share": overhead / round_s, "actor_startup_s": startup,
                               "run_total_s": total}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
