"""Prove that an engine serves the adapter the round expects (guards against silently stale weights).

After an engine switches adapter it generates on a few probe prompts and scores its own completions
(`run_probe`). The same completions are scored by transformers + peft in float32 straight from the
adapter files (`reference_token_logprobs`). `compare_probe` fails when the mean absolute per-token
log-prob difference exceeds the tolerance.

Tolerance: the default 0.05 nats/token sits above bf16-vs-fp32 engine noise (TRL reports ~0.01-0.02
mean diff; see the tests for this repo's figures) and far below what a different adapter changes.
The check cannot tell apart two adapters that really differ by less than the tolerance on the probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import GenerationConfig
from .backends import Decoding, GenerationBackend


class AdapterMismatchError(RuntimeError):
    """The engine's log-probs disagree with the expected adapter's: stale or wrong weights."""


@dataclass(frozen=True)
class ProbeResult:
    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    token_logprobs: tuple[tuple[float, ...], ...]


def run_probe(backend: GenerationBackend, prompts: Sequence[str], adapter_dir: str | Path | None,
              lora_id: int, max_new_tokens: int = 16) -> ProbeResult:
    """The engine's greedy completion per probe prompt, scored by the engine itself. Its own likely
    text: a stale adapter's favourite continuation scores differently under the expected adapter."""
    greedy = Decoding("greedy", 1, 1.0, max_new_tokens)
    rows = backend.generate(prompts, adapter_dir, lora_id, decoding=greedy)
    texts = [row[0] if row and row[0] else '"' for row in rows]  # an empty completion has nothing to score
    lps = backend.token_logprobs(prompts, texts, adapter_dir, lora_id)
    return ProbeResult(tuple(prompts), tuple(texts), tuple(tuple(x) for x in lps))


def reference_token_logprobs(base_model: str | Path, adapter_dir: str | Path | None, prompts: Sequence[str],
                             completions: Sequence[str], max_model_len: int) -> list[list[float]]:
    """transformers + peft, float32 on CPU, loaded fresh from disk: the ground truth for the check."""
    from .hf_backend import HFBackend

    cfg = GenerationConfig(backend="hf", max_model_len=max_model_len)
    backend = HFBackend(cfg, base_model, seed=0, device="cpu", dtype="float32")
    try:
        return backend.token_logprobs(prompts, completions, adapter_dir, lora_id=1)
    finally:
        backend.close()


def compare_probe(probe: ProbeResult, reference: Sequence[Sequence[float]], tolerance: float,
                  what: str = "engine") -> float:
    """Mean |engine - reference| log-prob per completion token; raises AdapterMismatchError above tolerance."""
    if len(reference) != len(probe.token_logprobs):
        raise AdapterMismatchError(f"{what}: probe has {len(probe.token_logprobs)} rows, reference {len(reference)}")
    total, count, worst = 0.0, 0, (0.0, -1)
    for i, (eng, ref) in enumerate(zip(probe.token_logprobs, reference, strict=True)):
        if len(eng) != len(ref):
            raise AdapterMismatchError(f"{what}: probe row {i} has {len(eng)} completion tokens in the engine and "
                                       f"{len(ref)} in the reference (different tokenizer?)")
        for a, b in zip(eng, ref, strict=True):
            d = abs(a - b)
            total += d
            count += 1
            worst = max(worst, (d, i))
    mean = total / max(count, 1)
    if mean > tolerance:
        raise AdapterMismatchError(
            f"{what}: mean |delta log p| per token {mean:.4f} > tolerance {tolerance} over {count} probe tokens "
            f"(worst {worst[0]:.4f} in probe row {worst[1]}: {probe.completions[worst[1]]!r}); "
            "the engine is not serving the expected adapter")
    return mean
