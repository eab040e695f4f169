"""Per-step progress on rank 0: a log line always, plus TensorBoard / W&B / MLflow when configured.

TensorBoard goes through tensorboardX (shipped with ray[train]); W&B and MLflow go through Ray's own
integrations (`setup_wandb`, `setup_mlflow`) and need their packages installed, which
`check_logger_available` verifies on the driver before any worker starts.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
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
    keys = [k for k in ("loss", "factual_loss", "reward_margin", "accuracy", "lr", "grad_norm", "tokens_per_s") if k in metrics]
    body = " ".join(f"{k}={metrics[k]:.4g}" for k in keys)
    eta = f" eta {eta_s:.0f}s" if eta_s is not None else ""
    return f"[{name}] step {step}/{total} epoch {int(metrics.get('epoch', 0))} {body}{eta}"


class Tracker:
    def __init__(self, rank: int, logger: str, log_dir: Path, name: str, config: dict[str, Any]):
        self.active = rank == 0
        self.name = name
        self._started: tuple[float, int] | None = None  # (time, step) of the first step logged by this attempt
        self._sink: Any = None
        self._kind = logger
        if not self.active or logger == "none":
            return
        if logger == "tensorboard":
            from tensorboardX import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self._sink = SummaryWriter(logdir=str(log_dir))
        elif logger == "wandb":
            from ray.air.integrations.wandb import setup_wandb

            self._sink = setup_wandb(config=config, project=name, rank_zero_only=True)
        elif logger == "mlflow":
            from ray.air.integrations.mlflow import setup_mlflow

            self._sink = setup_mlflow(config=config, experiment_name=name, rank_zero_only=True)

    def log(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        if self._started is None:
            self._started = (now - metrics.get("wall_s", 0.0), step - 1)
        t0, s0 = self._started
        progress(format_line(self.name, step, total, metrics, (now - t0) / (step - s0) * (total - step)))
        if self._sink is None:
            return
        if self._kind == "tensorboard":
            for key, value in metrics.items():
                self._sink.add_scalar(f"train/{key}", value, step)
            self._sink.flush()
        elif self._kind == "wandb":
            self._sink.log(metrics, step=step)
        elif self._kind == "mlflow":
            self._sink.log_metrics(metrics, step=step)

    def close(self) -> None:
        if self._sink is not None and self._kind == "tensorboard":
            self._sink.close()
        elif self._sink is not None and self._kind == "wandb":
            self._sink.finish()
