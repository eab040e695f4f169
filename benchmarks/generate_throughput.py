"""Self-play generation throughput: the vLLM actor pool vs batched transformers `generate` (SPRec's
approach: batch 64, left padding), same model, same prompts, same adapter, in one run; plus scaling
of each engine from 1 to N actors.

Every configuration is a `GenerationPool` (the transformers baseline runs in a Ray actor with the
same CPU/GPU share as one vLLM actor, so the ratio compares engines, not resources). Per pool:
start-up (engine load), a warm-up round on separate prompts (adapter switch + probe check), then
timed rounds, each on its own prompt slice so vLLM's prefix cache only shares the instruction, as it
would in a real round. Prompts are rendered from the bundled synthetic data (history of 10 titles).

    .venv/bin/python benchmarks/generate_throughput.py                      # tiny model, CPU
    .venv/bin/python benchmarks/generate_throughput.py --model smollm2 --num-prompts 128
    .venv/bin/python benchmarks/generate_throughput.py --model smollm2 --gpu --actors 1 2 4 --num-prompts 4096

Writes a Markdown table to stdout and bench_out/generate_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
from pathlib import Path

from sprec_ray.config import DataConfig, GenerationConfig
from sprec_ray.data.dataset import load_dataset
from sprec_ray.data.prompts import render_prompt, render_response
from sprec_ray.data.synthetic import write_synthetic_sprec
from sprec_ray.models.base import resolve_base_model

log = logging.getLogger("generate_throughput")


def build_prompts(out: Path, count: int) -> tuple[list[str], list[str]]:
    num_users = max(600, int(count * 1.3) + 100)  # ~10% of users go to valid
    data_dir = write_synthetic_sprec(out / f"data-{num_users}", num_items=400, num_users=num_users, seed=0)
    ds = load_dataset(DataConfig(path=str(data_dir)), out / "scratch")
    titles = ds.catalogue.titles
    prompts = [render_prompt([titles[i] for i in e.history]) for e in ds.train]
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
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # small B: changes outputs without turning a real model into noise
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(str(out))
    return out


def run_config(engine: str, actors: int, args: argparse.Namespace, base: Path, adapter: Path | None,
               warm: list[str], slices: list[list[str]]) -> dict:
    from sprec_ray.generate.pool import GenerationPool

    shard = args.hf_batch_size if engine == "hf" else args.shard_size
    cfg = GenerationConfig(
        backend=engine, num_actors=actors, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=1.0 * args.tensor_parallel if args.gpu else 0.0, tensor_parallel=args.tensor_parallel,
        decoding=args.decoding, n=args.n, max_new_tokens=args.max_new_tokens, shard_size=shard,
        max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib, dtype=args.dtype,
        request_timeout_s=1800.0, startup_timeout_s=1800.0)
    log.info("start %s x%d (shard %d)", engine, actors, shard)
    pool = GenerationPool(cfg, base, max_lora_rank=args.lora_rank, seed=0)
    try:
        pool.generate(warm, adapter, round_id=1)
        warm_stats = pool.last_stats
        rounds = []
        for i, prompts in enumerate(slices):
            pool.generate(prompts, adapter, round_id=1)
            s = pool.last_stats
            rounds.append({"wall_s": s.wall_s, "prompts": s.prompts, "gen_tokens": s.gen_tokens,
                           "prompts_per_s": s.prompts_per_s, "tokens_per_s": s.tokens_per_s,
                           "shards_per_actor": s.shards_per_actor})
            log.info("  %s x%d round %d: %.2f prompts/s, %.0f tok/s", engine, actors, i, s.prompts_per_s,
                     s.tokens_per_s)
    finally:
        pool.shutdown()
    return {
        "engine": engine, "actors": actors, "shard_size": shard, "startup_s": pool.startup_s,
        "switch_s": warm_stats.switch_s, "probe_diff": warm_stats.probe_diff,
        "prompts_per_s": statistics.median(r["prompts_per_s"] for r in rounds),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a local HF checkpoint dir")
    parser.add_argument("--cache-dir", default="bench_out/models")
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--num-prompts", type=int, default=256, help="prompts per timed round")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per config (median reported)")
    parser.add_argument("--warmup-prompts", type=int, default=16, help="untimed round: adapter switch + probe")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--decoding", default="greedy", choices=["greedy", "sample", "beam"])
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="SPRec's data_generate.py batch size")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per vLLM request")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-adapter", action="store_true", help="generate with the base model only")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor (x tensor-parallel)")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--out", default="bench_out/generate_throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = Path(args.out)
    work = out.parent / "generate_work"
    work.mkdir(parents=True, exist_ok=True)
    need = args.num_prompts * args.repeats + args.warmup_prompts
    prompts, corpus = build_prompts(work, need)
    if len(prompts) < need:
        raise SystemExit(f"only {len(prompts)} prompts available, need {need}")
    base = resolve_base_model(args.model, args.cache_dir, corpus)
    adapter = None if args.no_adapter else make_adapter(base, work / f"adapter-{Path(base).name}-r{args.lora_rank}",
                                                        args.lora_rank)
    warm = prompts[: args.warmup_prompts]
    slices = [prompts[args.warmup_prompts + i * args.num_prompts:][: args.num_prompts] for i in range(args.repeats)]
    log.info("model %s, %d prompts x %d rounds, adapter %s", base, args.num_prompts, args.repeats, adapter)

    from sprec_ray.runtime import init_ray

    cpus = os.cpu_count() or 1
    init_ray(num_cpus=max(cpus, int(max(args.actors) * args.cpus_per_actor) + 1))
    rows = [run_config(e, a, args, Path(base), adapter, warm, slices) for e in args.engines for a in args.actors]

    baseline = next((r for r in rows if r["engine"] == "hf" and r["actors"] == min(args.actors)), None)
    for r in rows:
        same = next(x for x in rows if x["engine"] == r["engine"] and x["actors"] == min(args.actors))
        r["vs_hf"] = r["prompts_per_s"] / baseline["prompts_per_s"] if baseline else float("nan")
        r["scaling"] = r["prompts_per_s"] / same["prompts_per_s"]

    import torch

    meta = {"model": str(args.model), "base_dir": str(base), "adapter": bool(adapter), "decoding": args.decoding,
            "n": args.n, "max_new_tokens": args.max_new_tokens, "num_prompts": args.num_prompts,
            "repeats": args.repeats, "dtype": args.dtype, "gpu": args.gpu, "cpus_per_actor": args.cpus_per_actor,
            "machine": platform.platform(), "cpu_count": cpus, "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg()}
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\n### Generation throughput: {args.model}, {args.num_prompts} prompts x {args.repeats} rounds, "
          f"{args.decoding} n={args.n}, max_new_tokens {args.max_new_tokens}, adapter {bool(adapter)}, "
          f"{'GPU' if args.gpu else f'CPU ({cpus} cores)'}\n")
    print("| engine | actors | prompts/s | gen tokens/s | vs hf x1 | vs same engine x1 | start-up s | probe diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['actors']} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['vs_hf']:.2f}x | {r['scaling']:.2f}x | {r['startup_s']:.1f} | {r['probe_diff']:.4f} |")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
