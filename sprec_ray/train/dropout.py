"""LoRA dropout that is cheap on CPU: the same i.i.d. Bernoulli(p) masks as `nn.Dropout`, drawn as gaps.

On CPU, torch draws one Mersenne-Twister number per element: the masks of SmolLM2's LoRA inputs took
about a fifth of an SFT step (`benchmarks/RESULTS.md`). The gaps between dropped elements of a Bernoulli(p)
sequence are i.i.d. Geometric(p), so drawing only those (about p * n numbers, from numpy's PCG64 seeded
by torch's generator, so `torch.manual_seed` still fixes every mask) gives the same distribution. Only the
dropped positions are kept for the backward. CUDA keeps torch's own dropout, which is fast there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def dropped_positions(numel: int, p: float) -> torch.Tensor:
    """Flat indices of the dropped elements of a Bernoulli(p) mask over `numel` elements."""
    rng = np.random.Generator(np.random.PCG64(int(torch.randint(0, 2**63 - 1, (1,)))))
    mean = numel * p
    rate = -math.log1p(-p)
    size = int(mean + 8 * math.sqrt(mean) + 16)

    def gaps() -> np.ndarray:  # Geometric(p) trials up to each drop (>= 1), as 1 + floor(Exp(1) / -log(1 - p))
        return np.floor(rng.standard_exponential(size) / rate).astype(np.int64) + 1

    positions = np.cumsum(gaps()) - 1
    while positions[-1] < numel:  # more drops than 8 sigma above the mean: draw on
        positions = np.concatenate([positions, positions[-1] + np.cumsum(gaps())])
    return torch.from_numpy(positions[:np.searchsorted(positions, numel)])


class _DropPositions(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        out = x.mul(scale).contiguous()  # positions index the row-major layout
        out.view(-1).index_fill_(0, positions, 0.0)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (positions,) = ctx.saved_tensors
        grad = grad.mul(ctx.scale).contiguous()
        grad.view(-1).index_fill_(0, positions, 0.0)
        return grad, None, None


class GapDropout(torch.nn.Module):
    """`nn.Dropout(p)` in distribution; see the module docstring for how it draws its masks."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout p must be in (0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        return _DropPositions.apply(x, dropped_positions(x.numel(), self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"
