"""Training objectives: what a micro-batch costs, how it is normalised, what it reports.

A stage names its objective in `OBJECTIVES` (by default the one named like its phase); an objective
trains on the rows of its `phase` ("sft": prompt + response, "dpo": prompt + chosen + K rejected).

SFT   : response-token cross-entropy (prompt masked), normalised by the response-token count.
CFT   : the counterfactual objective (docs/method.md#cft), normalised by the sum of the token weights.
DPO   : sigmoid DPO (K = 1) or S-DPO (K >= 1), normalised by the number of preference rows.

DPO reference log-probs: the reference model is this round's SFT adapter, which is also where the
policy starts. So before the first optimizer step each worker runs one no-grad pass of the policy over
its own shard and stores log pi_ref(chosen) and log pi_ref(rejected_k) by `row_id`; no second model
copy is ever held in memory (unlike TRL/OpenRLHF's frozen ref model). After a restart the pass is
repeated *before* the checkpoint is restored, so the reference is always the SFT adapter, never a
partially trained policy. The pass runs in eval mode (no LoRA dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import RunConfig
from .batching import (
    PairRow,
    SeqBatch,
    SFTRow,
    collate_pairs,
    collate_sft,
    plan_sorted,
    split_pair_logps,
)
from .engine import DTYPES, TrainEngine, uses_bf16
from .losses import cft_loss_sum, dpo_loss, preference_stats, sdpo_loss, sequence_logps, sft_loss_sum
from .shared_prefix import SharedPrefixBatch, collate_pairs_shared, use_prefix_sharing


def response_logits(engine: TrainEngine | Any, batch: SeqBatch | SharedPrefixBatch) -> torch.Tensor:
    """(sequences, R, V) logits predicting each right-aligned response token."""
    return batch.response_logits(engine(**batch.model_inputs()).logits)


def cft_weight_sum(n: int, beta: float) -> float:
    """Closed form of sum_t w_t for an n-token response (matches `losses.cft_token_weights`)."""
    return 1.0 if n == 1 else n * (1.0 + beta) / 2.0


class SFTObjective:
    phase = "sft"
    stat_names: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: RunConfig, rows: Sequence[SFTRow], pad_id: int, device: torch.device):
        self.rows = list(rows)
        self.pad_id = pad_id
        self.device = device
        self.cft = cfg.sft.cft if cfg.sft.cft.enabled else None
        if self.cft is not None:
            self.stat_names = ("loss", "factual_loss")

    def lengths(self) -> list[int]:
        return [r.length for r in self.rows]

    def prepare(self, engine: TrainEngine) -> None:
        """Nothing to precompute for SFT."""

    def normaliser(self, idx: Sequence[int]) -> float:
        if self.cft is None:
            return float(sum(len(self.rows[i].response) for i in idx))
        return sum(cft_weight_sum(len(self.rows[i].response), self.cft.beta) for i in idx)

    def loss(self, engine: TrainEngine, idx: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(loss numerator, stat numerators, tokens processed) for the rows `idx`."""
        factual, counterfactual = collate_sft([self.rows[i] for i in idx], self.pad_id)
        factual = factual.to(self.device)
        logits_f = response_logits(engine, factual)
        if self.cft is None:
            total, _ = sft_loss_sum(logits_f, factual.labels)
            return total, {"loss": total.detach()}, factual.num_tokens
        counterfactual = counterfactual.to(self.device)
        logits_c = response_logits(engine, counterfactual)
        total, _, factual_sum = cft_loss_sum(logits_f, logits_c, factual.labels, self.cft.alpha, self.cft.beta)
        stats = {"loss": total.detach(), "factual_loss": factual_sum.detach()}
        return total, stats, factual.num_tokens + counterfactual.num_tokens


class PreferenceObjective:
    phase = "dpo"
    stat_names = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "chosen_logratio", "rejected_logratio")

    def __init__(self, cfg: RunConfig, rows: Sequence[PairRow], pad_id: int, device: torch.device):
        self.rows = list(rows)
        self.pad_id = pad_id
        self.device = device
        self.beta = cfg.dpo.beta
        self.kind = cfg.dpo.loss
        self.ref_batch = cfg.dpo.batch_size
        self.ref: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shared = use_prefix_sharing(cfg.train.prefix_sharing, cfg.model.attn_implementation)
        # The additive mask must match the attention's compute dtype (sdpa refuses a mix).
        self.mask_dtype = torch.bfloat16 if uses_bf16(cfg.train.mixed_precision, device) else DTYPES[cfg.model.dtype]

    def lengths(self) -> list[int]:
        return [r.shared_length if self.shared else r.length for r in self.rows]

    def collate(self, rows: Sequence[PairRow]) -> SeqBatch | SharedPrefixBatch:
        if self.shared:
            return collate_pairs_shared(rows, self.pad_id, self.mask_dtype).to(self.device)
        return collate_pairs(rows, self.pad_id).to(self.device)

    @torch.no_grad()
    def prepare(self, engine: TrainEngine) -> None:
        """Reference log-probs for every local row, by row_id (see the module docstring)."""
        engine.train(False)
        for idx in plan_sorted(self.lengths(), self.ref_batch):
            rows = [self.rows[i] for i in idx]
            batch = self.collate(rows)
            logps = sequence_logps(response_logits(engine, batch), batch.labels).float().cpu()
            chosen, rejected = split_pair_logps(logps, len(rows))
            for j, row in enumerate(rows):
                self.ref[row.row_id] = (chosen[j], rejected[j])
        engine.train(True)

    def normaliser(self, idx: Sequence[int]) -> float:
        return float(len(idx))

    def loss(self, engine: TrainEngine, idx: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        rows = [self.rows[i] for i in idx]
        batch = self.collate(rows)
        logps = sequence_logps(response_logits(engine, batch), batch.labels)
        chosen, rejected = split_pair_logps(logps, len(rows))
        ref_c = torch.stack([self.ref[r.row_id][0] for r in rows]).to(logps.device)
        ref_r = torch.stack([self.ref[r.row_id][1] for r in rows]).to(logps.device)
        if self.kind == "dpo":
            per_row = dpo_loss(chosen, rejected[:, 0], ref_c, ref_r[:, 0], self.beta)
        else:
            per_row = sdpo_loss(chosen, rejected, ref_c, ref_r, self.beta)
        total = per_row.sum()
        stats = {"loss": total.detach(), **preference_stats(chosen, rejected, ref_c, ref_r, self.beta)}
        return total, stats, batch.num_tokens


# A new objective: its class (above, or in a module of its own) and one line here (docs/contributing.md).
OBJECTIVES: dict[str, type] = {"sft": SFTObjective, "dpo": PreferenceObjective}


def objective_class(phase: str, name: str = "") -> type:
    """The class a stage trains with: `OBJECTIVES[name]`, or its phase's own when name is ""."""
    cls = OBJECTIVES.get(name or phase)
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; registered: {sorted(OBJECTIVES)}")
    if cls.phase != phase:
        raise ValueError(f"objective {name!r} trains on {cls.phase} rows, not on a {phase} stage's")
    return cls
