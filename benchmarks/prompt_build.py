"""The warm start's prompt rows: built in the driver (`prompt_table`) vs by Ray Data (`prompt_dataset`).

Each measurement runs in its own process with a fresh local Ray, as a run's first fit does, and
times building the prepared train split's prompts into one table in the driver (a fit gathers them
there anyway). The split is the Goodreads sample's, and optionally the examples of a synthetic
interaction log (`data_pipeline.py`'s generator) to find where Ray Data starts to pay.

    python benchmarks/prompt_build.py [--log-rows 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def measure(path: str, data: str, fmt: str, work: str) -> dict:
    """Runs in a child process: prepare (not timed), then build the train split's prompts one way."""
    import pyarrow as pa
    import ray

    from sprec_ray.config import DataConfig
    from sprec_ray.data.prepared import prepare_dataset
    from sprec_ray.data.sharding import prompt_dataset, prompt_table
    from sprec_ray.runtime import init_ray

    init_ray("", 4)
    cfg = DataConfig(path=data, format=fmt, train_samples=0, valid_samples=0, max_history=10)
    prepared = prepare_dataset(cfg, Path(work) / "prepared", Path(work) / "scratch")
    start = time.perf_counter()
    if path == "driver":
        table = prompt_table(prepared.split_dir("train"), prepared.catalogue, "books")
    else:
        ds = prompt_dataset(prepared.split_dir("train"), prepared.catalogue, "books")
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    wall = time.perf_counter() - start
    ray.shutdown()
    return {"path": path, "rows": table.num_rows, "wall_s": round(wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-rows", type=int, nargs="*", default=[1_000_000],
                        help="synthetic interaction logs to add beside the Goodreads sample")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA pairs per data set")
    parser.add_argument("--out", default=str(RESULTS / "prompt_build.json"))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_pipeline import make_log
    from generate_throughput import matmul_peak

    from sprec_ray.manifest import machine_name

    peak = {t: round(matmul_peak(t, "float32") / 1e9, 1) for t in (1, 2)}
    print(f"{machine_name()}; fp32 matmul peak {peak[1]} / {peak[2]} GFLOP/s (1 / 2 threads)")

    work = Path(tempfile.mkdtemp(prefix="prompt_build_"))
    sets = [("goodreads", str(REPO / "data" / "goodreads"), "sprec_json")]
    for n in args.log_rows:
        sets.append((f"log_{n}", str(make_log(n, work / f"log_{n}.parquet")), "interactions"))
    results = []
    for name, data, fmt in sets:
        for path in ["ray_data", "driver", "driver", "ray_data"] * args.repeats:
            proc = subprocess.run([sys.executable, __file__, "--child", path, data, fmt, str(work / name)],
                                  capture_output=True, text=True, cwd=REPO, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"{name} {path} failed:\n{proc.stderr[-3000:]}")
            results.append({"data": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(f"{name:>16} {path:>9} {results[-1]['rows']:>9} rows {results[-1]['wall_s']:>8.3f} s", flush=True)

    print(f"\n{'data':>16} {'rows':>9} {'driver s':>9} {'Ray Data s':>11}")
    summary = []
    for name, _, _ in sets:
        mine = [r for r in results if r["data"] == name]
        assert len({r["rows"] for r in mine}) == 1, mine  # both paths must build the same rows
        driver = [r["wall_s"] for r in mine if r["path"] == "driver"]
        ray_data = [r["wall_s"] for r in mine if r["path"] == "ray_data"]
        summary.append({"data": name, "rows": mine[0]["rows"], "driver_s": driver, "ray_data_s": ray_data})
        print(f"{name:>16} {mine[0]['rows']:>9} {min(driver):>6.3f}-{max(driver):.3f} {min(ray_data):>6.2f}-{max(ray_data):.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine_name(), "fp32_matmul_peak_gflops": peak,
                                          "results": results, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
