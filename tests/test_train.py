"""Ray Train + DeepSpeed phases on CPU with the tiny model and 2 gloo workers (slow: each fit ~20 s).

The equivalence tests feed one global batch per step that holds the whole 8-row set, so every
backend sees exactly the same data per step however Ray Data splits it: the loss trajectories of
ZeRO-2, ZeRO-3 (killed and resumed) and a single process must then agree to float tolerance.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import run_dpo, run_sft
from safetensors.torch import load_file

from sprec_ray.config import load_config
from sprec_ray.data.prompts import render_prompt, render_response
from sprec_ray.runtime import extension_cache
from sprec_ray.train.checkpointing import read_state
from sprec_ray.train.phases import PhaseResult, Stage, run_fit

pytestmark = pytest.mark.slow


_BASE = ["seed=3", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "model.max_response_len=64", "sft.lr=0.01",
         "sft.warmup_steps=1", "train.checkpoint_every=2"]


def _cfg(out: Path, *overrides: str, workers: int = 2):
    return load_config(None, [f"output_dir={out}", *_BASE, *overrides, f"train.num_workers={workers}"])


def _losses(result: PhaseResult) -> list[float]:
    from ray.train import Checkpoint

    return [h["loss"] for h in read_state(Checkpoint(result.checkpoint_path)).history]


def _initial_lora(model_dir: Path, cfg) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    from sprec_ray.train.engine import build_policy

    return {k: v.clone() for k, v in get_peft_model_state_dict(build_policy(model_dir, cfg.lora, None, "float32", cfg.seed)).items()}


def _assert_all_changed(before: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    after = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert sorted(after) == sorted(before) and len(after) > 0
    unchanged = [k for k in after if torch.equal(after[k], before[k].to(after[k].dtype))]
    assert not unchanged, f"LoRA tensors not updated: {unchanged[:3]}"


@pytest.fixture(scope="module")
def sft_rows(tiny_data):
    titles = tiny_data.catalogue.titles
    return [{"row_id": e.row_id, "prompt": render_prompt([titles[i] for i in e.history]),
             "response": render_response(titles[e.target])} for e in tiny_data.train[:8]]


@pytest.fixture(scope="module")
def single_process(sft_rows, tiny_model_dir, tmp_path_factory, ray_session):
    """Reference: Ray Train local mode, one process, plain torch, 8 rows per step (4 x 2), 4 steps."""
    import ray.data

    out = tmp_path_factory.mktemp("single")
    cfg = _cfg(out, "sft.batch_size=4", "sft.grad_accum=2", "sft.epochs=4", "train.zero_stage=0", workers=0)
    result = run_sft(cfg, tiny_model_dir, ray.data.from_items(sft_rows), out / "adapter", None, "single")
    return _losses(result)


@pytest.mark.timeout(300)
def test_zero2_matches_single_process_and_updates_every_lora_param(single_process, sft_rows, tiny_model_dir, tmp_path, ray_session):
    import ray.data
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # 2 workers x 4 rows (2 x 2) = the same 8 rows per step as the reference
    cfg = _cfg(tmp_path, "sft.batch_size=2", "sft.grad_accum=2", "sft.epochs=4", "train.zero_stage=2")
    result = run_sft(cfg, tiny_model_dir, ray.data.from_items(sft_rows), tmp_path / "adapter", None, "zero2")
    losses = _losses(result)
    assert losses == pytest.approx(single_process, rel=1e-5)
    assert losses[-1] < losses[0] - 0.2
    assert result.metrics["steps"] == 4 and result.metrics["tokens_per_s"] > 0
    _assert_all_changed(_initial_lora(tiny_model_dir, cfg), result.adapter_dir)
    names = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and not any("token" in n for n in names)
    # A finished stage's checkpoint holds its adapter once and no optimizer state: the next stage
    # starts fresh Adam moments. (Mid-stage checkpoints: test_a_mid_stage_checkpoint_...)
    ckpt = Path(result.checkpoint_path)
    adapter = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    tensors = sum(f.stat().st_size for f in ckpt.rglob("*") if f.suffix in (".pt", ".safetensors"))
    assert tensors == adapter and not (ckpt / "engine").exists() and not (ckpt / "stages" / "zero2").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(result.adapter_dir))


def test_a_mid_stage_checkpoint_holds_the_lora_weights_and_adam_moments_once(tiny_model_dir, tmp_path):
    """Torch engine in one process: a step, a mid-stage checkpoint, a fresh engine restored from it.
    (DeepSpeed's restore is checked by the killed ZeRO-3 run below, its size by the module_states one.)"""
    from sprec_ray.train.checkpointing import ENGINE_DIR, TrainerState, save_adapter, write_checkpoint
    from sprec_ray.train.engine import build_engine, trainable_parameters

    cfg = _cfg(tmp_path, "train.zero_stage=0", workers=0)
    trained, restored = (build_engine(tiny_model_dir, cfg, None, 0.01, 2, 1, torch.device("cpu")) for _ in range(2))
    for _ in range(2):  # moves every LoRA tensor (B starts at zero) and fills the Adam moments
        trained.backward(sum(((p - 1.0) ** 2).sum() for _, p in trainable_parameters(trained.peft_model)))
        trained.step()
    directory = write_checkpoint(trained, TrainerState("sft", "s", cfg.digest(), step=2), 0, tmp_path / "staging", {})
    restored.load_state(directory / ENGINE_DIR)
    want, got = trained.lora_state_dict(), restored.lora_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for a, b in zip(trained.optimizer.state.values(), restored.optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # weights, then two moments: 3x the adapter (plus torch.save's per-tensor framing), no adapter/ beside them
    save_adapter(trained, tmp_path / "adapter", 0)
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    tensors = sum(f.stat().st_size for f in directory.rglob("*") if f.suffix in (".pt", ".safetensors"))
    assert not (directory / "adapter").exists() and 2.9 * adapter < tensors < 3 * adapter + 24 * 1024


@pytest.mark.timeout(420)
def test_zero3_worker_killed_mid_run_resumes_from_checkpoint(sft_rows, tiny_model_dir, tmp_path, ray_session):
    """A worker SIGKILLed from outside once the run has checkpoints: Ray Train restarts the group,
    which resumes from the last committed checkpoint to the trajectory of a run that never failed."""
    import ray.data
    from faults import KillAfterCheckpoints, train_workers

    common = ["sft.epochs=8", "train.checkpoint_every=1"]
    reference = _cfg(tmp_path / "ref", "sft.batch_size=4", "sft.grad_accum=2", "train.zero_stage=0", *common, workers=0)
    want = _losses(run_sft(reference, tiny_model_dir, ray.data.from_items(sft_rows), tmp_path / "ref_adapter", None, "ref"))
    cfg = _cfg(tmp_path, "sft.batch_size=2", "sft.grad_accum=2", "train.zero_stage=3", *common)
    with KillAfterCheckpoints(tmp_path / "ray_results" / "zero3_killed", lambda: (train_workers() or [None])[-1],
                              after=2) as fault:
        result = run_sft(cfg, tiny_model_dir, ray.data.from_items(sft_rows), tmp_path / "adapter", None, "zero3_killed")
    assert fault.killed is not None
    assert 1 <= result.metrics["restored_from_step"] < 8 and result.metrics["steps"] == 8
    # LoRA weights, Adam moments and the data plan all came back: same trajectory as never failing
    assert _losses(result) == pytest.approx(want, rel=1e-5)


@pytest.mark.timeout(400)
def test_prefix_shared_sdpo_on_ddp_and_zero3_matches_separate_rows_in_one_process(tiny_data, tiny_model_dir, tmp_path,
                                                                                 ray_session):
    """The same 8 rows per step in every run: 2 workers x 2 x 2 = 1 process x 4 x 2."""
    import ray.data

    from sprec_ray.config import LoraConfig
    from sprec_ray.train.engine import build_policy

    titles, n = tiny_data.catalogue.titles, len(tiny_data.catalogue)
    rows = [{"row_id": e.row_id, "prompt": render_prompt([titles[i] for i in e.history]), "response": render_response(titles[e.target]),
             "rejected": [render_response(titles[(e.target + d) % n]) for d in (1, 7)]} for e in tiny_data.train[:8]]
    start = tmp_path / "start"
    build_policy(tiny_model_dir, LoraConfig(r=4, alpha=8, dropout=0.0), None, "float32", seed=3).save_pretrained(str(start))
    common = ["dpo.loss=sdpo", "dpo.num_negatives=2", "dpo.beta=0.5", "dpo.lr=0.02", "dpo.epochs=3", "dpo.grad_accum=2"]
    runs = {}
    for name, layout, zero, workers, batch in (("single_separate", "off", 0, 0, 4), ("ddp_shared", "on", 0, 2, 2),
                                              ("zero3_shared", "on", 3, 2, 2)):
        cfg = _cfg(tmp_path, *common, f"dpo.batch_size={batch}", f"train.prefix_sharing={layout}",
                   f"train.zero_stage={zero}", workers=workers)
        runs[name] = read_state(_ckpt(run_dpo(cfg, tiny_model_dir, ray.data.from_items(rows), tmp_path / name, start, name))).history
    want = [h["loss"] for h in runs["single_separate"]]
    assert len(want) == 3 and want[-1] < want[0]
    for name in ("ddp_shared", "zero3_shared"):
        assert [h["loss"] for h in runs[name]] == pytest.approx(want, rel=1e-4), name
        assert [h["reward_margin"] for h in runs[name]] == pytest.approx([h["reward_margin"] for h in runs["single_separate"]],
                                                                      rel=1e-3, abs=1e-5), name
        assert runs[name][0]["tokens"] < runs["single_separate"][0]["tokens"]  # the prompt counted once, not 3 times


@pytest.mark.timeout(400)
def test_cft_then_sdpo_in_one_fit_on_ddp_then_dpo_with_dropout_on_zero2(tiny_data, tiny_model_dir, tmp_path, ray_session):
    from sprec_ray.data.sharding import PromptShards, write_examples_parquet

    examples = tiny_data.train[:16]
    n = len(tiny_data.catalogue)
    negatives = [[(e.target + 1) % n, (e.target + 7) % n] for e in examples]
    write_examples_parquet(examples, tmp_path / "shards", num_shards=2, negatives=negatives)
    ds = PromptShards(str(tmp_path / "shards"), tiny_data.catalogue.titles, "books", counterfactual=True)

    # One worker group: CFT, one full-shard step per epoch (8 rows per worker), with LoRA dropout 0.1;
    # then S-DPO from those weights, steps of 2 x 3 rows then 1 x 2 rows, so the partial last step of
    # an epoch is exercised. Reports every 3 steps: the window means reach Ray Train, every step the tracker.
    cfg = _cfg(tmp_path, "sft.batch_size=4", "sft.grad_accum=2", "sft.epochs=3", "sft.cft.enabled=true",
               "sft.cft.alpha=0.1", "lora.dropout=0.1", "train.logger=tensorboard", "train.log_every=3",
               "dpo.loss=sdpo", "dpo.num_negatives=2", "dpo.beta=0.5", "dpo.lr=0.02", "dpo.batch_size=3",
               "dpo.grad_accum=2", "dpo.epochs=4", "train.zero_stage=0")
    results = run_fit(cfg, tiny_model_dir, [Stage("sft", "cft", ds, tmp_path / "cft"),
                                            Stage("dpo", "sdpo", ds, tmp_path / "sdpo")], None, "cft_sdpo")
    cft, dpo = results["cft"], results["sdpo"]
    state = read_state(_ckpt(dpo))
    history = state.finished["cft"]["history"]
    assert all(h["loss"] > h["factual_loss"] > 0 for h in history)  # the TE term is on top of the factual CE
    assert history[-1]["loss"] < history[0]["loss"]
    assert len(list((tmp_path / "tensorboard" / "cft").glob("events.out.tfevents.*"))) == 1
    assert cft.metrics["setup_s"] > 0 and dpo.metrics["reference_s"] > 0 and "setup_s" not in dpo.metrics

    history = state.history
    # step 1: policy == reference (DPO runs without dropout by default), so every reward is 0, loss log(1 + K)
    assert history[0]["loss"] == pytest.approx(math.log(3), abs=1e-4)
    assert history[0]["chosen_reward"] == pytest.approx(0, abs=1e-4)
    assert len(history) == 8
    first, last = (sum(h["loss"] for h in history[i:i + 2]) / 2 for i in (0, 6))  # epoch means, same rows
    assert last < first - 0.05
    assert dpo.metrics["final_reward_margin"] > 0 and dpo.metrics["final_accuracy"] > 0
    _assert_all_changed(load_file(str(cft.adapter_dir / "adapter_model.safetensors")), dpo.adapter_dir)

    # With dropout in DPO the policy's first forward already differs from the reference pass (by less with
    # prefix-shared rows: chosen and rejected share the prompt's dropout mask, so it cancels in part).
    dropout = load_config(None, [*_BASE, f"output_dir={tmp_path}", "dpo.lora_dropout=0.5", "dpo.loss=sdpo",
                                 "dpo.num_negatives=2", "dpo.max_steps=2", "dpo.batch_size=4", "dpo.grad_accum=1",
                                 "train.zero_stage=2", "train.num_workers=2"])
    noisy = read_state(_ckpt(run_dpo(dropout, tiny_model_dir, ds, tmp_path / "noisy", cft.adapter_dir, "noisy"))).history
    # Without dropout the first rewards above are exactly 0; with it these draws give about 1e-3.
    assert len(noisy) == 2 and max(abs(noisy[0]["chosen_reward"]), abs(noisy[0]["rejected_reward"])) > 1e-5
    assert math.isfinite(noisy[-1]["loss"])


def _ckpt(result: PhaseResult):
    from ray.train import Checkpoint

    return Checkpoint(result.checkpoint_path)


def test_missing_columns_and_too_few_rows_fail_on_the_driver_before_any_worker_starts(tiny_model_dir, tmp_path, ray_session):
    import pyarrow as pa
    import ray.data

    from sprec_ray.data.records import DataError

    cfg = _cfg(tmp_path, "sft.cft.enabled=true")
    with pytest.raises(DataError, match=r"SFT dataset lacks column\(s\) \['cf_prompt'\]"):
        run_sft(cfg, tiny_model_dir, ray.data.from_items([{"prompt": "p", "response": '"A"'}]), tmp_path / "a", None, "bad")
    with pytest.raises(DataError, match=r"DPO dataset lacks column\(s\) \['row_id', 'rejected'\]"):
        run_dpo(cfg, tiny_model_dir, ray.data.from_items([{"prompt": "p", "response": '"A"'}]), tmp_path / "b", tmp_path, "bad")
    one_row = pa.table({"prompt": ["p"], "response": ['"A"'], "cf_prompt": ["q"]})
    with pytest.raises(DataError, match=r"bad: 1 rows for train.num_workers=2 workers"):
        run_sft(cfg, tiny_model_dir, one_row, tmp_path / "c", None, "bad")


@pytest.mark.timeout(300)
def test_a_registered_objective_trains_through_a_fit(sft_rows, tiny_model_dir, tmp_path, ray_session, monkeypatch):
    """docs/contributing.md's recipe: a toy objective in one file (tests/toy_objective.py) and one
    registry line train on ZeRO-2 workers; its first loss is its own value on the starting weights."""
    import ray.cloudpickle
    import ray.data
    import toy_objective
    from transformers import AutoTokenizer

    from sprec_ray.train.batching import Encoder, encode_sft_batch
    from sprec_ray.train.engine import build_policy
    from sprec_ray.train.objectives import OBJECTIVES, SFTObjective, objective_class

    ray.cloudpickle.register_pickle_by_value(toy_objective)  # Ray workers cannot import tests/
    monkeypatch.setitem(OBJECTIVES, "row_mean_sft", toy_objective.RowMeanSFT)  # the registry line
    with pytest.raises(ValueError, match="objective 'row_mean_sft' trains on sft rows, not on a dpo stage's"):
        objective_class("dpo", "row_mean_sft")
    with pytest.raises(ValueError, match=r"unknown objective 'row_mean'; registered: \['dpo', 'row_mean_sft', 'sft'\]"):
        objective_class("sft", "row_mean")

    # responses of unequal length, so a mean over rows and one over tokens differ
    rows = [{**r, "response": render_response(" ".join([f"T{i}"] * (1 + 2 * i)))} for i, r in enumerate(sft_rows)]
    cfg = _cfg(tmp_path, "sft.batch_size=4", "sft.grad_accum=2", "sft.epochs=4")  # 2 workers x 4 rows: 1 step/epoch
    stage = Stage("sft", "toy", ray.data.from_items(rows), tmp_path / "adapter", objective="row_mean_sft")
    result = run_fit(cfg, tiny_model_dir, [stage], None, "toy")["toy"]
    losses = _losses(result)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = encode_sft_batch({k: [r[k] for r in rows] for k in rows[0]},
                               Encoder(tokenizer, cfg.model.max_prompt_len, cfg.model.max_response_len), False)
    start = build_policy(tiny_model_dir, cfg.lora, None, "float32", cfg.seed).eval()  # a fresh LoRA adds 0
    pad, idx = tokenizer.pad_token_id or tokenizer.eos_token_id, range(len(encoded))
    first = {}
    with torch.no_grad():
        for name, cls in (("toy", toy_objective.RowMeanSFT), ("sft", SFTObjective)):
            objective = cls(cfg, encoded, pad, torch.device("cpu"))
            first[name] = objective.loss(start, idx)[0].item() / objective.normaliser(idx)
    assert losses[0] == pytest.approx(first["toy"], abs=1e-4)
    assert abs(first["toy"] - first["sft"]) > 1e-3  # 50x the tolerance above: the step-1 loss tells them apart
    assert losses[-1] < losses[0]
    _assert_all_changed(_initial_lora(tiny_model_dir, cfg), result.adapter_dir)


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_bf16_zero3_sft_trains_on_nccl(sft_rows, tiny_model_dir, tmp_path, ray_session):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import ray.data

    workers = min(2, torch.cuda.device_count())
    cfg = _cfg(tmp_path, "sft.batch_size=2", "sft.grad_accum=2", "sft.epochs=4", "train.zero_stage=3",
               "model.dtype=bfloat16", "train.use_gpu=true", workers=workers)
    result = run_sft(cfg, tiny_model_dir, ray.data.from_items(sft_rows), tmp_path / "adapter", None, "gpu_zero3")
    losses = _losses(result)
    assert losses[-1] < losses[0]
    _assert_all_changed(_initial_lora(tiny_model_dir, cfg), result.adapter_dir)


def test_a_rounds_sft_trains_at_the_round_lr_and_the_warm_start_at_sft_lr():
    from sprec_ray.train.loop import StageSpec, hyper, lr_at

    cfg = load_config(None, ["sft.lr=3e-4", "sft.warmup_steps=20", "sft.round_lr=2e-5", "sft.round_warmup_steps=4",
                             "dpo.lr=1e-5", "dpo.warmup_steps=2"])
    warm, in_round, dpo = (hyper(cfg, StageSpec(p, f"r{r}_{p}", r)) for p, r in (("sft", 0), ("sft", 1), ("dpo", 1)))
    assert (warm.lr, warm.warmup_steps) == (3e-4, 20)
    assert (in_round.lr, in_round.warmup_steps) == (2e-5, 4)
    assert (dpo.lr, dpo.warmup_steps) == (1e-5, 2)
    assert [lr_at(s, 8, 4, 2e-5) for s in (0, 3, 4, 7)] == pytest.approx([5e-6, 2e-5, 2e-5, 5e-6])


@pytest.mark.skipif(not (extension_cache() / "deepspeed_shm_comm").is_dir(), reason="scripts/install.sh builds it")
@pytest.mark.parametrize("first_on_path", ["system", "environment"])
def test_the_prebuilt_extension_is_current_for_the_ninja_a_fit_runs(first_on_path):
    """Torch runs the first `ninja` on PATH. One of another version than install.sh's reads the build as
    stale and recompiles it inside a fit (about a minute); nodes and shells differ in their PATH."""
    system = "/usr/local/bin:/usr/bin:/bin"
    path = system if first_on_path == "system" else f"{Path(sys.executable).parent}:{system}"
    code = ("import subprocess; from sprec_ray.runtime import extension_cache, use_prebuilt_extensions; "
            "use_prebuilt_extensions(); print(subprocess.run(['ninja', '-n', '-d', 'explain'], "
            "cwd=extension_cache() / 'deepspeed_shm_comm', capture_output=True, text=True, check=True).stdout)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PATH": path}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no work to do" in done.stdout, done.stdout + done.stderr
