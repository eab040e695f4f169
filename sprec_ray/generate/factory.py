"""The generation engine a config names. The one module that knows both backends, so neither
imports the other's module (the interface, `backends.py`, imports neither)."""

from __future__ import annotations

from pathlib import Path

from ..config import GenerationConfig
from .backends import GenerationBackend, resolve_backend
from .hf_backend import HFBackend
from .vllm_backend import VLLMBackend  # imports vllm only when an engine is built


def make_backend(cfg: GenerationConfig, base_model: str | Path, max_lora_rank: int, seed: int) -> GenerationBackend:
    """The engine named by cfg.backend ("vllm" | "hf" | "auto") for the base checkpoint at `base_model`."""
    if resolve_backend(cfg) == "vllm":
        return VLLMBackend(cfg, base_model, max_lora_rank, seed)
    return HFBackend(cfg, base_model, seed)
