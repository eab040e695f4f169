"""The model side of the endpoint: a finished run's model + catalogue -> ranked catalogue items.

No Ray and no HTTP here, so a replica is a thin shell around `Recommender`:
* `recommend`: history ids -> `render_prompt` -> generate (greedy, or n beams/samples) ->
  `parse_response` -> `Grounder.ground` against the catalogue (history excluded on request) -> one list;
* `rank`: history + the client's candidates -> the run's own prompt (the candidate prompt in a
  candidate-task run) -> log p('"Title"' + EOS) of every candidate (generate/scoring.py) -> sorted;
* `rerank`: the same scores for `/v1/rerank`, whose documents may be free text, not catalogue titles.
`Prompts` renders and length-checks requests; the gateway uses it alone, without loading the model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artefacts import in_run, load_grounder, read_catalogue
from ..config import GenerationConfig, RunConfig, load_config
from ..data.catalogue import Catalogue
from ..data.prompts import parse_response, render_prompt, render_task_prompt
from ..eval.candidates import ranked
from ..eval.grounding import normalise_title
from ..generate.backends import resolve_backend
from ..generate.scoring import answer_scores, candidate_rows, check_answer_lengths
from ..models.base import model_dir
from .adapters import AdapterError, AdapterRef, describe_adapter, newest_round
from .schema import RankRequest, RecommendRequest, RequestError, RerankRequest

log = logging.getLogger("sprec_ray.serve")


class RunDirError(ValueError):
    """The run directory cannot be served; the message names the file or key."""


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    cfg: RunConfig
    base_model: Path  # resolved on this node
    adapter: Path | None
    round: int
    base_ref: str  # as other nodes resolve it: a path in the run, or 'hf://<id>@<commit>'


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> RunInfo:
    """Read <run>/config.yaml (+ overrides) and <run>/final.json, checking every path they name. With
    serve.follow a run still training is served from its newest finished round."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}/config.yaml is missing: is {run_dir} a finished run directory?")
    cfg = load_config(run_dir / "config.yaml", overrides)
    final_path = run_dir / "final.json"
    if not final_path.is_file() and cfg.serve.follow:
        final = _in_progress(run_dir, cfg)
    elif not final_path.is_file():
        raise RunDirError(f"{final_path} is missing: the run has not finished (train it first, or serve it "
                          f"while it trains with serve.follow=true)")
    else:
        try:
            final = json.loads(final_path.read_text())
        except json.JSONDecodeError as err:
            raise RunDirError(f"{final_path} is not valid JSON: {err}") from None
    if not isinstance(final, dict):
        raise RunDirError(f"{final_path} must hold a JSON object")
    for key, kinds in (("base_model", (str,)), ("adapter", (str, type(None))), ("round", (int,))):
        if key not in final or not isinstance(final[key], kinds) or isinstance(final[key], bool):
            raise RunDirError(f"{final_path}: '{key}' is missing or has the wrong type ({final.get(key)!r})")
    try:  # on this node: a path in the run's storage, or a pinned Hub commit from this node's HF cache
        base_ref = in_run(final["base_model"], run_dir)
        base = model_dir(base_ref)
    except FileNotFoundError as err:
        raise RunDirError(f"{final_path}: base_model: {err}") from None
    if not (base / "config.json").is_file():
        raise RunDirError(f"{final_path}: base_model {base} is not a Hugging Face checkpoint dir (no config.json)")
    adapter = Path(in_run(final["adapter"], run_dir)) if final["adapter"] else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise RunDirError(f"{final_path}: adapter {adapter} has no adapter_config.json")
    _check_remote_code(base, cfg.model.trust_remote_code)
    return RunInfo(run_dir, cfg, base, adapter, final["round"], base_ref)


