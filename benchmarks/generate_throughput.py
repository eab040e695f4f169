"""Self-play generation throughput, in one run: earlier transformers paths, in process ("hf-before":
before issue 13, fp32, one thread, unmerged PEFT adapter, batch 64; "hf-unshared": before issue 38,
fp32, all cores, adapter merged, stock sdpa, every prompt prefilled whole in left-padded shards taken
in input order), the pool with `generation.backend=auto` (on CPU: transformers on all cores, shards of
prompts of similar length, their shared instruction prefilled once per shard, grouped-query attention
without KV copies, bf16 autocast where the CPU has native bf16, else fp32 with the adapter merged) and
the pool with vLLM; plus a matmul peak measured in the same process, so the FLOP/s each engine
reaches can be set against what the cores can do.

The workload is the default run's evaluation: the validation rows' prompts (history of 10 titles),
the shipped warm-start adapter, the generation settings of configs/default.yaml (greedy, 32 new
tokens, shards of 32). Every pool gets a warm-up round on train prompts (adapter switch + probe
check); then every engine answers the same prompts `--repeats` times in ABBA order. Each engine's
answers are compared with hf-unshared's and scored as the run's evaluation scores them.

    .venv/bin/python benchmarks/generate_throughput.py                        # SmolLM2, CPU, ~25 min on 2 cores
    .venv/bin/python benchmarks/generate_throughput.py --model tiny --adapter random --engines hf vllm --actors 1 2
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
WARM_START = "smollm2-goodreads-sft"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_prompts(data: str, split: str, work: Path) -> tuple[list[str], list, list[str], list[str], object]:
    """`split`'s rows and their prompts, train prompts for the warm-up, the tiny model's corpus, the catalogue."""
    ds = prepare_dataset(DataConfig(path=data), work / "prepared", work / "scratch")
    titles = ds.catalogue.titles
    rows = ds.rows(split)
    prompts = [render_prompt([titles[i] for i in e.history]) for e in rows]
    warm = [render_prompt([titles[i] for i in e.history]) for e in ds.head("train", 16)]
    corpus = [render_prompt(titles[i:i + 10]) + render_response(titles[i]) for i in range(0, len(titles), 2)]
    return prompts, rows, warm, corpus, ds.catalogue


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
                 "hf-unshared": (None, True, "shard_size", "hf (fp32, all cores, merged LoRA, whole prompts, "
                                                          "shards in input order)")}


class EarlierPath:
    """hf-before: pre-issue-13, what a pool actor ran with Ray's OMP_NUM_THREADS=1 (batch 64).
    hf-unshared: pre-issue-38, all cores, merged adapter, shards of --shard-size in input order, every
    prompt prefilled whole, transformers' stock sdpa."""

    def __init__(self, engine: str, args: argparse.Namespace, base: Path, adapter: Path | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers import GenerationConfig as HFGenerationConfig

        from sprec_ray.generate.backends import STOP_STRING

        threads, merge, batch_arg, runs_as = EARLIER_PATHS[engine]
        self.threads, self.batch = threads, getattr(args, batch_arg)
        self.tok = AutoTokenizer.from_pretrained(str(base))
        self.tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).eval()
            if merge:
                model = model.merge_and_unload().eval()
        self.model = model
        self.gen = HFGenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id,
                                      stop_strings=[STOP_STRING])
        self.row = {"engine": engine, "resolved": runs_as, "actors": 1, "threads": threads, "shard_size": self.batch,
                    "startup_s": float("nan"), "probe_diff": float("nan"), "rounds": []}

    def run(self, prompts: list[str]) -> tuple[list[str], int, float]:
        import torch

        from sprec_ray.generate.backends import cut_at_stop

        torch.set_num_threads(self.threads or len(os.sched_getaffinity(0)))
        start, new_tokens, answers = time.perf_counter(), 0, []
        for s in range(0, len(prompts), self.batch):
            enc = self.tok(prompts[s:s + self.batch], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = self.model.generate(**enc, generation_config=self.gen, tokenizer=self.tok)
            new = out[:, enc["input_ids"].shape[1]:]
            new_tokens += int((new != self.tok.pad_token_id).sum())
            answers += [cut_at_stop(t.rstrip("\ufffd")) for t in self.tok.batch_decode(new, skip_special_tokens=True)]
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        return answers, new_tokens, time.perf_counter() - start

    def close(self) -> None:
        self.model = None


class PoolPath:
    """The product: a GenerationPool with `generation.backend=engine`, warmed up (adapter switch + probe)."""

    def __init__(self, engine: str, actors: int, args: argparse.Namespace, base: Path, adapter: Path | None,
                 warm: list[str]) -> None:
        from sprec_ray.generate.backends import resolve_backend, resolve_dtype
        from sprec_ray.generate.pool import GenerationPool

        defaults = load_config(REPO_ROOT / "configs" / "default.yaml").generation
        cfg = dataclasses.replace(
            defaults, backend=engine, num_actors=actors, max_new_tokens=args.max_new_tokens,
            shard_size=args.shard_size, gpus_per_actor=1.0 * args.tensor_parallel if args.gpu else 0.0,
            tensor_parallel=args.tensor_parallel, request_timeout_s=1800.0, startup_timeout_s=1800.0)
        resolved = resolve_backend(cfg)
        log.info("start %s (%s) x%d (shard %d)", engine, resolved, actors, cfg.shard_size)
        self.adapter, self.pool = adapter, GenerationPool(cfg, base, max_lora_rank=args.lora_rank, seed=0)
        self.pool.generate(warm, adapter, round_id=1)
        dtype = resolve_dtype(cfg.dtype, resolved, args.gpu)
        self.row = {"engine": engine, "resolved": f"{resolved} ({dtype}, all cores)", "actors": actors,
                    "shard_size": cfg.shard_size, "startup_s": self.pool.startup_s,
                    "probe_diff": self.pool.last_stats.probe_diff, "dtype": dtype, "rounds": []}

    def run(self, prompts: list[str]) -> tuple[list[str], int, float]:
        answers = [row[0] for row in self.pool.generate(prompts, self.adapter, round_id=1)]
        return answers, self.pool.last_stats.gen_tokens, self.pool.last_stats.wall_s

    def close(self) -> None:
        self.pool.shutdown()


def validation_metrics(rows_out: list[dict], rows: list, catalogue: object) -> None:
    """Each engine's greedy answers scored as the run's evaluation scores them (MiniLM grounding; the
    catalogue is embedded once for all engines)."""
    from sprec_ray.eval.embedders import make_embedder
    from sprec_ray.eval.evaluate import evaluate_completions
    from sprec_ray.eval.grounding import Grounder

    grounder = Grounder(catalogue.titles, make_embedder("minilm"))
    for r in rows_out:
        metrics, _ = evaluate_completions([[a] for a in r["answers"]], rows, catalogue, grounder, ks=(1, 5, 10))
        r["validation"] = {k: metrics[k] for k in REPORTED_METRICS}


REPORTED_METRICS = ("NDCG@5", "HR@5", "DivRatio@5", "ORRatio@5", "DivRatio@1", "ORRatio@1", "distinct_answers",
                    "exact_share")


def summarise(row: dict, prompt_tokens: int, n_linear: int) -> dict:
    rounds = row["rounds"]
    row["prompts_per_s"] = statistics.median(r["prompts"] / r["wall_s"] for r in rounds)
    row["tokens_per_s"] = statistics.median(r["gen_tokens"] / r["wall_s"] for r in rounds)
    # useful FLOPs: every prompt and generated token through every Linear once (padding and
    # attention-score FLOPs not counted, so this is a lower bound on what the engine computed)
    row["gflop_per_s"] = statistics.median(
        2 * n_linear * (prompt_tokens + r["gen_tokens"]) / r["wall_s"] / 1e9 for r in rounds)
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="tiny | smollm2 | a local HF checkpoint dir")
    parser.add_argument("--data", default="data/goodreads", help="SPRec-format dir the prompts come from")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sprec_ray" / "models"))
    parser.add_argument("--engines", nargs="+", default=["hf-unshared", "auto"],
                        choices=[*EARLIER_PATHS, "auto", "hf", "vllm"])
    parser.add_argument("--actors", nargs="+", type=int, default=[1])
    parser.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="rows the prompts come from")
    parser.add_argument("--num-prompts", type=int, default=0, help="prompts per timed round: the split's first N, 0 = all")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per engine, in ABBA order (median reported)")
    parser.add_argument("--warmup-prompts", type=int, default=4, help="untimed round: adapter switch + probe")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="hf-before batch (SPRec's data_generate.py)")
    parser.add_argument("--shard-size", type=int, default=32, help="prompts per pool request (default.yaml)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--adapter", default="warm-start", choices=["warm-start", "random", "none"],
                        help=f"adapters/{WARM_START} (SmolLM2 only), a random LoRA of --lora-rank, or the base model")
    parser.add_argument("--no-metrics", action="store_true", help="skip the validation metrics of each engine's answers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor (x tensor-parallel)")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "generate_throughput.json"))
    return parser.parse_args()


