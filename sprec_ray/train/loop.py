"""The Ray Train worker loop: one fit runs one or more training stages (e.g. a round's SFT then DPO).

Per worker: build the policy (base + LoRA) and its engine once; then per stage tokenise the rows the
driver put in the object store for this rank (kept in memory: SPRec rounds are thousands of rows; every
rank gets as many, so collectives run the same number of steps everywhere) or, for a stage past
train.stream_rows, stream its share window by window (stream.py), reset the optimizer moments, run
the stage's `prepare` (DPO: reference log-probs from the weights the previous stage just produced),
then optimizer steps. A restarted worker group resumes at the checkpoint's stage and step.

Each optimizer step divides the loss numerators by the normaliser of the *global* step (all
micro-batches on all ranks, one scalar all-reduce), so the update equals that of one process
holding the whole global batch: ZeRO-2, ZeRO-3, DDP and a single process agree to float tolerance.
`ray.train.report` is a barrier across workers, so it runs only every `train.log_every` steps (with
the window's means), at checkpoint steps and at each stage's end; the tracker logs every step.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import torch

from ..config import RunConfig
from ..data.records import DataError
from ..models.base import model_dir
from ..runtime import use_prebuilt_extensions
from .batching import (
    Encoder,
    encode_pair_batch,
    encode_sft_batch,
    group_steps,
    plan_epoch,
    plan_epoch_tokens,
    split_to_count,
)
from .checkpointing import AdapterFiles, TrainerState, load_engine_state, read_checkpoint, write_checkpoint
from .engine import build_engine, set_lora_dropout
from .stream import RankStream, StreamPlan
from .tracking import Tracker, progress


@dataclass(frozen=True)
class StageSpec:
    phase: Literal["sft", "dpo"]
    name: str
    round: int = 0  # 0 = the warm start
    # per worker rank: an object-store ref to a pyarrow Table of its rows, or a RankStream it reads itself
    shards: tuple[Any, ...] = ()
    objective: type | None = None  # resolved from objectives.OBJECTIVES on the driver; travels pickled


@dataclass(frozen=True)
class FitSpec:
    """Everything a worker needs, shipped through `train_loop_config` (picklable)."""

    name: str
    stages: tuple[StageSpec, ...]
    cfg: RunConfig
    base_model: str  # a path or 'hf://<id>@<commit>' (models.base.model_dir)
    init_adapter: str | None  # where the first stage starts (None = a fresh LoRA)
    log_dir: str
    staging_dir: str
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Hyper:
    lr: float
    epochs: int
    batch_size: int
    grad_accum: int
    warmup_steps: int
    max_steps: int


def hyper(cfg: RunConfig, stage: StageSpec) -> Hyper:
    """The stage's optimisation settings; an SFT inside a round (round >= 1) uses sft.round_lr and its warm-up."""
    s = cfg.sft if stage.phase == "sft" else cfg.dpo
    lr, warmup = (cfg.sft.round_lr, cfg.sft.round_warmup_steps) if stage.phase == "sft" and stage.round else (s.lr, s.warmup_steps)
    return Hyper(lr, s.epochs, s.batch_size, s.grad_accum, warmup, s.max_steps)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup over `warmup` steps, then linear decay; step is 0-based and never gets lr 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (total - step) / max(1, total - warmup)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(values: torch.Tensor, op: Any = None) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(values, op=op or torch.distributed.ReduceOp.SUM)
    return values


def _global_max(value: int, device: torch.device) -> int:
    op = torch.distributed.ReduceOp.MAX if _distributed() else None
    return int(_all_reduce(torch.tensor([value], device=device), op).item())


def _device() -> torch.device:
    if _distributed():
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_rows(shard: pa.Table, phase: str, cfg: RunConfig, encoder: Encoder) -> list[Any]:
    """Tokenise the worker's shard; rows sorted by row_id so a restart plans the same batches."""
    rows: list[Any] = []
    for batch in (b.to_pydict() for b in shard.to_batches(max_chunksize=256)):
        if phase == "sft":
            rows += encode_sft_batch(batch, encoder, cfg.sft.cft.enabled, first_index=len(rows))
        else:
            rows += encode_pair_batch(batch, encoder, cfg.dpo.num_negatives)
    if phase == "dpo":
        seen: set[int] = set()
        for row in rows:
            if row.row_id in seen:
                raise DataError(f"row_id {row.row_id} appears twice in the DPO data; reference log-probs are stored by row_id")
            seen.add(row.row_id)
    return sorted(rows, key=lambda r: r.row_id)


