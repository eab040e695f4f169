"""Ray start-up and the environment every worker needs, in one place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray

# Set by Ray's job supervisor on a submitted job's driver: the job config as JSON.
RAY_JOB_CONFIG_JSON_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"

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


def _not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """Drop the vars a `ray job submit` runtime env already sets: Ray refuses to merge a driver's
    runtime env that repeats a job's env var key (the job's values are in os.environ anyway)."""
    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
    job_vars = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in job_vars}


def init_ray(address: str = "", num_cpus: int = 0, dashboard: bool = False) -> None:
    """Attach to `address` / RAY_ADDRESS (a `ray job submit` run) or start a local instance."""
    apply_default_env()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    runtime_env = {"env_vars": _not_set_by_job(worker_env())}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # include_dashboard=None is Ray's default: the dashboard starts where its packages are
        # installed (it serves the State API Ray Train polls) and is skipped, not fatal, elsewhere.
        ray.init(num_cpus=num_cpus or None, include_dashboard=True if dashboard else None,
                 dashboard_host="127.0.0.1", runtime_env=runtime_env)
