"""Ray Serve application: `POST /recommend`, `POST /rank` and `GET /healthz` over a finished run's model.

Two ways in:
* `serve_run(run_dir, overrides)`: what `sprec-ray serve --run DIR` calls (starts/attaches to Ray).
* `build_app({"run_dir": ..., "overrides": [...]})`: the import path for Serve config files
  (`serve run cluster/serve_config.yaml`, KubeRay's RayService serveConfigV2).

Two deployments. `Gateway` (the HTTP ingress, no model) validates each request in its event loop, so
a bad request never reaches a model or joins a batch, and calls `Recommender`, the replicas that hold
the engines, through a handle. Both endpoints are pure functions of the request, so when a replica
dies holding one the gateway sends it once more, to a live replica; with none up within
serve.retry_timeout_s the client gets 503 + Retry-After, never a 500. Replicas batch requests with
`@serve.batch`, run a batch off the event loop in one generate (+ ground) or one scoring call, and
autoscale between serve.min_replicas and serve.max_replicas.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ..config import ConfigError
from ..runtime import worker_env
from .recommender import Prompts, Recommender, RunInfo, load_run, serving_generation
from .schema import (
    MAX_BODY_BYTES,
    RankRequest,
    RecommendRequest,
    RequestError,
    check_body_size,
    parse_rank_request,
    parse_request,
)

log = logging.getLogger("sprec_ray.serve")
APP_NAME = "sprec"
BUILD_ARGS = ("run_dir", "overrides")
QUEUED_BATCHES = 8  # per replica; see deployment_options
RETRY_AFTER_S = 10  # what a 503 tells the client: about a CPU replica's restart

api = FastAPI(title="sprec-ray recommender")


class ReplicasUnavailable(Exception):
    """No model replica answered a request that was retried after its replica died."""


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, but stop reading (413) as soon as it passes `limit`, declared length or not."""
    check_body_size(request.headers.get("content-length"), None, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="Recommender")
