"""A pool of Ray actors, one generation engine each, that turns a round's prompts into completions
(`generate`), or scores each prompt's candidate titles by log-prob (`score`, generate/scoring.py).

The driver cuts the prompts into shards of `cfg.shard_size` and keeps up to
`cfg.max_inflight_per_actor` shards queued on each actor, always feeding the least busy one
(`ray.wait` on everything in flight). Results come back tagged with (round, LoRA id, shard) and
are put back in input order. Nothing waits forever: every `ray.wait`/`ray.get` has a deadline.

Faults: an actor that dies, or does not answer within `cfg.request_timeout_s`, is killed, its queued
shards go back to the front of the queue, and a replacement actor is started (at most
`cfg.max_actor_restarts` per pool; after that the dead slot is dropped). A round fails only when no
actor is left or a shard raises an error of its own (a bad prompt fails the same way anywhere).
Ray's own actor restarts and task retries are off: they would restart a crashed actor but not a
hung one, re-run a shard on an actor that has lost its adapter, and budget restarts per actor.

Two numbers name what a request runs: `round_id`, the caller's generation pass (sampling seeds
derive from it), and `lora_id`, the engine's slot for an adapter, which the pool alone hands out: a
fresh one whenever (round, dir, file contents) change. Each actor that switches to an adapter must
pass the probe check (adapter_check.py) before it gets a shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GenerationConfig
from ..models.base import model_dir
from ..runtime import worker_env
from .adapter_check import ProbeResult, compare_probe, reference_token_logprobs, run_probe
from .backends import Decoding, adapter_path, resolve_backend
from .factory import make_backend

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A round could not produce one result per prompt."""


class GenerationTimeoutError(GenerationError):
    pass


@dataclass(frozen=True)
class Scoring:
    """A shard's work when it scores candidate lists (items are (prompt, titles)) instead of generating."""


@dataclass(frozen=True)
class ShardResult:
    shard: int
    round_id: int
    lora_id: int
    outputs: list  # per item: n completions, or per candidate its answer's token log-probs
    num_tokens: int  # generated, or scored
    seconds: float


@dataclass
class RoundStats:
    """What one `generate` call did; `pool.last_stats` after each round."""

    round_id: int
    lora_id: int
    prompts: int = 0
    shards: int = 0
    completions: int = 0
    gen_tokens: int = 0
    wall_s: float = 0.0
    switch_s: float = 0.0  # round start -> first shard sent: adapter switch + probe check (actors in parallel)
    probe_diff: float = float("nan")  # worst actor's mean |delta log p| per token
    requeued: int = 0  # shards sent again after their actor died or hung
    replaced: int = 0  # actors started to replace dead ones
    dropped: int = 0  # dead actors not replaced (restart budget spent)
    shards_per_actor: dict[int, int] = field(default_factory=dict)

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.gen_tokens / self.wall_s if self.wall_s > 0 else 0.0


class GenerationActor:
    """Holds one engine; runs in its own Ray actor process (wrapped with ray.remote by the pool)."""

    def __init__(self, cfg: GenerationConfig, base_model: str, max_lora_rank: int, seed: int) -> None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
        if threads > 0 and cfg.gpus_per_actor == 0:  # the pool's share of cores, not Ray's num_cpus
            import torch

            torch.set_num_threads(threads)
        self.backend = make_backend(cfg, base_model, max_lora_rank, seed)

    def ready(self) -> tuple[int, str]:
        """pid, and how the engine uses the CPU (logged: a wrong thread count halves throughput silently)."""
        import torch

        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        return os.getpid(), f"{torch.get_num_threads()} torch threads" + (f", vLLM cores {bind}" if bind else "")

    def switch(self, adapter_dir: str | None, lora_id: int, probe_prompts: list[str]) -> ProbeResult | None:
        self.backend.reclaim()
        if not probe_prompts:
            return None
        return run_probe(self.backend, probe_prompts, adapter_dir, lora_id)

    def run_shard(self, shard: int, round_id: int, adapter_dir: str | None, lora_id: int,
                  items: list, seed: int, work: Decoding | Scoring) -> ShardResult:
        start = time.perf_counter()
        self.backend.reclaim()
        if isinstance(work, Scoring):
            scores = self.backend.candidate_logprobs([p for p, _ in items], [c for _, c in items], adapter_dir, lora_id)
            return ShardResult(shard, round_id, lora_id, scores, sum(len(a) for row in scores for a in row),
                               time.perf_counter() - start)
        out = self.backend.generate_counted(items, adapter_dir, lora_id, seed, work)
        return ShardResult(shard, round_id, lora_id, out.texts, out.num_tokens, time.perf_counter() - start)

    def release(self) -> None:
        self.backend.release()

    def close(self) -> None:
        self.backend.close()


