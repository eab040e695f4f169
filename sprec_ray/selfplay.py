"""The SPRec self-play driver.

warm-start SFT (or selfplay.init_adapter, a shipped one), then per round r:
  one generation pass with round r-1's model (generation pool, one adapter switch): evaluate round
  r-1 on valid + generate round r's negatives (generate/round_negatives.py: by default the model's
  own title texts) -> one training fit: SFT on the real next items, then DPO / S-DPO against those
  negatives (reference = this round's SFT weights); after the last round, evaluate it, on valid and
  (when there is a test split) on test. Generation and scoring live in `session.RunSession`, which
  `sprec-ray eval` uses without the driver.
Every phase (r1_negatives, r1_sft, r1_dpo, r1_eval, r2_test, ...) is idempotent and leaves a manifest;
`resume=True` skips finished phases, and an interrupted fit picks up from its last Ray Train
checkpoint, at stage granularity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .artefacts import in_run, write_catalogue, write_final
from .config import ConfigError, RunConfig, save_config
from .data.dataset import from_checkout
from .data.prepared import PreparedData, prepare_dataset
from .data.prompts import render_prompt, render_response
from .data.records import Example
from .data.sharding import PromptShards, write_examples_parquet
from .generate.backends import Decoding
from .manifest import ManifestStore, Phase, PhaseRecord, round_label, write_json_atomic
from .models.base import link_tree, model_dir, stage_base_model
from .report import metrics_table, write_report
from .session import RunSession, attach

log = logging.getLogger("sprec_ray")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [sprec] %(message)s", datefmt="%H:%M:%S")


class SelfPlayDriver:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).resolve()
        self._check_run_dir(resume)
        self.init_adapter = from_checkout(cfg.selfplay.init_adapter) if cfg.selfplay.init_adapter else None
        if self.init_adapter and not (self.init_adapter / "adapter_config.json").exists():
            raise ConfigError(f"selfplay.init_adapter={cfg.selfplay.init_adapter!r} is not a PEFT adapter directory "
                              f"(no adapter_config.json in {self.init_adapter.resolve()})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        attach(cfg, self.run_dir)  # data preparation runs in Ray tasks that write under the run's storage
        self.data: PreparedData = prepare_dataset(cfg.data, self.run_dir / "data" / "prepared", self.run_dir / "scratch",
                                                  seed=cfg.seed)
        if self.data.bad_rows:
            log.warning("bad rows skipped, by reason: %s (see %s)", self.data.bad_rows, self.data.root / "bad_rows")
        self.store = ManifestStore(self.run_dir, cfg.digest(), cfg.seed, self.data.source_hashes)
        self.session = RunSession(cfg, self.run_dir, self.data)  # base_model is set by the prepare phase

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

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> list[tuple[str, dict[str, float]]]:
        cfg = self.cfg
        attach(cfg, self.run_dir)
        import ray.data

        # Fixed block order makes a resumed run see the same batches as an uninterrupted one.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        prep = self.phase("prepare", self._prepare)
        self.session.base_model = in_run(prep.outputs["base_model"], self.run_dir)
        if self.init_adapter:  # staged like the base model: other nodes cannot read the driver's disk
            adapter = str(link_tree(self.init_adapter.resolve(), self.run_dir / "init_adapter"))
        else:
            adapter = self._fit_round(0, None)[Phase(0, "sft").name].outputs["adapter"]
        results: list[tuple[int, dict[str, float]]] = []  # (round, validation metrics)
        tests: list[tuple[int, dict[str, float]]] = []
        if not self.data.counts.get("test"):
            log.info("no test split (data.test_file %r is not in data.path, or it has no rows): test evaluation skipped",
                     cfg.data.test_file)
        for r in range(1, cfg.selfplay.rounds + 1):
            # one generation pass with round r-1's adapter: score it, and generate round r's negatives
            self._collect_metrics(r - 1, self._generation_pass(r - 1, adapter, negatives_for=r), results, tests)
            fit = self._fit_round(r, adapter)
            adapter = fit[Phase(r, "sft" if cfg.selfplay.method == "sft_only" else "dpo").name].outputs["adapter"]
        last = cfg.selfplay.rounds
        self._collect_metrics(last, self._generation_pass(last, adapter, negatives_for=None), results, tests)
        self.session.shutdown_pool()
        write_final(self.run_dir, self.session.base_model, adapter, cfg.selfplay.rounds)
        self._write_report(results, tests)
        return [(round_label(r), m) for r, m in results]

    @staticmethod
    def _collect_metrics(r: int, done: dict[str, PhaseRecord], results: list[tuple[int, dict[str, float]]],
                         tests: list[tuple[int, dict[str, float]]]) -> None:
        """Round r's validation and test metrics, copied out of its phase records for the report."""
        for stage, scores in (("eval", results), ("test", tests)):
            if Phase(r, stage).name in done:
                scores.append((r, done[Phase(r, stage).name].metrics))

    def _generation_pass(self, r: int, adapter: str, negatives_for: int | None) -> dict[str, PhaseRecord]:
        """Evaluate round r's adapter (on valid and test as eval.* asks; always after the last round)
        and, with it, build round `negatives_for`'s self-play negatives."""
        last = negatives_for is None
        valid = last or self.cfg.eval.every_round
        test = bool(self.data.counts.get("test")) and (last or self.cfg.eval.test_every_round)
        phases = [Phase(r, "eval")] * valid + [Phase(r, "test")] * test
        if negatives_for is not None and self.cfg.selfplay.method != "sft_only":
            phases.append(Phase(negatives_for, "negatives"))
        by_name = {p.name: p for p in phases}

        def body(todo: list[str]) -> dict[str, tuple[dict[str, Any], dict[str, float], float]]:
            start = time.perf_counter()
            # greedy whatever generation.decoding says: sampled / beam decoding is for S-DPO's negatives
            greedy = Decoding("greedy", 1, max_new_tokens=self.cfg.generation.max_new_tokens)
            rows = self._round_rows(negatives_for) if negatives_for is not None else []
            split_rows = {"eval": self.session.valid_rows, "test": self.session.test_rows}
            groups = {p.name: (self.session.prompts(split_rows[p.stage]), greedy) for p in phases if p.stage != "negatives"}
            if negatives_for is not None and self.cfg.selfplay.method == "sprec":
                groups[Phase(negatives_for, "negatives").name] = (self.session.prompts(rows),
                                                                   Decoding.from_config(self.cfg.generation))
            wanted = [n for n in todo if n in groups]
            # Pass number r + 1 (it feeds round r + 1): the pool's sampling seeds derive from it.
            generated = dict(zip(wanted, self.session.generate([groups[n] for n in wanted], adapter, round_id=r + 1),
                                 strict=True)) if wanted else {}
            out = {}
            for name in todo:
                t, stage = time.perf_counter(), by_name[name].stage
                if stage == "negatives":
                    outputs, metrics = self._build_negatives(negatives_for, rows, generated.get(name))
                else:
                    outputs, metrics = self.session.evaluate(split_rows[stage], *generated[name],
                                                             self.run_dir / f"r{r}" / f"{stage}_predictions.jsonl",
                                                             adapter, r + 1)
                gen_s = metrics.get("generate_s", 0.0) + metrics.get("adapter_switch_s", 0.0) + metrics.get("actor_startup_s", 0.0)
                out[name] = (outputs, metrics, time.perf_counter() - t + gen_s)
            log.info("generation pass r%d: %.1fs for %s", r, time.perf_counter() - start, " + ".join(todo))
            return out

        return self.phases(list(by_name), body)

    def _fit_round(self, r: int, init_adapter: str | None) -> dict[str, PhaseRecord]:
        """Round r's fit: SFT (the warm start when r = 0), then DPO on the round's negatives."""
        from .train.phases import Stage, run_fit

        names = [Phase(r, "sft").name] + ([Phase(r, "dpo").name] if r > 0 and self.cfg.selfplay.method != "sft_only" else [])

        def body(_: list[str]) -> dict[str, tuple[dict[str, Any], dict[str, float], float]]:
            rows = self._round_rows(r) if r > 0 else None  # round 0 trains on the whole train split's shards
            stages = [Stage("sft", names[0], self._prompt_shards(names[0], rows), self.run_dir / f"r{r}" / "sft", r)]
            pairs = 0
            if len(names) > 1:
                dataset, pairs = self._dpo_pairs(r, self.store.load(Phase(r, "negatives").name))
                if pairs:
                    stages.append(Stage("dpo", names[1], dataset, self.run_dir / f"r{r}" / "dpo", r))
                else:  # every prediction was empty or equal to the target: nothing to push down this round
                    log.warning("r%d: no self-play pairs left (see r%d_negatives); DPO keeps the SFT adapter", r, r)
            if self.cfg.generation.release_while_training:
                self.session.release_pool()
            results = run_fit(self.cfg, self.session.base_model, stages, Path(init_adapter) if init_adapter else None,
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

    def _prompt_shards(self, name: str, rows: Sequence[Example] | None, negatives: Sequence[Sequence[int]] | None = None,
                       rejected_texts: Sequence[Sequence[str]] | None = None) -> PromptShards:
        """A phase's rows as id shards: `rows` written as its own, or None = the prepared train split.
        The fit builds their prompts, on this process or, past train.stream_rows, on its workers."""
        shards = self.data.split_dir("train")
        if rows is not None:
            shards = self.run_dir / "data" / name
            write_examples_parquet(rows, shards, self.cfg.data.num_shards, negatives, rejected_texts)
        return PromptShards(str(shards), self.data.catalogue.titles, self.cfg.data.item_noun,
                            counterfactual=self.cfg.sft.cft.enabled, candidates=self._candidate_spec)

    @property
    def _candidate_spec(self) -> tuple[int, int] | None:
        """(num_candidates, seed) in the candidate task, which fixes each row's list (data/candidates.py)."""
        return (self.cfg.data.num_candidates, self.cfg.seed) if self.cfg.data.task == "candidates" else None

    def _build_negatives(self, r: int, rows: Sequence[Example], generated: tuple[list[list[str]], dict[str, float]] | None):
        from .generate.round_negatives import round_negatives, write_negatives

        completions, timing = generated if generated is not None else (None, {})
        ids, texts, stats = round_negatives(self.cfg, r, rows, completions, self.data.catalogue, lambda: self.session.grounder,
                                            self.session.candidates, model_dir(self.session.base_model))
        path = self.run_dir / f"r{r}" / "negatives.parquet"
        write_negatives(path, rows, ids, texts)
        return {"negatives": str(path)}, {**stats, **timing}

    def _dpo_pairs(self, r: int, negatives: PhaseRecord) -> tuple[Any, int]:
        """The round's preference pairs as a prompt dataset, and how many rows kept a negative."""
        from .generate.round_negatives import read_negatives

        by_row = read_negatives(negatives.outputs["negatives"])
        rows = [e for e in self._round_rows(r) if e.row_id in by_row]
        if not rows:
            return None, 0
        dataset = self._prompt_shards(f"r{r}_dpo", rows, [by_row[e.row_id][0] for e in rows],
                                      [by_row[e.row_id][1] for e in rows])
        return dataset, len(rows)

    def _write_report(self, results: list[tuple[int, dict[str, float]]], tests: list[tuple[int, dict[str, float]]]) -> None:
        """report.md/html and metrics.json: validation per round under "rounds", the test split apart
        under "test" (the final adapter, or every round's with eval.test_every_round)."""
        from .train.tracking import log_rounds

        labelled = [(round_label(r), m) for r, m in results]
        labelled_tests = [(round_label(r), m) for r, m in tests]
        timings = [(name, self.store.load(name).seconds) for name in self.store.completed()]
        path = write_report(self.run_dir, labelled, self.cfg.eval.ks, f"sprec-ray run `{self.cfg.name}` "
                            f"({self.cfg.selfplay.method}, {self.cfg.dpo.loss}, {self.cfg.data.task} task, "
                            f"seed {self.cfg.seed})", timings, labelled_tests)
        write_json_atomic(self.run_dir / "metrics.json", {
            "rounds": [{"label": round_label(r), "round": r, **m} for r, m in results],
            "test": [{"label": round_label(r), "round": r, **m} for r, m in tests]})
        log_rounds(self.cfg.train.logger, self.cfg.to_dict(), results, tests)
        k = 5 if 5 in self.cfg.eval.ks else self.cfg.eval.ks[0]
        log.info("per-round metrics (validation):\n%s", metrics_table(labelled, k))
        if tests:
            log.info("test split:\n%s", metrics_table(labelled_tests, k))
        log.info("report: %s", path)


def run_selfplay(cfg: RunConfig, resume: bool = False) -> list[tuple[str, dict[str, float]]]:
    setup_logging()
    return SelfPlayDriver(cfg, resume).run()