class RecommenderReplica:
    """One engine + grounder; batches /recommend and /rank requests separately."""

    def __init__(self, run_dir: str, overrides: Sequence[str] = ()) -> None:
        logging.basicConfig(level=logging.INFO)
        run = load_run(run_dir, overrides)
        self.core = Recommender(run)
        # One thread runs the engine: a /recommend and a /rank batch must not switch or use it at once.
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        for batched in (self.recommend, self.rank):
            batched.set_max_batch_size(run.cfg.serve.max_batch_size)
            batched.set_batch_wait_timeout_s(run.cfg.serve.batch_wait_timeout_s)

    # Generation blocks for tens of ms or more: keep the event loop free for health checks.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # real values set from cfg.serve in __init__
    async def recommend(self, reqs: list[RecommendRequest]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self.engine_thread, self.core.recommend, reqs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rank(self, reqs: list[RankRequest]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self.engine_thread, self.core.rank, reqs)


@serve.deployment(name="Gateway", max_ongoing_requests=1000)
@serve.ingress(api)
class Gateway:
    def __init__(self, run_dir: str, overrides: Sequence[str], model: DeploymentHandle) -> None:
        logging.basicConfig(level=logging.INFO)
        self.run = load_run(run_dir, overrides)
        self.prompts = Prompts(self.run)
        self.model = model
        self.started = time.time()

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "round": self.run.round, "items": len(self.prompts.catalogue),
                "task": self.run.cfg.data.task, "backend": self.prompts.gen_cfg.backend,
                "adapter": self.run.adapter is not None, "uptime_s": round(time.time() - self.started, 1)}

    @api.post("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        s = self.run.cfg.serve
        return await self._answer(request, "recommend", lambda body: parse_request(
            body, self.prompts.catalogue, s.max_history, s.max_k), self.prompts.check_recommend)

    @api.post("/rank")
    async def rank(self, request: Request) -> JSONResponse:
        s = self.run.cfg.serve
        return await self._answer(request, "rank", lambda body: parse_rank_request(
            body, self.prompts.catalogue, s.max_history, s.max_candidates), self.prompts.check_rank)

    async def _answer(self, request: Request, method: str, parse, check) -> JSONResponse:
        try:
            req = parse(await _read_body(request))
            check(req)
            return JSONResponse(await self._call(method, req))
        except RequestError as err:
            return JSONResponse(err.to_json(), status_code=err.status)
        except ReplicasUnavailable as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        except Exception:
            # The trace goes to the replica log, never to the client.
            log.exception("%s failed", method)
            return JSONResponse({"error": f"internal error in /{method}; see the server log"}, status_code=500)

    async def _call(self, method: str, req: RecommendRequest | RankRequest) -> dict[str, Any]:
        """The model's answer; sent once more when the replica holding it died (the router drops a
        dead replica, so the retry goes to a live one, or waits for a new one)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            return await getattr(self.model, method).remote(req)
        except (RayActorError, ActorUnavailableError) as err:
            log.warning("/%s: its replica was lost (%s); sending it once more", method, type(err).__name__)
        retry = getattr(self.model, method).remote(req)

        async def answer() -> dict[str, Any]:
            return await retry

        try:
            return await asyncio.wait_for(answer(), self.run.cfg.serve.retry_timeout_s)
        except (TimeoutError, RayActorError, ActorUnavailableError) as err:
            retry.cancel()
            raise ReplicasUnavailable(f"no recommender replica answered within serve.retry_timeout_s="
                                      f"{self.run.cfg.serve.retry_timeout_s}s after its replica was lost "
                                      f"({type(err).__name__}); retry later") from None


def deployment_options(run: RunInfo) -> dict[str, Any]:
    """Replica resources and autoscaling from the run config (a Serve config file can override them)."""
    s = run.cfg.serve
    gen = serving_generation(run.cfg.generation)
    env = worker_env()  # the user's HF settings (offline, cache, token) reach the replicas
    if gen.gpus_per_actor == 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(gen.kv_cache_gib)
    return {
        # A replica is "busy" at one full batch: more queued work than that is what should add replicas.
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "initial_replicas": max(s.min_replicas, 1),
                               "target_ongoing_requests": s.max_batch_size,
                               "upscale_delay_s": 5.0, "downscale_delay_s": 60.0},
        # Up to 8 batches queue inside a replica (FIFO into the next batch). Capping at 2 batches made
        # the excess wait in Serve's router, whose retry backoff cut throughput ~7x at 64 concurrent
        # clients (benchmarks/serve_load.py); the autoscaler still sees the queue via ongoing requests.
        "max_ongoing_requests": QUEUED_BATCHES * s.max_batch_size,
        "ray_actor_options": {"num_cpus": gen.cpus_per_actor, "num_gpus": gen.gpus_per_actor,
                              "runtime_env": {"env_vars": env}},
        "health_check_period_s": 10.0,
    }


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: args = {"run_dir": str, "overrides": ["section.key=value", ...]}."""
    if not isinstance(args, dict) or "run_dir" not in args:
        raise ConfigError(f"build_app needs args {{'run_dir': ..., 'overrides': [...]}}, got {args!r}")
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ConfigError(f"unknown build_app arg(s) {unknown}; allowed: {list(BUILD_ARGS)}")
    overrides = args.get("overrides") or []
    if not isinstance(overrides, list | tuple) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"build_app 'overrides' must be a list of 'section.key=value' strings, got {overrides!r}")
    # Load (and so validate) the run here, at deploy time, so a bad run dir fails before any replica starts.
    run = load_run(args["run_dir"], overrides)
    model = RecommenderReplica.options(**deployment_options(run)).bind(str(run.run_dir), list(overrides))
    # The gateway holds no model: no CPU of its own, only the replicas' HF settings to read the tokenizer.
    gateway = Gateway.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": worker_env()}})
    return gateway.bind(str(run.run_dir), list(overrides), model)


def serve_run(run_dir: str | Path, cfg_overrides: Sequence[str] = (), block: bool = True) -> str:
    """Deploy the endpoint for `run_dir` on cfg.serve.host:port and return its base URL.
    block=True serves until Ctrl-C (then shuts Serve down); False returns once replicas are up."""
    from ..runtime import init_ray

    run = load_run(run_dir, cfg_overrides)
    init_ray(run.cfg.ray_address, run.cfg.ray_num_cpus)
    s = run.cfg.serve
    url = f"http://{s.host}:{s.port}"
    serve.start(proxy_location=s.proxy_location, http_options={"host": s.host, "port": s.port})
    try:
        serve.run(build_app({"run_dir": str(run.run_dir), "overrides": list(cfg_overrides)}),
                  name=APP_NAME, route_prefix="/")
        log.info("serving %s at %s (POST /recommend, POST /rank, GET /healthz)", run.run_dir, url)
        if not block:
            return url
        print(f"serving {run.run_dir} at {url}  (POST /recommend, POST /rank, GET /healthz); Ctrl-C to stop",
              flush=True)
        while True:
            # Short sleeps: a Ctrl-C the kernel hands to one of Ray's threads only raises
            # KeyboardInterrupt here once the main thread wakes up.
            time.sleep(1)
    except KeyboardInterrupt:  # also while deploying (the proxy answers before serve.run returns)
        # A second Ctrl-C must not cut the shutdown short: Serve apps outlive their driver, and one
        # left running holds the cluster's CPUs.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        serve.shutdown()
    return url
