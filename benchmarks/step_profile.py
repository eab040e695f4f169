"""Where a training micro-batch's compute goes, in one process without Ray.

SmolLM2 with LoRA on the default config's Goodreads rows, through the training loop's own objectives
and a single-process engine, on one worker's share of the machine (1 thread, the default config's
precision). Cases: SFT with the project's LoRA dropout and with torch's, and DPO (K = 1) and S-DPO
(K = 3) with prefix-shared and separate rows; "ratio" is against torch's dropout and separate rows.

    .venv/bin/python benchmarks/step_profile.py --repeats 5

`train_throughput.py --prefix-sharing` times whole Ray Train fits, which also carry all-reduces,
Ray's own processes and a machine whose speed drifts between fits minutes apart. Here the cases take
turns on the same rows within one process, so drift hits each alike and the ratios are those of the
model's compute. Per case: a micro-batch's forward + backward (mean over repeats after the first),
the (S-)DPO reference pass over --rows rows (twice, ABBA), tokens computed, the SFT share of the fp32 matmul peak
(4 x non-embedding weights x tokens/s), and the ops that take the most self CPU time (torch.profiler).
Writes benchmarks/results/step_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from train_throughput import DEFAULT_CONFIG, param_counts, smollm2_goodreads
from transformers import AutoTokenizer

from sprec_ray.config import load_config
from sprec_ray.models.precision import store_frozen_linears
from sprec_ray.train.batching import Encoder, encode_pair_batch, encode_sft_batch
from sprec_ray.train.engine import build_engine, set_lora_dropout
from sprec_ray.train.objectives import PreferenceObjective, SFTObjective

# "torch dropout": SFT with torch's nn.Dropout as the LoRA dropout (one random number per element), as before
# `sprec_ray/train/dropout.py`; it takes turns with "-" on the same rows.
CASES = [("sft", 0, "-"), ("sft", 0, "torch dropout"), ("dpo", 1, "shared"), ("dpo", 1, "unshared"), ("sdpo", 3, "shared"), ("sdpo", 3, "unshared")]


def _columns(rows: list[dict], k: int) -> dict[str, list]:
    return {"row_id": [r["row_id"] for r in rows], "prompt": [r["prompt"] for r in rows],
            "response": [r["response"] for r in rows], "rejected": [r["rejected"][:k] for r in rows]}


def _top_ops(objective: Any, engine: Any, idx: list[int], n: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, _, _ = objective.loss(engine, idx)
        engine.backward(loss)
    engine.optimizer.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:n]]


def _set_dropout(model: torch.nn.Module, p: float, layout: str) -> None:
    set_lora_dropout(model, p)
    if layout == "torch dropout":
        for module in model.modules():
            if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
                for key in list(module.lora_dropout.keys()):
                    module.lora_dropout[key] = torch.nn.Dropout(p)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16, help="rows per case (a worker's share of the 32-row fit benchmark)")
    ap.add_argument("--repeats", type=int, default=5, help="micro-batches per case, taken in turn; the first is warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the default config gives each worker one core)")
    ap.add_argument("--top", type=int, default=6, help="ops listed per case")
    ap.add_argument("--frozen-fp32", action="store_true", help="keep the frozen base weights in fp32 under bf16 autocast "
                    "(as before store_frozen_linears), to compare")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_profile.json"))
    args = ap.parse_args()

    work = Path("bench_out") / "step_profile"
    cfg = load_config(DEFAULT_CONFIG)
    model_dir, rows, peak, machine = smollm2_goodreads(work, max(args.rows, args.repeats * cfg.sft.batch_size))
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    engine = build_engine(model_dir, cfg, None, cfg.dpo.lr, cfg.dpo.batch_size, cfg.dpo.grad_accum, device)
    if args.frozen_fp32:
        store_frozen_linears(engine.peft_model, torch.float32)
    encoder = Encoder(AutoTokenizer.from_pretrained(str(model_dir)), cfg.model.max_prompt_len, cfg.model.max_response_len)
    pad_id = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else encoder.eos

    objectives = {}
    for loss, k, layout in CASES:
        overrides = [f"dpo.loss={loss}", f"dpo.num_negatives={k}", f"train.prefix_sharing={'on' if layout == 'shared' else 'off'}"]
        case_cfg = load_config(DEFAULT_CONFIG, overrides if loss != "sft" else [])
        if loss == "sft":
            objective = SFTObjective(case_cfg, encode_sft_batch(_columns(rows, 0), encoder, False), pad_id, device)
            batch = case_cfg.sft.batch_size
        else:
            pairs = encode_pair_batch(_columns(rows[:args.rows], k), encoder, k)
            objective = PreferenceObjective(case_cfg, pairs, pad_id, device)
            batch = case_cfg.dpo.batch_size
        dropout = case_cfg.lora.dropout if loss == "sft" else case_cfg.dpo.lora_dropout  # as the training loop sets it
        objectives[(loss, layout)] = (objective, batch, dropout)

    times: dict[tuple[str, str], list[float]] = {key: [] for key in objectives}
    tokens: dict[tuple[str, str], list[int]] = {key: [] for key in objectives}
    reference: dict[tuple[str, str], list[float]] = {key: [] for key in objectives if key[0] != "sft"}
    for order in (list(reference), list(reversed(reference))):  # twice, in ABBA order
        for key in order:  # the reference pass over --rows rows, as a worker of the fit benchmark runs it
            start = time.perf_counter()
            objectives[key][0].prepare(engine)
            reference[key].append(time.perf_counter() - start)
    for repeat in range(args.repeats):
        for key, (objective, batch, dropout) in objectives.items():
            _set_dropout(engine.peft_model, dropout, key[1])
            idx = [(repeat * batch + j) % len(objective.rows) for j in range(batch)]
            start = time.perf_counter()
            loss, _, n = objective.loss(engine, idx)
            engine.backward(loss)
            times[key].append(time.perf_counter() - start)
            tokens[key].append(n)
            engine.optimizer.zero_grad(set_to_none=True)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k[0]} {k[1]} {times[k][-1]:.2f}s" for k in objectives), flush=True)

    _, n_nonembed = param_counts(model_dir)
    results = []
    for key, (objective, batch, dropout) in objectives.items():
        _set_dropout(engine.peft_model, dropout, key[1])
        step_s = statistics.mean(times[key][1:])
        tps = statistics.mean(tokens[key][1:]) / step_s
        results.append({"loss": key[0], "layout": key[1], "micro_batch_rows": batch, "fwd_bwd_s": step_s,
                        "tokens": statistics.mean(tokens[key][1:]), "tokens_per_s": tps, "reference_s": statistics.mean(reference[key]) if key in reference else None,
                        "fp32_peak_share": 4 * n_nonembed * tps / peak[args.threads] if args.threads in peak else None,
                        "top_ops": _top_ops(objective, engine, list(range(batch)), args.top)})
    for r in results:
        base = "torch dropout" if r["loss"] == "sft" else "unshared"
        other = next((x for x in results if x["loss"] == r["loss"] and x["layout"] == base), None)
        r["fwd_bwd_ratio"] = r["fwd_bwd_s"] / other["fwd_bwd_s"] if other else None
        r["reference_ratio"] = r["reference_s"] / other["reference_s"] if other and other["reference_s"] else None

    precision = "bf16 autocast" if engine.autocast is not None else cfg.model.dtype
    from provenance import provenance

    report = {**provenance(peak_gflops={t: v / 1e9 for t, v in peak.items()}), "model": "SmolLM2-135M-Instruct",
              "threads": args.threads, "precision": precision,
              "frozen_weights": "fp32" if args.frozen_fp32 or engine.autocast is None else "bf16",
              "matmul_peak_gflops_fp32": {str(t): v / 1e9 for t, v in peak.items()}, "rows": args.rows,
              "repeats": args.repeats, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nSmolLM2 + LoRA on {machine}, {args.threads} thread(s), {precision}; fp32 matmul peak "
          f"{peak[1] / 1e9:.0f} GFLOP/s (1 thread)\n")
    print("| case | layout | rows | tokens | fwd+bwd s | tokens/s | ratio | reference pass s | ratio | fp32 peak share | top ops (self CPU) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        ops = ", ".join(f"{o['op'].removeprefix('aten::')[:28]} {100 * o['share']:.0f}%" for o in r["top_ops"][:4])
        share = "-" if r["fp32_peak_share"] is None else f"{100 * r['fp32_peak_share']:.0f}%"
        print(f"| {r['loss']} | {r['layout']} | {r['micro_batch_rows']} | {r['tokens']:,.0f} | {r['fwd_bwd_s']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {_fmt(r['fwd_bwd_ratio'], '.2f')} | {_fmt(r['reference_s'], '.1f')} | "
              f"{_fmt(r['reference_ratio'], '.2f')} | {share} | {ops} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
