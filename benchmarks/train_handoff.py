"""The warm start on a synthetic interaction log: how the train split reaches the Ray Train workers.

Runs `sprec-ray train` (tiny model, sft.max_steps small, no self-play rounds) on the logs of
`data_pipeline.py` and samples, every 0.5 s over the whole run, the driver's RSS and each Ray Train
worker's RSS. `after` is this checkout (a split past train.stream_rows streams to the workers);
`before` is another checkout (`--before DIR`, e.g. a `git worktree` of the commit before streaming)
run with the same venv, where the driver gathers the split and puts one slice per worker. A run whose
machine's available memory falls under `--min-free-gb` is stopped and recorded as far as it got.

    git worktree add /tmp/sprec_before 0ee6f5e
    python benchmarks/train_handoff.py --before /tmp/sprec_before --rows 1000000 10000000 --before-rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FIRST_STEP = re.compile(r"\[r0_sft\] step 1/")


def overrides(log: Path, out: Path, max_steps: int) -> list[str]:
    return [f"output_dir={out}", f"data.path={log}", "data.format=interactions", "data.train_samples=0",
            "data.valid_samples=8", "data.test_samples=8", "data.max_history=10", "selfplay.rounds=0",
            f"sft.max_steps={max_steps}", "eval.embedder=hash", "train.log_every=1"]


class Sampler(threading.Thread):
    """Peak RSS of the driver process and of every Ray Train worker, and the machine's lowest available memory."""

    def __init__(self, driver: int, min_free_gb: float, on_low: Callable[[], None]):
        super().__init__(daemon=True)
        self.driver, self.min_free, self.on_low = driver, min_free_gb * 2**30, on_low
        self.driver_peak, self.workers, self.lowest_free = 0, {}, psutil.virtual_memory().available
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.driver_peak = max(self.driver_peak, psutil.Process(self.driver).memory_info().rss)
            except psutil.NoSuchProcess:
                return
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = proc.info["cmdline"] or []
                if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
                    try:
                        rss = proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
                    self.workers[proc.info["pid"]] = max(self.workers.get(proc.info["pid"], 0), rss)
            self.lowest_free = min(self.lowest_free, psutil.virtual_memory().available)
            if self.lowest_free < self.min_free:
                self.on_low()
                return
            self.stop.wait(0.5)


def measure(path: str, rows: int, log: Path, work: Path, checkout: Path, max_steps: int, min_free_gb: float,
            timeout_s: float) -> dict:
    out = work / f"run_{path}_{rows}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sprec_ray.cli", "train", "--config", str(checkout / "configs" / "tiny.yaml"),
           *overrides(log, out, max_steps)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped: list[str] = []

    def stop(why: str) -> None:
        stopped.append(why)
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()

    sampler = Sampler(proc.pid, min_free_gb, lambda: stop(f"available memory under {min_free_gb} GB"))
    sampler.start()
    timer = threading.Timer(timeout_s, lambda: stop(f"still running after {timeout_s:.0f} s"))
    timer.start()
    first_step_s, tail = None, []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if first_step_s is None and FIRST_STEP.search(line):
            first_step_s = time.perf_counter() - started
    proc.wait()
    timer.cancel()
    sampler.stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0 and not stopped:
        raise SystemExit(f"{path} at {rows} rows failed:\n{''.join(tail)}")
    result = {"rows": rows, "path": path, "driver_peak_rss_mb": round(sampler.driver_peak / 2**20),
              "worker_peak_rss_mb": round(max(sampler.workers.values(), default=0) / 2**20),
              "workers_peak_rss_mb": [round(v / 2**20) for v in sampler.workers.values()],
              "first_step_s": round(first_step_s, 1) if first_step_s is not None else None,
              "wall_s": round(wall, 1), "lowest_available_gb": round(sampler.lowest_free / 2**30, 1),
              "stopped": stopped[0] if stopped else ""}
    prepared = out / "manifests" / "prepare.json"
    if prepared.exists():
        result["split_rows"] = int(json.loads(prepared.read_text())["metrics"]["train_rows"])
    manifest = out / "manifests" / "r0_sft.json"
    if manifest.exists():
        metrics = json.loads(manifest.read_text())["metrics"]
        ranks = sorted(int(m.group(1)) for k in metrics if (m := re.fullmatch(r"rank(\d+)_rows", k)))
        result["rank_rows"] = [metrics[f"rank{r}_rows"] for r in ranks]
        result["train_rows"] = sum(result["rank_rows"]) or None
        result["steps"] = metrics.get("steps")
        result["fit_first_step_s"] = round(metrics["first_step_s"], 1) if "first_step_s" in metrics else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--before", type=Path, help="a checkout of the commit to compare with (same venv)")
    parser.add_argument("--before-rows", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--min-free-gb", type=float, default=6.0)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sprec_data_bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_handoff.json")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "benchmarks"))
    from data_pipeline import make_log
    from generate_throughput import matmul_peak
    from provenance import git_commit, provenance

    from sprec_ray.manifest import machine_name

    peak = {t: round(matmul_peak(t, "float32") / 1e9, 1) for t in (1, 2)}
    print(f"{machine_name()}; fp32 matmul peak {peak[1]} / {peak[2]} GFLOP/s (1 / 2 threads)", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    plan = [(rows, "after", REPO) for rows in args.rows]
    if args.before:
        plan = [(rows, "before", args.before.resolve()) for rows in args.before_rows] + plan
    results = []
    for rows, path, checkout in sorted(plan, key=lambda p: (p[0], p[1])):
        log = make_log(rows, args.work / f"log_{rows}.parquet")
        results.append(measure(path, rows, log, args.work, checkout, args.max_steps, args.min_free_gb, args.timeout_s))
        print(json.dumps(results[-1]), flush=True)

    before = git_commit(args.before) if args.before else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance(peak_gflops=peak), "benchmark": "train_handoff", "before_commit": before,
        "fp32_matmul_peak_gflops": peak,
        "results": results}, indent=2) + "\n")
    print("\n| log rows | train split | path | driver peak MB | worker peak MB | first step s | rows read per rank | stopped |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r.get('split_rows', '')} | {r['path']} | {r['driver_peak_rss_mb']} | {r['worker_peak_rss_mb']} | {r['first_step_s']} | "
              f"{r.get('rank_rows', '')} | {r['stopped']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