@dataclass
class _Slot:
    index: int
    actor: Any = None
    state: str = "starting"  # starting -> idle (engine up) -> switching -> ready; or dead
    key: tuple | None = None  # the adapter key this actor serves once ready
    inflight: int = 0
    pid: int = 0


@dataclass
class _Task:
    kind: str  # start | switch | shard
    slot: int
    deadline: float
    shard: int = -1
    key: tuple | None = None


@dataclass
class _Round:
    """One `generate` / `score` call while the scheduling loop runs: its shards and what came back."""

    items: list  # prompts, or (prompt, candidate titles)
    bounds: list[tuple[int, int]]  # shard i = items[lo:hi]
    key: tuple  # (round_id, adapter dir, adapter fingerprint)
    lora_id: int
    work: Decoding | Scoring
    stats: RoundStats
    queue: deque[int]  # shards not yet dispatched, lowest first
    results: list[ShardResult | None]  # by shard; None until it is back

    @property
    def round_id(self) -> int:
        return self.key[0]


def shard_seed(seed: int, round_id: int, shard: int) -> int:
    """Sampling seed of a shard: fixed by (run seed, round, shard), whichever actor runs it."""
    return int(np.random.SeedSequence([seed, round_id, shard]).generate_state(1)[0] % (2**31 - 1))


def adapter_fingerprint(adapter_dir: str | Path | None) -> str:
    """Hash of the adapter's files: an adapter rewritten in place gets a new LoRA id, never stale weights."""
    path = adapter_path(adapter_dir)
    if path is None:
        return "base"
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("adapter_")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


