"""Self-play generation throughput, in one run: two earlier transformers paths, in process ("hf-before":
before issue 13, fp32, one thread, unmerged PEFT adapter, batch 64; "hf-unshared": before issue 38,
fp32, all cores, adapter merged, every prompt prefilled whole in left-padded shards), the pool with
`generation.backend=auto` (on CPU: transformers on all cores, the prompts' shared instruction
prefilled once per shard, bf16 autocast where the CPU has native bf16, else fp32 with the adapter
merged) and the pool with vLLM on all cores; plus a matmul peak measured in the same process, so the
FLOP/s each engine reaches can be set against what the cores can do.

Prompts are the default run's: Goodreads sample rows rendered with the shared template (history of
10 titles), the generation settings of configs/default.yaml (greedy, 32 new tokens, shards of 32),
and a random LoRA (r=8, all projections) standing in for the previous round's adapter. Every pool
gets a warm-up round on separate prompts (adapter switch + probe check), then timed rounds.

    .venv/bin/python benchmarks/generate_throughput.py                        # SmolLM2, CPU, ~6 min on 2 cores
    .venv/bin/python benchmarks/generate_throughput.py --model tiny --engines hf vllm --actors 1 2
    .venv/bin/python benchmarks/generate_throughput.py --gpu --engines hf vllm --actors 1 2 4 --num-prompts 4096

Prints a Markdown table and writes benchmarks/results/generate_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

from sprec_ray.config import DataConfig, load_config
from sprec_ray.data.dataset import REPO_ROOT
from sprec_ray.data.prepared import prepare_dataset
from sprec_ray.data.prompts import render_prompt, render_response
from sprec_ray.models.base import resolve_base_model

log = logging.getLogger("generate_throughput")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_prompts(data: str, work: Path) -> tuple[list[str], list[str]]:
    ds = prepare_dataset(DataConfig(path=data), work / "prepared", work / "scratch")
    titles = ds.catalogue.titles
    prompts = [render_prompt([titles[i] for i in e.history]) for e in ds.head("train", ds.counts["train"])]
    corpus = [render_prompt(titles[i:i + 10]) + render_response(titles[i]) for i in range(0, len(titles), 2)]
    return prompts, corpus


def make_adapter(base: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A random LoRA (B != 0) on all projections: the previous round's adapter stand-in."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # small B: changes outputs without turning a real model into noise
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(str(out))
    return out


def matmul_peak(threads: int, dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul on `threads` threads: the ceiling for dense model compute."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, dtype=getattr(torch, dtype))
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(before)


def linear_params(base: Path) -> int:
    """Weights every processed token multiplies through (all Linear layers incl. the LM head)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# The in-process transformers paths a pool actor ran before: threads (None = all cores), adapter
# merged, the argument holding the batch size, and how the table describes it.
EARLIER_PATHS = {"hf-before": (1, False, "hf_batch_size", "hf (fp32, 1 thread, unmerged LoRA)"),
                 "hf-unshared": (None, True, "shard_size", "hf (fp32, all cores, merged LoRA, whole prompts)")}


