"""Ray start-up and the environment every worker needs, in one place."""

from __future__ import annotations

import os
from pathlib import Path

import ray

# Quiet, CPU-safe defaults; a value the user already set always wins.
_DEFAULT_ENV = {
    "DS_ACCELERATOR": "cpu",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "sprec_ray" / "torch_extensions"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_env() -> dict[str, str]:
    """Env vars shipped to every Ray worker through runtime_env."""
    env = {k: os.environ.get(k, v) for k, v in _DEFAULT_ENV.items()}
    if has_cuda():
        env.pop("DS_ACCELERATOR")  # DeepSpeed picks CUDA itself
        env.pop("VLLM_CPU_KVCACHE_SPACE")
    return env


def apply_default_env() -> None:
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)


def init_ray(address: str = "", num_cpus: int = 0) -> None:
    """Attach to `address` / RAY_ADDRESS (a `ray job submit` run) or start a local instance."""
    apply_default_env()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": worker_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, runtime_env=runtime_env)
