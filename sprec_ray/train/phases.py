"""Driver-side API: run training stages as one Ray Train `TorchTrainer` fit and return their adapters.

    run_fit(cfg, base_model, [Stage(...), ...], init_adapter, name) -> {stage name: PhaseResult}

A round's SFT and DPO run as two stages of one fit: one worker group, one model load, and the DPO
reference pass computed in between from the SFT weights just trained. Run storage is
`cfg.train.storage_path` or `<cfg.output_dir>/ray_results`, run name `name`. Ray Train V2 resumes a
run with the same (storage_path, name), so a driver restarted after a crash continues the fit from its
last checkpoint (at stage granularity); a checkpoint written under a different config is refused.
`train.num_workers = 0` runs Ray Train's local mode (in this process, no process group, plain torch):
the single-process reference used by the tests.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import RunConfig
from ..data.records import DataError
from .checkpointing import export_adapter, read_state
from .loop import FitSpec, StageSpec, train_loop
from .tracking import check_logger_available

SFT_COLUMNS = ("prompt", "response")
DPO_COLUMNS = ("row_id", "prompt", "response", "rejected")
_MEAN_KEYS = ("loss", "factual_loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy",
              "chosen_logratio", "rejected_logratio", "grad_norm")


@dataclass(frozen=True)
class PhaseResult:
    adapter_dir: Path  # PEFT save_pretrained dir (adapter only, no tokenizer files in it)
    metrics: dict[str, float]  # phase means of loss (+ DPO rewards, accuracy), final_loss, tokens_per_s, steps
    checkpoint_path: str  # the Ray Train checkpoint it came from


@dataclass(frozen=True)
class Stage:
    """One stage of a fit: what it trains on and where its adapter goes."""

    phase: Literal["sft", "dpo"]
    name: str
    dataset: Any  # ray.data.Dataset
    out_dir: Path
    round: int = 0  # 0 = the warm start; a round's SFT trains at sft.round_lr


def summarize(history: list[dict[str, float]], timing: dict[str, float], restored_from: int = 0) -> dict[str, float]:
    """Stage metrics from the per-step history: means over all steps, first/final loss, and timing.
    Throughputs leave out the first step (warm-up: allocator, kernels) when there are more:
    tokens_per_s over step compute time, wall_tokens_per_s over the loop's wall time."""
    if not history:
        return {"steps": 0.0}
    out: dict[str, float] = {}
    for key in _MEAN_KEYS:
        values = [h[key] for h in history if key in h]
        if values:
            out[key] = sum(values) / len(values)
    timed = history[1:] if len(history) > 1 else history
    tokens = sum(h["tokens"] for h in timed)
    out["tokens_per_s"] = tokens / sum(h["step_time_s"] for h in timed)
    if all("wall_s" in h for h in timed):
        out["wall_tokens_per_s"] = tokens / sum(h["wall_s"] for h in timed)
    out["first_loss"] = history[0]["loss"]
    out["final_loss"] = history[-1]["loss"]
    if "accuracy" in history[-1]:
        out["final_accuracy"] = history[-1]["accuracy"]
        for key in ("reward_margin", "chosen_logratio", "rejected_logratio"):
            out[f"final_{key}"] = history[-1][key]
    out["steps"] = float(len(history))
    out["compute_s"] = sum(h["step_time_s"] for h in history)  # stage wall time minus this = orchestration
    out.update({k: float(v) for k, v in timing.items()})  # setup_s, data_s, reference_s / prepare_s, loop_s
    out["restored_from_step"] = float(restored_from)
    return out


def storage_path(cfg: RunConfig) -> str:
    if cfg.train.storage_path:
        return cfg.train.storage_path
    return str((Path(cfg.output_dir) / "ray_results").resolve())


def _known_columns(ds: Any) -> list[str] | None:
    """Column names when Ray Data knows them without executing anything (None otherwise: a
    map_batches pipeline is only checked on the workers, where a missing column is a DataError)."""
    schema = ds.schema(fetch_if_missing=False)
    return list(schema.names) if schema is not None else None


def _check(cfg: RunConfig, ds: Any, required: tuple[str, ...], phase: str) -> list[str] | None:
    check_logger_available(cfg.train.logger)
    columns = _known_columns(ds)
    missing = [c for c in required if columns is not None and c not in columns]
    if missing:
        raise DataError(f"{phase} dataset lacks column(s) {missing}; it has {columns}")
    return columns


def run_fit(cfg: RunConfig, base_model: Path, stages: Sequence[Stage], init_adapter: Path | None,
            name: str) -> dict[str, PhaseResult]:
    """Train `stages` in order in one worker group; the first starts from `init_adapter` (None = a
    fresh LoRA from cfg.lora), each later one from the weights its predecessor ended with."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..runtime import worker_env

    if len({s.name for s in stages}) != len(stages) or not stages:
        raise ValueError(f"a fit needs distinct stage names, got {[s.name for s in stages]}")
    datasets = {s.name: _checked(cfg, s) for s in stages}
    spec = FitSpec(
        name=name, stages=tuple(StageSpec(s.phase, s.name, s.round) for s in stages), cfg=cfg,
        base_model=str(base_model),
        init_adapter=str(Path(init_adapter).resolve()) if init_adapter else None,
        log_dir=str((Path(cfg.output_dir) / "tensorboard").resolve()),
        staging_dir=str(Path(tempfile.gettempdir()) / "sprec_ray_ckpt" / f"{name}-{os.getpid()}"),
        env=tuple(sorted(worker_env().items())))
    local = cfg.train.num_workers == 0
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=None if local else resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path(cfg),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),  # resume needs the latest only
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )
    started = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"fit {name!r} finished without a checkpoint")
    state = read_state(result.checkpoint)
    out = {}
    for s in stages:
        done = state.finished.get(s.name)
        if done is None:
            raise RuntimeError(f"fit {name!r} ended without finishing stage {s.name!r}")
        metrics = summarize(done["history"], done["timing"], done["restored_from"])
        metrics["fit_s"] = fit_s
        out[s.name] = PhaseResult(export_adapter(result.checkpoint, s.out_dir, s.name), metrics, result.checkpoint.path)
    return out


def _checked(cfg: RunConfig, stage: Stage) -> Any:
    """The stage's dataset reduced to the columns its phase reads (checked on the driver when known)."""
    if stage.phase == "sft":
        required = SFT_COLUMNS + (("cf_prompt",) if cfg.sft.cft.enabled else ())
        known = _check(cfg, stage.dataset, required, "SFT")
        columns = None if known is None else required + (("row_id",) if "row_id" in known else ())
    else:
        known = _check(cfg, stage.dataset, DPO_COLUMNS, "DPO")
        columns = DPO_COLUMNS if known else None
    return stage.dataset.select_columns(list(columns)) if columns else stage.dataset


def with_train(cfg: RunConfig, **changes: Any) -> RunConfig:
    """cfg with `train.<key>` replaced (no validation: num_workers=0 selects local mode)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
