"""Ray start-up and the environment every worker needs, in one place."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray

# Set by Ray's job supervisor on a submitted job's driver: the job config as JSON.
RAY_JOB_CONFIG_JSON_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Quiet, CPU-safe defaults; a value the user already set always wins. No paths: a path of the
# driver's (its home, its cwd) may not exist on the other nodes.
_DEFAULT_ENV = {
    "DS_ACCELERATOR": "cpu",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Ray Train sees a worker group finish at its next health check (every 2 s by default); a fit on
    # CPU then waits ~1 s for nothing. Ray Train forwards this from the driver to its controller.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# The user's Hugging Face settings travel to every worker as set (offline mode, cache, token).
_FORWARDED_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")


def extension_cache() -> Path:
    """Where DeepSpeed's compiled CPU extension lives: inside this environment, so every node of an
    image, and every test node whose home is hidden, finds the one that `scripts/install.sh` built."""
    return Path(sys.prefix) / "torch_extensions"


def use_prebuilt_extensions() -> None:
    """Point torch's extension loader at the prebuilt cache, before deepspeed is imported (a user's
    TORCH_EXTENSIONS_DIR wins). Without the cache DeepSpeed compiles into ~/.cache as before."""
    if extension_cache().is_dir():
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extension_cache()))
        _use_env_ninja()


def build_extensions() -> None:
    """Compile DeepSpeed's shared-memory all-reduce for CPU training once, at install time (about a
    minute of C++), instead of inside a run's first fit."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extension_cache())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _use_env_ninja()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def _use_env_ninja() -> None:
    """Torch runs whichever `ninja` PATH finds. Ninja 1.11 and 1.13 hash build commands differently, so
    a system ninja and this environment's would each rebuild (~1 min) what the other built."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_env() -> dict[str, str]:
    """Env vars shipped to every Ray worker through runtime_env."""
    env = {k: os.environ.get(k, v) for k, v in _DEFAULT_ENV.items()}
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
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


def check_visible_on_every_node(run_dir: Path, timeout_s: float = 300.0) -> None:
    """Fail fast, naming the nodes, when the run's storage is not the same directory on every node
    alive now: workers, generation actors and replicas read the base model, adapters and catalogue
    from it. (Nodes the autoscaler adds later are not checked.)"""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = run_dir / "config.yaml"  # the run's own file: checking writes nothing into the run
    token = _read_text(str(probe))
    read = ray.remote(num_cpus=0)(_read_text)
    nodes = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": n["NodeID"] for n in ray.nodes() if n["Alive"]}
    refs = {name: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(str(probe))
            for name, node_id in nodes.items()}
    blind = [name for name, ref in refs.items() if ray.get(ref, timeout=timeout_s) != token]
    if blind:
        raise FileNotFoundError(f"output_dir {run_dir} is not visible on node(s) {blind}: every node reads the run's "
                                f"storage, so put output_dir on a filesystem all nodes mount (NFS, EFS, Filestore, a "
                                f"ReadWriteMany PVC; see docs/cluster.md)")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


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
