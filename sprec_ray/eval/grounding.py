"""Map generated titles to catalogue items: exact title match first, then embedding neighbours.

SPRec grounds with `torch.cdist` against the whole catalogue and two full `argsort`s per row
(docs/method.md#grounding). Here the catalogue is embedded once (L2-normalised, so cosine =
dot product), queries are processed in chunks whose [chunk, n_items] similarity block stays under
`max_block_elems` floats, and only the top k of each row is kept (`torch.topk`).

Determinism: a matrix product's last bits depend on the chunk shape (BLAS blocking), which would
let near-ties swap places between batch sizes. So topk keeps k + `RESCORE_MARGIN` candidates,
their scores are recomputed row by row (an elementwise product and sum, whose rounding does not
depend on the chunk), and the final order is (score desc, item id asc).

Conventions:
* The caller passes the *parsed* title (e.g. `prompts.parse_response(generation)`); the grounder
  strips surrounding whitespace and quotes before the exact lookup and before embedding.
* An exact match is placed at position 0 with score 1.0, and the rest of its row are that
  title's nearest neighbours. Its neighbours are searched with the catalogue embedding of the
  matched item (the text equals that title up to quotes/whitespace), so exact rows cost no
  encoder call.
* Empty or unmatched text is still grounded (to the neighbours of its embedding, the empty
  string included): ground() always returns k items. Use `exact_ids(texts)` (-1 = no exact
  match) to tell exact hits from embedding guesses, and check for empty text yourself.
* `exclude[u]` ids never appear in row u, even when they are the exact match. If fewer than k
  items remain, the missing slots hold id -1 and score -inf.
* Results (ids and scores) are bit-identical for any batch_size / max_block_elems, unless more
  than RESCORE_MARGIN items are tied within float32 rounding at the k-th place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .embedders import Embedder

_QUOTES = "\"'“”‘’«»"
RESCORE_MARGIN = 8  # extra topk candidates rescored so near-ties at the k-th place resolve stably


def normalise_title(text: str) -> str:
    """Strip whitespace and surrounding quote characters (repeatedly: ' "Title" ' -> 'Title')."""
    prev = None
    while prev != text:
        prev = text
        text = text.strip().strip(_QUOTES)
    return text


class Grounder:
    """Catalogue titles + an embedder -> top-k item ids for free-text predictions."""

    def __init__(
        self,
        titles: Sequence[str],
        embedder: Embedder,
        batch_size: int = 1024,
        item_embeddings: np.ndarray | None = None,
        device: str = "cpu",
        max_block_elems: int = 1 << 24,
    ) -> None:
        if not titles:
            raise ValueError("Grounder needs a non-empty catalogue of titles")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.titles = tuple(titles)
        self.embedder = embedder
        self.device = torch.device(device)
        # query rows per similarity block: batch_size, capped so the block stays ~max_block_elems floats
        self.chunk = max(1, min(batch_size, max_block_elems // len(self.titles)))
        self.max_block_elems = max_block_elems
        self._exact: dict[str, int] = {}
        for item_id, title in enumerate(self.titles):
            key = normalise_title(title)
            if key:
                self._exact.setdefault(key, item_id)  # titles equal after stripping: lowest id wins
        emb = embedder.encode(self.titles) if item_embeddings is None else item_embeddings
        self.item_embeddings = _as_matrix(emb, len(self.titles), None, self.device, "item_embeddings")
        self.dim = int(self.item_embeddings.shape[1])

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def exact_ids(self, texts: Sequence[str]) -> np.ndarray:
        """[N] int64: the catalogue id whose title equals the normalised text, or -1."""
        return np.fromiter((self._exact.get(normalise_title(t), -1) for t in texts), dtype=np.int64,
                           count=len(texts))

    def ground(
        self, texts: Sequence[str], k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """ids [N, k] int64 and cosine scores [N, k] float32, best first (see module docstring)."""
        texts = list(texts)
        n = len(texts)
        self._check_args(k, n, exclude)
        exact = self.exact_ids(texts)
        ids = np.empty((n, k), dtype=np.int64)
        scores = np.empty((n, k), dtype=np.float32)
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            queries = self._embed_chunk(texts[start:stop], exact[start:stop])
            ex = exclude[start:stop] if exclude is not None else None
            ids[start:stop], scores[start:stop] = self._topk(queries, k, exact[start:stop], ex, start)
        return ids, scores

    def knn(
        self,
        query_embeddings: np.ndarray,
        k: int,
        exact: np.ndarray | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The search step of `ground` on precomputed L2-normalised query embeddings [N, d].
        `exact` ([N] ids, -1 = none) forces an item to position 0 with score 1.0."""
        q = _as_matrix(query_embeddings, None, self.dim, self.device, "query_embeddings")
        n = q.shape[0]
        self._check_args(k, n, exclude)
        exact = np.full(n, -1, dtype=np.int64) if exact is None else np.asarray(exact, dtype=np.int64)
        if exact.shape != (n,):
            raise ValueError(f"exact has shape {exact.shape}, expected ({n},)")
        ids = np.empty((n, k), dtype=np.int64)
        scores = np.empty((n, k), dtype=np.float32)
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            ex = exclude[start:stop] if exclude is not None else None
            ids[start:stop], scores[start:stop] = self._topk(q[start:stop], k, exact[start:stop], ex, start)
        return ids, scores

    def _check_args(self, k: int, n: int, exclude: Sequence[Sequence[int]] | None) -> None:
        if not 1 <= k <= self.num_items:
            raise ValueError(f"k={k} must be in 1..{self.num_items} (the catalogue size)")
        if exclude is not None and len(exclude) != n:
            raise ValueError(f"exclude has {len(exclude)} rows for {n} queries")

    def _embed_chunk(self, texts: list[str], exact: np.ndarray) -> torch.Tensor:
        queries = torch.empty((len(texts), self.item_embeddings.shape[1]), dtype=torch.float32,
                              device=self.device)
        hit = np.flatnonzero(exact >= 0)
        if hit.size:
            queries[torch.from_numpy(hit)] = self.item_embeddings[torch.from_numpy(exact[hit])]
        miss = np.flatnonzero(exact < 0)
        if miss.size:
            # predictions repeat a lot (popular titles, the same hallucination): embed each once
            uniq, inverse = np.unique([normalise_title(texts[i]) for i in miss], return_inverse=True)
            emb = _as_matrix(self.embedder.encode(uniq.tolist()), len(uniq), self.dim, self.device,
                             "embedder output")
            queries[torch.from_numpy(miss)] = emb[torch.from_numpy(inverse.reshape(-1))]
        return queries

    def _topk(
        self, q: torch.Tensor, k: int, exact: np.ndarray, exclude: Sequence[Sequence[int]] | None,
        offset: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        sims = q @ self.item_embeddings.T  # [chunk, n_items], bounded by max_block_elems
        hit = np.flatnonzero(exact >= 0)
        if hit.size:
            sims[torch.from_numpy(hit), torch.from_numpy(exact[hit])] = float("inf")
        if exclude is not None:
            rows, cols = _pairs(exclude, self.num_items, offset)
            if rows.size:
                sims[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
        wide = min(self.num_items, k + RESCORE_MARGIN)
        vals, idx = torch.topk(sims, wide, dim=1, largest=True, sorted=False)
        del sims
        vals = torch.where(torch.isinf(vals), vals, self._rescore(q, idx))
        # order by (score desc, id asc): sort by id, then a stable sort by score
        by_id = torch.argsort(idx, dim=1)
        vals, idx = vals.gather(1, by_id), idx.gather(1, by_id)
        by_score = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
        vals, idx = vals.gather(1, by_score), idx.gather(1, by_score)
        vals = vals.cpu().numpy().astype(np.float32, copy=False)
        idx = idx.cpu().numpy().astype(np.int64, copy=False)
        vals[vals == np.inf] = 1.0
        idx[vals == -np.inf] = -1
        return idx, vals

    def _rescore(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Cosine of each (row, candidate) pair, computed independently of the chunk shape."""
        out = torch.empty(idx.shape, dtype=q.dtype, device=q.device)
        per = max(1, self.max_block_elems // (idx.shape[1] * q.shape[1]))  # bounds the [rows, wide, d] product
        for s in range(0, idx.shape[0], per):
            cand = self.item_embeddings[idx[s : s + per]]
            out[s : s + per] = (cand * q[s : s + per, None, :]).sum(-1)
        return out


def _as_matrix(emb: np.ndarray | torch.Tensor, rows: int | None, dim: int | None, device: torch.device,
               what: str) -> torch.Tensor:
    t = torch.as_tensor(emb, dtype=torch.float32).to(device)
    if t.ndim != 2 or (rows is not None and t.shape[0] != rows):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected [{rows if rows is not None else 'N'}, d]")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{what} has dimension {t.shape[1]}, the catalogue embeddings {dim}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or inf")
    return t


def _pairs(exclude: Sequence[Sequence[int]], n_items: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, id) index arrays of the ids to exclude; ids outside the catalogue are an error."""
    lens = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=len(exclude))
    if not lens.sum():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cols = np.concatenate([np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude])
    rows = np.repeat(np.arange(len(exclude)), lens)
    bad = (cols < 0) | (cols >= n_items)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"exclude row {int(rows[j]) + offset}: item id {int(cols[j])} is outside 0..{n_items - 1}")
    return rows, cols
