"""Loss functions for SFT, CFT, DPO and S-DPO on response-token logits. Pure tensor code, no model.

Every function takes *response-aligned* tensors: `logits[b, j]` is the prediction of response token
`labels[b, j]`, and `labels == IGNORE` marks positions that are not response tokens (padding). The
batching code produces them right-aligned (see `batching.py`), so CFT's factual and counterfactual
logits line up token for token without ever searching for EOS.

Functions return *sums* plus the normaliser (token count, weight sum or row count) rather than means,
so the training loop can divide by the normaliser of the whole global step (all micro-batches on all
ranks): the gradient is then independent of how rows were split across ranks and micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, float32, 0 where `labels == IGNORE`. logits (B, R, V), labels (B, R)."""
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed response log-probability per row (B,), as DPO uses it (not length-normalised)."""
    return token_logps(logits, labels).sum(-1)


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of supervised tokens)."""
    mask = labels != IGNORE
    return -(token_logps(logits, labels).sum()), mask.sum()


def cft_token_weights(labels: torch.Tensor, beta: float) -> torch.Tensor:
    """w_t = 1 - (t-1)(1-beta)/(n-1) over each row's n response tokens (t = 1..n), 0 on padding.

    Decays linearly from 1 on the first response token to `beta` on the last (the EOS). A one-token
    response gets weight 1 (the reference formula divides by zero there)."""
    mask = (labels != IGNORE).to(torch.float32)
    n = mask.sum(-1, keepdim=True)
    t = mask.cumsum(-1)  # 1..n on response tokens, whatever padding sits before them
    step = (1.0 - beta) / (n - 1).clamp(min=1.0)
    return (1.0 - (t - 1.0) * step) * mask


def cft_loss_sum(factual_logits: torch.Tensor, counterfactual_logits: torch.Tensor, labels: torch.Tensor,
                 alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CFT objective numerator (docs/method.md#cft) and its normaliser.

    Returns (sum_t w_t CE(zF_t, y_t) + alpha * sum_t w_t CE(zF_t - zC_t, y_t), sum_t w_t, factual-only
    weighted CE sum). Dividing the first by the second gives L; the third (divided by the same sum)
    is the factual term alone, which is what CFT reports as eval loss. Gradients flow through both
    forwards, as in the reference (no detach of zC)."""
    if factual_logits.shape != counterfactual_logits.shape:
        raise ValueError(f"factual logits {tuple(factual_logits.shape)} and counterfactual logits "
                         f"{tuple(counterfactual_logits.shape)} must be response-aligned to the same shape")
    w = cft_token_weights(labels, beta)
    ce_f = -token_logps(factual_logits, labels)
    ce_te = -token_logps(factual_logits.float() - counterfactual_logits.float(), labels)
    factual = (w * ce_f).sum()
    return factual + alpha * (w * ce_te).sum(), w.sum(), factual


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row sigmoid DPO loss -log sigma(beta * ((pi_w - ref_w) - (pi_l - ref_l))), all inputs (B,)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def sdpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row S-DPO loss -log sigma(-logsumexp_k beta (r_k - r_w)); chosen (B,), rejected (B, K).

    -log sigma(-z) = softplus(z), and both logsumexp and softplus are overflow-free, so the loss stays
    finite for any reward gap (the reference computes log(sum(exp(.))) directly). K = 1 is DPO."""
    if policy_rejected.dim() != 2 or ref_rejected.shape != policy_rejected.shape:
        raise ValueError(f"rejected log-probs must be (B, K) for policy and reference, got "
                         f"{tuple(policy_rejected.shape)} and {tuple(ref_rejected.shape)}")
    r_w = (policy_chosen - ref_chosen).unsqueeze(-1)
    r_k = policy_rejected - ref_rejected
    z = torch.logsumexp(beta * (r_k - r_w), dim=-1)
    return F.softplus(z)


def preference_stats(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-batch sums (detached) of the implicit rewards: chosen beta*r_w, rejected mean_k beta*r_k,
    margin = chosen - rejected, accuracy = rows where the chosen reward beats every rejected one, and
    the log-ratios log pi/pi_ref in nats: a falling chosen one shows likelihood displacement."""
    with torch.no_grad():
        rejected = policy_rejected if policy_rejected.dim() == 2 else policy_rejected.unsqueeze(-1)
        ref_rej = ref_rejected if ref_rejected.dim() == 2 else ref_rejected.unsqueeze(-1)
        chosen_r = beta * (policy_chosen - ref_chosen)
        rejected_r = beta * (rejected - ref_rej)
        return {
            "chosen_reward": chosen_r.sum(),
            "rejected_reward": rejected_r.mean(-1).sum(),
            "reward_margin": (chosen_r - rejected_r.mean(-1)).sum(),
            "accuracy": (chosen_r.unsqueeze(-1) > rejected_r).all(-1).float().sum(),
            "chosen_logratio": (policy_chosen - ref_chosen).sum(),
            "rejected_logratio": (rejected - ref_rej).mean(-1).sum(),
        }
