import math

import pytest
import torch

from runner.algo.loss import ADV_EPS, BatchNorm, LossConfig, advantages, aggregate, policy_loss, token_logprobs


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = advantages(r, g, "group")
    std0 = math.sqrt(0.25 * 0.75)  # population std of [1,0,0,0]
    assert adv[0].item() == pytest.approx(0.75 / (std0 + ADV_EPS))
    assert adv[1].item() == pytest.approx(-0.25 / (std0 + ADV_EPS))
    assert adv[4:].tolist() == [0.0, 0.0]  # all-equal group: no signal


def test_one_success_in_24_gives_4_8():
    r = torch.zeros(24)
    r[0] = 1
    adv = advantages(r, torch.zeros(24, dtype=torch.long), "group")
    assert adv[0].item() == pytest.approx(math.sqrt(23), rel=1e-3)  # = 4.80
    clipped = advantages(r, torch.zeros(24, dtype=torch.long), "group", adv_clip=2.0)
    assert clipped[0].item() == 2.0


def test_scale_none_and_batch():
    r = torch.tensor([1.0, 0.0, 2.0, 0.0])
    g = torch.tensor([0, 0, 1, 1])
    assert advantages(r, g, "none").tolist() == [0.5, -0.5, 1.0, -1.0]
    bstd = r.std(correction=0).item()
    assert advantages(r, g, "batch")[2].item() == pytest.approx(1.0 / (bstd + ADV_EPS))


def hand_loss(logp, old, adv, mask, lo, hi, agg, max_len):
    """The clipped surrogate written out token by token with Python floats."""
    B = len(logp)
    per_seq, tok_sum, n_tok = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            v = -min(ratio * adv[i], min(max(ratio, 1 - lo), 1 + hi) * adv[i])
            s += v
            n += 1
        per_seq.append((s, n))
        tok_sum += s
        n_tok += n
    if agg == "token-mean":
        return tok_sum / n_tok
    if agg == "seq-mean-token-mean":
        return sum(s / n for s, n in per_seq) / B
    return sum(s / max_len for s, _ in per_seq) / B


LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
OLD = [[-1.5, -0.4, -2.0], [-0.1, -1.0, -1.5]]
ADV = [1.5, -0.8]
MASK = [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss_matches_hand_computation(agg, lo, hi):
    logp = torch.tensor(LOGP)
    mask = torch.tensor(MASK)
    norm = BatchNorm(tokens=5.0, seqs=2.0, max_len=4.0)
    loss, stats = policy_loss(logp, torch.tensor(OLD), torch.tensor(ADV), mask, torch.zeros(2, 3),
                              LossConfig(lo, hi, agg), norm)
    assert loss.item() == pytest.approx(hand_loss(LOGP, OLD, ADV, MASK, lo, hi, agg, 4.0), rel=1e-6)
    # ratios: exp(0.5)=1.65 with A>0 is clipped high; exp(-0.2)=0.82 with A<0 is inside [0.8,..]
    # exp(-0.2)... token (1,0); exp(-0.2) for (1,1); exp(0.8)=2.2 with A<0: unclipped side wins
    assert stats["clip_frac/high"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac/low"].item() == pytest.approx(0.0)


def test_gradient_at_ratio_one_is_minus_advantage_over_length():
    # With old = current, d loss / d logp_it = -A_i / (len_i * B) for seq-mean-token-mean.
    logp = torch.tensor(LOGP, requires_grad=True)
    mask = torch.tensor(MASK)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor(ADV), mask, torch.zeros(2, 3),
                          LossConfig(), BatchNorm(5.0, 2.0, 3.0))
    loss.backward()
    expected = [[-1.5 / (2 * 2), -1.5 / (2 * 2), 0.0], [0.8 / (3 * 2)] * 3]
    assert logp.grad.tolist() == [pytest.approx(row) for row in expected]


def test_clipped_tokens_get_no_gradient():
    logp = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 > 1.2 with A > 0
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), torch.zeros(1, 1),
                          LossConfig(), BatchNorm(1.0, 1.0, 1.0))
    loss.backward()
    assert logp.grad.item() == 0.0


def test_entropy_bonus_lowers_the_loss_by_coef_times_entropy():
    logp = torch.tensor(LOGP)
    ent = torch.tensor([[2.0, 1.0, 9.0], [0.5, 0.5, 0.5]])
    norm = BatchNorm(5.0, 2.0, 3.0)
    base, _ = policy_loss(logp, logp, torch.tensor(ADV), torch.tensor(MASK), ent, LossConfig(), norm)
    bonus, _ = policy_loss(logp, logp, torch.tensor(ADV), torch.tensor(MASK), ent,
                           LossConfig(entropy_coef=0.1), norm)
    mean_ent = ((2.0 + 1.0) / 2 + 0.5) / 2
    assert (base - bonus).item() == pytest.approx(0.1 * mean_ent)


def test_aggregate_sums_over_micro_batches():
    vals = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    norm = BatchNorm(5.0, 2.0, 3.0)
    for how in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate(vals, mask, how, norm)
        parts = aggregate(vals[:1], mask[:1], how, norm) + aggregate(vals[1:], mask[1:], how, norm)
        assert whole.item() == pytest.approx(parts.item())


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    logp, ent = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert logp[0, 0].item() == pytest.approx(math.log(0.5))
    assert logp[0, 1].item() == pytest.approx(math.log(0.75))
    assert ent[0, 0].item() == pytest.approx(math.log(2))
    assert ent[0, 1].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_loss_temperature_divides_the_logits():
    """algo.loss_temperature: the loss's log-probs and entropy are those of softmax(z / T),
    the distribution rollouts sampled at temperature T came from (TRL's and verl's choice)."""
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]])
    targets = torch.tensor([[0, 2]])
    lp1, ent1 = token_logprobs(logits, targets)
    lp15, ent15 = token_logprobs(logits, targets, temperature=1.5)
    ref_lp, ref_ent = token_logprobs(logits / 1.5, targets)
    torch.testing.assert_close(lp15, ref_lp)
    torch.testing.assert_close(ent15, ref_ent)
    assert (ent15 > ent1).all() and (lp15 < lp1).all()  # flatter distribution, the argmax less likely


def test_lr_schedules_follow_the_hugging_face_formulas():
    from runner.algo.loss import lr_factor

    assert [lr_factor("constant", s, 4) for s in (1, 4)] == [1.0, 1.0]
    assert [lr_factor("linear", s, 4) for s in (1, 2, 3, 4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [lr_factor("cosine", s, 4) for s in (1, 3)] == pytest.approx([1.0, 0.5])
    # warm-up: linear from 1/(w+1) to 1, then the schedule over the remaining steps
    assert [lr_factor("linear", s, 6, warmup=2) for s in (1, 2, 3, 4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75])
    with pytest.raises(ValueError, match="algo.lr_schedule='step'"):
        lr_factor("step", 1, 4)
