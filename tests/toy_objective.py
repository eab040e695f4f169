"""A toy training objective, added as docs/contributing.md says: one class here, one line in the
registry (`sprec_ray.train.objectives.OBJECTIVES`); tests/test_train.py trains a fit with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sprec_ray.train.batching import SFTRow, collate_sft
from sprec_ray.train.losses import IGNORE, token_logps
from sprec_ray.train.objectives import response_logits


class RowMeanSFT:
    """Each row's mean response-token cross-entropy, averaged over rows (SFT's own averages over tokens,
    so long titles weigh more there)."""

    phase = "sft"
    stat_names = ("loss",)

    def __init__(self, cfg: Any, rows: Sequence[SFTRow], pad_id: int, device: torch.device):
        self.rows, self.pad_id, self.device = list(rows), pad_id, device

    def lengths(self) -> list[int]:
        return [r.length for r in self.rows]

    def prepare(self, engine: Any) -> None:
        """Nothing to precompute."""

    def normaliser(self, idx: Sequence[int]) -> float:
        return float(len(idx))

    def loss(self, engine: Any, idx: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        batch, _ = collate_sft([self.rows[i] for i in idx], self.pad_id)
        batch = batch.to(self.device)
        logps = token_logps(response_logits(engine, batch), batch.labels)
        total = (-logps.sum(-1) / (batch.labels != IGNORE).sum(-1)).sum()
        return total, {"loss": total.detach()}, batch.num_tokens
