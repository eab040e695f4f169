"""Tokenise SFT / preference rows, plan length-bucketed micro-batches, collate left-padded tensors.

Layout: every sequence is `prompt ++ response` with the response ending in EOS, *left*-padded so all
sequences of a batch end at the same position. Response tokens are then right-aligned: column j of
`labels` is the same response token in a factual and a counterfactual batch (CFT), and the model only
has to produce logits for the last R+1 positions (`logits_to_keep`), which saves the vocabulary
projection over the whole prompt. Explicit `position_ids` make a padded row compute exactly what it
would compute alone.

Truncation never touches a response: the prompt loses tokens from the left (a leading BOS is kept),
and a response longer than `max_response_len` is an error naming the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.records import DataError
from .losses import IGNORE

Ids = tuple[int, ...]


@dataclass(frozen=True)
class SFTRow:
    row_id: int
    prompt: Ids
    response: Ids  # ends with EOS
    cf_prompt: Ids = ()  # CFT: the same prompt with the history removed

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response) + (len(self.cf_prompt) + len(self.response) if self.cf_prompt else 0)


@dataclass(frozen=True)
class PairRow:
    row_id: int
    prompt: Ids
    chosen: Ids  # ends with EOS
    rejected: tuple[Ids, ...]  # K responses, each ending with EOS

    @property
    def length(self) -> int:
        """Tokens computed when every response is its own `prompt ++ response` row."""
        return (len(self.prompt) + 1) * (1 + len(self.rejected)) + len(self.chosen) + sum(len(r) for r in self.rejected)

    @property
    def shared_length(self) -> int:
        """Tokens computed as one prefix-shared sequence (`shared_prefix.py`)."""
        return len(self.prompt) + len(self.chosen) + sum(len(r) for r in self.rejected)


class Encoder:
    """Turns prompt / response strings into token ids under the model's length limits."""

    def __init__(self, tokenizer: Any, max_prompt_len: int, max_response_len: int):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; responses must end with EOS")
        self.tokenizer = tokenizer
        self.eos = int(tokenizer.eos_token_id)
        self.bos = tokenizer.bos_token_id
        self.max_prompt_len = max_prompt_len
        self.max_response_len = max_response_len

    def prompts(self, texts: Sequence[str], row_ids: Sequence[int], field: str = "prompt") -> list[Ids]:
        out = []
        for text, row_id, ids in zip(texts, row_ids, self.tokenizer(list(texts), add_special_tokens=True)["input_ids"], strict=True):
            if ids and ids[-1] == self.eos and len(ids) > 1:
                ids = ids[:-1]  # a tokenizer that appends EOS to every text would end the prompt early
            if not text or not ids:
                raise DataError(f"row {row_id}: {field} is empty")
            if len(ids) > self.max_prompt_len:
                keep_bos = self.bos is not None and ids[0] == self.bos and self.bos != self.eos
                tail = ids[len(ids) - (self.max_prompt_len - int(keep_bos)):]
                ids = [ids[0], *tail] if keep_bos else tail
            out.append(tuple(int(i) for i in ids))
        return out

    def responses(self, texts: Sequence[str], row_ids: Sequence[int], field: str = "response") -> list[Ids]:
        out = []
        for text, row_id, ids in zip(texts, row_ids, self.tokenizer(list(texts), add_special_tokens=False)["input_ids"], strict=True):
            if not text or not text.strip():
                raise DataError(f"row {row_id}: {field} is empty")
            ids = (*ids, self.eos)
            if len(ids) > self.max_response_len:
                raise DataError(f"row {row_id}: {field} {text[:60]!r} is {len(ids)} tokens with EOS, over "
                                f"model.max_response_len={self.max_response_len}; responses are never truncated, raise the limit")
            out.append(tuple(int(i) for i in ids))
        return out


def _column(batch: dict[str, Any], name: str, why: str) -> list[Any]:
    if name not in batch:
        raise DataError(f"dataset has no column {name!r} ({why}); columns: {sorted(batch)}")
    return list(batch[name])


