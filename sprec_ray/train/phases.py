"""Driver-side API: run one SFT or DPO phase as a Ray Train `TorchTrainer` and return its adapter.

    run_sft(cfg, base_model, train_ds, out_dir, init_adapter, name) -> PhaseResult
    run_dpo(cfg, base_model, pairs_ds, out_dir, sft_adapter, name) -> PhaseResult

Run storage is `cfg.train.storage_path` or `<cfg.output_dir>/ray_results`, run name `name`. Ray Train
V2 resumes a run with the same (storage_path, name), so a driver restarted after a crash continues the
phase from its last checkpoint; a checkpoint written under a different config is refused (use a new
name). `train.num_workers = 0` runs Ray Train's local mode (in this process, no process group, plain
torch): the single-process reference used by the tests.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, RunConfig
from ..data.records import DataError
from .checkpointing import export_adapter, read_state
from .loop import FAULT_ENV, PhaseSpec, train_loop
from .tracking import check_logger_available

if TYPE_CHECKING:
    import ray.data

SFT_COLUMNS = ("prompt", "response")
DPO_COLUMNS = ("row_id", "prompt", "response", "rejected")
_MEAN_KEYS = ("loss", "factual_loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "grad_norm")


@dataclass(frozen=True)
class PhaseResult:
    adapter_dir: Path  # PEFT save_pretrained dir (adapter only, no tokenizer files in it)
    metrics: dict[str, float]  # phase means of loss (+ DPO rewards, accuracy), final_loss, tokens_per_s, steps
    checkpoint_path: str  # the Ray Train checkpoint it came from


def summarize(history: list[dict[str, float]], restored_from: int = 0) -> dict[str, float]:
    """Phase metrics from the per-step history: means over all steps, plus first/final loss.
    tokens_per_s leaves out the first step (warm-up: allocator, kernels) when there are more."""
    if not history:
        return {"steps": 0.0}
    out: dict[str, float] = {}
    for key in _MEAN_KEYS:
        values = [h[key] for h in history if key in h]
        if values:
            out[key] = sum(values) / len(values)
    timed = history[1:] if len(history) > 1 else history
    out["tokens_per_s"] = sum(h["tokens"] for h in timed) / sum(h["step_time_s"] for h in timed)
    out["first_loss"] = history[0]["loss"]
    out["final_loss"] = history[-1]["loss"]
    if "accuracy" in history[-1]:
        out["final_accuracy"] = history[-1]["accuracy"]
        out["final_reward_margin"] = history[-1]["reward_margin"]
    out["steps"] = float(len(history))
    out["compute_s"] = sum(h["step_time_s"] for h in history)  # phase wall time minus this = orchestration
    if any("reference_s" in h for h in history):
        out["reference_s"] = sum(h.get("reference_s", 0.0) for h in history)  # DPO's no-grad reference pass
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
    if cfg.train.checkpoint_every < 1:
        raise ConfigError(f"train.checkpoint_every must be >= 1, got {cfg.train.checkpoint_every}")
    if cfg.train.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm must be > 0, got {cfg.train.max_grad_norm}")
    check_logger_available(cfg.train.logger)
    columns = _known_columns(ds)
    missing = [c for c in required if columns is not None and c not in columns]
    if missing:
        raise DataError(f"{phase} dataset lacks column(s) {missing}; it has {columns}")
    return columns


def _run(phase: str, cfg: RunConfig, base_model: Path, ds: ray.data.Dataset, out_dir: Path,
         init_adapter: Path | None, name: str, columns: tuple[str, ...] | None) -> PhaseResult:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..runtime import worker_env

    spec = PhaseSpec(
        phase=phase, name=name, cfg=cfg, base_model=str(Path(base_model).resolve()),
        init_adapter=str(Path(init_adapter).resolve()) if init_adapter else None,
        log_dir=str((Path(cfg.output_dir) / "tensorboard" / name).resolve()),
        staging_dir=str(Path(tempfile.gettempdir()) / "sprec_ray_ckpt" / f"{name}-{os.getpid()}"),
        env=tuple(sorted(worker_env().items())), fault=os.environ.get(FAULT_ENV, ""))
    local = cfg.train.num_workers == 0
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=None if local else {"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path(cfg),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds.select_columns(list(columns)) if columns else ds},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{phase} phase {name!r} finished without a checkpoint")
    state = read_state(result.checkpoint)
    adapter = export_adapter(result.checkpoint, Path(out_dir))
    return PhaseResult(adapter, summarize(state.history, state.restored_from), result.checkpoint.path)


def run_sft(cfg: RunConfig, base_model: Path, train_ds: ray.data.Dataset, out_dir: Path,
            init_adapter: Path | None, name: str) -> PhaseResult:
    """SFT (or CFT when cfg.sft.cft.enabled) on columns prompt, response (+ cf_prompt, optional row_id).
    `init_adapter=None` starts a fresh LoRA from cfg.lora; otherwise that adapter keeps training."""
    required = SFT_COLUMNS + (("cf_prompt",) if cfg.sft.cft.enabled else ())
    known = _check(cfg, train_ds, required, "SFT")
    columns = None if known is None else required + (("row_id",) if "row_id" in known else ())
    return _run("sft", cfg, base_model, train_ds, out_dir, init_adapter, name, columns)


def run_dpo(cfg: RunConfig, base_model: Path, pairs_ds: ray.data.Dataset, out_dir: Path,
            sft_adapter: Path, name: str) -> PhaseResult:
    """DPO / S-DPO (cfg.dpo.loss) on columns row_id, prompt, response (chosen), rejected (K strings).
    The policy starts from `sft_adapter`, which is also the reference model."""
    known = _check(cfg, pairs_ds, DPO_COLUMNS, "DPO")
    return _run("dpo", cfg, base_model, pairs_ds, out_dir, sft_adapter, name, DPO_COLUMNS if known else None)


def with_train(cfg: RunConfig, **changes: Any) -> RunConfig:
    """cfg with `train.<key>` replaced (no validation: num_workers=0 selects local mode)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
