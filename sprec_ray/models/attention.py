"""SDPA that keeps grouped-query attention grouped under a padding mask.

transformers' "sdpa" copies every key/value head once per query head (`repeat_kv`) whenever an
attention mask is passed, which in batched generation is every step: on CPU those copies of the
whole KV cache cost more than the attention itself. PyTorch's SDPA takes the grouped heads directly
(`enable_gqa`) and computes the same numbers. Registered under its own name through transformers'
AttentionInterface, so the stock implementation is untouched elsewhere in the process.
"""

from __future__ import annotations

from typing import Any

import torch

GROUPED_SDPA = "sdpa_grouped"


def _grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or key.shape[1] == query.shape[1] or any(
            kwargs.get(k) is not None for k in ("position_bias", "cache")):
        # no mask: stock sdpa already passes enable_gqa; no groups: nothing to copy; the rest: its own rules
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: torch.nn.Module) -> None:
    """Switch a transformers model from "sdpa" to the grouped variant (other implementations are kept)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the masks stock sdpa gets
    model.set_attn_implementation(GROUPED_SDPA)
