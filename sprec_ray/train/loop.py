"""The Ray Train worker loop shared by SFT (incl. CFT) and DPO/S-DPO.

Per worker: tokenise its Ray Data shard once (kept in memory: SPRec rounds are thousands of rows),
cut it to the smallest shard size over all ranks (collectives need the same number of steps
everywhere), build the LoRA model + engine, precompute what the objective needs (DPO reference
log-probs), restore the last checkpoint if Ray Train restarted us, then run optimizer steps.

Each optimizer step divides the loss numerators by the normaliser of the *global* step (all
micro-batches on all ranks, one scalar all-reduce), so the update equals that of one process
holding the whole global batch: ZeRO-2, ZeRO-3, DDP and a single process agree to float tolerance.
Every step calls `ray.train.report` on every rank (it is a barrier); a checkpoint rides along every
`train.checkpoint_every` steps and at the end.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import RunConfig
from ..data.records import DataError
from .batching import Encoder, encode_pair_batch, encode_sft_batch, group_steps, plan_epoch
from .checkpointing import TrainerState, restore_checkpoint, write_checkpoint
from .tracking import Tracker, progress

FAULT_ENV = "SPRECRAY_FAULT_INJECT"  # test-only: "rank:step:marker_file" -> that rank exits once after `step`


@dataclass(frozen=True)
class PhaseSpec:
    """Everything a worker needs, shipped through `train_loop_config` (picklable)."""

    phase: Literal["sft", "dpo"]
    name: str
    cfg: RunConfig
    base_model: str
    init_adapter: str | None
    log_dir: str
    staging_dir: str
    env: tuple[tuple[str, str], ...] = ()
    fault: str = ""


@dataclass(frozen=True)
class Hyper:
    lr: float
    epochs: int
    batch_size: int
    grad_accum: int
    warmup_steps: int
    max_steps: int


def hyper(spec: PhaseSpec) -> Hyper:
    section = spec.cfg.sft if spec.phase == "sft" else spec.cfg.dpo
    return Hyper(section.lr, section.epochs, section.batch_size, section.grad_accum, section.warmup_steps, section.max_steps)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup over `warmup` steps, then linear decay; step is 0-based and never gets lr 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (total - step) / max(1, total - warmup)


def total_steps(rows: int, h: Hyper) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for `rows` local rows."""
    per_epoch = math.ceil(math.ceil(rows / h.batch_size) / h.grad_accum)
    total = per_epoch * h.epochs
    return per_epoch, min(total, h.max_steps) if h.max_steps > 0 else total


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(values: torch.Tensor, op: Any = None) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(values, op=op or torch.distributed.ReduceOp.SUM)
    return values


def _device() -> torch.device:
    if _distributed():
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_rows(shard: Any, spec: PhaseSpec, encoder: Encoder) -> list[Any]:
    """Tokenise the worker's shard; rows sorted by row_id so a restart plans the same batches."""
    cfg = spec.cfg
    rows: list[Any] = []
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        if spec.phase == "sft":
            rows += encode_sft_batch(batch, encoder, cfg.sft.cft.enabled, first_index=len(rows))
        else:
            rows += encode_pair_batch(batch, encoder, cfg.dpo.num_negatives)
    if spec.phase == "dpo":
        seen: set[int] = set()
        for row in rows:
            if row.row_id in seen:
                raise DataError(f"row_id {row.row_id} appears twice in the DPO data; reference log-probs are stored by row_id")
            seen.add(row.row_id)
    return sorted(rows, key=lambda r: r.row_id)


def _maybe_fault(spec: PhaseSpec, rank: int, step: int) -> None:
    if not spec.fault:
        return
    want_rank, want_step, marker = spec.fault.split(":", 2)
    if rank == int(want_rank) and step == int(want_step) and not Path(marker).exists():
        import ray.train

        # Die only once the controller has registered every checkpoint reported so far; a report
        # still in flight when the process vanishes is lost, and the test could not know which step
        # the restart should resume from.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        Path(marker).write_text(f"rank {rank} exited after step {step}\n")
        os._exit(1)


