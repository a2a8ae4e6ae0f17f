"""FR3E (arXiv 2507.07017): explore where the policy is unsure (`rollout.strategy=fr3e`).

First return: per prompt, sample `base_samples` base trajectories and read the policy's
entropy at each of their tokens (one no-grad forward). Anchors: the `anchors` highest-
entropy positions (or every position above the `percentile` of the trajectory's
entropies), a run of adjacent high-entropy positions counting once (its first position).
Entropy-eliciting explore: from each anchor's prefix (prompt + base tokens before the
anchor) sample `algo.group_size` continuations; the anchor token itself is resampled.

Training signal: the continuations of one anchor form a group, so advantages compare
rollouts that share their whole history up to the uncertain token; the prefix is part of
that group's prompt, never trained (so a prefix shared by M rollouts is not trained M
times). The value of a prefix is the mean reward of its continuations. Groups whose
rewards are all equal carry no signal and are dropped (rejection sampling). Clip-higher
and the other loss options apply unchanged (`algo.clip_high`).

Not implemented here: the paper's adaptive advantage modulation between consecutive
anchors (the skill card describes it only loosely); the base trajectories are used to
find anchors and are not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from envs.base import Prompt
from runner.algo.forward import sequence_logprobs
from runner.rollout.hf import HFRollout, RolloutBatch, completion_mask, eos_token_ids, render


def select_anchors(entropy: Sequence[float], k: Optional[int] = 3, percentile: Optional[float] = None,
                   merge_adjacent: bool = True) -> list[int]:
    """Anchor positions in one trajectory, in order.

    High-entropy positions: those above the `percentile` (0-100) of the trajectory's own
    entropies when it is given, else the k highest (ties: the earlier first). With
    merge_adjacent, a run of adjacent high positions is one decision point, anchored at its
    first token (so top-k may give fewer than k anchors). With a percentile and k, the k
    runs with the highest peak are kept."""
    n = len(entropy)
    if n == 0:
        return []
    e = [float(x) for x in entropy]
    if percentile is not None:
        thr = torch.quantile(torch.tensor(e), percentile / 100.0).item()
        high = [i for i in range(n) if e[i] > thr]
    else:
        high = sorted(sorted(range(n), key=lambda i: (-e[i], i))[: k or n])
    runs: list[list[int]] = []
    for p in high:
        if merge_adjacent and runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    if percentile is not None and k:
        runs = sorted(runs, key=lambda r: -max(e[i] for i in r))[:k]
    return sorted(r[0] for r in runs)


@dataclass
class FR3EStats:
    anchors_per_trajectory: float = 0.0
    anchor_entropy: float = 0.0
    base_tokens: int = 0
    branch_tokens: int = 0
    anchor_depth: list = field(default_factory=list)  # relative depth in [0, 1) per group


class FR3ERollout:
    """Same contract as HFRollout.generate; the groups of the batch are anchors."""

    def __init__(self, base: HFRollout, base_samples: int = 1, anchors: Optional[int] = 3,
                 percentile: Optional[float] = None, merge_adjacent: bool = True) -> None:
        self.base = base
        self.base_samples = base_samples
        self.anchors = anchors
        self.percentile = percentile
        self.merge_adjacent = merge_adjacent
        self.max_new_tokens = base.max_new_tokens
        self.temperature = base.temperature
        self.last: Optional[FR3EStats] = None

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: Sequence[Prompt], group_size: int,
                 temperature: Optional[float] = None) -> RolloutBatch:
        device = next(model.parameters()).device
        temperature = temperature or self.base.temperature
        base = self.base.generate(model, tokenizer, prompts, self.base_samples, temperature=temperature)
        _, ent = sequence_logprobs(model, base)
        stats = FR3EStats(base_tokens=int(base.completion_mask.sum()))
        pad = tokenizer.pad_token_id
        eos = eos_token_ids(model, tokenizer)
        contexts, owners, prefixes, depths, n_anchors, anchor_ents = [], [], [], [], [], []
        for i in range(len(base)):
            L = int(base.completion_mask[i].sum())
            e = ent[i, :L].float().tolist()
            pos = select_anchors(e, self.anchors, self.percentile, self.merge_adjacent)
            n_anchors.append(len(pos))
            prompt_ids = base.input_ids[i, : base.prompt_len][base.attention_mask[i, : base.prompt_len].bool()].tolist()
            comp = base.completion_ids[i, :L].tolist()
            for p in pos:
                contexts.append(prompt_ids + comp[:p])
                owners.append(base.prompts[i])
                prefixes.append(comp[:p])
                depths.append(p / max(L, 1))
                anchor_ents.append(e[p])
        stats.anchors_per_trajectory = sum(n_anchors) / max(len(n_anchors), 1)
        stats.anchor_entropy = sum(anchor_ents) / max(len(anchor_ents), 1)
        stats.anchor_depth = depths
        self.last = stats
        if not contexts:  # no anchors at all (empty trajectories): fall back to independent groups
            return self.base.generate(model, tokenizer, prompts, group_size, temperature=temperature)
        width = max(len(c) for c in contexts)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=device)
        attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
        was_training = model.training
        model.eval()
        try:
            cont, _ = self.base._sample_loop(model, ids, attn, group_size, eos, pad, temperature)
        finally:
            model.train(was_training)
        # a continuation may use what the base trajectory left of the length budget
        budget = torch.tensor([self.max_new_tokens - len(p) for p in prefixes], device=device).repeat_interleave(group_size)
        mask, _ = completion_mask(cont, eos)
        mask &= torch.arange(cont.shape[1], device=device)[None] < budget[:, None]
        finished = [bool((cont[r][mask[r]].unsqueeze(-1) == torch.tensor(eos, device=device)).any()) for r in range(len(cont))]
        cont = torch.where(mask, cont, torch.full_like(cont, pad))
        stats.branch_tokens = int(mask.sum())
        full_ids = torch.cat([ids.repeat_interleave(group_size, 0), cont], 1)
        full_attn = torch.cat([attn.repeat_interleave(group_size, 0), mask.to(attn.dtype)], 1)
        texts = [tokenizer.decode(prefixes[g] + cont[r][mask[r]].tolist(), skip_special_tokens=True)
                 for r, g in enumerate(torch.arange(len(contexts)).repeat_interleave(group_size).tolist())]
        return RolloutBatch(
            input_ids=full_ids, attention_mask=full_attn, completion_mask=mask, prompt_len=width,
            groups=torch.arange(len(contexts), device=device).repeat_interleave(group_size),
            prompts=[owners[g] for g in range(len(contexts)) for _ in range(group_size)],
            completions=texts, finished=finished,
        )
