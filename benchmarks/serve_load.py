"""Load test of the /recommend endpoint: p50/p99 latency and requests/s at several concurrency levels.

Everything runs on this machine over loopback (127.0.0.1): a local Ray, the real Serve app from
`sprec_ray.serve.app.serve_run`, and a thread pool of HTTP clients. Each level is bounded by a
request count and a time budget. Several deployment variants run side by side in one process so
their ratios are comparable:

* `batch1-1rep`: max_batch_size 1, one replica (no batching);
* `batch8-1rep`: max_batch_size 8, one replica (the batching effect alone);
* `batch8-auto`: max_batch_size 8, replicas autoscaled 1..2 (the default serving setup).

    .venv/bin/python benchmarks/serve_load.py                       # tiny model built on the fly
    .venv/bin/python benchmarks/serve_load.py --run runs/default --levels 1 8 32 --backend vllm

Writes a Markdown table to stdout and bench_out/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

VARIANTS = {
    "batch1-1rep": ["serve.max_batch_size=1", "serve.min_replicas=1", "serve.max_replicas=1"],
    "batch8-1rep": ["serve.max_batch_size=8", "serve.min_replicas=1", "serve.max_replicas=1"],
    "batch8-auto": ["serve.max_batch_size=8", "serve.min_replicas=1", "serve.max_replicas=2"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_run(root: Path, sft_steps: int = 80) -> Path:
    """A run dir like the self-play driver writes (config.yaml + final.json) around a tiny model that a
    short SFT taught the response format, so requests really exercise generation *and* grounding
    (a random-init model writes no title and every request would take the popularity fallback)."""
    from sprec_ray.artefacts import write_catalogue
    from sprec_ray.config import load_config, save_config
    from sprec_ray.data.prompts import render_prompt, render_response
    from sprec_ray.data.synthetic import write_synthetic_sprec
    from sprec_ray.models.base import build_tiny_model
    from sprec_ray.testing import load_dataset

    data_dir = write_synthetic_sprec(root / "data", num_items=500, num_users=400, seed=1)
    run = root / "run"
    cfg = load_config(None, [f"output_dir={run}", f"data.path={data_dir}", "model.name=tiny",
                             "generation.backend=hf", "generation.max_new_tokens=24", "eval.embedder=hash"])
    data = load_dataset(cfg.data, root / "scratch")
    titles = data.catalogue.titles
    pairs = [(render_prompt([titles[i] for i in e.history], cfg.data.item_noun), render_response(titles[e.target]))
             for e in data.train]
    model = build_tiny_model(root / "model", [p + r for p, r in pairs])
    sft_tiny(model, pairs, sft_steps)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "final.json").write_text(json.dumps({"base_model": str(model), "adapter": None, "round": 0}))
    write_catalogue(run, data.catalogue, cfg.eval.embedder)
    return run


def sft_tiny(model_dir: Path, pairs: list[tuple[str, str]], steps: int, batch: int = 16) -> None:
    """Full fine-tune on prompt + '"Title"' + EOS (loss on the response only), in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    for step in range(steps):
        rows = [pairs[i] for i in rng.integers(0, len(pairs), batch)]
        ids, labels = [], []
        for prompt, response in rows:
            p = tok(prompt)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(map(len, ids))
        x = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in ids])
        y = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
        loss = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"sft step {step}: loss {loss.item():.3f} ({time.monotonic() - t0:.0f}s)", flush=True)
    model.save_pretrained(model_dir)


def run_level(url: str, concurrency: int, max_requests: int, max_seconds: float, n_items: int,
              max_history: int) -> dict[str, float]:
    import requests

    latencies: list[float] = []
    errors = model_answers = 0
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        nonlocal errors, model_answers
        session = requests.Session()
        for i in counter:  # shared iterator: the level stops after max_requests in total
            if time.monotonic() > deadline:
                return
            history = [(i * 13 + j) % n_items for j in range(1 + i % max_history)]
            t0 = time.perf_counter()
            try:
                resp = session.post(f"{url}/recommend", json={"history": history, "k": 10}, timeout=120)
                ok = resp.status_code == 200 and len(resp.json()["items"]) == 10
                grounded = ok and resp.json()["source"] == "model"
            except requests.RequestException:
                ok = grounded = False
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                    model_answers += int(grounded)
                else:
                    errors += 1

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    wall = time.monotonic() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "requests": len(latencies) + errors, "errors": errors,
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "req_per_s": round(len(latencies) / wall, 1), "wall_s": round(wall, 1),
            "grounded_share": round(model_answers / max(len(latencies), 1), 3)}


def replica_count() -> int:
    from ray import serve

    status = serve.status().applications["sprec"].deployments["Recommender"]
    return int(sum(status.replica_states.values())) if status.replica_states else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished run dir; default: build a tiny one in a temp dir")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=400, help="max requests per level")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time budget per level")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--out", type=Path, default=Path("bench_out/serve_load.json"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from sprec_ray.runtime import apply_default_env
    from sprec_ray.serve.app import serve_run
    from sprec_ray.serve.recommender import load_catalogue, load_run

    apply_default_env()
    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    run_dir = args.run or build_tiny_run(Path(tmp.name))
    run = load_run(run_dir, [f"generation.backend={args.backend}"])
    n_items = len(load_catalogue(run))
    max_history = min(10, run.cfg.serve.max_history)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    rows = []
    try:
        for variant in args.variants:
            overrides = ["serve.host=127.0.0.1", f"serve.port={port}", f"generation.backend={args.backend}",
                         *VARIANTS[variant]]
            t0 = time.monotonic()
            url = serve_run(run_dir, overrides, block=False)
            deploy_s = time.monotonic() - t0
            run_level(url, 4, 20, 30, n_items, max_history)  # warm-up: first batches, lazy imports
            print(f"[{variant}] deployed in {deploy_s:.1f}s", flush=True)
            for level in args.levels:
                row = {"variant": variant, **run_level(url, level, args.requests, args.max_seconds, n_items,
                                                        max_history), "replicas_after": replica_count()}
                rows.append(row)
                print(f"[{variant}] c={level}: {row}", flush=True)
            serve.delete("sprec")
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    header = "| variant | concurrency | requests | errors | p50 ms | p99 ms | req/s | grounded | replicas after |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['req_per_s']} | {r['grounded_share']:.0%} | {r['replicas_after']} |")
    base = {r["concurrency"]: r["req_per_s"] for r in rows if r["variant"] == "batch1-1rep"}
    ratios = {f"{r['variant']}@c{r['concurrency']}": round(r["req_per_s"] / base[r["concurrency"]], 2)
              for r in rows if r["variant"] != "batch1-1rep" and base.get(r["concurrency"])}
    print("\n".join(lines))
    if ratios:
        print("\nthroughput vs batch1-1rep at the same concurrency: " + json.dumps(ratios))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": rows, "ratios_vs_batch1": ratios, "backend": args.backend, "run": str(run_dir) if args.run else "tiny",
        "catalogue_items": n_items, "max_new_tokens": run.cfg.generation.max_new_tokens,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor()},
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
