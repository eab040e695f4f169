"""Training throughput of the SFT and DPO phases: DeepSpeed ZeRO-2 vs ZeRO-3 vs plain torch DDP, one run.

Each (phase, backend) is a real one-stage `run_fit` (Ray Train) on the same rows and settings.
Tokens are all non-pad tokens fed forward (prompt + response, all 1+K sequences of a DPO row), summed
over workers, over the steps after the first (start-up excluded):
  compute tokens/s = tokens / time inside optimizer steps (forward, backward, update, all-reduces);
  wall tokens/s    = tokens / wall time of the step loop (adds reports to Ray Train, logging, I/O);
  fixed_s          = fit wall time outside the step loop and the DPO reference pass (worker group
                     start-up, model load, engine init, data, final checkpoint and adapter export).

    .venv/bin/python benchmarks/train_throughput.py                      # tiny model, CPU, 2 workers
                                                  # -> benchmarks/results/train_throughput_cpu.json (_gpu on CUDA)
    .venv/bin/python benchmarks/train_throughput.py --model 0.5b --workers 1 --dtype bfloat16   # GPU
    .venv/bin/python benchmarks/train_throughput.py --prefix-sharing   # SmolLM2, Goodreads prompts

`--prefix-sharing` times DPO (K = 1) and S-DPO (K = 3) fits with prefix-shared and separate rows
side by side (`--repeats 2` runs them in ABBA order and averages) on SmolLM2 with the default config's Goodreads prompts (train/shared_prefix.py): step
time, reference-pass time, tokens computed, and shared / unshared ratios, into
benchmarks/results/prefix_sharing.json, with the machine's fp32 matmul peak measured in the same run.
`--sft-layouts` times SmolLM2 SFT with two workers of one core against one worker on both cores, in
fp32 and under bf16 autocast (results/sft_layouts.json): tokens/s as a share of the fp32 and the bf16
matmul peak (fp32: measured right before and after each fit), each fit's fixed cost, checkpoint size.

`--model 0.5b` builds a random-init Llama with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads,
2 KV heads, MLP 4864, vocab 151936, tied embeddings: ~494M parameters). MFU is only printed on CUDA:
6 * N * tokens/s / peak, N = non-embedding parameters. With LoRA the backward pass skips weight
gradients of the frozen base, so the real work is nearer 4 * N per token: 6N overstates MFU by ~1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from sprec_ray.config import load_config
from sprec_ray.data.prepared import prepare_dataset
from sprec_ray.data.prompts import render_prompt, render_response
from sprec_ray.data.synthetic import write_synthetic_sprec
from sprec_ray.manifest import machine_name
from sprec_ray.models.base import build_tiny_model
from sprec_ray.runtime import init_ray
from sprec_ray.train.phases import PhaseResult, Stage, run_fit

BACKENDS = {"ddp": 0, "zero2": 2, "zero3": 3}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense bf16


def build_model(kind: str, cache: Path, texts: list[str]) -> Path:
    tiny = build_tiny_model(cache / "tiny", texts)
    if kind == "tiny":
        return tiny
    out = cache / "llama-0.5b-random"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def param_counts(model_dir: Path) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) of the base model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def fresh_adapter(model_dir: Path, out: Path) -> Path:
    """An untrained LoRA to start DPO from (the phase only needs *an* SFT adapter to time)."""
    from sprec_ray.config import LoraConfig
    from sprec_ray.train.engine import build_policy

    build_policy(model_dir, LoraConfig(), None, "float32", seed=0).save_pretrained(str(out))
    return out


def fit(cfg, phase: str, model_dir: Path, dataset, out_dir: Path, init_adapter: Path | None) -> PhaseResult:
    """One stage through the product's `run_fit`; DPO starts from (and is referenced to) `init_adapter`."""
    return run_fit(cfg, model_dir, [Stage(phase, out_dir.name, dataset, out_dir)], init_adapter, out_dir.name)[out_dir.name]


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    args = _arguments()
    if args.prefix_sharing or args.sft_layouts:
        (prefix_sharing if args.prefix_sharing else sft_layouts)(args)
    else:
        step_loop(args)


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=96, help="training rows (SFT and DPO each)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per fit")
    ap.add_argument("--repeats", type=int, default=1, help="sweeps over all configs; the best tokens/s is kept "
                    "(robust to other load on a shared machine); with --prefix-sharing, fits per layout in ABBA order, averaged")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--backends", default="ddp,zero2,zero3")
    ap.add_argument("--phases", default="sft,dpo")
    ap.add_argument("--log-every", default="1,10", help="train.log_every values: 1 = a Ray Train report (a barrier) "
                    "every step, as before; compared side by side")
    ap.add_argument("--max-tokens", type=int, default=0, help="train.max_tokens_per_batch (0 = --batch-size rows)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default="", help="default: benchmarks/results/train_throughput_{cpu,gpu}.json")
    ap.add_argument("--prefix-sharing", action="store_true", help="shared vs separate preference rows (see above)")
    ap.add_argument("--sft-layouts", action="store_true", help="SmolLM2 SFT: worker layouts vs the matmul peak (see above)")
    ap.add_argument("--mixed-precision", choices=["none", "bf16", "auto"], default="auto",
                    help="with --prefix-sharing: train.mixed_precision (the default config's auto is bf16 on AMX CPUs)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="with --prefix-sharing: a config override for every fit (repeatable)")
    ap.add_argument("--layouts", type=int, nargs="*", help="with --sft-layouts: only these rows of SFT_LAYOUTS (0 = the default)")
    return ap.parse_args()


def step_loop(args: argparse.Namespace) -> None:
    """The default mode: one fit per (phase, backend, log_every), the best of --repeats sweeps kept."""
    import torch

    use_gpu = torch.cuda.is_available()
    out_path = Path(args.out or Path(__file__).parent / "results" / f"train_throughput_{'gpu' if use_gpu else 'cpu'}.json")
    work = (Path("bench_out") / "train_throughput_work").resolve()  # Ray Train workers run in another cwd
    data_dir = write_synthetic_sprec(work / "data", num_items=200, num_users=max(200, args.rows * 2), seed=0)
    data = prepare_dataset(load_config(None, [f"data.path={data_dir}"]).data, work / "prepared", work / "scratch")
    titles = data.catalogue.titles
    model_dir = build_model(args.model, work / "models",
                            [render_prompt(titles[i:i + 10]) + render_response(titles[i]) for i in range(0, len(titles), 2)])
    n_all, n_nonembed = param_counts(model_dir)
    examples = data.head("train", args.rows)
    rows = [{"row_id": e.row_id, "prompt": render_prompt([titles[i] for i in e.history]),
             "response": render_response(titles[e.target]),
             "rejected": [render_response(titles[(e.target + 1) % len(titles)])]} for e in examples]
    init_ray(num_cpus=max(4, args.workers * 2))
    peak = peak_flops()
    start_adapter = fresh_adapter(model_dir, work / "adapters" / "start")
    runs = _timed_fits(args, model_dir, rows, start_adapter, work, use_gpu)
    results = _best_per_config(runs, n_nonembed, peak)
    device = torch.cuda.get_device_name(0) if use_gpu else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads in driver)"
    from provenance import provenance

    report = {**provenance(), "model": args.model, "params": n_all, "non_embedding_params": n_nonembed, "device": device,
              "workers": args.workers, "dtype": args.dtype, "rows": len(rows), "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "max_tokens_per_batch": args.max_tokens, "steps": args.steps,
              "repeats": args.repeats, "results": results}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(f"\n{args.model} ({n_all / 1e6:.1f}M params), {args.workers} workers, {device}, {args.dtype}\n")
    print("| phase | backend | log_every | compute tokens/s | loop wall tokens/s | wall / compute | vs DDP (wall) | fit s | fixed s | MFU (6N) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mfu = f"{100 * r['mfu_6n']:.1f}%" if r["mfu_6n"] is not None else "n/a (CPU)"
        ratio = f"{r['vs_ddp']:.2f}x" if r["vs_ddp"] else "-"
        print(f"| {r['phase']} | {r['backend']} | {r['log_every']} | {r['compute_tokens_per_s']:,.0f} | {r['wall_tokens_per_s']:,.0f} | "
              f"{r['loop_wall_over_compute']:.2f} | {ratio} | {r['fit_s']:.1f} | {r['fixed_s']:.1f} | {mfu} |")
    shutil.rmtree(work / "runs", ignore_errors=True)  # Ray Train run dirs and checkpoints of the timed fits
    print(f"\nwrote {out_path}")


def _timed_fits(args: argparse.Namespace, model_dir: Path, rows: list[dict], start_adapter: Path, work: Path,
                use_gpu: bool) -> dict[tuple[str, str, int], list[dict]]:
    """Every sweep's fits, timed: (phase, backend, log_every) -> one record per sweep."""
    import ray.data

    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for repeat, phase, backend, every in ((r, p, b, e) for r in range(args.repeats) for p in args.phases.split(",")
                                          for b in args.backends.split(",") for e in args.log_every.split(",")):
        section = "sft" if phase == "sft" else "dpo"
        cfg = load_config(None, [
            f"output_dir={work}/runs", f"model.dtype={args.dtype}", f"train.zero_stage={BACKENDS[backend]}",
            f"train.num_workers={args.workers}", f"train.use_gpu={str(use_gpu).lower()}",
            f"train.cpus_per_worker={1 if use_gpu else 0.5}", "train.checkpoint_every=1000",
            f"{section}.batch_size={args.batch_size}", f"{section}.grad_accum={args.grad_accum}",
            f"{section}.max_steps={args.steps}", f"{section}.epochs=1000", f"{section}.lr=0.0001",
            f"{section}.warmup_steps=0", "model.max_response_len=64", f"train.log_every={every}",
            f"train.max_tokens_per_batch={args.max_tokens}",
            f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"])
        name = f"bench-{phase}-{backend}-{every}-{stamp}-{repeat}"
        ds = ray.data.from_items(rows)
        load = os.getloadavg()[0]  # other processes on a shared box skew CPU numbers; recorded per fit
        start = time.perf_counter()
        if phase == "sft":
            res = fit(cfg, "sft", model_dir, ds, work / "adapters" / name, None)
        else:
            res = fit(cfg, "dpo", model_dir, ds, work / "adapters" / name, start_adapter)
        fit_s = time.perf_counter() - start
        m = res.metrics
        tps, wall = m["tokens_per_s"], m["wall_tokens_per_s"]
        fixed = fit_s - m["loop_s"] - m.get("reference_s", 0.0)
        runs.setdefault((phase, backend, int(every)), []).append({
            "compute_tokens_per_s": tps, "wall_tokens_per_s": wall, "loop_wall_over_compute": wall / tps,
            "fit_s": fit_s, "loop_s": m["loop_s"], "compute_s": m["compute_s"], "reference_s": m.get("reference_s", 0.0),
            "fixed_s": fixed, "steps": m["steps"], "load_average_1m": load})
        print(f"{phase} {backend} log_every={every} (sweep {repeat + 1}/{args.repeats}): compute {tps:,.0f} tokens/s, loop wall "
              f"{wall:,.0f} tokens/s ({wall / tps:.2f}), fit {fit_s:.1f} s, fixed {fixed:.1f} s", flush=True)
    return runs


def _best_per_config(runs: dict[tuple[str, str, int], list[dict]], n_nonembed: int, peak: float | None) -> list[dict]:
    """The best sweep of each config, its MFU against the peak, and its wall tokens/s against DDP's."""
    results = []
    for (phase, backend, every), tries in runs.items():
        best = max(tries, key=lambda t: t["wall_tokens_per_s"])
        results.append({"phase": phase, "backend": backend, "log_every": every, **best,
                        "all_wall_tokens_per_s": [t["wall_tokens_per_s"] for t in tries],
                        "mfu_6n": 6 * n_nonembed * best["compute_tokens_per_s"] / peak if peak else None})
    for r in results:
        base = next((x["wall_tokens_per_s"] for x in results
                     if (x["phase"], x["backend"], x["log_every"]) == (r["phase"], "ddp", r["log_every"])), None)
        r["vs_ddp"] = r["wall_tokens_per_s"] / base if base else None
    return results


def _step_s(result) -> float:
    """Mean optimizer-step time after the first step (warm-up)."""
    from ray.train import Checkpoint

    from sprec_ray.train.checkpointing import read_state

    history = read_state(Checkpoint(result.checkpoint_path)).history
    timed = history[1:] or history
    return sum(h["step_time_s"] for h in timed) / len(timed)


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def smollm2_goodreads(work: Path, n: int) -> tuple[Path, list[dict], dict[int, float], str]:
    """SmolLM2, n Goodreads train rows rendered as the default config renders them (3 random rejected
    titles each), the fp32 matmul peak on 1 and 2 threads, and the machine's name."""
    import random

    from generate_throughput import matmul_peak

    from sprec_ray.config import DataConfig
    from sprec_ray.models.base import resolve_base_model

    max_history = load_config(DEFAULT_CONFIG).data.max_history
    data = prepare_dataset(DataConfig(path="bundled"), work / "prepared", work / "scratch")
    titles = data.catalogue.titles
    model_dir = resolve_base_model("smollm2", Path("bench_out") / "models").resolve()
    rng = random.Random(0)
    rows = [{"row_id": e.row_id, "prompt": render_prompt([titles[i] for i in e.history]), "response": render_response(titles[e.target]),
             "rejected": [render_response(titles[rng.randrange(len(titles))]) for _ in range(3)]}
            for e in (x.last(max_history) for x in data.head("train", n))]
    peak = {t: matmul_peak(t, "float32") for t in (1, 2)}
    return model_dir, rows, peak, machine_name()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def prefix_sharing(args: argparse.Namespace) -> None:
    import statistics

    import ray.data


    work = Path("bench_out") / "prefix_sharing_work"
    model_dir, rows, peak, machine = smollm2_goodreads(work, args.rows)
    init_ray(num_cpus=4)
    start_adapter = fresh_adapter(model_dir, work / "start")
    fits = []
    for loss, k in (("dpo", 1), ("sdpo", 3)):
        pairs = [{**r, "rejected": r["rejected"][:k]} for r in rows]
        # ABBA order over repeats: a drift in machine speed (tens of percent within an hour here)
        # then lands on both layouts alike instead of on whichever ran second.
        for repeat in range(args.repeats):
            for layout in ("shared", "unshared") if repeat % 2 == 0 else ("unshared", "shared"):
                cfg = load_config(DEFAULT_CONFIG, [
                    f"output_dir={work}/runs", f"dpo.loss={loss}", f"dpo.num_negatives={k}", f"dpo.max_steps={args.steps}",
                    "dpo.epochs=1000", "train.checkpoint_every=1000", f"train.prefix_sharing={'on' if layout == 'shared' else 'off'}",
                    f"train.mixed_precision={args.mixed_precision}", *args.override])
                name = f"prefix-{loss}-{layout}-{time.strftime('%H%M%S')}"
                res = fit(cfg, "dpo", model_dir, ray.data.from_items(pairs), work / "adapters" / name, start_adapter)
                m, step_s = res.metrics, _step_s(res)
                fits.append({"loss": loss, "k": k, "layout": layout, "repeat": repeat, "step_s": step_s,
                             "reference_s": m["reference_s"], "tokens_per_step": m["tokens_per_s"] * step_s, "fit_s": m["fit_s"],
                             "fixed_s": m["fit_s"] - m["loop_s"] - m["reference_s"], "load_average_1m": os.getloadavg()[0]})
                print(f"{loss} K={k} {layout} ({repeat + 1}/{args.repeats}): step {step_s:.2f} s, reference pass "
                      f"{m['reference_s']:.1f} s, {fits[-1]['tokens_per_step']:,.0f} tokens/step", flush=True)
    results = []
    for loss, k in (("dpo", 1), ("sdpo", 3)):
        for layout in ("shared", "unshared"):
            mine = [f for f in fits if f["loss"] == loss and f["layout"] == layout]
            means = {key: statistics.mean(f[key] for f in mine) for key in ("step_s", "reference_s", "tokens_per_step")}
            results.append({"loss": loss, "k": k, "layout": layout, "fits": len(mine), **means})
    for r in results:
        other = next(x for x in results if x["loss"] == r["loss"] and x["layout"] == "unshared")
        for key in ("step", "reference", "tokens"):
            name = "tokens_per_step" if key == "tokens" else f"{key}_s"
            r[f"{key}_ratio"] = r[name] / other[name]
    table = [f"| {r['loss']} | {r['k']} | {r['layout']} | {r['step_s']:.2f} | {r['reference_s']:.1f} | "
             f"{r['tokens_per_step']:,.0f} | {r['step_ratio']:.2f} | {r['reference_ratio']:.2f} |" for r in results]
    dpo = load_config(DEFAULT_CONFIG, args.override).dpo
    _finish(args, work, "prefix_sharing.json", machine, peak, {
        "config": f"configs/default.yaml, dpo.batch_size {dpo.batch_size} x grad_accum {dpo.grad_accum} per worker, "
                  f"overrides {args.override}", "mixed_precision": args.mixed_precision, "rows": len(rows),
        "steps": args.steps, "repeats": args.repeats, "results": results, "fits": fits},
        f"| loss | K | layout | step s (mean of {args.repeats}) | reference pass s | tokens/step | step ratio | reference ratio |",
        table)


def _finish(args: argparse.Namespace, work: Path, name: str, machine: str, peak: dict[int, float], report: dict,
            header: str, table: list[str]) -> None:
    """Write the JSON (with the machine and its peak), print the Markdown table, drop the timed runs."""
    from provenance import provenance

    report = {**provenance(peak_gflops={t: v / 1e9 for t, v in peak.items()}), "model": "SmolLM2-135M-Instruct",
              "matmul_peak_gflops_fp32": {str(t): v / 1e9 for t, v in peak.items()}, **report}
    out = Path(args.out or Path(__file__).parent / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nSmolLM2 on {machine}; fp32 matmul peak {peak[1] / 1e9:.0f} GFLOP/s (1 thread), {peak[2] / 1e9:.0f} (2)\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(table))
    shutil.rmtree(work / "runs", ignore_errors=True)
    print(f"\nwrote {out}")


SFT_LAYOUTS = {  # name -> overrides of configs/default.yaml (whose mixed_precision is auto: bf16 on AMX CPUs)
    "2 workers x 1 core, ZeRO-2": ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.zero_stage=2",
                                   "train.mixed_precision=none"],
    "1 worker x 2 cores, ZeRO-2": ["train.num_workers=1", "train.cpus_per_worker=2", "train.zero_stage=2",
                                   "train.mixed_precision=none"],
    "1 worker x 2 cores, torch": ["train.num_workers=1", "train.cpus_per_worker=2", "train.zero_stage=0",
                                  "train.mixed_precision=none"],
    "2 workers x 1 core, ZeRO-2, bf16 autocast": ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.zero_stage=2",
                                                  "train.mixed_precision=bf16"],
    "1 worker x 2 cores, torch, bf16 autocast": ["train.num_workers=1", "train.cpus_per_worker=2", "train.zero_stage=0",
                                                 "train.mixed_precision=bf16"],
    "2 workers x 1 core, ZeRO-2, bf16 autocast, micro-batch 8 x 1": [
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.zero_stage=2", "train.mixed_precision=bf16",
        "sft.batch_size=8", "sft.grad_accum=1"],
}


FIXED_PARTS = {  # a fit's fixed cost, in the order it is paid (sprec_ray/train/phases.py, loop.py)
    "handoff_s": "rows to the object store s", "start_s": "worker group start-up s", "setup_s": "imports, model, engine s", "data_s": "data shard s",
    "prepare_s": "stage prepare s", "end_s": "final checkpoint, shutdown s", "export_s": "adapter export s",
}


def sft_layouts(args: argparse.Namespace) -> None:
    """SFT on SmolLM2 with the default prompts: worker layouts side by side, as a share of the fp32
    matmul peak (4 x non-embedding weights x tokens/s: LoRA's forward plus the backward through the
    frozen weights), the fixed cost of each fit, and the size of its final checkpoint."""
    import ray.data


    work = Path("bench_out") / "sft_layouts_work"
    model_dir, rows, peak, machine = smollm2_goodreads(work, args.rows)
    _, n_nonembed = param_counts(model_dir)
    from generate_throughput import matmul_peak

    peak_bf16 = matmul_peak(2, "bfloat16")  # AMX / AVX512-BF16 CPUs run bf16 matmuls several times faster
    init_ray(num_cpus=4)
    results = []
    chosen = [list(SFT_LAYOUTS)[i] for i in args.layouts] if args.layouts else list(SFT_LAYOUTS)
    sft_rows = [{k: r[k] for k in ("row_id", "prompt", "response")} for r in rows]
    for layout in chosen:
        overrides = SFT_LAYOUTS[layout]
        cfg = load_config(DEFAULT_CONFIG, [f"output_dir={work}/runs", f"sft.max_steps={args.steps}", "sft.epochs=1000",
                                           "train.checkpoint_every=1000", *overrides])
        name = f"sft-{len(results)}-{time.strftime('%H%M%S')}"
        # This machine's peak drifts by tens of percent within minutes: each fit is set against the mean
        # of the peaks measured right before and right after it.
        peak_before = matmul_peak(2, "float32")
        res = fit(cfg, "sft", model_dir, ray.data.from_items(sft_rows), work / "adapters" / name, None)
        fit_peaks = [peak_before, matmul_peak(2, "float32")]
        m = res.metrics
        tps = m["tokens_per_s"]
        results.append({"layout": layout, "overrides": overrides, "tokens_per_s": tps,
                        "fit_peak_gflops_fp32_2_threads": [p / 1e9 for p in fit_peaks],
                        "peak_share": 4 * n_nonembed * tps / (sum(fit_peaks) / 2),
                        "peak_share_bf16": 4 * n_nonembed * tps / peak_bf16,
                        "fit_s": m["fit_s"],
                        "fixed_s": m["fit_s"] - m["loop_s"] + m["export_s"],
                        **{k: m.get(k, 0.0) for k in FIXED_PARTS},
                        "checkpoint_mb": _dir_bytes(Path(res.checkpoint_path)) / 1e6,
                        "adapter_mb": (res.adapter_dir / "adapter_model.safetensors").stat().st_size / 1e6,
                        "load_average_1m": os.getloadavg()[0]})
        r = results[-1]
        print(f"{layout}: {tps:,.0f} tokens/s = {100 * r['peak_share']:.0f}% of the 2-thread peak around the fit "
              f"({' / '.join(f'{p:.0f}' for p in r['fit_peak_gflops_fp32_2_threads'])} GFLOP/s), fit {r['fit_s']:.1f} s, "
              f"fixed {r['fixed_s']:.1f} s, checkpoint {r['checkpoint_mb']:.1f} MB", flush=True)
    table = [f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {100 * r['peak_share']:.0f}% | {100 * r['peak_share_bf16']:.0f}% | {r['fit_s']:.1f} | "
             f"{r['fixed_s']:.1f} | {r['checkpoint_mb']:.1f} | {r['adapter_mb']:.1f} |" for r in results]
    _finish(args, work, "sft_layouts.json", machine, peak, {
        "non_embedding_params": n_nonembed, "config": "configs/default.yaml (sft.batch_size 4 x grad_accum 2)",
        "matmul_peak_gflops_bf16_2_threads": peak_bf16 / 1e9,
        "rows": len(rows), "steps": args.steps, "results": results},
        "| layout | tokens/s | share of fp32 peak around the fit | share of bf16 peak | fit s | fixed s | checkpoint MB | adapter MB |", table)
    print("\n| layout | fixed s | " + " | ".join(FIXED_PARTS.values()) + " | other s |")
    print("|" + "---|" * (len(FIXED_PARTS) + 3))
    for r in results:
        other = r["fixed_s"] - sum(r[k] for k in FIXED_PARTS)
        print(f"| {r['layout']} | {r['fixed_s']:.1f} | " + " | ".join(f"{r[k]:.1f}" for k in FIXED_PARTS) + f" | {other:.1f} |")


if __name__ == "__main__":
    main()