def _in_progress(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """What final.json will say, for a run still training: its prepared base model and newest finished round."""
    prepare = run_dir / "manifests" / "prepare.json"
    newest = newest_round(run_dir, cfg.selfplay.method == "sft_only")
    if not prepare.is_file() or newest is None:
        raise RunDirError(f"{run_dir} has no finished round yet (no final.json, no round manifest): serve.follow "
                          f"needs at least the warm start's adapter")
    base = json.loads(prepare.read_text()).get("outputs", {}).get("base_model")
    return {"base_model": base, "adapter": str(newest[1]), "round": newest[0]}


def adapter_of(run: RunInfo) -> AdapterRef:
    """The run's own adapter (final.json's, or the newest round's), checked against its base model."""
    try:
        return describe_adapter(run.adapter, run.base_model, run.round)
    except AdapterError as err:
        raise RunDirError(f"{run.run_dir}: {err}") from None


def _check_remote_code(base: Path, trust_remote_code: bool) -> None:
    """Refuse checkpoints that need their own Python code unless the run config allows it."""
    config = json.loads((base / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise RunDirError(f"{base} ships custom model code (auto_map in config.json); set "
                          f"model.trust_remote_code=true only if you trust that code")


def serving_generation(cfg: GenerationConfig) -> GenerationConfig:
    """vLLM where configured (or "auto" with GPUs) and installed, else the transformers backend."""
    cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg))
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        log.warning("generation.backend=vllm but vllm is not installed: serving with the hf backend")
        return dataclasses.replace(cfg, backend="hf")
    return cfg


def _adapter_rank(adapter: Path | None, default: int) -> int:
    if adapter is None:
        return default
    rank = json.loads((adapter / "adapter_config.json").read_text()).get("r", default)
    return max(int(rank), default) if isinstance(rank, int) else default


def load_catalogue(run: RunInfo) -> Catalogue:
    """The catalogue the run was prepared with, from its storage (no dataset read on the replica)."""
    try:
        return read_catalogue(run.run_dir)
    except FileNotFoundError as err:
        raise RunDirError(str(err)) from None


class Prompts:
    """Requests -> the run's prompts, and the checks that a prompt fits the model (client errors)."""

    def __init__(self, run: RunInfo, catalogue: Catalogue | None = None) -> None:
        from transformers import AutoTokenizer

        cfg = run.cfg
        self.catalogue = catalogue if catalogue is not None else load_catalogue(run)
        self.task = cfg.data.task
        self.item_noun = cfg.data.item_noun
        # The model was trained on at most data.max_history items: prompt with the most recent ones.
        self.prompt_history = cfg.data.max_history
        self.gen_cfg = serving_generation(cfg.generation)
        self.tokenizer = AutoTokenizer.from_pretrained(str(run.base_model),
                                                       trust_remote_code=cfg.model.trust_remote_code)

    def _history(self, history: Sequence[int]) -> list[str]:
        return [self.catalogue.titles[i] for i in history[-self.prompt_history:]]

    def history_cut(self, history: Sequence[int]) -> int:
        """How many of the oldest history items the prompt leaves out (responses report it)."""
        return max(0, len(history) - self.prompt_history)

    def candidate_titles(self, req: RankRequest | RerankRequest) -> list[str]:
        """The answers to score: catalogue titles for /rank, the documents' texts for /v1/rerank."""
        if isinstance(req, RerankRequest):
            return list(req.documents)
        return [self.catalogue.titles[c] for c in req.candidates]

    def recommend(self, req: RecommendRequest) -> str:
        if self.task == "candidates":
            raise RequestError(409, "this run was trained on the candidate task (choose one of a listed set), so it "
                                    "cannot name items from the whole catalogue: POST /rank with your candidates")
        return render_prompt(self._history(req.history), self.item_noun)

    def rank(self, req: RankRequest | RerankRequest) -> str:
        return render_task_prompt(self.task, self._history(req.history), self.candidate_titles(req), self.item_noun)

    def check_recommend(self, req: RecommendRequest) -> None:
        """A prompt that cannot fit next to its completion is the client's history, not a server fault."""
        n = len(self.tokenizer(self.recommend(req))["input_ids"])
        limit = self.gen_cfg.max_model_len - self.gen_cfg.max_new_tokens
        if n > limit:
            raise RequestError(422, f"the history renders to a {n}-token prompt; this model accepts at most "
                                    f"{limit} (shorten the history or use shorter titles)", "history")

    def check_rank(self, req: RankRequest | RerankRequest) -> None:
        field = "documents" if isinstance(req, RerankRequest) else "candidates"
        rows = candidate_rows(self.tokenizer, [self.rank(req)], [self.candidate_titles(req)])
        try:
            check_answer_lengths(rows, self.gen_cfg.max_model_len)
        except ValueError as err:
            raise RequestError(422, f"the request does not fit the model: {err} (send a shorter history, or fewer "
                                    f"or shorter {field})", field) from None


class Recommender:
    """Holds the generation backend and the catalogue grounder."""

    def __init__(self, run: RunInfo, catalogue: Catalogue | None = None) -> None:
        from ..generate.factory import make_backend

        cfg = run.cfg
        self.run = run
        self.prompts = Prompts(run, catalogue)
        self.catalogue = self.prompts.catalogue
        self.gen_cfg = self.prompts.gen_cfg
        self.logprob_norm = cfg.eval.logprob_norm
        self.adapter = adapter_of(run)  # what a call without an adapter of its own serves
        self.backend = make_backend(self.gen_cfg, run.base_model, _adapter_rank(run.adapter, cfg.lora.r), cfg.seed)
        self.grounder = load_grounder(run.run_dir, self.catalogue, cfg.eval.embedder)
        # Fallback ranking for requests whose every generation is empty (nothing to ground).
        self.by_popularity = [int(i) for i in np.argsort(-self.catalogue.popularity, kind="stable")]
        log.info("serving %s round %d (%s backend, %d items)", run.run_dir, run.round, self.gen_cfg.backend,
                 len(self.catalogue))

    def _scores(self, reqs: Sequence[RankRequest | RerankRequest], adapter: AdapterRef,
                ) -> list[tuple[np.ndarray, list]]:
        """Per request: each answer's score (log-prob, normalised per cfg.eval.logprob_norm) and its
        token log-probs; one scoring call per batch."""
        token_lps = self.backend.candidate_logprobs([self.prompts.rank(r) for r in reqs],
                                                    [self.prompts.candidate_titles(r) for r in reqs],
                                                    adapter.path, adapter.engine_id)
        return [(answer_scores(lps, self.logprob_norm), lps) for lps in token_lps]

    def probe(self, adapter: AdapterRef) -> float:
        """Load `adapter` into the engine and score one answer with it: the check a rollout makes on a
        replica before any request is sent to the new adapter. Returns the log-prob (finite)."""
        history = list(range(min(3, len(self.catalogue))))
        req = RankRequest(tuple(history), (history[0],), 1, ())
        scores, _ = self._scores([req], adapter)[0]
        if not np.isfinite(scores).all():
            raise AdapterError(f"{adapter.path} loads but scores {scores.tolist()}: not a usable adapter")
        return float(scores[0])

    def rank(self, reqs: Sequence[RankRequest], adapter: AdapterRef | None = None) -> list[dict[str, Any]]:
        """One response body per request: its candidates by descending log-prob, the top k."""
        adapter = adapter or self.adapter
        out = []
        for req, (scores, lps) in zip(reqs, self._scores(reqs, adapter), strict=True):
            order = ranked(scores)[: req.k]
            out.append({
                "items": [{**self._item(req.candidates[i], scores[i]), "logprob": round(float(sum(lps[i])), 6),
                           "tokens": len(lps[i])} for i in order],
                "scoring": f"logprob-{self.logprob_norm}",
                "dropped": list(req.dropped),
                "history_cut": self.prompts.history_cut(req.history),
                "round": adapter.round, "adapter": adapter.public(),
            })
        return out

    def rerank(self, reqs: Sequence[RerankRequest], adapter: AdapterRef | None = None) -> list[dict[str, Any]]:
        """`/v1/rerank` results: documents by descending log-prob, the top n. relevance_score is
        exp(score), the (geometric-mean with logprob-mean) probability of answering the document:
        the same order as the log-prob, in the 0..1 range rerank clients expect."""
        adapter = adapter or self.adapter
        out = []
        for req, (scores, _) in zip(reqs, self._scores(reqs, adapter), strict=True):
            results = []
            for i in ranked(scores)[: req.top_n]:
                result: dict[str, Any] = {"index": int(i), "relevance_score": float(np.exp(scores[i])),
                                          "logprob": round(float(scores[i]), 6)}
                if req.return_documents:
                    result["document"] = {"text": req.documents[i]}
                results.append(result)
            out.append({"results": results, "scoring": f"logprob-{self.logprob_norm}",
                        "not_in_catalogue": [i for i, item in enumerate(req.item_ids) if item is None],
                        "history_cut": self.prompts.history_cut(req.history), "round": adapter.round,
                        "adapter": adapter.public()})
        return out

    def recommend(self, reqs: Sequence[RecommendRequest], adapter: AdapterRef | None = None) -> list[dict[str, Any]]:
        """One response body per request, same order; one generate and one ground call per batch."""
        adapter = adapter or self.adapter
        prompts = [self.prompts.recommend(r) for r in reqs]
        generations = self.backend.generate(prompts, adapter.path, adapter.engine_id)
        parsed = [[parse_response(t, self.catalogue) for t in outs] for outs in generations]
        excluded = [sorted(set(r.history)) if r.exclude_history else [] for r in reqs]
        wanted = [min(r.k, len(self.catalogue) - len(ex)) for r, ex in zip(reqs, excluded, strict=True)]
        texts, rows_of, exclude_rows = [], [], []
        for i, outs in enumerate(parsed):
            if wanted[i] <= 0:
                continue
            for text in outs:
                if not normalise_title(text):
                    continue  # an empty title would be "grounded" to arbitrary items with score 0
                texts.append(text)
                rows_of.append(i)
                exclude_rows.append(excluded[i])
        merged: list[dict[int, float]] = [{} for _ in reqs]
        if texts:
            ids, scores = self.grounder.ground(texts, max(wanted), exclude=exclude_rows)
            # n generations per request: each item keeps its best score; ties keep first-seen order
            for row, req_i in enumerate(rows_of):
                best = merged[req_i]
                for item, score in zip(ids[row].tolist(), scores[row].tolist(), strict=True):
                    if item >= 0 and score > best.get(item, float("-inf")):
                        best[item] = score
        out = []
        for i in range(len(reqs)):
            ranked = sorted(merged[i].items(), key=lambda kv: -kv[1])[: max(wanted[i], 0)]
            source = "model"
            if not ranked and wanted[i] > 0:
                skip = set(excluded[i])
                ranked = [(item, 0.0) for item in self.by_popularity if item not in skip][: wanted[i]]
                source = "popularity"
            out.append({
                "items": [self._item(item, score) for item, score in ranked],
                "generated": parsed[i],
                "source": source,
                "history_cut": self.prompts.history_cut(reqs[i].history),
                "round": adapter.round, "adapter": adapter.public(),
            })
        return out

    def _item(self, item: int, score: float) -> dict[str, Any]:
        return {"id": item, "title": self.catalogue.titles[item], "genres": list(self.catalogue.genres[item]),
                "score": round(float(score), 6)}

    def close(self) -> None:
        self.backend.close()
