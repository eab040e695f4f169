"""Ray Serve application over a finished run's model: `POST /recommend`, `POST /rank`, `POST /v1/rerank`
(Cohere's rerank API; also `/v2/rerank`, where Cohere's v2 client posts), `GET /healthz` (liveness),
`GET /readyz` (a model replica answers), `GET /version` (the live adapter), `GET /stats` (the filter
bubble over the latest answers), `/docs` and `/openapi.json` (the request schemas).

Two ways in:
* `serve_run(run_dir, overrides)`: what `sprec-ray serve --run DIR` calls (starts/attaches to Ray).
* `build_app({"run_dir": ..., "overrides": [...]})`: the import path for Serve config files
  (`serve run cluster/serve_config.yaml`, KubeRay's RayService serveConfigV2).

Two deployments. `Gateway` (the HTTP ingress, no model) validates each request in its event loop, so
a bad request never reaches a model or joins a batch, and calls `Recommender`, the replicas that hold
the engines, through a handle. The endpoints are pure functions of the request, so when a replica
dies holding one the gateway sends it once more, to a live replica; with none up within
serve.retry_timeout_s the client gets 503 + Retry-After, never a 500. Replicas batch requests with
`@serve.batch`, run a batch off the event loop in one generate (+ ground) or one scoring call, and
autoscale between serve.min_replicas and serve.max_replicas. On SIGTERM or Ctrl-C, `sprec-ray serve`
drains: the gateway refuses new requests (503 + Retry-After), the accepted ones are answered (up to
DRAIN_TIMEOUT_S), then Serve shuts down.

The gateway also holds the live adapter (rollout.py): it names it on every request it forwards, and
`sprec-ray deploy` (or serve.follow) changes it in place, with no replica restarted. It keeps the
sliding window of /recommend answers behind GET /stats and the Prometheus gauges (stats.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ..config import ConfigError
from ..runtime import worker_env
from .adapters import AdapterError, AdapterRef
from .recommender import Prompts, Recommender, RunInfo, adapter_of, load_run, serving_generation
from .responses import (
    ErrorResponse,
    RankResponse,
    ReadyResponse,
    RecommendResponse,
    RerankResponse,
    StatsResponse,
    VersionResponse,
)
from .rollout import Rollout
from .schema import (
    MAX_BODY_BYTES,
    RankRequest,
    RecommendRequest,
    RequestError,
    RerankRequest,
    check_body_size,
    parse_rank_request,
    parse_request,
    parse_rerank_request,
    rank_body,
    recommend_body,
    rerank_body,
)
from .stats import LiveStats, StatsGauges

log = logging.getLogger("sprec_ray.serve")
APP_NAME = "sprec"
BUILD_ARGS = ("run_dir", "overrides")
QUEUED_BATCHES = 8  # per replica; see deployment_options
RETRY_AFTER_S = 10  # what a 503 tells the client: about a CPU replica's restart
READY_TIMEOUT_S = 2.0  # /readyz: a replica that cannot take a ping this fast cannot take traffic either
DRAIN_TIMEOUT_S = 25.0  # SIGTERM: in-flight requests get this long (under Kubernetes' default 30 s grace)
STATS_PUBLISH_S = 1.0  # the Prometheus gauges are recomputed at most this often
ENDPOINTS = ("POST /recommend, POST /rank, POST /v1/rerank, GET /healthz, GET /readyz, GET /version, GET /stats, "
             "GET /docs")


class ReplicasUnavailable(Exception):
    """No model replica answered a request that was retried after its replica died."""


@dataclass(frozen=True)
class Job:
    """A request as the gateway forwards it: with the adapter that is live when it is forwarded."""

    req: RecommendRequest | RankRequest | RerankRequest
    adapter: AdapterRef


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
    """One engine + grounder; batches /recommend, /rank and /v1/rerank requests separately."""

    def __init__(self, run_dir: str, overrides: Sequence[str] = ()) -> None:
        logging.basicConfig(level=logging.INFO)
        run = load_run(run_dir, overrides)
        self.core = Recommender(run)
        # One thread runs the engine: a /recommend and a /rank batch must not switch or use it at once.
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        for batched in (self.recommend, self.rank, self.rerank):
            batched.set_max_batch_size(run.cfg.serve.max_batch_size)
            batched.set_batch_wait_timeout_s(run.cfg.serve.batch_wait_timeout_s)

    # Generation blocks for tens of ms or more: keep the event loop free for health checks.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # real values set from cfg.serve in __init__
    async def recommend(self, jobs: list[Job]) -> list[dict[str, Any]]:
        return await self._run(self.core.recommend, jobs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rank(self, jobs: list[Job]) -> list[dict[str, Any]]:
        return await self._run(self.core.rank, jobs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rerank(self, jobs: list[Job]) -> list[dict[str, Any]]:
        return await self._run(self.core.rerank, jobs)

    async def _run(self, fn: Callable[..., list[dict[str, Any]]], jobs: list[Job]) -> list[dict[str, Any]]:
        """One engine call per adapter in the batch (two only in the batch that straddles a rollout)."""
        loop = asyncio.get_running_loop()
        groups: dict[AdapterRef, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.adapter, []).append(i)
        out: list[dict[str, Any]] = [{} for _ in jobs]
        for adapter, idx in groups.items():
            bodies = await loop.run_in_executor(self.engine_thread, fn, [jobs[i].req for i in idx], adapter)
            for i, body in zip(idx, bodies, strict=True):
                out[i] = body
        return out

    async def probe(self, adapter: AdapterRef) -> float:
        """A rollout's last check: load the adapter into this replica's engine and score with it."""
        return await asyncio.get_running_loop().run_in_executor(self.engine_thread, self.core.probe, adapter)

    async def ping(self) -> int:
        """/readyz: answered on the event loop, so a replica that is up answers even mid-batch."""
        return self.core.run.round


@serve.deployment(name="Gateway", max_ongoing_requests=1000)
@serve.ingress()  # the FastAPI app is built per replica (__serve_build_asgi_app__): its schemas carry the run's bounds
class Gateway:
    def __init__(self, run_dir: str, overrides: Sequence[str], model: DeploymentHandle) -> None:
        logging.basicConfig(level=logging.INFO)
        self.run = load_run(run_dir, overrides)
        self.prompts = Prompts(self.run)
        self.model = model
        self.started = time.time()
        self.in_flight = 0  # requests past the drain check and not yet answered
        self.draining = False
        self.rollout = Rollout(self.run.base_model, adapter_of(self.run), self._probe)
        self.stats = LiveStats(self.prompts.catalogue, self.run.cfg.eval.ks, self.run.cfg.serve.stats_window)
        self.gauges = StatsGauges()
        self.published = 0.0
        # Held so the task is not garbage-collected; the constructor runs on the replica's event loop.
        self.follower = asyncio.get_running_loop().create_task(self._follow()) if self.run.cfg.serve.follow else None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    def healthz(self) -> dict[str, Any]:
        live = self.rollout.live
        return {"status": "ok", "round": live.round, "items": len(self.prompts.catalogue),
                "task": self.run.cfg.data.task, "backend": self.prompts.gen_cfg.backend,
                "adapter": live.path is not None, "adapter_sha256": live.sha256,
                "uptime_s": round(time.time() - self.started, 1)}

    def version(self) -> dict[str, Any]:
        """The live adapter, the ones a rollback returns to (newest first) and the latest refusals."""
        return {"run": str(self.run.run_dir), "base_model": self.run.base_ref, **self.rollout.state(),
                "follow": self.run.cfg.serve.follow}

    def live_stats(self) -> dict[str, Any]:
        snapshot = self.stats.snapshot()
        self.gauges.publish(snapshot)
        self.published = time.monotonic()
        return {"live": self.rollout.live.public(), **snapshot}

    async def deploy(self, path: str, round_id: int | None = None) -> dict[str, Any]:
        """`sprec-ray deploy`: make `path` live. Answers a dict (ok, error, the new state) rather than
        raising, so the command prints the reason, not a Ray trace."""
        try:
            await self.rollout.deploy(path, round_id)
        except AdapterError as err:
            return {"ok": False, "error": str(err), **self.version()}
        return {"ok": True, **self.version()}

    async def rollback(self) -> dict[str, Any]:
        try:
            await self.rollout.rollback()
        except AdapterError as err:
            return {"ok": False, "error": str(err), **self.version()}
        return {"ok": True, **self.version()}

    async def _probe(self, adapter: AdapterRef) -> float:
        return await self.model.probe.remote(adapter)

    async def _follow(self) -> None:
        sft_only = self.run.cfg.selfplay.method == "sft_only"
        while True:
            try:
                await self.rollout.follow(self.run.run_dir, sft_only)
            except Exception:  # a poll that fails (storage hiccup) must not end the following
                log.exception("serve.follow: polling %s failed", self.run.run_dir)
            await asyncio.sleep(self.run.cfg.serve.follow_interval_s)

    def _record(self, req: RecommendRequest, body: dict[str, Any]) -> None:
        self.stats.add(body, req.k)
        if time.monotonic() - self.published >= STATS_PUBLISH_S:
            self.gauges.publish(self.stats.snapshot())
            self.published = time.monotonic()

    async def readyz(self) -> JSONResponse:
        reason = "shutting down" if self.draining else await self._ping()
        body = {"ready": reason is None, "round": self.rollout.live.round, "reason": reason}
        if reason is None:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def _ping(self) -> str | None:
        """None when a model replica answers within READY_TIMEOUT_S, else why not. Sent twice: the
        router may first pick a replica that just died."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        reason = None
        for _ in range(2):
            response = self.model.ping.remote()

            async def answer(response=response) -> int:
                return await response

            try:
                await asyncio.wait_for(answer(), READY_TIMEOUT_S)
                return None
            except TimeoutError:
                response.cancel()
                return f"no model replica answered within {READY_TIMEOUT_S}s"
            except (RayActorError, ActorUnavailableError) as err:
                reason = f"model replica lost ({type(err).__name__})"
        return reason

    def drain(self) -> int:
        """Refuse new requests (503) from now on; returns the number still in flight."""
        self.draining = True
        return self.in_flight

    def pending(self) -> int:
        return self.in_flight

    async def answer(self, request: Request, method: str, parse: Callable[[bytes], Any],
                     check: Callable[[Any], None], wrap: Callable[[dict], dict] | None = None) -> JSONResponse:
        if self.draining:
            return JSONResponse({"error": "the service is shutting down; retry on another instance"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        self.in_flight += 1
        try:
            req = parse(await _read_body(request))
            check(req)
            body = await self._call(method, req)
            if method == "recommend":
                self._record(req, body)
            return JSONResponse(wrap(body) if wrap else body)
        except RequestError as err:
            return JSONResponse(err.to_json(), status_code=err.status)
        except ReplicasUnavailable as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        except Exception:
            # The trace goes to the replica log, never to the client.
            log.exception("%s failed", method)
            return JSONResponse({"error": f"internal error in /{method}; see the server log"}, status_code=500)
        finally:
            self.in_flight -= 1

    def rerank_envelope(self, body: dict[str, Any]) -> dict[str, Any]:
        """The fields Cohere's clients read around the results."""
        adapter = body["adapter"]
        name = f"round-{adapter['round']}" if adapter["round"] is not None else f"adapter-{adapter['sha256'][:12]}"
        return {"id": uuid.uuid4().hex, "model": f"{self.run.run_dir.name}/{name}", **body,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}

    async def _call(self, method: str, req: RecommendRequest | RankRequest | RerankRequest) -> dict[str, Any]:
        """The model's answer; sent once more when the replica holding it died (the router drops a
        dead replica, so the retry goes to a live one, or waits for a new one)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        job = Job(req, self.rollout.live)
        try:
            return await getattr(self.model, method).remote(job)
        except (RayActorError, ActorUnavailableError) as err:
            log.warning("/%s: its replica was lost (%s); sending it once more", method, type(err).__name__)
        retry = getattr(self.model, method).remote(job)

        async def answer() -> dict[str, Any]:
            return await retry

        try:
            return await asyncio.wait_for(answer(), self.run.cfg.serve.retry_timeout_s)
        except (TimeoutError, RayActorError, ActorUnavailableError) as err:
            retry.cancel()
            raise ReplicasUnavailable(f"no recommender replica answered within serve.retry_timeout_s="
                                      f"{self.run.cfg.serve.retry_timeout_s}s after its replica was lost "
                                      f"({type(err).__name__}); retry later") from None


_ERRORS = {400: "the body is not JSON or not a JSON object", 409: "this run cannot answer this endpoint",
           413: "the body is over 64 KiB", 422: "a field is invalid; `field` names it",
           503: "no model replica can answer now, or the service is shutting down (see Retry-After)"}


def build_api(gw: Gateway) -> FastAPI:
    """The HTTP API of one gateway replica. Bodies are read and validated by the run's pydantic models
    (schema.py), not by FastAPI, so that size limits and error messages stay ours; the same models
    are the request schemas in openapi.json."""
    s = gw.run.cfg.serve
    catalogue = gw.prompts.catalogue
    api = FastAPI(title="sprec-ray recommender", version="1",
                  description=f"Run {gw.run.run_dir.name}, round {gw.run.round}: {len(catalogue)} catalogue items.")
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()}
    bodies = [recommend_body(s.max_history, s.max_k), rank_body(s.max_history, s.max_candidates),
              rerank_body(s.max_candidates)]

    def body_of(model: type[BaseModel]) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}

    @api.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness: the gateway answers (says nothing about the model replicas; see /readyz)."""
        return gw.healthz()

    @api.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def readyz() -> JSONResponse:
        """Readiness: 200 when a model replica answers a ping within 2 s, else 503 with the reason."""
        return await gw.readyz()

    @api.get("/version", response_model=VersionResponse)
    def version() -> dict[str, Any]:
        """The live adapter (round, sha256 of its weights, path), the ones a rollback returns to, and
        the latest adapters refused."""
        return gw.version()

    @api.get("/stats", response_model=StatsResponse)
    def stats() -> dict[str, Any]:
        """The filter bubble over the latest /recommend answers, per adapter: DivRatio@k, ORRatio@k,
        top10_share@1, not_in_catalogue_share (the offline definitions; docs/serving.md)."""
        return gw.live_stats()

    @api.post("/recommend", response_model=RecommendResponse, responses=errors, openapi_extra=body_of(bodies[0]))
    async def recommend(request: Request) -> JSONResponse:
        """Items from the whole catalogue for a history: generate, then ground to the catalogue."""
        return await gw.answer(request, "recommend", lambda body: parse_request(
            body, catalogue, s.max_history, s.max_k), gw.prompts.check_recommend)

    @api.post("/rank", response_model=RankResponse, responses=errors, openapi_extra=body_of(bodies[1]))
    async def rank(request: Request) -> JSONResponse:
        """The client's candidates (catalogue items) by the log-prob of answering each."""
        return await gw.answer(request, "rank", lambda body: parse_rank_request(
            body, catalogue, s.max_history, s.max_candidates), gw.prompts.check_rank)

    async def rerank(request: Request) -> JSONResponse:
        """Cohere's rerank API over /rank's scoring: the query is the history, documents are titles
        (free text allowed)."""
        return await gw.answer(request, "rerank", lambda body: parse_rerank_request(
            body, catalogue, s.max_history, s.max_candidates), gw.prompts.check_rank, gw.rerank_envelope)

    # /v1/rerank is the path vLLM, Jina and Cohere's v1 client use; Cohere's v2 client posts to /v2/rerank.
    for path in ("/v1/rerank", "/v2/rerank"):
        api.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse, responses=errors,
                          openapi_extra=body_of(bodies[2]), include_in_schema=path == "/v1/rerank")

    _, defs = models_json_schema([(m, "validation") for m in bodies], ref_template="#/components/schemas/{model}")

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


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
    block=True serves until Ctrl-C or SIGTERM (then drains and shuts Serve down); False returns once
    replicas are up."""
    from ..runtime import init_ray

    run = load_run(run_dir, cfg_overrides)
    init_ray(run.cfg.ray_address, run.cfg.ray_num_cpus)
    s = run.cfg.serve
    url = f"http://{s.host}:{s.port}"
    serve.start(proxy_location=s.proxy_location, http_options={"host": s.host, "port": s.port})
    if block and threading.current_thread() is threading.main_thread():
        # docker stop, Kubernetes and systemd send SIGTERM: take the same clean path as Ctrl-C. Set
        # after ray.init, whose own handler would otherwise abort the process with a stack dump.
        # SIGINT too: a process started in the background of a script inherits SIGINT ignored, and
        # Python then installs no handler, so `kill -INT` would not stop it.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        serve.run(build_app({"run_dir": str(run.run_dir), "overrides": list(cfg_overrides)}),
                  name=APP_NAME, route_prefix="/")
        log.info("serving %s at %s (%s)", run.run_dir, url, ENDPOINTS)
        if not block:
            return url
        import ray

        print(f"serving {run.run_dir} at {url}  ({ENDPOINTS}); Ctrl-C or SIGTERM to stop; change its adapter with "
              f"`sprec-ray deploy --run {run.run_dir} ray_address={ray.get_runtime_context().gcs_address} "
              f"--adapter DIR | --round N | --rollback`", flush=True)
        while True:
            # Short sleeps: a Ctrl-C the kernel hands to one of Ray's threads only raises
            # KeyboardInterrupt here once the main thread wakes up.
            time.sleep(1)
    except KeyboardInterrupt:  # also while deploying (the proxy answers before serve.run returns)
        # A second Ctrl-C must not cut the shutdown short: Serve apps outlive their driver, and one
        # left running holds the cluster's CPUs.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"stopping: draining requests in flight (at most {DRAIN_TIMEOUT_S:.0f}s), then shutting Serve down",
              flush=True)
        drain(DRAIN_TIMEOUT_S)
        serve.shutdown()
        print("stopped", flush=True)
    return url


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def drain(timeout_s: float, app: str = APP_NAME) -> int:
    """Make the gateway refuse new requests (503 + Retry-After) and wait, up to `timeout_s`, for those
    it accepted to be answered. Returns how many were still in flight at the deadline."""
    try:
        gateway = serve.get_deployment_handle("Gateway", app)
        left = gateway.drain.remote().result(timeout_s=timeout_s)
    except Exception as err:  # not deployed (Ctrl-C during the deploy), or its replica is gone
        log.warning("drain: no gateway to drain (%s)", type(err).__name__)
        return 0
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = gateway.pending.remote().result(timeout_s=timeout_s)
    # A handler that just returned may still be sending its response through the proxy, which
    # serve.shutdown() stops at once.
    time.sleep(1.0)
    if left:
        log.warning("drain: %d request(s) still in flight after %.0fs; shutting down anyway", left, timeout_s)
    return left
