"""16-bit compute shared by the trainer and the transformers generation engine: frozen Linear weights
stored in bf16 and matmuls under autocast, while norms, the residual stream and the LoRA weights stay
fp32. Generation then sees the numbers the trainer's forward computed (docs/method.md, Precision)."""

from __future__ import annotations

import torch


def has_native_bf16(device: torch.device) -> bool:
    """Whether the device runs bf16 matmuls natively; a CPU without AMX or AVX512-BF16 emulates
    them, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen base Linear weights in the autocast dtype. Autocast casts every one of them again
    on every forward, to the same values (a measurable share of a SmolLM2 forward on CPU, its LM head
    included: benchmarks/RESULTS.md). An LM head tied to the input embedding gets a copy of its own: the
    embedding lookup is not autocast, and both are frozen, so untying them changes no value."""
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            if module.weight is embedding:
                module.weight = torch.nn.Parameter(embedding.detach().to(dtype), requires_grad=False)
            else:
                module.weight.data = module.weight.data.to(dtype)
