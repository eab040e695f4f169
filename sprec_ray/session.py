"""What the self-play driver and `sprec-ray eval` share for one run: its prepared data, prompts in
the run's task, the generation pool and grounder (both started on first use), and the scoring of
completions into metrics and prediction files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from .artefacts import load_grounder
from .config import RunConfig
from .data.candidates import candidates_of
from .data.prepared import PreparedData
from .data.prompts import render_task_prompt
from .data.records import Example
from .generate.backends import Decoding
from .runtime import check_visible_on_every_node, init_ray


def attach(cfg: RunConfig, run_dir: Path) -> None:
    """Start or join Ray, and check that every node sees the run's storage."""
    init_ray(cfg.ray_address, cfg.ray_num_cpus, cfg.ray_dashboard)
    check_visible_on_every_node(run_dir)


class RunSession:
    def __init__(self, cfg: RunConfig, run_dir: Path, data: PreparedData, base_model: str | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.data = data
        self.base_model = base_model  # an absolute path in the run's storage, or a Hub reference
        self._pool = None
        self._grounder = None

    @cached_property
    def valid_rows(self) -> list[Example]:
        return self.data.rows("valid")  # data.valid_samples of them when set

    @cached_property
    def test_rows(self) -> list[Example]:
        return self.data.rows("test")  # data.test_samples of them when set

    def candidates(self, e: Example) -> tuple[int, ...]:
        return candidates_of(e, len(self.data.catalogue), self.cfg.data.num_candidates, self.cfg.seed)

    def prompts(self, rows: Sequence[Example]) -> list[str]:
        titles, task = self.data.catalogue.titles, self.cfg.data.task
        shown = (lambda e: [titles[c] for c in self.candidates(e)]) if task == "candidates" else (lambda e: [])
        return [render_task_prompt(task, [titles[i] for i in e.history], shown(e), self.cfg.data.item_noun) for e in rows]

    def evaluate(self, rows: Sequence[Example], completions: list[list[str]], timing: dict[str, float], path: Path,
                 adapter: str | None, round_id: int):
        """Ground the rows' completions, score them, and write one prediction per row to `path`; with
        eval.candidate_scoring=logprob, also rank each row's candidates by log-prob with `adapter`."""
        import time

        from .eval.candidates import rank_metrics, ranked
        from .eval.evaluate import evaluate_completions
        from .generate.scoring import answer_scores

        candidates = [self.candidates(e) for e in rows] if self.cfg.data.task == "candidates" else None
        metrics, predictions = evaluate_completions(completions, rows, self.data.catalogue, self.grounder,
                                                    self.cfg.eval.ks, candidates)
        metrics.update(timing)
        if self.cfg.eval.candidate_scoring == "logprob":
            start = time.perf_counter()
            lists = candidates or [self.candidates(e) for e in rows]
            titles = self.data.catalogue.titles
            token_lps = self.score(self.prompts(rows), [[titles[c] for c in cands] for cands in lists], adapter,
                                   round_id)
            scores = [answer_scores(t, self.cfg.eval.logprob_norm) for t in token_lps]
            metrics.update(rank_metrics(scores, lists, [e.target for e in rows], self.cfg.eval.ks))
            metrics["rank_s"] = time.perf_counter() - start
            for p, cands, row_scores in zip(predictions, lists, scores, strict=True):
                p["ranked"] = [cands[i] for i in ranked(row_scores)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
        return {"predictions": str(path)}, metrics

    @property
    def grounder(self):
        if self._grounder is None:
            self._grounder = load_grounder(self.run_dir, self.data.catalogue, self.cfg.eval.embedder)
        return self._grounder

    def generate(self, groups: Sequence[tuple[Sequence[str], Decoding]], adapter: str | None,
                 round_id: int) -> list[tuple[list[list[str]], dict[str, float]]]:
        """Completions for each (prompts, decoding) group, in prompt order, from one adapter: one
        switch and one probe for all of them, and groups that decode alike share one request stream.
        Timing per group: actor start-up (when this call started the pool), adapter hand-off
        (switch + probe) and generation throughput (a shared stream's time split by prompts)."""
        startup = 0.0 if self._pool is not None else self._started_pool().startup_s
        out: list[tuple[list[list[str]], dict[str, float]] | None] = [None] * len(groups)
        try:
            for decoding in dict.fromkeys(d for _, d in groups):  # distinct decodings, first-seen order
                members = [i for i, (_, d) in enumerate(groups) if d == decoding]
                prompts = [p for i in members for p in groups[i][0]]
                completions = self._pool.generate(prompts, adapter, round_id, decoding=decoding)
                stats = self._pool.last_stats
                at = 0
                for i in members:
                    n = len(groups[i][0])
                    share = n / max(1, len(prompts))
                    timing = {"actor_startup_s": startup, "generate_s": stats.wall_s * share,
                              "adapter_switch_s": stats.switch_s * share, "probe_logprob_diff": stats.probe_diff,
                              "prompts_per_s": stats.prompts_per_s, "gen_tokens_per_s": stats.tokens_per_s,
                              "requeued_shards": float(stats.requeued)}
                    out[i] = (completions[at:at + n], timing)
                    at += n
                startup = 0.0
            return [o for o in out if o is not None]
        finally:
            if not self.cfg.generation.keep_alive:
                self.shutdown_pool()

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], adapter: str | None,
              round_id: int) -> list[list[list[float]]]:
        """Each prompt's candidate answers' token log-probs, on the pool (generate/scoring.py)."""
        try:
            return self._started_pool().score(prompts, candidates, adapter, round_id)
        finally:
            if not self.cfg.generation.keep_alive:
                self.shutdown_pool()

    def _started_pool(self):
        from .generate.pool import GenerationPool

        if self._pool is None:
            self._pool = GenerationPool(self.cfg.generation, self.base_model, self.cfg.lora.r, self.cfg.seed)
        return self._pool

    def release_pool(self) -> None:
        """Free the engines' GPU memory while a fit runs (generation.release_while_training)."""
        if self._pool is not None:
            self._pool.release()

    def shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
