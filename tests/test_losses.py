"""Fast tests of the loss functions, tokenisation/batching and schedule helpers (no Ray)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sprec_ray.data.records import DataError
from sprec_ray.train.batching import (
    Encoder,
    PairRow,
    SFTRow,
    collate,
    collate_pairs,
    collate_sft,
    encode_pair_batch,
    encode_sft_batch,
    group_steps,
    plan_epoch,
    plan_epoch_tokens,
    split_pair_logps,
    split_to_count,
)
from sprec_ray.train.loop import Hyper, StepPlan, lr_at
from sprec_ray.train.losses import (
    IGNORE,
    cft_loss_sum,
    cft_token_weights,
    dpo_loss,
    sdpo_loss,
    sequence_logps,
    sft_loss_sum,
    token_logps,
)
from sprec_ray.train.objectives import cft_weight_sum
from sprec_ray.train.phases import summarize

# ---------------------------------------------------------------- DPO / S-DPO


def _logps(b, k, seed=0, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale - 20 for shape in [(b,), (b, k), (b,), (b, k)]]


def test_sdpo_with_one_negative_equals_dpo():
    pc, pr, rc, rr = _logps(64, 1)
    for beta in (0.1, 1.0, 3.0):
        assert torch.allclose(sdpo_loss(pc, pr, rc, rr, beta), dpo_loss(pc, pr[:, 0], rc, rr[:, 0], beta), atol=1e-6, rtol=1e-6)


def test_dpo_matches_its_formula():
    pc, pr, rc, rr = _logps(8, 1, seed=1)
    margin = (pc - rc) - (pr[:, 0] - rr[:, 0])
    expected = -torch.log(torch.sigmoid(0.1 * margin.double()))
    assert torch.allclose(dpo_loss(pc, pr[:, 0], rc, rr[:, 0], 0.1).double(), expected, atol=1e-6)


def test_sdpo_stays_finite_for_huge_reward_gaps():
    zeros = torch.zeros(2)
    chosen = torch.tensor([1e4, -1e4], requires_grad=True)
    rejected = torch.tensor([[-1e4, -1e4, 0.0], [1e4, 1e4, 0.0]], requires_grad=True)
    loss = sdpo_loss(chosen, rejected, zeros, torch.zeros(2, 3), beta=1.0)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)  # chosen far ahead of every negative
    # chosen 2e4 behind two negatives: softplus(log 2 + 2e4) ~= 2e4 + log 2
    assert loss[1].item() == pytest.approx(2e4 + math.log(2), rel=1e-6)
    loss.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def _sdpo_reference_float64(pc, pr, rc, rr, beta):
    # The S-DPO repo's literal form: -log sigmoid(-log(sum(exp(beta * (r_k - r_w))))).
    r_w = (pc - rc).unsqueeze(-1)
    inner = torch.log(torch.exp(beta * ((pr - rr) - r_w)).sum(-1))
    return -torch.log(torch.sigmoid(-inner))


@pytest.mark.parametrize("k", [1, 3])
def test_sdpo_gradient_matches_float64_reference(k):
    pc, pr, rc, rr = _logps(16, k, seed=2, scale=1.0)
    beta = 0.7
    x32 = [t.clone().requires_grad_(True) for t in (pc, pr)]
    sdpo_loss(x32[0], x32[1], rc, rr, beta).sum().backward()
    x64 = [t.double().clone().requires_grad_(True) for t in (pc, pr)]
    _sdpo_reference_float64(x64[0], x64[1], rc.double(), rr.double(), beta).sum().backward()
    for a, b in zip(x32, x64, strict=True):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-6, rtol=1e-5)


def test_sdpo_gradient_is_analytic_at_large_gaps():
    # dL/dr_k = beta * sigmoid(z) * softmax_k, dL/dr_w = -beta * sigmoid(z), z = logsumexp(beta (r_k - r_w)).
    beta = 2.0
    chosen = torch.tensor([-300.0], requires_grad=True)
    rejected = torch.tensor([[100.0, 90.0, -50.0]], requires_grad=True)
    sdpo_loss(chosen, rejected, torch.zeros(1), torch.zeros(1, 3), beta).sum().backward()
    d = beta * (rejected.detach().double() - chosen.detach().double())
    z = torch.logsumexp(d, -1)
    assert torch.allclose(chosen.grad.double(), -beta * torch.sigmoid(z), rtol=1e-6)
    assert torch.allclose(rejected.grad.double(), beta * torch.sigmoid(z).unsqueeze(-1) * torch.softmax(d, -1), rtol=1e-5, atol=1e-12)


def test_sdpo_rejects_unbatched_negatives():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sdpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1)


# ---------------------------------------------------------------- SFT / CFT


def _labels(lengths, r_max, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((len(lengths), r_max), IGNORE)
    for i, n in enumerate(lengths):
        labels[i, r_max - n:] = torch.randint(0, vocab, (n,), generator=g)
    return labels


def test_token_logps_and_sft_loss_ignore_padding():
    labels = _labels([3, 1, 4], 4)
    logits = torch.randn(3, 4, 11)
    total, count = sft_loss_sum(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert count.item() == 8 and torch.allclose(total, expected, atol=1e-5)
    assert (token_logps(logits, labels)[labels == IGNORE] == 0).all()
    assert torch.allclose(sequence_logps(logits, labels), token_logps(logits, labels).sum(-1))


def test_cft_weights_decay_linearly_and_one_token_gets_weight_one():
    w = cft_token_weights(_labels([5, 1, 2], 6), beta=0.25)
    assert w[0].tolist() == pytest.approx([0, 1, 0.8125, 0.625, 0.4375, 0.25])
    assert w[1].tolist() == pytest.approx([0, 0, 0, 0, 0, 1.0])
    assert w[2].tolist() == pytest.approx([0, 0, 0, 0, 1.0, 0.25])
    assert torch.isfinite(w).all()
    for n in (1, 2, 5, 17):
        assert cft_weight_sum(n, 0.3) == pytest.approx(cft_token_weights(_labels([n], n), 0.3).sum().item())


def test_cft_loss_matches_a_per_token_float64_reference():
    lengths, alpha, beta = [4, 1, 3], 0.1, 0.25
    labels = _labels(lengths, 4, seed=3)
    zf, zc = torch.randn(3, 4, 11), torch.randn(3, 4, 11)
    total, wsum, factual = cft_loss_sum(zf, zc, labels, alpha, beta)
    num, den, fac = 0.0, 0.0, 0.0
    for b, n in enumerate(lengths):
        for t in range(1, n + 1):
            j = 4 - n + t - 1
            w = 1.0 if n == 1 else 1 - (t - 1) * (1 - beta) / (n - 1)
            y = labels[b, j]
            ce_f = -torch.log_softmax(zf[b, j].double(), -1)[y]
            ce_te = -torch.log_softmax((zf[b, j] - zc[b, j]).double(), -1)[y]
            num += w * (ce_f + alpha * ce_te).item()
            fac += w * ce_f.item()
            den += w
    assert total.item() == pytest.approx(num, rel=1e-5)
    assert wsum.item() == pytest.approx(den) and factual.item() == pytest.approx(fac, rel=1e-5)


def test_cft_with_a_constant_counterfactual_is_scaled_factual_loss():
    # CE is shift-invariant, so zC constant over the vocabulary makes the TE term equal the factual one.
    labels = _labels([2, 3], 3, seed=4)
    zf = torch.randn(2, 3, 11)
    total, wsum, factual = cft_loss_sum(zf, torch.full_like(zf, 3.0), labels, alpha=0.5, beta=0.25)
    assert total.item() == pytest.approx(1.5 * factual.item(), rel=1e-5)


# ---------------------------------------------------------------- tokenisation and batching


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_long_prompt_is_cut_from_the_left_and_response_kept(tokenizer):
    enc = Encoder(tokenizer, max_prompt_len=8, max_response_len=32)
    prompt = "The user has enjoyed the following books before: " + ", ".join(f'"Book {i}"' for i in range(30))
    rows = encode_sft_batch({"prompt": [prompt], "response": ['"Alpha"'], "row_id": [7]}, enc, counterfactual=False)
    full = tokenizer(prompt)["input_ids"]
    assert rows[0].prompt == tuple(full[-8:])
    assert rows[0].response == (*tokenizer('"Alpha"', add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)


def test_over_long_or_empty_response_is_an_error_naming_the_row(tokenizer):
    enc = Encoder(tokenizer, max_prompt_len=64, max_response_len=4)
    with pytest.raises(DataError, match=r"row 12: response .* over model.max_response_len=4"):
        encode_sft_batch({"prompt": ["p", "q"], "response": ['"A"', '"A very long title indeed"'], "row_id": [11, 12]}, enc, False)
    with pytest.raises(DataError, match="row 3: response is empty"):
        encode_sft_batch({"prompt": ["p"], "response": [""], "row_id": [3]}, enc, False)
    with pytest.raises(DataError, match="cf_prompt"):
        encode_sft_batch({"prompt": ["p"], "response": ['"A"']}, enc, counterfactual=True)


def test_pair_rows_check_the_number_of_negatives(tokenizer):
    enc = Encoder(tokenizer, 64, 16)
    batch = {"row_id": [4, 5], "prompt": ["p", "q"], "response": ['"A"', '"B"'], "rejected": [['"C"', '"D"'], ['"E"']]}
    with pytest.raises(DataError, match="row 5: 1 rejected responses, expected dpo.num_negatives=2"):
        encode_pair_batch(batch, enc, 2)
    batch["rejected"][1] = ['"E"', '"F"']
    rows = encode_pair_batch(batch, enc, 2)
    assert [r.row_id for r in rows] == [4, 5] and all(len(r.rejected) == 2 for r in rows)


def test_collate_right_aligns_responses_and_positions_start_at_zero():
    batch = collate([(5, 6, 7), (8,)], [(1, 2), (3, 4, 9)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch.position_ids[1].tolist() == [0, 0, 1, 2, 3]
    assert batch.labels.tolist() == [[IGNORE, 1, 2], [3, 4, 9]]
    assert batch.logits_to_keep == 4 and batch.num_tokens == 9


def test_cft_batches_share_response_columns_and_pairs_round_trip():
    rows = [SFTRow(0, (5, 6, 7), (1, 2), (9,)), SFTRow(1, (8,), (3, 4, 2), (9,))]
    factual, counterfactual = collate_sft(rows, pad_id=0)
    assert torch.equal(factual.labels, counterfactual.labels)
    assert counterfactual.input_ids.tolist() == [[0, 9, 1, 2], [9, 3, 4, 2]]
    pairs = [PairRow(0, (5,), (1,), ((2,), (3,))), PairRow(1, (6,), (4,), ((5,), (6,)))]
    logps = torch.arange(6.0)  # order: chosen rows, then negative 0 of each row, then negative 1
    assert collate_pairs(pairs, 0).labels[:, -1].tolist() == [1, 4, 2, 5, 3, 6]
    chosen, rejected = split_pair_logps(logps, 2)
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [[2, 4], [3, 5]]


def test_plan_epoch_covers_each_row_once_and_buckets_lengths():
    lengths = [(i * 37) % 101 + 5 for i in range(203)]
    batches = plan_epoch(lengths, batch_size=4, seed=0, epoch=0)
    assert len(batches) == math.ceil(203 / 4)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == plan_epoch(lengths, 4, seed=0, epoch=0) and batches != plan_epoch(lengths, 4, seed=0, epoch=1)

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    shuffled = plan_epoch(lengths, 4, seed=0, epoch=0, bucket_batches=1)  # no sorting beyond one batch
    assert padded(batches) < 0.8 * padded(shuffled)
    assert [len(s) for s in group_steps(batches, 16)] == [16, 16, 16, 3]


def test_token_budget_plan_packs_short_rows_densely_and_stays_under_budget():
    lengths = [(i * 37) % 101 + 5 for i in range(203)] + [500]  # one row alone is over the budget
    batches = plan_epoch_tokens(lengths, max_tokens=400, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(204))
    assert batches == plan_epoch_tokens(lengths, 400, seed=0, epoch=0) != plan_epoch_tokens(lengths, 400, seed=0, epoch=1)
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 400 or b == [203]
    sizes = {len(b): max(lengths[i] for i in b) for b in batches}
    assert max(sizes) >= 4 * min(sizes)  # short rows travel in much larger batches than long ones
    # ranks that packed fewer batches split their largest ones up to the global count; rows kept, in order
    more = split_to_count(batches, len(batches) + 5)
    assert len(more) == len(batches) + 5 and [i for b in more for i in b] == [i for b in batches for i in b]
    with pytest.raises(ValueError, match="cannot turn"):
        split_to_count([[0], [1]], 3)


def test_left_padded_batch_gives_the_same_logps_as_each_row_alone(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from sprec_ray.train.objectives import response_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    enc = Encoder(tokenizer, 64, 48)
    rows = encode_sft_batch({"prompt": ["Short prompt:\n", "A much longer prompt about books and more books:\n"],
                             "response": ['"Alpha Beta Gamma"', '"B"']}, enc, False)
    with torch.no_grad():
        together = sequence_logps(response_logits(model, collate_sft(rows, tokenizer.pad_token_id)[0]),
                                  collate_sft(rows, tokenizer.pad_token_id)[0].labels)
        for i, row in enumerate(rows):
            alone = collate([row.prompt], [row.response], tokenizer.pad_token_id)
            assert sequence_logps(response_logits(model, alone), alone.labels).item() == pytest.approx(together[i].item(), abs=1e-4)


# ---------------------------------------------------------------- schedule and summaries


def test_lr_warms_up_then_decays_and_is_never_zero():
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and min(lrs) > 0
    cpu = torch.device("cpu")
    plan = StepPlan([10] * 33, Hyper(1e-3, 2, 4, 4, 0, 0), 0, 0, cpu)
    assert (plan.per_epoch, plan.total) == (3, 6) and StepPlan([10] * 33, Hyper(1e-3, 2, 4, 4, 0, 5), 0, 0, cpu).total == 5
    assert [len(plan.step(s)) for s in range(6)] == [4, 4, 1] * 2  # the last step of an epoch holds the rest


def test_summarize_means_over_steps_and_skips_the_first_step_for_throughput():
    history = [{"loss": 3.0, "tokens": 100.0, "step_time_s": 10.0}, {"loss": 2.0, "tokens": 100.0, "step_time_s": 1.0},
               {"loss": 1.0, "tokens": 300.0, "step_time_s": 1.0}]
    out = summarize(history, {"loop_s": 14.0}, restored_from=1)
    assert out["loss"] == 2.0 and out["final_loss"] == 1.0 and out["first_loss"] == 3.0
    assert out["tokens_per_s"] == 200.0 and out["steps"] == 3 and out["restored_from_step"] == 1
    assert out["compute_s"] == 12.0 and out["loop_s"] == 14.0 and "wall_tokens_per_s" not in out
    for h, wall in zip(history, (11.0, 1.5, 2.5), strict=True):  # reports and logging between steps
        h["wall_s"] = wall
    assert summarize(history, {})["wall_tokens_per_s"] == 100.0


def test_bad_fit_setups_fail_before_any_worker_starts(tiny_model_dir, tmp_path):
    import importlib.util

    from sprec_ray.config import LoraConfig, load_config
    from sprec_ray.train.engine import build_policy
    from sprec_ray.train.phases import Stage, run_fit

    with pytest.raises(ValueError, match=r"distinct stage names, got \['r1', 'r1'\]"):
        run_fit(load_config(None), tiny_model_dir, [Stage("sft", "r1", None, tmp_path), Stage("dpo", "r1", None, tmp_path)],
                None, "dup")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="flash_attention_2 needs the flash-attn package"):
            build_policy(tiny_model_dir, LoraConfig(), None, "float32", 0, attn_implementation="flash_attention_2")


def test_preference_stats_report_both_log_ratios_so_displacement_shows():
    from sprec_ray.train.losses import preference_stats

    # both fall: the chosen by 1 nat, the rejected (mean of K=2) by 3; the margin alone looks healthy
    chosen, ref_c = torch.tensor([-11.0, -21.0]), torch.tensor([-10.0, -20.0])
    rejected, ref_r = torch.tensor([[-14.0, -12.0], [-13.0, -15.0]]), torch.tensor([[-10.0, -10.0], [-10.0, -12.0]])
    stats = preference_stats(chosen, rejected, ref_c, ref_r, beta=0.5)
    assert stats["chosen_logratio"].item() == pytest.approx(-2.0)
    assert stats["rejected_logratio"].item() == pytest.approx(-6.0)
    assert stats["reward_margin"].item() == pytest.approx(0.5 * (-2.0 + 6.0))
    assert stats["accuracy"].item() == 2.0
