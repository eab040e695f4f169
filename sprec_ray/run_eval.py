"""`sprec-ray eval`: score a finished run's adapter on its valid or test split, or on a data file.

Side-effect free: the run's existing files are never changed. Results go to a new
<run>/evals/<UTC time>/ (metrics.json, predictions.jsonl), or with `out` to that file and
<stem>.predictions.jsonl beside it, and then nothing at all is written in the run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError
from .data.records import DataError


def evaluate_run(run: str | Path, overrides: list[str] | tuple[str, ...] = (), split: Literal["valid", "test"] = "valid",
                 data: str | Path | None = None, adapter: str | Path | None = None,
                 out: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Metrics of the run's final adapter (or `adapter`) on `split`, or on `data` (SPRec or S-DPO
    JSON: a file, or a directory holding the split's data.valid_file / data.test_file), read against
    the run's catalogue. Returns the metrics and the path of the metrics JSON written."""
    from .data.prepared import open_prepared
    from .data.readers import read_eval_file
    from .generate.backends import Decoding
    from .serve.recommender import load_run
    from .session import RunSession, attach

    info = load_run(run, overrides)  # checks final.json and the files it names
    run_dir = info.run_dir
    if out is not None:
        out = Path(out).expanduser().resolve()
        if out.is_relative_to(run_dir):
            raise ConfigError(f"--out {out} lies inside the run directory {run_dir}; eval never writes into a run "
                              f"there (leave --out out to write a new <run>/evals/<time>/)")
    # the run as found, wherever it was moved since it was trained; a session writes nothing into it
    cfg = dataclasses.replace(info.cfg, output_dir=str(run_dir))
    attach(cfg, run_dir)
    session = RunSession(cfg, run_dir, open_prepared(run_dir / "data" / "prepared"), info.base_ref)
    try:
        if data is not None:
            path = Path(data).expanduser()
            if path.is_dir():
                path = path / (cfg.data.test_file if split == "test" else cfg.data.valid_file)
            rows = read_eval_file(path, session.data.catalogue, cfg.data.max_history)
        elif not session.data.counts.get(split):
            raise DataError(f"the run {run_dir} has no {split} rows (data.{split}_file {getattr(cfg.data, f'{split}_file')!r}"
                            f" under data.path); pass --data FILE to evaluate on a file")
        else:
            rows = session.valid_rows if split == "valid" else session.test_rows
        adapter_dir = str(Path(adapter).resolve()) if adapter else (str(info.adapter) if info.adapter else None)
        greedy = Decoding("greedy", 1, max_new_tokens=cfg.generation.max_new_tokens)
        [(completions, timing)] = session.generate([(session.prompts(rows), greedy)], adapter_dir,
                                                  round_id=info.round + 1)
        if out is None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            out_dir, n = run_dir / "evals" / stamp, 1
            while out_dir.exists():  # two evals within one second
                out_dir, n = run_dir / "evals" / f"{stamp}-{n}", n + 1
            out, predictions = out_dir / "metrics.json", out_dir / "predictions.jsonl"
        else:
            predictions = out.with_name(f"{out.stem}.predictions.jsonl")
        _, metrics = session.evaluate(rows, completions, timing, predictions, adapter_dir, info.round + 1)
    finally:
        session.shutdown_pool()
    header = {"adapter": adapter_dir, "split": None if data is not None else split,
              "data": str(path) if data is not None else None, "task": cfg.data.task}
    out.write_text(json.dumps({**header, **metrics}, indent=2))
    return metrics, out
