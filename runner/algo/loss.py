"""Policy-gradient pieces: advantages and ONE clipped policy loss with switches.

GRPO and its variants differ by a handful of switches, so they are options here rather
than copies of the loss (the presets in conf/algo/ only set switches):

- baseline: group mean (GRPO) or leave-one-out (RLOO)
- scale_rewards: divide by the group's std (GRPO), the batch's, or not at all (Dr. GRPO)
- ratio_level: per token (PPO/GRPO) or one length-normalised ratio per sequence (GSPO)
- clip_mode: PPO's min(unclipped, clipped) or CISPO's detached clipped weight x log-prob
- clip_low / clip_high: asymmetric ranges (DAPO's clip-higher); clip_low None = no lower bound
- loss_agg: token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum-norm (Dr. GRPO)
- token_mask: e.g. only the top-entropy tokens ("Beyond the 80/20 rule")
- entropy bonus and KL-to-reference terms
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from runner.config import LR_SCHEDULES

ADV_EPS = 1e-4


def advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    scale: str = "group",
    adv_clip: float | None = None,
    baseline: str = "mean",
) -> torch.Tensor:
    """(r - baseline) / scale, per rollout.

    baseline "mean": the group's mean reward (GRPO); "loo": the mean of the *other*
    rollouts in the group (RLOO), which equals G/(G-1) * (r - mean).
    scale "group": the group's population std (so 1 success among 24 gets 4.8, as in the
    RL Diary); "batch": the whole batch's std; "none": no division (Dr. GRPO, RLOO).
    A group whose rewards are all equal gets advantage 0 either way.
    """
    rewards = rewards.float()
    adv = torch.empty_like(rewards)
    std = torch.empty_like(rewards)
    for g in torch.unique(groups):
        idx = groups == g
        r = rewards[idx]
        n = r.numel()
        if baseline == "loo":
            adv[idx] = (r - r.mean()) * (n / (n - 1)) if n > 1 else torch.zeros_like(r)
        elif baseline == "mean":
            adv[idx] = r - r.mean()
        else:
            raise ValueError(f"algo.baseline={baseline!r}: must be mean or loo")
        std[idx] = r.std(correction=0)
    if scale == "group":
        adv = adv / (std + ADV_EPS)
    elif scale == "batch":
        adv = adv / (rewards.std(correction=0) + ADV_EPS)
    elif scale != "none":
        raise ValueError(f"algo.scale_rewards={scale!r}: must be one of group, batch, none")
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    return adv


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the policy's entropy at that position, for the
    policy softmax(logits / temperature).

    logits [B, T, V] predict targets [B, T]. Computed in float32 whatever the model dtype.
    temperature 1 is the model itself; the sampling temperature (TRL's and verl's choice)
    makes the loss's ratio and entropy those of the distribution the rollouts came from.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimates from samples of pi (Schulman's k1, k2, k3)."""
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"algo.kl.estimator={estimator!r}: must be k1, k2 or k3")


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Keep the `quantile` fraction of valid tokens with the highest entropy (1.0 keeps all)."""
    if quantile >= 1.0:
        return mask.bool()
    m = mask.bool()
    vals = entropy.detach()[m]
    if vals.numel() == 0:
        return m
    threshold = torch.quantile(vals.float(), 1.0 - quantile)
    return m & (entropy.detach() >= threshold)


@dataclass(frozen=True)
class LossConfig:
    clip_low: Optional[float] = 0.2
    clip_high: float = 0.2
    loss_agg: str = "seq-mean-token-mean"
    ratio_level: str = "token"  # token | sequence
    clip_mode: str = "ppo"  # ppo | cispo
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    @classmethod
    def from_algo(cls, a) -> "LossConfig":
        """From a validated runner.config.AlgoConfig (a preset plus overrides)."""
        return cls(clip_low=a.clip_low, clip_high=a.clip_high, loss_agg=a.loss_agg, ratio_level=a.ratio_level,
                   clip_mode=a.clip_mode, entropy_coef=a.entropy.coef, kl_coef=a.kl.coef,
                   kl_estimator=a.kl.estimator)


@dataclass(frozen=True)
class BatchNorm:
    """Whole-batch counts, so a loss summed over micro-batches equals the full-batch loss."""

    tokens: float
    seqs: float
    max_len: float


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, norm: BatchNorm) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar.

    token-mean: every token in the batch weighs the same (DAPO).
    seq-mean-token-mean: mean over tokens of each sequence, then over sequences (GRPO).
    seq-mean-token-sum-norm: token sum divided by a constant length (Dr. GRPO).
    """
    mask = mask.to(values.dtype)
    summed = (values * mask).sum(-1)
    if how == "token-mean":
        return summed.sum() / norm.tokens
    if how == "seq-mean-token-mean":
        return (summed / mask.sum(-1).clamp(min=1)).sum() / norm.seqs
    if how == "seq-mean-token-sum-norm":
        return (summed / norm.max_len).sum() / norm.seqs
    raise ValueError(f"algo.loss_agg={how!r}: unknown aggregation")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor,
    cfg: LossConfig,
    norm: BatchNorm,
    *,
    pg_mask: Optional[torch.Tensor] = None,
    entropy_mask: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    is_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss on [B, T] tensors; `mask` marks real completion tokens.

    ppo:   per token -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    cispo: per token -sg(clip(ratio, 1 - clip_low, 1 + clip_high)) * A * logp
    nll:   per token -A * logp (no ratio, no clipping): with A = 1 the negative log-likelihood
           of a supervised example's tokens, so SFT is this loss too (runner/loop/sft_step.py)
    ratio: exp(logp - old_logp) per token, or for ratio_level=sequence the exp of the
    mean log-ratio over the sequence's tokens, shared by all of them (GSPO).

    pg_mask (default: mask) selects the tokens that get policy gradient (top-entropy
    training); the others are zeroed but still counted, so masking does not rescale the
    kept tokens' gradients. entropy_mask (default: mask) selects the tokens whose entropy
    is rewarded (the answer span, say), averaged over those tokens. is_weight (detached,
    [B, T]) multiplies each token's policy-gradient term: the rollout correction below.
    loss = pg - entropy_coef * H + kl_coef * KL.
    """
    mask_f = mask.to(logp.dtype)
    pg_mask = mask if pg_mask is None else pg_mask
    entropy_mask = mask if entropy_mask is None else entropy_mask
    log_ratio = logp - old_logp
    if cfg.ratio_level == "sequence":
        seq = (log_ratio * mask_f).sum(-1) / mask_f.sum(-1).clamp(min=1)
        log_ratio = seq.unsqueeze(-1).expand_as(logp)
    elif cfg.ratio_level != "token":
        raise ValueError(f"algo.ratio_level={cfg.ratio_level!r}: must be token or sequence")
    ratio = torch.exp(log_ratio)
    lo = 0.0 if cfg.clip_low is None else 1.0 - cfg.clip_low
    hi = 1.0 + cfg.clip_high
    a = adv.unsqueeze(-1)
    clipped_ratio = ratio.clamp(lo, hi)
    if cfg.clip_mode == "ppo":
        per_token = -torch.minimum(ratio * a, clipped_ratio * a)
    elif cfg.clip_mode == "cispo":
        per_token = -clipped_ratio.detach() * a * logp
    elif cfg.clip_mode == "nll":  # no ratio: with advantage 1, the supervised loss (algo.kind=sft)
        per_token = -a * logp
    else:
        raise ValueError(f"algo.clip_mode={cfg.clip_mode!r}: must be ppo, cispo or nll")
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    loss = aggregate(per_token * pg_mask.to(per_token.dtype), mask, cfg.loss_agg, norm)
    ent = aggregate(entropy, entropy_mask, cfg.loss_agg, norm)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * ent
    stats: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        kl = aggregate(kl_estimate(logp, ref_logp, cfg.kl_estimator), mask, cfg.loss_agg, norm)
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * kl
        stats["kl"] = kl.detach()
    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        low = ((ratio < lo) & (a < 0) & m).sum() / n
        high = ((ratio > hi) & (a > 0) & m).sum() / n
        r = ratio[m] if m.any() else ratio.new_ones(1)
        stats.update({
            "clip_frac/low": low,
            "clip_frac/high": high,
            "clip_frac/total": low + high,
            "ratio/mean": r.mean(),
            "ratio/min": r.min(),
            "ratio/max": r.max(),
            "pg_token_frac": (pg_mask.bool() & m).sum() / n,
        })
    return loss, stats


def rollout_correction(train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       cap: Optional[float]) -> tuple[Optional[torch.Tensor], dict[str, float]]:
    """Truncated importance sampling for rollouts sampled by other weights than the ones
    trained (a bf16 copy, vLLM): per token w = min(p_train / p_sampler, cap) with p_train the
    training forward before the update (the loss's old policy), so the policy gradient is that
    of the policy being trained (Yao et al. 2025, "off-policy RL from an efficient framework";
    TRL's vLLM importance-sampling correction, token level). cap None: no weight. Also returns
    the sums the mismatch metrics need (over the mask): |delta|, the k3 estimate of
    KL(sampler || train), tokens, w (the uncapped ratio when cap is None) and capped tokens,
    with delta = log p_train - log p_sampler."""
    m = mask.bool()
    delta = (train_logp.detach() - sampler_logp.to(train_logp.dtype)).masked_fill(~m, 0.0)
    ratio = torch.exp(delta)
    k3 = (ratio - 1.0 - delta).masked_fill(~m, 0.0)  # KL(sampler || train), estimated on sampler's tokens
    weight = None if cap is None else ratio.clamp(max=cap).masked_fill(~m, 1.0)
    w = ratio if weight is None else weight
    sums = {"abs_delta": delta.abs().sum().item(), "k3": k3.sum().item(), "tokens": float(m.sum().item()),
            "weight": w[m].sum().item(), "capped": float(((ratio > cap) & m).sum().item()) if cap is not None else 0.0}
    return weight, sums


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The multiplier of algo.lr for optimizer step `step` (1-based) of `total`: linear
    warm-up over `warmup` steps, then constant, linear decay or a cosine to 0 (the last step
    keeps 1/total of the range), as the Hugging Face schedulers TRL uses compute it, except
    the warm-up: theirs gives step 1 lr 0 (0, 1/2, 1 for warmup=2: a step that moves only
    Adam's moments), ours (s + 1) / (warmup + 1) (1/3, 2/3, 1), so every step moves the
    weights. A function of the step alone, so a resumed run needs no scheduler state."""
    s = step - 1
    if s < warmup:
        return (s + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (s - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"algo.lr_schedule={schedule!r}: must be one of {', '.join(LR_SCHEDULES)}")


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to
    -penalty at max_len (and -penalty beyond)."""
    start = max_len - buffer
    over = (lengths.float() - start).clamp(min=0) / max(buffer, 1)
    return -penalty * over.clamp(max=1.0)


class AdaptiveEntropy:
    """Skywork-OR1's adaptive entropy control: raise the coefficient by `delta` while the
    policy's entropy is below `target`, lower it otherwise, clamped to [lo, hi]; the bonus
    applies only while entropy is below target."""

    def __init__(self, coef: float, target: float, delta: float, lo: float, hi: float):
        self.coef, self.target, self.delta, self.lo, self.hi = coef, target, delta, lo, hi

    def effective(self, entropy: float) -> float:
        return self.coef if entropy < self.target else 0.0

    def update(self, entropy: float) -> float:
        step = self.delta if entropy < self.target else -self.delta
        self.coef = min(self.hi, max(self.lo, self.coef + step))
        return self.coef