class StepPlan:
    """Optimizer steps of a stage as lists of micro-batches (row indices), epoch by epoch. With a token
    budget the ranks pack different batch counts, so every epoch is split up to the global maximum."""

    def __init__(self, lengths: list[int], h: Hyper, max_tokens: int, seed: int, device: torch.device):
        self.lengths, self.h, self.max_tokens, self.seed, self.device = lengths, h, max_tokens, seed, device
        self._epoch, self._steps = -1, []
        batches = len(self._micro(0)) if max_tokens else math.ceil(len(lengths) / h.batch_size)
        self.per_epoch = math.ceil(_global_max(batches, device) / h.grad_accum) if max_tokens else math.ceil(batches / h.grad_accum)
        total = self.per_epoch * h.epochs
        self.total = min(total, h.max_steps) if h.max_steps > 0 else total

    def _micro(self, epoch: int) -> list[list[int]]:
        if self.max_tokens:
            return plan_epoch_tokens(self.lengths, self.max_tokens, self.seed, epoch)
        return plan_epoch(self.lengths, self.h.batch_size, self.seed, epoch)

    def step(self, index: int) -> list[list[int]]:
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._epoch:  # every rank reaches this at the same step: the all-reduce is safe
            micro = self._micro(epoch)
            if self.max_tokens:
                micro = split_to_count(micro, _global_max(len(micro), self.device))
            self._epoch, self._steps = epoch, group_steps(micro, self.h.grad_accum)
        return self._steps[within]


def train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the fit's TorchTrainer; config = {"spec": FitSpec}."""
    entered_at = time.time()  # wall clock: the driver subtracts its own fit start (worker group start-up)
    spec: FitSpec = config["spec"]
    env = dict(spec.env)
    if spec.cfg.train.use_gpu:  # the driver may be a CPU-only head node whose defaults say "cpu"
        env.pop("DS_ACCELERATOR", None)
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            os.environ["DS_ACCELERATOR"] = "cuda"
    os.environ.update(env)  # before deepspeed is imported: DS_ACCELERATOR, TORCH_EXTENSIONS_DIR
    use_prebuilt_extensions()
    import ray.train
    from transformers import AutoTokenizer

    cfg = spec.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device()
    base_model = model_dir(spec.base_model)  # a Hub reference resolves through this node's HF cache
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder = Encoder(tokenizer, cfg.model.max_prompt_len, cfg.model.max_response_len)
    h0 = hyper(cfg, spec.stages[0])
    engine = build_engine(base_model, cfg, Path(spec.init_adapter) if spec.init_adapter else None,
                          h0.lr, h0.batch_size, h0.grad_accum, device)
    setup_s = time.time() - entered_at  # imports, tokenizer, model load, engine init

    names = [s.name for s in spec.stages]
    checkpoint = ray.train.get_checkpoint()
    restored, finished = read_checkpoint(checkpoint, cfg.digest(), names) if checkpoint else (None, {})
    first = 0
    if restored is not None:
        first = names.index(restored.name) + int(restored.done)
        if first > 0:  # the last finished stage's adapter: where the next stage starts, and the weights a
            _load_finished(engine, finished[names[first - 1]])  # mid-stage resume's reference pass is taken from
        if rank == 0:
            progress(f"[{spec.name}] resuming at {restored.name} step {restored.step}"
                     f"{' (done)' if restored.done else ''} from {checkpoint.path}")
    summaries = dict(restored.finished) if restored else {}
    staging = Path(spec.staging_dir) / f"rank{rank}"  # per rank: ranks share a node's /tmp
    worker = Worker(spec, engine, encoder, pad_id, rank, world, device, staging, checkpoint, summaries, finished)
    for index in range(first, len(spec.stages)):
        name = spec.stages[index].name
        resume = restored if restored is not None and not restored.done and restored.name == name else None
        _run_stage(worker, index, resume, {"entered_at": entered_at, "setup_s": setup_s} if index == first else {})
    if restored is not None and first == len(spec.stages):  # every stage had finished: report its checkpoint again
        _report(engine, restored, dict(restored.history[-1]) if restored.history else {}, rank, staging, True, finished)
    if _distributed():
        shutil.rmtree(staging, ignore_errors=True)  # every staged checkpoint is in run storage by now


