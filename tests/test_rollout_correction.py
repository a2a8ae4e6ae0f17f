"""Rollout/training mismatch: the sampler's log-probs against the training forward, and the
truncated importance-sampling correction (algo.is_cap)."""

import math

import pytest
import torch

from runner.algo.loss import BatchNorm, LossConfig, policy_loss, rollout_correction
from runner.rollout.hf import concat, select, trim_completions


def test_weights_are_the_capped_ratio_and_masked_tokens_weigh_one():
    train = torch.tensor([[math.log(0.5), math.log(0.9), 0.0], [math.log(0.2), math.log(0.3), math.log(0.4)]])
    sampler = torch.tensor([[math.log(0.25), math.log(0.9), -5.0], [math.log(0.4), math.log(0.1), math.log(0.4)]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w, sums = rollout_correction(train, sampler, mask, cap=2.5)
    expected = torch.tensor([[2.0, 1.0, 1.0], [0.5, 2.5, 1.0]])  # 0.3 / 0.1 = 3 is capped at 2.5
    torch.testing.assert_close(w, expected)
    assert sums["tokens"] == 5 and sums["capped"] == 1
    assert sums["weight"] == pytest.approx(2.0 + 1.0 + 0.5 + 2.5 + 1.0)
    deltas = [math.log(2), 0.0, math.log(0.5), math.log(3), 0.0]
    assert sums["abs_delta"] == pytest.approx(sum(abs(d) for d in deltas))
    assert sums["k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in deltas))  # KL >= 0, 0 where equal
    w_none, sums_none = rollout_correction(train, sampler, mask, cap=None)
    assert w_none is None and sums_none["capped"] == 0
    assert sums_none["weight"] == pytest.approx(2.0 + 1.0 + 0.5 + 3.0 + 1.0)  # uncapped ratios


def test_loss_with_weights_of_one_is_the_uncorrected_loss_and_weights_scale_each_token():
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    old = logp.detach() + 0.05 * torch.randn(3, 4)
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.ones(3, 4)
    cfg, norm = LossConfig(), BatchNorm(tokens=12.0, seqs=3.0, max_len=4.0)
    plain, _ = policy_loss(logp, old, adv, mask, torch.zeros(3, 4), cfg, norm)
    ones, _ = policy_loss(logp, old, adv, mask, torch.zeros(3, 4), cfg, norm, is_weight=torch.ones(3, 4))
    assert ones.item() == plain.item()
    g_plain = torch.autograd.grad(plain, logp)[0]
    w = torch.rand(3, 4) + 0.5
    weighted, _ = policy_loss(logp, old, adv, mask, torch.zeros(3, 4), cfg, norm, is_weight=w)
    g_w = torch.autograd.grad(weighted, logp)[0]
    torch.testing.assert_close(g_w, g_plain * w)  # each token's gradient scaled by its weight


def test_sampler_logprobs_travel_with_select_trim_and_concat(tiny):
    from test_fast_paths import batch

    b = batch(tiny, n=6, group=3)
    s = select(b, [4, 1])
    torch.testing.assert_close(s.sampler_logprobs, b.sampler_logprobs[[4, 1]])
    t = trim_completions(s)
    assert t.sampler_logprobs.shape == t.completion_mask.shape
    c = concat([b, batch(tiny, n=3, group=3, seed=1)], tiny[1].pad_token_id)
    assert c.sampler_logprobs.shape == c.completion_mask.shape
    torch.testing.assert_close(c.sampler_logprobs[:len(b), :b.sampler_logprobs.shape[1]], b.sampler_logprobs)


def trainer(tmp_path, name, *overrides):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from runner.config import validate
    from runner.train import Trainer

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=[
            "model=tiny", "algo=grpo", "rollout.max_new_tokens=6", "algo.group_size=4", "env=dice",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", *overrides]))
    t = Trainer(cfg, tmp_path / name)
    t.setup()
    return t


def one_update(t, seed=0):
    torch.manual_seed(seed)
    b = t.rollout.generate(t.rollout_model, t.tok, t.env.prompts(0, 2), 4)
    adv = torch.randn(len(b))
    return t.update(b, adv, [None] * len(b))


def test_identical_weights_are_never_corrected(tmp_path):
    """fp32 rollouts from the training weights: the correction is exactly 1 (not applied), the
    logged mismatch is float noise, and the update equals the one with algo.is_cap=null."""
    on = trainer(tmp_path, "on", "rollout.dtype=float32")
    assert on.rollout_model is on.model and not on.learner.rollout_differs
    m = one_update(on)
    assert m["rollout/is_corrected"] == 0.0 and "rollout/is_weight_mean" not in m
    assert m["rollout/logp_abs_diff"] < 1e-4 and m["rollout/kl_sampler_train"] < 1e-6
    off = trainer(tmp_path, "off", "rollout.dtype=float32", "algo.is_cap=null")
    one_update(off)
    for (n, p), q in zip(on.model.named_parameters(), off.model.parameters()):
        assert torch.equal(p, q), n


def test_a_bf16_rollout_copy_is_measured_and_corrected(tmp_path):
    """bfloat16 rollouts of fp32 training: a real mismatch is logged, the weights are the capped
    ratios (mean near 1, not exactly 1), and the update differs from the uncorrected one."""
    on = trainer(tmp_path, "on", "rollout.dtype=bfloat16", "algo.is_cap=1.5")
    assert on.learner.rollout_differs
    m = one_update(on)
    assert m["rollout/is_corrected"] == 1.0
    assert m["rollout/logp_abs_diff"] > 1e-4  # bf16 weights change the log-probs visibly
    assert 0.8 < m["rollout/is_weight_mean"] < 1.2 and m["rollout/is_weight_mean"] != 1.0
    assert 0.0 <= m["rollout/is_capped_frac"] <= 1.0
    off = trainer(tmp_path, "off", "rollout.dtype=bfloat16", "algo.is_cap=null")
    assert off.learner.rollout_differs
    m_off = one_update(off)
    assert m_off["rollout/is_corrected"] == 0.0 and m_off["rollout/logp_abs_diff"] == pytest.approx(
        m["rollout/logp_abs_diff"])  # same rollouts, same mismatch; only the correction differs
    changed = [n for (n, p), q in zip(on.model.named_parameters(), off.model.parameters()) if not torch.equal(p, q)]
    assert changed


def test_sampler_logprobs_are_recorded_at_the_loss_temperature(tmp_path):
    """algo.loss_temperature=2 with rollouts at T=1: the sampler records log-probs of
    softmax(logits / 2), so the fp32 mismatch stays float noise."""
    t = trainer(tmp_path, "t2", "rollout.dtype=float32", "algo.loss_temperature=2.0")
    assert t.rollout.logprob_temperature == 2.0
    m = one_update(t)
    assert m["rollout/logp_abs_diff"] < 1e-4
