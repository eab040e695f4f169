"""Raw interaction logs -> example shards: the Ray pipeline vs the in-memory reader.

Synthetic logs (Zipf item popularity over 100k items, 200k users) of 1M and 10M rows as Parquet.
Each measurement runs in its own process, so driver peak RSS (ru_maxrss) is that path's alone.
`wall_s` of the Ray path is prepare itself on a running Ray instance (a run's driver starts Ray
once for every phase); `ray_init_s` is shown beside it.

    python benchmarks/data_pipeline.py [--rows 1000000 10000000] [--skip-reference-above 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).resolve().parent / "results"
ITEMS, USERS = 100_000, 200_000


def make_log(rows: int, path: Path, seed: int = 0) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, ITEMS + 1) ** 1.1
    chunk = 1_000_000
    with pq.ParquetWriter(path, pa.schema([("user", pa.string()), ("item", pa.string()), ("timestamp", pa.int64())])) as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            items = rng.choice(ITEMS, n, p=weights / weights.sum())
            users = rng.integers(0, USERS, n)
            table = pa.table({"user": pa.array(np.char.add("u", users.astype(str))),
                              "item": pa.array(np.char.add("i", items.astype(str))),
                              "timestamp": rng.integers(1_000_000_000, 1_700_000_000, n)})
            w.write_table(table, row_group_size=250_000)
    return path


def measure(kind: str, log: str, work: str) -> dict:
    """Runs in a child process: one path, its wall time and this process's peak RSS."""
    from sprec_ray.config import DataConfig

    cfg = DataConfig(path=log, format="interactions", max_history=10)
    extra = {}
    if kind == "current":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from reference import read_interactions  # the in-memory split the tests hold the pipeline to

        start = time.perf_counter()
        catalogue, splits, _ = read_interactions(log, None, cfg.max_history)
        wall = time.perf_counter() - start
        counts = {k: len(v) for k, v in splits.items()}
    else:
        import ray

        from sprec_ray.data.prepared import prepare_dataset

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False)
        extra["ray_init_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        data = prepare_dataset(cfg, Path(work) / "prepared", Path(work) / "scratch")
        wall = time.perf_counter() - start
        counts = {"train": data.counts["train"], "valid": data.counts["valid"], "test": data.counts["test"]}
        ray.shutdown()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": kind, "wall_s": round(wall, 2), "driver_peak_rss_mb": round(peak_mb, 1), "counts": counts, **extra}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sprec_data_bench"))
    parser.add_argument("--note", default="", help="e.g. whether other work shared the cores")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        log = make_log(rows, work / f"log_{rows}.parquet")
        for kind in ("ray_pipeline", "current"):
            out = work / f"run_{kind}_{rows}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            proc = subprocess.run([sys.executable, __file__, "--child", kind, str(log), str(out)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{kind} at {rows} rows failed:\n{proc.stderr[-3000:]}")
            result = {"rows": rows, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(result)
            print(json.dumps(result), flush=True)
    for r in results:  # both paths must agree on what they built
        other = next(o for o in results if o["rows"] == r["rows"] and o["path"] != r["path"])
        assert r["counts"] == other["counts"], (r, other)
    from provenance import provenance

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_pipeline.json").write_text(json.dumps({**provenance(), "note": args.note,
                                                            "results": results}, indent=2) + "\n")
    print("\n| rows | path | wall_s | driver_peak_rss_mb | ray_init_s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['path']} | {r['wall_s']} | {r['driver_peak_rss_mb']} | {r.get('ray_init_s', '')} |")


if __name__ == "__main__":
    main()
