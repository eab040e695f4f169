"""The SPRec self-play driver.

warm-start SFT, then per round r:
  generate negatives with round r-1's model (vLLM pool) -> SFT on the real next items
  -> DPO / S-DPO against those negatives, reference = this round's SFT model -> evaluate on valid.
Every phase is idempotent and leaves a manifest; `resume=True` skips finished phases, and an
interrupted training phase picks up from its last Ray Train checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError, RunConfig, save_config
from .data.dataset import RecDataset, load_dataset
from .data.prompts import render_prompt, render_response
from .data.records import Example
from .data.sharding import prompt_dataset, write_examples_parquet
from .generate.backends import Decoding
from .manifest import ManifestStore, PhaseRecord, write_json_atomic
from .models.base import resolve_base_model
from .report import metrics_table, write_report
from .runtime import init_ray

log = logging.getLogger("sprec_ray")
MODEL_CACHE = Path.home() / ".cache" / "sprec_ray" / "models"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [sprec] %(message)s", datefmt="%H:%M:%S")


class SelfPlayDriver:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).resolve()
        self._check_run_dir(resume)
        init = cfg.selfplay.init_adapter
        if init and not (Path(init) / "adapter_config.json").exists():
            raise ConfigError(f"selfplay.init_adapter={init!r} is not a PEFT adapter directory (no adapter_config.json)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.data: RecDataset = load_dataset(cfg.data, self.run_dir / "scratch", seed=cfg.seed)
        for bad in self.data.bad:
            if len(bad):
                log.warning(bad.summary())
        self.store = ManifestStore(self.run_dir, cfg.digest(), cfg.seed, self.data.source_hashes)
        self._pool = None
        self._grounder = None
        self.base_model: Path | None = None

    def _check_run_dir(self, resume: bool) -> None:
        manifests = self.run_dir / "manifests"
        if manifests.exists() and any(manifests.glob("*.json")) and not resume:
            raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another output_dir")

    # ---- phase bookkeeping -------------------------------------------------------------
    def phase(self, name: str, body: Callable[[], tuple[dict[str, Any], dict[str, float]]]) -> PhaseRecord:
        done = self.store.load(name)
        if done is not None:
            log.info("phase %-10s already done (resume), skipping", name)
            return done
        log.info("phase %-10s start", name)
        start = time.perf_counter()
        outputs, metrics = body()
        record = PhaseRecord(name, outputs, metrics, time.perf_counter() - start)
        self.store.save(record)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:8])
        log.info("phase %-10s done in %.1fs  %s", name, record.seconds, shown)
        return record

    # ---- lazily built, shared pieces -----------------------------------------------------
    @property
    def grounder(self):
        if self._grounder is None:
            from .eval.embedders import make_embedder
            from .eval.grounding import Grounder

            self._grounder = Grounder(self.data.catalogue.titles, make_embedder(self.cfg.eval.embedder))
        return self._grounder

    def generate(self, prompts: Sequence[str], adapter: str | None, adapter_id: int,
                 decoding: Decoding | None = None) -> tuple[list[list[str]], dict[str, float]]:
        """Completions in prompt order, plus timing: actor start-up (when this call started the
        pool), adapter hand-off (switch + probe check) and generation throughput."""
        from .generate.pool import GenerationPool

        timing = {"actor_startup_s": 0.0}
        if self._pool is None:
            self._pool = GenerationPool(self.cfg.generation, self.base_model, self.cfg.lora.r, self.cfg.seed)
            timing["actor_startup_s"] = self._pool.startup_s
        try:
            completions = self._pool.generate(list(prompts), adapter, adapter_id, decoding=decoding)
            stats = self._pool.last_stats
            timing.update(generate_s=stats.wall_s, adapter_switch_s=stats.switch_s, probe_logprob_diff=stats.probe_diff,
                          prompts_per_s=stats.prompts_per_s, gen_tokens_per_s=stats.tokens_per_s,
                          requeued_shards=float(stats.requeued))
            return completions, timing
        finally:
            if not self.cfg.generation.keep_alive:
                self.shutdown_pool()

    def shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> list[tuple[str, dict[str, float]]]:
        cfg = self.cfg
        init_ray(cfg.ray_address, cfg.ray_num_cpus)
        import ray.data

        # Fixed block order makes a resumed run see the same batches as an uninterrupted one.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        prep = self.phase("prepare", self._prepare)
        self.base_model = Path(prep.outputs["base_model"])
        results: list[tuple[str, dict[str, float]]] = []
        if cfg.selfplay.init_adapter:
            adapter = str(Path(cfg.selfplay.init_adapter).resolve())
        else:
            adapter = self.phase("r0_sft", lambda: self._sft(0, self._round_rows(0), None)).outputs["adapter"]
        results.append(("r0 (SFT)", self.phase("r0_eval", lambda: self._evaluate(0, adapter)).metrics))
        for r in range(1, cfg.selfplay.rounds + 1):
            rows = self._round_rows(r)
            previous = adapter
            if cfg.selfplay.method == "sft_only":
                adapter = self.phase(f"r{r}_sft", lambda r=r, rows=rows, p=previous: self._sft(r, rows, p)).outputs["adapter"]
            else:
                negatives = self.phase(f"r{r}_negatives", lambda r=r, rows=rows, p=previous: self._negatives(r, rows, p))
                sft = self.phase(f"r{r}_sft", lambda r=r, rows=rows, p=previous: self._sft(r, rows, p)).outputs["adapter"]
                adapter = self.phase(f"r{r}_dpo", lambda r=r, n=negatives, s=sft: self._dpo(r, n, s)).outputs["adapter"]
            results.append((f"r{r}", self.phase(f"r{r}_eval", lambda r=r, a=adapter: self._evaluate(r, a)).metrics))
        self.shutdown_pool()
        write_json_atomic(self.run_dir / "final.json", {"base_model": str(self.base_model), "adapter": adapter,
                                                        "round": cfg.selfplay.rounds})
        self._write_report(results)
        return results

    def _round_rows(self, round_id: int) -> list[Example]:
        n = self.cfg.selfplay.round_samples
        train = self.data.train
        if n <= 0 or n >= len(train) or round_id == 0:
            return train
        picked = random.Random(self.cfg.seed * 1_000_003 + round_id).sample(range(len(train)), n)
        return [train[i] for i in sorted(picked)]

    def _prepare(self) -> tuple[dict[str, Any], dict[str, float]]:
        titles = self.data.catalogue.titles
        tiny_texts = [render_prompt([titles[i] for i in e.history]) + render_response(titles[e.target])
                      for e in self.data.train[:2000]]
        cache = self.run_dir / "base_model" if self.cfg.model.name == "tiny" else MODEL_CACHE
        base = resolve_base_model(self.cfg.model.name, cache, tiny_texts)
        bad = {f"bad_rows_{i}": float(len(b)) for i, b in enumerate(self.data.bad)}
        return ({"base_model": str(base)},
                {"train_rows": float(len(self.data.train)), "valid_rows": float(len(self.data.valid)),
                 "items": float(len(self.data.catalogue)), **bad})

    def _dataset(self, name: str, rows: Sequence[Example], negatives: Sequence[Sequence[int]] | None = None):
        shards = self.run_dir / "data" / name
        write_examples_parquet(rows, shards, self.cfg.data.num_shards, negatives)
        return prompt_dataset(shards, self.data.catalogue, self.cfg.data.item_noun,
                              counterfactual=self.cfg.sft.cft.enabled)

    def _sft(self, r: int, rows: Sequence[Example], init_adapter: str | None):
        from .train.phases import run_sft

        result = run_sft(self.cfg, self.base_model, self._dataset(f"r{r}_sft", rows), self.run_dir / f"r{r}" / "sft",
                         Path(init_adapter) if init_adapter else None, name=f"r{r}_sft")
        return {"adapter": str(result.adapter_dir), "checkpoint": result.checkpoint_path}, result.metrics

    def _negatives(self, r: int, rows: Sequence[Example], adapter: str):
        k = self.cfg.dpo.num_negatives
        if self.cfg.selfplay.method == "dpo_random":
            negatives = random_negatives(rows, len(self.data.catalogue), k, self.cfg.seed + r)
            stats: dict[str, float] = {"random": float(len(rows) * k)}
        else:
            from .generate.negatives import build_negatives

            prompts = self._prompts(rows)
            completions, timing = self.generate(prompts, adapter, adapter_id=r)
            negatives, neg_stats = build_negatives(rows, completions, self.data.catalogue, self.grounder, k, self.cfg.seed + r)
            stats = {**{k_: float(v) for k_, v in dataclasses.asdict(neg_stats).items()}, **timing}
        path = self.run_dir / f"r{r}" / "negatives.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"row_id": [e.row_id for e in rows], "negatives": [list(n) for n in negatives]}), path)
        return {"negatives": str(path)}, stats

    def _dpo(self, r: int, negatives: PhaseRecord, sft_adapter: str):
        from .train.phases import run_dpo

        table = pq.read_table(negatives.outputs["negatives"]).to_pydict()
        by_row = dict(zip(table["row_id"], table["negatives"], strict=True))
        rows = [e for e in self._round_rows(r) if by_row.get(e.row_id)]
        dataset = self._dataset(f"r{r}_dpo", rows, [by_row[e.row_id] for e in rows])
        result = run_dpo(self.cfg, self.base_model, dataset, self.run_dir / f"r{r}" / "dpo", Path(sft_adapter), name=f"r{r}_dpo")
        return {"adapter": str(result.adapter_dir), "checkpoint": result.checkpoint_path}, result.metrics

    def _prompts(self, rows: Sequence[Example]) -> list[str]:
        titles = self.data.catalogue.titles
        return [render_prompt([titles[i] for i in e.history], self.cfg.data.item_noun) for e in rows]

    def _evaluate(self, r: int, adapter: str):
        from .eval.evaluate import evaluate_completions

        rows = self.data.valid
        # greedy whatever generation.decoding says: sampled / beam decoding is for S-DPO's negatives
        greedy = Decoding("greedy", 1, max_new_tokens=self.cfg.generation.max_new_tokens)
        completions, timing = self.generate(self._prompts(rows), adapter, adapter_id=r + 1, decoding=greedy)
        metrics, predictions = evaluate_completions(completions, rows, self.data.catalogue, self.grounder, self.cfg.eval.ks)
        metrics.update(timing)
        path = self.run_dir / f"r{r}" / "eval_predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
        return {"predictions": str(path)}, metrics

    def _write_report(self, results: list[tuple[str, dict[str, float]]]) -> None:
        timings = [(name, self.store.load(name).seconds) for name in self.store.completed()]
        path = write_report(self.run_dir, results, self.cfg.eval.ks, f"sprec-ray run `{self.cfg.name}` "
                            f"({self.cfg.selfplay.method}, {self.cfg.dpo.loss}, seed {self.cfg.seed})", timings)
        write_json_atomic(self.run_dir / "metrics.json", {"rounds": [{"label": k, **m} for k, m in results]})
        from .train.tracking import log_rounds

        log_rounds(self.cfg.train.logger, self.cfg.to_dict(), results)
        k = 5 if 5 in self.cfg.eval.ks else self.cfg.eval.ks[0]
        log.info("per-round metrics (validation):\n%s", metrics_table(results, k))
        log.info("report: %s", path)


def random_negatives(rows: Sequence[Example], num_items: int, k: int, seed: int) -> list[list[int]]:
    """The 'SFT then DPO with random negatives' baseline: K uniform items != the target."""
    rng = np.random.default_rng(seed)
    out = []
    for e in rows:
        picks: list[int] = []
        while len(picks) < k:
            item = int(rng.integers(num_items))
            if item != e.target and item not in picks:
                picks.append(item)
        out.append(picks)
    return out


def run_selfplay(cfg: RunConfig, resume: bool = False) -> list[tuple[str, dict[str, float]]]:
    setup_logging()
    return SelfPlayDriver(cfg, resume).run()
