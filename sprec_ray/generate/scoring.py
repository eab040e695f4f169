"""Rank a row's candidate titles by the model's log-probability of answering each one.

A candidate's response is what training teaches the model to write, '"Title"' + EOS, after the
run's own prompt. The prompt is computed once per row: the row becomes one prefix-shared sequence,
`prompt ++ cand_1 ++ .. ++ cand_K` (train/shared_prefix.py, the DPO layout), so 20 candidates cost
about one forward over the prompt plus 20 short answers, not 20 full forwards. `layout="separate"`
runs one `prompt ++ cand` row per candidate, for comparison (benchmarks/rank_scoring.py).

Scores: `sum` is log p(whole answer), the probability the model gives the title as its answer;
`mean` divides it by the answer's token count. `mean` is the default (eval.logprob_norm): every
token costs log-probability, so `sum` prefers short titles whatever the user read, and on the 400
Goodreads validation rows it ranked worse than `mean` for the shipped warm start (HR@1 in
benchmarks/RESULTS.md, rank_scoring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ..data.prompts import render_response

# Rows per forward are capped so that (rows x kept answer tokens) logits stay bounded: SmolLM2's
# 49k-word vocabulary makes 1,024 such positions ~200 MB in float32.
MAX_LOGIT_POSITIONS = 1024


def candidate_rows(tokenizer: Any, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list:
    """One PairRow per prompt: prompt ids as training tokenizes them, each title as '"Title"' + EOS."""
    from ..train.batching import Encoder, PairRow

    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    for i, titles in enumerate(candidates):
        if not titles:
            raise ValueError(f"row {i}: empty candidate list")
    encoder = Encoder(tokenizer, max_prompt_len=1 << 30, max_response_len=1 << 30)
    ids = encoder.prompts(list(prompts), list(range(len(prompts))))
    rows = []
    for i, (prompt, titles) in enumerate(zip(ids, candidates, strict=True)):
        answers = encoder.responses([render_response(t) for t in titles], [i] * len(titles), field="candidate")
        rows.append(PairRow(i, prompt, answers[0], tuple(answers[1:])))
    return rows


def check_answer_lengths(rows: Sequence, max_model_len: int) -> None:
    """Fail on the first candidate row whose prompt and longest answer do not fit the model, naming it."""
    for i, row in enumerate(rows):
        n = len(row.prompt) + max(len(a) for a in (row.chosen, *row.rejected))
        if n > max_model_len:
            raise ValueError(f"row {i}: its prompt and longest candidate answer take {n} tokens, over "
                             f"generation.max_model_len={max_model_len}")


def candidate_token_logprobs(model: Any, rows: Sequence, pad_id: int, mask_dtype: Any,
                             layout: Literal["shared", "separate"] = "shared") -> list[list[list[float]]]:
    """log p(token | prompt, earlier answer tokens) of every candidate's answer, per row and candidate.
    Call under torch.inference_mode(); rows with equal candidate counts share forwards."""
    from ..train.batching import collate_pairs
    from ..train.losses import token_logps
    from ..train.shared_prefix import collate_pairs_shared

    out: list[list[list[float]] | None] = [None] * len(rows)
    device = next(model.parameters()).device
    for chunk in _chunks(rows):
        group = [rows[i] for i in chunk]
        if layout == "shared":
            batch = collate_pairs_shared(group, pad_id, mask_dtype).to(device)
        else:
            batch = collate_pairs(group, pad_id).to(device)
        logits = model(**batch.model_inputs()).logits
        lps = token_logps(batch.response_logits(logits), batch.labels).cpu()
        b = len(group)
        for j, i in enumerate(chunk):  # labels come in collate_pairs' order: candidate c of row j at c*b + j
            answers = (group[j].chosen, *group[j].rejected)
            out[i] = [lps[c * b + j, lps.shape[1] - len(a):].tolist() for c, a in enumerate(answers)]
        del logits, lps
    return out  # type: ignore[return-value]  # _chunks covers every row


def _chunks(rows: Sequence) -> list[list[int]]:
    """Row indices grouped by candidate count, then by length, at most MAX_LOGIT_POSITIONS answer tokens each."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].rejected), rows[i].shared_length))
    chunks: list[list[int]] = []
    kept = 0
    for i in order:
        row = rows[i]
        answer_tokens = len(row.chosen) + sum(len(r) for r in row.rejected)
        if chunks and len(rows[chunks[-1][0]].rejected) == len(row.rejected) and kept + answer_tokens <= MAX_LOGIT_POSITIONS:
            chunks[-1].append(i)
            kept += answer_tokens
        else:
            chunks.append([i])
            kept = answer_tokens
    return chunks


def answer_scores(token_logprobs: Sequence[Sequence[float]], norm: Literal["sum", "mean"]) -> list[float]:
    """One score per candidate from its answer's token log-probs."""
    if norm == "sum":
        return [float(sum(t)) for t in token_logprobs]
    return [float(sum(t)) / max(len(t), 1) for t in token_logprobs]
