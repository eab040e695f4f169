"""Prefix-shared preference batches: one sequence per row, `prompt ++ chosen ++ rejected_1 .. rejected_K`.

A DPO row is a ~200-token prompt and 1+K responses of ~12 tokens. Laid out as 1+K separate rows
(`batching.collate_pairs`) the prompt is computed 1+K times; here it is computed once. A 4-D mask
lets every response token see the prompt and its own earlier tokens, never another response, and
position ids restart at len(prompt) for each response, so each response's log-probs are those of
`prompt ++ response` alone (up to float summation order).

Rows are left-padded to end at the same column, so all response tokens sit in the last `keep`
positions and the model projects only those onto the vocabulary (`logits_to_keep`). A pad query
attends to itself only: a fully masked row would give NaN in SDPA, and NaN times a zero weight is
still NaN in the next layer.

Needs an attention implementation that takes an arbitrary 4-D additive mask (sdpa, eager). flash-attn
expresses only causal/varlen masks, which cannot say "the prompt, but not the sibling response".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models.attention import GROUPED_SDPA
from .batching import PairRow
from .losses import IGNORE

MASKABLE_ATTENTION = ("sdpa", GROUPED_SDPA, "eager")


def use_prefix_sharing(setting: str, attn_implementation: str) -> bool:
    """`train.prefix_sharing` resolved against the attention implementation ('on' was checked at load)."""
    return setting == "on" or (setting == "auto" and attn_implementation in MASKABLE_ATTENTION)


@dataclass
class SharedPrefixBatch:
    input_ids: torch.Tensor  # (B, T) left-padded
    position_ids: torch.Tensor  # (B, T) prompt 0..p-1, each response p..p+r-1
    allowed: torch.Tensor  # (B, T, T) bool: query may attend to key
    labels: torch.Tensor  # (S, R) right-aligned response tokens, S = B*(1+K) in collate_pairs' order
    rows: torch.Tensor  # (S,) batch row of each response
    logit_index: torch.Tensor  # (S, R) column of the kept logits predicting each label
    keep: int  # logits_to_keep
    num_tokens: int  # real (non-pad) tokens: what the forward actually computes
    mask_dtype: torch.dtype

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        moved = (t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids, self.allowed,
                                                           self.labels, self.rows, self.logit_index))
        return SharedPrefixBatch(*moved, self.keep, self.num_tokens, self.mask_dtype)

    def model_inputs(self) -> dict[str, Any]:
        # Additive mask in the compute dtype: eager adds it to the scores, sdpa takes it as attn_mask.
        mask = torch.zeros(self.allowed.shape, dtype=self.mask_dtype, device=self.allowed.device)
        mask.masked_fill_(~self.allowed, torch.finfo(self.mask_dtype).min)
        return {"input_ids": self.input_ids, "attention_mask": mask.unsqueeze(1), "position_ids": self.position_ids,
                "logits_to_keep": self.keep, "use_cache": False}

    def response_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, keep, V) model logits -> (S, R, V) logits predicting each right-aligned label."""
        return logits[self.rows.unsqueeze(1), self.logit_index]


def collate_pairs_shared(rows: Sequence[PairRow], pad_id: int, mask_dtype: torch.dtype = torch.float32) -> SharedPrefixBatch:
    """B preference rows -> B shared-prefix sequences; labels in `collate_pairs`' order (chosen of
    every row, then negative k of every row), so `split_pair_logps` applies unchanged."""
    if not rows:
        raise ValueError("collate_pairs_shared needs at least one row")
    k = len(rows[0].rejected)
    responses = [[r.chosen, *r.rejected] for r in rows]
    lengths = [len(r.prompt) + sum(len(x) for x in resp) for r, resp in zip(rows, responses, strict=True)]
    b, t_max = len(rows), max(lengths)
    keep = max(n - len(r.prompt) for n, r in zip(lengths, rows, strict=True)) + 1
    r_max = max(len(x) for resp in responses for x in resp)
    input_ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    positions = torch.zeros((b, t_max), dtype=torch.long)
    segment = torch.full((b, t_max), -1, dtype=torch.long)  # -1 pad, 0 prompt, i + 1 response i
    labels = torch.full((b * (1 + k), r_max), IGNORE, dtype=torch.long)
    logit_index = torch.zeros((b * (1 + k), r_max), dtype=torch.long)
    first_kept = t_max - keep
    for i, (row, resp) in enumerate(zip(rows, responses, strict=True)):
        start, p = t_max - lengths[i], len(row.prompt)
        input_ids[i, start:start + p] = torch.tensor(row.prompt)
        positions[i, start:start + p] = torch.arange(p)
        segment[i, start:start + p] = 0
        at = start + p
        for j, tokens in enumerate(resp):
            n = len(tokens)
            input_ids[i, at:at + n] = torch.tensor(tokens)
            positions[i, at:at + n] = torch.arange(p, p + n)
            segment[i, at:at + n] = j + 1
            s = j * b + i  # collate_pairs' order
            labels[s, r_max - n:] = torch.tensor(tokens)
            # token 0 is predicted from the prompt's last position, token m from the response's token m-1
            logit_index[s, r_max - n:] = torch.tensor([start + p - 1, *range(at, at + n - 1)]) - first_kept
            at += n
    causal = torch.ones((t_max, t_max), dtype=torch.bool).tril()
    seg_q, seg_k = segment.unsqueeze(2), segment.unsqueeze(1)
    allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(t_max, dtype=torch.bool) & (seg_q < 0)
    rows_of = torch.arange(b).repeat(1 + k)
    return SharedPrefixBatch(input_ids, positions, allowed, labels, rows_of, logit_index, keep, sum(lengths), mask_dtype)
