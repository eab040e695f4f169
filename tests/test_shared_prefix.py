"""Prefix-shared preference batches against the one-row-per-response layout (no Ray)."""

from __future__ import annotations

import pytest
import torch

from sprec_ray.config import load_config
from sprec_ray.train.batching import Encoder, PairRow, collate_pairs, encode_pair_batch, split_pair_logps
from sprec_ray.train.losses import IGNORE, sequence_logps
from sprec_ray.train.objectives import PreferenceObjective, response_logits
from sprec_ray.train.shared_prefix import collate_pairs_shared, use_prefix_sharing


def test_layout_masks_positions_and_label_indices_by_hand():
    rows = [PairRow(0, (5, 6, 7), (1, 2), ((3,),)), PairRow(1, (8,), (4,), ((9, 9),))]
    b = collate_pairs_shared(rows, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 3], [0, 0, 8, 4, 9, 9]]
    # each response restarts at len(prompt)
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 0, 0, 1, 1, 2]]
    assert b.keep == 4 and b.num_tokens == 10
    # collate_pairs' order: chosen of rows 0, 1, then rejected of rows 0, 1
    assert b.labels.tolist() == [[1, 2], [IGNORE, 4], [IGNORE, 3], [9, 9]]
    assert b.rows.tolist() == [0, 1, 0, 1]
    # kept logits are columns 2..5; the first token of a response is predicted by the prompt's last one
    assert b.logit_index[0].tolist() == [0, 1] and b.logit_index[1, 1] == 0
    assert b.logit_index[2, 1] == 0 and b.logit_index[3].tolist() == [0, 2]
    t, f = True, False
    assert b.allowed[0, 5].tolist() == [t, t, t, f, f, t]  # rejected sees the prompt and itself, not the chosen
    assert b.allowed[0, 4].tolist() == [t, t, t, t, t, f]
    assert b.allowed[1, 0].tolist() == [t, f, f, f, f, f]  # a pad query sees only itself (no NaN rows)
    assert b.allowed[1, 5].tolist() == [f, f, t, f, t, t]
    mask = b.model_inputs()["attention_mask"]
    assert mask.shape == (2, 1, 6, 6) and mask[0, 0, 5, 3] == torch.finfo(torch.float32).min and mask[0, 0, 5, 0] == 0


def test_auto_turns_sharing_on_only_where_the_attention_takes_a_4d_mask():
    assert use_prefix_sharing("auto", "sdpa") and use_prefix_sharing("auto", "eager")
    assert not use_prefix_sharing("auto", "flash_attention_2") and not use_prefix_sharing("off", "sdpa")


