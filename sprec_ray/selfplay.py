"""The SPRec self-play driver.

warm-start SFT, then per round r:
  one generation pass with round r-1's model (generation pool, one adapter switch): evaluate round
  r-1 on valid + generate round r's negatives (by default the model's own title texts, see
  generate/negatives.py) -> one training fit: SFT on the real next items, then DPO / S-DPO against
  those negatives (reference = this round's SFT weights); after the last round, evaluate it, on
  valid and (when there is a test split) on test.
Every phase (r1_negatives, r1_sft, r1_dpo, r1_eval, r2_test, ...) is idempotent and leaves a manifest;
`resume=True` skips finished phases, and an interrupted fit picks up from its last Ray Train
checkpoint, at stage granularity.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .artefacts import in_run, load_grounder, write_catalogue, write_final
from .config import ConfigError, RunConfig, save_config
from .data.candidates import candidates_of
from .data.prepared import PreparedData, open_prepared, prepare_dataset
from .data.prompts import render_candidate_prompt, render_prompt, render_response
from .data.records import Example
from .data.sharding import prompt_dataset, write_examples_parquet
from .generate.backends import Decoding
from .manifest import ManifestStore, PhaseRecord, write_json_atomic
from .models.base import link_tree, model_dir, stage_base_model
from .report import metrics_table, write_report
from .runtime import check_visible_on_every_node, init_ray

log = logging.getLogger("sprec_ray")
NEGATIVES_SCHEMA = pa.schema([("row_id", pa.int64()), ("negatives", pa.list_(pa.int64())),
                              ("rejected_text", pa.list_(pa.string()))])


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [sprec] %(message)s", datefmt="%H:%M:%S")


class SelfPlayDriver:
    def __init__(self, cfg: RunConfig, resume: bool = False, read_only: bool = False):
        """`read_only` (`sprec-ray eval`): open a finished run's prepared data and write nothing in it."""
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).resolve()
        self._check_run_dir(resume or read_only)
        init = cfg.selfplay.init_adapter
        if init and not read_only and not (Path(init) / "adapter_config.json").exists():
            raise ConfigError(f"selfplay.init_adapter={init!r} is not a PEFT adapter directory (no adapter_config.json)")
        if not read_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.attach()  # data preparation runs in Ray tasks that write under the run's storage
        prepared = self.run_dir / "data" / "prepared"
        self.data: PreparedData = open_prepared(prepared) if read_only else prepare_dataset(
            cfg.data, prepared, self.run_dir / "scratch", seed=cfg.seed)
        if self.data.bad_rows:
            log.warning("bad rows skipped, by reason: %s (see %s)", self.data.bad_rows, self.data.root / "bad_rows")
        self.store = ManifestStore(self.run_dir, cfg.digest(), cfg.seed, self.data.source_hashes)
        self._pool = None
        self._grounder = None
        self.base_model: str | None = None  # an absolute path in the run's storage, or a Hub reference

    def _check_run_dir(self, resume: bool) -> None:
        manifests = self.run_dir / "manifests"
        if manifests.exists() and any(manifests.glob("*.json")) and not resume:
            raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another output_dir")

    # ---- phase bookkeeping -------------------------------------------------------------
    def phase(self, name: str, body: Callable[[], tuple[dict[str, Any], dict[str, float]]]) -> PhaseRecord:
        def timed(_: list[str]) -> dict[str, tuple[dict[str, Any], dict[str, float], float]]:
            start = time.perf_counter()
            outputs, metrics = body()
            return {name: (outputs, metrics, time.perf_counter() - start)}

        return self.phases([name], timed)[name]

    def phases(self, names: list[str],
               body: Callable[[list[str]], dict[str, tuple[dict[str, Any], dict[str, float], float]]]) -> dict[str, PhaseRecord]:
        """Phases that run together (one fit, one generation pass); `body(todo)` gets the unfinished
        ones and returns (outputs, metrics, seconds) for each."""
        records = {name: self.store.load(name) for name in names}
        for name in names:
            if records[name] is not None:
                log.info("phase %-12s already done (resume), skipping", name)
        todo = [name for name in names if records[name] is None]
        if not todo:
            return records
        log.info("phase %-12s start", " + ".join(todo))
        for name, (outputs, metrics, seconds) in body(todo).items():
            record = PhaseRecord(name, outputs, metrics, seconds)
            self.store.save(record)
            records[name] = record
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:8])
            log.info("phase %-12s done in %.1fs  %s", name, record.seconds, shown)
        return records

    # ---- lazily built, shared pieces -----------------------------------------------------
    @property
    def grounder(self):
        if self._grounder is None:
            self._grounder = load_grounder(self.run_dir, self.data.catalogue, self.cfg.eval.embedder)
        return self._grounder

    def generate(self, groups: Sequence[tuple[Sequence[str], Decoding]], adapter: str | None,
                 adapter_id: int) -> list[tuple[list[list[str]], dict[str, float]]]:
        """Completions for each (prompts, decoding) group, in prompt order, from one adapter: one
        switch and one probe for all of them, and groups that decode alike share one request stream.
        Timing per group: actor start-up (when this call started the pool), adapter hand-off
        (switch + probe) and generation throughput (a shared stream's time split by prompts)."""
        from .generate.pool import GenerationPool

        startup = 0.0
        if self._pool is None:
            self._pool = GenerationPool(self.cfg.generation, self.base_model, self.cfg.lora.r, self.cfg.seed)
            startup = self._pool.startup_s
        out: list[tuple[list[list[str]], dict[str, float]] | None] = [None] * len(groups)
        try:
            for decoding in dict.fromkeys(d for _, d in groups):  # distinct decodings, first-seen order
                members = [i for i, (_, d) in enumerate(groups) if d == decoding]
                prompts = [p for i in members for p in groups[i][0]]
                completions = self._pool.generate(prompts, adapter, adapter_id, decoding=decoding)
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

    def shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ---- the loop ----------------------------------------------------------------------
    def attach(self) -> None:
        """Start or join Ray, and check that every node sees the run's storage."""
        init_ray(self.cfg.ray_address, self.cfg.ray_num_cpus, self.cfg.ray_dashboard)
        check_visible_on_every_node(self.run_dir)

    def run(self) -> list[tuple[str, dict[str, float]]]:
        cfg = self.cfg
        self.attach()
        import ray.data

        # Fixed block order makes a resumed run see the same batches as an uninterrupted one.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        prep = self.phase("prepare", self._prepare)
        self.base_model = in_run(prep.outputs["base_model"], self.run_dir)
        if cfg.selfplay.init_adapter:  # staged like the base model: other nodes cannot read the driver's disk
            adapter = str(link_tree(Path(cfg.selfplay.init_adapter), self.run_dir / "init_adapter"))
        else:
            adapter = self._train(0, None)["r0_sft"].outputs["adapter"]
        results: list[tuple[str, dict[str, float]]] = []
        tests: list[tuple[str, dict[str, float]]] = []
        if not self.data.counts.get("test"):
            log.info("no test split (data.test_file %r is not in data.path, or it has no rows): test evaluation skipped",
                     cfg.data.test_file)
        for r in range(1, cfg.selfplay.rounds + 2):
            last = r == cfg.selfplay.rounds + 1
            valid = last or cfg.eval.every_round
            test = bool(self.data.counts.get("test")) and (last or cfg.eval.test_every_round)
            done = self._generation_pass(r - 1, adapter, negatives_for=None if last else r, valid=valid, test=test)
            label = "r0 (SFT)" if r == 1 else f"r{r - 1}"
            if valid:
                results.append((label, done[f"r{r - 1}_eval"].metrics))
            if test:
                tests.append((label, done[f"r{r - 1}_test"].metrics))
            if not last:
                adapter = self._train(r, adapter)[f"r{r}_{'sft' if cfg.selfplay.method == 'sft_only' else 'dpo'}"].outputs["adapter"]
        self.shutdown_pool()
        write_final(self.run_dir, self.base_model, adapter, cfg.selfplay.rounds)
        self._write_report(results, tests)
        return results

    def _generation_pass(self, r: int, adapter: str, negatives_for: int | None, valid: bool,
                         test: bool) -> dict[str, PhaseRecord]:
        """Evaluate round r's adapter (on valid and on test, as asked) and, with it, build round
        `negatives_for`'s self-play negatives."""
        names = ([f"r{r}_eval"] if valid else []) + ([f"r{r}_test"] if test else [])
        if negatives_for is not None and self.cfg.selfplay.method != "sft_only":
            names.append(f"r{negatives_for}_negatives")

        def body(todo: list[str]) -> dict[str, tuple[dict[str, Any], dict[str, float], float]]:
            start = time.perf_counter()
            # greedy whatever generation.decoding says: sampled / beam decoding is for S-DPO's negatives
            greedy = Decoding("greedy", 1, max_new_tokens=self.cfg.generation.max_new_tokens)
            groups = {}
            if valid:
                groups[f"r{r}_eval"] = (self.prompts(self.valid_rows), greedy)
            if test:
                groups[f"r{r}_test"] = (self.prompts(self.test_rows), greedy)
            rows = self._round_rows(negatives_for) if negatives_for is not None else []
            if negatives_for is not None and self.cfg.selfplay.method == "sprec":
                groups[f"r{negatives_for}_negatives"] = (self.prompts(rows), Decoding.from_config(self.cfg.generation))
            wanted = [n for n in todo if n in groups]
            generated = dict(zip(wanted, self.generate([groups[n] for n in wanted], adapter, adapter_id=r + 1),
                                 strict=True)) if wanted else {}
            out = {}
            for name in todo:
                t = time.perf_counter()
                if name.endswith("_eval"):
                    outputs, metrics = self.evaluate(self.valid_rows, *generated[name],
                                                     self.run_dir / f"r{r}" / "eval_predictions.jsonl")
                elif name.endswith("_test"):
                    outputs, metrics = self.evaluate(self.test_rows, *generated[name],
                                                     self.run_dir / f"r{r}" / "test_predictions.jsonl")
                else:
                    outputs, metrics = self._negatives(negatives_for, rows, generated.get(name))
                gen_s = metrics.get("generate_s", 0.0) + metrics.get("adapter_switch_s", 0.0) + metrics.get("actor_startup_s", 0.0)
                out[name] = (outputs, metrics, time.perf_counter() - t + gen_s)
            log.info("generation pass r%d: %.1fs for %s", r, time.perf_counter() - start, " + ".join(todo))
            return out

        return self.phases(names, body)

    def _train(self, r: int, init_adapter: str | None) -> dict[str, PhaseRecord]:
        """Round r's fit: SFT (the warm start when r = 0), then DPO on the round's negatives."""
        from .train.phases import Stage, run_fit

        names = [f"r{r}_sft"] + ([f"r{r}_dpo"] if r > 0 and self.cfg.selfplay.method != "sft_only" else [])

        def body(_: list[str]) -> dict[str, tuple[dict[str, Any], dict[str, float], float]]:
            rows = self._round_rows(r) if r > 0 else None  # round 0 trains on the whole train split's shards
            stages = [Stage("sft", names[0], self._dataset(names[0], rows), self.run_dir / f"r{r}" / "sft")]
            pairs = 0
            if len(names) > 1:
                dataset, pairs = self._dpo_dataset(r, self.store.load(f"r{r}_negatives"))
                if pairs:
                    stages.append(Stage("dpo", names[1], dataset, self.run_dir / f"r{r}" / "dpo"))
                else:  # every prediction was empty or equal to the target: nothing to push down this round
                    log.warning("r%d: no self-play pairs left (see r%d_negatives); DPO keeps the SFT adapter", r, r)
            if self.cfg.generation.release_while_training and self._pool is not None:
                self._pool.release()
            results = run_fit(self.cfg, self.base_model, stages, Path(init_adapter) if init_adapter else None,
                              name=f"r{r}_train")
            out, rest = {}, 0.0
            for stage in reversed(stages):  # the first stage carries the fit's start-up; later ones their own work
                m = results[stage.name].metrics
                own = m.get("data_s", 0.0) + m.get("reference_s", 0.0) + m.get("prepare_s", 0.0) + m["loop_s"]
                seconds = m["fit_s"] - rest if stage is stages[0] else own
                rest += own
                out[stage.name] = ({"adapter": str(results[stage.name].adapter_dir),
                                    "checkpoint": results[stage.name].checkpoint_path},
                                   {**m, "pairs": float(pairs)} if stage.phase == "dpo" else m, seconds)
            if len(names) > len(stages):
                out[names[1]] = ({"adapter": out[names[0]][0]["adapter"], "checkpoint": ""}, {"pairs": 0.0}, 0.0)
            return out

        return self.phases(names, body)

    def _round_rows(self, round_id: int) -> list[Example]:
        """A round's train rows (selfplay.round_samples, all when 0), picked from the shards by a seeded
        hash; few enough to hold here, since the round generates a negative for each."""
        return self.data.rows("train", self.cfg.selfplay.round_samples, self.cfg.seed * 1_000_003 + round_id)

    @cached_property
    def valid_rows(self) -> list[Example]:
        return self.data.rows("valid")  # data.valid_samples of them when set

    @cached_property
    def test_rows(self) -> list[Example]:
        return self.data.rows("test")  # data.test_samples of them when set

    def _prepare(self) -> tuple[dict[str, Any], dict[str, float]]:
        titles = self.data.catalogue.titles
        tiny_texts = [render_prompt([titles[i] for i in e.history]) + render_response(titles[e.target])
                      for e in self.data.head("train", 2000)]
        # Everything other nodes read goes to the run's storage: the base model (or its pinned Hub
        # commit), the catalogue and its item embeddings.
        base, model_info = stage_base_model(self.cfg.model.name, self.cfg.model.revision, self.run_dir, tiny_texts)
        catalogue = write_catalogue(self.run_dir, self.data.catalogue, self.cfg.eval.embedder)
        return ({"base_model": base, **{f"model_{k}": v for k, v in model_info.items()}, **catalogue},
                {"train_rows": float(self.data.counts["train"]), "valid_rows": float(self.data.counts["valid"]),
                 "test_rows": float(self.data.counts.get("test", 0)),
                 "items": float(len(self.data.catalogue)), "bad_rows": float(sum(self.data.bad_rows.values()))})

    def _dataset(self, name: str, rows: Sequence[Example] | None, negatives: Sequence[Sequence[int]] | None = None,
                 rejected_texts: Sequence[Sequence[str]] | None = None):
        """Prompt rows of a phase: `rows` written as its own shards, or None = the prepared train split."""
        shards = self.data.split_dir("train")
        if rows is not None:
            shards = self.run_dir / "data" / name
            write_examples_parquet(rows, shards, self.cfg.data.num_shards, negatives, rejected_texts)
        return prompt_dataset(shards, self.data.catalogue, self.cfg.data.item_noun,
                              counterfactual=self.cfg.sft.cft.enabled, candidates=self._candidate_spec)

    @property
    def _candidate_spec(self) -> tuple[int, int] | None:
        """(num_candidates, seed) in the candidate task, which fixes each row's list (data/candidates.py)."""
        return (self.cfg.data.num_candidates, self.cfg.seed) if self.cfg.data.task == "candidates" else None

    def candidates(self, e: Example) -> tuple[int, ...]:
        return candidates_of(e, len(self.data.catalogue), self.cfg.data.num_candidates, self.cfg.seed)

    def _negatives(self, r: int, rows: Sequence[Example], generated: tuple[list[list[str]], dict[str, float]] | None):
        k, dpo = self.cfg.dpo.num_negatives, self.cfg.dpo
        titles = self.data.catalogue.titles
        if self.cfg.data.task == "candidates":  # negatives among the row's candidates: random, or own wrong picks
            from .generate.candidate_negatives import candidate_negatives

            completions, timing = generated if generated is not None else (None, {})
            ids, cand_stats = candidate_negatives(rows, [self.candidates(e) for e in rows], completions, titles, k,
                                                  self.cfg.seed + r)
            texts = [[titles[i] for i in n] for n in ids]
            stats: dict[str, float] = {**cand_stats.metrics(), **timing}
        elif self.cfg.selfplay.method == "dpo_random":
            ids = random_negatives(rows, len(titles), k, self.cfg.seed + r)
            texts = [[titles[i] for i in n] for n in ids]
            stats = {"random": float(len(rows) * k)}
        else:
            from .generate.negatives import build_negatives

            completions, timing = generated
            negatives, neg_stats = build_negatives(rows, completions, self.data.catalogue, self.grounder, k,
                                                   self.cfg.seed + r, dpo.negative_source, dpo.on_equal_positive)
            ids, texts = [list(n.ids) for n in negatives], [list(n.texts) for n in negatives]
            stats = {**neg_stats.metrics(), **timing, "rows_too_long": float(self._drop_over_long(ids, texts))}
        path = self.run_dir / f"r{r}" / "negatives.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        # ids (-1 = generated text that is no catalogue title) and the rejected texts; [] = row dropped
        pq.write_table(pa.table({"row_id": [e.row_id for e in rows], "negatives": ids, "rejected_text": texts},
                                schema=NEGATIVES_SCHEMA), path)
        return {"negatives": str(path)}, stats

    def _drop_over_long(self, ids: list[list[int]], texts: list[list[str]]) -> int:
        """Drop (in place) rows with a generated text longer than model.max_response_len once tokenised:
        decoded bytes can re-tokenise into more tokens than were sampled, and responses are never cut."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir(self.base_model)))
        limit = self.cfg.model.max_response_len - 1  # EOS is appended in training
        dropped = 0
        for i, row in enumerate(texts):
            if row and any(len(tokenizer(render_response(t), add_special_tokens=False)["input_ids"]) > limit for t in row):
                ids[i], texts[i] = [], []
                dropped += 1
        return dropped

    def _dpo_dataset(self, r: int, negatives: PhaseRecord) -> tuple[Any, int]:
        """The round's preference pairs as a prompt dataset, and how many rows kept a negative."""
        table = pq.read_table(negatives.outputs["negatives"]).to_pydict()
        by_row = {row: (ids, texts) for row, ids, texts in
                  zip(table["row_id"], table["negatives"], table["rejected_text"], strict=True) if texts}
        rows = [e for e in self._round_rows(r) if e.row_id in by_row]
        if not rows:
            return None, 0
        dataset = self._dataset(f"r{r}_dpo", rows, [by_row[e.row_id][0] for e in rows],
                                [by_row[e.row_id][1] for e in rows])
        return dataset, len(rows)

    def prompts(self, rows: Sequence[Example]) -> list[str]:
        titles, noun = self.data.catalogue.titles, self.cfg.data.item_noun
        if self.cfg.data.task == "candidates":
            return [render_candidate_prompt([titles[i] for i in e.history], [titles[c] for c in self.candidates(e)], noun)
                    for e in rows]
        return [render_prompt([titles[i] for i in e.history], noun) for e in rows]

    def evaluate(self, rows: Sequence[Example], completions: list[list[str]], timing: dict[str, float], path: Path):
        """Ground the rows' completions, score them, and write one prediction per row to `path`."""
        from .eval.evaluate import evaluate_completions

        candidates = [self.candidates(e) for e in rows] if self.cfg.data.task == "candidates" else None
        metrics, predictions = evaluate_completions(completions, rows, self.data.catalogue, self.grounder,
                                                    self.cfg.eval.ks, candidates)
        metrics.update(timing)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
        return {"predictions": str(path)}, metrics

    def _write_report(self, results: list[tuple[str, dict[str, float]]], tests: list[tuple[str, dict[str, float]]]) -> None:
        """report.md/html and metrics.json: validation per round under "rounds", the test split apart
        under "test" (the final adapter, or every round's with eval.test_every_round)."""
        timings = [(name, self.store.load(name).seconds) for name in self.store.completed()]
        path = write_report(self.run_dir, results, self.cfg.eval.ks, f"sprec-ray run `{self.cfg.name}` "
                            f"({self.cfg.selfplay.method}, {self.cfg.dpo.loss}, {self.cfg.data.task} task, "
                            f"seed {self.cfg.seed})", timings, tests)
        write_json_atomic(self.run_dir / "metrics.json", {"rounds": [{"label": k, **m} for k, m in results],
                                                          "test": [{"label": k, **m} for k, m in tests]})
        from .train.tracking import log_rounds

        log_rounds(self.cfg.train.logger, self.cfg.to_dict(), results, tests)
        k = 5 if 5 in self.cfg.eval.ks else self.cfg.eval.ks[0]
        log.info("per-round metrics (validation):\n%s", metrics_table(results, k))
        if tests:
            log.info("test split:\n%s", metrics_table(tests, k))
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