class GenerationPool:
    def __init__(self, cfg: GenerationConfig, base_model: str | Path, max_lora_rank: int, seed: int) -> None:
        import ray

        cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg))  # "auto" decided once, here
        if base_model is None or not (model_dir(base_model) / "config.json").exists():
            raise FileNotFoundError(f"base_model {base_model!r} is not a checkpoint dir with config.json")
        self.cfg = cfg
        self.base_model = str(base_model)  # an absolute path or a Hub reference every node resolves itself
        self.max_lora_rank = max_lora_rank
        self.seed = seed
        self.last_stats: RoundStats | None = None
        self._remote = ray.remote(GenerationActor)
        self._slots = [_Slot(i) for i in range(cfg.num_actors)]
        self._pending: dict[Any, _Task] = {}
        self._restarts = 0
        # Actors are named (pool, slot, restarts) so the Ray dashboard and State API tell them apart.
        self._name = f"generation-{uuid.uuid4().hex[:6]}"
        self._key_ids: dict[tuple, int] = {}  # adapter key -> LoRA id; a new key gets a new id
        self._references: dict[tuple, list[list[float]]] = {}
        self._broken: BaseException | None = None
        start = time.perf_counter()
        for slot in self._slots:
            self._start(slot)
        try:  # all engines start in parallel; the pool is usable once every one answered
            ray.get(list(self._pending), timeout=cfg.startup_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            self.shutdown()
            raise GenerationTimeoutError(f"generation pool: {cfg.num_actors} {cfg.backend} actors not up within "
                                         f"generation.startup_timeout_s={cfg.startup_timeout_s}") from err
        except Exception:
            self.shutdown()
            raise
        for ref, task in list(self._pending.items()):
            slot = self._slots[task.slot]
            slot.pid, cpu = ray.get(ref, timeout=1.0)
            log.info("generation actor %d (pid %d): %s", slot.index, slot.pid, cpu)
            self._slots[task.slot].state = "idle"
        self._pending.clear()
        self.startup_s = time.perf_counter() - start
        log.info("generation pool: %d %s actors up in %.1fs", cfg.num_actors, cfg.backend, self.startup_s)

    # ---- actors ------------------------------------------------------------------------------
    def _actor_env(self, index: int) -> dict[str, str]:
        """CPU actors split this node's cores evenly and each engine runs one thread per core of its
        share: Ray would set OMP_NUM_THREADS=num_cpus (1), and vLLM's auto binding keeps one core of
        two for its scheduler, which left the engine on one core of the reference machine."""
        env = dict(worker_env())
        cfg = self.cfg
        if cfg.gpus_per_actor > 0:
            return env
        cores = sorted(os.sched_getaffinity(0))
        per = max(1, len(cores) // cfg.num_actors)
        mine = cores[(index * per) % len(cores):][:per]
        env["OMP_NUM_THREADS"] = str(len(mine))
        if cfg.backend == "vllm":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
            env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                              ",".join(str(c) for c in mine))
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return env

    def _start(self, slot: _Slot) -> None:
        cfg = self.cfg
        options: dict[str, Any] = dict(name=f"{self._name}-{slot.index}.{self._restarts}",
                                       num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=0,
                                       max_task_retries=0, runtime_env={"env_vars": self._actor_env(slot.index)})
        slot.actor = self._remote.options(**options).remote(cfg, self.base_model, self.max_lora_rank, self.seed)
        slot.state, slot.key, slot.inflight = "starting", None, 0
        self._pending[slot.actor.ready.remote()] = _Task("start", slot.index, time.monotonic() + cfg.startup_timeout_s)

    def _fail(self, slot: _Slot, why: str, rnd: _Round, failed: _Task | None = None) -> None:
        """Kill the actor, re-queue its shards (`failed`: the task that showed the failure, already
        taken off the pending map), start a replacement if the budget allows."""
        import ray

        log.warning("generation actor %d (pid %d) failed: %s", slot.index, slot.pid, why)
        lost = [failed] if failed is not None else []
        for ref, task in list(self._pending.items()):
            if task.slot == slot.index:
                del self._pending[ref]
                lost.append(task)
        for task in sorted((t for t in lost if t.kind == "shard"), key=lambda t: -t.shard):
            rnd.queue.appendleft(task.shard)  # lowest shard first again
            rnd.stats.requeued += 1
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception as err:  # already gone
            log.debug("ray.kill on actor %d: %s", slot.index, err)
        slot.state, slot.inflight = "dead", 0
        if self._restarts < self.cfg.max_actor_restarts:
            self._restarts += 1
            rnd.stats.replaced += 1
            log.warning("starting replacement actor %d (%d/%d restarts used)", slot.index, self._restarts,
                        self.cfg.max_actor_restarts)
            self._start(slot)
        else:
            rnd.stats.dropped += 1

    # ---- adapters ----------------------------------------------------------------------------
    def _adapter_key(self, adapter_dir: str | Path | None, round_id: int) -> tuple:
        path = adapter_path(adapter_dir)
        return (round_id, str(path) if path else None, adapter_fingerprint(path))

    def _verify(self, key: tuple, probe: ProbeResult | None, slot: _Slot) -> float:
        import ray

        if probe is None:
            return float("nan")
        ref_key = (key, probe.completions)
        if ref_key not in self._references:
            # fp32 transformers+peft in a CPU task; num_cpus=0 so it can never wait behind the actors
            task = ray.remote(num_cpus=0)(reference_token_logprobs).options(
                runtime_env={"env_vars": worker_env()})
            self._references[ref_key] = ray.get(
                task.remote(self.base_model, key[1], list(probe.prompts), list(probe.completions),
                            self.cfg.max_model_len), timeout=self.cfg.request_timeout_s)
        return compare_probe(probe, self._references[ref_key], self.cfg.probe_tolerance,
                             what=f"generation actor {slot.index} (round {key[0]}, adapter {key[1]})")

    # ---- the round ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], adapter_dir: str | Path | None, round_id: int, *,
                 decoding: Decoding | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[list[str]]:
        """n completions per prompt, in input order, from `adapter_dir` (None = base model).
        `decoding` overrides the config's (greedy/sample/beam, n, ...) for this call only;
        `progress(done_shards, total_shards)` is called after every shard."""
        if self._broken is not None:
            raise GenerationError(f"this pool failed earlier ({self._broken!r}); shut it down and start a new one")
        if isinstance(prompts, str) or any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of str")
        return self._map(list(prompts), adapter_dir, round_id, (decoding or Decoding.from_config(self.cfg)).check(),
                         progress)

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], adapter_dir: str | Path | None,
              round_id: int, *, progress: Callable[[int, int], None] | None = None) -> list[list[list[float]]]:
        """Per prompt and candidate title, its answer's token log-probs (scoring.py), in input order."""
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        return self._map([(p, list(c)) for p, c in zip(prompts, candidates, strict=True)], adapter_dir, round_id,
                         Scoring(), progress)

    def _map(self, items: list, adapter_dir: str | Path | None, round_id: int, work: Decoding | Scoring,
             progress: Callable[[int, int], None] | None) -> list:
        if self._broken is not None:
            raise GenerationError(f"this pool failed earlier ({self._broken!r}); shut it down and start a new one")
        key = self._adapter_key(adapter_dir, round_id)
        lora_id = self._key_ids.setdefault(key, len(self._key_ids) + 1)
        stats = RoundStats(round_id, lora_id, prompts=len(items))
        size = self.cfg.shard_size
        bounds = [(s, min(s + size, len(items))) for s in range(0, len(items), size)]
        stats.shards = len(bounds)
        # Shards of prompts of similar length: a shard is padded to its longest prompt, so prompts
        # mixed at random spend part of the prefill on padding (the default ones run 157-249 tokens).
        order = sorted(range(len(items)), key=lambda i: len(items[i] if isinstance(items[i], str) else items[i][0]))
        rnd = _Round([items[i] for i in order], bounds, key, lora_id, work, stats, deque(range(len(bounds))),
                     [None] * len(bounds))
        try:
            results = self._run(rnd, progress)
        except BaseException as err:
            self._broken = err
            raise
        out: list = [None] * len(items)
        for i, o in zip(order, (o for r in results for o in r.outputs), strict=True):
            out[i] = o
        stats.completions = sum(len(o) for o in out)
        self.last_stats = stats
        what = "scored" if isinstance(work, Scoring) else "generated"
        log.info("round %d: %d prompts %s in %.1fs (%.1f prompts/s, %.0f tok/s), %d shards, %d re-queued, %d replaced",
                 round_id, stats.prompts, what, stats.wall_s, stats.prompts_per_s, stats.tokens_per_s, stats.shards,
                 stats.requeued, stats.replaced)
        return out

    def _run(self, rnd: _Round, progress: Callable[[int, int], None] | None) -> list[ShardResult]:
        """The scheduling loop: switch idle engines to the adapter, dispatch shards to ready ones,
        collect whatever finishes first (or fail what missed its deadline), until every shard is back."""
        cfg, stats, bounds = self.cfg, rnd.stats, rnd.bounds
        start = time.perf_counter()
        prompts = [i[0] for i in rnd.items] if isinstance(rnd.work, Scoring) else rnd.items
        probe_prompts = prompts[: cfg.probe_size] if cfg.verify_adapter else []
        done = 0
        warming = True  # at round start, wait until every running engine switched: an even first split
        while done < len(bounds):
            self._switch(rnd.key, rnd.lora_id, probe_prompts)
            if warming and not any(s.state == "switching" for s in self._slots):
                warming = False
                stats.switch_s = time.perf_counter() - start
            if not warming:
                self._dispatch(rnd)
            if not self._pending:
                raise GenerationError(f"round {rnd.round_id}: no generation actor left (all died; "
                                      f"{self._restarts} restarts used), {len(bounds) - done} shards undone")
            finished = self._collect(rnd)
            if finished is None:
                continue
            task, slot, value = finished
            if task.kind == "start":
                (slot.pid, cpu), slot.state = value, "idle"
                log.info("generation actor %d (pid %d) started: %s", slot.index, slot.pid, cpu)
            elif task.kind == "switch":
                diff = self._verify(task.key, value, slot)
                if not math.isnan(diff):
                    stats.probe_diff = diff if math.isnan(stats.probe_diff) else max(stats.probe_diff, diff)
                slot.state, slot.key = "ready", task.key
            else:
                slot.inflight -= 1
                self._accept(value, task, rnd)
                done += 1
                self._log_progress(rnd, start + stats.switch_s)
                if progress is not None:
                    progress(done, len(bounds))
        stats.wall_s = time.perf_counter() - start
        return rnd.results  # type: ignore[return-value]

    def _switch(self, key: tuple, lora_id: int, probe_prompts: list[str]) -> None:
        """Engines that are up but on another adapter (and idle) switch to this one and run the probe."""
        for slot in self._slots:
            if slot.state == "idle" or (slot.state == "ready" and slot.key != key and slot.inflight == 0):
                slot.state = "switching"
                ref = slot.actor.switch.remote(key[1], lora_id, probe_prompts)
                self._pending[ref] = _Task("switch", slot.index, time.monotonic() + self.cfg.request_timeout_s, key=key)

    def _collect(self, rnd: _Round) -> tuple[_Task, _Slot, Any] | None:
        """The first finished task and its value; None when nothing finished within a short slice, or
        what finished had lost its actor (failed, its shards re-queued)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

        wait_s = max(0.0, min(t.deadline for t in self._pending.values()) - time.monotonic())
        # short slices: a blocked ray.wait does not see Ctrl-C; deadlines are checked on every pass
        ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=min(wait_s, 2.0))
        if not ready:
            for ref, task in list(self._pending.items()):
                if ref in self._pending and task.deadline <= time.monotonic():
                    self._fail(self._slots[task.slot], f"{task.kind} timed out", rnd)
            return None
        task = self._pending.pop(ready[0])
        slot = self._slots[task.slot]
        try:
            return task, slot, ray.get(ready[0], timeout=self.cfg.request_timeout_s)
        except (RayActorError, WorkerCrashedError, GetTimeoutError) as err:
            self._fail(slot, f"{task.kind}: {type(err).__name__}: {err}", rnd, failed=task)
            return None
        except Exception as err:  # the engine raised: deterministic, retrying elsewhere would too
            what = f"shard {task.shard}" if task.kind == "shard" else task.kind
            raise GenerationError(f"round {rnd.round_id}: {what} failed on generation actor {slot.index}: {err}") from err

    @staticmethod
    def _log_progress(rnd: _Round, gen_start: float) -> None:
        """'prompts done / total, rate, ETA' after every shard: a CPU round takes minutes."""
        prompts_done, total = sum(len(r.outputs) for r in rnd.results if r is not None), len(rnd.items)
        elapsed = max(time.perf_counter() - gen_start, 1e-9)
        rate = prompts_done / elapsed
        eta = (total - prompts_done) / rate if rate > 0 else float("nan")
        log.info("round %d: %d/%d prompts, %.2f prompts/s, ETA %.0fs", rnd.round_id, prompts_done, total, rate, eta)

    def _dispatch(self, rnd: _Round) -> None:
        cfg, key = self.cfg, rnd.key
        while rnd.queue:
            ready = [s for s in self._slots if s.state == "ready" and s.key == key
                     and s.inflight < cfg.max_inflight_per_actor]
            if not ready:
                return
            slot = min(ready, key=lambda s: (s.inflight, s.index))  # least busy
            shard = rnd.queue.popleft()
            lo, hi = rnd.bounds[shard]
            slot.inflight += 1
            ref = slot.actor.run_shard.remote(shard, key[0], key[1], rnd.lora_id, rnd.items[lo:hi],
                                              shard_seed(self.seed, key[0], shard), rnd.work)
            # a queued shard waits behind the ones before it on the same actor
            deadline = time.monotonic() + cfg.request_timeout_s * slot.inflight
            self._pending[ref] = _Task("shard", slot.index, deadline, shard=shard, key=key)

    def _accept(self, value: ShardResult, task: _Task, rnd: _Round) -> None:
        lo, hi = rnd.bounds[task.shard]
        round_id, lora_id = rnd.round_id, rnd.lora_id
        if (value.round_id, value.lora_id, value.shard) != (round_id, lora_id, task.shard):
            raise GenerationError(f"stale result: shard {task.shard} came back tagged round {value.round_id}, "
                                  f"LoRA id {value.lora_id}, shard {value.shard}; expected round {round_id}, "
                                  f"LoRA id {lora_id}")
        # n completions per prompt, or one score per candidate
        expected = [len(c) for _, c in rnd.items[lo:hi]] if isinstance(rnd.work, Scoring) else [rnd.work.n] * (hi - lo)
        if [len(o) for o in value.outputs] != expected:
            raise GenerationError(f"shard {task.shard}: expected {expected} outputs per item, got "
                                  f"{[len(o) for o in value.outputs]}")
        rnd.results[task.shard] = value
        rnd.stats.gen_tokens += value.num_tokens
        rnd.stats.shards_per_actor[task.slot] = rnd.stats.shards_per_actor.get(task.slot, 0) + 1

    # ---- teardown ------------------------------------------------------------------------------
    def release(self) -> None:
        """Every live engine gives its GPU memory back until its next request (a trainer is about to
        use the same GPU); engines that fail here are replaced on the next round as usual."""
        import ray

        refs = [s.actor.release.remote() for s in self._slots if s.actor is not None and s.state != "dead"]
        try:
            ray.get(refs, timeout=self.cfg.request_timeout_s)
        except Exception as err:
            log.warning("releasing generation engines: %s", err)

    def shutdown(self) -> None:
        import ray

        closes = {s.index: s.actor.close.remote() for s in self._slots if s.actor is not None and s.state != "dead"}
        for index, ref in closes.items():
            try:
                ray.get(ref, timeout=30)
            except Exception as err:  # dead or hung: killed below anyway
                log.debug("closing actor %d: %s", index, err)
        for slot in self._slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception as err:
                    log.debug("ray.kill on actor %d: %s", slot.index, err)
                slot.actor, slot.state = None, "dead"
        self._pending.clear()

    def __enter__(self) -> GenerationPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