@pytest.fixture(scope="module")
def pair_rows(tiny_model_dir):
    """Left-padded rows of different prompt and response lengths, K = 3 negatives each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = {"row_id": [3, 7, 9],
             "prompt": ["Short prompt:\n", "A much longer prompt about books, and more books, and more:\n", "Mid prompt here:\n"],
             "response": ['"Alpha Beta Gamma"', '"B"', '"Some Title (Series, #2)"'],
             "rejected": [['"C"', '"Delta Epsilon"', '"F"'], ['"Gee Whiz"', '"H"', '"I J K L M"'], ['"N"', '"O"', '"Pq"']]}
    return encode_pair_batch(batch, Encoder(tokenizer, 64, 48), 3), tokenizer.pad_token_id


def _model(tiny_model_dir, dtype: torch.dtype, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation=attn).eval()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_logps_equal_separate_rows_in_fp32(pair_rows, tiny_model_dir, k, attn):
    rows, pad = pair_rows
    rows = [PairRow(r.row_id, r.prompt, r.chosen, r.rejected[:k]) for r in rows]
    model = _model(tiny_model_dir, torch.float32, attn)
    with torch.no_grad():
        separate = collate_pairs(rows, pad)
        shared = collate_pairs_shared(rows, pad)
        want = sequence_logps(response_logits(model, separate), separate.labels)
        got = sequence_logps(response_logits(model, shared), shared.labels)
    assert torch.equal(shared.labels, separate.labels)
    assert (got - want).abs().max().item() <= 1e-4
    assert shared.num_tokens < separate.num_tokens  # the prompt once, not 1 + K times


def test_shared_logps_in_bf16_within_the_stated_tolerance(pair_rows, tiny_model_dir):
    """bf16 has 8 mantissa bits: two summation orders of a ~10-token log-prob differ by up to ~0.1 nats."""
    rows, pad = pair_rows
    model = _model(tiny_model_dir, torch.bfloat16)
    with torch.no_grad():
        separate = collate_pairs(rows, pad)
        shared = collate_pairs_shared(rows, pad, torch.bfloat16)
        want = sequence_logps(response_logits(model, separate), separate.labels)
        got = sequence_logps(response_logits(model, shared), shared.labels)
    assert (got - want).abs().max().item() <= 0.1


@pytest.mark.parametrize("loss", ["dpo", "sdpo"])
def test_one_step_loss_and_gradients_match_separate_rows(pair_rows, tiny_model_dir, loss):
    from sprec_ray.config import LoraConfig
    from sprec_ray.train.engine import build_policy, trainable_parameters

    rows, pad = pair_rows
    k = 1 if loss == "dpo" else 3
    rows = [PairRow(r.row_id, r.prompt, r.chosen, r.rejected[:k]) for r in rows]
    policy = build_policy(tiny_model_dir, LoraConfig(r=4, alpha=8, dropout=0.0), None, "float32", seed=0)
    objectives, grads, losses = {}, {}, {}
    for layout in ("on", "off"):
        cfg = load_config(None, [f"dpo.loss={loss}", f"dpo.num_negatives={k}", f"train.prefix_sharing={layout}"])
        objectives[layout] = PreferenceObjective(cfg, rows, pad, torch.device("cpu"))
        objectives[layout].prepare(policy)
    with torch.no_grad():  # move off the reference, so rewards and their gradients are not trivially 0
        generator = torch.Generator().manual_seed(0)
        for _, p in trainable_parameters(policy):
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    for layout, objective in objectives.items():
        policy.zero_grad()
        total, stats, _ = objective.loss(policy, range(len(rows)))
        total.backward()
        losses[layout] = (total.item(), {n: v.item() for n, v in stats.items()})
        grads[layout] = {n: p.grad.clone() for n, p in trainable_parameters(policy)}
    assert objectives["on"].ref.keys() == objectives["off"].ref.keys()
    for row_id, (chosen, rejected) in objectives["on"].ref.items():
        assert torch.allclose(chosen, objectives["off"].ref[row_id][0], atol=1e-4)
        assert torch.allclose(rejected, objectives["off"].ref[row_id][1], atol=1e-4)
    assert losses["on"][0] == pytest.approx(losses["off"][0], abs=1e-5) and losses["on"][0] > 0
    for name, value in losses["off"][1].items():
        assert losses["on"][1][name] == pytest.approx(value, abs=1e-5), name
    for name, g in grads["off"].items():
        assert g.abs().max() > 0
        torch.testing.assert_close(grads["on"][name], g, atol=1e-5, rtol=1e-3)


def test_split_pair_logps_reads_the_shared_order(pair_rows):
    rows, pad = pair_rows
    b = collate_pairs_shared(rows, pad)
    chosen, rejected = split_pair_logps(b.labels[:, -2].float(), len(rows))  # the token before each EOS
    assert chosen.tolist() == [float(r.chosen[-2]) for r in rows]
    assert rejected.tolist() == [[float(x[-2]) for x in r.rejected] for r in rows]


@pytest.mark.parametrize("layout", ["on", "off"])
def test_bf16_engine_stores_frozen_linears_in_bf16_with_the_same_logits(pair_rows, tiny_model_dir, layout):
    """Under bf16 autocast the frozen base Linear weights, the tied LM head included, are kept in bf16
    (autocast would cast them on every forward); the input embedding stays fp32, and the logits are
    bit-identical to fp32 weights."""
    from sprec_ray.train.engine import build_engine, build_policy

    rows, pad = pair_rows
    cfg = load_config(None, ["dpo.loss=sdpo", "dpo.num_negatives=3", f"train.prefix_sharing={layout}",
                             "train.mixed_precision=bf16", "lora.dropout=0.0"])
    engine = build_engine(tiny_model_dir, cfg, None, 1e-3, 3, 1, torch.device("cpu"))
    reference = build_policy(tiny_model_dir, cfg.lora, None, "float32", cfg.seed)
    frozen = [m.weight for m in engine.peft_model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert len(frozen) == len([m for m in reference.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad])
    assert all(w.dtype == torch.bfloat16 for w in frozen)
    assert engine.peft_model.get_input_embeddings().weight.dtype == torch.float32
    batch = PreferenceObjective(cfg, rows, pad, torch.device("cpu")).collate(rows)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(**batch.model_inputs()).logits
    with torch.no_grad():
        assert torch.equal(engine(**batch.model_inputs()).logits, expected)


@pytest.mark.parametrize("layout", ["on", "off"])
def test_bf16_mixed_precision_runs_the_forward_in_bf16_and_keeps_fp32_weights(pair_rows, tiny_model_dir, layout):
    """train.mixed_precision=bf16: the engine's forward under autocast (bf16 logits), LoRA weights and
    their gradients stay fp32, and the DPO loss stays within bf16's tolerance of the fp32 one."""
    from sprec_ray.train.engine import build_engine, trainable_parameters

    rows, pad = pair_rows
    losses = {}
    for precision in ("none", "bf16"):
        cfg = load_config(None, ["dpo.loss=sdpo", "dpo.num_negatives=3", f"train.prefix_sharing={layout}",
                                 f"train.mixed_precision={precision}", "lora.dropout=0.0"])
        engine = build_engine(tiny_model_dir, cfg, None, 1e-3, 3, 1, torch.device("cpu"))
        objective = PreferenceObjective(cfg, rows, pad, torch.device("cpu"))
        objective.prepare(engine)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for _, p in trainable_parameters(engine.peft_model):
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        batch = objective.collate(rows)
        assert engine(**batch.model_inputs()).logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        total, _, _ = objective.loss(engine, range(len(rows)))
        engine.backward(total)
        params = trainable_parameters(engine.peft_model)
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for _, p in params)
        losses[precision] = total.item()
    assert losses["bf16"] == pytest.approx(losses["none"], abs=0.05) and losses["none"] > 0