def run_earlier(engine: str, args: argparse.Namespace, base: Path, adapter: Path | None,
                slices: list[list[str]]) -> dict:
    """hf-before: pre-issue-13, what a pool actor ran with Ray's OMP_NUM_THREADS=1 (batch 64).
    hf-unshared: pre-issue-38, all cores, merged adapter, shards of --shard-size, no shared prefix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import GenerationConfig as HFGenerationConfig

    from sprec_ray.generate.backends import cut_at_stop

    threads, merge, batch_arg, runs_as = EARLIER_PATHS[engine]
    batch = getattr(args, batch_arg)
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
        if merge:
            model = model.merge_and_unload().eval()
    gen = HFGenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, stop_strings=['"\n'])
    rounds, answers = [], []
    for prompts in slices:
        start, new_tokens = time.perf_counter(), 0
        for s in range(0, len(prompts), batch):
            enc = tok(prompts[s:s + batch], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=gen, tokenizer=tok)
            new = out[:, enc["input_ids"].shape[1]:]
            new_tokens += int((new != tok.pad_token_id).sum())
            answers += [cut_at_stop(t.rstrip("\ufffd")) for t in tok.batch_decode(new, skip_special_tokens=True)]
        wall = time.perf_counter() - start
        rounds.append({"wall_s": wall, "prompts": len(prompts), "gen_tokens": new_tokens})
        log.info("  %s: %.2f prompts/s", engine, len(prompts) / wall)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"engine": engine, "resolved": runs_as, "actors": 1, "threads": threads, "shard_size": batch,
            "startup_s": float("nan"), "probe_diff": float("nan"), "rounds": rounds, "answers": answers}


def run_pool(engine: str, actors: int, args: argparse.Namespace, base: Path, adapter: Path | None,
             warm: list[str], slices: list[list[str]]) -> dict:
    from sprec_ray.generate.backends import resolve_backend, resolve_dtype
    from sprec_ray.generate.pool import GenerationPool

    defaults = load_config(REPO_ROOT / "configs" / "default.yaml").generation
    cfg = dataclasses.replace(
        defaults, backend=engine, num_actors=actors, max_new_tokens=args.max_new_tokens, shard_size=args.shard_size,
        gpus_per_actor=1.0 * args.tensor_parallel if args.gpu else 0.0, tensor_parallel=args.tensor_parallel,
        request_timeout_s=1800.0, startup_timeout_s=1800.0)
    resolved = resolve_backend(cfg)
    log.info("start %s (%s) x%d (shard %d)", engine, resolved, actors, cfg.shard_size)
    pool = GenerationPool(cfg, base, max_lora_rank=args.lora_rank, seed=0)
    try:
        pool.generate(warm, adapter, round_id=1)
        warm_stats = pool.last_stats
        rounds, answers = [], []
        for prompts in slices:
            answers += [row[0] for row in pool.generate(prompts, adapter, round_id=1)]
            s = pool.last_stats
            rounds.append({"wall_s": s.wall_s, "prompts": s.prompts, "gen_tokens": s.gen_tokens})
            log.info("  %s x%d: %.2f prompts/s, %.0f tok/s", engine, actors, s.prompts_per_s, s.tokens_per_s)
    finally:
        pool.shutdown()
    dtype = resolve_dtype(cfg.dtype, resolved, args.gpu)
    return {"engine": engine, "resolved": f"{resolved} ({dtype}, all cores)", "actors": actors,
            "shard_size": cfg.shard_size, "startup_s": pool.startup_s, "probe_diff": warm_stats.probe_diff,
            "rounds": rounds, "dtype": dtype, "answers": answers}


def summarise(row: dict, prompt_tokens: dict[int, int], n_linear: int) -> dict:
    rounds = row["rounds"]
    row["prompts_per_s"] = statistics.median(r["prompts"] / r["wall_s"] for r in rounds)
    row["tokens_per_s"] = statistics.median(r["gen_tokens"] / r["wall_s"] for r in rounds)
    # useful FLOPs: every prompt and generated token through every Linear once (padding and
    # attention-score FLOPs not counted, so this is a lower bound on what the engine computed)
    row["gflop_per_s"] = statistics.median(
        2 * n_linear * (prompt_tokens[i] + r["gen_tokens"]) / r["wall_s"] / 1e9 for i, r in enumerate(rounds))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="tiny | smollm2 | a local HF checkpoint dir")
    parser.add_argument("--data", default="data/goodreads", help="SPRec-format dir the prompts come from")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sprec_ray" / "models"))
    parser.add_argument("--engines", nargs="+", default=["hf-before", "hf-unshared", "auto", "vllm"],
                        choices=[*EARLIER_PATHS, "auto", "hf", "vllm"])
    parser.add_argument("--actors", nargs="+", type=int, default=[1])
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts per timed round (a default round: 64)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per config (median reported)")
    parser.add_argument("--warmup-prompts", type=int, default=4, help="untimed round: adapter switch + probe")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="hf-before batch (SPRec's data_generate.py)")
    parser.add_argument("--shard-size", type=int, default=32, help="prompts per pool request (default.yaml)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--no-adapter", action="store_true", help="generate with the base model only")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor (x tensor-parallel)")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "generate_throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = Path(args.out)
    work = REPO_ROOT / "bench_out" / "generate_work"
    work.mkdir(parents=True, exist_ok=True)
    prompts, corpus = build_prompts(args.data, work)
    need = args.num_prompts * args.repeats + args.warmup_prompts
    if len(prompts) < need:
        raise SystemExit(f"only {len(prompts)} prompts available, need {need}")
    base = Path(resolve_base_model(args.model, args.cache_dir, corpus))
    adapter = None if args.no_adapter else make_adapter(base, work / f"adapter-{base.name}-r{args.lora_rank}",
                                                        args.lora_rank)
    warm = prompts[: args.warmup_prompts]
    slices = [prompts[args.warmup_prompts + i * args.num_prompts:][: args.num_prompts] for i in range(args.repeats)]

    import torch
    from transformers import AutoTokenizer

    from sprec_ray.models.precision import has_native_bf16

    tok = AutoTokenizer.from_pretrained(str(base))
    prompt_tokens = {i: sum(len(tok(p)["input_ids"]) for p in s) for i, s in enumerate(slices)}
    n_linear = linear_params(base)
    cores = len(os.sched_getaffinity(0))
    peaks = {"fp32_1_thread": matmul_peak(1, "float32"), "fp32_all_cores": matmul_peak(cores, "float32")}
    if args.gpu or has_native_bf16(torch.device("cpu")):  # emulated bf16 takes minutes and means nothing here
        peaks["bf16_all_cores"] = matmul_peak(cores, "bfloat16")
    log.info("model %s (%.1fM Linear weights), %d prompts x %d rounds (%d prompt tokens), adapter %s; matmul "
             "peak GFLOP/s %s", base, n_linear / 1e6, args.num_prompts, args.repeats, prompt_tokens[0], adapter,
             {k: round(v / 1e9, 1) for k, v in peaks.items()})

    rows = [run_earlier(e, args, base, adapter, slices) for e in args.engines if e in EARLIER_PATHS]
    pool_engines = [e for e in args.engines if e not in EARLIER_PATHS]
    if pool_engines:
        from sprec_ray.runtime import init_ray

        init_ray(num_cpus=max(cores, max(args.actors)) + 1)
        rows += [run_pool(e, a, args, base, adapter, warm, slices) for e in pool_engines for a in args.actors]
    rows = [summarise(r, prompt_tokens, n_linear) for r in rows]
    baseline = rows[0]
    unshared = next((r for r in rows if r["engine"] == "hf-unshared"), None)
    for r in rows:
        r["vs_first"] = r["prompts_per_s"] / baseline["prompts_per_s"]
        if unshared is not None:  # greedy: the same answers are expected from every engine
            r["vs_unshared"] = r["prompts_per_s"] / unshared["prompts_per_s"]
            r["same_answers_as_unshared"] = sum(a == b for a, b in zip(r["answers"], unshared["answers"], strict=True))
        peak = peaks["fp32_1_thread"] if r.get("threads") == 1 else (
            peaks.get("bf16_all_cores") if r.get("dtype") == "bfloat16" else peaks["fp32_all_cores"])
        r["share_of_matmul_peak"] = r["gflop_per_s"] * 1e9 / peak if peak else float("nan")  # no bf16 peak measured

    meta = {"model": str(args.model), "data": args.data, "adapter": bool(adapter), "max_new_tokens": args.max_new_tokens,
            "num_prompts": args.num_prompts, "repeats": args.repeats, "prompt_tokens": prompt_tokens,
            "linear_params": n_linear, "matmul_peak_gflop_s": {k: v / 1e9 for k, v in peaks.items()},
            "gpu": args.gpu, "machine": platform.platform(), "processor": platform.processor(),
            "cores": cores, "torch": torch.__version__, "load_avg_at_end": os.getloadavg()}
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance

    fp32_peaks = {1: peaks["fp32_1_thread"] / 1e9, cores: peaks["fp32_all_cores"] / 1e9}
    out.write_text(json.dumps({**provenance(peak_gflops=fp32_peaks), "meta": meta, "results": rows}, indent=2))
    peak_txt = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    print(f"\n### Generation throughput: {args.model}, {args.num_prompts} prompts x {args.repeats} rounds, greedy, "
          f"max_new_tokens {args.max_new_tokens}, adapter {bool(adapter)}, {'GPU' if args.gpu else f'CPU ({cores} cores)'}"
          f"\nmatmul peak GFLOP/s: {peak_txt}\n")
    extra = unshared is not None
    print(f"| engine | runs as | actors | prompts/s | gen tokens/s | vs {baseline['engine']} | "
          + ("vs hf-unshared | same answers | " if extra else "") + "GFLOP/s | share of matmul peak | start-up s | probe diff |")
    print("|---" * (12 if extra else 10) + "|")
    for r in rows:
        same = f"{r['vs_unshared']:.2f}x | {r['same_answers_as_unshared']}/{len(r['answers'])} | " if extra else ""
        print(f"| {r['engine']} | {r['resolved']} | {r['actors']} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['vs_first']:.2f}x | {same}{r['gflop_per_s']:.1f} | {r['share_of_matmul_peak']:.0%} | "
              f"{r['startup_s']:.1f} | {r['probe_diff']:.4f} |")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
