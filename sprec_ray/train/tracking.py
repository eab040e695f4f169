"""Per-step progress on rank 0: a log line always, plus TensorBoard / W&B / MLflow when configured.

Each training phase is one tracked run named after the phase (r0_sft, r1_dpo, ...); the driver adds a
run "rounds" with the per-round validation and test metrics (`log_rounds`). Where they land by default, all
under the run's output_dir: TensorBoard event files in tensorboard/<phase>; W&B in wandb/ (online
or offline as WANDB_MODE says); MLflow in a local file store mlruns/ unless MLFLOW_TRACKING_URI
names a server. W&B and MLflow need their packages (`pip install -e .[dev]`); `check_logger_available`
verifies that on the driver before any worker starts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_LOG = logging.getLogger("sprec_ray.train")
_NEEDS = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def progress(line: str) -> None:
    """One progress line. Through logging, not print: Ray Train tees a worker's print to its
    logger *and* stdout, which shows every line twice on the driver."""
    if not _LOG.hasHandlers():  # e.g. Ray Train local mode in a bare driver
        _LOG.addHandler(logging.StreamHandler(sys.stderr))
    _LOG.setLevel(logging.INFO)
    _LOG.info(f"{time.strftime('%H:%M:%S')} {line}")


def check_logger_available(logger: str) -> None:
    module = _NEEDS.get(logger)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ImportError(f"train.logger={logger} needs the {module!r} package; install it or set train.logger=none")


def format_line(name: str, step: int, total: int, metrics: dict[str, float], eta_s: float | None = None) -> str:
    keys = [k for k in ("loss", "factual_loss", "reward_margin", "chosen_logratio", "rejected_logratio", "accuracy", "lr",
                        "grad_norm", "tokens_per_s") if k in metrics]
    body = " ".join(f"{k}={metrics[k]:.4g}" for k in keys)
    eta = f" eta {eta_s:.0f}s" if eta_s is not None else ""
    return f"[{name}] step {step}/{total} epoch {int(metrics.get('epoch', 0))} {body}{eta}"


def metric_name(key: str) -> str:
    """MLflow refuses '@' in names; every backend gets the same name (NDCG@5 -> NDCG_at5)."""
    return key.replace("@", "_at")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


class Tracker:
    def __init__(self, rank: int, logger: str, log_dir: Path, name: str, config: dict[str, Any]):
        self.active = rank == 0
        self.name = name
        self._started: tuple[float, int] | None = None  # (time, step) of the first step logged by this attempt
        self._sink: Any = None
        self._kind = logger
        if not self.active or logger == "none":
            return
        # log_dir is <output_dir>/tensorboard/<name>, made absolute on the driver (workers run elsewhere)
        run_dir = log_dir.parent.parent
        experiment = str(config.get("name") or "sprec-ray")
        if logger == "tensorboard":
            from tensorboardX import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self._sink = SummaryWriter(logdir=str(log_dir))
        elif logger == "wandb":
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self._sink = wandb.init(project=os.environ.get("WANDB_PROJECT", "sprec-ray"), group=experiment, name=name,
                                    dir=str(run_dir), config=config, reinit="create_new")
        elif logger == "mlflow":
            from mlflow.tracking import MlflowClient

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").as_uri()
            if uri.startswith("file:"):  # MLflow 3 keeps the file store behind this opt-in
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else client.create_experiment(experiment)
            self._run_id = client.create_run(exp_id, run_name=name).info.run_id
            params = _flatten(config)
            keys = sorted(params)
            from mlflow.entities import Param

            for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self._run_id, params=[Param(k, params[k]) for k in keys[i:i + 100]])
            self._sink = client

    def log(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        if self._started is None:
            self._started = (now - metrics.get("wall_s", 0.0), step - 1)
        t0, s0 = self._started
        progress(format_line(self.name, step, total, metrics, (now - t0) / (step - s0) * (total - step)))
        self.log_metrics(step, metrics, "train")

    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        """`prefix/<metric>` at `step` in the configured backend; non-finite values are skipped."""
        if not self.active or self._sink is None:
            return
        named = {f"{prefix}/{metric_name(k)}": float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and math.isfinite(v)}
        if self._kind == "tensorboard":
            for key, value in named.items():
                self._sink.add_scalar(key, value, step)
            self._sink.flush()
        elif self._kind == "wandb":
            self._sink.log(named, step=step)
        elif self._kind == "mlflow":
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._sink.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in named.items()])

    def close(self) -> None:
        if self._sink is not None and self._kind == "tensorboard":
            self._sink.close()
        elif self._sink is not None and self._kind == "wandb":
            self._sink.finish()
        elif self._sink is not None and self._kind == "mlflow":
            self._sink.set_terminated(self._run_id)
        self._sink = None


def log_rounds(logger: str, config: dict[str, Any], rounds: Sequence[tuple[int, dict[str, float]]],
               tests: Sequence[tuple[int, dict[str, float]]] = ()) -> None:
    """The driver's per-round metrics, as (round, metrics), in one tracked run "rounds": validation as
    round/<metric>, the test split as test/<metric>, each at its round's number as the step."""
    if logger == "none":
        return
    log_dir = Path(str(config.get("output_dir", "."))).resolve() / "tensorboard" / "rounds"
    tracker = Tracker(0, logger, log_dir, "rounds", config)
    by_step: dict[int, list[tuple[str, dict[str, float]]]] = {}
    for prefix, rows in (("round", rounds), ("test", tests)):
        for r, metrics in rows:  # eval.every_round=false leaves gaps; the step stays the round's
            by_step.setdefault(r, []).append((prefix, metrics))
    try:
        for step in sorted(by_step):  # in step order: W&B drops a step below its last
            for prefix, metrics in by_step[step]:
                tracker.log_metrics(step, metrics, prefix)
    finally:
        tracker.close()