def train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the phase's TorchTrainer; config = {"spec": PhaseSpec}."""
    spec: PhaseSpec = config["spec"]
    env = dict(spec.env)
    if spec.cfg.train.use_gpu:  # the driver may be a CPU-only head node whose defaults say "cpu"
        env.pop("DS_ACCELERATOR", None)
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            os.environ["DS_ACCELERATOR"] = "cuda"
    os.environ.update(env)  # before deepspeed is imported: DS_ACCELERATOR, TORCH_EXTENSIONS_DIR
    import ray.train
    from transformers import AutoTokenizer

    from .engine import build_policy, make_engine
    from .objectives import PreferenceObjective, SFTObjective

    cfg, h = spec.cfg, hyper(spec)
    marks = [("start", time.perf_counter())]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device()
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder = Encoder(tokenizer, cfg.model.max_prompt_len, cfg.model.max_response_len)

    rows = load_rows(ray.train.get_dataset_shard("train"), spec, encoder)
    common = int(_all_reduce(torch.tensor([len(rows)], device=device), torch.distributed.ReduceOp.MIN
                             if _distributed() else None).item())
    if common == 0:
        raise DataError(f"{spec.name}: worker {rank} got an empty data shard; the dataset needs at least "
                        f"train.num_workers={world} rows")
    if common < len(rows) and rank == 0:
        progress(f"[{spec.name}] using {common} rows per worker (shards differ by up to {len(rows) - common})")
    rows = rows[:common]
    per_epoch, total = total_steps(common, h)
    marks.append(("data", time.perf_counter()))

    model = build_policy(Path(spec.base_model), cfg.lora, Path(spec.init_adapter) if spec.init_adapter else None,
                         cfg.model.dtype, cfg.seed)
    engine = make_engine(model, cfg.train.zero_stage, h.lr, h.batch_size, h.grad_accum, cfg.model.dtype,
                         cfg.train.max_grad_norm, device)
    marks.append(("model+engine", time.perf_counter()))
    torch.manual_seed(cfg.seed + 1000 * rank)  # LoRA dropout differs per rank; the init above did not
    objective_cls = SFTObjective if spec.phase == "sft" else PreferenceObjective
    objective = objective_cls(cfg, rows, pad_id, device)
    objective.prepare(engine)  # DPO reference pass: always from the starting adapter, before any restore
    marks.append(("reference" if spec.phase == "dpo" else "prepare", time.perf_counter()))

    digest = cfg.digest()
    state = TrainerState(spec.phase, spec.name, digest)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, engine, spec.phase, digest)
        if rank == 0:
            progress(f"[{spec.name}] resumed from step {state.step} ({checkpoint.path})")
    state.history = state.history[:state.step]
    if rank == 0:
        setup = ", ".join(f"{name} {t - marks[i][1]:.1f}s" for i, (name, t) in enumerate(marks[1:]))
        progress(f"[{spec.name}] {engine.name}, {world} workers x {common} rows, {total} steps "
                 f"({per_epoch}/epoch); setup: {setup}")

    tracker = Tracker(rank, cfg.train.logger, Path(spec.log_dir), spec.name, cfg.to_dict())
    lengths = objective.lengths()
    names = objective.stat_names
    # per rank: ranks share a node's /tmp, and one rank's clean-up must not race another's upload
    staging = Path(spec.staging_dir) / f"rank{rank}"
    plans: dict[int, list[list[list[int]]]] = {}
    ran = 0
    engine.train(True)
    while state.step < total:
        epoch, within = divmod(state.step, per_epoch)
        if epoch not in plans:
            plans = {epoch: group_steps(plan_epoch(lengths, h.batch_size, cfg.seed, epoch), h.grad_accum)}
        micro = plans[epoch][within]
        lr = lr_at(state.step, total, h.warmup_steps, h.lr)
        engine.set_lr(lr)
        start = time.perf_counter()
        norm = float(_all_reduce(torch.tensor([sum(objective.normaliser(mb) for mb in micro)],
                                              dtype=torch.float64, device=device)).item())
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
        for j, mb in enumerate(micro):
            with engine.micro_batch(j == len(micro) - 1):
                loss, stats, tokens = objective.loss(engine, mb)
                engine.backward(loss * (world / norm))
            # stay on the device: one host sync per step (the all-reduce below), not per micro-batch
            sums[:-1] += torch.stack([stats[k].to(torch.float64) for k in names])
            sums[-1] += tokens
        grad_norm = engine.step()
        sums = _all_reduce(sums).tolist()
        elapsed = time.perf_counter() - start
        state.step += 1
        ran += 1
        metrics = {k: sums[i] / norm for i, k in enumerate(names)}
        metrics.update(step=float(state.step), epoch=float(epoch), lr=lr, grad_norm=grad_norm,
                       tokens=sums[-1], tokens_per_s=sums[-1] / elapsed, step_time_s=elapsed)
        if ran == 1 and spec.phase == "dpo":  # this attempt's reference pass: compute, not orchestration
            metrics["reference_s"] = marks[-1][1] - marks[-2][1]
        state.history.append(metrics)
        tracker.log(state.step, total, metrics)
        due = state.step % max(1, cfg.train.checkpoint_every) == 0 or state.step == total
        _report(engine, state, metrics, rank, staging, due)
        _maybe_fault(spec, rank, state.step)
    if ran == 0:  # restored a finished run: report its state again so the result has a checkpoint
        _report(engine, state, dict(state.history[-1]) if state.history else {}, rank, staging, True)
    tracker.close()
    if _distributed():
        shutil.rmtree(staging, ignore_errors=True)  # every staged checkpoint is in run storage by now


def _report(engine: Any, state: TrainerState, metrics: dict[str, float], rank: int, staging: Path, with_checkpoint: bool) -> None:
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    directory = write_checkpoint(engine, state, rank, staging)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    if _distributed():  # uploaded to run storage; in local mode the staged dir *is* the checkpoint
        shutil.rmtree(directory, ignore_errors=True)
