"""What a checkpoint of a (multi-stage) fit holds and how a restarted worker group picks it up.

Layout of one Ray Train checkpoint (per-rank directories are merged by Ray in run storage):

    trainer_state.json    current stage, its step and per-step history, the finished stages' histories (rank 0)
    engine/               mid-stage only: the LoRA weights and their optimizer state. DeepSpeed save_checkpoint
                          (every rank writes its ZeRO partition of the fp32 weights and Adam moments, no module
                          weights) or the torch engine's optimizer.pt and lora.safetensors (rank 0)
    adapter/              a finished stage only: PEFT save_pretrained of its final LoRA (rank 0). The next
                          stage starts fresh Adam moments, so a finished stage needs no optimizer state
    stages/<name>/        the final adapter of every earlier stage finished so far (rank 0)

Only trainable parameters are saved, once each: frozen base weights come from the base checkpoint
on restore. A fit's last checkpoint holds every stage's adapter: the driver exports them from it.
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
STAGES_DIR = "stages"

AdapterFiles = dict[str, bytes]  # a finished stage's adapter dir, file name -> content (a few MB at most)


@dataclass
class TrainerState:
    phase: str  # of the current stage: sft | dpo
    name: str  # of the current stage, e.g. r1_dpo
    config_digest: str
    step: int = 0
    done: bool = False  # the current stage finished (its adapter is also under stages/)
    restored_from: int = 0  # the step of the checkpoint this attempt resumed the stage from (0 = fresh start)
    history: list[dict[str, float]] = field(default_factory=list)
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {phase, history, timing, restored_from}

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


def read_adapter_files(directory: Path) -> AdapterFiles:
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


def write_checkpoint(engine: TrainEngine, state: TrainerState, rank: int, staging: Path,
                     finished: dict[str, AdapterFiles]) -> Path:
    """Write this rank's part of a checkpoint into a fresh directory under `staging`."""
    staging.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{state.name}-step{state.step:06d}-rank{rank}-", dir=staging))
    if state.done:
        save_adapter(engine, directory / ADAPTER_DIR, rank)
    else:
        (directory / ENGINE_DIR).mkdir()
        engine.save_state(directory / ENGINE_DIR, rank)
    if rank == 0:
        if state.done:  # the stage's final adapter joins the finished ones, in this and every later checkpoint
            finished[state.name] = read_adapter_files(directory / ADAPTER_DIR)
        for name, files in finished.items():
            if name == state.name:
                continue  # adapter/ is this stage's final adapter
            (directory / STAGES_DIR / name).mkdir(parents=True)
            for file, blob in files.items():
                (directory / STAGES_DIR / name / file).write_bytes(blob)
        (directory / STATE_FILE).write_text(state.to_json())
    return directory


def read_checkpoint(checkpoint: Any, config_digest: str, stage_names: list[str]) -> tuple[TrainerState, dict[str, AdapterFiles]]:
    """The trainer state and finished stages' adapters of a checkpoint, checked against this fit."""
    with checkpoint.as_directory() as raw:
        directory = Path(raw)
        state = TrainerState.from_json((directory / STATE_FILE).read_text())
        if state.name not in stage_names or state.config_digest != config_digest:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} belongs to stage {state.name!r} with config digest {state.config_digest}, "
                f"not one of {stage_names} / {config_digest}; Ray Train resumes runs by (storage_path, name), "
                "so use a new run name or delete the old run directory")
        finished = {name: read_adapter_files(_stage_dir(directory, state, name)) for name in state.finished}
    return state, finished


def _stage_dir(directory: Path, state: TrainerState, stage: str) -> Path:
    """Where a checkpoint keeps a finished stage's adapter (see the module docstring)."""
    return directory / (ADAPTER_DIR if stage == state.name and state.done else f"{STAGES_DIR}/{stage}")


def load_engine_state(checkpoint: Any, engine: TrainEngine) -> None:
    """LoRA weights and optimizer state of the checkpoint's current, unfinished stage."""
    with checkpoint.as_directory() as raw:
        engine.load_state(Path(raw) / ENGINE_DIR)


def export_adapter(checkpoint: Any, out_dir: Path, stage: str) -> Path:
    """Copy a finished stage's adapter to `out_dir` (replaced atomically: a crash never leaves half a dir)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with checkpoint.as_directory() as raw:
        source = _stage_dir(Path(raw), TrainerState.from_json((Path(raw) / STATE_FILE).read_text()), stage)
        if not source.is_dir():
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no finished stage {stage!r}")
        shutil.copytree(source, partial)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def read_state(checkpoint: Any) -> TrainerState:
    with checkpoint.as_directory() as raw:
        return TrainerState.from_json((Path(raw) / STATE_FILE).read_text())

