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
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..config import LoraConfig, RunConfig
from ..models.precision import has_native_bf16, store_frozen_linears
from .dropout import GapDropout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_policy(base_model: Path, lora: LoraConfig, init_adapter: Path | None, dtype: str, seed: int,
                 attn_implementation: str = "sdpa", gradient_checkpointing: bool = False) -> Any:
    """Base causal LM with a trainable LoRA: fresh from `lora` (seeded, identical on every rank) or
    continued from `init_adapter` (is_trainable). Under an active HfDeepSpeedConfig with ZeRO-3 the
    base weights are partitioned as they load, so a model larger than one device fits."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("model.attn_implementation=flash_attention_2 needs the flash-attn package on every train worker")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    model.config.use_cache = False
    if gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        if not (Path(init_adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"init adapter {init_adapter} has no adapter_config.json")
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def set_lora_dropout(model: torch.nn.Module, p: float) -> None:
    """Replace every LoRA dropout (PEFT builds nn.Identity for p=0, so setting `.p` is not enough)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for key in list(dropouts.keys()):
                dropouts[key] = GapDropout(p) if p > 0 else torch.nn.Identity()


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def deepspeed_config(stage: int, micro_batch: int, grad_accum: int, world_size: int, dtype: str,
                     max_grad_norm: float, on_gpu: bool = False) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        # overlap_comm runs gradient reduction on a side CUDA stream; CPU (gloo) has no streams
        "zero_optimization": {"stage": stage, "overlap_comm": on_gpu},
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
    optimizer: Any
    keep_alive: Any = None  # objects that must live as long as the engine (ZeRO-3's HfDeepSpeedConfig)
    autocast: torch.dtype | None = None  # train.mixed_precision: the forward's compute dtype
    device_type: str = "cpu"

    def __call__(self, **inputs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.forward(**inputs)

    def forward(self, **inputs: Any) -> Any:
        raise NotImplementedError

    def micro_batch(self, boundary: bool) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> float:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self) -> None:
        """Fresh Adam moments for the next stage of a fit (SFT -> DPO): what a new optimizer would hold."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # DeepSpeed wraps the torch AdamW
        inner.state.clear()

    def train(self, mode: bool = True) -> None:
        self.peft_model.train(mode)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 LoRA tensors keyed like `named_parameters`. Collective under DeepSpeed: every rank calls it."""
        raise NotImplementedError

    def save_state(self, directory: Path, rank: int) -> None:
        """LoRA weights and optimizer state, once each. Collective under DeepSpeed."""
        raise NotImplementedError

    def load_state(self, directory: Path) -> None:
        raise NotImplementedError

    def load_adapter_weights(self, adapter_dir: Path) -> None:
        """Set the LoRA weights from a PEFT adapter dir (module only, not optimizer state). Collective
        under ZeRO-3, where each rank keeps a slice of every LoRA tensor."""
        _load_adapter_into(self.peft_model, adapter_dir)


class DeepSpeedTrainEngine(TrainEngine):
    def __init__(self, model: Any, stage: int, lr: float, config: dict[str, Any], device: torch.device):
        import deepspeed

        self.name = f"zero{stage}"
        self.peft_model = model
        self.stage = stage
        params = [p for _, p in trainable_parameters(model)]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                                 config=config, dist_init_required=False)
        # DeepSpeed's exclude_frozen_parameters filters by named_parameters(), which skips a tied LM
        # head: every checkpoint carried the frozen embedding (123 MB for SmolLM2). The LoRA weights
        # travel in ZeRO's fp32 partitions, so the module needs none.
        self.engine.module_state_dict = lambda *args, **kwargs: {}

    def forward(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        # Explicit boundaries: the last step of an epoch may hold fewer than grad_accum micro-batches.
        self.engine.set_gradient_accumulation_boundary(boundary)
        yield
        if not boundary:  # DeepSpeed counts every micro-batch by its step(); off a boundary it does no more
            self.engine.step()

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the global normaliser; DeepSpeed must not divide by grad_accum again.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()  # on the boundary the last micro_batch left set: clip, reduce, Adam
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in trainable_parameters(self.peft_model):
            full = safe_get_full_fp32_param(param)  # gathers the ZeRO partitions (collective)
            out[name] = (full if full is not None else param.data).detach().float().cpu().clone()
        return out

    def save_state(self, directory: Path, rank: int) -> None:
        # Frozen base weights are rebuilt from the base checkpoint; only ZeRO's optimizer partitions are saved.
        self.engine.save_checkpoint(str(directory), tag="state", save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="state", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the trainer state from {directory}")
        _set_trainable(self.peft_model, self.lora_state_dict())  # the module's copy from ZeRO's fp32 master


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

    def forward(self, **inputs: Any) -> Any:
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

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in trainable_parameters(self.peft_model)}

    def save_state(self, directory: Path, rank: int) -> None:
        from safetensors.torch import save_file

        if rank == 0:  # DDP keeps identical weights and optimizer state on every rank
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            save_file(self.lora_state_dict(), str(directory / "lora.safetensors"))

    def load_state(self, directory: Path) -> None:
        from safetensors.torch import load_file

        _set_trainable(self.peft_model, load_file(str(directory / "lora.safetensors")))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))