def _texts(values: list[Any], name: str, row_ids: Sequence[int]) -> list[str]:
    for value, row_id in zip(values, row_ids, strict=True):
        if not isinstance(value, str):
            raise DataError(f"row {row_id}: {name} must be a string, got {type(value).__name__}")
    return values


def encode_sft_batch(batch: dict[str, Any], encoder: Encoder, counterfactual: bool, first_index: int = 0) -> list[SFTRow]:
    """A Ray Data batch (columns prompt, response[, cf_prompt, row_id]) -> SFT rows."""
    prompts = _column(batch, "prompt", "SFT input")
    n = len(prompts)
    row_ids = [int(r) for r in batch["row_id"]] if "row_id" in batch else list(range(first_index, first_index + n))
    prompts = _texts(prompts, "prompt", row_ids)
    responses = _texts(_column(batch, "response", "SFT target"), "response", row_ids)
    p_ids = encoder.prompts(prompts, row_ids)
    r_ids = encoder.responses(responses, row_ids)
    if not counterfactual:
        return [SFTRow(r, p, y) for r, p, y in zip(row_ids, p_ids, r_ids, strict=True)]
    cf = _texts(_column(batch, "cf_prompt", "needed when sft.cft.enabled"), "cf_prompt", row_ids)
    cf_ids = encoder.prompts(cf, row_ids, "cf_prompt")
    return [SFTRow(r, p, y, c) for r, p, y, c in zip(row_ids, p_ids, r_ids, cf_ids, strict=True)]


def encode_pair_batch(batch: dict[str, Any], encoder: Encoder, num_negatives: int) -> list[PairRow]:
    """A Ray Data batch (row_id, prompt, response = chosen, rejected = K strings) -> preference rows."""
    row_ids = [int(r) for r in _column(batch, "row_id", "reference log-probs are stored by row_id")]
    prompts = _texts(_column(batch, "prompt", "DPO input"), "prompt", row_ids)
    chosen = _texts(_column(batch, "response", "the chosen response"), "response", row_ids)
    rejected_lists = _column(batch, "rejected", "K rejected responses per row")
    flat, flat_ids = [], []
    for row_id, rejected in zip(row_ids, rejected_lists, strict=True):
        rejected = [rejected] if isinstance(rejected, str) else list(rejected)
        if len(rejected) != num_negatives:
            raise DataError(f"row {row_id}: {len(rejected)} rejected responses, expected dpo.num_negatives={num_negatives}")
        flat += _texts(rejected, "rejected", [row_id] * len(rejected))
        flat_ids += [row_id] * len(rejected)
    p_ids = encoder.prompts(prompts, row_ids)
    c_ids = encoder.responses(chosen, row_ids)
    rej_ids = encoder.responses(flat, flat_ids, "rejected")
    k = num_negatives
    return [PairRow(r, p, c, tuple(rej_ids[i * k:(i + 1) * k]))
            for i, (r, p, c) in enumerate(zip(row_ids, p_ids, c_ids, strict=True))]


def plan_epoch(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket_batches: int = 16) -> list[list[int]]:
    """Micro-batches of row indices for one epoch: shuffle, sort each window of `bucket_batches`
    batches by length (so a batch holds similar lengths and little padding), shuffle batch order.
    Deterministic in (lengths, seed, epoch); always ceil(n / batch_size) batches."""
    n = len(lengths)
    lens = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    window = batch_size * max(1, bucket_batches)
    batches: list[list[int]] = []
    for start in range(0, n, window):
        idx = order[start:start + window]
        idx = idx[np.argsort(-lens[idx], kind="stable")]
        batches += [idx[i:i + batch_size].tolist() for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def plan_epoch_tokens(lengths: Sequence[int], max_tokens: int, seed: int, epoch: int,
                      window_rows: int = 1024) -> list[list[int]]:
    """Micro-batches under a padded-token budget (rows x longest row <= max_tokens; a row longer than
    the budget goes alone): shuffle, sort each window by length, pack greedily, shuffle batch order.
    Deterministic in (lengths, max_tokens, seed, epoch)."""
    lens = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lens))
    batches: list[list[int]] = []
    for start in range(0, len(order), window_rows):
        idx = order[start:start + window_rows]
        current: list[int] = []
        for i in idx[np.argsort(-lens[idx], kind="stable")].tolist():
            if current and (len(current) + 1) * int(lens[current[0]]) > max_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    return [batches[i] for i in rng.permutation(len(batches))]


