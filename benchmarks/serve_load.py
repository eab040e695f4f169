"""Load test of /recommend, /rank or /v1/rerank: p50/p99 latency and requests/s at several concurrency levels.

Everything runs on this machine over loopback (127.0.0.1): a local Ray, the real Serve app from
`sprec_ray.serve.app.serve_run`, and a thread pool of HTTP clients. Each level is bounded by a
request count and a time budget. Several deployment variants run side by side in one process so
their ratios are comparable:

* `batch1-1rep`: max_batch_size 1, one replica (no batching);
* `batch8-1rep`: max_batch_size 8, one replica (the batching effect alone);
* `batch8-auto`: max_batch_size 8, replicas autoscaled 1..2 (the default serving setup);
* `batch8-2rep`: two replicas from the start, for `--kill-replica-after` (a replica lost under load).

    .venv/bin/python benchmarks/serve_load.py                       # tiny model built on the fly
    .venv/bin/python benchmarks/serve_load.py --run runs/default --levels 1 8 32 --backend vllm
    .venv/bin/python benchmarks/serve_load.py --endpoint rank --candidates 20 100 --levels 1 16 64 \
        --variants batch8-auto --requests 2000 --out benchmarks/results/serve_rank.json
    .venv/bin/python benchmarks/serve_load.py --variants batch8-2rep --kill-replica-after 6 \
        --out benchmarks/results/serve_replica_loss.json
    .venv/bin/python benchmarks/serve_load.py --rollout --out benchmarks/results/serve_rollout.json
    .venv/bin/python benchmarks/serve_load.py --endpoint rerank --candidates 20 --levels 1 16 \
        --variants batch8-auto --requests 600 --max-seconds 45 --out benchmarks/results/serve_rerank.json

`--rollout` measures a live adapter change under load instead of levels: with 1 and then 2 replicas,
`--levels` clients (the first level) keep posting /recommend while the adapter is rolled out to a
new one and then rolled back (`sprec_ray.serve.deploy.change_adapter`, what `sprec-ray deploy`
runs); each request is put in the phase it started in (before, during = from the deploy call until
it returned plus --during-tail-s, after), with requests failed, p50/p99 and how often each client
saw the answers' adapter change.

`--url` drives a service that is already running (any deployment an operator points it at) instead
of starting Ray and Serve here; `--run` then only names the catalogue's titles for `rerank`:

    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --endpoint rerank --levels 1 16

With `--endpoint rerank` the query is the history as a JSON list of ids and the documents are the
candidates' titles (free text when the catalogue is unknown, which the service scores all the same).
With `--endpoint rank` every request sends `--candidates` distinct items outside its history, and
the same run also scores those lists in process both ways, one prefix-shared sequence per request
against one full forward per candidate (generate/scoring.py): the time ratio and whether the
rankings are identical.

Writes a Markdown table to stdout and bench_out/serve_load.json (or --out).
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
from provenance import provenance

VARIANTS = {
    "batch1-1rep": ["serve.max_batch_size=1", "serve.min_replicas=1", "serve.max_replicas=1"],
    "batch8-1rep": ["serve.max_batch_size=8", "serve.min_replicas=1", "serve.max_replicas=1"],
    "batch8-auto": ["serve.max_batch_size=8", "serve.min_replicas=1", "serve.max_replicas=2"],
    "batch8-2rep": ["serve.max_batch_size=8", "serve.min_replicas=2", "serve.max_replicas=2"],  # --kill-replica-after
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
    from sprec_ray.data.prepared import prepare_dataset
    from sprec_ray.data.prompts import render_prompt, render_response
    from sprec_ray.data.synthetic import write_synthetic_sprec
    from sprec_ray.models.base import build_tiny_model

    data_dir = write_synthetic_sprec(root / "data", num_items=500, num_users=400, seed=1)
    run = root / "run"
    cfg = load_config(None, [f"output_dir={run}", f"data.path={data_dir}", "model.name=tiny",
                             "generation.backend=hf", "generation.max_new_tokens=24", "eval.embedder=hash"])
    data = prepare_dataset(cfg.data, root / "prepared", root / "scratch")
    titles = data.catalogue.titles
    pairs = [(render_prompt([titles[i] for i in e.history], cfg.data.item_noun), render_response(titles[e.target]))
             for e in data.head("train", data.counts["train"])]
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


def request_body(i: int, endpoint: str, n_items: int, max_history: int, candidates: int,
                 titles: list[str] | None = None) -> dict:
    history = [(i * 13 + j) % n_items for j in range(1 + i % max_history)]
    if endpoint == "recommend":
        return {"history": history, "k": 10}
    start = (i * 7) % n_items
    free = [c % n_items for c in range(start, start + n_items) if c % n_items not in history][:candidates]
    if endpoint == "rerank":
        docs = [titles[c] if titles else f"Item number {c}" for c in free]
        return {"query": json.dumps(history), "documents": docs, "top_n": 10}
    return {"history": history, "candidates": free, "k": 10}


PATHS = {"recommend": "recommend", "rank": "rank", "rerank": "v1/rerank"}


def run_level(url: str, concurrency: int, max_requests: int, max_seconds: float, n_items: int,
              max_history: int, endpoint: str = "recommend", candidates: int = 0,
              kill_after_s: float = 0.0, titles: list[str] | None = None) -> dict[str, float]:
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
            body = request_body(i, endpoint, n_items, max_history, candidates, titles)
            t0 = time.perf_counter()
            try:
                resp = session.post(f"{url}/{PATHS[endpoint]}", json=body, timeout=120)
                answer = resp.json()["results" if endpoint == "rerank" else "items"] if resp.status_code == 200 else []
                ok = len(answer) == (10 if endpoint == "recommend" else min(10, candidates))
                grounded = ok and resp.json().get("source", "model") == "model"
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
    if kill_after_s > 0:  # a replica lost under load: SIGKILL one model replica's process
        threading.Timer(kill_after_s, kill_one_replica).start()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    wall = time.monotonic() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "requests": len(latencies) + errors, "errors": errors,
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "req_per_s": round(len(latencies) / wall, 1), "wall_s": round(wall, 1),
            "grounded_share": round(model_answers / max(len(latencies), 1), 3)}


def scoring_layouts(run, n_items: int, max_history: int, candidates: int, requests: int = 16) -> dict[str, float]:
    """One engine in process: the same requests' candidate lists scored as one prefix-shared sequence
    each and as one row per candidate, alternating request by request (side by side)."""
    import torch

    from sprec_ray.eval.candidates import ranked
    from sprec_ray.generate.factory import make_backend
    from sprec_ray.generate.scoring import candidate_rows, candidate_token_logprobs
    from sprec_ray.serve.recommender import Prompts, serving_generation

    prompts = Prompts(run)
    backend = make_backend(serving_generation(run.cfg.generation), run.base_model, run.cfg.lora.r, 0)
    titles = prompts.catalogue.titles
    times = {"shared": 0.0, "separate": 0.0}
    same = 0
    for i in range(requests):
        body = request_body(i, "rank", n_items, max_history, candidates)
        text = prompts.rank(_rank_request(body))
        rows = candidate_rows(backend.tokenizer, [text], [[titles[c] for c in body["candidates"]]])
        ranks = {}
        for layout in ("shared", "separate") if i % 2 == 0 else ("separate", "shared"):
            t0 = time.perf_counter()
            with torch.inference_mode():
                lps = candidate_token_logprobs(backend.model, rows, backend.tokenizer.pad_token_id,
                                               backend.model.dtype, layout)[0]
            times[layout] += time.perf_counter() - t0
            ranks[layout] = ranked([sum(t) for t in lps])
        same += ranks["shared"] == ranks["separate"]
    backend.close()
    return {"candidates": candidates, "requests": requests, "shared_ms": round(1000 * times["shared"] / requests, 1),
            "separate_ms": round(1000 * times["separate"] / requests, 1),
            "separate_over_shared": round(times["separate"] / times["shared"], 2), "identical_rankings": same}


def _rank_request(body: dict):
    from sprec_ray.serve.schema import RankRequest

    return RankRequest(tuple(body["history"]), tuple(body["candidates"]), body["k"])


def kill_one_replica() -> None:
    import os
    import signal

    import psutil

    pids = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])  # Ray's process title for a replica
            if (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:sprec:Recommender")]
    os.kill(pids[0], signal.SIGKILL)
    print(f"killed replica pid {pids[0]} ({len(pids)} were up)", flush=True)


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
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS)[:3], choices=list(VARIANTS))
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--endpoint", choices=list(PATHS), default="recommend")
    ap.add_argument("--candidates", type=int, nargs="+", default=[20], help="/rank, /v1/rerank: candidates per request")
    ap.add_argument("--url", help="drive this running service (e.g. http://127.0.0.1:8000); start nothing here")
    ap.add_argument("--kill-replica-after", type=float, default=0.0,
                    help="SIGKILL one model replica this many seconds into every level (0: never)")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--rollout", action="store_true", help="roll an adapter out and back under load (see above)")
    ap.add_argument("--phase-s", type=float, default=15.0, help="--rollout: seconds of load before and after a change")
    ap.add_argument("--during-tail-s", type=float, default=3.0,
                    help="--rollout: the 'during' phase lasts this long after the deploy call returned")
    ap.add_argument("--out", type=Path, default=Path("bench_out/serve_load.json"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from sprec_ray.runtime import apply_default_env
    from sprec_ray.serve.app import serve_run
    from sprec_ray.serve.recommender import load_catalogue, load_run

    if args.url:
        return drive_url(args)
    if args.rollout:
        return rollout_bench(args)
    apply_default_env()
    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    run_dir = args.run or build_tiny_run(Path(tmp.name))
    run = load_run(run_dir, [f"generation.backend={args.backend}"])
    n_items = len(load_catalogue(run))
    max_history = min(10, run.cfg.serve.max_history)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    rows = []
    titles = list(load_catalogue(run).titles)
    sizes = args.candidates if args.endpoint != "recommend" else [0]
    layouts = [scoring_layouts(run, n_items, max_history, c) for c in sizes] if args.endpoint == "rank" else []
    for row in layouts:
        print(f"in-process scoring, {row['candidates']} candidates: {row}", flush=True)
    try:
        for variant, size in [(v, c) for v in args.variants for c in sizes]:
            overrides = ["serve.host=127.0.0.1", f"serve.port={port}", f"generation.backend={args.backend}",
                         *VARIANTS[variant]]
            t0 = time.monotonic()
            url = serve_run(run_dir, overrides, block=False)
            deploy_s = time.monotonic() - t0
            # warm-up: first batches, lazy imports
            run_level(url, 4, 20, 30, n_items, max_history, args.endpoint, size, titles=titles)
            print(f"[{variant}] deployed in {deploy_s:.1f}s", flush=True)
            for level in args.levels:
                row = {"variant": variant, "candidates": size,
                       **run_level(url, level, args.requests, args.max_seconds, n_items, max_history, args.endpoint, size,
                                   args.kill_replica_after, titles),
                       "replicas_after": replica_count()}
                rows.append(row)
                print(f"[{variant}] c={level}: {row}", flush=True)
            serve.delete("sprec")
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    header = ("| endpoint | variant | candidates | concurrency | requests | errors | p50 ms | p99 ms | req/s | grounded "
              "| replicas after |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {args.endpoint} | {r['variant']} | {r['candidates'] or '-'} | {r['concurrency']} | "
                     f"{r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['req_per_s']} | "
                     f"{r['grounded_share']:.0%} | {r['replicas_after']} |")
    for row in layouts:
        lines.append(f"\nscoring {row['candidates']} candidates in process: prefix-shared {row['shared_ms']} ms, one row "
                     f"per candidate {row['separate_ms']} ms ({row['separate_over_shared']}x); identical rankings "
                     f"{row['identical_rankings']}/{row['requests']}")
    base = {r["concurrency"]: r["req_per_s"] for r in rows if r["variant"] == "batch1-1rep" and not r["candidates"]}
    ratios = {f"{r['variant']}@c{r['concurrency']}": round(r["req_per_s"] / base[r["concurrency"]], 2)
              for r in rows if r["variant"] != "batch1-1rep" and base.get(r["concurrency"])}
    print("\n".join(lines))
    if ratios:
        print("\nthroughput vs batch1-1rep at the same concurrency: " + json.dumps(ratios))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance(), "endpoint": args.endpoint, "kill_replica_after_s": args.kill_replica_after, "rows": rows, "scoring_layouts": layouts, "ratios_vs_batch1": ratios,
        "backend": args.backend, "run": str(run_dir) if args.run else "tiny",
        "catalogue_items": n_items, "max_new_tokens": run.cfg.generation.max_new_tokens,
        "python": platform.python_version(),  # the machine (CPU model, cores) is provenance's
    }, indent=2))
    print(f"wrote {args.out}")


def tiny_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter for the tiny model that changes it slightly: PEFT's init (B = 0) plus small noise
    on B, so the SFT-taught answer format survives and the weights (and sha256) differ per seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    model.save_pretrained(out)
    return out


class SteadyLoad:
    """`clients` threads posting /recommend back to back; each request's start, end, success and the
    adapter (sha256) that answered it, per client, in order."""

    def __init__(self, url: str, clients: int, n_items: int, max_history: int) -> None:
        self.url, self.n_items, self.max_history = url, n_items, max_history
        self.log: list[list[tuple[float, float, bool, str | None]]] = [[] for _ in range(clients)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, c: int) -> None:
        import requests

        session, i = requests.Session(), c
        while not self.stop.is_set():
            body = request_body(i, "recommend", self.n_items, self.max_history, 0)
            t0 = time.monotonic()
            try:
                resp = session.post(f"{self.url}/recommend", json=body, timeout=120)
                ok = resp.status_code == 200 and len(resp.json()["items"]) == 10
                sha = resp.json()["adapter"]["sha256"] if ok else None
            except requests.RequestException:
                ok, sha = False, None
            self.log[c].append((t0, time.monotonic(), ok, sha))
            i += len(self.log)

    def finish(self) -> list[list[tuple[float, float, bool, str | None]]]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)
        return self.log


def phase_row(log: list[list[tuple[float, float, bool, str | None]]], start: float, end: float) -> dict[str, float]:
    """Requests that started in [start, end): count, failed, p50/p99 of the successful ones."""
    reqs = [r for client in log for r in client if start <= r[0] < end]
    lat = np.array([1000 * (r[1] - r[0]) for r in reqs if r[2]]) if any(r[2] for r in reqs) else np.array([np.nan])
    return {"requests": len(reqs), "failed": sum(not r[2] for r in reqs),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "seconds": round(end - start, 1)}


def rollout_bench(args: argparse.Namespace) -> None:
    """--rollout: for 1 and 2 replicas, steady load through a rollout to a new adapter and a rollback."""
    import ray
    from ray import serve

    from sprec_ray.runtime import apply_default_env
    from sprec_ray.serve.app import serve_run
    from sprec_ray.serve.deploy import change_adapter
    from sprec_ray.serve.recommender import load_catalogue, load_run

    apply_default_env()
    tmp = tempfile.TemporaryDirectory(prefix="serve_rollout_")
    run_dir = args.run or build_tiny_run(Path(tmp.name))
    run = load_run(run_dir)
    if not args.run:  # the tiny run (in tmp) starts on an adapter of its own; a given run on its final one
        old = tiny_adapter(run.base_model, Path(tmp.name) / "adapter_old", seed=1)
        final = json.loads((run_dir / "final.json").read_text())
        (run_dir / "final.json").write_text(json.dumps({**final, "adapter": str(old)}))
    new = tiny_adapter(run.base_model, Path(tmp.name) / "adapter_new", seed=2)
    n_items, max_history = len(load_catalogue(run)), min(10, run.cfg.serve.max_history)
    clients = args.levels[0]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows, switches = [], []
    port = free_port()  # one for both: Serve keeps the HTTP port it started with
    try:
        for replicas in (1, 2):
            overrides = ["serve.host=127.0.0.1", f"serve.port={port}", "serve.max_batch_size=8",
                         f"serve.min_replicas={replicas}", f"serve.max_replicas={replicas}"]
            url = serve_run(run_dir, overrides, block=False)
            run_level(url, clients, 20, 30, n_items, max_history)  # warm-up: first batches, lazy imports
            load = SteadyLoad(url, clients, n_items, max_history)
            marks = [time.monotonic()]
            for action in ("rollout", "rollback"):
                time.sleep(args.phase_s)
                t0 = time.monotonic()
                state = change_adapter(run_dir, overrides, adapter=str(new)) if action == "rollout" else \
                    change_adapter(run_dir, overrides, rollback=True)
                deploy_s = time.monotonic() - t0
                marks += [t0, time.monotonic() + args.during_tail_s]
                print(f"[{replicas} replica(s)] {action}: live {state['live']['sha256'][:12]} in {deploy_s:.2f}s",
                      flush=True)
                switches.append({"replicas": replicas, "action": action, "deploy_s": round(deploy_s, 2)})
            time.sleep(args.phase_s + args.during_tail_s)
            log = load.finish()
            marks.append(time.monotonic())
            phases = [("rollout", "before", 0, 1), ("rollout", "during", 1, 2), ("rollout", "after", 2, 3),
                      ("rollback", "during", 3, 4), ("rollback", "after", 4, 5)]
            for action, phase, a, b in phases:
                rows.append({"replicas": replicas, "action": action, "phase": phase, **phase_row(log, marks[a], marks[b])})
                print(f"[{replicas} replica(s)] {rows[-1]}", flush=True)
            shas = [[r[3] for r in client if r[2]] for client in log]
            changes = [sum(a != b for a, b in zip(s, s[1:], strict=False)) for s in shas]
            for sw in switches[-2:]:
                sw["adapter_changes_per_client"] = changes  # over both actions: 2 means each seen once
            serve.delete("sprec")
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    lines = ["| replicas | action | phase | requests | failed | p50 ms | p99 ms | seconds |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['replicas']} | {r['action']} | {r['phase']} | {r['requests']} | {r['failed']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['seconds']} |" for r in rows]
    print("\n".join(lines))
    print(json.dumps(switches))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance(), "endpoint": "recommend", "clients": clients, "phase_s": args.phase_s,
        "during_tail_s": args.during_tail_s, "rows": rows, "switches": switches,
        "run": str(run_dir) if args.run else "tiny", "catalogue_items": n_items,
        "note": "rollback 'before' is rollout 'after'; each request counts in the phase it started in",
    }, indent=2))
    print(f"wrote {args.out}")


def drive_url(args: argparse.Namespace) -> None:
    """--url: the levels against a service someone else runs (no Ray here, no replica kill)."""
    import requests

    health = requests.get(f"{args.url}/healthz", timeout=30).json()
    n_items = int(health["items"])
    # the service's own bound on a history, from its declared request schema
    spec = requests.get(f"{args.url}/openapi.json", timeout=30).json()
    max_history = min(10, spec["components"]["schemas"]["RecommendBody"]["properties"]["history"]["maxItems"])
    titles = None
    if args.run:
        from sprec_ray.serve.recommender import load_catalogue, load_run

        titles = list(load_catalogue(load_run(args.run)).titles)
    sizes = args.candidates if args.endpoint != "recommend" else [0]
    rows = []
    for size in sizes:
        run_level(args.url, 4, 20, 30, n_items, max_history, args.endpoint, size, titles=titles)  # warm-up
        for level in args.levels:
            row = {"url": args.url, "candidates": size,
                   **run_level(args.url, level, args.requests, args.max_seconds, n_items, max_history, args.endpoint,
                               size, titles=titles)}
            rows.append(row)
            print(f"[{args.url}] c={level}: {row}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance(), "endpoint": args.endpoint, "url": args.url, "rows": rows, "service": health,
        "client_machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                           "processor": platform.processor()},
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