def _load_finished(engine: Any, files: AdapterFiles) -> None:
    with tempfile.TemporaryDirectory(prefix="sprec_stage_") as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        engine.load_adapter_weights(Path(tmp))


@dataclass
class Worker:
    """What one Ray Train worker holds across the stages of a fit."""

    spec: FitSpec
    engine: Any
    encoder: Encoder
    pad_id: int
    rank: int
    world: int
    device: torch.device
    staging: Path  # this rank's checkpoint staging dir
    checkpoint: Any  # the Ray Train checkpoint the worker group restarted from, or None
    summaries: dict[str, dict[str, Any]]  # finished stages' summaries: every checkpoint carries them
    finished: dict[str, AdapterFiles]  # finished stages' adapters, likewise


def _run_stage(w: Worker, index: int, resume: TrainerState | None, marks: dict[str, float]) -> None:
    """One stage: load its rows, prepare its objective, restore a mid-stage checkpoint, then step."""
    cfg, stage = w.spec.cfg, w.spec.stages[index]
    h = hyper(cfg, stage)
    marks = dict(marks)  # the fit's first stage carries its start-up: entered_at, setup_s
    objective, plan, stream = _prepare_stage(w, stage, h, marks)
    state = TrainerState(stage.phase, stage.name, cfg.digest(), finished=w.summaries)
    if resume is not None:
        load_engine_state(w.checkpoint, w.engine)
        state.step = state.restored_from = resume.step
        state.history = resume.history[:resume.step]
    if w.rank == 0:
        setup = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in marks.items() if k.endswith("_s"))
        layout = ""
        if stage.phase == "dpo":
            layout = ("; prefix-shared rows" if objective.shared else "; one row per response (train.prefix_sharing="
                      f"{cfg.train.prefix_sharing}, model.attn_implementation={cfg.model.attn_implementation})")
        precision = "bf16 autocast" if w.engine.autocast is not None else cfg.model.dtype
        share = f"{stream.rows} rows streamed in windows of {stream.window}" if stream else f"{len(objective.rows)} rows"
        progress(f"[{stage.name}] {w.engine.name} {precision}, {w.world} workers x {share} x {torch.get_num_threads()} "
                 f"threads, {plan.total} steps ({plan.per_epoch}/epoch), lr {h.lr:g}, warm-up {h.warmup_steps}; "
                 f"setup: {setup}{layout}")
    _run_steps(w, index, h, objective, plan, state, marks, stream)


def _prepare_stage(w: Worker, stage: StageSpec, h: Hyper, marks: dict[str, float]) -> tuple[Any, Any, RankStream | None]:
    """The stage's objective (rows tokenised, DPO's reference pass done) and its step plan."""
    import ray

    cfg = w.spec.cfg
    t = time.perf_counter()
    shard = stage.shards[w.rank]
    stream = shard if isinstance(shard, RankStream) else None
    rows = [] if stream else load_rows(ray.get(shard), stage.phase, cfg, w.encoder)  # a stream loads window by window
    marks["data_s"] = time.perf_counter() - t

    set_lora_dropout(w.engine.peft_model, cfg.lora.dropout if stage.phase == "sft" else cfg.dpo.lora_dropout)
    w.engine.reset_optimizer()
    objective = stage.objective(cfg, rows, w.pad_id, w.device)
    t = time.perf_counter()
    objective.prepare(w.engine)  # DPO reference pass: from the stage's starting weights, before any restore
    marks["reference_s" if stage.phase == "dpo" else "prepare_s"] = time.perf_counter() - t
    if stream is None:
        plan: StepPlan | StreamPlan = StepPlan(objective.lengths(), h, cfg.train.max_tokens_per_batch, cfg.seed, w.device)
    else:
        plan = StreamPlan(stream, lambda table: load_rows(table, stage.phase, cfg, w.encoder), h.batch_size,
                          h.grad_accum, h.epochs, h.max_steps, cfg.seed)
    if plan.total == 0:
        raise DataError(f"{stage.name}: no optimizer steps planned ({stage.phase}.epochs={h.epochs})")
    return objective, plan, stream


