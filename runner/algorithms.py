"""Policy-gradient pieces: group advantages and one clipped policy loss with switches.

GRPO variants differ by a few switches (how rewards are scaled, how token losses are
aggregated, the clip range); they are options here rather than copies of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADV_EPS = 1e-4


def advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    scale: str = "group",
    adv_clip: float | None = None,
) -> torch.Tensor:
    """(r - group mean) / scale, per rollout.

    scale: "group" divides by the group's population std (so 1 success among 24 gets
    4.8, as in the RL Diary), "batch" by the whole batch's std, "none" not at all
    (Dr. GRPO). A group whose rewards are all equal gets advantage 0 either way.
    """
    rewards = rewards.float()
    adv = torch.empty_like(rewards)
    std = torch.empty_like(rewards)
    for g in torch.unique(groups):
        idx = groups == g
        r = rewards[idx]
        adv[idx] = r - r.mean()
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


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the policy's entropy at that position.

    logits [B, T, V] predict targets [B, T]. Computed in float32 whatever the model dtype.
    """
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


@dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: str = "seq-mean-token-mean"
    entropy_coef: float = 0.0


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate, negated, minus an optional entropy bonus.

    per token: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    """
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(-1)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate(per_token, mask, cfg.loss_agg, norm)
    ent = aggregate(entropy, mask, cfg.loss_agg, norm)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * ent
    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        low = ((ratio < 1 - cfg.clip_low) & (a < 0) & m).sum() / n
        high = ((ratio > 1 + cfg.clip_high) & (a > 0) & m).sum() / n
        r = ratio[m] if m.any() else ratio.new_ones(1)
        stats = {
            "clip_frac/low": low,
            "clip_frac/high": high,
            "clip_frac/total": low + high,
            "ratio/mean": r.mean(),
            "ratio/min": r.min(),
            "ratio/max": r.max(),
        }
    return loss, stats