def split_to_count(batches: list[list[int]], count: int) -> list[list[int]]:
    """Split the largest batches in half until there are `count` (ranks must run the same number of
    micro-batches: ZeRO-3 gathers parameters collectively in every forward). Order is kept."""
    if count < len(batches) or count > sum(len(b) for b in batches):
        raise ValueError(f"cannot turn {len(batches)} micro-batches of {sum(len(b) for b in batches)} rows into {count}")
    out = [list(b) for b in batches]
    while len(out) < count:
        i = max(range(len(out)), key=lambda j: len(out[j]))
        half = len(out[i]) // 2
        out[i:i + 1] = [out[i][:half], out[i][half:]]
    return out


def plan_sorted(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches in length order (no shuffle), for no-grad passes such as reference log-probs."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def group_steps(batches: list[list[int]], grad_accum: int) -> list[list[list[int]]]:
    """Consecutive micro-batches per optimizer step; the last step of an epoch may hold fewer."""
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T), 0 at each row's first real token
    labels: torch.Tensor  # (B, R) response tokens right-aligned, IGNORE before each row's response

    @property
    def logits_to_keep(self) -> int:
        return self.labels.shape[1] + 1

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> SeqBatch:
        return SeqBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.position_ids, self.labels)))

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids,
                "logits_to_keep": self.logits_to_keep, "use_cache": False}

    def response_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, R+1, V) kept logits -> (B, R, V) logits predicting each right-aligned label."""
        return logits[:, :-1, :]


def collate(prompts: Sequence[Ids], responses: Sequence[Ids], pad_id: int) -> SeqBatch:
    """Left-pad `prompt ++ response` rows; labels hold the last R tokens, R = longest response."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"collate needs equal, non-empty prompt and response lists, got {len(prompts)} and {len(responses)}")
    if any(not p for p in prompts) or any(not r for r in responses):
        raise ValueError("every row needs at least one prompt token and one response token")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    t_max, r_max = max(lengths), max(len(r) for r in responses)
    b = len(prompts)
    input_ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    attention = torch.zeros((b, t_max), dtype=torch.long)
    labels = torch.full((b, r_max), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, t_max - lengths[i]:] = torch.tensor((*p, *r), dtype=torch.long)
        attention[i, t_max - lengths[i]:] = 1
        labels[i, r_max - len(r):] = torch.tensor(r, dtype=torch.long)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return SeqBatch(input_ids, attention, positions, labels)


def collate_sft(rows: Sequence[SFTRow], pad_id: int) -> tuple[SeqBatch, SeqBatch | None]:
    """(factual batch, counterfactual batch or None). Both share the response columns exactly."""
    factual = collate([r.prompt for r in rows], [r.response for r in rows], pad_id)
    if not rows[0].cf_prompt:
        return factual, None
    return factual, collate([r.cf_prompt for r in rows], [r.response for r in rows], pad_id)


def collate_pairs(rows: Sequence[PairRow], pad_id: int) -> SeqBatch:
    """One batch of B*(1+K) sequences: rows' chosen first, then negative k of every row for k = 0..K-1."""
    k = len(rows[0].rejected)
    prompts = [r.prompt for r in rows] * (1 + k)
    responses = [r.chosen for r in rows] + [r.rejected[j] for j in range(k) for r in rows]
    return collate(prompts, responses, pad_id)


def split_pair_logps(logps: torch.Tensor, batch_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `collate_pairs`' order: (B*(1+K),) -> chosen (B,), rejected (B, K)."""
    chosen = logps[:batch_rows]
    rejected = logps[batch_rows:].reshape(-1, batch_rows).T
    return chosen, rejected
