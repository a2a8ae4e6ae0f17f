"""Each preset in conf/algo and each exploration control: loss and gradient equal values
computed by hand here (the formula is written out in each test)."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF
from runner.algo.loss import (AdaptiveEntropy, BatchNorm, LossConfig, advantages, kl_estimate, overlong_penalty,
                               policy_loss, top_entropy_mask)
from runner.config import ConfigError, validate

LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
OLD = [[-1.5, -0.4, -2.0], [-0.1, -1.0, -1.5]]
ADV = [1.5, -0.8]
MASK = [[1, 1, 0], [1, 1, 1]]
LENS = [2, 3]
B = 2


def preset(name, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return validate(compose("config", overrides=[f"algo={name}", *overrides])).algo


def run_loss(cfg, norm=BatchNorm(5.0, 2.0, 4.0), **kw):
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), torch.zeros(2, 3),
                              cfg, norm, **kw)
    loss.backward()
    return loss.item(), logp.grad, stats


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def test_grpo_preset_is_symmetric_ppo_seq_mean():
    a = preset("grpo")
    assert (a.clip_low, a.clip_high, a.loss_agg, a.scale_rewards, a.baseline) == (0.2, 0.2, "seq-mean-token-mean", "group", "mean")
    loss, grad, _ = run_loss(LossConfig.from_algo(a))
    # per token: -min(r A, clip(r, .8, 1.2) A); mean over each sequence's tokens, then over sequences
    exp = 0.0
    g = [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        for t in range(3):
            if not MASK[i][t]:
                continue
            r = math.exp(LOGP[i][t] - OLD[i][t])
            un, cl = r * ADV[i], clip(r, 0.8, 1.2) * ADV[i]
            exp += -min(un, cl) / LENS[i] / B
            # gradient flows only through the unclipped branch when it is the min
            g[i][t] = (-r * ADV[i] / LENS[i] / B) if un <= cl else 0.0
    assert loss == pytest.approx(exp)
    assert grad.tolist() == [pytest.approx(row) for row in g]


def test_dr_grpo_preset_no_std_and_constant_normaliser():
    a = preset("dr_grpo", "rollout.max_new_tokens=4")
    assert a.scale_rewards == "none" and a.loss_agg == "seq-mean-token-sum-norm"
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert advantages(r, torch.zeros(4, dtype=torch.long), a.scale_rewards).tolist() == [0.5, -0.5, -0.5, 0.5]
    loss, grad, _ = run_loss(LossConfig.from_algo(a), BatchNorm(5.0, 2.0, 4.0))
    # d loss / d logp at unclipped tokens = -r A / (max_len * B): 4 is max_new_tokens, not the length
    r10 = math.exp(LOGP[1][0] - OLD[1][0])
    assert grad[1, 0].item() == pytest.approx(-r10 * ADV[1] / 4 / B)


def test_dapo_preset_clip_higher_token_mean():
    a = preset("dapo")
    assert (a.clip_low, a.clip_high, a.loss_agg) == (0.2, 0.28, "token-mean")
    assert a.dynamic_sampling.enabled and a.overlong.enabled and a.kl.coef == 0
    loss, grad, stats = run_loss(LossConfig.from_algo(a))
    exp = sum(-min(math.exp(LOGP[i][t] - OLD[i][t]) * ADV[i], clip(math.exp(LOGP[i][t] - OLD[i][t]), 0.8, 1.28) * ADV[i])
              for i in range(2) for t in range(3) if MASK[i][t]) / 5
    assert loss == pytest.approx(exp)
    # r = e^0.5 = 1.65 > 1.28 with A > 0: clipped high, no gradient; r = e^-0.1 = 0.905 inside: -r A / 5
    assert grad[0, 0].item() == 0.0
    assert grad[0, 1].item() == pytest.approx(-math.exp(-0.1) * 1.5 / 5)
    assert stats["clip_frac/high"].item() == pytest.approx(1 / 5)


def test_cispo_preset_keeps_gradient_of_clipped_tokens():
    a = preset("cispo")
    assert a.clip_mode == "cispo" and a.clip_low is None and a.clip_high == 0.28
    loss, grad, _ = run_loss(LossConfig.from_algo(a))
    # per token: -sg(clip(r, 0, 1.28)) A logp, token-mean over 5 tokens; grad = -clip(r) A / 5
    exp, g = 0.0, [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        for t in range(3):
            if MASK[i][t]:
                w = clip(math.exp(LOGP[i][t] - OLD[i][t]), 0.0, 1.28)
                exp += -w * ADV[i] * LOGP[i][t] / 5
                g[i][t] = -w * ADV[i] / 5
    assert loss == pytest.approx(exp)
    assert grad.tolist() == [pytest.approx(row) for row in g]
    assert grad[0, 0].item() == pytest.approx(-1.28 * 1.5 / 5)  # PPO would give 0 here


def test_gspo_preset_uses_one_ratio_per_sequence():
    a = preset("gspo")
    assert a.ratio_level == "sequence" and (a.clip_low, a.clip_high) == (0.0003, 0.0004)
    wide = LossConfig(clip_low=0.5, clip_high=0.5, ratio_level="sequence")
    loss, grad, _ = run_loss(wide)
    # s_i = exp(mean_t(logp - old)); loss_i = -min(s A, clip(s) A); mean over sequences
    exp, g = 0.0, [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        toks = [t for t in range(3) if MASK[i][t]]
        s = math.exp(sum(LOGP[i][t] - OLD[i][t] for t in toks) / len(toks))
        un, cl = s * ADV[i], clip(s, 0.5, 1.5) * ADV[i]
        exp += -min(un, cl) / B
        for t in toks:
            g[i][t] = (-s * ADV[i] / len(toks) / B) if un <= cl else 0.0
    assert loss == pytest.approx(exp)
    assert grad.tolist() == [pytest.approx(row) for row in g]
    # with the preset's tiny range both sequences are outside it
    _, grad, stats = run_loss(LossConfig.from_algo(a))
    assert stats["clip_frac/total"].item() > 0


def test_rloo_preset_leave_one_out_baseline():
    a = preset("rloo")
    assert a.baseline == "loo" and a.scale_rewards == "none"
    r = torch.tensor([1.0, 0.0, 0.0, 2.0])
    adv = advantages(r, torch.zeros(4, dtype=torch.long), a.scale_rewards, baseline=a.baseline)
    # A_i = r_i - mean of the other three
    assert adv.tolist() == pytest.approx([1 - 2 / 3, 0 - 1, 0 - 1, 2 - 1 / 3])


def test_adv_clip_switch():
    r = torch.zeros(24)
    r[0] = 1
    a = preset("grpo", "algo.adv_clip=2.0")
    assert advantages(r, torch.zeros(24, dtype=torch.long), a.scale_rewards, a.adv_clip)[0].item() == 2.0


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_by_hand(est):
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    lr = [-1.5 - -1.0, -1.0 - -2.0]  # log(ref/pi)
    want = {"k1": [-x for x in lr], "k2": [0.5 * x * x for x in lr], "k3": [math.exp(x) - x - 1 for x in lr]}[est]
    assert kl_estimate(logp, ref, est).tolist() == pytest.approx(want)


def test_kl_term_adds_coef_times_kl():
    base, _, _ = run_loss(LossConfig())
    ref = torch.tensor(OLD)
    with_kl, _, stats = run_loss(LossConfig(kl_coef=0.5, kl_estimator="k1"), ref_logp=ref)
    kl = sum((LOGP[i][t] - OLD[i][t]) / LENS[i] for i in range(2) for t in range(3) if MASK[i][t]) / B
    assert stats["kl"].item() == pytest.approx(kl)
    assert with_kl - base == pytest.approx(0.5 * kl)


def test_top_entropy_mask_keeps_the_top_fraction():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    kept = top_entropy_mask(ent, mask, 0.25)
    # 7 valid tokens; the 0.75-quantile of them is 0.8 -> tokens with entropy >= 0.8 (9.0 is padding)
    assert kept.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert top_entropy_mask(ent, mask, 1.0).tolist() == mask.bool().tolist()


def test_top_entropy_pg_mask_removes_gradient_of_other_tokens():
    pg = torch.tensor([[False, True, False], [False, False, True]])
    _, grad, stats = run_loss(LossConfig(), pg_mask=pg)
    full = run_loss(LossConfig())[1]
    assert grad[0, 0].item() == 0.0 and grad[1, 0].item() == 0.0 and full[1, 0].item() != 0.0
    # kept tokens keep their gradient (normalisation is the whole sequence's, as before)
    assert grad[0, 1].item() == pytest.approx(full[0, 1].item()) != 0.0
    assert grad[1, 2].item() == pytest.approx(full[1, 2].item()) != 0.0
    assert stats["pg_token_frac"].item() == pytest.approx(2 / 5)


def test_entropy_scope_mask_limits_the_bonus():
    ent = torch.tensor([[2.0, 1.0, 9.0], [0.5, 0.5, 0.5]])
    norm = BatchNorm(5.0, 2.0, 3.0)
    logp = torch.tensor(LOGP)
    args = (logp, logp, torch.tensor(ADV), torch.tensor(MASK), ent)
    base, _ = policy_loss(*args, LossConfig(), norm)
    answer_only = torch.tensor([[True, False, False], [False, False, False]])
    scoped, _ = policy_loss(*args, LossConfig(entropy_coef=0.1), norm, entropy_mask=answer_only)
    # seq-mean-token-mean over the answer tokens: seq 0 has one (H=2), seq 1 none (0)
    assert (base - scoped).item() == pytest.approx(0.1 * (2.0 / 1 + 0.0) / 2)


def test_adaptive_entropy_schedule():
    ctl = AdaptiveEntropy(coef=0.002, target=0.5, delta=0.001, lo=0.0, hi=0.003)
    assert ctl.effective(0.4) == 0.002 and ctl.effective(0.6) == 0.0  # applies only below target
    assert [ctl.update(h) for h in (0.4, 0.4, 0.6, 0.6, 0.6, 0.6)] == pytest.approx(
        [0.003, 0.003, 0.002, 0.001, 0.0, 0.0])


def test_overlong_penalty_values():
    # max 16, buffer 4: no penalty up to 12, then -(len - 12)/4
    pen = overlong_penalty(torch.tensor([5, 12, 13, 14, 16, 20]), 16, 4, 1.0)
    assert pen.tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0, -1.0])


@pytest.mark.parametrize(
    "override,first_line",
    [
        ("algo.clip_low=1.0", "algo.clip_low=1.0: must be in [0, 1)"),
        ("algo.clip_low=-0.1", "algo.clip_low=-0.1: must be in [0, 1)"),
        ("algo.entropy.coef=-0.01", "algo.entropy.coef=-0.01: must be >= 0"),
        ("algo.kl.coef=-1", "algo.kl.coef=-1.0: must be >= 0"),
        ("algo.top_entropy_quantile=0", "algo.top_entropy_quantile=0.0: must be in (0, 1]"),
        ("algo.top_entropy_quantile=1.5", "algo.top_entropy_quantile=1.5: must be in (0, 1]"),
        ("algo.kl.estimator=k4", "algo.kl.estimator='k4': must be one of k1, k2, k3"),
        ("algo.entropy.scope=tail", "algo.entropy.scope='tail': must be one of all, answer"),
        ("algo.overlong.buffer=16", "algo.overlong.buffer=16: must be < rollout.max_new_tokens (8)"),
    ],
)
def test_invalid_combinations_fail_before_loading(override, first_line):
    with pytest.raises(ConfigError) as e:
        preset("dapo", override)
    assert str(e.value).startswith(first_line)
