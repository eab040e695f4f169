"""Driver-side API: run training stages as one Ray Train `TorchTrainer` fit and return their adapters.

    run_fit(cfg, base_model, [Stage(...), ...], init_adapter, name) -> {stage name: PhaseResult}

A round's SFT and DPO run as two stages of one fit: one worker group, one model load, and the DPO
reference pass computed in between from the SFT weights just trained. Run storage is
`cfg.train.storage_path` or `<cfg.output_dir>/ray_results`, run name `name`. Ray Train V2 resumes a
run with the same (storage_path, name), so a driver restarted after a crash continues the fit from its
last checkpoint (at stage granularity); a checkpoint written under a different config is refused.
`train.num_workers = 0` runs Ray Train's local mode (in this process, no process group, plain torch).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from ..config import RunConfig
from ..data.records import DataError
from ..data.sharding import PromptShards
from .checkpointing import export_adapter, read_state
from .loop import FitSpec, StageSpec, train_loop
from .objectives import objective_class
from .stream import RankStream, Span, split_rows
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
    dataset: Any  # PromptShards (id shards on storage), a pyarrow Table of prompt rows, or a ray.data.Dataset of them
    out_dir: Path
    round: int = 0  # 0 = the warm start; a round's SFT trains at sft.round_lr
    objective: str = ""  # a name in train/objectives.OBJECTIVES; "" = the phase's own (sft / dpo)


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


def run_fit(cfg: RunConfig, base_model: Path, stages: Sequence[Stage], init_adapter: Path | None,
            name: str) -> dict[str, PhaseResult]:
    """Train `stages` in order in one worker group; the first starts from `init_adapter` (None = a
    fresh LoRA from cfg.lora), each later one from the weights its predecessor ended with."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..runtime import worker_env

    if len({s.name for s in stages}) != len(stages) or not stages:
        raise ValueError(f"a fit needs distinct stage names, got {[s.name for s in stages]}")
    check_logger_available(cfg.train.logger)
    objectives = [objective_class(s.phase, s.objective) for s in stages]  # before any work: a typo fails here
    started = time.time()
    world = max(1, cfg.train.num_workers)
    spec = FitSpec(
        name=name, stages=tuple(StageSpec(s.phase, s.name, s.round, _shards(cfg, s, world), o)
                                for s, o in zip(stages, objectives, strict=True)), cfg=cfg,
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
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )
    launched = time.time()
    result = trainer.fit()
    ended = time.time()
    if result.checkpoint is None:
        raise RuntimeError(f"fit {name!r} finished without a checkpoint")
    return _stage_results(stages, result.checkpoint, name, (started, launched, ended))


def _stage_results(stages: Sequence[Stage], checkpoint: Any, name: str,
                   clock: tuple[float, float, float]) -> dict[str, PhaseResult]:
    """Each stage's metrics, with the fit's fixed costs placed, and its adapter exported."""
    started, launched, ended = clock
    state = read_state(checkpoint)
    out = {}
    for s in stages:
        done = state.finished.get(s.name)
        if done is None:
            raise RuntimeError(f"fit {name!r} ended without finishing stage {s.name!r}")
        metrics = summarize(done["history"], done["timing"], done["restored_from"])
        metrics["fit_s"] = ended - started
        # Where a fit's fixed cost goes: handing the rows over and starting the worker group before the
        # first stage, the final checkpoint and shutdown after the last (workers' wall clocks; rough after a restart).
        if "entered_at" in metrics:
            metrics["handoff_s"] = launched - started
            metrics["start_s"] = metrics.pop("entered_at") - launched
        if s is stages[-1] and "ended_at" in metrics:
            metrics["end_s"] = ended - metrics["ended_at"]
        metrics.pop("ended_at", None)
        if "first_step_at" in metrics:  # from the fit's start: hand-off, worker start-up, data, first step
            metrics["first_step_s"] = metrics.pop("first_step_at") - started
        t = time.perf_counter()
        adapter = export_adapter(checkpoint, s.out_dir, s.name)
        metrics["export_s"] = time.perf_counter() - t
        out[s.name] = PhaseResult(adapter, metrics, checkpoint.path)
    return out


def _shards(cfg: RunConfig, stage: Stage, world: int) -> tuple[Any, ...]:
    """What each rank trains on. A small stage: its rows, checked and cut to the columns its phase reads,
    as one equal slice per worker in the object store (up to world - 1 rows are left over); a Ray Data
    streaming split cost seconds of actor start-up in every stage of every fit. An SFT stage of id shards
    past train.stream_rows: each rank's row ranges, which the worker streams itself (stream.py)."""
    import ray

    required, optional = _columns(cfg, stage.phase)
    if isinstance(stage.dataset, PromptShards):
        if stage.phase == "sft":
            spans, rows = split_rows(stage.dataset.files(), world)  # Parquet metadata only
            if rows > cfg.train.stream_rows:
                return _streams(cfg, stage, spans, rows, world, required + optional)
        table = stage.dataset.table()
    else:
        table = stage.dataset if isinstance(stage.dataset, pa.Table) else _gather(stage.dataset)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{stage.phase.upper()} dataset lacks column(s) {missing}; it has {table.column_names}")
    table = table.select([*required, *(c for c in optional if c in table.column_names)])
    per = table.num_rows // world
    if per == 0:
        raise DataError(f"{stage.name}: {table.num_rows} rows for train.num_workers={world} workers")
    return tuple(ray.put(table.slice(rank * per, per)) for rank in range(world))


def _columns(cfg: RunConfig, phase: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) columns of a phase's prompt rows."""
    if phase == "sft":
        return SFT_COLUMNS + (("cf_prompt",) if cfg.sft.cft.enabled else ()), ("row_id",)
    return DPO_COLUMNS, ()


def _streams(cfg: RunConfig, stage: Stage, spans: list[tuple[Span, ...]], rows: int, world: int,
             columns: tuple[str, ...]) -> tuple[RankStream, ...]:
    import ray

    if cfg.train.max_tokens_per_batch:
        raise DataError(f"{stage.name}: train.max_tokens_per_batch packs batches over a whole shard, but this stage streams "
                        f"(more than train.stream_rows={cfg.train.stream_rows} rows); set max_tokens_per_batch=0 or raise stream_rows")
    if "cf_prompt" in columns and not stage.dataset.counterfactual:
        raise DataError(f"{stage.name}: sft.cft.enabled needs cf_prompt, but the stage's PromptShards build none")
    if rows // world == 0:
        raise DataError(f"{stage.name}: {rows} rows for train.num_workers={world} workers")
    step_rows = cfg.sft.batch_size * cfg.sft.grad_accum
    window = math.ceil(cfg.train.stream_window_rows / step_rows) * step_rows
    titles = ray.put(list(stage.dataset.titles))
    shards = dataclasses.replace(stage.dataset, titles=())
    return tuple(RankStream(s, rows // world, window, titles, shards, columns) for s in spans)


def _gather(dataset: Any) -> pa.Table:
    """A Ray Dataset's rows as one table (its pipeline runs here, across the cluster)."""
    import ray

    tables = [t for t in ray.get(dataset.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
