"""transformers `generate` + peft behind the GenerationBackend interface (SPRec's own approach).

Batched with left padding. In float32 a round's adapter is merged into the weights (LoRA's extra
matmuls per projection are a large share of CPU decoding); switching adapters first restores the
pristine base weights kept aside, so merges never accumulate rounding and the base files are read
once. In bfloat16/float16 the engine computes as the trainer's bf16 autocast does, in that dtype
(models/precision.py): 16-bit Linear weights under autocast, fp32 norms and residual stream, and the
adapter unmerged, since a trained LoRA delta is mostly below a bf16 weight's rounding step. Also the reference for the adapter
check: `token_logprobs` in float32 is what every engine's log-probs are compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import GenerationConfig
from ..models.attention import use_grouped_sdpa
from ..models.base import model_dir
from ..models.precision import store_frozen_linears
from .backends import (
    STOP_STRING,
    Decoding,
    Generated,
    GenerationBackend,
    adapter_path,
    check_prompt_lengths,
    cut_at_stop,
    resolve_dtype,
)

if TYPE_CHECKING:
    import torch

# Shorter common prefixes are prefilled with the rest: one more forward would cost more than it saves.
MIN_SHARED_PREFIX = 8


def _common_prefix(ids: Sequence[Sequence[int]]) -> int:
    """Length of the token run all sequences start with."""
    first, n = ids[0], min(len(x) for x in ids)
    for j in range(n):
        if any(x[j] != first[j] for x in ids[1:]):
            return j
    return n


class HFBackend(GenerationBackend):
    def __init__(self, cfg: GenerationConfig, base_model: str | Path, seed: int, device: str | None = None,
                 dtype: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = dtype or resolve_dtype(cfg.dtype, "hf", self.device.type == "cuda")
        base_model = model_dir(base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
        if self.device.type == "cpu":  # on CUDA, SDPA's fused kernels take no grouped heads with a mask
            use_grouped_sdpa(model)
        self.autocast = None if dtype_name == "float32" else getattr(torch, dtype_name)
        if self.autocast is not None:
            store_frozen_linears(model.requires_grad_(False), self.autocast)
        self.model = model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos}
        self._pristine: dict[str, object] | None = None  # base weights, cloned before the first merge
        self._active: tuple[int, Path] | None = None  # the merged adapter; None = base weights

    # ---- adapters --------------------------------------------------------------------------
    def _activate(self, adapter_dir: str | Path | None, lora_id: int) -> None:
        path = adapter_path(adapter_dir)
        wanted = None if path is None else (lora_id, path)
        if self._active == wanted:
            return
        import torch

        if self.autocast is not None:
            # Unmerged in 16-bit: merging into bf16 weights would serve a different model (the
            # adapter probe saw |delta log p| ~0.15 per token on a trained SmolLM2 adapter).
            from peft import PeftModel

            if isinstance(self.model, PeftModel):
                self.model = self.model.unload()  # drop the previous LoRA layers, base weights untouched
            self._active = None
            if path is not None:
                self.model = PeftModel.from_pretrained(self.model, str(path)).eval()
                self._active = wanted
            return
        if self._pristine is None:
            # in host memory: `release` must leave nothing on a GPU the trainer is about to use
            self._pristine = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()}
        elif self._active is not None:
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    param.copy_(self._pristine[name])
        self._active = None
        if path is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(path)).merge_and_unload().eval()
            self._active = wanted

    # ---- generation ------------------------------------------------------------------------
    def _generate(self, prompts: list[str], adapter_dir: str | Path | None, lora_id: int,
                  seed: int | None, dec: Decoding) -> Generated:
        import torch
        from transformers import GenerationConfig as HFGenerationConfig

        ids = [self._ids(p, True) for p in prompts]
        check_prompt_lengths([len(x) for x in ids], dec.max_new_tokens, self.cfg.max_model_len)
        n = dec.n
        gen = HFGenerationConfig(
            max_new_tokens=dec.max_new_tokens, num_return_sequences=n,
            do_sample=dec.mode == "sample", num_beams=n if dec.mode == "beam" else 1,
            temperature=dec.temperature if dec.mode == "sample" else None, top_p=None, top_k=None,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=[STOP_STRING],
        )
        self._activate(adapter_dir, lora_id)  # first: creating LoRA layers draws random numbers
        with torch.inference_mode(), self._precision():
            inputs = self._prefilled_inputs(ids, len(prompts) * n)
            # one seed per call: the pool derives it from (run seed, round, shard), so results do not
            # depend on which actor ran the shard
            torch.manual_seed(self.seed if seed is None else seed)
            out = self.model.generate(**inputs, generation_config=gen, tokenizer=self.tokenizer)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()
        texts, num_tokens = [], 0
        for row in new.tolist():
            kept = self._until_end(row)
            num_tokens += len(kept)
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            # a multi-byte character cut off by max_new_tokens is dropped, as vLLM's detokenizer does
            texts.append(cut_at_stop(text.rstrip("\ufffd")))
        return Generated([texts[i * n:(i + 1) * n] for i in range(len(prompts))], num_tokens)

    def _prefilled_inputs(self, ids: list[list[int]], rows: int) -> dict[str, object]:
        """`generate`'s inputs for a batch. The tokens every prompt starts with (the instruction
        template: a third of a default prompt) are run once and their KV cache repeated for all
        `rows` sequences; each row then holds [shared prefix][padding][its own tokens], so the
        padding sits inside the row, where the attention mask hides it as it would at the front."""
        import torch
        from transformers import DynamicCache

        pad = self.tokenizer.pad_token_id
        shared = _common_prefix(ids) if len(ids) > 1 else 0
        shared = min(shared, min(len(x) for x in ids) - 1)  # every row keeps a token of its own to prefill
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        longest = max(len(x) for x in ids)
        input_ids, mask = [], []
        for x in ids:
            pads = longest - len(x)
            input_ids.append(x[:shared] + [pad] * pads + x[shared:])
            mask.append([1] * shared + [0] * pads + [1] * (len(x) - shared))
        inputs: dict[str, object] = {"input_ids": torch.tensor(input_ids, device=self.device),
                                     "attention_mask": torch.tensor(mask, device=self.device)}
        if shared:
            cache = DynamicCache(config=self.model.config)
            self.model(input_ids=inputs["input_ids"][:1, :shared], past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(rows)
            inputs["past_key_values"] = cache
        return inputs

    def _until_end(self, row: list[int]) -> list[int]:
        """Generated ids up to and including the first EOS; padding after a stop is dropped."""
        for j, tok in enumerate(row):
            if tok in self.eos_ids:
                return row[: j + 1]
            if tok == self.tokenizer.pad_token_id:
                return row[:j]
        return row

    # ---- scoring ---------------------------------------------------------------------------
    def token_logprobs(self, prompts: Sequence[str], completions: Sequence[str],
                       adapter_dir: str | Path | None, lora_id: int) -> list[list[float]]:
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pairs = [(self._ids(p, True), self._ids(c, False)) for p, c in zip(prompts, completions, strict=True)]
        width = max(len(p) + len(c) for p, c in pairs) if pairs else 0
        pad = self.tokenizer.pad_token_id
        # right padding: positions count from 0 for every row without position_ids bookkeeping
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (p, c) in enumerate(pairs):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
        result: list[list[float]] = []
        self._activate(adapter_dir, lora_id)
        with torch.inference_mode(), self._precision():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
        for i, (p, c) in enumerate(pairs):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            result.append(logp[i, pos, torch.tensor(c, dtype=torch.long)].tolist() if c else [])
        return result

    def candidate_logprobs(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                           adapter_dir: str | Path | None, lora_id: int) -> list[list[list[float]]]:
        import torch

        from ..train.shared_prefix import use_prefix_sharing
        from .scoring import candidate_rows, candidate_token_logprobs, check_answer_lengths

        rows = candidate_rows(self.tokenizer, prompts, candidates)
        check_answer_lengths(rows, self.cfg.max_model_len)
        self._activate(adapter_dir, lora_id)
        # flash-attn cannot express "the prompt but not the sibling answer": one row per candidate there
        shared = use_prefix_sharing("auto", getattr(self.model.config, "_attn_implementation", "sdpa"))
        with torch.inference_mode(), self._precision():
            return candidate_token_logprobs(self.model, rows, self.tokenizer.pad_token_id,
                                            self.autocast or torch.float32, "shared" if shared else "separate")

    def _precision(self) -> torch.autocast:
        import torch

        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def release(self) -> None:
        if self.device.type == "cuda" and self.model is not None:
            import torch

            self.model.to("cpu")  # the PeftModel wraps this module: its LoRA weights move too
            torch.cuda.empty_cache()

    def reclaim(self) -> None:
        if self.device.type == "cuda" and self.model is not None and self.model.device != self.device:
            self.model.to(self.device)

    def close(self) -> None:
        self._pristine = None
        self.model = None
