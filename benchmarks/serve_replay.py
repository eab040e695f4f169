"""Replay a run's validation histories through a running service's /recommend and compare what
`GET /stats` reports for the live adapter with the run's offline evaluation of the same round.

The service must be fresh (its stats window empty) or just switched to the adapter to check; the
offline figures come from the run's `metrics.json` (`rounds[i]` with `round == --round`). Answers are
asked for with `exclude_history: false` and `k` = the run's largest eval K, as evaluation ranks them.

    .venv/bin/sprec-ray serve --run runs/default serve.port=8011 &        # serves the final round
    .venv/bin/python benchmarks/serve_replay.py --run runs/default --url http://127.0.0.1:8011 --round 2
    .venv/bin/sprec-ray deploy --run runs/default ray_address=<printed by serve> --adapter adapters/smollm2-goodreads-sft
    .venv/bin/python benchmarks/serve_replay.py --run runs/default --url http://127.0.0.1:8011 --round 0 \
        --out benchmarks/results/serve_replay.json

Appends one entry per call to --out (default benchmarks/results/serve_replay.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from provenance import REPO, provenance

from sprec_ray.config import load_config
from sprec_ray.data.prepared import open_prepared

COMPARED = ("DivRatio", "ORRatio")


def replay(url: str, histories: list[list[int]], k: int, clients: int) -> list[dict]:
    def post(history: list[int]) -> dict:
        resp = requests.post(f"{url}/recommend", json={"history": history, "k": k, "exclude_history": False},
                             timeout=900)
        resp.raise_for_status()
        return resp.json()

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(post, histories))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--round", type=int, required=True, help="the run's round whose offline metrics the live adapter must match")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_replay.json")
    args = ap.parse_args()
    cfg = load_config(args.run / "config.yaml")
    data = open_prepared(args.run / "data" / "prepared")
    rows = data.head("valid", data.counts["valid"])
    answers = replay(args.url, [list(r.history) for r in rows], max(cfg.eval.ks), args.clients)
    stats = requests.get(f"{args.url}/stats", timeout=60).json()
    live = stats["live"]
    entry = stats["adapters"][live["sha256"][:12]]
    offline = next(r for r in json.loads((args.run / "metrics.json").read_text())["rounds"] if r["round"] == args.round)
    keys = [f"{name}@{k}" for k in cfg.eval.ks for name in COMPARED] + ["top10_share@1", "distinct_answers"]
    compared = {key: {"live": entry["metrics"][key], "offline": offline[key]} for key in keys}
    compared["not_in_catalogue_share"] = {"live": entry["metrics"]["not_in_catalogue_share"],
                                          "offline": 1 - offline["exact_share"]}
    result = {"round": args.round, "adapter": live, "rows": len(rows), "responses_in_window": entry["responses_total"],
              "answers_named_adapter": sorted({a["adapter"]["sha256"][:12] for a in answers}), "metrics": compared,
              "equal": all(abs(v["live"] - v["offline"]) < 1e-9 for v in compared.values())}
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = [r for r in report.get("runs", []) if r["round"] != args.round] + [result]
    args.out.write_text(json.dumps({**provenance(), "run": str(args.run), "runs": runs}, indent=2) + "\n")
    print(f"round {args.round}, adapter {live['sha256'][:12]}, {len(rows)} rows, {entry['responses_total']} in the window")
    print("| metric | live (/stats) | offline (metrics.json) |\n|---|---:|---:|")
    for key, v in compared.items():
        print(f"| {key} | {v['live']:.6f} | {v['offline']:.6f} |")
    print(f"equal: {result['equal']}; wrote {args.out}")


if __name__ == "__main__":
    main()