def measure(paths: list, prompts: list[str], repeats: int) -> None:
    """Every path generates for `prompts` `repeats` times, in ABBA... order: the machine's speed drifts."""
    try:
        for i in range(repeats):
            for path in paths if i % 2 == 0 else paths[::-1]:
                answers, gen_tokens, wall = path.run(prompts)
                row = path.row
                row["rounds"].append({"wall_s": wall, "prompts": len(prompts), "gen_tokens": gen_tokens})
                row.setdefault("answers", answers)
                row["same_answers_each_round"] = row.get("same_answers_each_round", True) and answers == row["answers"]
                log.info("  %s x%d: %.2f prompts/s", row["engine"], row["actors"], len(prompts) / wall)
    finally:
        for path in paths:
            path.close()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = Path(args.out)
    work = REPO_ROOT / "bench_out" / "generate_work"
    work.mkdir(parents=True, exist_ok=True)
    all_prompts, all_rows, warm, corpus, catalogue = build_prompts(args.data, args.split, work)
    if len(all_prompts) < args.num_prompts:
        raise SystemExit(f"only {len(all_prompts)} {args.split} prompts available, need {args.num_prompts}")
    n = args.num_prompts or len(all_prompts)
    prompts, rows = all_prompts[:n], all_rows[:n]
    base = Path(resolve_base_model(args.model, args.cache_dir, corpus))
    adapter = None
    if args.adapter == "warm-start":
        adapter = REPO_ROOT / "adapters" / WARM_START
    elif args.adapter == "random":
        adapter = make_adapter(base, work / f"adapter-{base.name}-r{args.lora_rank}", args.lora_rank)
    warm = warm[: args.warmup_prompts]

    import torch
    from transformers import AutoTokenizer

    from sprec_ray.models.precision import has_native_bf16

    tok = AutoTokenizer.from_pretrained(str(base))
    prompt_tokens = sum(len(tok(p)["input_ids"]) for p in prompts)
    n_linear = linear_params(base)
    cores = len(os.sched_getaffinity(0))
    peaks = {"fp32_1_thread": matmul_peak(1, "float32"), "fp32_all_cores": matmul_peak(cores, "float32")}
    if args.gpu or has_native_bf16(torch.device("cpu")):  # emulated bf16 takes minutes and means nothing here
        peaks["bf16_all_cores"] = matmul_peak(cores, "bfloat16")
    log.info("model %s (%.1fM Linear weights), %d %s prompts (%d tokens) x %d rounds, adapter %s; matmul "
             "peak GFLOP/s %s", base, n_linear / 1e6, len(prompts), args.split, prompt_tokens, args.repeats, adapter,
             {k: round(v / 1e9, 1) for k, v in peaks.items()})

    paths = [EarlierPath(e, args, base, adapter) for e in args.engines if e in EARLIER_PATHS]
    pool_engines = [e for e in args.engines if e not in EARLIER_PATHS]
    if pool_engines:
        from sprec_ray.runtime import init_ray

        init_ray(num_cpus=max(cores, max(args.actors)) + 1)
        paths += [PoolPath(e, a, args, base, adapter, warm) for e in pool_engines for a in args.actors]
    measure(paths, prompts, args.repeats)
    rows_out = [summarise(p.row, prompt_tokens, n_linear) for p in paths]
    if args.split == "valid" and not args.no_metrics:
        validation_metrics(rows_out, rows, catalogue)
    baseline = rows_out[0]
    unshared = next((r for r in rows_out if r["engine"] == "hf-unshared"), None)
    for r in rows_out:
        r["vs_first"] = r["prompts_per_s"] / baseline["prompts_per_s"]
        if unshared is not None:  # greedy: the same answers are expected from every engine
            r["vs_unshared"] = r["prompts_per_s"] / unshared["prompts_per_s"]
            r["same_answers_as_unshared"] = sum(a == b for a, b in zip(r["answers"], unshared["answers"], strict=True))
        peak = peaks["fp32_1_thread"] if r.get("threads") == 1 else (
            peaks.get("bf16_all_cores") if r.get("dtype") == "bfloat16" else peaks["fp32_all_cores"])
        r["share_of_matmul_peak"] = r["gflop_per_s"] * 1e9 / peak if peak else float("nan")  # no bf16 peak measured

    meta = {"model": str(args.model), "data": args.data, "split": args.split, "adapter": args.adapter,
            "max_new_tokens": args.max_new_tokens, "num_prompts": len(prompts), "repeats": args.repeats,
            "prompt_tokens": prompt_tokens, "linear_params": n_linear,
            "matmul_peak_gflop_s": {k: v / 1e9 for k, v in peaks.items()}, "gpu": args.gpu,
            "machine": platform.platform(), "cores": cores, "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg()}
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance

    fp32_peaks = {1: peaks["fp32_1_thread"] / 1e9, cores: peaks["fp32_all_cores"] / 1e9}
    out.write_text(json.dumps({**provenance(peak_gflops=fp32_peaks), "meta": meta, "results": rows_out}, indent=2))
    print_tables(rows_out, meta, peaks)
    print(f"\nJSON: {out}")


def print_tables(rows: list[dict], meta: dict, peaks: dict[str, float]) -> None:
    peak_txt = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    where = "GPU" if meta["gpu"] else f"CPU ({meta['cores']} cores)"
    print(f"\n### Generation throughput: {meta['model']}, {meta['num_prompts']} {meta['split']} prompts x "
          f"{meta['repeats']} rounds, greedy, max_new_tokens {meta['max_new_tokens']}, adapter {meta['adapter']}, "
          f"{where}\nmatmul peak GFLOP/s: {peak_txt}\n")
    extra = "vs_unshared" in rows[0]
    print(f"| engine | runs as | actors | prompts/s | gen tokens/s | vs {rows[0]['engine']} | "
          + ("vs hf-unshared | same answers | " if extra else "") + "GFLOP/s | share of matmul peak | start-up s | probe diff |")
    print("|---" * (12 if extra else 10) + "|")
    for r in rows:
        same = f"{r['vs_unshared']:.2f}x | {r['same_answers_as_unshared']}/{len(r['answers'])} | " if extra else ""
        print(f"| {r['engine']} | {r['resolved']} | {r['actors']} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['vs_first']:.2f}x | {same}{r['gflop_per_s']:.1f} | {r['share_of_matmul_peak']:.0%} | "
              f"{r['startup_s']:.1f} | {r['probe_diff']:.4f} |")
    if "validation" in rows[0]:
        print("\n| engine | " + " | ".join(REPORTED_METRICS) + " |\n" + "|---" * (len(REPORTED_METRICS) + 1) + "|")
        for r in rows:
            print(f"| {r['engine']} | " + " | ".join(f"{r['validation'][k]:.4g}" for k in REPORTED_METRICS) + " |")


if __name__ == "__main__":
    main()
