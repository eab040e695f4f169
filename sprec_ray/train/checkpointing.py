"""What a phase checkpoint holds and how a restarted worker group picks it up.

Layout of one Ray Train checkpoint (per-rank directories are merged by Ray in run storage):

    adapter/              PEFT save_pretrained of the LoRA (rank 0; fp32 tensors gathered from ZeRO)
    trainer_state.json    step, per-step metric history, phase + config digest (rank 0)
    engine/               optimizer state: DeepSpeed save_checkpoint (every rank writes its ZeRO
                          partition) or torch optimizer.pt (rank 0, identical on all DDP ranks)

Only trainable parameters are saved; frozen base weights come from the base checkpoint on restore.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import TrainEngine

STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
ENGINE_DIR = "engine"


@dataclass
class TrainerState:
    phase: str
    name: str
    config_digest: str
    step: int = 0
    restored_from: int = 0  # the step of the checkpoint this attempt resumed from (0 = fresh start)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


def save_adapter(engine: TrainEngine, directory: Path, rank: int) -> None:
    """Every rank must call this (gathering ZeRO partitions is collective); rank 0 writes."""
    weights = engine.lora_state_dict()
    if rank == 0:
        engine.peft_model.save_pretrained(str(directory), state_dict=weights)


def write_checkpoint(engine: TrainEngine, state: TrainerState, rank: int, staging: Path) -> Path:
    """Write this rank's part of a checkpoint into a fresh directory under `staging`."""
    staging.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"step{state.step:06d}-rank{rank}-", dir=staging))
    (directory / ENGINE_DIR).mkdir()
    engine.save_state(directory / ENGINE_DIR, rank)
    save_adapter(engine, directory / ADAPTER_DIR, rank)
    if rank == 0:
        (directory / STATE_FILE).write_text(state.to_json())
    return directory


def restore_checkpoint(checkpoint: Any, engine: TrainEngine, phase: str, config_digest: str) -> TrainerState:
    """Load adapter + optimizer state from a Ray Train checkpoint and return its trainer state."""
    with checkpoint.as_directory() as raw:
        directory = Path(raw)
        state = TrainerState.from_json((directory / STATE_FILE).read_text())
        if state.phase != phase or state.config_digest != config_digest:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} belongs to phase {state.phase!r} with config digest {state.config_digest}, "
                f"not phase {phase!r} / {config_digest}; Ray Train resumes runs by (storage_path, name), "
                "so use a new run name or delete the old run directory")
        engine.load_state(directory / ENGINE_DIR, directory / ADAPTER_DIR)
    state.restored_from = state.step
    return state


def export_adapter(checkpoint: Any, out_dir: Path) -> Path:
    """Copy the checkpoint's adapter to `out_dir` (replaced atomically: a crash never leaves half a dir)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with checkpoint.as_directory() as raw:
        shutil.copytree(Path(raw) / ADAPTER_DIR, partial)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def read_state(checkpoint: Any) -> TrainerState:
    with checkpoint.as_directory() as raw:
        return TrainerState.from_json((Path(raw) / STATE_FILE).read_text())
