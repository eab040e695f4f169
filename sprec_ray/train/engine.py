"""The trainable model (HF causal LM + PEFT LoRA) behind one interface, on DeepSpeed ZeRO or plain torch.

`zero_stage` 2/3 -> `deepspeed.initialize` on the process group Ray Train already created
(`dist_init_required=False`) with a client `torch.optim.AdamW` (no fused/cpu-adam JIT build on CPU);
`zero_stage` 0 -> torch DDP (or the bare module when there is no process group, e.g. Ray Train local
mode). The same code runs on CPU (gloo) and GPU (NCCL): the device comes from Ray Train.

The loop drives every backend the same way:

    with engine.micro_batch(is_last_of_step):
        logits = engine(**inputs); engine.backward(loss)
    grad_norm = engine.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_policy(base_model: Path, lora: LoraConfig, init_adapter: Path | None, dtype: str, seed: int) -> Any:
    """Base causal LM with a trainable LoRA: fresh from `lora` (seeded, identical on every rank) or
    continued from `init_adapter` (is_trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=_DTYPES[dtype])
    model.config.use_cache = False
    if init_adapter is not None:
        if not (Path(init_adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"init adapter {init_adapter} has no adapter_config.json")
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def deepspeed_config(stage: int, micro_batch: int, grad_accum: int, world_size: int, dtype: str,
                     max_grad_norm: float) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class TrainEngine:
    """Common surface of the DeepSpeed and torch backends."""

    name: str
    peft_model: Any  # the PeftModel (for save_pretrained); under DeepSpeed its params may be partitioned

    def __call__(self, **inputs: Any) -> Any:
        raise NotImplementedError

    def micro_batch(self, boundary: bool) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> float:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        self.peft_model.train(mode)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 LoRA tensors keyed like `named_parameters`. Collective under DeepSpeed: every rank calls it."""
        raise NotImplementedError

    def save_state(self, directory: Path, rank: int) -> None:
        raise NotImplementedError

    def load_state(self, directory: Path, adapter_dir: Path) -> None:
        raise NotImplementedError


class DeepSpeedTrainEngine(TrainEngine):
    def __init__(self, model: Any, stage: int, lr: float, micro_batch: int, grad_accum: int, world_size: int,
                 dtype: str, max_grad_norm: float, device: torch.device):
        import deepspeed

        self.name = f"zero{stage}"
        self.peft_model = model
        self.stage = stage
        params = [p for _, p in trainable_parameters(model)]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        config = deepspeed_config(stage, micro_batch, grad_accum, world_size, dtype, max_grad_norm)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                                 config=config, dist_init_required=False)
        self._grad_norm = 0.0

    def __call__(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        # Explicit boundaries: the last step of an epoch may hold fewer than grad_accum micro-batches.
        self.engine.set_gradient_accumulation_boundary(boundary)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the global normaliser; DeepSpeed must not divide by grad_accum again.
        self.engine.backward(loss, scale_wrt_gas=False)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self._grad_norm = float(norm) if norm is not None else 0.0

    def step(self) -> float:
        return self._grad_norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in trainable_parameters(self.peft_model):
            full = safe_get_full_fp32_param(param)  # gathers the ZeRO partitions (collective)
            out[name] = (full if full is not None else param.data).detach().float().cpu().clone()
        return out

    def save_state(self, directory: Path, rank: int) -> None:
        # Frozen base weights are rebuilt from the base checkpoint; only LoRA + optimizer state is saved.
        self.engine.save_checkpoint(str(directory), tag="state", save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory: Path, adapter_dir: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="state", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the trainer state from {directory}")


class TorchTrainEngine(TrainEngine):
    """Plain torch: DDP across Ray Train's process group, or the bare module in a single process."""

    def __init__(self, model: Any, lr: float, max_grad_norm: float, device: torch.device, distributed: bool):
        self.peft_model = model.to(device)
        self.distributed = distributed
        self.name = "ddp" if distributed else "single"
        if distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(self.peft_model, device_ids=ids)
        else:
            self.module = self.peft_model
        self.params = [p for _, p in trainable_parameters(self.peft_model)]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def micro_batch(self, boundary: bool) -> contextlib.AbstractContextManager[None]:
        if self.distributed and not boundary:
            return self.module.no_sync()  # accumulate locally; all-reduce once per step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in trainable_parameters(self.peft_model)}

    def save_state(self, directory: Path, rank: int) -> None:
        if rank == 0:  # DDP keeps identical optimizer state on every rank
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path, adapter_dir: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.peft_model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise RuntimeError(f"checkpoint adapter {adapter_dir} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))


def make_engine(model: Any, zero_stage: int, lr: float, micro_batch: int, grad_accum: int, dtype: str,
                max_grad_norm: float, device: torch.device) -> TrainEngine:
    """DeepSpeed when asked for and a process group exists; plain torch otherwise."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if zero_stage > 0 and distributed:
        return DeepSpeedTrainEngine(model, zero_stage, lr, micro_batch, grad_accum, world, dtype, max_grad_norm, device)
    if dtype == "float16":
        raise ValueError("model.dtype=float16 needs DeepSpeed loss scaling: use train.zero_stage 2 or 3, or bfloat16")
    return TorchTrainEngine(model, lr, max_grad_norm, device, distributed)
