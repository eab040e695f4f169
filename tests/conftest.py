"""Shared fixtures: a tiny generated dataset, a tiny local model, one Ray instance per session.

Nothing is downloaded: the model is random-initialised and its tokenizer trained here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub (it reads this once): tests never reach a hub, and the
# ones that use a Hub id fill an HF_HOME of their own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reference import RecDataset, load_dataset

from sprec_ray.config import DataConfig
from sprec_ray.data.dataset import GOODREADS_SAMPLE
from sprec_ray.data.prompts import render_prompt, render_response
from sprec_ray.data.synthetic import write_synthetic_sprec
from sprec_ray.runtime import apply_default_env

apply_default_env()

# Modules that start Ray clusters of their own, run before the session's local Ray exists: two Ray
# instances at once on 2 cores starve each other (a resumed fit after node loss hung that way).
OWN_CLUSTER_MODULES = ("test_autoscaling.py", "test_multinode.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in OWN_CLUSTER_MODULES)  # stable: order kept otherwise


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_synthetic_sprec(tmp_path_factory.mktemp("data"), num_items=84, num_users=120, seed=1)


@pytest.fixture(scope="session")
def tiny_data(tiny_data_dir, tmp_path_factory) -> RecDataset:
    return load_dataset(DataConfig(path=str(tiny_data_dir)), tmp_path_factory.mktemp("scratch"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data, tmp_path_factory) -> Path:
    from sprec_ray.models.base import build_tiny_model

    titles = tiny_data.catalogue.titles
    texts = [render_prompt(titles[i : i + 10]) + render_response(titles[i]) for i in range(0, len(titles), 5)]
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", texts)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session. Logical CPUs > physical on purpose: trainer
    workers and Ray Data tasks must never starve each other on a 2-core machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {
            k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM",
                                       "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE") if k in os.environ}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def goodreads_dir() -> Path:
    return GOODREADS_SAMPLE  # shipped in the repo