def _set_trainable(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Set every trainable tensor from full tensors keyed like `named_parameters`; collective under ZeRO-3."""
    params = dict(trainable_parameters(model))
    if weights.keys() != params.keys():
        raise RuntimeError(f"checkpoint holds {len(weights)} trainable tensors, the model {len(params)}")
    with _writable(list(params.values())), torch.no_grad():
        for name, param in params.items():
            param.data.copy_(weights[name])


def _writable(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """Whole tensors to write into. ZeRO-3 partitions each one: gather, let rank 0 write, re-scatter."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _load_adapter_into(model: Any, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    with _writable([p for _, p in trainable_parameters(model)]):
        result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"adapter {adapter_dir} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")


def _import_deepspeed() -> ModuleType:
    """`import deepspeed` without the mlflow its autotuner imports when mlflow is installed: 1.5-2 s of
    every training worker's start-up, for autotuning runs sprec-ray never makes."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is set
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def build_engine(base_model: Path, cfg: RunConfig, init_adapter: Path | None, lr: float, micro_batch: int,
                 grad_accum: int, device: torch.device) -> TrainEngine:
    """The policy (base + LoRA) inside its engine: DeepSpeed when asked for and a process group
    exists, plain torch otherwise. ZeRO-3 loads the base under `deepspeed.zero.Init` (through
    HfDeepSpeedConfig), so no rank ever holds the whole model."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    stage, dtype = cfg.train.zero_stage, cfg.model.dtype
    ds_config, hf_ds = None, None
    if stage > 0 and distributed:
        deepspeed = _import_deepspeed()
        # Wrap Ray Train's process group now: zero.Init reads the world size before it would.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        ds_config = deepspeed_config(stage, micro_batch, grad_accum, world, dtype, cfg.train.max_grad_norm,
                                     device.type == "cuda")
        if stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds = HfDeepSpeedConfig(ds_config)  # transformers holds only a weakref: keep it alive
    model = build_policy(base_model, cfg.lora, init_adapter, dtype, cfg.seed, cfg.model.attn_implementation,
                         cfg.train.gradient_checkpointing)
    autocast = torch.bfloat16 if uses_bf16(cfg.train.mixed_precision, device) else None
    if autocast is not None and hf_ds is None:  # ZeRO-3 has already partitioned the weights
        store_frozen_linears(model, autocast)
    engine: TrainEngine
    if ds_config is not None:
        engine = DeepSpeedTrainEngine(model, stage, lr, ds_config, device)
        engine.keep_alive = hf_ds
    else:
        engine = TorchTrainEngine(model, lr, cfg.train.max_grad_norm, device, distributed)
    engine.device_type = device.type
    engine.autocast = autocast
    return engine


def uses_bf16(mixed_precision: str, device: torch.device) -> bool:
    """train.mixed_precision on this worker; "auto" asks the hardware (CPUs without native bf16
    emulate it, slower than fp32)."""
    if mixed_precision != "auto":
        return mixed_precision == "bf16"
    return has_native_bf16(device)
