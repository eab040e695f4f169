"""GapDropout draws the same masks as nn.Dropout in distribution, and its backward uses the forward's mask."""

from __future__ import annotations

import math

import pytest
import torch

from sprec_ray.train.dropout import GapDropout


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_masks_are_iid_bernoulli_with_the_inverted_scale(p):
    torch.manual_seed(0)
    n = 2_000_000
    out = GapDropout(p).train()(torch.ones(n))
    dropped = out == 0
    assert torch.all(dropped | (out == torch.tensor(1 / (1 - p)))), "kept elements are scaled by 1 / (1 - p)"
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.double().mean().item() - p) < 6 * sigma
    # independence of neighbours (a gap-drawing bug shows up here first): P(both dropped) = p^2
    both = (dropped[1:] & dropped[:-1]).double().mean().item()
    assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / n)
    # every position is dropped with probability p, the first and last included
    per_position = torch.stack([GapDropout(p).train()(torch.ones(8)) == 0 for _ in range(2000)]).double().mean(0)
    assert torch.all((per_position - p).abs() < 6 * math.sqrt(p * (1 - p) / 2000)), per_position


def test_backward_zeroes_the_forwards_dropped_positions_of_a_non_contiguous_input():
    torch.manual_seed(1)
    x = torch.randn(300, 200).t().requires_grad_()  # a transposed view: positions are row-major in x's shape
    out = GapDropout(0.3).train()(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.7)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, kept.float() / 0.7)


def test_masks_follow_torch_manual_seed_and_eval_mode_is_the_identity():
    x = torch.ones(10_000)
    drop = GapDropout(0.1).train()
    torch.manual_seed(7)
    first = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), first)
    assert not torch.equal(drop(x), first)  # the next draw differs
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="must be in"):
        GapDropout(1.0)
