from pathlib import Path

import pytest

from sprec_ray.config import ConfigError, RunConfig, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "default.yaml", "gpu_single.yaml", "warmstart.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig) and len(cfg.digest()) == 16


def test_overrides_apply_and_change_the_digest():
    base = load_config(CONFIGS / "tiny.yaml")
    cfg = load_config(CONFIGS / "tiny.yaml", ["selfplay.rounds=3", "dpo.loss=sdpo", "dpo.num_negatives=3", "eval.ks=[1,5]"])
    assert cfg.selfplay.rounds == 3 and cfg.dpo.loss == "sdpo" and cfg.dpo.num_negatives == 3 and cfg.eval.ks == (1, 5)
    assert cfg.digest() != base.digest()
    with pytest.raises(AttributeError):
        cfg.seed = 3  # frozen


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["sft.cft.enabled=true"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(("override", "message"), [
    (["dpo.bta=1"], r"unknown config key dpo.bta; allowed keys here: \['loss', 'beta'"),
    (["dpo.loss=ipo"], r"dpo.loss = 'ipo' is not allowed; choose one of \['dpo', 'sdpo'\]"),
    (["train.zero_stage=1"], r"train.zero_stage = 1 is not allowed; choose one of \[0, 2, 3\]"),
    (["dpo.num_negatives=3"], r"dpo.num_negatives must be 1 when dpo.loss is 'dpo'"),
    (["dpo.negative_source=model"], r"dpo.negative_source = 'model' is not allowed; choose one of \['generated', 'grounded'\]"),
    (["dpo.on_equal_positive=keep"], r"dpo.on_equal_positive = 'keep' is not allowed; choose one of \['drop', 'popular_random'\]"),
    (["generation.max_new_tokens=60"], r"generation.max_new_tokens \(60\) \+ 4 must be <= model.max_response_len \(48\)"),
    (["sft.lr=fast"], r"sft.lr must be a number, got 'fast'"),
    (["train.use_gpu=1"], r"train.use_gpu must be true or false"),
    (["generation.n=4"], r"generation.n must be 1 with generation.decoding 'greedy'"),
    (["data=3"], r"data must be a mapping"),
    (["eval.ks=[0, 5]"], r"eval.ks must all be >= 1"),
    (["selfplay.rounds"], r"must look like section.key=value"),
    (["data.k_core=-1"], r"data.k_core must be >= 0 \(0 = off\), got -1"),
    (["train.log_every=0"], r"train.log_every must be >= 1, got 0"),
    (["dpo.lora_dropout=1.0"], r"dpo.lora_dropout must be in \[0, 1\), got 1.0"),
    (["train.max_tokens_per_batch=-5"], r"train.max_tokens_per_batch must be >= 0"),
    (["train.stream_rows=-1"], r"train.stream_rows must be >= 0"),
    (["train.num_workers=-1"], r"train.num_workers must be >= 0 \(0 = one process, in the driver\), got -1"),
    (["train.num_workers=0"], r"train.num_workers=0 trains in the driver process, without DeepSpeed: it needs train.zero_stage=0"),
    (["train.stream_window_rows=0"], r"train.stream_window_rows must be >= 1"),
    (["model.attn_implementation=flash"], r"model.attn_implementation = 'flash' is not allowed"),
    (["output_dir=s3://bucket/run"], r"output_dir='s3://bucket/run' must be a filesystem path every node mounts"),
    (["serve.proxy_location=Nowhere"], r"serve.proxy_location = 'Nowhere' is not allowed"),
    (["data.task=rank"], r"data.task = 'rank' is not allowed; choose one of \['generate', 'candidates'\]"),
    (["data.task=candidates", "data.num_candidates=3", "dpo.loss=sdpo", "dpo.num_negatives=3"],
     r"data.num_candidates \(3\) must be >= dpo.num_negatives \+ 1 \(4\)"),
    (["data.num_candidates=0"], r"data.num_candidates must be >= 1, got 0"),
    (["eval.test_every_round=1"], r"eval.test_every_round must be true or false"),
    (["sft.round_lr=0"], r"sft.round_lr must be > 0, got 0"),
    (["dpo.warmup_steps=-1"], r"dpo.warmup_steps must be >= 0, got -1"),
    (["train.mixed_precision=fp8"], r"train.mixed_precision = 'fp8' is not allowed; choose one of \['none', 'bf16', 'auto'\]"),
    (["train.mixed_precision=bf16", "model.dtype=bfloat16"], r"train.mixed_precision=bf16 keeps fp32 weights under autocast"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", override)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_long_generations_are_fine_when_negatives_are_catalogue_titles():
    cfg = load_config(CONFIGS / "tiny.yaml", ["generation.max_new_tokens=60", "dpo.negative_source=grounded"])
    assert cfg.dpo.negative_source == "grounded" and cfg.dpo.on_equal_positive == "drop"
    cfg = load_config(CONFIGS / "tiny.yaml", ["generation.max_new_tokens=60", "data.task=candidates"])
    assert cfg.data.task == "candidates" and cfg.data.num_candidates == 20 and not cfg.eval.test_every_round


def test_model_names_a_hub_id_a_local_dir_or_a_builtin(tmp_path, monkeypatch):
    from sprec_ray.models.base import is_hub_id, stage_base_model

    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and not is_hub_id("smollm2") and not is_hub_id("a/b/c")
    (tmp_path / "org" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/local")  # an existing directory of that name wins
    with pytest.raises(FileNotFoundError, match="model.revision='v1' applies to Hub ids only"):
        stage_base_model("smollm2", "v1", tmp_path / "run")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    with pytest.raises(FileNotFoundError, match=r"'nobody/nothing' \(revision main\) cannot be resolved on this node"):
        stage_base_model("nobody/nothing", "", tmp_path / "run")


def test_link_tree_keeps_a_finished_copy_and_redoes_a_killed_one(tmp_path):
    from sprec_ray.models.base import link_tree

    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub" / "weights.bin").write_bytes(b"\x00" * 64)
    killed = tmp_path / "run" / "base_model" / "model.partial"  # what a copy killed half-way leaves
    killed.mkdir(parents=True)
    (killed / "stale.bin").write_text("half")
    target = link_tree(source, tmp_path / "run" / "base_model" / "model")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["config.json", "sub", "sub/weights.bin"]
    assert not killed.exists() and (target / "sub" / "weights.bin").read_bytes() == b"\x00" * 64
    (target / "extra").write_text("kept")
    assert link_tree(source, target) == target and (target / "extra").exists()  # finished: left alone


@pytest.mark.parametrize(("override", "message"), [
    (["generation.shard_size=0"], r"generation.shard_size must be >= 1, got 0"),
    (["generation.request_timeout_s=0"], r"generation.request_timeout_s must be > 0, got 0.0"),
    (["generation.startup_timeout_s=-1"], r"generation.startup_timeout_s must be > 0"),
    (["generation.max_inflight_per_actor=0"], r"generation.max_inflight_per_actor must be >= 1"),
    (["generation.probe_tolerance=-0.1"], r"generation.probe_tolerance must be >= 0"),
    (["train.checkpoint_every=0"], r"train.checkpoint_every must be >= 1, got 0"),
    (["train.max_grad_norm=0"], r"train.max_grad_norm must be > 0"),
    (["serve.min_replicas=3", "serve.max_replicas=2"], r"serve.min_replicas \(3\) must be <= serve.max_replicas \(2\)"),
    (["serve.max_batch_size=0"], r"serve.max_batch_size must be >= 1"),
    (["serve.batch_wait_timeout_s=-1"], r"serve.batch_wait_timeout_s must be >= 0"),
    (["model.max_prompt_len=1"], r"model.max_prompt_len must be >= 2, got 1"),
    (["generation.decoding=sample", "generation.n=2", "generation.temperature=0"],
     r"generation.temperature must be > 0 with generation.decoding 'sample'"),
    (["model.dtype=float16", "train.zero_stage=0"], r"model.dtype=float16 needs DeepSpeed's loss scaling"),
    (["generation.tensor_parallel=2"], r"generation.tensor_parallel=2 needs generation.gpus_per_actor >= 2"),
    (["train.prefix_sharing=on", "model.attn_implementation=flash_attention_2"], r"train.prefix_sharing=on needs a 4-D"),
])
def test_values_that_used_to_fail_after_the_warm_start_fail_at_load(override, message):
    """Each of these used to pass load_config and fail later: in the pool after the warm-start SFT,
    in a fit's workers, or when Serve deployed (issue 24)."""
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", override)


def test_prefix_sharing_reads_yaml_on_and_off():
    assert load_config(None, ["train.prefix_sharing=on"]).train.prefix_sharing == "on"
    assert load_config(None, ["train.prefix_sharing=off"]).train.prefix_sharing == "off"


def test_digest_ignores_how_a_run_executes_but_not_what_it_computes():
    from sprec_ray.config import OPERATIONAL_KEYS

    base = load_config(CONFIGS / "tiny.yaml")
    operational = ["ray_address=auto", "output_dir=elsewhere", "train.logger=tensorboard", "train.checkpoint_every=7",
                   "generation.request_timeout_s=5", "serve.port=9000", "serve.max_replicas=4", "eval.batch_size=3"]
    assert load_config(CONFIGS / "tiny.yaml", operational).digest() == base.digest()
    for result_changing in (["sft.lr=0.5"], ["seed=9"], ["generation.max_new_tokens=8"], ["train.prefix_sharing=off"]):
        assert load_config(CONFIGS / "tiny.yaml", result_changing).digest() != base.digest(), result_changing
    fields = base.to_dict()
    for key in OPERATIONAL_KEYS:  # every listed key exists, so none silently stops matching after a rename
        section, _, name = key.rpartition(".")
        assert name in (fields[section] if section else fields), key


def test_yaml_exponents_without_a_dot_are_numbers():
    assert load_config(None, ["sft.lr=3e-4"]).sft.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string


def test_default_digests_are_pinned():
    """The digests of before the bounds moved onto the fields (issue 36): --resume of an older run works."""
    assert load_config(None).digest() == "6696e51d252ac3ed"
    assert load_config(CONFIGS / "default.yaml").digest() == "c4ad301320d0bf3b"


@pytest.mark.parametrize(("override", "message"), [
    (["lora.dropout=-0.1"], r"lora.dropout must be in \[0, 1\), got -0.1"),
    (["sft.cft.beta=1.5"], r"sft.cft.beta must be in \[0, 1\], got 1.5"),
    (["dpo.beta=0"], r"dpo.beta must be > 0, got 0.0"),
    (["selfplay.rounds=-1"], r"selfplay.rounds must be >= 0, got -1"),
    (["model.max_response_len=1"], r"model.max_response_len must be >= 2, got 1"),
    (["serve.max_k=0"], r"serve.max_k must be >= 1, got 0"),
    (["eval.ks=[5, -1]"], r"eval.ks must all be >= 1, got \[5, -1\]"),
    (["generation.probe_tolerance=.nan"], r"generation.probe_tolerance must be >= 0, got nan"),  # was accepted
    (["train.use_gpu=true", "train.gpus_per_worker=2"], r"train.gpus_per_worker must be in \(0, 1\], got 2.0"),
])
def test_bounds_declared_on_the_fields_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", override)


def test_every_default_keeps_its_declared_bound():
    import dataclasses
    import typing

    from sprec_ray.config import Rule

    def check(section: object, prefix: str) -> int:
        checked = 0
        for name, hint in typing.get_type_hints(type(section), include_extras=True).items():
            value = getattr(section, name)
            if dataclasses.is_dataclass(value):
                checked += check(value, f"{prefix}{name}.")
            for rule in getattr(hint, "__metadata__", ()):
                assert isinstance(rule, Rule)
                rule.check(value, prefix + name)
                checked += 1
        return checked

    assert check(RunConfig(), "") >= 50


def test_an_older_runs_config_with_a_retired_key_still_loads(tmp_path):
    import yaml

    from sprec_ray.config import RETIRED_KEYS

    path = tmp_path / "config.yaml"
    save_config(load_config(CONFIGS / "tiny.yaml"), path)
    old = yaml.safe_load(path.read_text())
    old["eval"]["batch_size"] = 256  # what runs wrote before the key was retired
    path.write_text(yaml.safe_dump(old))
    assert "eval.batch_size" in RETIRED_KEYS
    assert load_config(path).digest() == load_config(CONFIGS / "tiny.yaml").digest()
    with pytest.raises(ConfigError, match="unknown config key eval.batch_sizes"):
        load_config(path, ["eval.batch_sizes=3"])