def _run_steps(w: Worker, index: int, h: Hyper, objective: Any, plan: StepPlan | StreamPlan, state: TrainerState,
               marks: dict[str, float], stream: RankStream | None) -> None:
    """Optimizer steps from `state.step` to the plan's end: track every step, report every log_every,
    checkpoint every checkpoint_every and at the end (when the stage's summary is written)."""
    cfg, stage, engine = w.spec.cfg, w.spec.stages[index], w.engine
    rows_here = 0 if stream else len(objective.rows)
    tracker = Tracker(w.rank, cfg.train.logger, Path(w.spec.log_dir) / stage.name, stage.name, cfg.to_dict())
    stat_names = objective.stat_names
    window: list[dict[str, float]] = []
    loop_start = time.perf_counter()
    previous_end = loop_start
    engine.train(True)
    while state.step < plan.total:
        micro = plan.step(state.step)
        if stream is not None:
            objective.rows = plan.rows  # the window this step lies in
        # Per step, so a run resumed mid-stage in a new worker group draws the same dropout masks.
        torch.manual_seed(hash((cfg.seed, w.rank, index, state.step)) % 2**63)
        lr = lr_at(state.step, plan.total, h.warmup_steps, h.lr)
        engine.set_lr(lr)
        start = time.perf_counter()
        norm = float(_all_reduce(torch.tensor([sum(objective.normaliser(mb) for mb in micro)],
                                              dtype=torch.float64, device=w.device)).item())
        sums = torch.zeros(len(stat_names) + 1, dtype=torch.float64, device=w.device)
        for j, mb in enumerate(micro):
            with engine.micro_batch(j == len(micro) - 1):
                loss, stats, tokens = objective.loss(engine, mb)
                engine.backward(loss * (w.world / norm))
            # stay on the device: one host sync per step (the all-reduce below), not per micro-batch
            sums[:-1] += torch.stack([stats[k].to(torch.float64) for k in stat_names])
            sums[-1] += tokens
        grad_norm = engine.step()
        sums = _all_reduce(sums).tolist()
        end = time.perf_counter()
        state.step += 1
        metrics = {k: sums[i] / norm for i, k in enumerate(stat_names)}
        metrics.update(step=float(state.step), epoch=float(state.step - 1) // plan.per_epoch, lr=lr, grad_norm=grad_norm,
                       tokens=sums[-1], tokens_per_s=sums[-1] / (end - start), step_time_s=end - start,
                       wall_s=end - previous_end)  # wall_s: since the previous step ended (reports, logging, I/O)
        previous_end = end
        state.history.append(metrics)
        window.append(metrics)
        tracker.log(state.step, plan.total, metrics)
        last_step = state.step == plan.total
        checkpoint_due = last_step or state.step % cfg.train.checkpoint_every == 0
        if state.step == state.restored_from + 1:
            marks["first_step_at"] = time.time()  # wall clock, like entered_at
        if last_step:
            marks["loop_s"] = time.perf_counter() - loop_start
            marks.update(_rows_per_rank(plan.reader.rows_read if stream else rows_here, w.rank, w.world, w.device))
            marks["ended_at"] = time.time()  # the driver counts from here to the fit's return: final checkpoint, shutdown
            state.done = True
            w.summaries[stage.name] = {"phase": stage.phase, "history": state.history, "timing": marks,
                                       "restored_from": state.restored_from}
        if checkpoint_due or state.step % cfg.train.log_every == 0:
            means = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
            _report(engine, state, {**means, "step": float(state.step), "stage_index": float(index)}, w.rank, w.staging,
                    checkpoint_due, w.finished)
            window = []
    tracker.close()


def _rows_per_rank(rows: int, rank: int, world: int, device: torch.device) -> dict[str, float]:
    """The rows each rank read (tokenised), gathered so rank 0's stage summary records them all."""
    counts = torch.zeros(world, dtype=torch.float64, device=device)
    counts[rank] = rows
    return {f"rank{r}_rows": float(c) for r, c in enumerate(_all_reduce(counts).tolist())}


def _report(engine: Any, state: TrainerState, metrics: dict[str, float], rank: int, staging: Path,
            with_checkpoint: bool, finished: dict[str, AdapterFiles]) -> None:
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    directory = write_checkpoint(engine, state, rank, staging, finished)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    if _distributed():  # uploaded to run storage; in local mode the staged dir *is* the checkpoint
        shutil.rmtree(directory, ignore_errors=True)
